"""Placement: where rows go and what they start from.

A row is one head of the highest N-gram order at one position of an item, keyed on that
position's exact N-gram; one trainable entry per distinct (row, key), shared by every item that
looks it up. New facts get rows at their trigger (or, when its N-gram is common, the last rare
prompt position before it), an anchor where the trigger is shared with other facts, and every
later target position the unmodified model gets wrong whose N-gram is rare; a fact that keeps
failing grows (`Placement.grow`). A row starts from UNEMBED_P towards the token it should push.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Scale:
    h_norm: float                   # median norm of the hidden state entering the write layer
    row_scale: float                # per-value size of one head's row that moves it by h_norm
    lr: float                       # the optimiser's first step (settings.lr x row_scale)


@torch.no_grad()
def calibrate(model, items, lr: float) -> Scale:
    """h_norm at the items' target positions, and the row scale that moves h by that much."""
    norms = torch.cat([it.h[torch.from_numpy(it.tpos)].norm(dim=-1) for it in items])
    h_norm = float(norms.median())
    w = model.eng.w_v.weight.detach()
    gain = float(np.mean([torch.linalg.svdvals(w[:, c * model.d:(c + 1) * model.d]).mean()
                          for c in model.hi_cols]))
    row_scale = h_norm / max(gain, 1e-12) / math.sqrt(model.d)
    return Scale(h_norm=h_norm, row_scale=row_scale, lr=lr * row_scale)


def letter_tokens(tok) -> np.ndarray:
    """Per token id: its text has a letter."""
    texts = tok.convert_ids_to_tokens(list(range(len(tok))))
    return np.array([any(ch.isalpha() for ch in tok.convert_tokens_to_string([t])) if t else False
                     for t in texts])


@torch.no_grad()
def mark_rare(em, items, common_logp, letters, start_id: int, window: int = 4, chunk: int = 256,
              scorer=None, cache: dict | None = None, answer_logp: float | None = None):
    """it.rare[t]: the highest-order N-gram ending at t is rare enough to carry a row.

    An N-gram is common when the model itself, from a document start (`start_id`,
    text.tokens.document_start_id), gives its tokens a joint probability of at least
    10**common_logp ("was born in" 10**-5.4, "works as a" 10**-7.5), or when none of its tokens
    has a letter (digits: " 20", "199"). Rows there would fire in ordinary text; the writer
    avoids them where it can. Only the trigger, the `window` prompt positions before it and the
    answer positions are scored. Past the trigger, where the N-gram holds answer tokens, the
    bound is `answer_logp` when that is higher (None: common_logp): a digit after a prompt word
    (" is 4" 10**-5.6 for "My commute is 45") is the fact's own, where a reply worded unlike the
    fitted ones needs its own row; " in 1" (10**-4.3, every year in prose) stays common.
    `scorer(x)` gives log p(x[:, t + 1] | x[:, :t + 1]) (default: the model's own forward);
    `cache` {N-gram: log10 p} keeps scores between calls (the same model and start)."""
    n = em.cfg.max_ngram_size
    cache = {} if cache is None else cache
    todo: set[tuple] = set()
    for it in items:
        it.rare = np.zeros(len(it.ids), bool)
        lo = max(it.prefix_len, int(it.tpos[0]) - window)
        for t in range(lo, len(it.ids)):
            g = tuple(it.ids[max(it.prefix_len, t - n + 1):t + 1])
            if g not in cache:
                todo.add(g)
    if common_logp is not None:
        grams = [g for g in todo if any(letters[x] for x in g)]
        for g in todo:
            cache[g] = 0.0
        if scorer is None:
            def scorer(x):
                lp = torch.log_softmax(em(x).logits.float(), dim=-1)
                return lp[:, :-1].gather(2, x[:, 1:, None])[..., 0]
        for c0 in range(0, len(grams), chunk):
            part = grams[c0:c0 + chunk]
            x = torch.full((len(part), n + 1), start_id, dtype=torch.long)
            for b, g in enumerate(part):
                x[b, 1:1 + len(g)] = torch.tensor(g)
            lp = scorer(x)
            for b, g in enumerate(part):
                cache[g] = float(lp[b, :len(g)].sum()) / math.log(10)
    for it in items:
        lo = max(it.prefix_len, int(it.tpos[0]) - window)
        t0 = int(it.tpos[0])
        for t in range(lo, len(it.ids)):
            g = tuple(it.ids[max(it.prefix_len, t - n + 1):t + 1])
            if common_logp is None:
                it.rare[t] = True
            else:
                it.rare[t] = cache[g] < (common_logp if t <= t0 or answer_logp is None
                                         else max(common_logp, answer_logp))


