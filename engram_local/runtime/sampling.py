"""Next-token sampling shared by every backend: greedy, temperature, top-p, seeded.

Both backends hand the same float32 logits row to `Sampler.sample`, so with the same logits and
seed they pick the same token. `temp <= 0` is greedy (argmax, ties to the lowest id): no random
numbers are drawn and the result is deterministic.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Picks tokens from logits: greedy when temp <= 0, else softmax(logits / temp) restricted
    to the smallest set of top tokens whose probability reaches top_p."""

    def __init__(self, temp: float = 0.8, top_p: float = 0.95, seed: int | None = None):
        if not np.isfinite(temp):
            raise ValueError(f"temperature must be a finite number, got {temp}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1], got {top_p}")
        self.temp = float(temp)
        self.top_p = float(top_p)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temp <= 0.0

    def sample(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits)
        if self.greedy:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temp
        x -= x.max()
        p = np.exp(x)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = int(np.searchsorted(cum, self.top_p, side="left")) + 1
            order = order[:keep]
            q = p[order] / p[order].sum()
            return int(order[self.rng.choice(len(order), p=q)])
        return int(self.rng.choice(len(p), p=p))
