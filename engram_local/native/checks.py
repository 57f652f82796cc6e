"""Shared pieces of the native binding: type ids and status texts, the KernelError of a refused
call, and the argument checks and cffi pointers both kernel.py and runtime.py use.

Every check raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape, value or
range) with a message naming the argument.
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
BLOCK_SIZES = {constants.QTYPE_Q8_0: 32, constants.QTYPE_Q4_0: 32}

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
STATUS_NAMES = {getattr(lib, name): name for name in STATUS_TEXT}


class KernelError(ValueError):
    """The native kernel rejected a call; `status` is its ek_status code, `status_name` its name."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
        self.status_name = STATUS_NAMES.get(status, f"ek_status {status}")


def fail(status: int, where: str, detail: str | None = None):
    """Raise the KernelError of a non-OK ek_status; `detail` pinpoints the culprit if known."""
    name = STATUS_NAMES.get(status, f"ek_status {status}")
    raise KernelError(f"{where}: {detail or STATUS_TEXT.get(name, 'unknown error')} ({name})", status)


# --------------------------------------------------------------------------- argument checks

def int_param(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int from an int or numpy integer (bools rejected), within [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def int64_array(name: str, values, ndim: int | None = None) -> np.ndarray:
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


def qtype_param(name: str, qtype, allowed: Iterable[int]) -> int:
    qtype = int_param(name, qtype)
    if qtype not in allowed:
        names = ", ".join(f"{QTYPE_NAMES[q]} ({q})" for q in sorted(allowed))
        raise ValueError(f"{name} {qtype} is not supported; supported: {names}")
    return qtype


def first_outside(name: str, arr: np.ndarray, lo: int, hi: int) -> str | None:
    """Describe the first element of `arr` outside [lo, hi), or None if there is none."""
    bad = np.argwhere((arr < lo) | (arr >= hi))
    if len(bad) == 0:
        return None
    index = tuple(int(i) for i in bad[0])
    where = f"{name}[{', '.join(map(str, index))}]" if index else name  # a 0-D array has no index
    return f"{where} = {int(arr[index])} is outside [{lo}, {hi})"


def readonly(arr: np.ndarray) -> np.ndarray:
    """A read-only view: objects validated once must not be changed through their attributes."""
    view = arr.view()
    view.flags.writeable = False
    return view


def i64_ptr(arr: np.ndarray, writable: bool = False):
    return ffi.from_buffer("int64_t[]", arr, require_writable=writable)


def f32_array(name: str, values, shape: tuple | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.float32)
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def f32_ptr(arr: np.ndarray, writable: bool = False):
    return ffi.from_buffer("float[]", arr, require_writable=writable)
