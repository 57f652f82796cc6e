"""User memory files (.eov): override rows for the memory tables plus the fact ledger, in GGUF.

Layout (EOV_FORMAT_VERSION 1; constants.py names every key and tensor; `gguf-dump` reads it):
  general.architecture   = "engram-overrides"
  eov.format_version     uint32
  eov.model_fingerprint  uint64   fingerprint of the Engram sidecar the rows were fitted for
  eov.layers             int32[]  layer ids with rows (absent when there are none)
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
  eov.{layer}.values     F16/F32 [n, head_dim]

Reading maps the file: the OverrideSets returned are views into it, not copies. `open_overrides`
is the one opener of override stacks (checks, then {layer: [OverrideSet, ...]}); every other way
of opening override files goes through it.

Writing is atomic and private: the new file is written to a temporary file beside the target
(created with mode 0600), flushed, fsync'ed and renamed over the target, and the directory is
fsync'ed, so a crash or a kill leaves either the old file or the new one, never a mix, and the
file holds only the current facts (a rewritten file has no slack carrying old bytes). Writers
of one file serialize through an advisory lock on `FILE.lock` (`locked`).

What a file reveals about its user: the ledger stores every fact's prompt and answer in plain
text, with the time it was written; the rows are fitted so the model reproduces those answers,
so anyone holding the file and the model can read the facts back by prompting; each row's key is
a hash of a three-token window of the user's own text (prompt and answer), which can be matched
against candidate phrases. Nothing is encrypted: treat the file like the facts themselves.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import gguf
import numpy as np

from engram_local import constants
from engram_local.native import OverrideSet
from engram_local.formats.table import find_tensor, read_gguf, tensor_bytes

UINT64_MAX = 2**64 - 1
FILE_MODE = 0o600


class MemoryFileError(ValueError):
    """An .eov file that cannot be used: unreadable, truncated, malformed or for another model."""


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
    def from_json(cls, d: dict, where: str) -> "LedgerFact":
        try:
            fact = cls(id=str(d["id"]), prompt=str(d["prompt"]), answer=str(d["answer"]),
                       entries=[int(e) for e in d.get("entries", [])],
                       paraphrases=[str(p) for p in d.get("paraphrases", [])],
                       written=str(d.get("written", "")), method=str(d.get("method", "joint")))
        except (KeyError, TypeError, ValueError) as exc:
            raise MemoryFileError(f"{where}: malformed fact in the ledger: {exc!r}") from None
        return fact


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
    def from_json(cls, d: dict, where: str) -> "ReplacedFact":
        try:
            return cls(id=str(d["id"]), prompt=str(d["prompt"]), answer=str(d["answer"]),
                       written=str(d.get("written", "")), replaced=str(d.get("replaced", "")),
                       by=str(d.get("by", "")), paraphrases=[str(p) for p in d.get("paraphrases", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MemoryFileError(f"{where}: malformed history record in the ledger: {exc!r}") from None


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


# --------------------------------------------------------------------------- writing

def _check_fingerprint(fingerprint) -> int:
    if isinstance(fingerprint, bool) or not isinstance(fingerprint, (int, np.integer)) \
            or not 0 <= int(fingerprint) <= UINT64_MAX:
        raise ValueError(f"fingerprint must be an integer in [0, 2**64), got {fingerprint!r}")
    return int(fingerprint)


def _build_sets(sets: Mapping[int, tuple]) -> dict[int, OverrideSet]:
    built: dict[int, OverrideSet] = {}
    for layer, entry in sorted(sets.items()):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < 2**31:
            raise ValueError(f"layer ids must be integers in [0, 2**31), got {layer!r}")
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise TypeError(f"sets[{layer}] must be a (rows, keys, values) tuple")
        rows, keys, values = entry
        override = OverrideSet.build(rows, values, keys)
        if len(override):
            built[int(layer)] = override
    return built


def write_memory_file(path: str | os.PathLike, fingerprint: int, sets: Mapping[int, tuple],
                      facts: Iterable[LedgerFact] | None = None,
                      history: Sequence[ReplacedFact] = ()) -> None:
    """Write `{layer: (rows, keys or None, values)}`, the ledger `facts` and its `history`
    (replaced facts, oldest first) atomically.

    Entries may come in any order: they are sorted by (row, key) here and the facts' entry
    indices are remapped to the sorted order (indices given count through `sets` in ascending
    layer order, each layer's entries as given). Duplicate (row, key) pairs are an error.
    Only the history records whose chain of replacements ends in one of `facts` are written
    (`live_history`).
    """
    fingerprint = _check_fingerprint(fingerprint)
    facts = list(facts) if facts is not None else None
    given = {int(l): e for l, e in sets.items()} if all(
        isinstance(l, (int, np.integer)) and not isinstance(l, bool) for l in sets) else sets
    built = _build_sets(given)
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
        for f in facts:
            try:
                f.entries = sorted(remap[int(e)] for e in f.entries)
            except KeyError as exc:
                raise ValueError(f"fact {f.id!r} lists entry {exc.args[0]}, which is not in the file") from None
        ids = [f.id for f in facts]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"duplicate fact id {dup!r}")

    writer = gguf.GGUFWriter(None, constants.EOV_ARCH)
    writer.add_uint32(constants.KEY_EOV_VERSION, constants.EOV_FORMAT_VERSION)
    writer.add_uint64(constants.KEY_EOV_FINGERPRINT, fingerprint)
    if built:  # gguf-py would drop an empty array anyway; readers treat absence as "none"
        writer.add_array(constants.KEY_EOV_LAYERS, list(built))
    if facts is not None:
        ledger = {"facts": [f.as_json() for f in facts]}
        kept = live_history(list(history), facts)
        if kept:
            ledger["history"] = [r.as_json() for r in kept]
        writer.add_string(constants.KEY_EOV_LEDGER, json.dumps(ledger, ensure_ascii=False,
                                                               separators=(",", ":")))
    for layer, override in built.items():
        keys = (override.keys if override.keys is not None
                else np.full(len(override), constants.ANY_KEY, dtype=np.int64))
        writer.add_tensor(constants.TENSOR_EOV_ROWS.format(layer=layer), override.rows)
        writer.add_tensor(constants.TENSOR_EOV_KEYS.format(layer=layer), keys)
        writer.add_tensor(constants.TENSOR_EOV_VALUES.format(layer=layer), override.values)
    _atomic_write(path, writer)


def _atomic_write(path: str | os.PathLike, writer: gguf.GGUFWriter) -> None:
    """Temporary file (0600) beside `path`, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        fd = -1
        writer.write_header_to_file(tmp)        # opens tmp "wb": the mode stays 0600
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if fd >= 0:
            os.close(fd)
        writer.close()
        if tmp.exists():
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

    The lock is `FILE.lock` beside the file (the file itself is replaced by each write, so its
    own inode cannot carry the lock); temporary files a killed writer left behind are removed.
    """
    import fcntl

    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            pid = stale.name[len(path.name) + 2:-4]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    stale.unlink()
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

def read_memory_file(path: str | os.PathLike, fingerprint: int | None = None,
                     model: str | None = None) -> MemoryFile:
    """The content of an .eov file, its override sets memory-mapped (no copies).

    With `fingerprint`, the file must have been written for that model (`model` names it in the
    error). Every problem raises MemoryFileError (a ValueError) naming the file; a missing file
    raises FileNotFoundError.
    """
    where = os.fspath(path)
    if not os.path.exists(where):
        raise FileNotFoundError(f"{where}: no such file")
    try:
        reader = read_gguf(path)
    except ValueError as exc:
        raise MemoryFileError(f"{exc} (the .eov file is damaged or truncated, or not an .eov file)") from None

    def value(key: str, required: bool = True):
        f = reader.fields.get(key)
        if f is None:
            if required:
                raise MemoryFileError(f"{where}: missing key {key!r}")
            return None
        try:
            return f.contents()
        except Exception as exc:   # a damaged value
            raise MemoryFileError(f"{where}: unreadable key {key!r}: {exc}") from None

    arch = value("general.architecture")
    if arch != constants.EOV_ARCH:
        raise MemoryFileError(f"{where}: not an override file (architecture {arch!r}, "
                              f"expected {constants.EOV_ARCH!r})")
    version = value(constants.KEY_EOV_VERSION)
    if version != constants.EOV_FORMAT_VERSION:
        raise MemoryFileError(f"{where}: override format version {version}, this engram-local reads "
                              f"version {constants.EOV_FORMAT_VERSION}")
    file_fingerprint = value(constants.KEY_EOV_FINGERPRINT)
    if isinstance(file_fingerprint, bool) or not isinstance(file_fingerprint, int):
        raise MemoryFileError(f"{where}: key {constants.KEY_EOV_FINGERPRINT!r} = {file_fingerprint!r} is "
                              "not an integer")
    if fingerprint is not None and file_fingerprint != fingerprint:
        in_use = f"the model in use, {model}" if model else "the model in use"
        raise MemoryFileError(
            f"{where}: this memory file belongs to another model: written for model fingerprint "
            f"{file_fingerprint:#018x}, not {int(fingerprint):#018x} ({in_use}); a user memory file only "
            f"works with the model it was written for: write its facts again for this model with "
            f"`engram-local remember`")
    layers = [int(v) for v in (value(constants.KEY_EOV_LAYERS, required=False) or [])]

    expected = {name.format(layer=layer) for layer in layers
                for name in (constants.TENSOR_EOV_ROWS, constants.TENSOR_EOV_KEYS,
                             constants.TENSOR_EOV_VALUES)}
    unexpected = sorted(t.name for t in reader.tensors if t.name not in expected)
    if unexpected:
        raise MemoryFileError(f"{where}: tensors of layers not listed in {constants.KEY_EOV_LAYERS}: "
                              f"{', '.join(unexpected)}")

    sets: dict[int, OverrideSet] = {}
    for layer in layers:
        arrays = []
        for name, types in ((constants.TENSOR_EOV_ROWS, {gguf.GGMLQuantizationType.I64}),
                            (constants.TENSOR_EOV_KEYS, {gguf.GGMLQuantizationType.I64}),
                            (constants.TENSOR_EOV_VALUES, {gguf.GGMLQuantizationType.F16,
                                                           gguf.GGMLQuantizationType.F32})):
            try:
                tensor = find_tensor(path, reader, name.format(layer=layer))
            except ValueError as exc:
                raise MemoryFileError(str(exc)) from None
            if tensor.tensor_type not in types:
                raise MemoryFileError(f"{where}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                                      f"expected {' or '.join(sorted(t.name for t in types))}")
            try:
                arrays.append(tensor_bytes(path, reader, tensor))
            except ValueError as exc:
                raise MemoryFileError(str(exc)) from None
        rows, keys, values = arrays
        try:
            sets[layer] = OverrideSet(rows, values, keys)
        except ValueError as exc:
            raise MemoryFileError(f"{where}: layer {layer}: {exc}") from exc

    facts: list[LedgerFact] = []
    history: list[ReplacedFact] = []
    ledger = value(constants.KEY_EOV_LEDGER, required=False)
    if ledger is not None:
        try:
            doc = json.loads(ledger)
        except ValueError:
            raise MemoryFileError(f"{where}: {constants.KEY_EOV_LEDGER} is not valid JSON") from None
        items = doc.get("facts") if isinstance(doc, dict) else doc
        if not isinstance(items, list):
            raise MemoryFileError(f"{where}: {constants.KEY_EOV_LEDGER} holds no list of facts")
        n_entries = sum(len(s) for s in sets.values())
        for d in items:
            if not isinstance(d, dict):
                raise MemoryFileError(f"{where}: malformed fact in the ledger: {d!r}")
            fact = LedgerFact.from_json(d, where)
            bad = [e for e in fact.entries if not 0 <= e < n_entries]
            if bad:
                raise MemoryFileError(f"{where}: fact {fact.id!r} lists entry {bad[0]}, the file has "
                                      f"{n_entries}")
            facts.append(fact)
        records = doc.get("history", []) if isinstance(doc, dict) else []
        if not isinstance(records, list):
            raise MemoryFileError(f"{where}: {constants.KEY_EOV_LEDGER} history is not a list")
        for d in records:
            if not isinstance(d, dict):
                raise MemoryFileError(f"{where}: malformed history record in the ledger: {d!r}")
            history.append(ReplacedFact.from_json(d, where))
    return MemoryFile(fingerprint=int(file_fingerprint), layers=sets, facts=facts, path=where,
                      history=history)


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
    """`{layer: OverrideSet}` of one override file, as memory-mapped views (no copies).

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
    creates it), be a readable file, be an .eov file this engram-local reads, be bound to
    `model_fingerprint` when one is given (`model` names that model in the error) and have rows
    only for `engram_layers` when given. A missing file raises FileNotFoundError, every other
    problem MemoryFileError (a ValueError); each is one line naming the file.
    """
    paths = list(paths)
    stacks: dict[int, list[OverrideSet]] = {}
    for i, path in enumerate(paths):
        where = os.fspath(path)
        if not os.path.exists(where):
            if allow_missing_last and i == len(paths) - 1:
                continue
            raise FileNotFoundError(f"{where}: override file not found")
        if os.path.isdir(where):
            raise MemoryFileError(f"{where}: is a directory, not an override (.eov) file")
        if not os.access(where, os.R_OK):
            raise MemoryFileError(f"{where}: override file is not readable (permission denied)")
        try:
            layers = read_memory_file(where, model_fingerprint, model).layers
        except OSError as exc:
            raise MemoryFileError(f"{where}: not a readable override file: {exc.strerror or exc}") from None
        if engram_layers is not None:
            check_engram_layers(layers, engram_layers, where, MemoryFileError)
        for layer, s in sorted(layers.items()):
            stacks.setdefault(layer, []).append(s)
    return stacks
