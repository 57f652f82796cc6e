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
all facts in padded batches; Rprop. Everything before the write layer is fixed, and so is
every position before a sequence's first overridden look-up, so the hidden state entering the
write layer, the table look-ups and the attention keys/values of that prefix are computed once
(memory.prefix, each shared token prefix once); a step runs only the suffix of each sequence
through the write layer and the layers after it (bf16 copies; logits over candidate tokens),
and computes logits only at target positions. Facts interact only through shared entries, so
they fall into connected components; an item that meets its margin rests, a component stops
(its rows freeze) once every answer token of its facts is the argmax with a logit margin, and
the fit ends when all components have stopped and pass a final check (fp32, whole vocabulary)
with the values rounded to the file's type. Adding to or forgetting from a file fits only the
items the new, freed or dropped rows reach (`Fitter.fit`). docs/writespeed.md has the figures.

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
import weakref

import numpy as np
import torch

from engram_local.memory.batching import Batches, readers
from engram_local.memory.items import (METHODS, FactIn, FitError, FitResult, FitSettings,  # noqa: F401 (re-exported)
                                       answer_tokens, items_for)
from engram_local.memory.optimize import Optimisation
from engram_local.memory.placement import Placement, Scale, calibrate, letter_tokens, mark_rare
from engram_local.memory.prefix import FrozenPrefix
from engram_local.text.facts import join_answer  # noqa: F401 (re-exported)
from engram_local.text.tokens import document_start_id

__all__ = ["FactIn", "FitError", "FitResult", "FitSettings", "Fitter", "answer_tokens", "join_answer"]


_LETTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # tokenizer -> letter_tokens
_RARE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()        # em -> {(start, fast): scores}


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
        self.items: list = []           # the last fit's items (all facts)
        self.live: list = []            # the last fit's items that were fitted or checked

    def items_for(self, facts: list[FactIn]):
        """The token sequences of `facts` (memory.items.items_for)."""
        return items_for(self.tok, facts, self.s)

    def _letters(self):
        try:
            got = _LETTERS.get(self.tok)
        except TypeError:
            got = None
        if got is None:
            got = letter_tokens(self.tok)
            try:
                _LETTERS[self.tok] = got
            except TypeError:
                pass
        return got

    def _prepare(self, items):
        """Capture `items` and mark their rare positions (timed)."""
        if not items:
            return
        tc = time.time()
        self.model.capture(items, fast=self.s.fast)
        self.timing["capture"] = self.timing.get("capture", 0.0) + time.time() - tc
        tr = time.time()
        start = document_start_id(self.tok)
        cache = _RARE.setdefault(self.em, {}).setdefault((start, self.s.fast), {})
        mark_rare(self.em, items, self.s.common_logp, self._letters(), start, cache=cache,
                  scorer=lambda x: self.model.token_logprobs(x, fast=self.s.fast),
                  answer_logp=self.s.answer_common_logp)
        self.timing["mark_rare"] = self.timing.get("mark_rare", 0.0) + time.time() - tr

    def fit(self, facts: list[FactIn], existing: dict | None = None,
            existing_owner: dict | None = None, dropped=()) -> FitResult:
        """Fit `facts` jointly. `existing` {(row, key): value} are rows already in the file (they
        start from their stored values); `existing_owner` {fact id: [(row, key)...]} the rows
        earlier fits wrote for facts that are in `facts` again; `dropped` the (row, key) rows the
        file had before and no longer has (forget: the facts that read them are checked again).

        With earlier facts and `settings.incremental`, only the items that the new facts' rows,
        the freed rows or the dropped rows reach are captured, fitted and checked; every row of
        the file stays fixed unless a new or forgotten fact's prompt reads it, or a fact cannot
        be fitted without it. The other facts read exactly what they read before."""
        t0 = time.time()
        torch.manual_seed(self.s.seed)
        items = self.items_for(facts)
        if not items:
            raise FitError("nothing to write")
        self.items = items
        earlier = set(existing_owner or {}) & {f.id for f in facts}
        incremental = bool(earlier) and self.s.incremental and self.s.method == "joint"
        ta = time.time()
        self.model.address(items)
        self.timing["address"] = time.time() - ta
        if incremental:
            old = [i for i, it in enumerate(items) if facts[it.fact].id in earlier]
            new_facts = [i for i, it in enumerate(items) if facts[it.fact].id not in earlier]
            # forgotten prompts that read no row of the file read the shared table: as without
            # memory already (they join if a new row reaches them)
            out = [i for i in new_facts if facts[items[i].fact].keep_out]
            reach = {out[j] for j in readers([items[i] for i in out], set(existing or {}))}
            seed = [i for i in new_facts if not facts[items[i].fact].keep_out or i in reach]
            seed += [old[j] for j in readers([items[i] for i in old], set(dropped))]
            live_idx = sorted(set(seed))
        else:
            live_idx = list(range(len(items)))
        live = [items[i] for i in live_idx]
        self.live = live
        in_live = set(live_idx)
        self._prepare(live)
        for it in live:
            if facts[it.fact].id in earlier and not facts[it.fact].keep_out:
                it.need = self.s.margin / 2     # already accepted: refit only if it degrades
        scale = calibrate(self.model, live, self.s.lr) if live else Scale(1.0, 1.0, self.s.lr)
        tp = time.time()
        place = Placement(self.model, self.s, live, facts, scale.h_norm, existing, existing_owner)
        place.place_new(earlier, keyed=items)
        if incremental:
            # rows the forgotten prompts read are refitted (to the model's own continuation);
            # every other row of the file stays as it is unless a new fact needs it
            free = set()
            for it in live:
                if facts[it.fact].keep_out:
                    self.batches.restage([it], place.entries)
                    free |= {int(e) for e in np.unique(it.idx[it.idx >= 0])}
            place.freeze_existing(free & place.owned)

            def extend() -> bool:
                """Capture and add the items that now read a trainable (or dropped) row."""
                fixed = set(place.fixed.tolist())
                moving = {k for k, e in place.entries.items() if e not in fixed}
                add = [j for j in readers([items[i] for i in range(len(items)) if i not in in_live], moving)]
                rest = [i for i in range(len(items)) if i not in in_live]
                add = [rest[j] for j in add]
                if not add:
                    return False
                new = [items[i] for i in add]
                self._prepare(new)
                for it in new:
                    if facts[it.fact].id in earlier and not facts[it.fact].keep_out:
                        it.need = self.s.margin / 2
                live.extend(new)
                in_live.update(add)
                return True

            extend()
        else:
            extend = None
        self.timing["placement"] = time.time() - tp

        to = time.time()
        opt = Optimisation(self.batches, self.s, scale, self.progress, self.trace)
        steps = opt.run(live, facts, place, extend=extend)
        self.timing["optimize"] = time.time() - to
        tf = time.time()
        vals = np.stack(place.values) if place.values else np.zeros((0, self.model.d), np.float32)
        keys_list = list(place.entries)
        recalled = opt.final_check(live, facts, place.entries, vals)
        self.final_margins = opt.final_margins
        self.timing["final_check"] = time.time() - tf
        fact_entries = {f.id: sorted(place.owner[i]) for i, f in enumerate(facts) if not f.keep_out}
        return FitResult(rows=np.array([k[0] for k in keys_list], np.int64).reshape(-1),
                         keys=np.array([k[1] for k in keys_list], np.int64).reshape(-1),
                         values=vals, fact_entries=fact_entries, recalled=recalled, steps=steps,
                         seconds=time.time() - t0,
                         stats=dict(items=len(items), live=len(live), entries=len(keys_list)))
