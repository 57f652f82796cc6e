"""The torch backend: the same Engram model in PyTorch (CPU or CUDA), generated incrementally.

`loader.load_model` builds the EngramModel (stock transformers backbone + Engram layers reading
the memory-mapped table under the user's override stack). The backbone is the GGUF the llama.cpp
backend decodes for the same setting (ModelDir.backbone_gguf: backbone-skill.gguf, the skill
adapter folded in, with the skill on; backbone.gguf with it off), dequantized to fp32, so both
backends run the same weights; only an explicit extra adapter (Session(adapter=...)) is merged
here in fp32. Generation keeps
three pieces of per-sequence state, mirroring the llama.cpp backend:
  * the backbone's KV cache (transformers DynamicCache; `crop` rolls it back),
  * the canonical ids of the sequence (the N-gram hash's history),
  * per Engram layer, the normalised gated value x of every position (read from the layer's
    `norm_v` output): the short conv's history, so a roll-back to any position is exact.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from engram_local import native
from engram_local.runtime.backend import Backend
from engram_local.text import tokens as token_rules


class TorchBackend(Backend):
    """One sequence on an EngramModel; same interface as llama_backend.LlamaCppBackend."""

    name = "torch"

    def __init__(self, model=None, *, overrides=None, skill: bool = True, device: str = "cpu",
                 n_ctx: int = 2048, n_threads: int | None = None, log=None, loaded=None):
        import torch

        from engram_local.runtime.loader import load_model

        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        if n_threads:
            torch.set_num_threads(int(n_threads))
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {device!r}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: this torch has no CUDA device "
                               f"(torch {torch.__version__}, cuda available: False)")
        em, tok = (loaded if loaded is not None else load_model(model, overrides, adapter=skill)[:2])
        self.device = torch.device(device)
        em.to(self.device)
        # Hashing and table look-ups run on the CPU (native kernel); keep the map there.
        em.canonical_map = em.canonical_map.cpu()
        em.eval()
        self.em, self.tok = em, tok
        self.n_ctx = int(n_ctx)
        self.n_vocab = int(em.backbone.config.vocab_size)
        self.n_batch = 512
        self.chat_template = getattr(tok, "chat_template", None)
        self.add_bos = token_rules.adds_bos(tok)
        self.eog = token_rules.eog_ids(tok)
        cfg = em.cfg
        self._n1 = cfg.max_ngram_size - 1
        self._layers = list(cfg.layer_ids)
        self._hist = {l: em.engram[str(l)].conv_history for l in self._layers}
        self._x = {l: torch.zeros(self.n_ctx, cfg.hidden_size, device=self.device) for l in self._layers}
        self._captured = {}
        self._hooks = [em.engram[str(l)].norm_v.register_forward_hook(self._capture(l)) for l in self._layers]
        self.tokens: list[int] = []
        self._canon: list[int] = []
        self._cache = None

    def _capture(self, layer: int):
        def hook(module, args, output):
            self._captured[layer] = output.detach()
        return hook

    # ---------------------------------------------------------------- text
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return token_rules.tokenize(self.tok, text, self.add_bos if add_bos is None else add_bos)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def is_eog(self, token: int) -> bool:
        return int(token) in self.eog

    # ---------------------------------------------------------------- the sequence (Backend hooks)
    def _decode(self, chunk: list[int], all_logits: bool, last: bool) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        em, dev = self.em, self.device
        p0, T = len(self.tokens), len(chunk)
        ids = torch.tensor([chunk], dtype=torch.long)
        history = np.asarray([self._canon[-self._n1:]], dtype=np.int64) if p0 else None
        addr = em.addresses(ids, history)
        memory = em.memory({l: r for l, (r, _) in addr.items()}, {l: k for l, (_, k) in addr.items()})
        memory = {l: m.to(dev) for l, m in memory.items()}
        conv_state = {}
        for l in self._layers:
            hist = self._hist[l]
            state = torch.zeros(1, hist, em.cfg.hidden_size, device=dev)
            n = min(hist, p0)
            if n:
                state[0, hist - n:] = self._x[l][p0 - n:p0]
            conv_state[l] = state
        if self._cache is None:
            self._cache = DynamicCache()
        self._captured.clear()
        with torch.inference_mode():
            out = em(ids.to(dev), memory=memory, conv_state=conv_state, past_key_values=self._cache,
                     use_cache=True, logits_to_keep=0 if all_logits else 1)
        self._cache = out.past_key_values
        for l in self._layers:
            x = self._captured.get(l)
            self._x[l][p0:p0 + T] = x[0] if x is not None else 0.0   # Engram off: no history
        canon = native.canonicalize(em.canonical_map.numpy(), np.asarray(chunk, dtype=np.int64))
        self._canon.extend(int(c) for c in canon)
        return out.logits[0].float().cpu().numpy()

    def _rollback(self, n: int) -> bool:
        if self._cache is None:
            return False
        self._cache.crop(n - len(self.tokens))     # negative: remove that many (old and new API)
        del self._canon[n:]
        return True

    def _clear(self) -> None:
        self._cache = None
        self._canon = []

    def set_overrides(self, sidecar, overrides) -> None:
        from engram_local.runtime.loader import attach_tables

        attach_tables(self.em, sidecar, overrides)
        self.reset()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
