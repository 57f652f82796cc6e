"""Fuzz targets (issue 14): the .eov reader, the GGUF header scanner + sidecar opener, and the
native kernel's entry points. Each takes bytes and either succeeds or raises an *expected*
error; anything else is a finding:

  crash        the process dies (a signal in native code): seen by the runner's parent
  unhandled    an exception other than the target's EXPECTED errors
  hang         one input runs past the runner's time limit
  silent       (eov) a changed version-2 or encrypted file accepted: the checksum / GCM tag
               let a change through

On success a target returns what kind of input it accepted (the runner counts each kind):
"seed" (an unchanged seed), "v1" (a version-1 memory file: no checksum, so changes are
expected to pass), "rechecked" (eov-valid), "other-gguf" (a GGUF that is not a sidecar, of
which only the header is scanned), "padding" (a sidecar changed only in alignment padding or
after its last tensor, bytes no reader looks at), "unstamped" (a sidecar without engram.integrity changed outside
its tables: what the fingerprint cannot see; files converted before the integrity key),
"ok" (kernel calls).

Driven by atheris (tests/fuzz/atheris_main.py, coverage-guided) or by the plain
random-mutation runner (tests/fuzz/run.py), which CI uses.
"""

from __future__ import annotations

import os
import struct
import tempfile
import weakref
from pathlib import Path

import numpy as np

SEEDS = Path(__file__).parent / "seeds"


class Silent(Exception):
    """A changed memory file was accepted (the checksum failed to notice)."""


def seeds(harness: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((SEEDS / harness).iterdir()) if p.is_file()]


# --------------------------------------------------------------------------- .eov reader

def _eov_expected():
    from engram_local.formats.eov import MemoryFileError
    return (MemoryFileError,)


class EovTarget:
    name = "eov"
    recheck = False      # eov-valid: give each input a valid checksum first (reaches the checks behind it)

    def __init__(self):
        from engram_local.formats import sealed

        self.expected = _eov_expected()
        self.originals = set(seeds("eov"))
        os.environ.setdefault(sealed.KEY_ENV, "5e" * 32)        # the key the sealed seed was made with

    def __call__(self, data: bytes):
        from engram_local.formats.eov import parse_memory_bytes

        if self.recheck:
            data = rechecksum(data)
        mf = parse_memory_bytes(data, "fuzz.eov")
        if not self.recheck and data not in self.originals and (mf.format_version >= 2 or mf.sealed):
            raise Silent(f"a changed version-{mf.format_version} file was accepted")
        # an accepted file must also be usable: every fact's entries index real rows
        entries = mf.entries()
        for f in mf.facts:
            for e in f.entries:
                entries[e]
        return "seed" if data in self.originals else "rechecked" if self.recheck else "v1"


class EovValidTarget(EovTarget):
    name = "eov-valid"
    recheck = True


def rechecksum(data: bytes) -> bytes:
    """`data` with a valid eov.checksum when it scans and has one."""
    import xxhash

    from engram_local import constants
    from engram_local.formats.header import GGUFFormatError, scan_gguf_bytes

    try:
        at = scan_gguf_bytes(data, "x").scalar_offsets.get(constants.KEY_EOV_CHECKSUM)
    except GGUFFormatError:
        return data
    if at is None:
        return data
    b = bytearray(data)
    b[at:at + 8] = bytes(8)
    b[at:at + 8] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(b)))
    return bytes(b)


# --------------------------------------------------------------------------- GGUF scanner + sidecar

