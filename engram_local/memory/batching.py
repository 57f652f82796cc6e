"""Batching: which look-ups of an item read which entry, which items share entries (components),
and padded suffix batches of items grouped by suffix length (buckets), run through the frozen
prefix's forward.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


def _rows_of(entries: dict) -> np.ndarray:
    return np.fromiter((k[0] for k in entries), dtype=np.int64, count=len(entries))


def index(items, entries) -> np.ndarray:
    """Per item: entry index of every look-up (it.idx), first overridden position (it.start);
    returns the connected component of each item (items sharing an entry are connected)."""
    parent = list(range(len(items)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    user_of: dict[int, int] = {}
    for ii, it in enumerate(items):
        idx = np.full(it.rows.shape, -1, np.int64)
        for (t, c) in zip(*np.nonzero(np.isin(it.rows, _rows_of(entries)))):
            ei = entries.get((int(it.rows[t, c]), int(it.keys[t, c])))
            if ei is not None:
                idx[t, c] = ei
                if ei in user_of:
                    parent[find(ii)] = find(user_of[ei])
                else:
                    user_of[ei] = ii
        it.idx = idx
        hit = np.nonzero((idx >= 0).any(1))[0]
        it.start = int(min(hit[0], it.tpos[0])) if len(hit) else int(it.tpos[0])
    return np.array([find(i) for i in range(len(items))])


def buckets(items, sel, waste: float = 1.3, max_tokens: int = 4096):
    """`sel` split into groups of similar suffix length (padding at most `waste` x)."""
    order = sorted(sel, key=lambda i: len(items[i].ids) - items[i].start)
    out, cur, total = [], [], 0
    for i in order:
        n = len(items[i].ids) - items[i].start
        if cur and (n * (len(cur) + 1) > waste * (total + n) or n * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append(cur)
    return out


class Batches:
    """Suffix batches over one FrozenPrefix, cached until the entries change (`restage`)."""

    def __init__(self, model, timing: dict):
        self.model = model
        self.timing = timing
        self._cache: dict = {}

    def restage(self, items, entries, sel=None) -> np.ndarray:
        """Index the items against `entries` (components returned) and compute the conv state
        at each item's new start (of the items `sel`, default all)."""
        self._cache = {}
        comp = index(items, entries)
        for i in range(len(items)) if sel is None else sel:
            items[i].cs = self.model.conv_state(items[i])
        return comp

    def batch(self, items, sel):
        """Padded suffix tensors of the items `sel` (indices): positions from each item's first
        overridden look-up on, its cached prefix (attention keys/values, conv state), a mask
        that hides padding, and where its targets sit."""
        m = self.model
        its = [items[i] for i in sel]
        B = len(its)
        S = max(len(it.ids) - it.start for it in its)
        Lp = max(it.start for it in its)
        D = m.em.cfg.hidden_size
        h = torch.zeros(B, S, D)
        e = torch.zeros(B, S, m.H, m.d)
        idx = torch.full((B, S, m.H), -1, dtype=torch.long)
        pos = torch.zeros(B, S, dtype=torch.long)
        cs = torch.stack([it.cs for it in its])
        n_layers = len(m.layers) - m.wl
        nkv, hd = its[0].kv[0][0].shape[0], its[0].kv[0][0].shape[2]
        pk = [torch.zeros(B, nkv, Lp, hd) for _ in range(n_layers)]
        pv = [torch.zeros(B, nkv, Lp, hd) for _ in range(n_layers)]
        neg = torch.finfo(torch.float32).min
        mask = torch.full((B, 1, S, Lp + S), neg)
        causal = torch.triu(torch.full((S, S), neg), diagonal=1)
        flat, tgt, ng = [], [], []
        for b, it in enumerate(its):
            s, n = it.start, len(it.ids) - it.start
            h[b, :n], e[b, :n] = it.h[s:s + n], it.e[s:s + n]
            idx[b, :n] = torch.from_numpy(it.idx[s:s + n])
            pos[b] = s + torch.arange(S)
            for li in range(n_layers):
                pk[li][b, :, :s] = it.kv[li][0][:, :s]
                pv[li][b, :, :s] = it.kv[li][1][:, :s]
            mask[b, 0, :, :s] = 0.0
            mask[b, 0, :, Lp:] = causal
            flat.extend(b * S + (it.tpos - s))
            tgt.extend(it.ttok)
            g = it.gpos >= s                      # guards the rows can reach
            flat.extend(b * S + (it.gpos[g] - s))
            tgt.extend(it.gtok[g])
            ng.append(int(g.sum()))
        prefix = {m.wl + li: (pk[li], pv[li]) for li in range(n_layers)}
        return dict(h=h, e=e, idx=idx, pos=pos, cs=cs, prefix=prefix, mask=mask,
                    flat=torch.tensor(flat, dtype=torch.long), tgt=torch.tensor(tgt, dtype=torch.long),
                    S=S, ng=ng)

    def cached(self, items, sel):
        key = tuple(sel)
        bt = self._cache.get(key)
        if bt is None:
            if len(self._cache) > 256:
                self._cache.clear()
            bt = self._cache[key] = self.batch(items, sel)
        return bt

    def run(self, items, sel, values, backward: bool, scale: float = 1.0):
        """(loss, {item: margins of its targets}) over `sel`, bucketed; backward per bucket."""
        total, margins = 0.0, {}
        for bucket in buckets(items, sel):
            t0 = time.time()
            bt = self.cached(items, bucket)
            t1 = time.time()
            logits = self.model.forward(bt, values)
            loss = F.cross_entropy(logits, bt["tgt"], reduction="sum") * scale
            t2 = time.time()
            if backward:
                loss.backward()
            t3 = time.time()
            for k, v in (("batch", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2)):
                self.timing[k] = self.timing.get(k, 0.0) + v
            self.timing["tokens"] = self.timing.get("tokens", 0) + bt["h"].shape[0] * bt["S"]
            total += float(loss.detach())
            m, _ = self.model.margins(logits.detach(), bt["tgt"])
            k = 0
            for i, n_guard in zip(bucket, bt["ng"]):
                n = len(items[i].tpos)
                margins[i] = m[k:k + n]          # targets only: guards never block convergence
                k += n + n_guard
        return total, margins
