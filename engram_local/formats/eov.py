"""User memory files (.eov): override rows for the memory tables plus the fact ledger, in GGUF.

Layout (format version 2, constants.EOV_WRITE_VERSION; constants.py names every key and tensor;
`gguf-dump` reads it):
  general.architecture   = "engram-overrides"
  eov.format_version     uint32   2 (version 1 files, which have no checksum, are still read;
                                  the next write upgrades them)
  eov.checksum           uint64   xxh3_64 of the whole file with these 8 bytes zeroed (version 2)
  eov.model_fingerprint  uint64   fingerprint of the Engram sidecar the rows were fitted for
  eov.layers             int32[]  layer ids with rows, ascending (absent when there are none)
  eov.ledger             string   JSON fact ledger (absent in a file that carries no facts):
      {"facts": [{"id", "prompt", "answer", "paraphrases" (if any), "written" (UTC ISO-8601),
                  "method" (if not "joint"), "entries": [i, ...]}, ...],
       "history": [{"id", "prompt", "answer", "paraphrases" (if any), "written", "replaced"
                    (UTC ISO-8601), "by" (the id of the fact that replaced it)}, ...] (if any)}
      `entries` index the file's entries, counted through the layers in eov.layers order;
      they are the rows written for that fact (rows shared by several facts are listed by each).
      `history` holds the facts later facts replaced (an update: the same prompt, a new answer),
      oldest first; they have no rows. A file without "history" reads as having none.
  eov.{layer}.rows       I64 [n]           ascending by (row, key)
  eov.{layer}.keys       I64 [n]           exact N-gram key of the look-up the row serves; -1 = any
  eov.{layer}.values     F16/F32 [n, head_dim]   finite, |v| <= MAX_ABS_VALUE

Reading (`read_memory_file`, and `open_overrides`, the one opener of override stacks) reads the
whole file into private memory (files are kilobytes): a file changed, truncated or replaced
while a session runs cannot crash it or alter the rows it loaded. Every open verifies the
checksum and validates every field's type and range, every row (finite, bounded, sorted, no
duplicate (row, key)), every ledger entry and fact id; any problem is one MemoryFileError line
naming the file, and the file is not used. Only regular files are opened (a FIFO or device is
refused before it could block). `parse_memory_bytes` is the same check on bytes (fuzzed).

Writing is atomic and private: the new file is built in memory (validated by the same checks),
written to a temporary file `.NAME.<pid>.tmp` beside the target (created 0600, removed on every
error path; ones a killed writer left behind are removed by the next write), fsync'ed and
renamed over the target, and the directory is fsync'ed, so a crash or a kill leaves either the
old file or the new one, never a mix, and the file holds only the current facts (a rewritten
file has no slack carrying old bytes). A symlink is written through: the file it points to is
replaced, the link stays (so `forget` through a link removes the fact from the real file).
Writers of one file serialize through an advisory lock on `FILE.lock` (`locked`).

With a key in ENGRAM_LOCAL_KEY / ENGRAM_LOCAL_KEY_FILE every file written is encrypted
(formats.sealed: AES-256-GCM over the whole file); without one, nothing is encrypted.

What a file reveals about its user: the ledger stores every fact's prompt and answer in plain
text, with the time it was written; the rows are fitted so the model reproduces those answers,
so anyone holding the file and the model can read the facts back by prompting; each row's key is
a hash of a three-token window of the user's own text (prompt and answer), which can be matched
against candidate phrases. Unless it is encrypted, treat the file like the facts themselves
(docs/security.md).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import signal
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import gguf
import numpy as np
import xxhash

from engram_local import constants
from engram_local.formats import sealed
from engram_local.formats.header import GGUFFormatError, file_type_name, scan_gguf_bytes, tensor_view
from engram_local.native import OverrideSet

UINT64_MAX = 2**64 - 1
FILE_MODE = 0o600
MAX_ABS_VALUE = 1e6          # a row value beyond this is damage, not a fit (fits stay < 1e5)
MAX_FILE_BYTES = 1 << 30     # memory files are kilobytes; refuse to read gigabytes into memory
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
# Test hook: ENGRAM_LOCAL_FAULT=eov-write:STAGE kills the writing process (SIGKILL) at STAGE
# (tests/test_hardening_crash.py, bench/crash_eov.py).
FAULT_ENV = "ENGRAM_LOCAL_FAULT"
WRITE_STAGES = ("tmp-created", "half-written", "written", "synced", "renamed")


class MemoryFileError(ValueError):
    """An .eov file that cannot be used: unreadable, truncated, malformed, changed since it was
    written, or for another model."""


def _field(d: dict, key: str, where: str, what: str, kind: str = "str", default=None):
    """d[key] checked: "str", "str_list" or "int_list" (`default` when absent; required if None)."""
    if key not in d:
        if default is None:
            raise MemoryFileError(f"{where}: {what} has no {key!r}")
        return default
    v = d[key]
    ok = {"str": isinstance(v, str),
          "str_list": isinstance(v, list) and all(isinstance(x, str) for x in v),
          "int_list": isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
          }[kind]
    if not ok:
        wanted = {"str": "a string", "str_list": "a list of strings", "int_list": "a list of integers"}[kind]
        raise MemoryFileError(f"{where}: {what}: {key!r} must be {wanted}, got {type(v).__name__}")
    return v


@dataclass
class LedgerFact:
    """One fact of the ledger."""
    id: str
    prompt: str
    answer: str
    entries: list[int] = field(default_factory=list)   # indices into the file's entries
    paraphrases: list[str] = field(default_factory=list)
    written: str = ""                                    # UTC ISO-8601
    method: str = "joint"

    def as_json(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "answer": self.answer}
        if self.paraphrases:
            d["paraphrases"] = list(self.paraphrases)
        d["written"] = self.written
        if self.method != "joint":
            d["method"] = self.method
        d["entries"] = [int(e) for e in self.entries]
        return d

    @classmethod
    def from_json(cls, d, where: str) -> "LedgerFact":
        """A fact of a ledger, every field type-checked (MemoryFileError otherwise)."""
        return _record(cls, d, where, "fact", {"entries": ("int_list", []), "paraphrases": ("str_list", []),
                                                "written": ("str", ""), "method": ("str", "joint")})


@dataclass
class ReplacedFact:
    """A fact of the ledger's history: replaced at `replaced` by the fact with id `by`."""
    id: str
    prompt: str
    answer: str
    written: str = ""                                    # UTC ISO-8601, when it was written
    replaced: str = ""                                   # UTC ISO-8601, when it was replaced
    by: str = ""                                         # the id of the fact that replaced it
    paraphrases: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "answer": self.answer}
        if self.paraphrases:
            d["paraphrases"] = list(self.paraphrases)
        d.update(written=self.written, replaced=self.replaced, by=self.by)
        return d

    @classmethod
    def from_json(cls, d, where: str) -> "ReplacedFact":
        """A history record, every field type-checked (MemoryFileError otherwise)."""
        return _record(cls, d, where, "history record", {"written": ("str", ""), "replaced": ("str", ""),
                                                          "by": ("str", ""), "paraphrases": ("str_list", [])})


