"""What the writer fits: its settings, its input facts and result, and the token sequences
(items) a fact becomes - each sequence start x each prompt or chat form of the fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engram_local.text.facts import join_answer
from engram_local.text.tokens import encode, sequence_start

METHODS = ("joint", "opt", "unembed")
KEEP_OUT_MARGIN = 0.05   # a forgotten prompt only has to keep the model's own greedy choice


class FitError(ValueError):
    """A fact cannot be written (e.g. its answer cannot follow its prompt under the tokenizer)."""


@dataclass
class FitSettings:
    method: str = "joint"
    optimizer: str = "rprop"        # rprop (full-batch, sign-based: fastest here) | adam
    lr: float = 0.5                 # first step, relative to the row scale that moves the hidden
                                    # state by its own norm (see placement.calibrate)
    max_steps: int = 400            # optimizer steps at most (all components together)
    margin: float = 2.0             # every answer token must beat the runner-up logit by this
    context_margin: float = 4.0     # the same in a fact's contexts (chat replies): the real
                                    # question is not the stand-in, so the rows need headroom
    heads: int = 4                  # highest-order heads written per position at first (4: the
                                    # fit converges in about half the steps of 1 head)
    anchors: bool = True            # facts sharing their trigger rows get a row of their own
    common_logp: float | None = -8.0  # N-grams the model finds likelier than 10**this (from a
                                    # document start) are common: no rows there where avoidable
                                    # (placement.mark_rare); None = write at any N-gram
    answer_common_logp: float | None = -5.5  # the same past the trigger, where the N-gram holds
                                    # answer tokens (" is 4" 10**-5.6 is the fact's own; " is 1"
                                    # 10**-5.1 and " in 1" 10**-4.3 come with the years of prose:
                                    # at -5.0 "What is 12 plus 15?" read a birth year's row);
                                    # None = common_logp
    grow_after: int = 8             # steps a component may fail before it gets more rows
    patience: int = 12              # steps a component may go on once every prompt first met its
                                    # full margin and every chat form `fair`; then it stops at
                                    # the next step where they do
    fair: float = 2.0
    late: int = 80                  # steps after which a component stops as soon as every answer
    late_margin: float = 0.5        # of it wins by late_margin (a bound on the rare facts whose
                                    # chat forms pull against each other without end)
    plateau: int = 20               # ... or, after `late` steps, once its least margin has not
                                    # improved (by 0.05) for this many steps: a component of
                                    # facts that pull apart, whose loss swings without settling
    give_up: int = 160              # ... or once it has run this many steps since any of its
                                    # items first ran (growth and re-checks do not restart it): a
                                    # large component that creeps (least margin rising by more
                                    # than the plateau's gain, never reaching late_margin) would
                                    # otherwise run to max_steps; 0 = no limit
    give_up_chat: int = 40          # ... or, once every prompt of it gives its answer with its
                                    # full margin, this many steps since any of its items first
                                    # ran: the chat forms still short of theirs are the slow tail
                                    # (an echo reply after a question the rows cannot see, e.g.
                                    # "My favourite football club is" -> "Olympique"; 0 = no limit
    recheck: int = 3                # an item that met its margin rests, looked at again every
                                    # this many steps (0: every item of an unfinished component
                                    # runs every step)
    incremental: bool = True        # adding to / forgetting from a file: fit only the items the
                                    # new, freed or dropped rows reach (earlier rows stay fixed
                                    # until a new fact cannot do without them)
    unembed_scale: float | None = None  # UNEMBED_P scale: None = |W_V e| = gain * |h| (calibrated);
                                    # the paper's fixed 20 suits its own model only
    gain: float = 3.0               # calibrated start: the written value moves h by gain * |h|
    init_gate: float = 1.0          # start direction also opens the gate (0 = plain UNEMBED_P)
    opt_steps: int = 15             # OPT: steps per fact (the paper's OPT-15)
    value_dtype: str = "f16"        # the file's value type: the final check rounds to it
    extra_prefixes: tuple = ()      # more sequence starts the recall must survive, e.g.
                                    # ((text.tokens.document_start_id(tok),),); the first is the
                                    # runtime's own (text.tokens.sequence_start)
    fit_all_prefixes: bool = True   # fit every sequence start from the first step (else only
                                    # the first; the others join when the final check fails)
    drop_conflicts: bool = True     # leave out chat contexts another fact contradicts
                                    # (items.conflicting_contexts)
    article_forms: bool = True      # a chat context whose prompt ends in an article is also
                                    # fitted with the article said as the answer's first word:
                                    # replies skip or keep it ("... order is black" vs "... is a")
    fast: bool = True               # optimizer steps through bf16 copies of the later layers
                                    # (prefix.FrozenPrefix.fast); every check stays fp32
    seed: int = 0


@dataclass
class FactIn:
    """One fact as the writer sees it: a key, its trigger prompts, one answer."""
    id: str
    prompts: list[str]              # the main prompt first, then paraphrase prompts
    answer: str
    keep_out: bool = False          # a forgotten fact: make its prompt behave as without rows
    keep_out_tokens: list | None = None
    contexts: list = field(default_factory=list)   # (lead ids, prompt[, said]): the prompt after a
                                    # lead where no row may go, e.g. a chat turn reciting the fact
                                    # (text.facts.chat_contexts; the lead holds its sequence start);
                                    # `said`: words said before the answer (with_article_forms)


@dataclass
class FitResult:
    rows: np.ndarray                # int64 [n]
    keys: np.ndarray                # int64 [n]
    values: np.ndarray              # float32 [n, head_dim]
    fact_entries: dict[str, list[int]]   # fact id -> indices of the entries written for it
    recalled: dict[str, bool]       # fact id -> every checked form produces its full answer
    steps: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def answer_tokens(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer's tokens as the tokenizer produces them after the
    prompt; FitError when there are none or when they cannot follow the prompt's tokens."""
    if not answer.strip():
        raise FitError(f"empty answer for prompt {prompt!r}")
    if not prompt.strip():
        raise FitError(f"empty prompt for answer {answer!r}")
    p = encode(tok, prompt)
    cont = join_answer(prompt, answer)
    full = encode(tok, prompt + cont)
    a = full[len(p):]
    if full[:len(p)] != p or not a or tok.decode(full) != tok.decode(p) + cont:
        raise FitError(f"the tokenizer cannot produce the answer {answer!r} after the prompt {prompt!r} "
                       f"(the tokens of prompt + answer do not start with the prompt's own tokens, or do "
                       f"not decode back to the text); reword the prompt, e.g. without trailing spaces")
    return p, a


