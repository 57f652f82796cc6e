"""Python face of the native code: numpy arrays in, numpy arrays out.

The binding mirrors the two C files, and this package is the only code that touches the cffi
extension `engram_local._engram_native` (its `ffi` and `lib`):

  kernel.py   native/engram.c: tables, override sets, the gatherer, canonical ids, N-gram hashing
  runtime.py  native/engram_runtime.c: the Engram layer in C and llama.cpp's per-sequence state
  checks.py   what both share: argument checks, cffi pointers, status texts, KernelError
  hashing.py  the N-gram hash layout (constants the kernel hashes with)
  reference.py plain numpy references of the kernel, for the tests

Every argument is checked by the binding or by the kernel, and a rejected call raises TypeError
(wrong kind of object or dtype) or ValueError (wrong shape, value or range; `KernelError` when
the kernel itself refused), with a message naming the argument - never a crash.
"""

from engram_local._engram_native import ffi, lib  # noqa: F401 (tests reach the C status codes)
from engram_local.native.checks import (OVERRIDE_VALUE_DTYPES, QTYPE_NAMES, STATUS_TEXT, TABLE_QTYPES,  # noqa: F401
                                        KernelError)
from engram_local.native.checks import fail as _fail  # noqa: F401 (tests raise every status through it)
from engram_local.native.kernel import (Gatherer, OverrideSet, Table, canonicalize, hash_layer,  # noqa: F401
                                        row_bytes)
from engram_local.native.runtime import EngramLayerKernel, EngramRuntime, EngramRuntimeError  # noqa: F401
