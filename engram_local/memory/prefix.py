"""The frozen prefix: everything before the write layer is fixed, and so is every position before
a sequence's first overridden look-up. `FrozenPrefix.capture` computes once, per item, the hidden
state entering the write layer, the table look-ups and the attention keys/values of the later
layers; `forward` then runs only a batch's suffixes through the write layer and the layers after
it, with some look-ups replaced by trainable values, and computes logits only at target
positions.
"""

from __future__ import annotations

import torch

from engram_local.model.engram import decoder_layers


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
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


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
        self.final_norm, self.rotary = inner.norm, inner.rotary_emb
        self.lm_head = em.backbone.get_output_embeddings()

    @torch.no_grad()
    def capture(self, items, chunk: int = 64):
        """Per item: the hidden state entering the write layer, its look-ups there, the later
        layers' keys/values, and the unmodified model's margin and prediction at each target."""
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
            kv = PrefixKV()
            pos = torch.arange(T)[None].expand(len(batch), T)
            hidden = self.run_from_write_layer(h, e.reshape(len(batch), T, -1), pos, None, kv, None)
            rows, keys = addr[wl][0].numpy(), addr[wl][1].numpy()
            for b, it in enumerate(batch):
                n = len(it.ids)
                it.h, it.e = h[b, :n].clone(), e[b, :n].clone()
                it.rows, it.keys = rows[b, :n].copy(), keys[b, :n].copy()
                it.kv = [(k[b, :, :n].clone(), v[b, :, :n].clone()) for k, v in
                         (kv.store[i] for i in range(wl, len(self.layers)))]
                logits = self.logits(hidden[b, it.tpos])
                it.base_margin, it.base_pred = self.margins(logits, torch.from_numpy(it.ttok))

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
        _, state = self.eng(it.h[None, :it.start], it.e[None, :it.start].reshape(1, it.start, -1))
        return state[0]

    def forward(self, bt, values):
        """Logits at the targets (and guards) of a batch (batching.Batches.batch), the look-ups
        that hit an entry reading `values` instead of the table."""
        base = bt["e"]
        idx = bt["idx"]
        sub = values[idx.clamp(min=0)]                                   # (B, S, H, d)
        e = torch.where((idx >= 0)[..., None], sub, base)
        B, S = idx.shape[:2]
        hidden = self.run_from_write_layer(bt["h"], e.reshape(B, S, -1), bt["pos"], bt["cs"],
                                           PrefixKV(bt["prefix"]), bt["mask"])
        return self.logits(hidden.reshape(B * S, -1)[bt["flat"]])