def _record(cls, d, where: str, kind: str, optional: dict):
    """`cls` from a ledger record `d`: "id", "prompt" and "answer" strings, and the `optional`
    fields {name: (kind, default)}, each type-checked."""
    if not isinstance(d, dict):
        raise MemoryFileError(f"{where}: malformed {kind} in the ledger (a {type(d).__name__})")
    rid = _field(d, "id", where, f"a {kind} of the ledger")
    what = f"{kind} {rid!r}"
    values = {name: _field(d, name, where, what) for name in ("prompt", "answer")}
    for name, (field_kind, default) in optional.items():
        value = _field(d, name, where, what, field_kind, default)
        values[name] = list(value) if isinstance(value, list) else value
    return cls(id=rid, **values)


def live_history(history: Sequence[ReplacedFact], facts: Sequence[LedgerFact]) -> list[ReplacedFact]:
    """The records of `history` whose chain of replacements ends in one of `facts`: a record's
    successor is the fact `by` names, or, when no fact has that id, a later record with that id.
    The records of a chain whose last fact was forgotten are dropped with it, so `forget` leaves
    no earlier answer of a forgotten fact in the file."""
    ids = {f.id for f in facts}
    alive = [False] * len(history)
    for i in range(len(history) - 1, -1, -1):
        r = history[i]
        if r.by in ids:
            alive[i] = True
        else:
            later = [j for j in range(i + 1, len(history)) if history[j].id == r.by]
            alive[i] = bool(later) and alive[later[0]]
    return [r for r, a in zip(history, alive) if a]