class Placement:
    """The entries of one fit: {(row, key): index}, their values, which facts own them.

    Every row already in the file (`existing`: {(row, key): value}) is an entry from the start,
    at its stored value; rows no fact here owns (`existing_owner`: {fact id: [(row, key)...]})
    stay fixed (`fixed`)."""

    def __init__(self, model, settings, items, facts, h_norm: float,
                 existing: dict | None = None, existing_owner: dict | None = None):
        self.model, self.s, self.items, self.facts, self.h_norm = model, settings, items, facts, h_norm
        self.entries: dict[tuple, int] = {}
        self.values: list[np.ndarray] = []
        self.owner: dict[int, set] = {i: set() for i in range(len(facts))}
        self.existing = dict(existing or {})
        self.heads_at: dict[tuple, int] = {}     # (item index, t) -> heads written there
        self._init_acc: dict[int, list] = {}
        for k in self.existing:
            self.add(tuple(k))
        fid_index = {f.id: i for i, f in enumerate(facts)}
        for fid, keys in (existing_owner or {}).items():
            if fid in fid_index:
                for k in keys:
                    self.owner[fid_index[fid]].add(self.add(tuple(k)))
        owned = set().union(*self.owner.values()) if self.owner else set()
        self.fixed = np.array(sorted(set(range(len(self.values))) - owned), np.int64)
        self.owned = owned                       # entries some fact of this fit owns
        self.n_existing = len(self.values)

    def freeze_existing(self, keep_free=()) -> None:
        """Every entry already in the file stays fixed, but `keep_free` (entry indices)."""
        free = set(keep_free)
        self.fixed = np.array([e for e in range(self.n_existing) if e not in free], np.int64)

    def unfreeze(self, item_indices) -> bool:
        """Free the fixed entries the items look up that a fact of this fit owns (a fact that
        cannot be fitted with its own rows alone); whether any were."""
        fixed = set(self.fixed.tolist())
        free = set()
        for ii in item_indices:
            it = self.items[ii]
            if it.idx is None:
                continue
            free |= {int(e) for e in np.unique(it.idx[it.idx >= 0])} & fixed & self.owned
        if not free:
            return False
        self.fixed = np.array(sorted(fixed - free), np.int64)
        return True

    # ------------------------------------------------------------ entries
    def add(self, key, value=None) -> int:
        """The index of entry `key`, added (at its stored value, or zero until `flush_init`)
        when new; `value` joins the start values averaged into a new entry."""
        if key not in self.entries:
            self.entries[key] = len(self.values)
            if key in self.existing:
                self.values.append(np.asarray(self.existing[key], np.float32))
            else:
                self.values.append(np.zeros(self.model.d, np.float32))
                self._init_acc[self.entries[key]] = []
        if value is not None and self.entries[key] in self._init_acc:
            self._init_acc[self.entries[key]].append(value)
        return self.entries[key]

    def flush_init(self):
        """New entries start from the mean of the start values proposed for them."""
        for ei, vs in self._init_acc.items():
            if vs:
                self.values[ei] = np.mean(vs, axis=0).astype(np.float32)
        self._init_acc.clear()

    def place_at(self, ii: int, t: int, n_heads: int, token: int | None = None) -> bool:
        """Rows (the first n_heads highest-order heads) at position t of item ii, started
        from UNEMBED_P towards `token` (default: the target predicted there)."""
        it = self.items[ii]
        have = self.heads_at.get((ii, t), 0)
        if n_heads <= have:
            return False
        if token is None:
            token = int(it.ttok[int(np.nonzero(it.tpos == t)[0][0])])
        cols = self.model.hi_cols[:n_heads]
        vals = self.unembed_value(cols, token, it.h[t])
        for c, v in zip(cols[have:], vals[have:]):
            self.owner[it.fact].add(self.add((int(it.rows[t, c]), int(it.keys[t, c])), v))
        self.heads_at[(ii, t)] = n_heads
        return True

    @torch.no_grad()
    def unembed_value(self, cols: list[int], token: int, h: torch.Tensor | None = None) -> np.ndarray:
        """Start value of the rows `cols` of one position: (len(cols), d).

        UNEMBED_P: e = pinv(W_V[:, cols]) @ unembed[token], so W_V e points at the token. With the
        hidden state `h` and `init_gate` > 0 the direction also opens the gate: least squares of
        [W_V; sqrt(mu) W_K] e = [u; sqrt(mu) RMSNorm(h)] (unit-norm targets); the gate reads
        the direction of W_K e only. Scaled so |W_V e| = gain * |h| (or by unembed_scale)."""
        m, d = self.model, self.model.d
        u = m.lm_head.weight.detach()[token]
        mu = self.s.init_gate if (h is not None and self.s.method != "unembed") else 0.0
        sel, solve = self._solver(tuple(cols), mu)
        if mu > 0:
            hq = m.eng.norm_q(h.detach())
            b = torch.cat([u / u.norm(), math.sqrt(mu) * hq / hq.norm()])
        else:
            b = u
        e = solve @ b
        if self.s.unembed_scale is not None:
            e = e * self.s.unembed_scale
        else:
            e = e * (self.s.gain * self.h_norm / max(float((sel @ e).norm()), 1e-12))
        return e.reshape(len(cols), d).numpy()

    def _solver(self, cols: tuple, mu: float):
        """(W_V[:, cols], the pseudo-inverse solving the start value's least squares), per
        column set (the same for every position: computed once per fit)."""
        cache = self.__dict__.setdefault("_solvers", {})
        key = (cols, mu)
        if key not in cache:
            m, d = self.model, self.model.d
            w = m.eng.w_v.weight.detach()                          # (D, E)
            sel = torch.cat([w[:, c * d:(c + 1) * d] for c in cols], dim=1)
            if mu > 0:
                wk = m.eng.w_k.weight.detach()
                selk = torch.cat([wk[:, c * d:(c + 1) * d] for c in cols], dim=1)
                a = torch.cat([sel, math.sqrt(mu) * selk])
            else:
                a = sel
            cache[key] = (sel, torch.linalg.pinv(a))
        return cache[key]

    # ------------------------------------------------------------ positions
    def trigger_position(self, it) -> int:
        """The trigger, or - when its N-gram is common - the last prompt position whose
        N-gram is not ("Nguyen works as" for "... works as a"), read through attention."""
        t0 = int(it.tpos[0])
        if it.rare[t0]:
            return t0
        ok = [t for t in range(t0 - 1, it.prefix_len - 1, -1) if it.rare[t]]
        return (self._lead_free(it, ok) or ok or [t0])[0]

    def anchor_position(self, it) -> int | None:
        """The last prompt position before the trigger whose N-gram is rare and the fact's alone."""
        h0 = self.model.hi_cols[0]
        ok = [t for t in range(self.trigger_position(it) - 1, it.prefix_len - 1, -1)
              if it.rare[t] and self._facts_by_key[int(it.keys[t, h0])] == {it.fact}]
        return (self._lead_free(it, ok) or ok or [None])[0]

    def _lead_free(self, it, positions) -> list[int]:
        """The positions whose N-gram no chat lead holds: a row there does not fire inside the
        question of a chat turn (echo questions repeat the prompt's words), so the turn reads
        the question as without memory, and the fit runs only from the prompt on."""
        h0 = self.model.hi_cols[0]
        lead = getattr(self, "_lead_keys", set())
        return [t for t in positions if int(it.keys[t, h0]) not in lead]

    def token_for(self, it, t: int) -> int:
        """The token a row at position t should push: its target, or the first answer token."""
        hit = np.nonzero(it.tpos == t)[0]
        return int(it.ttok[hit[0]]) if len(hit) else int(it.ttok[0])

    # ------------------------------------------------------------ placing
    def place_new(self, earlier=(), keyed=None):
        """Rows for the new facts (facts whose id is not in `earlier` keep their rows; they grow
        only if they fail): at the trigger (or its stand-in) and at every later target position
        the unmodified model gets wrong, unless that position's N-gram is common. Needs it.rare
        (mark_rare). `keyed`: the items whose N-grams count as other facts' (default: these)."""
        items, s, h0 = self.items, self.s, self.model.hi_cols[0]
        # Facts whose trigger N-gram other facts share ("was born in" -> 1993 / 2013) get an
        # anchor too: a row at their last prompt position whose N-gram is
        # theirs alone ("Quinn was"), which tells the shared rows whose answer to give.
        self._facts_by_key: dict[int, set] = {}
        self._lead_keys: set[int] = set()
        for it in (items if keyed is None else keyed):
            self._lead_keys.update(int(k) for k in it.keys[:it.prefix_len, h0])
            if it.write and it.train:
                for t in range(len(it.ids)):
                    self._facts_by_key.setdefault(int(it.keys[t, h0]), set()).add(it.fact)
        for ii, it in enumerate(items):
            if not (it.write and it.train) or self.facts[it.fact].id in earlier:
                continue
            # answer tokens the model gets wrong where no row may go (digits, common words)
            # must come through the trigger's rows: give it more heads
            blind = sum(1 for j in range(1, len(it.tpos))
                        if not it.rare[int(it.tpos[j])] and it.base_margin[j] < s.margin)
            heads = min(self.model.K, s.heads * (2 if blind else 1))
            trigger = self.trigger_position(it)
            self.place_at(ii, trigger, heads, int(it.ttok[0]))
            shared = len(self._facts_by_key[int(it.keys[trigger, h0])]) > 1
            if shared and s.anchors and (a := self.anchor_position(it)) is not None:
                self.place_at(ii, a, s.heads, int(it.ttok[0]))
            for j in range(1, len(it.tpos)):
                t = int(it.tpos[j])
                if it.rare[t] and it.base_margin[j] < s.margin:
                    self.place_at(ii, t, s.heads)
        self.flush_init()

    def grow(self, ii: int, margins) -> bool:
        """More rows for a fact that keeps failing: rows at its failing target positions
        whose N-gram is not common, else more heads where it already has rows."""
        it = self.items[ii]
        if not it.write:
            return False
        grew = False
        for j in np.nonzero(margins < it.need)[0]:
            t = int(it.tpos[j])
            if it.rare[t] and (ii, t) not in self.heads_at:
                grew |= self.place_at(ii, t, self.s.heads)
        if not grew:
            for (jj, t), have in list(self.heads_at.items()):
                if jj == ii and have < self.model.K:
                    grew |= self.place_at(ii, t, min(2 * have, self.model.K), self.token_for(it, t))
        self.flush_init()
        return grew
