"""Scorers of the head-to-head evaluation: the paper's protocol (user-as-engram-method.md §6).

Pure functions over texts and token ids, so the rules are unit-tested on their own:

  * containment: the lower-cased gold string appears anywhere in the lower-cased continuation
    (indirect_any, direct full answer, chat-form recall);
  * first-token rule: the first generated token is the first token of " " + the first word of
    the gold (indirect_top1, direct top-1). Greedy decoding picks the argmax, so "first
    generated token == gold" is "gold ranks first in the logits at the last prompt position".
    Where the tokenizer writes the leading space as a token of its own (numbers in SmolLM2),
    the space token and the word's first token must both match (`gold_first_tokens`);
  * probes: the first 20 `indirect_qa` items in file order as "Q: <q>\\nA:" (16 greedy tokens),
    every `direct_qa` question as one chat user turn (24 greedy tokens).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from engram_local.text.facts import fact_sentence, join_answer  # noqa: F401 (re-exported)

INDIRECT_PROBES = 20        # the paper: first 20 indirect_qa items per user, in file order
INDIRECT_TOKENS = 16        # greedy tokens per indirect probe
CHAT_TOKENS = 24            # greedy tokens per chat-form question (the contract check's figure)
DIRECT_EXTRA_TOKENS = 4     # direct completion: the answer's own tokens plus this many
CONTEXT_HEADER = "Facts about me: "


def contains(gold, text: str) -> bool:
    """The paper's containment rule: lower-cased gold anywhere in the lower-cased text."""
    return str(gold).lower() in str(text).lower()


def first_word(answer) -> str:
    words = str(answer).split()
    return words[0] if words else ""


def gold_first_tokens(tokenize: Callable[[str], Sequence[int]], answer, prompt: str | None = None) -> list[int]:
    """The gold of the first-token rule: the first token of " " + the first word of the answer
    (the leading space matters).

    `tokenize` maps text to ids without BOS. With a completion `prompt` that ends where an
    answer follows without a space (whitespace, "$", "(" ...: writer.join_answer), no space is
    added, so the gold is the token the model would really write there. Where the tokenizer
    gives the leading space a token of its own (SmolLM2 splits " 48" into " ", "4", "8"), the
    first token would be a bare space for every number; the gold is then the space token(s)
    plus the first token that carries the word, [" ", "4"]. One token otherwise, as in the paper."""

    word = first_word(answer)
    if not word:
        raise ValueError(f"empty gold answer {answer!r}")
    lead = join_answer(prompt, word) if prompt else " " + word
    ids = [int(t) for t in tokenize(lead)]
    if not ids:
        raise ValueError(f"the tokenizer gives no tokens for {lead!r}")
    space = lead[:len(lead) - len(lead.lstrip())]
    ws = [int(t) for t in tokenize(space)] if space else []
    if ws and len(ids) > len(ws) and ids[:len(ws)] == ws:
        return ids[:len(ws) + 1]
    return ids[:1]


def first_token_hit(generated: Sequence[int], gold: int | Sequence[int]) -> bool:
    """The first-token rule: the continuation starts with the gold token(s)
    (`gold_first_tokens`: one token, or a lone space token and the first token of the word)."""
    gold = [int(gold)] if isinstance(gold, (int, np.integer)) else [int(t) for t in gold]
    return len(generated) >= len(gold) > 0 and [int(t) for t in generated[:len(gold)]] == gold


def indirect_probes(user: Mapping, n: int = INDIRECT_PROBES) -> list[tuple[str, str, str]]:
    """(completion prompt, question, gold) of the first `n` indirect_qa items, in file order."""
    return [(f"Q: {q['question']}\nA:", str(q["question"]), str(q["answer"]))
            for q in list(user.get("indirect_qa", []))[:n]]


def chat_probes(user: Mapping) -> list[tuple[str, str]]:
    """(question, gold) of every direct_qa item: asked as one chat user turn."""
    return [(str(q["question"]), str(q["answer"])) for q in user.get("direct_qa", [])]


def context_block(sentences: Sequence[str]) -> str:
    """What G/H put before a prompt (or a chat question): the facts, then a blank line."""
    return f"{CONTEXT_HEADER}{' '.join(sentences)}\n\n" if sentences else ""


def rate(hits: Sequence[bool]) -> float | None:
    """Fraction of hits (None for no probes)."""
    return sum(bool(h) for h in hits) / len(hits) if hits else None


def mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def users_worse(scores: Mapping[str, float | None], base: Mapping[str, float | None]) -> int | None:
    """How many users score strictly below the base condition (None without base scores)."""
    pairs = [(scores[u], base[u]) for u in scores if u in base and scores[u] is not None
             and base[u] is not None]
    return sum(s < b for s, b in pairs) if pairs else None
