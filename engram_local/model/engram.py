"""Engram memory on a stock Hugging Face decoder, following DeepSeek's design as the paper uses it.

Method (engram-architecture.md §1-§5, user-as-engram-method.md §2), per Engram layer l:

  1. canonical ids     c_t = P(x_t)                               (canonical.py)
  2. N-gram addresses  z_{t,n,j} = mix_n(c_{t-n+1..t}) mod p_{n,j} + offset_{n,j}
                       for orders n = 2..N and heads j < K        (native kernel, hashing.py)
  3. memory            e_t = concat_{n,j} E_l[z_{t,n,j}]          (B, T, (N-1)*K*d_head)
  4. key, value        k_t = W_K e_t ; v_t = W_V e_t              (no bias)
  5. gate              a_t = sigmoid(ssqrt(<RMSNorm(h_t), RMSNorm(k_t)> / sqrt(D)))
                       ssqrt(g) = sign(g) * sqrt(max(|g|, 1e-6))  (DeepSeek's signed square root)
  6. short conv        y_t = SiLU(DWConv(RMSNorm(a_t v_t))) + a_t v_t
                       depthwise, causal, kernel 4, dilation N, zero-initialised
  7. residual          h_t <- h_t + y_t at the input of decoder layer l, before attention.

The backbone is never forked: `EngramModel` registers a forward pre-hook on each configured
`model.layers[l]` of a stock `LlamaForCausalLM` (or any decoder exposing `model.layers`); that
hook is the one point where the Engram term enters. With the Engram path off, or every table row
zero (then v = 0 and y = 0 exactly), logits equal the backbone's bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_local.formats.config import EngramConfig, read_engram_config  # noqa: F401 (re-exported)
from engram_local.native.hashing import NgramHashLayout, hash_ids

GATE_EPS = 1e-6   # clamp inside the signed square root (DeepSeek demo, SGLang V4.1 port)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class EngramLayer(nn.Module):
    """One layer's memory table and the gated, convolved read-out of it."""

    def __init__(self, cfg: EngramConfig, n_rows: int):
        super().__init__()
        self.cfg = cfg
        D, E = cfg.hidden_size, cfg.memory_dim
        # Zero table: v = W_V 0 = 0, so the untrained model is exactly the backbone.
        # n_rows = 0 builds a layer whose rows come from an attached `source` instead.
        self.table = nn.Parameter(torch.zeros(n_rows, cfg.head_dim))       # (rows, d_head)
        self.source = None
        self.w_k = nn.Linear(E, D, bias=False)
        self.w_v = nn.Linear(E, D, bias=False)
        self.norm_q = RMSNorm(D, cfg.norm_eps)      # on the hidden state (query)
        self.norm_k = RMSNorm(D, cfg.norm_eps)      # on the key
        self.norm_v = RMSNorm(D, cfg.norm_eps)      # on the gated value, before the conv
        self.conv = nn.Conv1d(D, D, cfg.kernel_size, groups=D, dilation=cfg.max_ngram_size, bias=False)
        nn.init.zeros_(self.conv.weight)            # zero-init: y = a*v at start (paper)

    @property
    def conv_history(self) -> int:
        """Past positions the causal conv reads: (kernel-1) * dilation."""
        return (self.cfg.kernel_size - 1) * self.cfg.max_ngram_size

    def lookup(self, rows: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (B, T, (N-1)*K) int64 -> memory e (B, T, (N-1)*K*d_head).

        With a `source` attached (a native gatherer over a memory-mapped table with user
        override layers), rows come from it and `keys` (B, T, (N-1)*K), each look-up's N-gram
        mix, select exact-key override rows; otherwise from this layer's own trainable table.
        """
        B, T, H = rows.shape
        if self.source is not None:
            k = None if keys is None else keys.reshape(-1).cpu().numpy()
            e = self.source.gather(rows.reshape(-1).cpu().numpy(), k)          # (B*T*H, d_head)
            return torch.from_numpy(e).reshape(B, T, H * self.cfg.head_dim).to(rows.device)
        return self.table[rows.reshape(-1)].reshape(B, T, H * self.cfg.head_dim)

    def forward(self, h: torch.Tensor, e: torch.Tensor, conv_state: torch.Tensor | None = None):
        """h (B, T, D) hidden state, e (B, T, E) memory -> (y (B, T, D), new conv state).

        conv_state (B, conv_history, D) holds the normalised gated values of the positions just
        before this chunk (zeros at the sequence start), so decoding token by token equals one
        full-sequence pass.
        """
        D = self.cfg.hidden_size
        e = e.to(h.dtype)
        k = self.w_k(e)                                                   # (B, T, D)
        v = self.w_v(e)                                                   # (B, T, D)
        g = (self.norm_q(h) * self.norm_k(k)).sum(-1, keepdim=True) / math.sqrt(D)   # (B, T, 1)
        g = torch.sign(g) * torch.sqrt(torch.clamp(g.abs(), min=GATE_EPS))
        v = torch.sigmoid(g) * v                                          # gated value a_t v_t
        x = self.norm_v(v)                                                # (B, T, D)
        B, T, _ = x.shape
        if conv_state is None:
            conv_state = x.new_zeros(B, self.conv_history, D)
        x = torch.cat([conv_state.to(x.dtype), x], dim=1)                # (B, hist + T, D)
        new_state = x[:, -self.conv_history:]
        c = self.conv(x.transpose(1, 2)).transpose(1, 2)                  # (B, T, D): causal, valid
        return F.silu(c) + v, new_state


class EngramModel(nn.Module):
    """A frozen stock decoder plus Engram layers entering through forward pre-hooks."""

    def __init__(self, backbone: nn.Module, cfg: EngramConfig, canonical_map: np.ndarray,
                 tables: bool = True):
        """tables=False builds empty tables: rows then come from each layer's attached `source`."""
        super().__init__()
        if cfg.write_layer not in cfg.layer_ids:
            raise ValueError(f"write_layer {cfg.write_layer} is not one of the Engram layers {cfg.layer_ids}")
        layers = decoder_layers(backbone)
        for l in cfg.layer_ids:
            if not 0 <= l < len(layers):
                raise ValueError(f"Engram layer {l} outside the backbone's {len(layers)} layers")
        self.backbone = backbone
        self.cfg = cfg
        self.layout = cfg.layout()
        self.register_buffer("canonical_map", torch.as_tensor(np.asarray(canonical_map, dtype=np.int64)),
                             persistent=False)
        self.engram = nn.ModuleDict({str(l): EngramLayer(cfg, self.layout.rows_per_layer[l] if tables else 0)
                                     for l in cfg.layer_ids})
        self.enabled = True
        # Per-forward context the hooks read: memory vectors and conv states per layer.
        self._memory: dict[int, torch.Tensor] | None = None
        self._conv_in: dict[int, torch.Tensor] = {}
        self._conv_out: dict[int, torch.Tensor] = {}
        self._hooks = [layers[l].register_forward_pre_hook(self._make_hook(l), with_kwargs=True)
                       for l in cfg.layer_ids]

    # ---------------------------------------------------------------- addressing
    def canonical(self, input_ids: torch.Tensor) -> np.ndarray:
        """Raw ids (B, T) -> canonical ids (B, T) as int64 numpy."""
        from engram_local import native

        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        return native.canonicalize(self.canonical_map.cpu().numpy(), ids.reshape(-1)).reshape(ids.shape)

    def addresses(self, input_ids: torch.Tensor, history: np.ndarray | None = None):
        """{layer: (rows, keys)}: global row ids (B, T, (N-1)*K) and each look-up's exact key.

        A look-up's key is the 64-bit mix of its N-gram order at that position (all heads of an
        order share it). history (B, <=N-1) canonical ids preceding input_ids (decode); None
        = sequence start.
        """
        canon = self.canonical(input_ids)
        K = self.cfg.n_head_per_ngram
        out = {}
        for l in self.cfg.layer_ids:
            rows, mixes = [], []
            for b in range(canon.shape[0]):
                hist = history[b] if history is not None else np.zeros(0, np.int64)
                seq = np.concatenate([hist, canon[b]])
                r, m = hash_ids(self.layout, seq, l, start=len(hist), with_mix=True)
                rows.append(r)
                mixes.append(np.repeat(m, K, axis=1))                   # (T, N-1) -> (T, (N-1)*K)
            out[l] = (torch.from_numpy(np.stack(rows)).to(input_ids.device),
                      torch.from_numpy(np.stack(mixes)).to(input_ids.device))
        return out

    def rows(self, input_ids: torch.Tensor, history: np.ndarray | None = None) -> dict[int, torch.Tensor]:
        """Global row ids per Engram layer, {layer: (B, T, (N-1)*K) int64}."""
        return {l: r for l, (r, _) in self.addresses(input_ids, history).items()}

    def memory(self, rows: dict[int, torch.Tensor], keys: dict[int, torch.Tensor] | None = None):
        """Table look-ups {layer: (B, T, E)} (own tables, or each layer's attached source)."""
        return {l: self.engram[str(l)].lookup(r, None if keys is None else keys[l]) for l, r in rows.items()}

    # ---------------------------------------------------------------- the hook point
    def _make_hook(self, layer: int):
        def hook(module, args, kwargs):
            if not self.enabled or self._memory is None:
                return None
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs["hidden_states"], None
            y, state = self.engram[str(layer)](h, self._memory[layer], self._conv_in.get(layer))
            self._conv_out[layer] = state
            h = h + y
            if rest is None:
                kwargs = dict(kwargs, hidden_states=h)
                return args, kwargs
            return (h, *rest), kwargs
        return hook

    def forward(self, input_ids: torch.Tensor, memory: dict[int, torch.Tensor] | None = None,
                conv_state: dict[int, torch.Tensor] | None = None, **backbone_kwargs):
        """Backbone forward with the Engram term added; returns the backbone's output.

        memory: precomputed {layer: (B, T, E)} look-ups (e.g. from a memory-mapped table with
        user overrides); default = this model's own tables at the hashed rows.
        """
        if self.enabled:
            if memory is None:
                addr = self.addresses(input_ids)
                memory = self.memory({l: r for l, (r, _) in addr.items()}, {l: k for l, (_, k) in addr.items()})
            self._memory, self._conv_in, self._conv_out = memory, dict(conv_state or {}), {}
        try:
            return self.backbone(input_ids=input_ids, **backbone_kwargs)
        finally:
            self._memory = None

    @property
    def last_conv_state(self) -> dict[int, torch.Tensor]:
        """Conv states after the last forward, to continue the sequence in the next one."""
        return dict(self._conv_out)

    # ---------------------------------------------------------------- parameters and files
    def engram_parameters(self):
        return self.engram.parameters()

    def engram_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.engram.state_dict().items()}

    def save_engram(self, directory: str | Path, table_dtype=torch.float16):
        """Write engram.safetensors (+ canonical map) and engram_config.json to `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.engram_state_dict()
        state = {k: (v.to(table_dtype) if k.endswith(".table") else v) for k, v in state.items()}
        state["canonical_map"] = self.canonical_map.to(torch.int32)
        tmp = directory / "engram.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(directory / "engram.safetensors")
        (directory / "engram_config.json").write_text(self.cfg.to_json() + "\n")

    def load_engram(self, directory: str | Path):
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / "engram.safetensors"))
        cmap = state.pop("canonical_map").to(torch.int64)
        if not torch.equal(cmap, self.canonical_map):
            raise ValueError(f"{directory}: canonical map does not match this backbone's tokenizer")
        state = {k: v.float() for k, v in state.items()}
        self.engram.load_state_dict(state)


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (`model.layers` on Llama/Qwen2)."""
    inner = getattr(backbone, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(backbone).__name__}: no `model.layers`; only Llama-family decoders "
                        "(LlamaForCausalLM, Qwen2ForCausalLM) are supported")
    return layers


