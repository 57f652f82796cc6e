"""The Engram's settings: `engram_config.json` of a checkpoint and the `engram.*` keys of a sidecar
hold the same fields. No torch here: readers of files need the settings without the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engram_local.native.hashing import NgramHashLayout


@dataclass
class EngramConfig:
    hidden_size: int                      # backbone width D the Engram writes into
    compressed_vocab_size: int            # canonical vocabulary size (from the canonical map)
    pad_id: int                           # canonical id of pre-sequence positions
    layer_ids: list[int] = field(default_factory=lambda: [1, 16])  # decoder layers with an Engram
    write_layer: int = 16                 # layer user facts are written into (the later one)
    max_ngram_size: int = 3               # N: orders 2..N
    n_head_per_ngram: int = 8             # K: hash heads per order
    head_dim: int = 32                    # d_head: width of one table row
    vocab_size_per_ngram: list[int] = field(default_factory=lambda: [10000, 10000])  # per-order prime target
    seed: int = 0                         # hash seed (multipliers from seed + 10007 * layer)
    kernel_size: int = 4                  # short-conv taps
    norm_eps: float = 1e-5                # RMSNorm epsilon inside the Engram

    @property
    def n_columns(self) -> int:
        """Table rows read per position per layer: (N-1)*K."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of the concatenated memory vector e_t: (N-1)*K*d_head."""
        return self.n_columns * self.head_dim

    def layout(self) -> NgramHashLayout:
        return NgramHashLayout(self.compressed_vocab_size, self.max_ngram_size, self.n_head_per_ngram,
                               list(self.vocab_size_per_ngram), list(self.layer_ids), self.pad_id,
                               self.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "EngramConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def read_engram_config(directory: str | Path) -> EngramConfig:
    path = Path(directory) / "engram_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no engram_config.json (not an Engram checkpoint)")
    return EngramConfig.from_dict(json.loads(path.read_text()))