@dataclass
class MemoryFile:
    """The content of an .eov file: entries per layer, the facts that own them, and the
    history of replaced facts (oldest first)."""
    fingerprint: int
    layers: dict[int, OverrideSet] = field(default_factory=dict)
    facts: list[LedgerFact] = field(default_factory=list)
    path: str | None = None
    history: list["ReplacedFact"] = field(default_factory=list)
    format_version: int = constants.EOV_WRITE_VERSION
    sealed: bool = False                  # read from an encrypted file

    def entries(self) -> list[tuple[int, int, int]]:
        """(layer, row, key) of every entry, in ledger order (layers ascending)."""
        out = []
        for layer in sorted(self.layers):
            s = self.layers[layer]
            keys = s.keys if s.keys is not None else np.full(len(s), constants.ANY_KEY, np.int64)
            out.extend((layer, int(r), int(k)) for r, k in zip(s.rows, keys))
        return out

    def values(self) -> np.ndarray:
        """float32 [n_entries, head_dim] in entries() order."""
        parts = [np.asarray(self.layers[l].values, np.float32) for l in sorted(self.layers)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def value_type(self) -> str:
        types = {self.layers[l].values.dtype for l in self.layers}
        return "f32" if np.dtype(np.float32) in types else "f16"

    def fact(self, fact_id: str) -> LedgerFact:
        for f in self.facts:
            if f.id == fact_id:
                return f
        raise KeyError(fact_id)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")




# --------------------------------------------------------------------------- checks shared by writer and reader

def _check_fingerprint(fingerprint) -> int:
    if isinstance(fingerprint, bool) or not isinstance(fingerprint, (int, np.integer)) \
            or not 0 <= int(fingerprint) <= UINT64_MAX:
        raise ValueError(f"fingerprint must be an integer in [0, 2**64), got {fingerprint!r}")
    return int(fingerprint)


def _check_values(values: np.ndarray, where: str, layer: int) -> None:
    """Rows must be finite and at most MAX_ABS_VALUE in magnitude."""
    v = np.asarray(values)
    if not v.size:
        return
    bad = ~np.isfinite(v) | (np.abs(v.astype(np.float32)) > MAX_ABS_VALUE)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        x = v.reshape(v.shape[0], -1)[i][bad.reshape(v.shape[0], -1)[i]][0]
        raise MemoryFileError(f"{where}: layer {layer} entry {i} has value {float(x)!r}: rows must be "
                              f"finite and within +-{MAX_ABS_VALUE:g}")


def _check_ledger(doc, n_entries: int, where: str) -> tuple[list[LedgerFact], list[ReplacedFact]]:
    """The facts and history of a ledger document, every field type- and range-checked: entries
    within the file's `n_entries`, no entry listed twice by one fact, distinct non-empty fact ids."""
    items = doc.get("facts") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise MemoryFileError(f"{where}: {constants.KEY_EOV_LEDGER} holds no list of facts")
    facts, seen = [], set()
    for d in items:
        fact = LedgerFact.from_json(d, where)
        if not fact.id:
            raise MemoryFileError(f"{where}: a fact of the ledger has an empty id")
        if fact.id in seen:
            raise MemoryFileError(f"{where}: duplicate fact id {fact.id!r} in the ledger")
        seen.add(fact.id)
        bad = [e for e in fact.entries if not 0 <= e < n_entries]
        if bad:
            raise MemoryFileError(f"{where}: fact {fact.id!r} lists entry {bad[0]}, the file has {n_entries}")
        if len(set(fact.entries)) != len(fact.entries):
            raise MemoryFileError(f"{where}: fact {fact.id!r} lists an entry twice")
        facts.append(fact)
    records = doc.get("history", []) if isinstance(doc, dict) else []
    if not isinstance(records, list):
        raise MemoryFileError(f"{where}: {constants.KEY_EOV_LEDGER} history is not a list")
    return facts, [ReplacedFact.from_json(d, where) for d in records]


def _make_set(where: str, layer: int, rows, values, keys) -> OverrideSet:
    """An OverrideSet of validated entries (sorted, distinct, finite, bounded)."""
    _check_values(values, where, layer)
    try:
        return OverrideSet(rows, values, keys)
    except (ValueError, TypeError) as exc:
        raise MemoryFileError(f"{where}: layer {layer}: {exc}") from None


# --------------------------------------------------------------------------- writing

def _build_sets(sets: Mapping[int, tuple], where: str) -> dict[int, OverrideSet]:
    built: dict[int, OverrideSet] = {}
    for layer, entry in sorted(sets.items()):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < 2**31:
            raise ValueError(f"layer ids must be integers in [0, 2**31), got {layer!r}")
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise TypeError(f"sets[{layer}] must be a (rows, keys, values) tuple")
        rows, keys, values = entry
        override = OverrideSet.build(rows, values, keys)
        if len(override):
            _check_values(override.values, where, int(layer))
            built[int(layer)] = override
    dims = {s.dim for s in built.values()}
    if len(dims) > 1:
        raise ValueError(f"{where}: rows of different widths {sorted(dims)} in one file")
    return built


def write_memory_file(path: str | os.PathLike, fingerprint: int, sets: Mapping[int, tuple],
                      facts: Iterable[LedgerFact] | None = None,
                      history: Sequence[ReplacedFact] = ()) -> None:
    """Write `{layer: (rows, keys or None, values)}`, the ledger `facts` and its `history`
    (replaced facts, oldest first) atomically.

    Entries may come in any order: they are sorted by (row, key) here and the facts' entry
    indices are remapped to the sorted order (indices given count through `sets` in ascending
    layer order, each layer's entries as given). Duplicate (row, key) pairs, NaN/Inf or
    absurd values (beyond MAX_ABS_VALUE), duplicate fact ids and fields that are not strings are
    errors (the checks `read_memory_file` makes); nothing is written then.
    Only the history records whose chain of replacements ends in one of `facts` are written
    (`live_history`).
    """
    where = os.fspath(path)
    fingerprint = _check_fingerprint(fingerprint)
    facts = list(facts) if facts is not None else None
    given = {int(l): e for l, e in sets.items()} if all(
        isinstance(l, (int, np.integer)) and not isinstance(l, bool) for l in sets) else sets
    built = _build_sets(given, where)
    kvs = [("general.architecture", gguf.GGUFValueType.STRING, constants.EOV_ARCH),
           (constants.KEY_EOV_VERSION, gguf.GGUFValueType.UINT32, constants.EOV_WRITE_VERSION),
           (constants.KEY_EOV_CHECKSUM, gguf.GGUFValueType.UINT64, 0),
           (constants.KEY_EOV_FINGERPRINT, gguf.GGUFValueType.UINT64, fingerprint)]
    if built:  # readers treat absence as "none"
        kvs.append((constants.KEY_EOV_LAYERS, gguf.GGUFValueType.INT32, list(built)))
    if facts is not None:
        # old index (through the given layers in ascending order) -> new (sorted) index
        remap, old_base, new_base = {}, 0, 0
        for layer, entry in sorted(given.items()):
            rows = np.asarray(entry[0]).reshape(-1)
            n = rows.shape[0]
            if layer in built:
                keys = entry[1]
                sort_keys = (np.full(n, constants.ANY_KEY, np.int64) if keys is None
                             else np.asarray(keys, np.int64).reshape(-1))
                order = np.lexsort((sort_keys, rows.astype(np.int64)))
                inverse = np.empty(n, np.int64)
                inverse[order] = np.arange(n)
                for i in range(n):
                    remap[old_base + i] = new_base + int(inverse[i])
                new_base += n
            old_base += n
        ledger = {"facts": []}
        for f in facts:
            d = f.as_json()
            try:
                d["entries"] = sorted(remap[int(e)] for e in f.entries)
            except KeyError as exc:
                raise ValueError(f"fact {f.id!r} lists entry {exc.args[0]}, which is not in the file") from None
            ledger["facts"].append(d)
        kept = live_history(list(history), facts)
        if kept:
            ledger["history"] = [r.as_json() for r in kept]
        _check_ledger(ledger, new_base, where)          # what the reader will check
        for f, d in zip(facts, ledger["facts"]):
            f.entries = d["entries"]
        kvs.append((constants.KEY_EOV_LEDGER, gguf.GGUFValueType.STRING,
                    json.dumps(ledger, ensure_ascii=False, separators=(",", ":"))))
    tensors = []
    for layer, override in built.items():
        keys = (override.keys if override.keys is not None
                else np.full(len(override), constants.ANY_KEY, dtype=np.int64))
        tensors += [(constants.TENSOR_EOV_ROWS.format(layer=layer), override.rows),
                    (constants.TENSOR_EOV_KEYS.format(layer=layer), keys),
                    (constants.TENSOR_EOV_VALUES.format(layer=layer), override.values)]
    data, offsets = gguf_bytes(kvs, tensors)
    at = offsets[constants.KEY_EOV_CHECKSUM]
    data[at:at + 8] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(data)))
    key = sealed.configured_key()
    _atomic_write(path, bytes(data) if key is None else sealed.seal(bytes(data), key))


