"""Bits per byte of a text under an Engram model (the `perplexity` command's library side)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engram_local.text.tokens import document_start_id, encode


@dataclass
class PerplexityResult:
    bpb: float             # bits per UTF-8 byte of the text
    nll_nats: float        # total negative log-likelihood
    tokens: int            # tokens scored
    bytes: int             # UTF-8 bytes of the text
    logprobs: np.ndarray   # float32 [tokens]: log p(actual next token), natural log

    def as_dict(self) -> dict:
        return {"bpb": self.bpb, "bits_per_byte": self.bpb, "tokens": self.tokens,
                "bytes": self.bytes, "nll_nats": self.nll_nats,
                "perplexity": math.exp(self.nll_nats / max(self.tokens, 1))}


@torch.no_grad()
def token_logprobs(model, ids: list[int], start_id: int, window: int = 1024, memory_fn=None,
                   progress=None) -> np.ndarray:
    """log p(ids[i] | start, ids[:i]) for every i, in independent windows of `window` tokens.

    Each window restarts from the document-start token `start_id` (text.tokens.document_start_id:
    SmolLM2's <|endoftext|>, so the first real token is scored too), so a window is a fresh
    sequence (Engram hashing and the conv state included). memory_fn(input_ids) -> {layer:
    (1, T, E)} supplies the table look-ups (e.g. a memory-mapped table with user overrides);
    None = model tables.
    """
    out = []
    for s in range(0, len(ids), window - 1):
        chunk = ids[s:s + window - 1]
        x = torch.tensor([[start_id] + chunk], dtype=torch.long)
        memory = memory_fn(x) if memory_fn is not None else None
        logits = model(x, memory=memory).logits[0, :-1].float()                # (T, vocab)
        lp = torch.log_softmax(logits, dim=-1)
        out.append(lp.gather(1, x[0, 1:, None])[:, 0].numpy())
        if progress is not None:
            progress.update(len(chunk))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def bits_per_byte(model, tokenizer, text: str, window: int = 1024, memory_fn=None,
                  show_progress: bool = False) -> PerplexityResult:
    if not text:
        raise ValueError("the text is empty: nothing to score")
    ids = encode(tokenizer, text)
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids), unit="tok", desc="scoring", leave=False)
    try:
        lp = token_logprobs(model, ids, document_start_id(tokenizer), window=window, memory_fn=memory_fn,
                            progress=bar)
    finally:
        if bar is not None:
            bar.close()
    n_bytes = len(text.encode("utf-8"))
    nll = float(-lp.astype(np.float64).sum())
    return PerplexityResult(bpb=nll / math.log(2) / n_bytes, nll_nats=nll, tokens=len(ids),
                            bytes=n_bytes, logprobs=lp)
