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
(`_capture`); a step runs only the suffix of each sequence through the write layer and the
layers after it, and computes logits only at target positions. Facts interact only through
shared entries, so they fall into connected components; a component stops (its rows freeze)
once every answer token of its facts is the argmax with a logit margin, and the fit ends when
all components have stopped and pass a final check with the values rounded to the file's type.

Strategies: "unembed" (UNEMBED_P, closed form: e = pinv(W_V[:, heads]) @ unembed[gold] * 20),
"opt" (the paper's OPT: each fact fitted alone from UNEMBED_P, written together, a later fact
winning a shared row), "joint" (above; the default).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engram_local.model.engram import decoder_layers
from engram_local.text.facts import join_answer  # noqa: F401 (re-exported)

METHODS = ("joint", "opt", "unembed")
DOC_START_ID = 0   # perplexity.DOC_START_ID: some front ends start a sequence with it
KEEP_OUT_MARGIN = 0.05   # a forgotten prompt only has to keep the model's own greedy choice


class FitError(ValueError):
    """A fact cannot be written (e.g. its answer cannot follow its prompt under the tokenizer)."""


@dataclass
class FitSettings:
    method: str = "joint"
    optimizer: str = "rprop"        # rprop (full-batch, sign-based: fastest here) | adam
    lr: float = 0.5                 # first step, relative to the row scale that moves the hidden
                                    # state by its own norm (see Fitter._calibrate)
    max_steps: int = 400            # optimizer steps at most (all components together)
    margin: float = 2.0             # every answer token must beat the runner-up logit by this
    context_margin: float = 4.0     # the same in a fact's contexts (chat replies): the real
                                    # question is not the stand-in, so the rows need headroom
    heads: int = 1                  # highest-order heads written per position at first
    anchors: bool = True            # facts sharing their trigger rows get a row of their own
    common_logp: float | None = -8.0  # N-grams the model finds likelier than 10**this (from a
                                    # document start) are common: no rows there where avoidable
                                    # (Fitter._mark_rare); None = write at any N-gram
    grow_after: int = 15            # steps a component may fail before it gets more rows
    unembed_scale: float | None = None  # UNEMBED_P scale: None = |W_V e| = gain * |h| (calibrated);
                                    # the paper's fixed 20 suits its own model only
    gain: float = 3.0               # calibrated start: the written value moves h by gain * |h|
    init_gate: float = 1.0          # start direction also opens the gate (0 = plain UNEMBED_P)
    opt_steps: int = 15             # OPT: steps per fact (the paper's OPT-15)
    value_dtype: str = "f16"        # the file's value type: the final check rounds to it
    extra_prefixes: tuple = ()      # more sequence starts the recall must survive, e.g.
                                    # ((DOC_START_ID,),); the first is the tokenizer's own
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
    contexts: list = field(default_factory=list)   # (lead text, prompt): the prompt after a lead
                                    # where no row may go, e.g. a chat turn reciting the fact


@dataclass
class Entry:
    row: int
    key: int


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


# --------------------------------------------------------------------------- tokens


