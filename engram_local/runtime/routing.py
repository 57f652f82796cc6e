"""Reply openings: which of the user's facts a chat turn asks about, and the words to say first.

The memory's rows are keyed on the words the model says right before an answer ("My dog's name
is" -> "Biscuit"), fitted in the replies the skill adapter gives to questions made from each
fact (`text.questions.echo_prefixes`, the writer's own rule). A question worded otherwise
("Remind me what my pet is called?") leads the reply through other words ("My pet is called a
cat."), where no row is read. The router asks the model itself which of those fitted openings
it finds likeliest after the user's turn - the mean log-probability of each opening's tokens,
teacher forced - and, when the best one is likely enough (`MIN_MEAN_LOGPROB`), the reply starts
with it; the rows then give the answer. Zero prompt tokens: the question is unchanged, only
the reply's first words are chosen, and a turn about nothing the user said (general questions)
scores far below the bound and is answered as without routing.

Measured (docs/chat-memory.md, "Session 12"): the opening of the right fact is the likeliest
for 45/45 direct and 74/90 paraphrased questions of the dev personas, 100/105 and 148/210 of the
others; the bound -1.5 routes none of their general questions (best openings -1.6 ... -5.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

# An opening is said only when its tokens' mean log-probability (natural log) after the user's
# turn is at least this: right openings of direct questions score -0.01 median (-3.9 worst),
# of paraphrased ones -0.6; the best opening of a general question -1.6 or lower (dev personas;
# -2.5 or lower on the others).
MIN_MEAN_LOGPROB = -1.5
# Openings scored whole, the likeliest by their first two tokens (best_opening).
SHORTLIST = 6


@dataclass(frozen=True)
class Opening:
    fact_id: str
    text: str                     # the reply's first words, e.g. "My dog's name is"
    tokens: tuple[int, ...]       # as the reply tokenizes them (the model writes them so)


@dataclass(frozen=True)
class Route:
    opening: Opening
    score: float                  # mean log-probability of its tokens


def openings(facts, tokenize: Callable[[str], list[int]], per_fact: int | None = None) -> list[Opening]:
    """Every fitted opening of the ledger facts `facts` (objects with id, prompt, answer), in
    ledger order, one per distinct token sequence (`per_fact`: as the writer, ECHO_FORMS_PER_FACT)."""
    from engram_local.text.questions import ECHO_FORMS_PER_FACT, echo_prefixes

    out, seen = [], set()
    for fid, forms in echo_prefixes(facts, tokenize, per_fact or ECHO_FORMS_PER_FACT).items():
        for _, text in forms:
            ids = tuple(tokenize(text))
            if ids and ids not in seen:
                seen.add(ids)
                out.append(Opening(fid, text, ids))
    return out


def mean_logprob(first_logits: np.ndarray, rows: np.ndarray, tokens: Sequence[int]) -> float:
    """Mean log-probability of `tokens` given the logits before the first (`first_logits`,
    [n_vocab]) and the logits after each of them (`rows`, [len(tokens), n_vocab]; its last row
    is not used)."""
    lp = _log_softmax(np.vstack([first_logits[None, :], rows[:len(tokens) - 1]]))
    return float(lp[np.arange(len(tokens)), np.asarray(tokens)].mean())


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def best_opening(backend, prompt: Sequence[int], candidates: Sequence[Opening],
                 min_score: float = MIN_MEAN_LOGPROB, keep: int = SHORTLIST) -> Route | None:
    """The likeliest of `candidates` after `prompt` on `backend`'s sequence (left holding
    `prompt`), or None when none reaches `min_score`. The caller holds the backend.

    Each decode call reads the whole model, so the candidates are not scored one by one: their
    first two tokens are (one call per distinct first token), and only the `keep` likeliest by
    those are scored whole."""
    if not candidates:
        return None
    prompt = [int(t) for t in prompt]
    held = backend.tokens
    common = 0
    while common < min(len(held), len(prompt) - 1) and held[common] == prompt[common]:
        common += 1
    backend.truncate(common)
    first = backend.eval(prompt[backend.n_past:])

    def back_to_prompt():
        backend.truncate(len(prompt))
        if backend.n_past != len(prompt):        # a backend that could not roll back started over
            backend.eval(prompt[backend.n_past:])

    room = [c for c in candidates if len(prompt) + len(c.tokens) < backend.n_ctx]
    lp_first = _log_softmax(first)
    after: dict[int, np.ndarray] = {}
    if len(room) > keep:
        for t in dict.fromkeys(c.tokens[0] for c in room if len(c.tokens) > 1):
            after[t] = _log_softmax(backend.eval([t]))
            back_to_prompt()

        def head(c: Opening) -> float:
            if len(c.tokens) == 1:
                return float(lp_first[c.tokens[0]])
            return float(lp_first[c.tokens[0]] + after[c.tokens[0]][c.tokens[1]]) / 2

        room = sorted(room, key=head, reverse=True)[:keep]
    best: Route | None = None
    for c in room:
        rows = backend.eval(list(c.tokens), all_logits=True)
        back_to_prompt()
        score = mean_logprob(first, rows, c.tokens)
        if math.isfinite(score) and (best is None or score > best.score):
            best = Route(c, score)
    return best if best is not None and best.score >= min_score else None
