"""The model fingerprint: xxh3_64 of an Engram's hash configuration and memory tables.

One byte stream (docs/convert.md, "Fingerprint"), used both for a sidecar's tables streamed from
its file mapping (`Sidecar.compute_fingerprint`) and for an in-memory model's own tables
(`engram_local.memory.facade.model_fingerprint`). User memory files bind to this number.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import xxhash

from engram_local import constants

# Bytes per xxh3 update while fingerprinting a table (bounded, page-cache friendly).
FINGERPRINT_CHUNK = 16 << 20


@dataclass(frozen=True)
class FingerprintLayer:
    """What one Engram layer adds to the stream."""

    layer: int
    qtype: int                      # ggml type id of the table rows
    n_rows: int
    dim: int
    hash_args: Mapping[str, Any]    # "multipliers", "primes", "offsets" (NgramHashLayout.kernel_args)
    table: np.ndarray               # the table's bytes as stored, C-contiguous (any dtype)


def _i64(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}q", *(int(v) for v in values))


def fingerprint(settings: Mapping[str, Any], canonical_map, layers: Iterable[FingerprintLayer]) -> int:
    """xxh3_64 of the hash configuration (`settings`: EngramConfig fields), the canonical map and,
    for each of settings["layer_ids"] in order, one `FingerprintLayer` (`layers` may be a
    generator: tables are hashed one at a time, in bounded chunks)."""
    s = settings
    h = xxhash.xxh3_64()
    h.update(constants.FINGERPRINT_MAGIC)
    h.update(_i64(constants.FINGERPRINT_VERSION, s["max_ngram_size"], s["n_head_per_ngram"],
                  s["head_dim"], s["pad_id"], s["compressed_vocab_size"], len(s["layer_ids"])))
    cmap = np.ascontiguousarray(canonical_map, dtype="<i8")
    h.update(_i64(cmap.shape[0]))
    h.update(cmap)
    seen = []
    for entry in layers:
        seen.append(entry.layer)
        h.update(_i64(entry.layer, entry.qtype, entry.n_rows, entry.dim))
        for name in ("multipliers", "primes", "offsets"):
            h.update(np.ascontiguousarray(entry.hash_args[name], dtype="<i8"))
        table = np.ascontiguousarray(entry.table).reshape(-1).view(np.uint8)
        for start in range(0, table.nbytes, FINGERPRINT_CHUNK):
            h.update(table[start:start + FINGERPRINT_CHUNK])
    if seen != [int(layer) for layer in s["layer_ids"]]:
        raise ValueError(f"fingerprint: tables of layers {seen}, the configuration has {list(s['layer_ids'])}")
    return h.intdigest()
