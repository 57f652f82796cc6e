"""The frozen prefix: everything before the write layer is fixed, and so is every position before
a sequence's first overridden look-up. `FrozenPrefix.capture` computes once, per item, the hidden
state entering the write layer, the table look-ups and the attention keys/values of the later
layers; `forward` then runs only a batch's suffixes through the write layer and the layers after
it, with some look-ups replaced by trainable values, and computes logits only at target
positions.

Speed (docs/writespeed.md):
  * capture runs each distinct token prefix once: the items' sequences form a trie (chat forms
    share their system turn, stand-in questions repeat across facts), and each trie segment runs
    once through all layers, attending to its ancestors' cached keys/values;
  * the optimizer's steps (and, with `fast`, the capture) run through bf16 copies of the layers
    (`FastModel`), several times faster on CPUs with bf16 matrix units; the logits of a step are
    computed over a candidate vocabulary (the targets and the tokens that compete with them);
    every check runs in fp32 over the whole vocabulary;
  * decoder layers run through one plain function (`decoder_layer`): keys/values of the cached
    prefix are attended without being copied next to the suffix's; it is checked against the
    model's own layer once per model and not used when they differ (then the model's layers run).
"""

from __future__ import annotations

import copy
import weakref

import numpy as np
import torch

from engram_local.model.engram import decoder_layers
from engram_local.native.hashing import hash_ids



def _fast_dtype() -> torch.dtype:
    """The type of the optimizer steps' copies of the later layers (FitSettings.fast): bf16 where
    the CPU multiplies it natively (AVX512-BF16 or AMX tiles), fp32 elsewhere - there torch
    emulates bf16 at about three times fp32's time (a 2048x576 @ 576x1536 product: 101 ms against
    32 ms on two AVX512 cores without BF16), so the copies would slow the steps they are for."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:           # a torch without the probes: assume none
        native = False
    return torch.bfloat16 if native else torch.float32


FAST_DTYPE = _fast_dtype()
NEG = -1e30                       # additive mask of a hidden key (fp32 scores)


class _Stop(Exception):
    pass


class PrefixKV:
    """Duck-typed KV cache: records each layer's keys/values, or prepends a fixed prefix."""

    def __init__(self, prefix=None):
        self.prefix = prefix
        self.store = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.prefix is None:
            self.store[layer_idx] = (k, v)
            return k, v
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)


# --------------------------------------------------------------------------- one decoder layer

def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def prefix_attention(q, k, v, pk, pv, pmask, causal, scaling: float):
    """Attention of a suffix to a cached prefix and to itself, grouped-query, without repeating
    or concatenating keys/values: q (B, Hq, S, d), k/v (B, Hkv, S, d), pk/pv (B, Hkv, Lp, d)
    or None, pmask (B, 1, 1, Lp) and causal (S, S) additive fp32 masks."""
    B, Hq, S, d = q.shape
    Hkv = k.shape[1]
    r = Hq // Hkv
    qg = q.reshape(B, Hkv, r * S, d)
    ss = (qg @ k.transpose(-1, -2)).float() * scaling + causal.repeat(r, 1)
    if pk is not None and pk.shape[2]:
        Lp = pk.shape[2]
        sp = (qg @ pk.transpose(-1, -2)).float() * scaling + pmask
        w = torch.softmax(torch.cat([sp, ss], -1), -1).to(q.dtype)
        out = w[..., :Lp] @ pv + w[..., Lp:] @ v
    else:
        out = torch.softmax(ss, -1).to(q.dtype) @ v
    return out.reshape(B, Hq, S, d)


