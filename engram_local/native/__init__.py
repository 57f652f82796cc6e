"""Python face of the native kernel (native/engram.h): numpy arrays in, numpy arrays out.

This is the only module that imports the cffi extension `engram_local._engram_native`.
Every argument is checked here or by the kernel, and a rejected call raises TypeError (wrong
kind of object or dtype) or ValueError (wrong shape, value or range; `KernelError` when the
kernel itself refused), with a message naming the argument - never a crash.

Threads: kernel calls release the GIL and all per-call state lives in locals, so one Table,
OverrideSet or Gatherer can serve several threads at once.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from engram_local import constants
from engram_local._engram_native import ffi, lib

INT64_MAX = int(np.iinfo(np.int64).max)
INT32_MAX = int(np.iinfo(np.int32).max)

QTYPE_NAMES = {constants.QTYPE_F32: "F32", constants.QTYPE_F16: "F16",
               constants.QTYPE_BF16: "BF16", constants.QTYPE_Q8_0: "Q8_0",
               constants.QTYPE_Q4_0: "Q4_0"}
TABLE_QTYPES = frozenset(constants.TABLE_QTYPES.values())
OVERRIDE_VALUE_DTYPES = {np.dtype(np.float32): constants.QTYPE_F32,
                         np.dtype(np.float16): constants.QTYPE_F16}
_BLOCK_SIZES = {constants.QTYPE_Q8_0: 32, constants.QTYPE_Q4_0: 32}

# Every error status of native/engram.h `enum ek_status`, and what it means.
STATUS_TEXT = {
    "EK_ERR_NULL": "a required buffer is missing",
    "EK_ERR_ARG": "a size or configuration value is invalid",
    "EK_ERR_RANGE": "an id or row index is out of range",
    "EK_ERR_QTYPE": "unsupported tensor type, or row width not a multiple of its block",
    "EK_ERR_CAPACITY": "an output buffer is too small",
    "EK_ERR_UNSORTED": "override entries are not strictly ascending by (row, key)",
    "EK_ERR_SIZE": "a data buffer is shorter than its shape needs",
}
_STATUS_NAMES = {getattr(lib, name): name for name in STATUS_TEXT}


class KernelError(ValueError):
    """The native kernel rejected a call; `status` is its ek_status code, `status_name` its name."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
        self.status_name = _STATUS_NAMES.get(status, f"ek_status {status}")


def _fail(status: int, where: str, detail: str | None = None):
    """Raise the KernelError of a non-OK ek_status; `detail` pinpoints the culprit if known."""
    name = _STATUS_NAMES.get(status, f"ek_status {status}")
    raise KernelError(f"{where}: {detail or STATUS_TEXT.get(name, 'unknown error')} ({name})", status)


# --------------------------------------------------------------------------- argument checks

