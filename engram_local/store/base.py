"""The memory store interface: where the users' .eov files live, versioned, with a write log.

A store holds one current memory (the bytes of one .eov file) per user. Readers get a whole
version or nothing (`get`); writers of one user serialise through `lock(user)` (across threads,
processes and, for a database store, nodes); every write and forget is one atomic `put` that
also appends to the user's log (who, when, which fact ids; never fact text).

Writing goes through `edit(user)` when the writer wants a file (the facade writes .eov files by
path): it takes the user's lock, copies the current version into a private temporary file, and
on a clean exit stores the file as the new version (compare-and-swap against the version it
copied, so a write can never overwrite one it did not see):

    with store.edit(user, "remember") as ed:
        report = facade.remember(ed.path, facts, em, tok, fingerprint)
        ed.fact_ids = report.new_ids
    ed.memory       # the new Memory (None when the file did not change)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

__all__ = ["MemoryStore", "Memory", "LogEntry", "Edit", "StoreError", "VersionConflict", "ABSENT",
           "ACTIONS", "check_user", "memory_meta"]

Version = Union[int, str]
ABSENT: Version = 0          # the version of a user who has no memory (expect_version=ABSENT: create)
# What a log entry records: a write of facts, a forget (older versions' bytes are then deleted),
# a whole-user delete.
ACTIONS = ("remember", "forget", "delete", "write")
# User ids become file names and database keys: a fixed character set and length, never a path
# (no "/", no leading "." so never "." or ".." or a hidden file). The rule `serve` states.
USER_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
USER_RULE = "1 to 64 characters of A-Z a-z 0-9 _ . -, not starting with '.'"


class StoreError(RuntimeError):
    """A store that cannot be opened or used (bad URL, server unreachable, schema too new, bad
    user id or memory bytes): one line, ready to show."""


class VersionConflict(StoreError):
    """put(expect_version=V) found another current version (another writer came first)."""

    def __init__(self, user: str, expected: Version, current: Version):
        super().__init__(f"memory of {user!r} is at version {current!r}, not {expected!r}: "
                         f"another writer came first")
        self.user, self.expected, self.current = user, expected, current


@dataclass(frozen=True)
class Memory:
    """One whole version of a user's memory: the .eov bytes and what its metadata says."""
    user: str
    version: Version           # PostgreSQL: increasing integer; directory: the file's identity
    data: bytes
    fingerprint: int           # the model fingerprint the rows were fitted for
    facts: int                 # facts in the ledger
    written: datetime | None = None

    @contextlib.contextmanager
    def as_file(self) -> Iterator[Path]:
        """The bytes as a private temporary file (0600), removed after the block: for openers
        that take a path (runtime.session.open_override_stack reads it whole, so the file may go
        as soon as it is opened)."""
        with tempfile.TemporaryDirectory(prefix="engram-memory-") as tmp:
            path = Path(tmp) / f"{self.user}.eov"
            private_copy(path, self.data)
            yield path