_TENSOR_TYPES = {np.dtype(np.int64): gguf.GGMLQuantizationType.I64,
                 np.dtype(np.int32): gguf.GGMLQuantizationType.I32,
                 np.dtype(np.float16): gguf.GGMLQuantizationType.F16,
                 np.dtype(np.float32): gguf.GGMLQuantizationType.F32,
                 np.dtype(np.float64): gguf.GGMLQuantizationType.F64}
_KV_FORMATS = {gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.UINT64: "<Q",
               gguf.GGUFValueType.INT32: "<i"}


def gguf_bytes(kvs: Sequence[tuple[str, gguf.GGUFValueType, object]],
               tensors: Sequence[tuple[str, np.ndarray]]) -> tuple[bytearray, dict[str, int]]:
    """A GGUF v3 file in memory (what gguf.GGUFWriter writes, built without a file) and the
    offset of each scalar value. Values: STRING, UINT32, UINT64, or INT32 (a list: an array);
    tensors: int64, int32, float16, float32 or float64 arrays, 1-D to 4-D."""
    def string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    out = bytearray(struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, len(tensors), len(kvs)))
    offsets = {}
    for key, vtype, value in kvs:
        out += string(key)
        if isinstance(value, list):
            out += struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, vtype, len(value))
            out += struct.pack(f"<{len(value)}{_KV_FORMATS[vtype][1]}", *value)
            continue
        out += struct.pack("<I", vtype)
        if vtype == gguf.GGUFValueType.STRING:
            out += string(value)
        else:
            offsets[key] = len(out)
            out += struct.pack(_KV_FORMATS[vtype], value)
    pad = lambda n: -n % ALIGNMENT  # noqa: E731
    offset = 0
    for name, array in tensors:
        out += string(name) + struct.pack("<I", array.ndim)
        out += struct.pack(f"<{array.ndim}Q", *reversed(array.shape))
        out += struct.pack("<IQ", _TENSOR_TYPES[array.dtype], offset)
        offset += array.nbytes + pad(array.nbytes)
    out += bytes(pad(len(out)))
    for _, array in tensors:
        out += np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        out += bytes(pad(array.nbytes))
    return out, offsets