def answer_tokens(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer's tokens as the tokenizer produces them after the
    prompt; FitError when there are none or when they cannot follow the prompt's tokens."""
    if not answer.strip():
        raise FitError(f"empty answer for prompt {prompt!r}")
    if not prompt.strip():
        raise FitError(f"empty prompt for answer {answer!r}")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    cont = join_answer(prompt, answer)
    full = tok(prompt + cont, add_special_tokens=False)["input_ids"]
    a = full[len(p):]
    if full[:len(p)] != p or not a or tok.decode(full) != tok.decode(p) + cont:
        raise FitError(f"the tokenizer cannot produce the answer {answer!r} after the prompt {prompt!r} "
                       f"(the tokens of prompt + answer do not start with the prompt's own tokens, or do "
                       f"not decode back to the text); reword the prompt, e.g. without trailing spaces")
    return p, a


# --------------------------------------------------------------------------- the fitter

class _Stop(Exception):
    pass


class _PrefixKV:
    """Duck-typed KV cache: records each layer's keys/values, or prepends a fixed prefix."""

    def __init__(self, prefix=None):
        self.prefix = prefix
        self.store = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.prefix is None:
            self.store[layer_idx] = (k, v)
            return k, v
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


@dataclass
class _Item:
    fact: int
    ids: list[int]                  # input tokens (prefix + prompt + answer[:-1])
    tpos: np.ndarray                # target positions
    ttok: np.ndarray                # target tokens
    train: bool                     # in the loss (verification items join when they fail)
    write: bool                     # its target positions may get rows
    need: float = 0.0               # logit margin every target must reach
    prefix: tuple = ()              # the sequence start before the prompt
    rare: np.ndarray | None = None  # per position: its N-gram is not made of common tokens
    # filled by _capture
    h: torch.Tensor | None = None   # (T, D) hidden state entering the write layer
    e: torch.Tensor | None = None   # (T, H, d) base look-ups at the write layer
    rows: np.ndarray | None = None  # (T, H)
    keys: np.ndarray | None = None  # (T, H)
    kv: list | None = None          # per later layer (k, v) each (n_kv, T, hd)
    base_margin: np.ndarray | None = None
    base_pred: np.ndarray | None = None
    idx: np.ndarray | None = None   # (T, H) entry index of each look-up or -1
    start: int = 0                  # first position with an overridden look-up
    # guards (chat contexts): positions whose next prompt token the rows must not disturb, as
    # the model itself says the prompt there; in the loss only (prompts sharing words conflict)
    gpos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gtok: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class Fitter:
    """Writes facts into override entries of one EngramModel (frozen), as configured."""

    def __init__(self, em, tok, settings: FitSettings | None = None, progress=None):
        self.em, self.tok = em, tok
        self.s = settings or FitSettings()
        if self.s.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.s.method!r}")
        cfg = em.cfg
        self.wl = cfg.write_layer
        if self.wl != max(cfg.layer_ids):
            raise ValueError(f"write layer {self.wl} must be the last Engram layer {max(cfg.layer_ids)}")
        self.eng = em.engram[str(self.wl)]
        self.layers = decoder_layers(em.backbone)
        self.K, self.H, self.d = cfg.n_head_per_ngram, cfg.n_columns, cfg.head_dim
        self.hi_cols = list(range((cfg.max_ngram_size - 2) * self.K, (cfg.max_ngram_size - 1) * self.K))
        self.progress = progress
        # sequences start as the runtime starts them: with the tokenizer's own special prefix
        # (BOS where it adds one), then any extra starts the recall must survive
        plain = tok("a", add_special_tokens=False)["input_ids"]
        full = tok("a")["input_ids"]
        own = tuple(full[:len(full) - len(plain)]) if full[len(full) - len(plain):] == plain else ()
        self.prefixes = [own] + [tuple(p) for p in self.s.extra_prefixes if tuple(p) != own]
        self.trace: list[tuple] = []    # (step, loss, components left, entries) per step
        self._batch_cache: dict = {}
        self.timing: dict[str, float] = {}
        inner = em.backbone.model
        self.final_norm, self.rotary = inner.norm, inner.rotary_emb
        self.lm_head = em.backbone.get_output_embeddings()

    # ------------------------------------------------------------ items
    def items_for(self, facts: list[FactIn]) -> list[_Item]:
        items = []
        for fi, f in enumerate(facts):
            leads = [((), prompt) for prompt in f.prompts]
            leads += [(tuple(self.tok(lead, add_special_tokens=False)["input_ids"]), prompt)
                      for lead, prompt in ([] if f.keep_out else f.contexts)]
            for lead, prompt in leads:
                p, a = answer_tokens(self.tok, prompt, f.answer)
                if f.keep_out:
                    a = list(f.keep_out_tokens or [])[:len(a)]
                    if not a:
                        continue
                # a context's lead follows the runtime's own sequence start only
                for ci, pre in enumerate(self.prefixes[:1] if lead else self.prefixes):
                    pre = tuple(pre) + lead
                    seq = list(pre) + p + a
                    P = len(pre) + len(p)
                    items.append(_Item(fact=fi, ids=seq[:-1], tpos=np.arange(P - 1, len(seq) - 1),
                                       ttok=np.asarray(a, np.int64),
                                       train=ci == 0 or self.s.fit_all_prefixes,
                                       write=not f.keep_out,
                                       need=KEEP_OUT_MARGIN if f.keep_out else
                                       (self.s.context_margin if lead else self.s.margin),
                                       prefix=tuple(pre),
                                       gpos=np.arange(len(pre) - 1, P - 1) if lead else np.zeros(0, np.int64),
                                       gtok=np.asarray(p if lead else [], np.int64)))
        return items

    # ------------------------------------------------------------ base pass
    @torch.no_grad()
    def _capture(self, items: list[_Item], chunk: int = 64):
        em, wl = self.em, self.wl
        for c0 in range(0, len(items), chunk):
            batch = items[c0:c0 + chunk]
            T = max(len(it.ids) for it in batch)
            x = torch.zeros(len(batch), T, dtype=torch.long)
            for b, it in enumerate(batch):
                x[b, :len(it.ids)] = torch.tensor(it.ids)
            addr = em.addresses(x)
            mem = em.memory({l: r for l, (r, _) in addr.items()}, {l: k for l, (_, k) in addr.items()})
            got = {}

            def grab(module, args, kwargs):
                got["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                raise _Stop

            hook = self.layers[wl].register_forward_pre_hook(grab, prepend=True, with_kwargs=True)
            try:
                em(x, memory=mem)
            except _Stop:
                pass
            finally:
                hook.remove()
            h = got["h"]
            e = mem[wl].reshape(len(batch), T, self.H, self.d)
            kv = _PrefixKV()
            pos = torch.arange(T)[None].expand(len(batch), T)
            hidden = self._run_from_write_layer(h, e.reshape(len(batch), T, -1), pos, None, kv, None)
            rows, keys = addr[wl][0].numpy(), addr[wl][1].numpy()
            for b, it in enumerate(batch):
                n = len(it.ids)
                it.h, it.e = h[b, :n].clone(), e[b, :n].clone()
                it.rows, it.keys = rows[b, :n].copy(), keys[b, :n].copy()
                it.kv = [(k[b, :, :n].clone(), v[b, :, :n].clone()) for k, v in
                         (kv.store[i] for i in range(wl, len(self.layers)))]
                logits = self._logits(hidden[b, it.tpos])
                it.base_margin, it.base_pred = self._margins(logits, torch.from_numpy(it.ttok))

    def _run_from_write_layer(self, h, e, pos, conv_state, kv, mask):
        """Hidden states after the last decoder layer, from the input of the write layer."""
        y, _ = self.eng(h, e, conv_state)
        h = h + y
        pe = self.rotary(h, pos)
        for layer in self.layers[self.wl:]:
            out = layer(h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                        position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _logits(self, hidden):
        return self.lm_head(self.final_norm(hidden)).float()

    @staticmethod
    def _margins(logits, target):
        """(margin of the target over the best other token, argmax) per row, numpy."""
        gold = logits.gather(1, target[:, None])[:, 0]
        other = logits.scatter(1, target[:, None], float("-inf")).max(1).values
        return (gold - other).detach().numpy(), logits.argmax(1).numpy()

    # ------------------------------------------------------------ entries
    def _position_entries(self, it: _Item, t: int, n_heads: int):
        return [(int(it.rows[t, c]), int(it.keys[t, c])) for c in self.hi_cols[:n_heads]]

    @torch.no_grad()
    def _unembed_value(self, cols: list[int], token: int, h: torch.Tensor | None = None) -> np.ndarray:
        """Start value of the rows `cols` of one position: (len(cols), d).

        UNEMBED_P: e = pinv(W_V[:, cols]) @ unembed[token], so W_V e points at the token. With the
        hidden state `h` and `init_gate` > 0 the direction also opens the gate: least squares of
        [W_V; sqrt(mu) W_K] e = [u; sqrt(mu) RMSNorm(h)] (unit-norm targets); the gate reads
        the direction of W_K e only. Scaled so |W_V e| = gain * |h| (or by unembed_scale)."""
        w = self.eng.w_v.weight.detach()                              # (D, E)
        sel = torch.cat([w[:, c * self.d:(c + 1) * self.d] for c in cols], dim=1)
        u = self.lm_head.weight.detach()[token]
        mu = self.s.init_gate if (h is not None and self.s.method != "unembed") else 0.0
        if mu > 0:
            wk = self.eng.w_k.weight.detach()
            selk = torch.cat([wk[:, c * self.d:(c + 1) * self.d] for c in cols], dim=1)
            hq = self.eng.norm_q(h.detach())
            a = torch.cat([sel, math.sqrt(mu) * selk])
            b = torch.cat([u / u.norm(), math.sqrt(mu) * hq / hq.norm()])
            e = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
        else:
            e = torch.linalg.pinv(sel) @ u
        if self.s.unembed_scale is not None:
            e = e * self.s.unembed_scale
        else:
            e = e * (self.s.gain * self.h_norm / max(float((sel @ e).norm()), 1e-12))
        return e.reshape(len(cols), self.d).numpy()

    @torch.no_grad()
    def _calibrate(self, items):
        """h_norm: median norm of the hidden state entering the write layer at target positions;
        row_scale: the per-value size of one head's row that moves it by that much."""
        norms = torch.cat([it.h[torch.from_numpy(it.tpos)].norm(dim=-1) for it in items])
        self.h_norm = float(norms.median())
        w = self.eng.w_v.weight.detach()
        gain = float(np.mean([torch.linalg.svdvals(w[:, c * self.d:(c + 1) * self.d]).mean()
                              for c in self.hi_cols]))
        self.row_scale = self.h_norm / max(gain, 1e-12) / math.sqrt(self.d)
        self.lr = self.s.lr * self.row_scale

    # ------------------------------------------------------------ fitting
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
        self._capture(items)
        self._calibrate(items)
        self.timing["capture"] = time.time() - tc
        entries: dict[tuple, int] = {}
        values: list[np.ndarray] = []
        init_acc: dict[int, list] = {}
        owner: dict[int, set] = {i: set() for i in range(len(facts))}
        existing = dict(existing or {})
        n_heads_at: dict[tuple, int] = {}     # (item index, t) -> heads written there

        def add(key, value=None):
            if key not in entries:
                entries[key] = len(values)
                if key in existing:
                    values.append(np.asarray(existing[key], np.float32))
                else:
                    values.append(np.zeros(self.d, np.float32))
                    init_acc[entries[key]] = []
            if value is not None and entries[key] in init_acc:
                init_acc[entries[key]].append(value)
            return entries[key]

        def place_at(ii: int, t: int, n_heads: int, token: int | None = None) -> bool:
            """Rows (the first n_heads highest-order heads) at position t of item ii, started
            from UNEMBED_P towards `token` (default: the target predicted there)."""
            it = items[ii]
            have = n_heads_at.get((ii, t), 0)
            if n_heads <= have:
                return False
            if token is None:
                token = int(it.ttok[int(np.nonzero(it.tpos == t)[0][0])])
            cols = self.hi_cols[:n_heads]
            vals = self._unembed_value(cols, token, it.h[t])
            for c, v in zip(cols[have:], vals[have:]):
                owner[it.fact].add(add((int(it.rows[t, c]), int(it.keys[t, c])), v))
            n_heads_at[(ii, t)] = n_heads
            return True

        def flush_init():
            for ei, vs in init_acc.items():
                if vs:
                    values[ei] = np.mean(vs, axis=0).astype(np.float32)
            init_acc.clear()

        # Every row already in the file (rows no fact here owns stay fixed).
        for k in existing:
            add(tuple(k))
        fid_index = {f.id: i for i, f in enumerate(facts)}
        for fid, keys in (existing_owner or {}).items():
            if fid in fid_index:
                for k in keys:
                    owner[fid_index[fid]].add(add(tuple(k)))
        owned = set().union(*owner.values()) if owner else set()
        self.fixed = np.array(sorted(set(range(len(values))) - owned), np.int64)
        self._mark_rare(items)
        for it in items:
            if facts[it.fact].id in (existing_owner or {}) and not facts[it.fact].keep_out:
                it.need = self.s.margin / 2     # already accepted: refit only if it degrades

        def trigger_position(it) -> int:
            """The trigger, or - when its N-gram is common - the last prompt position whose
            N-gram is not ("Nguyen works as" for "... works as a"), read through attention."""
            t0 = int(it.tpos[0])
            if it.rare[t0]:
                return t0
            for t in range(t0 - 1, self.prefix_len(it) - 1, -1):
                if it.rare[t]:
                    return t
            return t0

        # Facts whose trigger N-gram other facts share ("was born in" -> 1993 / 2013) get an
        # anchor too: a row at their last prompt position whose N-gram is
        # theirs alone ("Quinn was"), which tells the shared rows whose answer to give.
        h0 = self.hi_cols[0]
        facts_by_key: dict[int, set] = {}
        for it in items:
            if it.write and it.train:
                for t in range(len(it.ids)):
                    facts_by_key.setdefault(int(it.keys[t, h0]), set()).add(it.fact)

        def anchor_position(it) -> int | None:
            t0 = trigger_position(it)
            for t in range(t0 - 1, self.prefix_len(it) - 1, -1):
                if it.rare[t] and facts_by_key[int(it.keys[t, h0])] == {it.fact}:
                    return t
            return None

        # New facts: rows at the trigger (or its stand-in) and at every later target position
        # the unmodified model gets wrong, unless that position's N-gram is common.
        for ii, it in enumerate(items):
            if not (it.write and it.train) or facts[it.fact].id in (existing_owner or {}):
                continue          # earlier facts keep their rows; they grow only if they fail
            # answer tokens the model gets wrong where no row may go (digits, common words)
            # must come through the trigger's rows: give it more heads
            blind = sum(1 for j in range(1, len(it.tpos))
                        if not it.rare[int(it.tpos[j])] and it.base_margin[j] < self.s.margin)
            heads = min(self.K, self.s.heads * (2 if blind else 1))
            place_at(ii, trigger_position(it), heads, int(it.ttok[0]))
            shared = len(facts_by_key[int(it.keys[trigger_position(it), h0])]) > 1
            if shared and self.s.anchors and (a := anchor_position(it)) is not None:
                place_at(ii, a, self.s.heads, int(it.ttok[0]))
            for j in range(1, len(it.tpos)):
                t = int(it.tpos[j])
                if it.rare[t] and it.base_margin[j] < self.s.margin:
                    place_at(ii, t, self.s.heads)
        flush_init()

        def grow(ii: int, margins) -> bool:
            """More rows for a fact that keeps failing: rows at its failing target positions
            whose N-gram is not common, else more heads where it already has rows."""
            it = items[ii]
            if not it.write:
                return False
            grew = False
            for j in np.nonzero(margins < it.need)[0]:
                t = int(it.tpos[j])
                if it.rare[t] and (ii, t) not in n_heads_at:
                    grew |= place_at(ii, t, self.s.heads)
            if not grew:
                for (jj, t), have in list(n_heads_at.items()):
                    if jj == ii and have < self.K:
                        grew |= place_at(ii, t, min(2 * have, self.K), self._token_for(it, t))
            flush_init()
            return grew

        method = self.s.method
        to = time.time()
        if method == "unembed":
            steps = 0
        else:
            steps = self._optimize(items, facts, entries, values, grow, owner, method)
        self.timing["optimize"] = time.time() - to
        tf = time.time()
        vals = np.stack(values) if values else np.zeros((0, self.d), np.float32)
        keys_list = list(entries)
        recalled = self._final_check(items, facts, entries, vals)
        self.timing["final_check"] = time.time() - tf
        fact_entries = {f.id: sorted(owner[i]) for i, f in enumerate(facts) if not f.keep_out}
        return FitResult(rows=np.array([k[0] for k in keys_list], np.int64).reshape(-1),
                         keys=np.array([k[1] for k in keys_list], np.int64).reshape(-1),
                         values=vals, fact_entries=fact_entries, recalled=recalled, steps=steps,
                         seconds=time.time() - t0, stats=dict(items=len(items), entries=len(keys_list)))

    # ------------------------------------------------------------ structure of a stage
    def _index(self, items, entries):
        """Per item: entry index of every look-up, first overridden position; components."""
        self._batch_cache = {}
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
        comp = np.array([find(i) for i in range(len(items))])
        return comp

    @torch.no_grad()
    def _conv_state(self, it: _Item):
        hist = self.eng.conv_history
        if it.start == 0:
            return torch.zeros(hist, self.em.cfg.hidden_size)
        _, state = self.eng(it.h[None, :it.start], it.e[None, :it.start].reshape(1, it.start, -1))
        return state[0]

    def _batch(self, items, sel):
        """Padded suffix tensors of the items `sel` (indices): positions from each item's first
        overridden look-up on, its cached prefix (attention keys/values, conv state), a mask
        that hides padding, and where its targets sit."""
        its = [items[i] for i in sel]
        B = len(its)
        S = max(len(it.ids) - it.start for it in its)
        Lp = max(it.start for it in its)
        D = self.em.cfg.hidden_size
        h = torch.zeros(B, S, D)
        e = torch.zeros(B, S, self.H, self.d)
        idx = torch.full((B, S, self.H), -1, dtype=torch.long)
        pos = torch.zeros(B, S, dtype=torch.long)
        cs = torch.stack([it.cs for it in its])
        n_layers = len(self.layers) - self.wl
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
        prefix = {self.wl + li: (pk[li], pv[li]) for li in range(n_layers)}
        return dict(h=h, e=e, idx=idx, pos=pos, cs=cs, prefix=prefix, mask=mask,
                    flat=torch.tensor(flat, dtype=torch.long), tgt=torch.tensor(tgt, dtype=torch.long),
                    S=S, ng=ng)

    def _buckets(self, items, sel, waste: float = 1.3, max_tokens: int = 4096):
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

    def _cached_batch(self, items, sel):
        key = tuple(sel)
        bt = self._batch_cache.get(key)
        if bt is None:
            if len(self._batch_cache) > 256:
                self._batch_cache.clear()
            bt = self._batch_cache[key] = self._batch(items, sel)
        return bt

    def _run_buckets(self, items, sel, values, backward: bool, scale: float = 1.0):
        """(loss, {item: margins of its targets}) over `sel`, bucketed; backward per bucket."""
        total, margins = 0.0, {}
        for bucket in self._buckets(items, sel):
            t0 = time.time()
            bt = self._cached_batch(items, bucket)
            t1 = time.time()
            logits = self._forward(bt, values)
            loss = F.cross_entropy(logits, bt["tgt"], reduction="sum") * scale
            t2 = time.time()
            if backward:
                loss.backward()
            t3 = time.time()
            for k, v in (("batch", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2)):
                self.timing[k] = self.timing.get(k, 0.0) + v
            self.timing["tokens"] = self.timing.get("tokens", 0) + bt["h"].shape[0] * bt["S"]
            total += float(loss.detach())
            m, _ = self._margins(logits.detach(), bt["tgt"])
            k = 0
            for i, n_guard in zip(bucket, bt["ng"]):
                n = len(items[i].tpos)
                margins[i] = m[k:k + n]          # targets only: guards never block convergence
                k += n + n_guard
        return total, margins

    def _forward(self, bt, values):
        base = bt["e"]
        idx = bt["idx"]
        sub = values[idx.clamp(min=0)]                                   # (B, S, H, d)
        e = torch.where((idx >= 0)[..., None], sub, base)
        B, S = idx.shape[:2]
        hidden = self._run_from_write_layer(bt["h"], e.reshape(B, S, -1), bt["pos"], bt["cs"],
                                            _PrefixKV(bt["prefix"]), bt["mask"])
        return self._logits(hidden.reshape(B * S, -1)[bt["flat"]])

    # ------------------------------------------------------------ optimisation
    def _optimize(self, items, facts, entries, values, grow, owner, method):
        s = self.s
        if method == "opt":
            return self._optimize_opt(items, facts, entries, values)
        param = torch.nn.Parameter(torch.from_numpy(np.stack(values)) if values else torch.zeros(0, self.d))
        opt = self._make_opt(param)

        def restage():
            nonlocal param, opt
            comp = self._index(items, entries)
            for it in items:
                it.cs = self._conv_state(it)
            if len(values) > param.shape[0]:       # new entries: grow the parameter, keep Adam state
                new = torch.from_numpy(np.stack(values[param.shape[0]:]))
                old_state = opt.state.get(param, {})
                param = torch.nn.Parameter(torch.cat([param.detach(), new]))
                opt = self._make_opt(param)
                if old_state:
                    opt.state[param] = self._grow_state(old_state, len(new))
            return comp

        comp = restage()
        fixed = set(self.fixed.tolist())

        def untrainable():
            # components no trainable row reaches cannot change: never active
            has = {comp[i] for i, it in enumerate(items)
                   if any(int(e) not in fixed for e in it.idx[it.idx >= 0])}
            return {int(c) for c in comp} - has

        done: set[int] = untrainable()   # converged (or unchangeable) components
        failing_since: dict[int, int] = {}
        step = 0
        checks = 0
        bar = self.progress(total=s.max_steps) if self.progress else None
        while step < s.max_steps:
            active = [i for i, it in enumerate(items) if it.train and comp[i] not in done]
            if not active:
                # every component converged: check everything with the stored value type
                checks += 1
                failed = self._check(items, self._rounded(param.detach()))
                self.trace.append(("check", len(failed), sorted({items[i].fact for i in failed})))
                if not failed or checks > 8:
                    break
                for i in failed:
                    items[i].train = True
                    done.discard(comp[i])
                continue
            opt.zero_grad(set_to_none=False)
            loss, item_margins = self._run_buckets(items, active, param, backward=True,
                                                   scale=1.0 / len(active))
            item_min = {i: float(m.min()) for i, m in item_margins.items()}
            snapshot = param.detach().clone()
            comp_ok: dict[int, bool] = {}
            for i in active:
                comp_ok[comp[i]] = comp_ok.get(comp[i], True) and item_min[i] >= items[i].need
            newly = [c for c, ok in comp_ok.items() if ok]
            # entries used by converged components freeze at the values that passed
            live = torch.zeros(param.shape[0], dtype=torch.bool)
            for i in active:
                if comp[i] not in newly:
                    used = items[i].idx[items[i].idx >= 0]
                    live[torch.from_numpy(np.unique(used))] = True
            if len(self.fixed):
                live[torch.from_numpy(self.fixed)] = False
            opt.step()
            with torch.no_grad():
                param[~live] = snapshot[~live]
            done.update(newly)
            step += 1
            left = {comp[i] for i in active} - set(newly)
            self.trace.append((step, round(loss, 3), len(left), param.shape[0],
                               sorted({items[i].fact for i in active if comp[i] in left})[:8]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", left=len({comp[i] for i in active} - set(newly)))
            # growth: components failing too long get rows at their failing positions
            grew = False
            for c in {comp[i] for i in active} - set(newly):
                failing_since.setdefault(c, step)
                if step - failing_since[c] >= s.grow_after:
                    failing_since[c] = step
                    grew |= self._grow(items, [i for i in active if comp[i] == c], item_margins, grow)
            if grew:
                cur = param.detach().numpy()
                for ei in range(cur.shape[0]):
                    values[ei] = cur[ei].copy()
                comp = restage()
                done, failing_since = untrainable(), {}
        if bar is not None:
            bar.close()
        cur = param.detach().numpy()
        for ei in range(cur.shape[0]):
            values[ei] = cur[ei].copy()
        return step

    def _make_opt(self, param):
        if self.s.optimizer == "rprop":
            return torch.optim.Rprop([param], lr=self.lr, step_sizes=(1e-3 * self.lr, 50 * self.lr))
        return torch.optim.Adam([param], lr=self.lr)

    def _grow_state(self, state, n_new):
        out = dict(state)
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                fill = self.lr if k == "step_size" else 0.0
                out[k] = torch.cat([v, torch.full((n_new, v.shape[1]), fill, dtype=v.dtype)])
        return out

    def _token_for(self, it, t: int) -> int:
        """The token a row at position t should push: its target, or the first answer token."""
        hit = np.nonzero(it.tpos == t)[0]
        return int(it.ttok[hit[0]]) if len(hit) else int(it.ttok[0])

    def prefix_len(self, it) -> int:
        """Tokens of the sequence start (BOS or another prefix) before the prompt."""
        return len(it.prefix)

    @torch.no_grad()
    def _mark_rare(self, items, window: int = 4, chunk: int = 256):
        """it.rare[t]: the highest-order N-gram ending at t is rare enough to carry a row.

        An N-gram is common when the model itself, from a document start, gives its tokens a
        joint probability of at least 10**common_logp ("was born in" 10**-5.4, "works as a"
        10**-7.5), or when none of its tokens has a letter (digits: " 20", "199"). Rows there
        would fire in ordinary text; the writer avoids them where it can. Only the trigger,
        the `window` prompt positions before it and the answer positions are scored."""
        n = self.em.cfg.max_ngram_size
        letters = self._letter_tokens()
        todo: dict[tuple, float] = {}
        for it in items:
            it.rare = np.zeros(len(it.ids), bool)
            lo = max(self.prefix_len(it), int(it.tpos[0]) - window)
            for t in range(lo, len(it.ids)):
                todo.setdefault(tuple(it.ids[max(self.prefix_len(it), t - n + 1):t + 1]), 0.0)
        if self.s.common_logp is None:
            scores = {g: -np.inf for g in todo}
        else:
            grams = [g for g in todo if any(letters[x] for x in g)]
            scores = {g: 0.0 for g in todo}
            for c0 in range(0, len(grams), chunk):
                part = grams[c0:c0 + chunk]
                x = torch.full((len(part), n + 1), DOC_START_ID, dtype=torch.long)
                for b, g in enumerate(part):
                    x[b, 1:1 + len(g)] = torch.tensor(g)
                lp = torch.log_softmax(self.em(x).logits.float(), dim=-1)
                for b, g in enumerate(part):
                    scores[g] = sum(float(lp[b, j, g[j]]) for j in range(len(g))) / math.log(10)
        for it in items:
            lo = max(self.prefix_len(it), int(it.tpos[0]) - window)
            for t in range(lo, len(it.ids)):
                g = tuple(it.ids[max(self.prefix_len(it), t - n + 1):t + 1])
                it.rare[t] = self.s.common_logp is None or scores[g] < self.s.common_logp

    def _letter_tokens(self) -> np.ndarray:
        if getattr(self, "_letters", None) is None:
            texts = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
            self._letters = np.array([any(ch.isalpha() for ch in self.tok.convert_tokens_to_string([t]))
                                      if t else False for t in texts])
        return self._letters

    def _grow(self, items, comp_items, item_margins, grow):
        return any([grow(i, item_margins[i]) for i in comp_items if i in item_margins])

    def _rounded(self, values: torch.Tensor) -> torch.Tensor:
        if self.s.value_dtype == "f16":
            return values.half().float()
        return values

    @torch.no_grad()
    def _check(self, items, values):
        """Indices of items whose answer is not the argmax with half the margin (or their own
        smaller one), with the values as given."""
        _, margins = self._run_buckets(items, list(range(len(items))), values, backward=False)
        return [i for i in range(len(items)) if margins[i].min() < min(items[i].need, self.s.margin / 2)]

    @torch.no_grad()
    def _final_check(self, items, facts, entries, vals):
        """{fact id: every form of the fact produces its whole answer greedily} with the values
        rounded to the file's type."""
        self._index(items, entries)
        for it in items:
            it.cs = self._conv_state(it)
        values = self._rounded(torch.from_numpy(vals)) if len(vals) else torch.zeros(0, self.d)
        recalled = {f.id: True for f in facts if not f.keep_out}
        _, margins = self._run_buckets(items, list(range(len(items))), values, backward=False)
        for i, it in enumerate(items):
            if margins[i].min() <= 0 and facts[it.fact].id in recalled:
                recalled[facts[it.fact].id] = False
        self.final_margins = {i: margins[i] for i in range(len(items))}
        return recalled

    # ------------------------------------------------------------ OPT (independent facts)
    def _optimize_opt(self, items, facts, entries, values):
        """The paper's OPT: each fact alone from its UNEMBED_P start, `opt_steps` Adam steps with
        loss CE + 0.001 * mean((row - init)^2); facts written together, a later fact winning a
        shared row."""
        s = self.s
        final = [v.copy() for v in values]
        total = 0
        for fi in range(len(facts)):
            mine = [i for i, it in enumerate(items) if it.fact == fi and it.train]
            if not mine:
                continue
            if items[mine[0]].idx is None:
                self._index(items, entries)
            own = sorted({int(e) for i in mine for e in items[i].idx[items[i].idx >= 0]})
            for i in mine:
                items[i].cs = self._conv_state(items[i])
            init = torch.from_numpy(np.stack(values))
            param = torch.nn.Parameter(init.clone())
            opt = torch.optim.Adam([param], lr=self.lr)
            bt = self._batch(items, mine)
            for _ in range(s.opt_steps):
                logits = self._forward(bt, param)
                loss = F.cross_entropy(logits, bt["tgt"]) + 0.001 * (((param[own] - init[own]) / self.row_scale) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += 1
            for e in own:
                final[e] = param.detach()[e].numpy().copy()
        values[:] = final
        return total


def _rows_of(entries: dict) -> np.ndarray:
    return np.fromiter((k[0] for k in entries), dtype=np.int64, count=len(entries))
