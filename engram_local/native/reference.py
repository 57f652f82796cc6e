"""Plain numpy reference implementations of the native kernel, used only by the tests.

Each function is written to be obviously right rather than fast: the tests require the
kernel (engram_local.native) to agree with these bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import gguf
import numpy as np

from engram_local import constants


def canonicalize_ref(id_map: np.ndarray, raw_ids) -> np.ndarray:
    """DeepSeek `CompressedTokenizer` look-up: `lookup[raw_id]` (valid raw ids only)."""
    return np.asarray(id_map, dtype=np.int64)[np.asarray(raw_ids, dtype=np.int64)]


def hash_layer_ref(ids, multipliers, primes, offsets, pad_id: int, max_ngram: int, n_head: int,
                   start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows [T, (N-1)*K], mixes [T, N-1]) for positions start.. of a 1-D id sequence.

    A transcription of DeepSeek's `NgramHashMapping._get_ngram_hashes` (engram_demo_v1.py) for
    a batch of one, plus the per-head offsets that `MultiHeadEmbedding` adds:
    shifted views padded with pad_id, a rolling XOR of token * multiplier in int64, `mix % prime`
    per head, stacked order-major then head.
    """
    x = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    T = x.shape[1]
    multipliers = np.asarray(multipliers, dtype=np.int64)
    primes = np.asarray(primes, dtype=np.int64).reshape(max_ngram - 1, n_head)

    def shift_k(k: int) -> np.ndarray:
        if k == 0:
            return x
        return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :T]

    base_shifts = [shift_k(k) for k in range(max_ngram)]
    all_hashes, all_mixes = [], []
    for n in range(2, max_ngram + 1):
        tokens = base_shifts[:n]
        mix = tokens[0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, tokens[k] * multipliers[k])
        all_mixes.append(mix)
        for j in range(n_head):
            mod = int(primes[n - 2, j])
            all_hashes.append((mix % mod).astype(np.int64, copy=False))
    rows = np.stack(all_hashes, axis=2)[0] + np.asarray(offsets, dtype=np.int64)
    mixes = np.stack(all_mixes, axis=2)[0]
    return rows[start:], mixes[start:]


def dequantize_ref(u8_rows: np.ndarray, qtype: int, dim: int) -> np.ndarray:
    """float32 [n, dim] of rows stored as `qtype` bytes: simply gguf.quants.dequantize."""
    raw = np.ascontiguousarray(u8_rows).view(np.uint8).reshape(-1)
    row_bytes = _row_bytes(qtype, dim)
    n_rows = raw.size // row_bytes
    with np.errstate(all="ignore"):  # inf * 0 in a scaled block is NaN, as in the kernel
        out = gguf.quants.dequantize(raw.reshape(n_rows, row_bytes), gguf.GGMLQuantizationType(qtype))
    return np.asarray(out, dtype=np.float32).reshape(n_rows, dim)


def _row_bytes(qtype: int, dim: int) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return dim // block * type_size


def gather_ref(table_f32: np.ndarray, overrides: Sequence[tuple], rows, keys=None
               ) -> tuple[np.ndarray, int]:
    """(float32 rows.shape + (dim,), number of look-ups served by an override).

    `overrides` is a sequence of (rows, keys or None, values) in any order within a set. Sets
    are searched from the last to the first; in a set an entry whose key equals the look-up's
    key wins, else an entry with key -1; a row no set serves comes from `table_f32`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    look_keys = (np.full(rows.shape, constants.ANY_KEY, dtype=np.int64) if keys is None
                 else np.asarray(keys, dtype=np.int64))
    out = np.empty(rows.shape + (table_f32.shape[1],), dtype=np.float32)
    hits = 0
    for index in np.ndindex(rows.shape):
        row, key = int(rows[index]), int(look_keys[index])
        out[index] = table_f32[row]
        for ov_rows, ov_keys, ov_values in reversed(list(overrides)):
            match = None
            for i in range(len(ov_rows)):
                if int(ov_rows[i]) != row:
                    continue
                entry_key = constants.ANY_KEY if ov_keys is None else int(ov_keys[i])
                if key != constants.ANY_KEY and entry_key == key:
                    match = i  # an exact key wins outright
                    break
                if entry_key == constants.ANY_KEY and match is None:
                    match = i
            if match is not None:
                out[index] = np.asarray(ov_values[match]).astype(np.float32)
                hits += 1
                break
    return out, hits


# --------------------------------------------------------------------------- test data

def make_hash_constants(seed: int, vocab: int, max_ngram: int, n_head: int,
                        head_size: int = 1000) -> dict:
    """DeepSeek-style constants of one layer, as keyword arguments of `native.hash_layer`.

    Odd multipliers below DeepSeek's bound (2 * ((INT64_MAX // vocab) // 2)), so token *
    multiplier < 2**63; distinct primes above `head_size`, one per head of each order; offsets
    = exclusive prefix sums of the primes (engram-architecture.md §3-§4).
    """
    half_bound = max(1, (np.iinfo(np.int64).max // vocab) // 2)
    rng = np.random.default_rng(seed)
    multipliers = rng.integers(0, half_bound, size=max_ngram, dtype=np.int64) * 2 + 1
    primes, candidate = [], head_size
    while len(primes) < (max_ngram - 1) * n_head:
        candidate += 1
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            primes.append(candidate)
    primes = np.array(primes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(primes)[:-1]]).astype(np.int64)
    return dict(multipliers=multipliers, primes=primes, offsets=offsets, vocab=vocab,
                pad_id=int(rng.integers(0, vocab)), max_ngram=max_ngram, n_head=n_head)


def random_table_bytes(rng: np.random.Generator, qtype: int, n_rows: int, dim: int) -> np.ndarray:
    """uint8 [n_rows, row_bytes] of arbitrary bits, so special values occur: subnormals,
    infinities and NaN payloads among F32/F16/BF16 values and among Q8_0/Q4_0 f16 scales."""
    return rng.integers(0, 256, size=(n_rows, _row_bytes(qtype, dim)), dtype=np.uint8)
