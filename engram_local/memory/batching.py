"""Batching: which look-ups of an item read which entry, which items share entries (components),
and padded suffix batches of items grouped by suffix length (buckets), run through the frozen
prefix's forward.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from engram_local.memory.prefix import FAST_DTYPE, NEG

# Margin a reachable guard must keep (or the unmodified model's own there, less half of this):
# the reply's next word stays the model's choice where the rows can reach it.
GUARD_MARGIN = 1.0


def _rows_of(entries: dict) -> np.ndarray:
    return np.fromiter((k[0] for k in entries), dtype=np.int64, count=len(entries))


def index(items, entries, fixed=None) -> np.ndarray:
    """Per item: entry index of every look-up (it.idx), first overridden position (it.start);
    returns the connected component of each item (items sharing an entry are connected; with
    `fixed`, a set of entry indices that do not change, only through the other entries)."""
    parent = list(range(len(items)))
    fixed = fixed if fixed is not None else ()

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    user_of: dict[int, int] = {}
    known = _rows_of(entries)
    for ii, it in enumerate(items):
        idx = np.full(it.rows.shape, -1, np.int64)
        for (t, c) in zip(*np.nonzero(np.isin(it.rows, known))):
            ei = entries.get((int(it.rows[t, c]), int(it.keys[t, c])))
            if ei is not None:
                idx[t, c] = ei
                if ei in fixed:
                    continue
                if ei in user_of:
                    parent[find(ii)] = find(user_of[ei])
                else:
                    user_of[ei] = ii
        it.idx = idx
        hit = np.nonzero((idx >= 0).any(1))[0]
        it.start = int(min(hit[0], it.tpos[0])) if len(hit) else int(it.tpos[0])
    return np.array([find(i) for i in range(len(items))])


def readers(items, keys) -> list[int]:
    """Indices of the items that look up any of the (row, key) entries `keys`."""
    keys = set(keys)
    if not keys:
        return []
    rows = np.fromiter((k[0] for k in keys), np.int64, len(keys))
    out = []
    for ii, it in enumerate(items):
        hit = np.isin(it.rows, rows)
        if hit.any() and any((int(it.rows[t, c]), int(it.keys[t, c])) in keys for t, c in zip(*np.nonzero(hit))):
            out.append(ii)
    return out


def buckets(items, sel, overhead: int = 96, max_tokens: int = 6144):
    """`sel` split into groups of similar suffix length: a group grows while the padding it
    adds stays under `overhead` token positions (the fixed cost of one more batch through the
    layers is about that much compute) and its padded size under `max_tokens`."""
    order = sorted(sel, key=lambda i: len(items[i].ids) - items[i].start)
    out, cur, total = [], [], 0
    for i in order:
        n = len(items[i].ids) - items[i].start
        padded = n * (len(cur) + 1)
        if cur and (padded - (total + n) > overhead or padded > max_tokens):
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append(cur)
    return out


def split(items, groups, at_least: int) -> list[tuple[list, list]]:
    """(part, its group) pairs: the largest group of two or more items halved until there are
    `at_least` parts (one per worker, `Batches.run`) or none can be split. Even a step of three
    items runs faster split (0.08 against 0.10-0.17 s per step on 2 cores). A part keeps its
    group's candidate tokens (`Batches.batch`), so a step's loss is the same however it is
    split."""
    out = [(g, g) for g in groups]
    while len(out) < at_least:
        two = [b for b in range(len(out)) if len(out[b][0]) > 1]
        if not two:
            break
        big = max(two, key=lambda b: _padded(items, out[b][0]))
        g, parent = out.pop(big)
        out[big:big] = [(g[:len(g) // 2], parent), (g[len(g) // 2:], parent)]
    return out


def _padded(items, group) -> int:
    return len(group) * max(len(items[i].ids) - items[i].start for i in group)


# ---------------------------------------------------------------- buckets on worker threads
# Why: a step is thousands of small ops (each bucket's suffix through 14 layers, forward and
# backward). Split over OpenMP threads, every op wakes the thread team, and under
# OMP_WAIT_POLICY=passive (what `run` sets, what shared cores want) the wake-ups cost more than
# the split gains. bench/writer_threads.py (docs/writespeed.md, "Threads") on 2 cores, the
# forward and backward of a 40-statement fit's first 40 bf16 batches: 2 OpenMP threads 11.0 s,
# 1 thread 9.6 s, the buckets on 2 Python threads with 1 OpenMP thread each 4.7 s (torch
# releases the interpreter lock inside its ops).

_POOL: dict = {}
_POOL_LOCK = threading.Lock()


def _single_threaded():
    """Pool worker initializer: this thread's torch ops run on one OpenMP thread."""
    torch.get_num_threads()     # torch's lazy per-thread setup first: it would undo the next line
    torch.set_num_threads(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOL.get(workers)
        if pool is None:
            n = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="engram-writer", initializer=_single_threaded)
            # every worker started and set up now (each waits for the others, so the pool must
            # start them all), then torch's process-wide count back for threads started later
            barrier = threading.Barrier(workers)
            list(pool.map(lambda _: barrier.wait(timeout=60), range(workers)))
            torch.set_num_threads(n)
            _POOL[workers] = pool
        return pool


