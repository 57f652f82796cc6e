"""What the writer fits: its settings, its input facts and result, and the token sequences
(items) a fact becomes - each sequence start x each prompt or chat form of the fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    heads: int = 1                  # highest-order heads written per position at first
    anchors: bool = True            # facts sharing their trigger rows get a row of their own
    common_logp: float | None = -8.0  # N-grams the model finds likelier than 10**this (from a
                                    # document start) are common: no rows there where avoidable
                                    # (placement.mark_rare); None = write at any N-gram
    grow_after: int = 15            # steps a component may fail before it gets more rows
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
    seed: int = 0


@dataclass
class FactIn:
    """One fact as the writer sees it: a key, its trigger prompts, one answer."""
    id: str
    prompts: list[str]              # the main prompt first, then paraphrase prompts
    answer: str
    keep_out: bool = False          # a forgotten fact: make its prompt behave as without rows
    keep_out_tokens: list | None = None
    contexts: list = field(default_factory=list)   # (lead ids, prompt): the prompt after a lead
                                    # where no row may go, e.g. a chat turn reciting the fact
                                    # (text.facts.chat_contexts; the lead holds its sequence start)


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
    prefix: tuple = ()              # the sequence start before the prompt
    rare: np.ndarray | None = None  # per position: its N-gram is not made of common tokens
    # filled by FrozenPrefix.capture
    h: torch.Tensor | None = None   # (T, D) hidden state entering the write layer
    e: torch.Tensor | None = None   # (T, H, d) base look-ups at the write layer
    rows: np.ndarray | None = None  # (T, H)
    keys: np.ndarray | None = None  # (T, H)
    kv: list | None = None          # per later layer (k, v) each (n_kv, T, hd)
    base_margin: np.ndarray | None = None
    base_pred: np.ndarray | None = None
    # filled by batching.restage
    idx: np.ndarray | None = None   # (T, H) entry index of each look-up or -1
    start: int = 0                  # first position with an overridden look-up
    cs: torch.Tensor | None = None  # the write layer's conv state at `start`
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


def items_for(tok, facts: list[FactIn], s: FitSettings) -> list[Item]:
    """The token sequences of `facts`: every prompt after every sequence start, and every chat
    context (its lead ids already hold the runtime's start)."""
    starts = sequence_starts(tok, s)
    items = []
    for fi, f in enumerate(facts):
        leads = [(None, prompt) for prompt in f.prompts]
        leads += [(tuple(lead), prompt) for lead, prompt in ([] if f.keep_out else f.contexts)]
        for lead, prompt in leads:
            p, a = answer_tokens(tok, prompt, f.answer)
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
                                  prefix=tuple(pre),
                                  gpos=np.arange(len(pre) - 1, P - 1) if ctx else np.zeros(0, np.int64),
                                  gtok=np.asarray(p if ctx else [], np.int64)))
    return items