def sentence_end(tok, prompt: str, answer: str, p: list[int], a: list[int]) -> list[int]:
    """The token that ends a reply's sentence after the answer (".": a chat form's last target,
    so the rows end the reply at the answer instead of leaving it to run on, "My flat number is
    14B4B-B2.14B-B2"), as the tokenizer writes it there; [] when the answer ends a sentence
    already or the full stop would not be a token of its own."""
    if answer.rstrip()[-1:] in ".!?":
        return []
    text = prompt + join_answer(prompt, answer) + "."
    full = encode(tok, text)
    if len(full) != len(p) + len(a) + 1 or full[:-1] != p + a or tok.decode(full) != text:
        return []
    return full[-1:]


@dataclass
class Item:
    """One token sequence of a fact, and (once captured) the frozen model's view of it."""
    fact: int
    ids: list[int]                  # input tokens (prefix + prompt + answer[:-1])
    tpos: np.ndarray                # target positions
    ttok: np.ndarray                # target tokens
    train: bool                     # in the loss (verification items join when they fail)
    write: bool                     # its target positions may get rows
    need: float = 0.0               # logit margin every target must reach
    chat: bool = False              # a chat form (a fact's context), not one of its prompts
    prefix: tuple = ()              # the sequence start before the prompt
    rare: np.ndarray | None = None  # per position: its N-gram is not made of common tokens
    # filled by FrozenPrefix.capture
    h: torch.Tensor | None = None   # (T, D) hidden state entering the write layer
    e: torch.Tensor | None = None   # (T, H, d) base look-ups at the write layer
    rows: np.ndarray | None = None  # (T, H)
    keys: np.ndarray | None = None  # (T, H)
    kv: list | None = None          # unused (the keys/values live in `segs`)
    segs: list | None = None        # the trie segments of its sequence (prefix._Seg): the later
                                    # layers' keys/values of every position
    cand: np.ndarray | None = None  # candidate tokens of fast steps: targets, guards, the base
                                    # model's top tokens there
    base_margin: np.ndarray | None = None
    base_pred: np.ndarray | None = None
    base_gmargin: np.ndarray | None = None   # the unmodified model's margin at each guard
    # filled by batching.restage
    idx: np.ndarray | None = None   # (T, H) entry index of each look-up or -1
    start: int = 0                  # first position with an overridden look-up
    cs: torch.Tensor | None = None  # the write layer's conv state at `start`
    cs_at: int = -1                 # the start `cs` was computed for
    # guards (chat contexts): positions whose next prompt token the rows must not disturb, as
    # the model itself says the prompt there; in the loss only (prompts sharing words conflict)
    gpos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gtok: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def prefix_len(self) -> int:
        """Tokens of the sequence start (BOS, another prefix or a chat lead) before the prompt."""
        return len(self.prefix)


def sequence_starts(tok, s: FitSettings) -> list[tuple]:
    """The starts a prompt is fitted after: the runtime's own first, then `s.extra_prefixes`."""
    own = tuple(sequence_start(tok))
    return [own] + [tuple(p) for p in s.extra_prefixes if tuple(p) != own]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def context_parts(ctx) -> tuple:
    """(lead ids, prompt, said) of a FactIn context; `said` is "" unless with_article_forms
    made it."""
    return (ctx[0], ctx[1], ctx[2] if len(ctx) > 2 else "")


