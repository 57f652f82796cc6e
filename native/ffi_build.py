"""cffi builder of `engram_local._engram_native` (out-of-line API mode).

The cdef is the block of native/engram.h between `/* EK_CDEF_BEGIN */` and `/* EK_CDEF_END */`,
so the header stays the single declaration of the kernel's interface.

CMakeLists.txt runs `python native/ffi_build.py OUT.c` at build time: this emits the module's
C source (the cffi glue, which `#include "engram.h"`); CMake then compiles it together with
native/engram.c into the extension module. CMake, not cffi, owns compiler flags and sources.
"""

from __future__ import annotations

import pathlib
import sys

import cffi

NATIVE_DIR = pathlib.Path(__file__).resolve().parent
HEADER = NATIVE_DIR / "engram.h"
MODULE_NAME = "engram_local._engram_native"
CDEF_BEGIN = "/* EK_CDEF_BEGIN */"
CDEF_END = "/* EK_CDEF_END */"


def read_cdef(header: pathlib.Path = HEADER) -> str:
    """The declarations between the EK_CDEF markers of `header` (each marker exactly once)."""
    text = header.read_text(encoding="utf-8")
    if text.count(CDEF_BEGIN) != 1 or text.count(CDEF_END) != 1:
        raise ValueError(f"{header}: expected exactly one {CDEF_BEGIN} and one {CDEF_END}")
    begin = text.index(CDEF_BEGIN) + len(CDEF_BEGIN)
    end = text.index(CDEF_END)
    if end < begin:
        raise ValueError(f"{header}: {CDEF_END} comes before {CDEF_BEGIN}")
    return text[begin:end]


ffibuilder = cffi.FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(MODULE_NAME, '#include "engram.h"')


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT.c  (writes the C source of {MODULE_NAME})", file=sys.stderr)
        return 2
    ffibuilder.emit_c_code(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