def _int_param(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int from an int or numpy integer (bools rejected), within [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _int64_array(name: str, values, ndim: int | None = None) -> np.ndarray:
    """C-contiguous int64 copy-or-view of an integer array (any int dtype; floats rejected)."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if not isinstance(values, np.ndarray) and arr.size == 0:
        arr = arr.astype(np.int64)  # np.asarray([]) is float64: an empty list is a valid id list
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > INT64_MAX:
        raise ValueError(f"{name} holds a value above the int64 maximum")
    return np.asarray(arr, dtype=np.int64, order="C")  # (np.ascontiguousarray would make 0-D 1-D)


def _qtype_param(name: str, qtype, allowed: Iterable[int]) -> int:
    qtype = _int_param(name, qtype)
    if qtype not in allowed:
        names = ", ".join(f"{QTYPE_NAMES[q]} ({q})" for q in sorted(allowed))
        raise ValueError(f"{name} {qtype} is not supported; supported: {names}")
    return qtype


def _first_outside(name: str, arr: np.ndarray, lo: int, hi: int) -> str | None:
    """Describe the first element of `arr` outside [lo, hi), or None if there is none."""
    bad = np.argwhere((arr < lo) | (arr >= hi))
    if len(bad) == 0:
        return None
    index = tuple(int(i) for i in bad[0])
    where = f"{name}[{', '.join(map(str, index))}]" if index else name  # a 0-D array has no index
    return f"{where} = {int(arr[index])} is outside [{lo}, {hi})"


def _readonly(arr: np.ndarray) -> np.ndarray:
    """A read-only view: objects validated once must not be changed through their attributes."""
    view = arr.view()
    view.flags.writeable = False
    return view


def _i64_ptr(arr: np.ndarray, writable: bool = False):
    return ffi.from_buffer("int64_t[]", arr, require_writable=writable)


# --------------------------------------------------------------------------- sizes

def row_bytes(qtype: int, dim: int) -> int:
    """Bytes of one row of `dim` values stored as `qtype` (a ggml type id)."""
    qtype = _qtype_param("qtype", qtype, TABLE_QTYPES)
    dim = _int_param("dim", dim, lo=1, hi=INT64_MAX)
    block = _BLOCK_SIZES.get(qtype, 1)
    if dim % block:
        raise ValueError(f"dim {dim} is not a multiple of {QTYPE_NAMES[qtype]}'s block of {block} values")
    nbytes = lib.ek_row_bytes(qtype, dim)
    if nbytes == 0:
        raise ValueError(f"a row of {dim} {QTYPE_NAMES[qtype]} values exceeds the int64 byte range")
    return int(nbytes)


# --------------------------------------------------------------------------- canonical ids

def canonicalize(id_map: np.ndarray, raw_ids) -> np.ndarray:
    """Canonical ids `id_map[raw_ids]` (int64, 1-D); every raw id must index `id_map`."""
    id_map = _int64_array("id_map", id_map, ndim=1)
    raw = _int64_array("raw_ids", raw_ids, ndim=1)
    out = np.empty(raw.shape[0], dtype=np.int64)
    status = lib.ek_canonicalize(_i64_ptr(id_map), id_map.shape[0], _i64_ptr(raw), raw.shape[0],
                                 _i64_ptr(out, writable=True), out.shape[0])
    if status:
        _fail(status, "canonicalize", _first_outside("raw_ids", raw, 0, id_map.shape[0]))
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
    N = _int_param("max_ngram", max_ngram, lo=2, hi=INT32_MAX)
    K = _int_param("n_head", n_head, lo=1, hi=INT32_MAX)
    vocab = _int_param("vocab", vocab, lo=1, hi=INT64_MAX)
    pad_id = _int_param("pad_id", pad_id, lo=0, hi=vocab - 1)
    ids = _int64_array("ids", ids, ndim=1)
    n = ids.shape[0]
    start = _int_param("start", start, lo=0, hi=n)
    n_cols = (N - 1) * K
    mult = _int64_array("multipliers", multipliers, ndim=1)
    primes = _int64_array("primes", primes, ndim=1)
    offsets = _int64_array("offsets", offsets, ndim=1)
    for name, arr, want in (("multipliers", mult, N), ("primes", primes, n_cols),
                            ("offsets", offsets, n_cols)):
        if arr.shape[0] != want:
            raise ValueError(f"{name} needs {want} entries for max_ngram={N}, n_head={K}, "
                             f"got {arr.shape[0]}")

    mult_p, primes_p, offsets_p = _i64_ptr(mult), _i64_ptr(primes), _i64_ptr(offsets)
    layer = ffi.new("ek_hash_layer *", {
        "max_ngram": N, "n_head": K, "vocab": vocab, "pad_id": pad_id,
        "multipliers": mult_p, "primes": primes_p, "offsets": offsets_p})
    rows = np.empty((n - start, n_cols), dtype=np.int64)
    mix = np.empty((n - start, N - 1), dtype=np.int64) if with_mix else None
    status = lib.ek_hash(layer, _i64_ptr(ids), n, start, _i64_ptr(rows, writable=True), rows.size,
                         _i64_ptr(mix, writable=True) if with_mix else ffi.NULL,
                         mix.size if with_mix else 0)
    if status:
        _fail(status, "hash_layer", _hash_problem(ids, vocab, primes, offsets))
    return (rows, mix) if with_mix else rows


def _hash_problem(ids: np.ndarray, vocab: int, primes: np.ndarray, offsets: np.ndarray):
    """Why ek_hash refused arguments that passed the Python checks (error path only)."""
    if np.any(primes < 1):
        return f"primes must be >= 1, got {int(primes.min())}"
    if np.any(offsets < 0):
        return f"offsets must be >= 0, got {int(offsets.min())}"
    if any(int(o) + int(p) - 1 > INT64_MAX for o, p in zip(offsets, primes)):
        return "offsets + primes exceed the int64 range of row ids"
    return _first_outside("ids", ids, 0, vocab)


# --------------------------------------------------------------------------- tables

class Table:
    """A read-only table of `n_rows` rows of `dim` values of one ggml type, zero copy.

    `data` holds the rows back to back: a uint8 byte buffer (e.g. a GGUFReader tensor's
    `.data`, an np.memmap) or, for F32 / F16, a float32 / float16 array. It must be
    C-contiguous (a table is never copied) and is kept alive by the Table.
    """

    def __init__(self, data: np.ndarray, qtype: int, n_rows: int, dim: int):
        qtype = _qtype_param("qtype", qtype, TABLE_QTYPES)
        n_rows = _int_param("n_rows", n_rows, lo=0, hi=INT64_MAX)
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
        self.data = _readonly(raw)
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
        rows = _int64_array("rows", rows, ndim=1)
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
            keys = _int64_array("keys", keys, ndim=1)
            if keys.shape[0] != rows.shape[0]:
                raise ValueError(f"keys has {keys.shape[0]} entries but rows has {rows.shape[0]}")
        self.rows, self.values = _readonly(rows), _readonly(values)
        self.keys = None if keys is None else _readonly(keys)
        self.dim = int(values.shape[1])
        self.qtype = OVERRIDE_VALUE_DTYPES[values.dtype]
        self._rows_p = _i64_ptr(rows)
        self._keys_p = _i64_ptr(keys) if keys is not None else ffi.NULL
        self._values_p = ffi.from_buffer("uint8_t[]", values)
        self._c = ffi.new("ek_override *", {
            "rows": self._rows_p, "keys": self._keys_p, "values": self._values_p,
            "nbytes": values.nbytes, "qtype": self.qtype, "n": rows.shape[0]})
        # Ordering and key checks need no table: validate against the widest one.
        status = lib.ek_override_check(self._c, INT64_MAX, self.dim)
        if status:
            _fail(status, "OverrideSet", self._problem(INT64_MAX))
        # O(1) row look-ups: an open-addressing index at load factor <= 1/2 (16 B per entry).
        if rows.shape[0]:
            cap = 1 << max(1, int(2 * rows.shape[0] - 1).bit_length())
            self._index = np.empty(cap, dtype=np.int64)
            status = lib.ek_override_index(self._c, _i64_ptr(self._index, writable=True), cap)
            if status:
                _fail(status, "OverrideSet index")
            self._index_p = _i64_ptr(self._index)
            self._c.index, self._c.index_cap = self._index_p, cap

    @classmethod
    def build(cls, rows, values, keys=None) -> "OverrideSet":
        """An OverrideSet from entries in any order (sorted here by (row, key))."""
        rows = _int64_array("rows", rows, ndim=1)
        sort_keys = (np.full(rows.shape, constants.ANY_KEY, dtype=np.int64) if keys is None
                     else _int64_array("keys", keys, ndim=1))
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
        where = _first_outside("rows", self.rows, 0, n_rows)
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

class Gatherer:
    """Gathers table rows as float32, serving rows from override sets where they apply.

    Override sets are searched from the last to the first; the first applicable entry wins
    (within a set an entry keyed exactly like the look-up beats a key -1 entry); rows without
    one come from the table. Each set is validated against the table once, here.
    """

    def __init__(self, table: Table, overrides: Iterable[OverrideSet] = ()):
        if not isinstance(table, Table):
            raise TypeError(f"table must be a Table, got {type(table).__name__}")
        sets = tuple(overrides)
        c_sets = ffi.new("ek_override[]", len(sets))
        for i, ov in enumerate(sets):
            if not isinstance(ov, OverrideSet):
                raise TypeError(f"overrides[{i}] must be an OverrideSet, got {type(ov).__name__}")
            if ov.dim != table.dim:
                raise ValueError(f"overrides[{i}] has rows of {ov.dim} values, the table {table.dim}")
            status = lib.ek_override_check(ov._c, table.n_rows, table.dim)
            if status:
                _fail(status, f"overrides[{i}]", ov._problem(table.n_rows))
            c_sets[i] = ov._c[0]
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
        rows = _int64_array("rows", rows)
        keys_p = ffi.NULL
        if keys is not None:
            keys = _int64_array("keys", keys)
            if keys.shape != rows.shape:
                raise ValueError(f"keys shape {keys.shape} does not match rows shape {rows.shape}")
            keys_p = _i64_ptr(keys)
        out = np.empty(rows.shape + (table.dim,), dtype=np.float32)
        hits = ffi.new("int64_t *")
        status = lib.ek_gather(table._c, c_sets, len(sets), _i64_ptr(rows), keys_p, rows.size,
                               ffi.from_buffer("float[]", out, require_writable=True), out.size, hits)
        if status:
            _fail(status, "gather", _first_outside("rows", rows, 0, table.n_rows))
        self.last_hits = int(hits[0])
        return out

    def close(self) -> None:
        """Drop the references to the table and override sets; later gathers raise."""
        self._state = None

    def __enter__(self) -> "Gatherer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ============================================================================ Engram runtime
# (native/engram_runtime.c) The Engram term of a layer in C, and the per-sequence state of the
# llama.cpp backend whose eval callback adds it to llama.cpp's residual stream. Added for the
# `engram-local run` runtime; everything else in this file predates it.

class EngramRuntimeError(RuntimeError):
    """The Engram runtime refused a batch or failed inside llama.cpp's graph; `status` is the
    ek_status code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _f32_array(name: str, values, shape: tuple | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.float32)
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def _f32_ptr(arr: np.ndarray, writable: bool = False):
    return ffi.from_buffer("float[]", arr, require_writable=writable)


class EngramLayerKernel:
    """One Engram layer for the C kernel: hash constants, table + override stack, weights.

    w_k, w_v: torch layout [D, E] (stored transposed here); norm_*: [D]; conv: [D, kernel] or
    [D, 1, kernel]; hash_args: `NgramHashLayout.kernel_args(layer)`. Arrays are copied once
    (float32, contiguous) and kept alive by this object.
    """

    def __init__(self, table: Table, overrides: Iterable[OverrideSet], hash_args: dict, *,
                 w_k, w_v, norm_q, norm_k, norm_v, conv, eps: float, dilation: int):
        if not isinstance(table, Table):
            raise TypeError(f"table must be a Table, got {type(table).__name__}")
        N = _int_param("max_ngram", hash_args["max_ngram"], lo=2, hi=INT32_MAX)
        K = _int_param("n_head", hash_args["n_head"], lo=1, hi=INT32_MAX)
        w_k = np.asarray(w_k, dtype=np.float32)
        if w_k.ndim != 2:
            raise ValueError(f"w_k must be 2-D [D, E], got shape {w_k.shape}")
        D, E = (int(s) for s in w_k.shape)
        if E != (N - 1) * K * table.dim:
            raise ValueError(f"w_k has {E} inputs; (max_ngram-1) * n_head * head_dim = "
                             f"{(N - 1) * K * table.dim}")
        conv = np.asarray(conv, dtype=np.float32)
        conv = conv.reshape(conv.shape[0], -1) if conv.ndim == 3 else conv
        if conv.ndim != 2 or conv.shape[0] != D or conv.shape[1] < 1:
            raise ValueError(f"conv must be [D={D}, kernel], got shape {conv.shape}")
        self.hidden, self.mem_dim, self.kernel = D, E, int(conv.shape[1])
        self.dilation = _int_param("dilation", dilation, lo=1, hi=INT32_MAX)
        self.max_ngram, self.n_head = N, K
        self.table = table
        self._w_k_t = np.ascontiguousarray(w_k.T)
        self._w_v_t = np.ascontiguousarray(_f32_array("w_v", w_v, (D, E)).T)
        self._norms = [_f32_array(n, a, (D,)) for n, a in
                       (("norm_q", norm_q), ("norm_k", norm_k), ("norm_v", norm_v))]
        self._conv_t = np.ascontiguousarray(conv.T)
        self._hash = {k: _int64_array(k, hash_args[k], ndim=1)
                      for k in ("multipliers", "primes", "offsets")}
        if self._hash["multipliers"].shape[0] != N or any(
                self._hash[k].shape[0] != (N - 1) * K for k in ("primes", "offsets")):
            raise ValueError("hash_args arrays do not match max_ngram / n_head")
        self._keep = [ffi.from_buffer("int64_t[]", self._hash[k]) for k in ("multipliers", "primes", "offsets")]
        self._c = ffi.new("ek_engram_layer *")
        c = self._c
        c.hash.max_ngram, c.hash.n_head = N, K
        c.hash.vocab = _int_param("vocab", hash_args["vocab"], lo=1, hi=INT64_MAX)
        c.hash.pad_id = _int_param("pad_id", hash_args["pad_id"], lo=0, hi=int(hash_args["vocab"]) - 1)
        c.hash.multipliers, c.hash.primes, c.hash.offsets = self._keep
        c.table = table._c[0]
        c.hidden, c.mem_dim = D, E
        self._ptrs = [_f32_ptr(a) for a in (self._w_k_t, self._w_v_t, *self._norms, self._conv_t)]
        c.w_k_t, c.w_v_t, c.norm_q, c.norm_k, c.norm_v, c.conv_t = self._ptrs
        c.kernel, c.dilation = self.kernel, self.dilation
        c.eps = float(eps)
        self.set_overrides(overrides)
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        status = lib.ek_engram_scratch(self._c, 1, n_i, n_f)
        if status:
            _fail(status, "EngramLayerKernel")

    def set_overrides(self, overrides: Iterable[OverrideSet]) -> None:
        """Replace the override stack (later sets win), validated against the table."""
        sets = tuple(overrides)
        c_sets = ffi.new("ek_override[]", max(1, len(sets)))
        for i, ov in enumerate(sets):
            if not isinstance(ov, OverrideSet):
                raise TypeError(f"overrides[{i}] must be an OverrideSet, got {type(ov).__name__}")
            if ov.dim != self.table.dim:
                raise ValueError(f"overrides[{i}] has rows of {ov.dim} values, the table {self.table.dim}")
            status = lib.ek_override_check(ov._c, self.table.n_rows, self.table.dim)
            if status:
                _fail(status, f"overrides[{i}]", ov._problem(self.table.n_rows))
            c_sets[i] = ov._c[0]
        self._sets, self._c_sets = sets, c_sets
        self._c.ovs, self._c.n_ovs = c_sets, len(sets)

    def forward(self, h, ids, ids_start: int, xs: np.ndarray, xs_start: int) -> tuple[np.ndarray, int]:
        """(y [T, D], override hits) for hidden states h [T, D] at positions ids_start.. of
        canonical `ids`; xs [rows, D] float32 holds x of earlier positions and receives the
        new rows at xs_start.. (see native/engram.h ek_engram_forward)."""
        h = _f32_array("h", h)
        if h.ndim != 2 or h.shape[1] != self.hidden:
            raise ValueError(f"h must be [T, {self.hidden}], got {h.shape}")
        ids = _int64_array("ids", ids, ndim=1)
        if not (isinstance(xs, np.ndarray) and xs.dtype == np.float32 and xs.flags.c_contiguous
                and xs.ndim == 2 and xs.shape[1] == self.hidden):
            raise ValueError(f"xs must be a C-contiguous float32 [rows, {self.hidden}] array")
        T = h.shape[0]
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        lib.ek_engram_scratch(self._c, T, n_i, n_f)
        si, sf = np.empty(max(1, n_i[0]), np.int64), np.empty(max(1, n_f[0]), np.float32)
        y = np.empty((T, self.hidden), np.float32)
        hits = ffi.new("int64_t *")
        status = lib.ek_engram_forward(self._c, _f32_ptr(h), T, _i64_ptr(ids), ids.shape[0],
                                       _int_param("ids_start", ids_start, lo=0),
                                       _f32_ptr(xs, True), xs.shape[0], _int_param("xs_start", xs_start, lo=0),
                                       _f32_ptr(y, True), y.size, _i64_ptr(si, True), si.size,
                                       _f32_ptr(sf, True), sf.size, hits)
        if status:
            _fail(status, "engram_forward")
        return y, int(hits[0])


class EngramRuntime:
    """Per-sequence Engram state for llama.cpp's eval callback (native/engram.h `ek_runtime`).

    ggml: addresses (ints) of ggml_get_name, ggml_nelements, ggml_nbytes,
    ggml_backend_tensor_get, ggml_backend_tensor_set and ggml_is_contiguous in the
    libggml-base llama.cpp loaded.
    Use `callback_address` as llama_context_params.cb_eval and `user_data_address` as
    cb_eval_user_data; per llama_decode: begin(tokens) -> decode -> commit() (or abort()).
    """

    _GGML_SIGS = {"get_name": "const char *(*)(void *)", "nelements": "int64_t (*)(void *)",
                  "nbytes": "size_t (*)(void *)",
                  "tensor_get": "void (*)(void *, void *, size_t, size_t)",
                  "tensor_set": "void (*)(void *, const void *, size_t, size_t)",
                  "is_contiguous": "bool (*)(void *)"}

    def __init__(self, layers: list[EngramLayerKernel], inject: list[int], canonical_map,
                 n_ctx: int, max_tokens: int, ggml: dict):
        if not layers or len(layers) != len(inject):
            raise ValueError("need one inject layer index per Engram layer (and at least one layer)")
        self.layers = list(layers)
        self.inject = [int(i) for i in inject]
        self.n_ctx = _int_param("n_ctx", n_ctx, lo=1)
        self.max_tokens = _int_param("max_tokens", max_tokens, lo=1)
        self.hidden = layers[0].hidden
        self._map = _int64_array("canonical_map", canonical_map, ndim=1)
        self._inject = np.asarray(self.inject, dtype=np.int32)
        self._ids = np.zeros(self.n_ctx, np.int64)
        self._xs = np.zeros((len(layers), self.n_ctx, self.hidden), np.float32)
        self._fired = np.zeros(len(layers), np.int32)
        self._c_layers = ffi.new("ek_engram_layer[]", len(layers))
        rt = self._rt = ffi.new("ek_runtime *")
        for name, sig in self._GGML_SIGS.items():
            setattr(rt.ggml, name, ffi.cast(sig, int(ggml[name])))
        self._keep = [ffi.from_buffer("int32_t[]", self._inject), _i64_ptr(self._map),
                      _i64_ptr(self._ids, True), _f32_ptr(self._xs, True),
                      ffi.from_buffer("int32_t[]", self._fired, require_writable=True)]
        rt.layers, rt.n_layers = self._c_layers, len(layers)
        rt.inject, rt.canonical_map, rt.ids, rt.xs, rt.fired = (
            self._keep[0], self._keep[1], self._keep[2], self._keep[3], self._keep[4])
        rt.map_len, rt.n_ctx, rt.max_tokens = self._map.shape[0], self.n_ctx, self.max_tokens
        rt.enabled = 1
        self.refresh_layers()
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        status = lib.ek_runtime_scratch(rt, n_i, n_f)
        if status:
            _fail(status, "EngramRuntime")
        self._si = np.empty(max(1, n_i[0]), np.int64)
        self._sf = np.empty(max(1, n_f[0]), np.float32)
        self._keep += [_i64_ptr(self._si, True), _f32_ptr(self._sf, True)]
        rt.scratch_i64, rt.cap_i64 = self._keep[-2], self._si.size
        rt.scratch_f32, rt.cap_f32 = self._keep[-1], self._sf.size
        if lib.ek_runtime_init(rt):
            self._raise("EngramRuntime")

    def refresh_layers(self) -> None:
        """Re-read every layer's struct (after EngramLayerKernel.set_overrides)."""
        for i, layer in enumerate(self.layers):
            self._c_layers[i] = layer._c[0]

    @property
    def callback_address(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "ek_eval_callback")))

    @property
    def user_data_address(self) -> int:
        return int(ffi.cast("uintptr_t", self._rt))

    @property
    def n_past(self) -> int:
        return int(self._rt.n_past)

    @property
    def status(self) -> int:
        return int(self._rt.status)

    @property
    def error(self) -> str:
        return ffi.string(self._rt.error).decode("utf-8", "replace")

    @property
    def n_calls(self) -> int:
        return int(self._rt.n_calls)

    @property
    def n_hits(self) -> int:
        return int(self._rt.n_hits)

    @property
    def enabled(self) -> bool:
        return bool(self._rt.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._rt.enabled = 1 if on else 0

    def _raise(self, where: str):
        status = int(self._rt.status) or lib.EK_ERR_ARG
        raise EngramRuntimeError(f"{where}: {self.error or STATUS_TEXT.get(_STATUS_NAMES.get(status, ''), 'error')}",
                                 status)

    def begin(self, tokens) -> None:
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        if lib.ek_runtime_begin(self._rt, ffi.from_buffer("int32_t[]", tok), tok.shape[0]):
            self._raise("Engram runtime")

    def commit(self) -> None:
        if lib.ek_runtime_commit(self._rt):
            self._raise("Engram runtime")

    def abort(self) -> None:
        lib.ek_runtime_abort(self._rt)

    def check(self) -> None:
        """Raise if a callback failed."""
        if self._rt.status:
            self._raise("Engram runtime")

    def truncate(self, n: int) -> None:
        if lib.ek_runtime_truncate(self._rt, _int_param("n", n, lo=0)):
            self._raise(f"Engram runtime truncate to {n} (n_past {self.n_past})")

    def reset(self) -> None:
        lib.ek_runtime_reset(self._rt)

    def state(self, layer_index: int) -> np.ndarray:
        """x rows [n_past, D] of one layer (a copy; for tests)."""
        return self._xs[layer_index, :self.n_past].copy()

    def close(self) -> None:
        """Stop asking for nodes; the buffers stay alive as long as this object."""
        self._rt.enabled = 0