def conflicting_contexts(facts: list[FactIn]) -> set[tuple[int, int]]:
    """(fact index, context index) of the chat contexts another fact contradicts: after the
    context's prompt, another fact's prompt or context (with another answer) goes on with other
    words ("My name is" -> "Emma Carter" as a fact, and "My name is" -> "Aisha Rahman" as the way
    another fact is recited; "My profession is" -> "Lakeshore General Hospital" and "My
    profession is a" -> "graphic designer"). The two cannot both hold (the rows are keyed on the
    words before the answer); fitting them would take every step the fit may take and break
    the facts' own prompts. A fact's own prompts are never left out."""
    forms = []          # (fact index, context index or -1, prompt words, answer words, optional)
    for fi, f in enumerate(facts):
        if f.keep_out:
            continue
        a = tuple(_norm(f.answer).split())
        forms += [(fi, -1, tuple(_norm(p).split()), a, False) for p in f.prompts]
        for ci, ctx in enumerate(f.contexts):
            _, p, said = context_parts(ctx)
            forms.append((fi, ci, tuple(_norm(p).split()), tuple(_norm(said).split()) + a, bool(said)))
    by_prompt: dict[tuple, list] = {}
    for form in forms:
        by_prompt.setdefault(form[2], []).append(form)
    out = set()
    for fb, cb, pb, ab, ob in forms:
        seq = pb + ab
        for n in range(1, len(seq)):
            for fa, ca, pa, aa, oa in by_prompt.get(seq[:n], ()):
                if fa == fb or aa == ab or seq[n:n + 1] == aa[:1]:
                    continue
                # a form with words said before the answer (with_article_forms) is optional:
                # it gives way, the other stays
                if ca >= 0 and (oa or not ob):
                    out.add((fa, ca))
                if cb >= 0 and (ob or not oa):
                    out.add((fb, cb))
    return out


ARTICLES = ("a", "an", "the")


def with_article_forms(facts: list[FactIn]) -> list[FactIn]:
    """`facts` with one more chat context for each context whose prompt ends in an article: the
    prompt without it, the article said as the answer's first word (lead, "My usual coffee order
    is", "a"): a reply may go on past "is" with or without it."""
    out = []
    for f in facts:
        extra = []
        for lead, prompt, said in map(context_parts, [] if f.keep_out else f.contexts):
            words = prompt.split()
            if not said and len(words) > 1 and words[-1].casefold() in ARTICLES:
                extra.append((lead, prompt[:prompt.rstrip().rindex(words[-1])].rstrip(), words[-1]))
        out.append(replace(f, contexts=list(f.contexts) + extra) if extra else f)
    return out


def items_for(tok, facts: list[FactIn], s: FitSettings) -> list[Item]:
    """The token sequences of `facts`: every prompt after every sequence start, and every chat
    context (its lead ids already hold the runtime's start) but those another fact contradicts
    (`conflicting_contexts`, with `s.drop_conflicts`)."""
    starts = sequence_starts(tok, s)
    if s.article_forms:
        facts = with_article_forms(facts)
    skip = conflicting_contexts(facts) if s.drop_conflicts else set()
    items = []
    for fi, f in enumerate(facts):
        leads = [(None, prompt, "") for prompt in f.prompts]
        leads += [(tuple(lead), prompt, said)
                  for ci, (lead, prompt, said) in enumerate(map(context_parts, [] if f.keep_out else f.contexts))
                  if (fi, ci) not in skip]
        for lead, prompt, said in leads:
            # words said before the answer are the answer's first words: "... is" -> "a cold brew"
            text = said + join_answer(said, f.answer) if said else f.answer
            p, a = answer_tokens(tok, prompt, text)
            if lead is not None and not f.keep_out:
                a = a + sentence_end(tok, prompt, text, p, a)
            if f.keep_out:
                a = list(f.keep_out_tokens or [])[:len(a)]
                if not a:
                    continue
            ctx = lead is not None
            for ci, pre in enumerate([lead] if ctx else starts):
                seq = list(pre) + p + a
                P = len(pre) + len(p)
                items.append(Item(fact=fi, ids=seq[:-1], tpos=np.arange(P - 1, len(seq) - 1),
                                  ttok=np.asarray(a, np.int64), train=ci == 0 or s.fit_all_prefixes,
                                  write=not f.keep_out,
                                  need=KEEP_OUT_MARGIN if f.keep_out else (s.context_margin if ctx else s.margin),
                                  prefix=tuple(pre), chat=ctx,
                                  gpos=np.arange(len(pre) - 1, P - 1) if ctx else np.zeros(0, np.int64),
                                  gtok=np.asarray(p if ctx else [], np.int64)))
    return items