def decoder_layer(layer, h, cos, sin, pk=None, pv=None, pmask=None, causal=None):
    """A Llama-family decoder layer (pre-norm attention + MLP, rotary positions) on a suffix
    after a cached prefix; returns (h, k, v), the suffix's own keys/values."""
    a = layer.self_attn
    B, S, _ = h.shape
    x = layer.input_layernorm(h)
    hd = a.head_dim
    q = a.q_proj(x).view(B, S, -1, hd).transpose(1, 2)
    k = a.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
    v = a.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
    c, s = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    if causal is None:
        causal = torch.triu(torch.full((S, S), NEG), diagonal=1)
    o = prefix_attention(q, k, v, pk, pv, pmask, causal, a.scaling)
    h = h + a.o_proj(o.transpose(1, 2).reshape(B, S, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v


@torch.no_grad()
def _layer_agrees(layer, rotary, dim: int) -> bool:
    """decoder_layer on a cached prefix equals the model's own layer on the whole sequence."""
    try:
        g = torch.Generator().manual_seed(0)
        p = next(layer.parameters())
        h = torch.randn(2, 7, dim, generator=g, dtype=p.dtype) * 3
        pos = torch.arange(7)[None].expand(2, 7)
        cos, sin = rotary(h, pos)
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        want = out[0] if isinstance(out, tuple) else out
        _, k, v = decoder_layer(layer, h[:, :4], cos[:, :4], sin[:, :4])
        got, _, _ = decoder_layer(layer, h[:, 4:], cos[:, 4:], sin[:, 4:], k, v,
                                  torch.zeros(2, 1, 1, 4), None)
        return bool(torch.allclose(got, want[:, 4:], atol=1e-3, rtol=1e-3))
    except Exception:       # any other decoder: its own layers run instead
        return False


class FastModel:
    """bf16 copies of one model's decoder layers, input and output embeddings and final norm
    (the Engram layers stay fp32: the trainable values enter there)."""

    def __init__(self, em):
        backbone = em.backbone
        self.layers = []
        for layer in decoder_layers(backbone):
            c = copy.deepcopy(layer).to(FAST_DTYPE)
            c._forward_pre_hooks.clear()          # the Engram term is added by the caller
            c.requires_grad_(False)
            self.layers.append(c)
        self.embed = backbone.get_input_embeddings().weight.detach().to(FAST_DTYPE)
        self.final_norm = copy.deepcopy(backbone.model.norm).to(FAST_DTYPE).requires_grad_(False)
        self.lm_weight = backbone.get_output_embeddings().weight.detach().to(FAST_DTYPE)


_FAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # em -> FastModel
_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # em -> decoder_layer agrees


def fast_model(em) -> FastModel:
    got = _FAST.get(em)
    if got is None:
        got = _FAST[em] = FastModel(em)
    return got


class _Seg:
    """One segment of the trie of item sequences: positions [lo, hi) of every item through it."""
    __slots__ = ("lo", "hi", "parent", "rep", "depth", "kv", "conv", "h", "out")

    def __init__(self, lo, hi, parent, rep, depth):
        self.lo, self.hi, self.parent, self.rep, self.depth = lo, hi, parent, rep, depth
        self.kv = None      # per layer (k, v), each (Hkv, hi - lo, hd)
        self.conv = {}      # Engram layer -> conv state after position hi - 1
        self.h = None       # (hi - lo, D) hidden state entering the write layer
        self.out = None     # (hi - lo, D) output of the last decoder layer

    def path(self):
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out[::-1]


def sequence_trie(seqs: list[list[int]]):
    """(segments in parent-first order, per sequence its leaf segment): the compressed trie of
    the sequences; every shared prefix is one chain of segments."""
    segs: list[_Seg] = []
    leaf: list[_Seg | None] = [None] * len(seqs)
    stack = [(list(range(len(seqs))), 0, None)]
    while stack:
        group, lo, parent = stack.pop()
        first = seqs[group[0]]
        if len(group) == 1:
            hi = len(first)
        else:
            hi = min(len(seqs[i]) for i in group)
            for i in group[1:]:
                s, j = seqs[i], lo
                while j < hi and s[j] == first[j]:
                    j += 1
                hi = j
        me = parent
        if hi > lo:
            me = _Seg(lo, hi, parent, group[0], 0 if parent is None else parent.depth + 1)
            segs.append(me)
        rest: dict[int, list[int]] = {}
        for i in group:
            if len(seqs[i]) > hi:
                rest.setdefault(seqs[i][hi], []).append(i)
            else:
                leaf[i] = me
        for sub in rest.values():
            stack.append((sub, hi, me))
    return segs, leaf


def padded_ids(items) -> torch.Tensor:
    """(B, T) token ids of `items`, zero-padded on the right to the longest."""
    x = torch.zeros(len(items), max(len(it.ids) for it in items), dtype=torch.long)
    for b, it in enumerate(items):
        x[b, :len(it.ids)] = torch.tensor(it.ids)
    return x


class FrozenPrefix:
    """One EngramModel (frozen) seen from its write layer, the last Engram layer."""

    def __init__(self, em):
        cfg = em.cfg
        self.em = em
        self.wl = cfg.write_layer
        if self.wl != max(cfg.layer_ids):
            raise ValueError(f"write layer {self.wl} must be the last Engram layer {max(cfg.layer_ids)}")
        self.eng = em.engram[str(self.wl)]
        self.layers = decoder_layers(em.backbone)
        self.K, self.H, self.d = cfg.n_head_per_ngram, cfg.n_columns, cfg.head_dim
        # the heads of the highest N-gram order: the only ones rows are written to
        self.hi_cols = list(range((cfg.max_ngram_size - 2) * self.K, (cfg.max_ngram_size - 1) * self.K))
        inner = em.backbone.model
        self.embed = em.backbone.get_input_embeddings()
        self.final_norm, self.rotary = inner.norm, inner.rotary_emb
        self.lm_head = em.backbone.get_output_embeddings()
        if em not in _PLAIN:
            _PLAIN[em] = _layer_agrees(self.layers[0], self.rotary, cfg.hidden_size)
        self.plain = _PLAIN[em]       # decoder_layer may run this model's layers

    @property
    def fast(self) -> FastModel:
        """The bf16 copies of the model (built once per model)."""
        return fast_model(self.em)

    # ------------------------------------------------------------------ capture
    def address(self, items, chunk: int = 256):
        """it.rows, it.keys of the write layer's look-ups (hashing only, no forward)."""
        em, wl = self.em, self.wl
        todo = [it for it in items if it.rows is None]
        for c0 in range(0, len(todo), chunk):
            part = todo[c0:c0 + chunk]
            x = padded_ids(part)
            layout = em.layout
            canon = em.canonical(x)
            K = em.cfg.n_head_per_ngram
            for b, it in enumerate(part):
                n = len(it.ids)
                r, m = hash_ids(layout, canon[b, :n], wl, start=0, with_mix=True)
                it.rows, it.keys = r, np.repeat(m, K, axis=1)

    @torch.no_grad()
    def capture(self, items, fast: bool = False, max_tokens: int = 4096, cand_k: int = 16):
        """Per item: the hidden state entering the write layer, its look-ups there, the later
        layers' keys/values (it.segs: the trie segments its sequence is made of), the
        unmodified model's margin and prediction at each target, and its candidate tokens
        (it.cand: targets, guards and the base model's top `cand_k` there). `fast`: through the
        bf16 copies."""
        if not items:
            return
        if not self.plain:
            return self._capture_whole(items)
        em, wl = self.em, self.wl
        x = padded_ids(items)
        addr = em.addresses(x)
        mem = em.memory({l: r for l, (r, _) in addr.items()}, {l: k for l, (_, k) in addr.items()})
        segs, leaf = sequence_trie([it.ids for it in items])
        self._run_segments(segs, x, mem, fast, max_tokens)
        rows, keys = addr[wl][0].numpy(), addr[wl][1].numpy()
        dt = FAST_DTYPE if fast else torch.float32
        hid, where = [], []
        for b, it in enumerate(items):
            n = len(it.ids)
            path = leaf[b].path()
            it.segs = path
            it.kv = None
            it.h = torch.cat([s.h for s in path])[:n].float()
            it.e = mem[wl][b, :n].reshape(n, self.H, self.d).clone()
            it.rows, it.keys = rows[b, :n].copy(), keys[b, :n].copy()
            out = torch.cat([s.out for s in path])
            pos = np.concatenate([it.tpos, it.gpos]).astype(np.int64)
            hid.append(out[torch.from_numpy(pos)])
            where.append(len(pos))
        hid = torch.cat(hid).to(dt)
        logits = self.logits(hid)
        near = self.neighbours(np.unique(np.concatenate([it.ttok for it in items])), cand_k)
        k = 0
        for it, n in zip(items, where):
            lg = logits[k:k + n]
            self._base_margins(it, lg)
            top = lg.topk(min(cand_k, lg.shape[1]), dim=1).indices.reshape(-1).numpy()
            it.cand = np.unique(np.concatenate([top, it.ttok, it.gtok] + [near[t] for t in it.ttok]).astype(np.int64))
            k += n
        for s in segs:            # only the later layers' keys/values are read from now on
            s.kv = s.kv[wl:]
            s.out = None

    def _run_segments(self, segs, x, mem, fast: bool, max_tokens: int):
        """Run every trie segment through the whole model, parents first, batched by depth."""
        em = self.em
        eng_layers = sorted(em.cfg.layer_ids)
        F = self.fast if fast else None
        layers = F.layers if fast else self.layers
        dt = FAST_DTYPE if fast else torch.float32
        hist = self.eng.conv_history
        D = em.cfg.hidden_size
        by_depth: dict[int, list[_Seg]] = {}
        for s in segs:
            by_depth.setdefault(s.depth, []).append(s)
        grabbed = {}

        def grab(layer):
            def hook(module, args):
                grabbed[layer] = args[0]
            return hook

        hooks = [em.engram[str(l)].conv.register_forward_pre_hook(grab(l)) for l in eng_layers]
        try:
            for depth in sorted(by_depth):
                level = sorted(by_depth[depth], key=lambda s: s.hi - s.lo)
                chunk: list[_Seg] = []
                for s in level + [None]:
                    if s is not None and (not chunk or (len(chunk) + 1) * (s.hi - s.lo + s.lo) <= max_tokens):
                        chunk.append(s)
                        continue
                    if chunk:
                        self._run_chunk(chunk, x, mem, layers, F, dt, eng_layers, hist, D, grabbed)
                    chunk = [s] if s is not None else []
        finally:
            for hk in hooks:
                hk.remove()

    def _run_chunk(self, chunk, x, mem, layers, F, dt, eng_layers, hist, D, grabbed):
        em, wl = self.em, self.wl
        B = len(chunk)
        S = max(s.hi - s.lo for s in chunk)
        Lp = max(s.lo for s in chunk)
        ids = torch.zeros(B, S, dtype=torch.long)
        pos = torch.zeros(B, S, dtype=torch.long)
        e = {l: torch.zeros(B, S, mem[l].shape[-1]) for l in eng_layers}
        conv_in = {l: torch.zeros(B, hist, D) for l in eng_layers}
        pmask = torch.full((B, 1, 1, Lp), NEG)
        paths = []
        for b, s in enumerate(chunk):
            n = s.hi - s.lo
            ids[b, :n] = x[s.rep, s.lo:s.hi]
            pos[b] = s.lo + torch.arange(S)
            for l in eng_layers:
                e[l][b, :n] = mem[l][s.rep, s.lo:s.hi]
                if s.parent is not None:
                    conv_in[l][b] = s.parent.conv[l]
            pmask[b, 0, 0, :s.lo] = 0.0
            paths.append(s.path()[:-1])
        causal = torch.triu(torch.full((S, S), NEG), diagonal=1)
        h = (F.embed[ids] if F is not None else self.embed(ids)).to(dt)
        cos, sin = self.rotary(h, pos)
        nkv = hd = None
        for li, layer in enumerate(layers):
            if li in e:
                if li == wl:
                    hw = h.float()
                    for b, s in enumerate(chunk):
                        s.h = hw[b, :s.hi - s.lo].clone()
                y, _ = em.engram[str(li)](h.float(), e[li], conv_in[li])
                xc = grabbed.pop(li)                  # (B, D, hist + S): the conv's input
                for b, s in enumerate(chunk):
                    n = s.hi - s.lo
                    s.conv[li] = xc[b, :, n:n + hist].transpose(0, 1).clone()
                h = (h.float() + y).to(dt)
            pk = pv = None
            if Lp:
                if nkv is None:
                    a = layer.self_attn
                    nkv, hd = a.k_proj.out_features // a.head_dim, a.head_dim
                pk = torch.zeros(B, nkv, Lp, hd, dtype=dt)
                pv = torch.zeros(B, nkv, Lp, hd, dtype=dt)
                for b, path in enumerate(paths):
                    for p in path:
                        pk[b, :, p.lo:p.hi] = p.kv[li][0]
                        pv[b, :, p.lo:p.hi] = p.kv[li][1]
            h, k, v = decoder_layer(layer, h, cos, sin, pk, pv, pmask, causal)
            for b, s in enumerate(chunk):
                n = s.hi - s.lo
                if s.kv is None:
                    s.kv = []
                s.kv.append((k[b, :, :n].clone(), v[b, :, :n].clone()))
        for b, s in enumerate(chunk):
            s.out = h[b, :s.hi - s.lo].clone()

    @torch.no_grad()
    def _capture_whole(self, items, chunk: int = 64):
        """capture through the model's own layers, each item whole (decoders decoder_layer does
        not reproduce)."""
        em, wl = self.em, self.wl
        for c0 in range(0, len(items), chunk):
            batch = items[c0:c0 + chunk]
            x = padded_ids(batch)
            T = x.shape[1]
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
            kv = PrefixKV()
            pos = torch.arange(T)[None].expand(len(batch), T)
            hidden = self.run_from_write_layer(h, e.reshape(len(batch), T, -1), pos, None, kv, None)
            rows, keys = addr[wl][0].numpy(), addr[wl][1].numpy()
            for b, it in enumerate(batch):
                n = len(it.ids)
                it.h, it.e = h[b, :n].clone(), e[b, :n].clone()
                it.rows, it.keys = rows[b, :n].copy(), keys[b, :n].copy()
                seg = _Seg(0, n, None, b, 0)
                seg.kv = [(k[b, :, :n].clone(), v[b, :, :n].clone()) for k, v in
                          (kv.store[i] for i in range(wl, len(self.layers)))]
                it.segs, it.kv = [seg], None
                pos_ = np.concatenate([it.tpos, it.gpos]).astype(np.int64)
                logits = self.logits(hidden[b, torch.from_numpy(pos_)])
                self._base_margins(it, logits)
                top = logits.topk(min(16, logits.shape[1]), dim=1).indices.reshape(-1).numpy()
                it.cand = np.unique(np.concatenate([top, it.ttok, it.gtok]).astype(np.int64))

    def _base_margins(self, it, logits):
        """The unmodified model's margin and prediction at the item's targets, and its margin at
        the guards, from `logits` at [tpos, gpos]."""
        nt = len(it.tpos)
        it.base_margin, it.base_pred = self.margins(logits[:nt], torch.from_numpy(it.ttok))
        it.base_gmargin = self.margins(logits[nt:], torch.from_numpy(it.gtok))[0] if len(it.gtok) else None

    @torch.no_grad()
    def token_logprobs(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """log p(x[:, t + 1] | x[:, :t + 1]) of the unmodified model (own tables), (B, T - 1);
        through the bf16 copies when `fast`."""
        em = self.em
        if not self.plain:
            lp = torch.log_softmax(em(x).logits.float(), dim=-1)
            return lp[:, :-1].gather(2, x[:, 1:, None])[..., 0]
        B, T = x.shape
        addr = em.addresses(x)
        mem = em.memory({l: r for l, (r, _) in addr.items()}, {l: k for l, (_, k) in addr.items()})
        F = self.fast if fast else None
        layers = F.layers if fast else self.layers
        dt = FAST_DTYPE if fast else torch.float32
        h = (F.embed[x] if fast else self.embed(x)).to(dt)
        cos, sin = self.rotary(h, torch.arange(T)[None].expand(B, T))
        causal = torch.triu(torch.full((T, T), NEG), diagonal=1)
        for li, layer in enumerate(layers):
            if li in mem:
                y, _ = em.engram[str(li)](h.float(), mem[li], None)
                h = (h.float() + y).to(dt)
            h, _, _ = decoder_layer(layer, h, cos, sin, causal=causal)
        logits = self.logits(h[:, :-1])
        return (logits.gather(2, x[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1))

    @torch.no_grad()
    def neighbours(self, tokens, k: int) -> dict[int, np.ndarray]:
        """{token: the k tokens whose output embeddings score highest on the token's own}: they
        rise with it when rows push towards it, so they are its rivals to watch."""
        if len(tokens) == 0:
            return {}
        w = self.fast.lm_weight
        t = torch.as_tensor(np.asarray(tokens, np.int64))
        top = (w[t] @ w.T).topk(k + 1, dim=1).indices.numpy()
        return {int(a): row for a, row in zip(t.tolist(), top)}

    @staticmethod
    def prefix_kv(it, li: int, s: int):
        """(k, v) of the item's positions [0, s) at the li-th layer from the write layer on."""
        ks, vs = [], []
        for seg in it.segs:
            if seg.lo >= s:
                break
            k, v = seg.kv[li]
            ks.append(k[:, :s - seg.lo])
            vs.append(v[:, :s - seg.lo])
        return torch.cat(ks, 1), torch.cat(vs, 1)

    # ------------------------------------------------------------------ the suffix forward
    def run_from_write_layer(self, h, e, pos, conv_state, kv, mask):
        """Hidden states after the last decoder layer, from the input of the write layer."""
        y, _ = self.eng(h, e, conv_state)
        h = h + y
        pe = self.rotary(h, pos)
        for layer in self.layers[self.wl:]:
            out = layer(h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                        position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits(self, hidden):
        if hidden.dtype == FAST_DTYPE:
            F = self.fast
            return torch.nn.functional.linear(F.final_norm(hidden), F.lm_weight).float()
        return self.lm_head(self.final_norm(hidden)).float()

    @staticmethod
    def margins(logits, target):
        """(margin of the target over the best other token, argmax) per row, numpy."""
        gold = logits.gather(1, target[:, None])[:, 0]
        other = logits.scatter(1, target[:, None], float("-inf")).max(1).values
        return (gold - other).detach().numpy(), logits.argmax(1).numpy()

    @torch.no_grad()
    def conv_state(self, it):
        """The write layer's short-conv state just before the item's first overridden look-up."""
        hist = self.eng.conv_history
        if it.start == 0:
            return torch.zeros(hist, self.em.cfg.hidden_size)
        lo = max(0, it.start - hist)
        # the conv state holds the last `hist` positions; earlier ones do not reach it, but the
        # gate and norm are per position, so only those positions need to run
        _, state = self.eng(it.h[None, lo:it.start], it.e[None, lo:it.start].reshape(1, it.start - lo, -1),
                            None)
        state = state[0]
        if state.shape[0] < hist:
            state = torch.cat([torch.zeros(hist - state.shape[0], state.shape[1]), state])
        return state

    def forward(self, bt, values):
        """Logits at the targets (and guards) of a batch (batching.Batches.batch), the look-ups
        that hit an entry reading `values` instead of the table. A `fast` batch runs through
        the bf16 copies and gives logits over its candidate tokens only (bt["cand"])."""
        base = bt["e"]
        idx = bt["idx"]
        sub = values[idx.clamp(min=0)]                                   # (B, S, H, d)
        e = torch.where((idx >= 0)[..., None], sub, base)
        B, S = idx.shape[:2]
        if bt.get("plain"):
            y, _ = self.eng(bt["h"], e.reshape(B, S, -1), bt["cs"])
            fast = bt["fast"]
            layers = self.fast.layers[self.wl:] if fast else self.layers[self.wl:]
            dt = FAST_DTYPE if fast else torch.float32
            h = (bt["h"] + y).to(dt)
            cos, sin = self.rotary(h, bt["pos"])
            for li, layer in enumerate(layers):
                h, _, _ = decoder_layer(layer, h, cos, sin, bt["pk"][li], bt["pv"][li], bt["pmask"],
                                        bt["causal"])
            hid = h.reshape(B * S, -1)[bt["flat"]]
            if fast:
                F = self.fast
                normed = F.final_norm(hid)
                bt["normed"] = normed.detach()       # for the full-vocabulary confirmation
                return torch.nn.functional.linear(normed, bt["cand_w"]).float()
            return self.logits(hid)
        hidden = self.run_from_write_layer(bt["h"], e.reshape(B, S, -1), bt["pos"], bt["cs"],
                                           PrefixKV(bt["prefix"]), bt["mask"])
        return self.logits(hidden.reshape(B * S, -1)[bt["flat"]])
