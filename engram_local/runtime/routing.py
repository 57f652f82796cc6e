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

Which fact a turn is about is judged better by a sentence encoder than by the model's own
likelihoods, when one is installed (runtime.retrieval, all-MiniLM-L6-v2): its cosine between the
user's turn and each fact ("I have a golden retriever named Biscuit" for "Remind me what my pet
is called?"), the fact's **relevance**. Then only the openings of the RELEVANT_FACTS most
relevant facts are scored, the one said is the best by likelihood plus PICK_WEIGHT x relevance,
and its gate gains RELEVANCE_WEIGHT x (relevance - RELEVANCE_FLOOR): a turn close to a fact lets
a less likely opening through, a turn close to none holds back a likely one.

Measured (docs/chat-memory.md, "Session 14"; every opening scored in full, memory files of the
session-12 writer): the right fact is the most relevant for 44/45 direct and 84/90 paraphrased
questions of the dev personas (the likeliest opening is the right fact's for 45/45 and 75/90).
Said right / wrong, dev: direct 44/0 both ways; paraphrased 70/6 of 90 by the likelihood and
gate alone, 82/4 with relevance; held-out personas p03-p09: paraphrased 138/18 of 210 -> 181/9,
direct 96/2 -> 99/2 of 105; none of the 50 general questions of the ten personas is routed
either way. Session 15: a turn about the user (first person) gates lower, and no fact less
relevant than RELEVANCE_MIN is said (first-person small talk, bench/data/smalltalk.txt, was
routed the most); end to end, paraphrased dev 78 -> 82/90, p03-p09 175 -> 180/210.
"""

from __future__ import annotations

import math
import re
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
# Openings scored whole, the likeliest by their first two tokens (best_opening, without relevance).
SHORTLIST = 6
# With relevance (a turn's cosine to each fact, runtime.retrieval): the openings of the
# RELEVANT_FACTS most relevant facts are scored whole; the best by score + PICK_WEIGHT x relevance
# (relevance decides between two facts unless they are about as close: then the model does,
# e.g. "What other hobby do I have?" -> "I also enjoy", where the encoder prefers the first hobby)
# is said when its gate + RELEVANCE_WEIGHT x (relevance - RELEVANCE_FLOOR) reaches MIN_GATE. Set on
# the dev personas (p00-p02): their general questions' best gates at -1.24 (a quarter nat below the
# bound); on p03-p09 at -1.78 ("What sweet food do bees make?" -> "I am allergic to", relevance 0.52).
RELEVANT_FACTS = 3
PICK_WEIGHT = 10.0
RELEVANCE_WEIGHT = 4.0
RELEVANCE_FLOOR = 0.25
# Said at all only when the turn is this close to the fact (cosine): turns about nothing the user
# said - small talk in the first person ("I'm bored, tell me a joke.") - stay below it, their
# best fact at 0.16 (median) and 0.27 (90th percentile); the right fact of a paraphrased question
# at 0.42 (20th percentile). bench/routing_pick.py --smalltalk (docs/chat-memory.md, "Session 15").
RELEVANCE_MIN = 0.32
# A turn that speaks of the user in the first person ("What's my go-to hot drink?") asks about the
# user; one that does not ("How do bees make honey?") is a general question. The first gate at
# MIN_GATE_ABOUT_USER - a fact's opening the model finds unlikely after the user's own wording
# ("My favorite tea is", -5.2) still opens the reply when the turn is close to the fact - and the
# others at MIN_GATE. Every direct and paraphrased question of the ten dev personas (450) says
# "I", "me" or "my", none of their 50 general questions does.
MIN_GATE_ABOUT_USER = -2.0
FIRST_PERSON = re.compile(r"\b(?:i|me|my|mine|myself)\b", re.IGNORECASE)


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
    relevance: float | None = None  # the turn's cosine to the opening's fact (None: no encoder)

    @property
    def gate(self) -> float:
        """What MIN_GATE bounds: the mean of the likelihood and the lift over the prior (the
        likelihood alone while no prior is taken), plus what relevance adds or takes away."""
        g = self.score if self.prior is None else gate(self.score, self.prior)
        if self.relevance is not None:
            g += RELEVANCE_WEIGHT * (self.relevance - RELEVANCE_FLOOR)
        return g


def gate(score: float, prior: float) -> float:
    """The mean of `score` and of `score - prior` (the opening's lift). Never below `score`: a
    prior is a mean log-probability, at most 0."""
    return (score + (score - prior)) / 2


class Openings(list):
    """A memory's fitted openings (a list of Opening), the text of each of their facts (what
    relevance compares a turn with) and, filled in as routing needs them, the openings' priors
    (`best_opening`) and the facts' sentence vectors (`relevance`): one Openings per memory
    version."""

    def __init__(self, items=(), facts: dict[str, str] | None = None):
        super().__init__(items)
        self.facts: dict[str, str] = dict(facts or {})
        self.priors: dict[Opening, float] = {}
        self.retriever = None                   # runtime.retrieval.Retriever over `facts`' texts


def fact_text(fact, facts=()) -> str:
    """What a fact's relevance is measured against: its prompt, in the first person as the echo
    forms word it (`text.questions.first_person`: "Casey was born in" -> "My sibling was born in"
    where another of `facts` says "My sibling is Casey"; a question asks "my sibling", and the
    encoder cannot know who Casey is), and its answer ("I have a golden retriever named Biscuit")."""
    from engram_local.text.questions import first_person

    return f"{first_person(fact.prompt, facts)} {fact.answer}".strip()


def openings(facts, tokenize: Callable[[str], list[int]], per_fact: int | None = None) -> Openings:
    """Every fitted opening of the ledger facts `facts` (objects with id, prompt, answer), in
    ledger order, one per distinct token sequence (`per_fact`: as the writer, ECHO_FORMS_PER_FACT)."""
    from engram_local.text.questions import ECHO_FORMS_PER_FACT, echo_prefixes

    facts = list(facts)
    out, seen = Openings(facts={f.id: fact_text(f, facts) for f in facts}), set()
    for fid, forms in echo_prefixes(facts, tokenize, per_fact or ECHO_FORMS_PER_FACT).items():
        for _, text in forms:
            ids = tuple(tokenize(text))
            if ids and ids not in seen:
                seen.add(ids)
                out.append(Opening(fid, text, ids))
    return out


def relevance(candidates: Openings, encoder, query: str) -> dict[str, float]:
    """The cosine of `query` (the user's turn) to each fact of `candidates`, by fact id; {} without
    an `encoder` (embed(texts) -> unit vectors, runtime.retrieval.BertEncoder) or a query. The
    facts' vectors are made once and kept with the openings (a runtime.retrieval.Retriever)."""
    from engram_local.runtime.retrieval import Retriever

    if encoder is None or not candidates.facts or not query.strip():
        return {}
    if candidates.retriever is None:
        candidates.retriever = Retriever(encoder, list(candidates.facts.values()))
    return {fid: float(v) for fid, v in zip(candidates.facts, candidates.retriever.scores(query))}


def about_user(turn: str) -> bool:
    """Whether the user's turn speaks of the user in the first person ("I", "me", "my", "mine",
    "myself"; "I'm" and "I've" count as "I")."""
    return bool(FIRST_PERSON.search(turn.replace("\u2019", "'")))


def turn_routing(candidates: Openings, encoder: Callable[[], object], turn: str | None) -> dict:
    """What routing a reply to the user's `turn` is judged by, as keyword arguments of
    best_opening: the turn's `relevance` to each fact (None without an encoder, openings or
    turn) and the gate it must reach (`min_score`: MIN_GATE_ABOUT_USER for a turn about the user
    when relevance is known, MIN_GATE otherwise; best_opening also asks RELEVANCE_MIN of the
    fact then). `encoder()` gives the sentence encoder or None; it is called only when there are
    openings and a turn, so a chat without memory never loads one."""
    near = relevance(candidates, encoder(), turn) if candidates and turn else None
    return {"relevance": near or None, "min_score": min_gate(turn, near)}


def min_gate(turn: str | None, relevance: dict[str, float] | None) -> float:
    """The gate a reply to `turn` must reach: MIN_GATE_ABOUT_USER for a turn about the user when
    its `relevance` to the facts is known, MIN_GATE otherwise."""
    return MIN_GATE_ABOUT_USER if relevance and turn and about_user(turn) else MIN_GATE


def passes(r: Route, min_score: float, min_relevance: float = RELEVANCE_MIN) -> bool:
    """Whether the opening `r` is said: its fact at least `min_relevance` relevant (when relevance
    is known) and its gate at `min_score` or above."""
    return (r.relevance is None or r.relevance >= min_relevance) and r.gate >= min_score


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


def relevant(candidates: Sequence[Opening], relevance: dict[str, float],
             n: int = RELEVANT_FACTS) -> list[Opening]:
    """The openings of the `n` facts most relevant (by `relevance`, fact id -> cosine; ties: the
    earlier fact), in `candidates`' order."""
    near = sorted(dict.fromkeys(c.fact_id for c in candidates), key=lambda f: -relevance.get(f, -1.0))[:n]
    return [c for c in candidates if c.fact_id in near]


def rank(r: Route) -> float:
    """What the opening said is the best by: its likelihood plus PICK_WEIGHT x its relevance."""
    return r.score + PICK_WEIGHT * (r.relevance or 0.0)


def best_opening(backend, prompt: Sequence[int], candidates: Sequence[Opening],
                 neutral: Sequence[Sequence[int]] = (), min_score: float = MIN_GATE,
                 keep: int = SHORTLIST, relevance: dict[str, float] | None = None,
                 min_relevance: float = RELEVANCE_MIN) -> Route | None:
    """The opening a reply to `prompt` starts with, on `backend`'s sequence (left holding
    `prompt`), or None when its gate (`Route.gate`, its prior taken after each of the `neutral`
    prompts; without them the likelihood alone) does not reach `min_score`. The caller holds the
    backend. Priors are kept in `candidates.priors` when it is an Openings.

    With `relevance` (fact id -> the turn's cosine to the fact, `relevance()`), the openings of
    the RELEVANT_FACTS most relevant facts are scored and the best by score + PICK_WEIGHT x
    relevance is the one, said only when its fact's relevance reaches `min_relevance`; without
    it the likeliest of all. Each decode call reads the whole
    model, so without relevance the candidates are not scored one by one: their first two tokens
    are (one call per distinct first token), and only the `keep` likeliest by those are scored
    whole. A prior costs a decode per neutral prompt, once per opening, and only when the gate
    without it falls short (a prior only raises it)."""
    if not candidates:
        return None
    prompt = [int(t) for t in prompt]
    first = hold_prompt(backend, prompt)
    room = [c for c in candidates if len(prompt) + len(c.tokens) < backend.n_ctx]
    if relevance:
        room = relevant(room, relevance)
    elif len(room) > keep:
        lp_first = _log_softmax(first)
        after: dict[int, np.ndarray] = {}
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
        r = Route(c, score, relevance=relevance.get(c.fact_id, 0.0) if relevance else None)
        if math.isfinite(score) and (best is None or rank(r) > rank(best)):
            best = r
    if best is not None and not passes(best, -math.inf, min_relevance):   # not near: no prior taken
        return None
    if best is not None and best.gate < min_score and neutral:     # the prior may still pass it
        priors = candidates.priors if isinstance(candidates, Openings) else {}
        if best.opening not in priors:
            priors[best.opening] = prior(backend, best.opening, neutral)
            hold_prompt(backend, prompt)
        best = Route(best.opening, best.score, priors[best.opening], best.relevance)
    return best if best is not None and passes(best, min_score, min_relevance) else None
