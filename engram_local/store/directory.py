"""DirectoryStore: today's layout, DIR/<user>.eov, nothing to install.

The current version is the file itself, replaced by an atomic rename (formats.eov's writer:
temporary file, fsync, rename, fsync of the directory), so a reader opens the old file or the new
one, never a mix. Writers serialise on DIR/<user>.eov.lock, the same lock `engram-local remember`
and `forget` take on that file, so the command line and a server can share a directory. There is
one version on disk: a version is the file's identity (inode, mtime, size), which changes with
every rename. The log is DIR/<user>.eov.log, JSON lines appended under the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from engram_local.store.base import (ABSENT, HeldLocks, LogEntry, Memory, MemoryStore, StoreError,
                                     Version, VersionConflict, check_action, check_user, memory_meta,
                                     node_name)


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


class DirectoryStore(MemoryStore):
    def __init__(self, directory: str | os.PathLike, create: bool = True):
        self.dir = Path(directory)
        self.url = os.fspath(self.dir)
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        if not self.dir.is_dir():
            raise StoreError(f"memory directory {self.url} does not exist or is not a directory")
        self._held = HeldLocks()

    def path(self, user: str) -> Path:
        return self.dir / f"{check_user(user)}.eov"

    def _log_path(self, user: str) -> Path:
        return self.dir / f"{check_user(user)}.eov.log"

    def get(self, user: str) -> Memory | None:
        path = self.path(user)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read: {exc.strerror or exc}") from None
        # The version and the bytes come from the same open file: a rename after the open
        # replaces the name, not this inode's content (writers never write in place).
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        fingerprint, facts = memory_meta(data, os.fspath(path))
        return Memory(user, _version(st), data, fingerprint, facts,
                      datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def version(self, user: str) -> Version:
        try:
            return _version(os.stat(self.path(user)))
        except FileNotFoundError:
            return ABSENT

    @contextlib.contextmanager
    def lock(self, user: str):
        from engram_local.formats.eov import MemoryFileError, locked

        if self._held.get(user):            # already ours (this thread): flock would wait on itself
            yield
            return
        try:
            cm = locked(self.path(user))
            cm.__enter__()
        except MemoryFileError as exc:
            raise StoreError(str(exc)) from None
        try:
            with self._held.hold(user):
                yield
        finally:
            cm.__exit__(None, None, None)

    def put(self, user: str, data: bytes, *, action: str = "write", fact_ids: Sequence[str] = (),
            expect_version: Version | None = None, node: str | None = None) -> Memory:
        from engram_local.formats.eov import MemoryFileError, _atomic_write

        check_action(action)
        path = self.path(user)
        memory_meta(data, os.fspath(path))
        with self.lock(user):
            if expect_version is not None:
                current = self.version(user)
                if current != expect_version:
                    raise VersionConflict(user, expect_version, current)
            try:
                _atomic_write(path, bytes(data))     # one writer of .eov files (formats.eov)
            except MemoryFileError as exc:
                raise StoreError(str(exc)) from None
            memory = self.get(user)
            self._append_log(user, memory.version, action, fact_ids, node)
        return memory

    def delete(self, user: str, *, node: str | None = None) -> bool:
        path = self.path(user)
        with self.lock(user):
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            self._append_log(user, ABSENT, "delete", (), node)
        return True

    def _append_log(self, user: str, version: Version, action: str, fact_ids: Sequence[str],
                    node: str | None) -> None:
        line = json.dumps({"version": version, "action": action, "fact_ids": [str(i) for i in fact_ids],
                           "node": node or node_name(),
                           "at": datetime.now(timezone.utc).isoformat()}) + "\n"
        fd = os.open(self._log_path(user), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def log(self, user: str) -> list[LogEntry]:
        try:
            lines = self._log_path(user).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError, KeyError):   # a line a crash cut short
                d = json.loads(line)
                out.append(LogEntry(user, d["version"], d["action"], tuple(d["fact_ids"]), d["node"],
                                    datetime.fromisoformat(d["at"])))
        return out

    def users(self) -> Iterator[str]:
        from engram_local.store.base import USER_RE

        names = sorted(p.name[:-4] for p in self.dir.glob("*.eov") if p.is_file())
        return iter([n for n in names if USER_RE.fullmatch(n)])