def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class GgufTarget:
    name = "gguf"

    def __init__(self):
        from engram_local.formats.header import GGUFFormatError

        self.expected = (GGUFFormatError,)
        self.originals = set(seeds("gguf"))
        fd, path = tempfile.mkstemp(suffix=".gguf", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        if os.path.isdir("/proc/self/fd"):
            # an unlinked scratch file, reached through its descriptor: nothing is left behind
            # however the run ends (libFuzzer exits without Python's finalizers)
            os.unlink(path)
            self._fd, self.path = fd, f"/proc/self/fd/{fd}"
        else:
            os.close(fd)
            self._fd, self.path = None, path
            weakref.finalize(self, _remove, path)

    def __call__(self, data: bytes):
        from engram_local import constants
        from engram_local.formats.header import scan_gguf_bytes
        from engram_local.formats.sidecar import open_sidecar

        header = scan_gguf_bytes(data, "fuzz.gguf")
        if header.architecture != constants.SIDECAR_ARCH:
            return "seed" if data in self.originals else "other-gguf"
        Path(self.path).write_bytes(data)
        sc = open_sidecar(self.path)         # counts, shapes, hash constants, content hashes
        sc.close()
        if data in self.originals:
            return "seed"
        # a changed sidecar got through: only padding (or bytes after the last tensor) may differ
        # from the seed it came from
        for seed in self.originals:
            h = scan_gguf_bytes(seed, "seed")
            ranges = [(0, h.data_offset)] + [(t.offset, t.offset + t.nbytes) for t in h.tensors.values()]
            if all(seed[a:b] == data[a:b] for a, b in ranges):
                return "padding"
        if constants.KEY_INTEGRITY in header.fields:
            raise Silent("a sidecar carrying engram.integrity was accepted with changed content")
        return "unstamped"


# --------------------------------------------------------------------------- native kernel

class KernelTarget:
    """Arguments for canonicalize, hash_layer, Table, OverrideSet and Gatherer.gather decoded
    from the input bytes: sizes, types and values as the bytes say, so the Python-side argument
    checks and the C code both see hostile input. Expected: ValueError, TypeError (the checks)."""
    name = "kernel"
    expected = (ValueError, TypeError, OverflowError)

    def __call__(self, data: bytes):
        from engram_local import native

        buf = memoryview(data)
        pos = 0

        def take(n):
            nonlocal pos
            chunk = bytes(buf[pos:pos + n])
            pos += n
            return chunk + bytes(n - len(chunk))

        def i64s(count):
            return np.frombuffer(take(8 * count), dtype=np.int64).copy()

        def small(lo, hi):
            return lo + take(1)[0] % (hi - lo + 1)

        op = small(0, 3)
        if op == 0:
            n_map, n_ids = small(0, 40), small(0, 40)
            native.canonicalize(i64s(n_map) % 64, i64s(n_ids) % 80 - small(0, 8))
            return "ok"
        if op == 1:
            N, K = small(1, 5), small(0, 4)
            n = max(N - 1, 0) * K
            ids = i64s(small(0, 30)) % 50 - small(0, 3)
            mult = i64s(N) | 1
            primes = np.abs(i64s(n)) % 1000 + small(0, 2) - 1
            offsets = np.cumsum(np.concatenate([[0], primes[:-1]])) if n else np.zeros(0, np.int64)
            offsets = offsets + small(0, 3) - 1
            vocab = int.from_bytes(take(2), "little") - 1
            native.hash_layer(ids, multipliers=mult, primes=primes, offsets=offsets, vocab=vocab,
                              pad_id=small(0, 60), max_ngram=N, n_head=K, start=small(0, 40) - 2,
                              with_mix=bool(small(0, 1)))
            return "ok"
        qtype = [0, 1, 30, 8, 2, 12, 99][small(0, 6)]
        dim = small(0, 64)
        n_rows = small(0, 40)
        raw = np.frombuffer(take(small(0, 255) * 8), dtype=np.uint8).copy()
        table = native.Table(raw, qtype, n_rows, dim)
        sets = []
        for _ in range(small(0, 3)):
            n = small(0, 12)
            rows = i64s(n) % 48 - small(0, 2)
            keys = None if small(0, 1) else i64s(n) % 5 - 1
            vdim = dim if small(0, 5) else small(0, 64)
            vtype = np.float16 if small(0, 1) else np.float32
            values = np.frombuffer(take(n * max(vdim, 0) * np.dtype(vtype).itemsize), dtype=vtype)
            values = values.reshape(n, max(vdim, 0)) if vdim else values.reshape(n, 0)
            build = native.OverrideSet.build if small(0, 1) else native.OverrideSet
            sets.append(build(rows, values, keys))
        g = native.Gatherer(table, sets)
        look = i64s(small(0, 24)) % 50 - small(0, 2)
        keys = None if small(0, 1) else i64s(len(look)) % 5 - 1
        out = g.gather(look, keys)
        assert out.shape == (len(look), table.dim)
        return "ok"


TARGETS = {"eov": EovTarget, "eov-valid": EovValidTarget, "gguf": GgufTarget, "kernel": KernelTarget}
SEED_DIRS = {"eov": "eov", "eov-valid": "eov", "gguf": "gguf", "kernel": "kernel"}


def make(name: str):
    return TARGETS[name]()


def scalar_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of each fixed-size header value of a GGUF file (for field edits)."""
    from engram_local.formats.header import GGUFFormatError, scan_gguf_bytes

    try:
        header = scan_gguf_bytes(data, "seed")
    except GGUFFormatError:
        return []
    widths = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    return [(at, widths[header.field_types[k]]) for k, at in header.scalar_offsets.items()]