def _fault(stage: str) -> None:
    """The fault-injection hook (FAULT_ENV): SIGKILL this process at write stage `stage`."""
    if os.environ.get(FAULT_ENV) == f"eov-write:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def check_write_target(path: str | os.PathLike) -> Path:
    """The file a write replaces: `path`, or the file it points to when it is a symlink (written
    through, the link stays). Refuses, in one line, targets that cannot be an .eov file or whose
    directory cannot take the write."""
    where = os.fspath(path)
    target = Path(os.path.realpath(where))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise MemoryFileError(f"{where}: cannot write: {exc.strerror or exc}") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise MemoryFileError(f"{where}: {file_type_name(st.st_mode)}, not a memory (.eov) file")
        if not os.access(target, os.W_OK):
            raise MemoryFileError(f"{where}: the memory file is read-only (no write permission)")
    directory = target.parent
    if not directory.is_dir():
        raise MemoryFileError(f"{where}: cannot write: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MemoryFileError(f"{where}: cannot write: directory {directory} is not writable")
    return target


def _tmp_name(target: Path, pid: int) -> Path:
    return target.with_name(f".{target.name}.{pid}.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files killed writers of `path` left (`.NAME.<pid>.tmp` whose pid
    is not alive); the ones removed."""
    target = Path(os.path.realpath(os.fspath(path)))
    removed = []
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name[len(target.name) + 2:-4]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed.append(stale)
    return removed


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """`data` to a 0600 temporary file beside the target, fsync, rename over the target, fsync
    the directory; the temporary file is removed on every error path. OSErrors become one
    MemoryFileError line naming `path`."""
    where = os.fspath(path)
    target = check_write_target(path)
    remove_stale_temps(target)
    tmp = _tmp_name(target, os.getpid())
    fd = -1
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()                         # our own pid's leftover (a reused pid)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        _fault("tmp-created")
        view = memoryview(data)
        half = len(data) // 2
        done = 0
        while done < len(data):
            done += os.write(fd, view[done:half if done < half else len(data)])
            if done == half:
                _fault("half-written")
        _fault("written")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _fault("synced")
        os.replace(tmp, target)
        _fault("renamed")
        _fsync_dir(target.parent)
    except OSError as exc:
        raise MemoryFileError(f"{where}: cannot write the memory file: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold the exclusive write lock of an .eov file (blocks while another writer holds it).

    The lock is `FILE.lock` beside the file a symlink `path` points to (the file itself is
    replaced by each write, so its own inode cannot carry the lock); temporary files a killed
    writer left behind are removed. A directory where the lock cannot be made is one
    MemoryFileError line.
    """
    import fcntl

    where = os.fspath(path)
    target = Path(os.path.realpath(where))
    lock_path = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise MemoryFileError(f"{where}: cannot lock the memory file ({lock_path}): "
                              f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        remove_stale_temps(target)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


# --------------------------------------------------------------------------- reading

def read_file_bytes(path: str | os.PathLike, what: str = "memory (.eov) file") -> bytes:
    """The whole content of a regular file, read into private memory. A missing file raises
    FileNotFoundError; a FIFO, device, directory, unreadable or oversized file MemoryFileError
    (one line) - checked before opening and again on the open descriptor (opened non-blocking),
    so nothing can block."""
    where = os.fspath(path)
    try:
        st = os.stat(where)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except OSError as exc:
        raise MemoryFileError(f"{where}: cannot read the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MemoryFileError(f"{where}: {file_type_name(st.st_mode)}, not a {what}")
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except OSError as exc:
        raise MemoryFileError(f"{where}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MemoryFileError(f"{where}: {file_type_name(st.st_mode)}, not a {what}")
        if st.st_size > MAX_FILE_BYTES:
            raise MemoryFileError(f"{where}: {st.st_size} bytes; a {what} is at most {MAX_FILE_BYTES}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise MemoryFileError(f"{where}: grew past {MAX_FILE_BYTES} bytes while being read")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise MemoryFileError(f"{where}: cannot read the {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_memory_file(path: str | os.PathLike, fingerprint: int | None = None,
                     model: str | None = None) -> MemoryFile:
    """The content of an .eov file, read whole into private memory and checked
    (`parse_memory_bytes`).

    With `fingerprint`, the file must have been written for that model (`model` names it in the
    error). Every problem raises MemoryFileError (a ValueError) naming the file; a missing file
    raises FileNotFoundError.
    """
    return parse_memory_bytes(read_file_bytes(path), os.fspath(path), fingerprint, model)


def parse_memory_bytes(data: bytes, where: str, fingerprint: int | None = None,
                       model: str | None = None) -> MemoryFile:
    """The MemoryFile of an .eov file's bytes `data` (`where` names it in errors): decrypted
    when sealed, checksum verified (format version 2), every key, tensor, row and ledger field
    validated. Any problem raises MemoryFileError."""
    was_sealed = sealed.is_sealed(data)
    if was_sealed:
        try:
            data = sealed.unseal(data, sealed.configured_key(), where)
        except sealed.SealError as exc:
            raise MemoryFileError(str(exc)) from None
    try:
        header = scan_gguf_bytes(data, where)
    except GGUFFormatError as exc:
        raise MemoryFileError(f"{exc} (the .eov file is damaged or truncated, or not an .eov file)") from None
    try:
        memory = _parse(data, header, where, fingerprint, model)
    except GGUFFormatError as exc:          # a key of the wrong type (header.typed)
        raise MemoryFileError(str(exc)) from None
    memory.sealed = was_sealed
    return memory


def _parse(data: bytes, header, where: str, fingerprint: int | None, model: str | None) -> MemoryFile:
    arch = header.fields.get("general.architecture")
    if arch != constants.EOV_ARCH:
        raise MemoryFileError(f"{where}: not an override file (architecture {arch!r}, "
                              f"expected {constants.EOV_ARCH!r})")
    version = header.typed(constants.KEY_EOV_VERSION, "uint")
    if version not in constants.EOV_READ_VERSIONS:
        raise MemoryFileError(f"{where}: override format version {version}, this engram-local reads "
                              f"versions {', '.join(map(str, constants.EOV_READ_VERSIONS))}")
    known = {"general.architecture", constants.KEY_EOV_VERSION, constants.KEY_EOV_FINGERPRINT,
             constants.KEY_EOV_LAYERS, constants.KEY_EOV_LEDGER}
    if version >= constants.EOV_WRITE_VERSION:
        known.add(constants.KEY_EOV_CHECKSUM)
        if header.field_types.get(constants.KEY_EOV_CHECKSUM) != gguf.GGUFValueType.UINT64:
            raise MemoryFileError(f"{where}: no {constants.KEY_EOV_CHECKSUM} (uint64) in a version {version} "
                                  "file (damaged?)")
        at = header.scalar_offsets[constants.KEY_EOV_CHECKSUM]
        stored = header.fields[constants.KEY_EOV_CHECKSUM]
        actual = xxhash.xxh3_64_intdigest(data[:at] + bytes(8) + data[at + 8:])
        if actual != stored:
            raise MemoryFileError(f"{where}: checksum mismatch (stored {stored:#018x}, content hashes to "
                                  f"{actual:#018x}): the file was changed or damaged after it was "
                                  "written; it is not used")
    unknown = sorted(set(header.fields) - known)
    if unknown:
        raise MemoryFileError(f"{where}: unexpected key {unknown[0]!r} (damaged, or not an .eov file)")
    if header.field_types.get(constants.KEY_EOV_FINGERPRINT, gguf.GGUFValueType.UINT64) \
            != gguf.GGUFValueType.UINT64:
        raise MemoryFileError(f"{where}: key {constants.KEY_EOV_FINGERPRINT!r} is not a uint64")
    file_fingerprint = header.typed(constants.KEY_EOV_FINGERPRINT, "uint")
    if fingerprint is not None and file_fingerprint != fingerprint:
        in_use = f"the model in use, {model}" if model else "the model in use"
        raise MemoryFileError(
            f"{where}: this memory file belongs to another model: written for model fingerprint "
            f"{file_fingerprint:#018x}, not {int(fingerprint):#018x} ({in_use}); a user memory file only "
            f"works with the model it was written for: write its facts again for this model with "
            f"`engram-local remember`")
    layers = header.typed(constants.KEY_EOV_LAYERS, "int_list", required=False) or []
    if any(not 0 <= layer < 2**31 for layer in layers) or layers != sorted(set(layers)):
        raise MemoryFileError(f"{where}: {constants.KEY_EOV_LAYERS} {layers[:8]} are not distinct "
                              "ascending layer ids")

    expected = {name.format(layer=layer) for layer in layers
                for name in (constants.TENSOR_EOV_ROWS, constants.TENSOR_EOV_KEYS,
                             constants.TENSOR_EOV_VALUES)}
    unexpected = sorted(set(header.tensors) - expected)
    if unexpected:
        raise MemoryFileError(f"{where}: tensors of layers not listed in {constants.KEY_EOV_LAYERS}: "
                              f"{', '.join(unexpected[:5])}")
    raw = np.frombuffer(data, dtype=np.uint8)
    I64, F16, F32 = (gguf.GGMLQuantizationType.I64, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.F32)
    sets: dict[int, OverrideSet] = {}
    dims = set()
    for layer in layers:
        arrays = []
        for name, types, ndim in ((constants.TENSOR_EOV_ROWS, {I64}, 1), (constants.TENSOR_EOV_KEYS, {I64}, 1),
                                  (constants.TENSOR_EOV_VALUES, {F16, F32}, 2)):
            name = name.format(layer=layer)
            info = header.tensors.get(name)
            if info is None:
                available = ", ".join(sorted(header.tensors)) or "(none)"
                raise MemoryFileError(f"{where}: no tensor {name!r}; available: {available}")
            if info.qtype not in types:
                raise MemoryFileError(f"{where}: tensor {name!r} has type {info.type_name}, "
                                      f"expected {' or '.join(sorted(t.name for t in types))}")
            if len(info.shape) != ndim:
                raise MemoryFileError(f"{where}: tensor {name!r} has {len(info.shape)} dimensions, "
                                      f"expected {ndim}")
            arrays.append(tensor_view(info, raw[info.offset:info.offset + info.nbytes]))
        rows, keys, values = arrays
        if not (rows.shape[0] == keys.shape[0] == values.shape[0]) or values.shape[1] < 1:
            raise MemoryFileError(f"{where}: layer {layer}: rows {list(rows.shape)}, keys {list(keys.shape)} "
                                  f"and values {list(values.shape)} do not match")
        dims.add(values.shape[1])
        sets[layer] = _make_set(where, layer, rows, values, keys)
    if len(dims) > 1:
        raise MemoryFileError(f"{where}: rows of different widths {sorted(dims)} in one file")

    facts: list[LedgerFact] = []
    history: list[ReplacedFact] = []
    ledger = header.typed(constants.KEY_EOV_LEDGER, "str", required=False)
    if ledger is not None:
        try:
            doc = json.loads(ledger)
        except (ValueError, RecursionError):
            raise MemoryFileError(f"{where}: {constants.KEY_EOV_LEDGER} is not valid JSON") from None
        facts, history = _check_ledger(doc, sum(len(s) for s in sets.values()), where)
    return MemoryFile(fingerprint=int(file_fingerprint), layers=sets, facts=facts, path=where,
                      history=history, format_version=version)


# --------------------------------------------------------------------------- the minimal API
# (kept for callers that need rows only)

def write_override_file(path: str | os.PathLike, sets: Mapping[int, tuple],
                        fingerprint: int) -> None:
    """Write `{layer: (rows, keys or None, values)}` for the model with `fingerprint` (no ledger).

    Entries may come in any order (they are sorted by (row, key)); duplicate (row, key)
    pairs are an error; layers without entries are left out. Atomic, like every write.
    """
    write_memory_file(path, fingerprint, sets, facts=None)


def open_override_file(path: str | os.PathLike,
                       fingerprint: int | None = None) -> dict[int, OverrideSet]:
    """`{layer: OverrideSet}` of one override file (read into private memory).

    With `fingerprint`, the file must have been written for that model fingerprint.
    """
    return {layer: sets[0] for layer, sets in open_overrides([path], fingerprint).items()}


# --------------------------------------------------------------------------- the override stack

def check_engram_layers(layers: Iterable[int], engram_layers: Sequence[int], where: str | None = None,
                        error: type[Exception] = ValueError) -> None:
    """Refuse override rows for a layer without an Engram: raises `error` naming the layers
    (and the file `where` they come from)."""
    unknown = sorted(set(layers) - set(engram_layers))
    if unknown:
        what = f"{where}: has rows for layers {unknown}" if where else f"override sets for layers {unknown}"
        raise error(f"{what}, but the model's Engram layers are {list(engram_layers)}")


def open_overrides(paths: Sequence[str | os.PathLike], model_fingerprint: int | None = None, *,
                   engram_layers: Sequence[int] | None = None, allow_missing_last: bool = False,
                   model: str | None = None) -> dict[int, list[OverrideSet]]:
    """{layer: [OverrideSet, ...]} of .eov files, in the order given (pass the list as a layer's
    stack: a later file wins on a shared row); the one opener of override files.

    Each file must exist (`allow_missing_last`: the last one may not exist yet, the first write
    creates it), be a readable regular file, be an unchanged .eov file this engram-local reads, be bound to
    `model_fingerprint` when one is given (`model` names that model in the error) and have rows
    only for `engram_layers` when given. A missing file raises FileNotFoundError, every other
    problem MemoryFileError (a ValueError); each is one line naming the file.
    """
    paths = list(paths)
    stacks: dict[int, list[OverrideSet]] = {}
    for i, path in enumerate(paths):
        where = os.fspath(path)
        if not os.path.exists(where) and allow_missing_last and i == len(paths) - 1:
            continue
        try:
            layers = read_memory_file(where, model_fingerprint, model).layers
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: override file not found") from None
        if engram_layers is not None:
            check_engram_layers(layers, engram_layers, where, MemoryFileError)
        for layer, s in sorted(layers.items()):
            stacks.setdefault(layer, []).append(s)
    return stacks
