"""What both backends (llama.cpp and torch) check before appending tokens to a sequence."""

from __future__ import annotations

from typing import Sequence


class ContextFullError(ValueError):
    """More tokens than the context (-c) holds."""

    def __init__(self, n_past: int, n_new: int, n_ctx: int):
        super().__init__(f"the context holds {n_ctx} tokens: {n_past} in use + {n_new} new do not fit "
                         "(raise -c or shorten the prompt)")
        self.n_past, self.n_new, self.n_ctx = n_past, n_new, n_ctx


def check_new_tokens(tokens: Sequence[int], n_past: int, n_ctx: int, n_vocab: int) -> list[int]:
    """`tokens` as a list of ints, after checking they are non-empty, fit, and are in the vocabulary."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("eval needs at least one token")
    if n_past + len(tokens) > n_ctx:
        raise ContextFullError(n_past, len(tokens), n_ctx)
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {n_vocab})")
    return tokens
