"""N-gram hash layout of an Engram model (DeepSeek `NgramHashMapping`, engram-architecture.md §2-§4).

The layout is pure arithmetic on the configuration: per-layer odd multipliers drawn with numpy's
PCG64 from `seed + 10007 * layer_id`, and one global sequence of distinct primes (walking
layer -> order -> head) that size each head's table. Hashing itself runs in the native kernel
(`engram_local.native.hash_layer`); this module only prepares its constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# DeepSeek's seed stride between layers (`PRIME_1` in engram_demo_v1.py).
LAYER_SEED_STRIDE = 10007


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (far past any table size)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, seen: set[int]) -> int:
    """Smallest prime > start not in `seen` (DeepSeek's `find_next_prime`)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in seen):
        candidate += 1
    return candidate


def layer_multipliers(compressed_vocab_size: int, max_ngram_size: int, layer_id: int,
                      seed: int = 0) -> list[int]:
    """Odd int64 multipliers, one per look-back position; their bound keeps token*m < 2**63."""
    half_bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    rng = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer_id)
    r = rng.integers(0, half_bound, size=max_ngram_size, dtype=np.int64)
    return [int(v) for v in r * 2 + 1]


@dataclass
class NgramHashLayout:
    """Hash constants of every Engram layer.

    Row ids are global within a layer's table: head j of order n owns rows
    [offsets[layer][n-2][j], offsets[layer][n-2][j] + primes[layer][n-2][j]).
    """

    compressed_vocab_size: int        # canonical vocabulary size (sets the multiplier bound)
    max_ngram_size: int               # N: orders 2..N are hashed
    n_head_per_ngram: int             # K: heads (distinct prime tables) per order
    vocab_size_per_ngram: int | list[int]  # per-order target table size (primes start above it)
    layer_ids: list[int]              # decoder layers carrying an Engram, in layout order
    pad_id: int                       # canonical id for positions before the sequence start
    seed: int = 0                     # DeepSeek seed; layer seed = seed + 10007 * layer_id
    multipliers: dict[int, list[int]] = field(init=False)
    primes: dict[int, list[list[int]]] = field(init=False)
    offsets: dict[int, list[list[int]]] = field(init=False)
    rows_per_layer: dict[int, int] = field(init=False)

    def __post_init__(self):
        n_orders = self.max_ngram_size - 1
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if self.n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        if self.compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1, got {self.compressed_vocab_size}")
        if not 0 <= self.pad_id < self.compressed_vocab_size:
            raise ValueError(f"pad_id {self.pad_id} outside [0, {self.compressed_vocab_size})")
        sizes = self.vocab_size_per_ngram
        sizes = [int(sizes)] * n_orders if np.isscalar(sizes) else [int(s) for s in sizes]
        if len(sizes) != n_orders:
            raise ValueError(f"vocab_size_per_ngram needs {n_orders} entries (orders 2..{self.max_ngram_size}), "
                             f"got {len(sizes)}")
        if min(sizes) < 2:
            raise ValueError(f"vocab_size_per_ngram entries must be >= 2, got {sizes}")
        if len(set(self.layer_ids)) != len(self.layer_ids) or not self.layer_ids:
            raise ValueError(f"layer_ids must be distinct and non-empty, got {self.layer_ids}")
        self.vocab_size_per_ngram = sizes
        self.layer_ids = [int(i) for i in self.layer_ids]

        self.multipliers, self.primes, self.offsets, self.rows_per_layer = {}, {}, {}, {}
        seen: set[int] = set()
        for layer in self.layer_ids:
            self.multipliers[layer] = layer_multipliers(self.compressed_vocab_size,
                                                        self.max_ngram_size, layer, self.seed)
            layer_primes = []
            for size in sizes:            # each order restarts its search at its target size
                start, heads = size - 1, []
                for _ in range(self.n_head_per_ngram):
                    p = next_prime(start, seen)
                    seen.add(p)
                    heads.append(p)
                    start = p
                layer_primes.append(heads)
            flat = np.array(layer_primes, dtype=np.int64).reshape(-1)
            offs = np.concatenate([[0], np.cumsum(flat)[:-1]]).reshape(n_orders, -1)
            self.primes[layer] = layer_primes
            self.offsets[layer] = offs.tolist()
            self.rows_per_layer[layer] = int(flat.sum())

    @property
    def n_columns(self) -> int:
        """Row ids per position per layer: (N-1)*K."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def kernel_args(self, layer_id: int) -> dict:
        """Keyword arguments of `native.hash_layer` for one layer."""
        if layer_id not in self.multipliers:
            raise KeyError(f"layer {layer_id} has no Engram (layers: {self.layer_ids})")
        return dict(multipliers=np.asarray(self.multipliers[layer_id], dtype=np.int64),
                    primes=np.asarray(self.primes[layer_id], dtype=np.int64).reshape(-1),
                    offsets=np.asarray(self.offsets[layer_id], dtype=np.int64).reshape(-1),
                    vocab=self.compressed_vocab_size, pad_id=self.pad_id,
                    max_ngram=self.max_ngram_size, n_head=self.n_head_per_ngram)


def hash_ids(layout: NgramHashLayout, canonical_ids, layer_id: int, *, start: int = 0,
             with_mix: bool = False):
    """Global row ids `[T, (N-1)*K]` (int64) of a 1-D sequence of canonical ids at one layer.

    `start` > 0 treats ids[:start] as history (decode); with `with_mix` also returns the
    per-order 64-bit mixes `[T, N-1]`, the exact keys of override rows.
    """
    from engram_local.native.kernel import hash_layer

    return hash_layer(canonical_ids, start=start, with_mix=with_mix,
                      **layout.kernel_args(layer_id))
