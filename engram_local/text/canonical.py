"""Canonical token ids: DeepSeek's `CompressedTokenizer`, built from the backbone's own tokenizer.

Raw ids that decode to the same text after normalisation share one canonical id, so
"Doctor", " doctor" and "DOCTOR" address the same N-gram rows (engram-architecture.md §1).
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_WHITESPACE = re.compile(r"[ \t\r\n]+")


def normalize(text: str) -> str:
    """NFKC -> NFD -> strip accents -> lowercase -> collapse whitespace -> strip.

    A text that is exactly one space after collapsing stays " " (DeepSeek's U+E000 sentinel
    trick, which keeps the strip from emptying it).
    """
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFD", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    text = _WHITESPACE.sub(" ", text.lower())
    if text == " ":
        return " "
    return text.strip()


def build_canonical_map(tokenizer) -> tuple[np.ndarray, int]:
    """(lookup int64 [raw_vocab], n_canonical) for a Hugging Face tokenizer.

    Each raw id is decoded alone; a decode containing U+FFFD (a partial UTF-8 byte token) keys
    on the raw token string, otherwise on the normalised text (or the raw text when that
    normalises to ""). Canonical ids are dense, in order of first appearance by raw id.
    """
    n = len(tokenizer)
    lookup = np.empty(n, dtype=np.int64)
    seen: dict[str, int] = {}
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    for raw in range(n):
        text = tokenizer.decode([raw], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokens[raw]
        else:
            key = normalize(text) or text
        lookup[raw] = seen.setdefault(key, len(seen))
    return lookup, len(seen)
