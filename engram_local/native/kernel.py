"""The kernel of native/engram.c: sizes, canonical ids, N-gram hashing, tables, override sets
and the gatherer. numpy arrays in, numpy arrays out.

Threads: kernel calls release the GIL and all per-call state lives in locals, so one Table,
OverrideSet or Gatherer can serve several threads at once.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from engram_local import constants
from engram_local._engram_native import ffi, lib
from engram_local.native.checks import (BLOCK_SIZES, INT32_MAX, INT64_MAX, OVERRIDE_VALUE_DTYPES, QTYPE_NAMES,
                                        TABLE_QTYPES, fail, first_outside, i64_ptr, int64_array, int_param,
                                        qtype_param, readonly)


# --------------------------------------------------------------------------- sizes

def row_bytes(qtype: int, dim: int) -> int:
    """Bytes of one row of `dim` values stored as `qtype` (a ggml type id)."""
    qtype = qtype_param("qtype", qtype, TABLE_QTYPES)
    dim = int_param("dim", dim, lo=1, hi=INT64_MAX)
    block = BLOCK_SIZES.get(qtype, 1)
    if dim % block:
        raise ValueError(f"dim {dim} is not a multiple of {QTYPE_NAMES[qtype]}'s block of {block} values")
    nbytes = lib.ek_row_bytes(qtype, dim)
    if nbytes == 0:
        raise ValueError(f"a row of {dim} {QTYPE_NAMES[qtype]} values exceeds the int64 byte range")
    return int(nbytes)


# --------------------------------------------------------------------------- canonical ids

def canonicalize(id_map: np.ndarray, raw_ids) -> np.ndarray:
    """Canonical ids `id_map[raw_ids]` (int64, 1-D); every raw id must index `id_map`."""
    id_map = int64_array("id_map", id_map, ndim=1)
    raw = int64_array("raw_ids", raw_ids, ndim=1)
    out = np.empty(raw.shape[0], dtype=np.int64)
    status = lib.ek_canonicalize(i64_ptr(id_map), id_map.shape[0], i64_ptr(raw), raw.shape[0],
                                 i64_ptr(out, writable=True), out.shape[0])
    if status:
        fail(status, "canonicalize", first_outside("raw_ids", raw, 0, id_map.shape[0]))
    return out


# --------------------------------------------------------------------------- N-gram hashing

def hash_layer(ids, *, multipliers, primes, offsets, vocab: int, pad_id: int, max_ngram: int,
               n_head: int, start: int = 0, with_mix: bool = False):
    """Global table rows of positions [start, len(ids)) of canonical `ids` at one Engram layer.

    Returns rows int64 `[len(ids) - start, (max_ngram-1) * n_head]` (order-major, then head:
    DeepSeek's `_get_ngram_hashes` plus the per-head offsets) and, with `with_mix`, also the
    per-order 64-bit mixes int64 `[len(ids) - start, max_ngram - 1]`. ids[:start] are history
    (positions before 0 read `pad_id`). Constants as in native/engram.h `ek_hash_layer`.
    """
    N = int_param("max_ngram", max_ngram, lo=2, hi=INT32_MAX)
    K = int_param("n_head", n_head, lo=1, hi=INT32_MAX)
    vocab = int_param("vocab", vocab, lo=1, hi=INT64_MAX)
    pad_id = int_param("pad_id", pad_id, lo=0, hi=vocab - 1)
    ids = int64_array("ids", ids, ndim=1)
    n = ids.shape[0]
    start = int_param("start", start, lo=0, hi=n)
    n_cols = (N - 1) * K
    mult = int64_array("multipliers", multipliers, ndim=1)
    primes = int64_array("primes", primes, ndim=1)
    offsets = int64_array("offsets", offsets, ndim=1)
    for name, arr, want in (("multipliers", mult, N), ("primes", primes, n_cols),
                            ("offsets", offsets, n_cols)):
        if arr.shape[0] != want:
            raise ValueError(f"{name} needs {want} entries for max_ngram={N}, n_head={K}, "
                             f"got {arr.shape[0]}")

    mult_p, primes_p, offsets_p = i64_ptr(mult), i64_ptr(primes), i64_ptr(offsets)
    layer = ffi.new("ek_hash_layer *", {
        "max_ngram": N, "n_head": K, "vocab": vocab, "pad_id": pad_id,
        "multipliers": mult_p, "primes": primes_p, "offsets": offsets_p})
    rows = np.empty((n - start, n_cols), dtype=np.int64)
    mix = np.empty((n - start, N - 1), dtype=np.int64) if with_mix else None
    status = lib.ek_hash(layer, i64_ptr(ids), n, start, i64_ptr(rows, writable=True), rows.size,
                         i64_ptr(mix, writable=True) if with_mix else ffi.NULL,
                         mix.size if with_mix else 0)
    if status:
        fail(status, "hash_layer", _hash_problem(ids, vocab, primes, offsets))
    return (rows, mix) if with_mix else rows


def _hash_problem(ids: np.ndarray, vocab: int, primes: np.ndarray, offsets: np.ndarray):
    """Why ek_hash refused arguments that passed the Python checks (error path only)."""
    if np.any(primes < 1):
        return f"primes must be >= 1, got {int(primes.min())}"
    if np.any(offsets < 0):
        return f"offsets must be >= 0, got {int(offsets.min())}"
    if any(int(o) + int(p) - 1 > INT64_MAX for o, p in zip(offsets, primes)):
        return "offsets + primes exceed the int64 range of row ids"
    return first_outside("ids", ids, 0, vocab)


# --------------------------------------------------------------------------- tables

class Table:
    """A read-only table of `n_rows` rows of `dim` values of one ggml type, zero copy.

    `data` holds the rows back to back: a uint8 byte buffer (e.g. a GGUFReader tensor's
    `.data`, an np.memmap) or, for F32 / F16, a float32 / float16 array. It must be
    C-contiguous (a table is never copied) and is kept alive by the Table.
    """

    def __init__(self, data: np.ndarray, qtype: int, n_rows: int, dim: int):
        qtype = qtype_param("qtype", qtype, TABLE_QTYPES)
        n_rows = int_param("n_rows", n_rows, lo=0, hi=INT64_MAX)
        nbytes_row = row_bytes(qtype, dim)
        dim = int(dim)
        if not isinstance(data, np.ndarray):
            raise TypeError(f"table data must be a numpy array, got {type(data).__name__}")
        typed = {np.dtype(np.float32): constants.QTYPE_F32, np.dtype(np.float16): constants.QTYPE_F16}
        if data.dtype != np.uint8 and typed.get(data.dtype) != qtype:
            raise TypeError(f"table data of dtype {data.dtype} cannot hold {QTYPE_NAMES[qtype]} "
                            f"rows; pass its bytes as a uint8 array")
        if not data.flags.c_contiguous:
            raise ValueError("table data must be C-contiguous (tables are never copied)")
        raw = data.reshape(-1).view(np.uint8)
        need = n_rows * nbytes_row
        if raw.nbytes < need:
            raise ValueError(f"table data holds {raw.nbytes} bytes; {n_rows} rows of {dim} "
                             f"{QTYPE_NAMES[qtype]} values need {need}")
        self.qtype, self.n_rows, self.dim, self.row_bytes = qtype, n_rows, dim, nbytes_row
        self.data = readonly(raw)
        self._buf = ffi.from_buffer("uint8_t[]", raw)
        self._c = ffi.new("ek_table *", {"data": self._buf, "nbytes": raw.nbytes, "qtype": qtype,
                                         "n_rows": n_rows, "dim": dim})

    def __repr__(self) -> str:
        return f"Table({QTYPE_NAMES[self.qtype]}, n_rows={self.n_rows}, dim={self.dim})"


# --------------------------------------------------------------------------- overrides

class OverrideSet:
    """Replacement rows for some rows of one table (native/engram.h `ek_override`).

    rows   int64 [n], strictly ascending by (row, key) - use `OverrideSet.build` to sort;
    values float16 or float32 [n, dim];
    keys   int64 [n] or None: an entry with key -1 (or keys None) applies to every look-up
           of its row, one with key >= 0 only to a look-up carrying exactly that key.
    Arrays already int64 / C-contiguous are used as they are (memory-mapped views stay views).
    """

    def __init__(self, rows, values, keys=None):
        rows = int64_array("rows", rows, ndim=1)
        if not isinstance(values, np.ndarray):
            raise TypeError(f"values must be a numpy array, got {type(values).__name__}")
        if values.dtype not in OVERRIDE_VALUE_DTYPES:
            raise TypeError(f"values must be float16 or float32, got dtype {values.dtype}")
        if values.ndim != 2 or values.shape[1] < 1:
            raise ValueError(f"values must be 2-D [n, dim] with dim >= 1, got shape {values.shape}")
        if values.shape[0] != rows.shape[0]:
            raise ValueError(f"values has {values.shape[0]} rows but rows has {rows.shape[0]} entries")
        values = np.ascontiguousarray(values)
        if keys is not None:
            keys = int64_array("keys", keys, ndim=1)
            if keys.shape[0] != rows.shape[0]:
                raise ValueError(f"keys has {keys.shape[0]} entries but rows has {rows.shape[0]}")
        self.rows, self.values = readonly(rows), readonly(values)
        self.keys = None if keys is None else readonly(keys)
        self.dim = int(values.shape[1])
        self.qtype = OVERRIDE_VALUE_DTYPES[values.dtype]
        self._rows_p = i64_ptr(rows)
        self._keys_p = i64_ptr(keys) if keys is not None else ffi.NULL
        self._values_p = ffi.from_buffer("uint8_t[]", values)
        self._c = ffi.new("ek_override *", {
            "rows": self._rows_p, "keys": self._keys_p, "values": self._values_p,
            "nbytes": values.nbytes, "qtype": self.qtype, "n": rows.shape[0]})
        # Ordering and key checks need no table: validate against the widest one.
        status = lib.ek_override_check(self._c, INT64_MAX, self.dim)
        if status:
            fail(status, "OverrideSet", self._problem(INT64_MAX))
        # O(1) row look-ups: an open-addressing index at load factor <= 1/2 (16 B per entry).
        if rows.shape[0]:
            cap = 1 << max(1, int(2 * rows.shape[0] - 1).bit_length())
            self._index = np.empty(cap, dtype=np.int64)
            status = lib.ek_override_index(self._c, i64_ptr(self._index, writable=True), cap)
            if status:
                fail(status, "OverrideSet index")
            self._index_p = i64_ptr(self._index)
            self._c.index, self._c.index_cap = self._index_p, cap

    @classmethod
    def build(cls, rows, values, keys=None) -> "OverrideSet":
        """An OverrideSet from entries in any order (sorted here by (row, key))."""
        rows = int64_array("rows", rows, ndim=1)
        sort_keys = (np.full(rows.shape, constants.ANY_KEY, dtype=np.int64) if keys is None
                     else int64_array("keys", keys, ndim=1))
        if sort_keys.shape != rows.shape:
            raise ValueError(f"keys has {sort_keys.shape[0]} entries but rows has {rows.shape[0]}")
        if not isinstance(values, np.ndarray):
            raise TypeError(f"values must be a numpy array, got {type(values).__name__}")
        if values.ndim != 2 or values.shape[0] != rows.shape[0]:
            raise ValueError(f"values must be [n, dim] with n = {rows.shape[0]}, got shape {values.shape}")
        order = np.lexsort((sort_keys, rows))
        rows, sort_keys = rows[order], sort_keys[order]
        dup = np.flatnonzero((rows[1:] == rows[:-1]) & (sort_keys[1:] == sort_keys[:-1]))
        if dup.size:
            raise ValueError(f"duplicate override entry (row {int(rows[dup[0]])}, "
                             f"key {int(sort_keys[dup[0]])})")
        return cls(rows, values[order], None if keys is None else sort_keys)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return (f"OverrideSet(n={len(self)}, dim={self.dim}, {QTYPE_NAMES[self.qtype]}, "
                f"keyed={self.keys is not None})")

    def _problem(self, n_rows: int) -> str | None:
        """Which entry ek_override_check refused for a table of n_rows (error path only)."""
        where = first_outside("rows", self.rows, 0, n_rows)
        if where:
            return where
        keys = (self.keys if self.keys is not None
                else np.full(self.rows.shape, constants.ANY_KEY, dtype=np.int64))
        if keys.size and int(keys.min()) < constants.ANY_KEY:
            i = int(np.argmax(keys < constants.ANY_KEY))
            return f"keys[{i}] = {int(keys[i])}; keys must be >= -1 (-1 = any look-up)"
        rows = self.rows
        bad = np.flatnonzero((rows[1:] < rows[:-1]) | ((rows[1:] == rows[:-1]) & (keys[1:] <= keys[:-1])))
        if bad.size:
            i = int(bad[0]) + 1
            return (f"entry {i} (row {int(rows[i])}, key {int(keys[i])}) does not follow entry {i - 1} "
                    f"(row {int(rows[i - 1])}, key {int(keys[i - 1])}): entries must be strictly "
                    f"ascending by (row, key); OverrideSet.build sorts them")
        return None


# --------------------------------------------------------------------------- gather

def override_stack(table: Table, overrides: Iterable[OverrideSet]):
    """(sets, C array of their ek_override) of an override stack (later sets win), each set
    validated against `table` (row range, row width)."""
    sets = tuple(overrides)
    c_sets = ffi.new("ek_override[]", max(1, len(sets)))
    for i, ov in enumerate(sets):
        if not isinstance(ov, OverrideSet):
            raise TypeError(f"overrides[{i}] must be an OverrideSet, got {type(ov).__name__}")
        if ov.dim != table.dim:
            raise ValueError(f"overrides[{i}] has rows of {ov.dim} values, the table {table.dim}")
        status = lib.ek_override_check(ov._c, table.n_rows, table.dim)
        if status:
            fail(status, f"overrides[{i}]", ov._problem(table.n_rows))
        c_sets[i] = ov._c[0]
    return sets, c_sets


class Gatherer:
    """Gathers table rows as float32, serving rows from override sets where they apply.

    Override sets are searched from the last to the first; the first applicable entry wins
    (within a set an entry keyed exactly like the look-up beats a key -1 entry); rows without
    one come from the table. Each set is validated against the table once, here.
    """

    def __init__(self, table: Table, overrides: Iterable[OverrideSet] = ()):
        if not isinstance(table, Table):
            raise TypeError(f"table must be a Table, got {type(table).__name__}")
        sets, c_sets = override_stack(table, overrides)
        # One tuple, swapped out by close(): a gather in flight keeps what it read alive.
        self._state = (table, sets, c_sets)
        self.dim = table.dim
        self.last_hits = 0  # look-ups of the latest finished gather served by an override

    def gather(self, rows, keys=None) -> np.ndarray:
        """float32 `rows.shape + (dim,)`: the (possibly overridden) value of every row id.

        `keys` (same shape as rows, or None for "no key") are the look-ups' exact keys.
        """
        state = self._state
        if state is None:
            raise RuntimeError("Gatherer is closed")
        table, sets, c_sets = state
        rows = int64_array("rows", rows)
        keys_p = ffi.NULL
        if keys is not None:
            keys = int64_array("keys", keys)
            if keys.shape != rows.shape:
                raise ValueError(f"keys shape {keys.shape} does not match rows shape {rows.shape}")
            keys_p = i64_ptr(keys)
        out = np.empty(rows.shape + (table.dim,), dtype=np.float32)
        hits = ffi.new("int64_t *")
        status = lib.ek_gather(table._c, c_sets, len(sets), i64_ptr(rows), keys_p, rows.size,
                               ffi.from_buffer("float[]", out, require_writable=True), out.size, hits)
        if status:
            fail(status, "gather", first_outside("rows", rows, 0, table.n_rows))
        self.last_hits = int(hits[0])
        return out

    def close(self) -> None:
        """Drop the references to the table and override sets; later gathers raise."""
        self._state = None

    def __enter__(self) -> "Gatherer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
