"""Reply openings: which of the user's facts a chat turn asks about, and the words to say first.

The memory's rows are keyed on the words the model says right before an answer ("My dog's name
is" -> "Biscuit"), fitted in the replies the skill adapter gives to questions made from each
fact (`text.questions.echo_prefixes`, the writer's own rule). A question worded otherwise
("Remind me what my pet is called?") leads the reply through other words ("My pet is called a
cat."), where no row is read. The router asks the model itself which of those fitted openings
it finds likeliest after the user's turn - the mean log-probability of each opening's tokens,
teacher forced - and, when the best one passes the gate (`MIN_GATE`, below), the reply starts
with it; the rows then give the answer. Zero prompt tokens: the question is unchanged, only
the reply's first words are chosen.

Whether the best opening is said at all is judged by how likely it is here and by how much more
likely than after turns that ask about nothing in particular (`NEUTRAL_TURNS`, its prior): a
paraphrase makes its fact's opening far likelier than usual even when not likely outright
("What's my kitty called?" -> "My cat's name is": -2.5 here, -4.7 after a neutral turn), a turn
about nothing the user said (general questions) does neither and is answered as without routing.

Measured (docs/chat-memory.md, "Session 13"): the right fact's opening is the likeliest for 45/45
direct and 75/90 paraphrased questions of the dev personas; at the gate it is said for 44/45 and
70/90 (by the likelihood alone, session 12's bound: 42/45 and 54/90), and none of the 50 general
questions of the ten personas is answered otherwise than without memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from engram_local.runtime.backend import reusable

# An opening is said only when its gate - the mean of its likelihood after the user's turn (mean
# token log-probability, natural log) and its lift over its prior (that minus the best of its
# likelihoods after NEUTRAL_TURNS) - reaches this. The best opening of a general question gates at
# -1.24 or lower on the dev personas (-1.56 on p03-p05); the bound leaves a quarter nat above.
MIN_GATE = -1.0
# User turns about nothing in particular: an opening's prior is its likelihood after the likeliest.
NEUTRAL_TURNS = ("Hi.", "Tell me about myself.", "What do you know about me?",
                 "Can you help me with something?")
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
    score: float                  # mean log-probability of its tokens after the prompt
    prior: float | None = None    # ... after the likeliest neutral turn (None: not needed)

    @property
    def gate(self) -> float:
        """What MIN_GATE bounds: the mean of the likelihood and the lift over the prior."""
        return self.score if self.prior is None else gate(self.score, self.prior)


def gate(score: float, prior: float) -> float:
    """The mean of `score` and of `score - prior` (the opening's lift). Never below `score`: a
    prior is a mean log-probability, at most 0."""
    return (score + (score - prior)) / 2


class Openings(list):
    """A memory's fitted openings (a list of Opening) and, filled in as routing needs them, their
    priors (`best_opening`; they depend on the memory's rows, so one Openings per memory version)."""

    def __init__(self, items=()):
        super().__init__(items)
        self.priors: dict[Opening, float] = {}


def openings(facts, tokenize: Callable[[str], list[int]], per_fact: int | None = None) -> Openings:
    """Every fitted opening of the ledger facts `facts` (objects with id, prompt, answer), in
    ledger order, one per distinct token sequence (`per_fact`: as the writer, ECHO_FORMS_PER_FACT)."""
    from engram_local.text.questions import ECHO_FORMS_PER_FACT, echo_prefixes

    out, seen = Openings(), set()
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


def hold_prompt(backend, prompt: list[int]) -> np.ndarray:
    """Leave `backend`'s sequence holding `prompt` (reusing what it holds) and return the logits
    after its last token."""
    backend.truncate(reusable(backend.tokens, prompt))
    return backend.eval(prompt[backend.n_past:])


def score_opening(backend, prompt: list[int], first: np.ndarray, c: Opening) -> float:
    """Mean log-probability of `c` after `prompt` (held, `first` its logits); `prompt` held again."""
    rows = backend.eval(list(c.tokens), all_logits=True)
    _back(backend, prompt)
    return mean_logprob(first, rows, c.tokens)


def _back(backend, prompt: list[int]) -> None:
    """Back to holding `prompt` after decoding past it."""
    backend.truncate(len(prompt))
    if backend.n_past != len(prompt):        # a backend that could not roll back started over
        backend.eval(prompt[backend.n_past:])


def prior(backend, c: Opening, neutral: Sequence[Sequence[int]]) -> float:
    """The likelihood of `c` after the likeliest of the `neutral` prompts (token ids of
    NEUTRAL_TURNS, rendered as the caller renders its prompts); the backend's sequence is left
    holding the last of them. 0 (no lift) when none fits the context."""
    best = -math.inf
    for p in neutral:
        p = [int(t) for t in p]
        if len(p) + len(c.tokens) < backend.n_ctx:
            best = max(best, score_opening(backend, p, hold_prompt(backend, p), c))
    return best if math.isfinite(best) else 0.0


def best_opening(backend, prompt: Sequence[int], candidates: Sequence[Opening],
                 neutral: Sequence[Sequence[int]] = (), min_score: float = MIN_GATE,
                 keep: int = SHORTLIST) -> Route | None:
    """The likeliest of `candidates` after `prompt` on `backend`'s sequence (left holding
    `prompt`), or None when its gate (`Route.gate`, its prior taken after each of the `neutral`
    prompts; without them the likelihood alone) does not reach `min_score`. The caller holds the
    backend. Priors are kept in `candidates.priors` when it is an Openings.

    Each decode call reads the whole model, so the candidates are not scored one by one: their
    first two tokens are (one call per distinct first token), and only the `keep` likeliest by
    those are scored whole. A prior costs a decode per neutral prompt, once per opening, and only
    when the likelihood alone falls short (the gate is never below it)."""
    if not candidates:
        return None
    prompt = [int(t) for t in prompt]
    first = hold_prompt(backend, prompt)
    room = [c for c in candidates if len(prompt) + len(c.tokens) < backend.n_ctx]
    lp_first = _log_softmax(first)
    after: dict[int, np.ndarray] = {}
    if len(room) > keep:
        for t in dict.fromkeys(c.tokens[0] for c in room if len(c.tokens) > 1):
            after[t] = _log_softmax(backend.eval([t]))
            _back(backend, prompt)

        def head(c: Opening) -> float:
            if len(c.tokens) == 1:
                return float(lp_first[c.tokens[0]])
            return float(lp_first[c.tokens[0]] + after[c.tokens[0]][c.tokens[1]]) / 2

        room = sorted(room, key=head, reverse=True)[:keep]
    best: Route | None = None
    for c in room:
        score = score_opening(backend, prompt, first, c)
        if math.isfinite(score) and (best is None or score > best.score):
            best = Route(c, score)
    if best is not None and best.score < min_score and neutral:     # the gate may still pass
        priors = candidates.priors if isinstance(candidates, Openings) else {}
        if best.opening not in priors:
            priors[best.opening] = prior(backend, best.opening, neutral)
            hold_prompt(backend, prompt)
        best = Route(best.opening, best.score, priors[best.opening])
    return best if best is not None and best.gate >= min_score else None