def private_copy(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class LogEntry:
    """One line of a user's append-only log. Never holds fact text."""
    user: str
    version: Version
    action: str
    fact_ids: tuple[str, ...]
    node: str
    at: datetime


@dataclass
class Edit:
    """What `MemoryStore.edit` hands the writer: `path` (a private copy of the current version, or
    no file yet), `before` (that version), and what to log (`action`, `fact_ids`); after the
    block, `memory` is the version stored (None: nothing changed)."""
    path: Path
    before: Memory | None
    action: str
    fact_ids: list[str] = field(default_factory=list)
    memory: Memory | None = None


def check_user(user) -> str:
    """`user` when it is a valid user id, else StoreError (one line)."""
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        shown = repr(user) if len(repr(user)) <= 40 else repr(user)[:37] + "..."
        raise StoreError(f"invalid user id {shown}: {USER_RULE}")
    return user


def check_action(action: str) -> str:
    if action not in ACTIONS:
        raise StoreError(f"unknown log action {action!r} (one of {', '.join(ACTIONS)})")
    return action


def memory_meta(data: bytes, where: str) -> tuple[int, int]:
    """(model fingerprint, fact count) of .eov bytes, which are fully checked first: a store
    never takes a damaged file (StoreError)."""
    from engram_local.formats.eov import MemoryFileError, parse_memory_bytes

    try:
        mf = parse_memory_bytes(bytes(data), where)
    except MemoryFileError as exc:
        raise StoreError(str(exc)) from None
    return mf.fingerprint, len(mf.facts)


def fault(stage: str) -> None:
    """Test hook (as formats.eov's eov-write:STAGE): ENGRAM_LOCAL_FAULT=store-put:STAGE kills the
    writing process (SIGKILL) at STAGE of a put ("inserted", "committing"), to prove that a killed
    writer leaves the old version or the new one."""
    from engram_local.formats.eov import FAULT_ENV

    if os.environ.get(FAULT_ENV) == f"store-put:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def node_name() -> str:
    """Who wrote, for the log: this host and process."""
    return f"{os.uname().nodename}:{os.getpid()}"


class MemoryStore(ABC):
    """Users' memories, one current version each, with per-user write serialisation and a log.
    Methods are thread-safe. Versions are opaque: compare them for equality only."""

    url: str

    @abstractmethod
    def get(self, user: str) -> Memory | None:
        """The user's current memory, whole, or None (no memory yet)."""

    @abstractmethod
    def version(self, user: str) -> Version:
        """The user's current version (ABSENT: none), cheaper than `get`."""

    @abstractmethod
    def put(self, user: str, data: bytes, *, action: str = "write", fact_ids: Sequence[str] = (),
            expect_version: Version | None = None, node: str | None = None) -> Memory:
        """Store `data` (.eov bytes, checked) as the user's new current version and log it, in one
        atomic step. `expect_version`: only if the current version is that one (ABSENT: the user
        has none), else VersionConflict. action="forget" also deletes every older version's bytes
        (they may hold the forgotten facts)."""

    @abstractmethod
    def delete(self, user: str, *, node: str | None = None) -> bool:
        """Remove all of the user's memory (every version); the log keeps a "delete" line.
        False when there was nothing."""

    @abstractmethod
    def lock(self, user: str) -> contextlib.AbstractContextManager:
        """Hold the user's write lock (blocks while another writer anywhere holds it). A `put` of
        that user inside the block runs under it (no second wait)."""

    @abstractmethod
    def log(self, user: str) -> list[LogEntry]:
        """The user's log, oldest first."""

    @abstractmethod
    def users(self) -> Iterator[str]:
        """Users with a memory, in id order."""

    def watch(self, callback: Callable[[str | None, Version], None]):
        """Call `callback(user, version)` (from a background thread) for every new version written
        by anyone, and `callback(None, ABSENT)` when notifications may have been missed (forget
        everything cached). Returns a handle whose `listening` is True while no notification can
        be missed, or None: this store cannot push (poll `version` instead)."""
        return None

    def close(self) -> None:
        """Release connections and threads."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def edit(self, user: str, action: str = "remember", node: str | None = None) -> Iterator[Edit]:
        """The user's memory as a private file to rewrite, stored on a clean exit (module doc)."""
        check_action(action)
        with self.lock(user):
            before = self.get(user)
            remove_stale_edits()
            with tempfile.TemporaryDirectory(prefix=f"{EDIT_PREFIX}{os.getpid()}-") as tmp:
                path = Path(tmp) / f"{user}.eov"
                if before is not None:
                    private_copy(path, before.data)
                ed = Edit(path=path, before=before, action=action)
                yield ed
                data = path.read_bytes() if path.exists() else None
                if data is not None and (before is None or data != before.data):
                    ed.memory = self.put(user, data, action=ed.action, fact_ids=ed.fact_ids,
                                         expect_version=before.version if before else ABSENT, node=node)


EDIT_PREFIX = "engram-edit-"      # private working copies: $TMPDIR/engram-edit-<pid>-XXXX/<user>.eov


def remove_stale_edits() -> int:
    """Remove the private working copies of processes that no longer run (a node killed with
    kill -9 mid-write leaves its copy of a user's rows); the number removed."""
    import shutil

    n = 0
    for d in Path(tempfile.gettempdir()).glob(f"{EDIT_PREFIX}*-*"):
        pid = d.name[len(EDIT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                      # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        n += 1
    return n


class HeldLocks:
    """Which users' locks this thread holds through a store (so `put` inside `lock` reuses the
    held lock instead of waiting on itself), with a per-user payload (a connection)."""

    def __init__(self):
        self._local = threading.local()

    def _map(self) -> dict:
        if not hasattr(self._local, "held"):
            self._local.held = {}
        return self._local.held

    def get(self, user: str):
        return self._map().get(user)

    @contextlib.contextmanager
    def hold(self, user: str, payload=True):
        held = self._map()
        held[user] = payload
        try:
            yield
        finally:
            held.pop(user, None)
