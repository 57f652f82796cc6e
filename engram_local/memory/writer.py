"""Fitting user facts into override rows of the write layer (the engine behind `remember`).

What is written (user-as-engram-method.md §3, extended to whole answers):
  * a fact is (prompt, answer); its token sequence is prompt + answer, and every position that
    predicts an answer token (the last prompt token and each answer token but the last) is a
    *target position*;
  * at a target position the writer may place rows of the write layer (`cfg.write_layer`, the
    later Engram layer): the heads of the highest N-gram order, each entry carrying its exact
    key (that order's 64-bit N-gram mix), so the kernel serves the row only to a look-up of that
    very N-gram - never to a hash collision;
  * rows go where they are needed: the trigger (last prompt token) and every target position
    the unmodified model gets wrong; a fact that still fails after some steps gets rows at its
    failing positions and, where rows are already there, more heads ("growth").

How values are fitted (Joint OPT, the default): one trainable row per distinct (row, key)
entry, shared by every fact whose sequence looks it up; cross-entropy of every answer token,
all facts in one padded batch; Adam. Everything before the write layer is fixed, and so is
every position before a sequence's first overridden look-up, so the hidden state entering the
write layer, the table look-ups and the attention keys/values of that prefix are computed once
(memory.prefix); a step runs only the suffix of each sequence through the write layer and the
layers after it, and computes logits only at target positions. Facts interact only through
shared entries, so they fall into connected components; a component stops (its rows freeze)
once every answer token of its facts is the argmax with a logit margin, and the fit ends when
all components have stopped and pass a final check with the values rounded to the file's type.

Stages, one module each: memory.items (facts -> token sequences), memory.prefix (the frozen
prefix: capture and suffix forward), memory.batching (entry index, components, bucketed suffix
batches), memory.placement (where rows go and what they start from), memory.optimize (the
values); `Fitter` strings them together.

Strategies: "unembed" (UNEMBED_P, closed form: e = pinv(W_V[:, heads]) @ unembed[gold] * 20),
"opt" (the paper's OPT: each fact fitted alone from UNEMBED_P, written together, a later fact
winning a shared row), "joint" (above; the default).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engram_local.memory.batching import Batches
from engram_local.memory.items import (METHODS, FactIn, FitError, FitResult, FitSettings,  # noqa: F401 (re-exported)
                                       answer_tokens, items_for)
from engram_local.memory.optimize import Optimisation
from engram_local.memory.placement import Placement, calibrate, letter_tokens, mark_rare
from engram_local.memory.prefix import FrozenPrefix
from engram_local.text.facts import join_answer  # noqa: F401 (re-exported)
from engram_local.text.tokens import document_start_id

__all__ = ["FactIn", "FitError", "FitResult", "FitSettings", "Fitter", "answer_tokens", "join_answer"]


class Fitter:
    """Writes facts into override entries of one EngramModel (frozen), as configured."""

    def __init__(self, em, tok, settings: FitSettings | None = None, progress=None):
        self.em, self.tok = em, tok
        self.s = settings or FitSettings()
        if self.s.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.s.method!r}")
        self.model = FrozenPrefix(em)
        self.hi_cols = self.model.hi_cols
        self.progress = progress
        self.trace: list[tuple] = []    # (step, loss, components left, entries) per step
        self.timing: dict[str, float] = {}
        self.batches = Batches(self.model, self.timing)
        self._letters = None

    def items_for(self, facts: list[FactIn]):
        """The token sequences of `facts` (memory.items.items_for)."""
        return items_for(self.tok, facts, self.s)

    def fit(self, facts: list[FactIn], existing: dict | None = None,
            existing_owner: dict | None = None) -> FitResult:
        """Fit `facts` jointly. `existing` {(row, key): value} are rows already in the file (they
        start from their stored values); `existing_owner` {fact id: [(row, key)...]} the rows
        earlier fits wrote for facts that are in `facts` again."""
        t0 = time.time()
        torch.manual_seed(self.s.seed)
        items = self.items_for(facts)
        if not items:
            raise FitError("nothing to write")
        tc = time.time()
        self.model.capture(items)
        scale = calibrate(self.model, items, self.s.lr)
        self.timing["capture"] = time.time() - tc
        place = Placement(self.model, self.s, items, facts, scale.h_norm, existing, existing_owner)
        if self._letters is None:
            self._letters = letter_tokens(self.tok)
        mark_rare(self.em, items, self.s.common_logp, self._letters, document_start_id(self.tok))
        earlier = set(existing_owner or {})
        for it in items:
            if facts[it.fact].id in earlier and not facts[it.fact].keep_out:
                it.need = self.s.margin / 2     # already accepted: refit only if it degrades
        place.place_new(earlier)

        to = time.time()
        opt = Optimisation(self.batches, self.s, scale, self.progress, self.trace)
        steps = opt.run(items, facts, place)
        self.timing["optimize"] = time.time() - to
        tf = time.time()
        vals = np.stack(place.values) if place.values else np.zeros((0, self.model.d), np.float32)
        keys_list = list(place.entries)
        recalled = opt.final_check(items, facts, place.entries, vals)
        self.final_margins = opt.final_margins
        self.timing["final_check"] = time.time() - tf
        fact_entries = {f.id: sorted(place.owner[i]) for i, f in enumerate(facts) if not f.keep_out}
        return FitResult(rows=np.array([k[0] for k in keys_list], np.int64).reshape(-1),
                         keys=np.array([k[1] for k in keys_list], np.int64).reshape(-1),
                         values=vals, fact_entries=fact_entries, recalled=recalled, steps=steps,
                         seconds=time.time() - t0, stats=dict(items=len(items), entries=len(keys_list)))