class Batches:
    """Suffix batches over one FrozenPrefix, cached until the entries change (`restage`).

    `extra` holds tokens that must be among every fast batch's candidates (runner-up tokens a
    full-vocabulary check found)."""

    def __init__(self, model, timing: dict):
        self.model = model
        self.timing = timing
        self._cache: dict = {}
        self.extra: set[int] = set()
        self.guards_ok: dict[int, bool] = {}   # item -> its reachable guards held (the last run)
        self._lock = threading.Lock()

    def restage(self, items, entries, sel=None, fixed=None) -> np.ndarray:
        """Index the items against `entries` (components through the entries not in `fixed`
        returned) and compute the conv state at each item's new start (of the items `sel`,
        default all)."""
        t0 = time.time()
        self._cache = {}
        comp = index(items, entries, fixed)
        for i in range(len(items)) if sel is None else sel:
            it = items[i]
            if it.cs is None or it.cs_at != it.start:
                it.cs, it.cs_at = self.model.conv_state(it), it.start
        self.timing["restage"] = self.timing.get("restage", 0.0) + time.time() - t0
        return comp

    def add_candidates(self, tokens) -> None:
        """More tokens every fast batch's logits cover (the cached batches get them too)."""
        new = {int(t) for t in tokens} - self.extra
        if not new:
            return
        self.extra |= new
        add = torch.tensor(sorted(new), dtype=torch.long)
        for (_, fast, _, _), bt in self._cache.items():
            if fast and "cand" in bt:
                gold = bt["cand"][bt["tgt"]]
                cand = torch.unique(torch.cat([bt["cand"], add]))
                bt["cand"], bt["cand_w"] = cand, self.model.fast.lm_weight[cand]
                bt["tgt"] = torch.searchsorted(cand, gold)

    def batch(self, items, sel, fast: bool = False, guards: bool = True, cand_from=None):
        """Padded suffix tensors of the items `sel` (indices): positions from each item's first
        overridden look-up on, its cached prefix (attention keys/values, conv state), a mask
        that hides padding, and where its targets sit. `fast`: for the bf16 copies, with logits
        over the batch's candidate tokens (it.cand of its items, or of the items `cand_from`,
        and `extra`)."""
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
        k0 = its[0].segs[0].kv[0][0]
        nkv, hd = k0.shape[0], k0.shape[2]
        plain = m.plain
        dt = FAST_DTYPE if fast else torch.float32
        pk = [torch.zeros(B, nkv, Lp, hd, dtype=dt) for _ in range(n_layers)]
        pv = [torch.zeros(B, nkv, Lp, hd, dtype=dt) for _ in range(n_layers)]
        if plain:
            pmask = torch.full((B, 1, 1, Lp), NEG)
        else:
            neg = torch.finfo(torch.float32).min
            mask = torch.full((B, 1, S, Lp + S), neg)
            causal = torch.triu(torch.full((S, S), neg), diagonal=1)
        flat, tgt, ng, gneed = [], [], [], []
        for b, it in enumerate(its):
            s, n = it.start, len(it.ids) - it.start
            h[b, :n], e[b, :n] = it.h[s:s + n], it.e[s:s + n]
            idx[b, :n] = torch.from_numpy(it.idx[s:s + n])
            pos[b] = s + torch.arange(S)
            if s:
                for li in range(n_layers):
                    k, v = m.prefix_kv(it, li, s)
                    pk[li][b, :, :s] = k
                    pv[li][b, :, :s] = v
            if plain:
                pmask[b, 0, 0, :s] = 0.0
            else:
                mask[b, 0, :, :s] = 0.0
                mask[b, 0, :, Lp:] = causal
            flat.extend(b * S + (it.tpos - s))
            tgt.extend(it.ttok)
            g = (it.gpos >= s) & guards           # guards the rows can reach (training only)
            flat.extend(b * S + (it.gpos[g] - s))
            tgt.extend(it.gtok[g])
            ng.append(int(g.sum()))
            # the margin each must keep: the model must still say its reply's own words there (a
            # row before a common trigger pushes the answer where the next prompt word belongs)
            gneed.append(None if not g.any() or it.base_gmargin is None else
                         np.minimum(GUARD_MARGIN, it.base_gmargin[g] - GUARD_MARGIN / 2))
        bt = dict(h=h, e=e, idx=idx, pos=pos, cs=cs, flat=torch.tensor(flat, dtype=torch.long),
                  tgt=torch.tensor(tgt, dtype=torch.long), S=S, ng=ng, gneed=gneed, fast=fast,
                  plain=plain)
        if plain:
            bt.update(pk=pk, pv=pv, pmask=pmask, causal=torch.triu(torch.full((S, S), NEG), diagonal=1))
        else:
            bt.update(prefix={m.wl + li: (pk[li], pv[li]) for li in range(n_layers)}, mask=mask)
        if fast and plain:
            from_ = sel if cand_from is None else cand_from
            cand = np.unique(np.concatenate([items[i].cand for i in from_] +
                                            [np.fromiter(self.extra, np.int64, len(self.extra))]))
            cand = torch.from_numpy(cand)
            bt["cand"] = cand
            bt["cand_w"] = m.fast.lm_weight[cand]
            bt["tgt"] = torch.searchsorted(cand, bt["tgt"])
        return bt

    @torch.no_grad()
    def _confirm(self, items, bucket, bt, m, cand, tgt):
        """Margins over candidates that pass are recomputed over the whole vocabulary (a rival
        outside the candidates would pass unseen); rivals found join the candidates."""
        rows, k = [], 0
        for i, n_guard in zip(bucket, bt["ng"]):
            n = len(items[i].tpos)
            if m[k:k + n].min() >= items[i].need:
                rows.extend(range(k, k + n))
            rows.extend(range(k + n, k + n + n_guard))     # guards: a rival off the candidates
            k += n + n_guard
        if not rows:
            return m
        r = torch.tensor(rows)
        full = torch.nn.functional.linear(bt["normed"][r], self.model.fast.lm_weight).float()
        gold = cand[tgt[r]]
        fm, _ = self.model.margins(full, gold)
        rival = full.scatter(1, gold[:, None], float("-inf")).argmax(1).numpy()
        missed = fm < m[rows] - 1e-3
        m = m.copy()
        m[rows] = np.minimum(m[rows], fm)
        self.add_candidates(rival[missed])
        return m

    def cached(self, items, sel, fast: bool = False, guards: bool = True, cand_from=None):
        key = (tuple(sel), fast, guards, None if cand_from is None else tuple(cand_from))
        bt = self._cache.get(key)
        if bt is None:
            if len(self._cache) > 64:
                self._cache.clear()
            bt = self._cache[key] = self.batch(items, sel, fast, guards, cand_from)
        return bt

    def run(self, items, sel, values, backward: bool, scale: float = 1.0, fast: bool = False,
            workers: int | None = None):
        """(loss, {item: margins of its targets}) over `sel`, bucketed; backward per bucket;
        `fast`: through the bf16 copies, over candidate tokens. The buckets' forward and
        backward run on `workers` threads (default: torch's thread count), one OpenMP thread
        each (see above); gradients add up in `values.grad`."""
        workers = max(1, torch.get_num_threads() if workers is None else int(workers))
        if not self.model.plain:      # the model's own layers: not known to be thread-safe
            workers = 1
        t0 = time.time()
        staged = [(part, self.cached(items, part, fast, guards=backward, cand_from=group))
                  for part, group in split(items, buckets(items, sel), workers)]
        self._add("batch", time.time() - t0)

        def work(bt):
            t1 = time.time()
            logits = self.model.forward(bt, values)
            loss = F.cross_entropy(logits, bt["tgt"], reduction="sum") * scale
            t2 = time.time()
            if backward:
                loss.backward()
            self._add("forward", t2 - t1)
            self._add("backward", time.time() - t2)
            # the candidates as this forward saw them (a bucket's post-processing below may add
            # candidates to the cached batches)
            return logits.detach(), float(loss.detach()), bt["tgt"], bt.get("cand")

        bts = [bt for _, bt in staged]
        t0 = time.time()
        # one bucket runs on a worker too: one OpenMP thread beats a woken team at this size
        done = list(_pool(workers).map(work, bts)) if workers > 1 else list(map(work, bts))
        self._add("compute", time.time() - t0)
        total, margins = 0.0, {}
        self.guards_ok = {}
        for (bucket, bt), (logits, loss, tgt, cand) in zip(staged, done):
            self.timing["tokens"] = self.timing.get("tokens", 0) + bt["h"].shape[0] * bt["S"]
            total += loss
            m, _ = self.model.margins(logits, tgt)
            if not fast:          # the full vocabulary's runner-ups join the fast candidates
                rival = logits.scatter(1, tgt[:, None], float("-inf")).argmax(1)
                self.add_candidates(rival.numpy())
            elif cand is not None:
                m = self._confirm(items, bucket, bt, m, cand, tgt)
            k = 0
            for i, n_guard, need in zip(bucket, bt["ng"], bt["gneed"]):
                n = len(items[i].tpos)
                margins[i] = m[k:k + n]          # targets only
                if need is not None:             # the guards the rows can reach
                    self.guards_ok[i] = bool((m[k + n:k + n + n_guard] >= need).all())
                k += n + n_guard
        return total, margins

    def _add(self, key: str, secs: float) -> None:
        with self._lock:
            self.timing[key] = self.timing.get(key, 0.0) + secs
