"""PostgresStore: the users' memories in PostgreSQL, shared by any number of `serve` nodes.

Schema (created and migrated by `PostgresStore` itself; `engram_schema` holds its version):

  engram_memory_versions  one row per stored version: user_id, version (from one global sequence,
                          so a version number is never reused, even after a delete), data (the
                          .eov bytes), fingerprint, facts, bytes, created, node
  engram_memory_current   the pointer: user_id -> version
  engram_memory_log       append-only: seq, user_id, version, action, fact_ids, node, at
                          (ids only: never fact text)

A put is one transaction under the user's advisory lock: insert the version, move the pointer,
delete what retention drops, append the log line, NOTIFY. Readers read pointer and bytes in one
statement, so they see the old version or the new one, never a mix; a writer killed before its
commit leaves nothing (PostgreSQL rolls the transaction back when the connection drops).

Retention: a write keeps the `keep_versions` newest versions (default 2: the current and the one
before, for a reader or an operator that wants to step back); a forget keeps only the new one,
deleting every older version's bytes, since they may hold the forgotten fact. Deleted rows are
gone from every query at commit; their disk space is reclaimed by (auto)vacuum, and only a
`VACUUM FULL` (or a table rewrite) guarantees no stale page still holds the bytes (docs/capacity.md).

Nodes learn of new versions on the NOTIFY channel `engram_memory` (payload "VERSION USER").
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from engram_local.store.base import (ABSENT, HeldLocks, LogEntry, Memory, MemoryStore, StoreError,
                                     Version, VersionConflict, check_action, check_user, fault,
                                     memory_meta, node_name)

CHANNEL = "engram_memory"
# First key of the two-key advisory locks: a namespace, so ours never collide with another
# application's advisory locks in the same database ("engr").
LOCK_NS = 0x656E6772
SCHEMA_VERSION = 1
# Each entry migrates from the previous schema version; never edit a released step, add one.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE SEQUENCE engram_memory_version_seq",
        """CREATE TABLE engram_memory_versions (
               user_id     text        NOT NULL,
               version     bigint      NOT NULL,
               data        bytea       NOT NULL,
               fingerprint numeric(20) NOT NULL,
               facts       integer     NOT NULL,
               bytes       integer     NOT NULL,
               created     timestamptz NOT NULL DEFAULT now(),
               node        text        NOT NULL,
               PRIMARY KEY (user_id, version))""",
        # .eov bytes are mostly F16 rows: pglz does not shrink them at all, lz4 by ~14%
        # (docs/capacity.md). Stored uncompressed: no compression attempt on write, no
        # decompression on read.
        "ALTER TABLE engram_memory_versions ALTER COLUMN data SET STORAGE EXTERNAL",
        """CREATE TABLE engram_memory_current (
               user_id text        PRIMARY KEY,
               version bigint      NOT NULL,
               updated timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE engram_memory_log (
               seq      bigserial   PRIMARY KEY,
               user_id  text        NOT NULL,
               version  bigint      NOT NULL,
               action   text        NOT NULL,
               fact_ids text[]      NOT NULL,
               node     text        NOT NULL,
               at       timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX engram_memory_log_user ON engram_memory_log (user_id, seq)",
    ],
}


def _psycopg():
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise StoreError("a postgresql:// memory store needs psycopg: "
                         "pip install 'engram-local[postgres]'") from None
    return psycopg, psycopg_pool


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def where(url: str) -> str:
    """host:port/db of a URL, for one-line errors (the URL without its password if it does not
    parse)."""
    try:
        u = urlsplit(url)
        return f"{u.hostname or 'localhost'}:{u.port or 5432}{u.path or '/'}"
    except ValueError:
        return redact(url)


class PostgresStore(MemoryStore):
    """A MemoryStore in the PostgreSQL database at `url` (postgresql://user:pw@host:port/db).
    `pool_size`: connections for get/put/version; each held `lock` has a connection of its own,
    and so has each `watch` listener."""

    def __init__(self, url: str, *, keep_versions: int = 1, pool_size: int = 4,
                 connect_timeout: float = 10.0):
        psycopg, psycopg_pool = _psycopg()
        if keep_versions < 1:
            raise StoreError("keep_versions must be at least 1")
        self.url, self.keep_versions = url, keep_versions
        self._connect_timeout = connect_timeout
        self._conninfo = url
        # keepalives: a node that dies without closing its socket releases its locks within a
        # minute instead of at the kernel's two-hour default
        self._kwargs = {"autocommit": True, "connect_timeout": max(1, int(connect_timeout)),
                        "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                        "keepalives_count": 3}
        with self._connect() as conn:
            try:
                self._migrate(conn)
            except psycopg.Error as exc:
                raise self._error("cannot set up the memory tables in", exc) from None
        self._pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=pool_size, kwargs=self._kwargs,
                                                 open=False, name="engram-store")
        self._pool.open(wait=True, timeout=connect_timeout)
        self._held = HeldLocks()
        self._watchers: list[_Listener] = []

    # ------------------------------------------------------------------ connections, schema

    def _error(self, doing: str, exc: Exception) -> StoreError:
        """A driver error as one line naming the server (never the password)."""
        lines = str(exc).strip().splitlines()
        return StoreError(f"{doing} PostgreSQL at {where(self.url)}: {lines[-1] if lines else type(exc).__name__}")

    def _connect(self):
        psycopg, _ = _psycopg()
        try:
            return psycopg.connect(self._conninfo, **self._kwargs)
        except psycopg.Error as exc:
            raise self._error("cannot connect to", exc) from None

    @contextlib.contextmanager
    def _conn(self, user: str | None = None):
        """A connection: the one holding `user`'s lock in this thread, else one from the pool.
        Driver errors (a lost server, a failed statement) come out as one StoreError line."""
        psycopg, psycopg_pool = _psycopg()
        held = self._held.get(user) if user is not None else None
        try:
            if held is not None:
                yield held
                return
            with self._pool.connection(timeout=self._connect_timeout) as conn:
                yield conn
        except psycopg_pool.PoolTimeout:
            raise StoreError(f"no connection to PostgreSQL at {where(self.url)} "
                             f"within {self._connect_timeout:g} s") from None
        except psycopg.Error as exc:
            raise self._error("error from", exc) from None

    @staticmethod
    def _migrate(conn) -> None:
        with conn.transaction():
            # one migrator at a time (nodes starting together)
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_NS,))
            conn.execute("CREATE TABLE IF NOT EXISTS engram_schema (version integer NOT NULL, "
                         "migrated timestamptz NOT NULL DEFAULT now())")
            row = conn.execute("SELECT max(version) FROM engram_schema").fetchone()
            have = row[0] or 0
            if have > SCHEMA_VERSION:
                raise StoreError(f"the memory database has schema version {have}; this engram-local "
                                 f"knows up to {SCHEMA_VERSION}: upgrade engram-local")
            for step in range(have + 1, SCHEMA_VERSION + 1):
                for sql in MIGRATIONS[step]:
                    conn.execute(sql)
                conn.execute("INSERT INTO engram_schema (version) VALUES (%s)", (step,))

    def close(self) -> None:
        for w in self._watchers:
            w.stop()
        self._watchers.clear()
        self._pool.close()

    # ------------------------------------------------------------------ reads

    def get(self, user: str) -> Memory | None:
        check_user(user)
        with self._conn(user) as conn:
            row = conn.execute(
                "SELECT v.version, v.data, v.fingerprint, v.facts, v.created "
                "FROM engram_memory_current c JOIN engram_memory_versions v USING (user_id, version) "
                "WHERE c.user_id = %s", (user,)).fetchone()
        if row is None:
            return None
        return Memory(user, row[0], bytes(row[1]), int(row[2]), row[3], row[4])

    def version(self, user: str) -> Version:
        check_user(user)
        with self._conn(user) as conn:
            row = conn.execute("SELECT version FROM engram_memory_current WHERE user_id = %s",
                               (user,)).fetchone()
        return row[0] if row else ABSENT

    def log(self, user: str) -> list[LogEntry]:
        check_user(user)
        with self._conn(user) as conn:
            rows = conn.execute("SELECT version, action, fact_ids, node, at FROM engram_memory_log "
                                "WHERE user_id = %s ORDER BY seq", (user,)).fetchall()
        return [LogEntry(user, r[0], r[1], tuple(r[2]), r[3], r[4]) for r in rows]

    def users(self) -> Iterator[str]:
        last = ""
        while True:     # keyset pages: millions of users never sit in memory at once
            with self._conn() as conn:
                rows = conn.execute("SELECT user_id FROM engram_memory_current WHERE user_id > %s "
                                    "ORDER BY user_id LIMIT 10000", (last,)).fetchall()
            if not rows:
                return
            for (u,) in rows:
                yield u
            last = rows[-1][0]

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def lock(self, user: str):
        check_user(user)
        if self._held.get(user) is not None:
            yield
            return
        # A session-level advisory lock on a connection of its own, held for the whole block: it
        # spans several transactions (read, fit for seconds, put), it dies with the connection if
        # this process does, and writers waiting on locks never starve the readers' pool.
        psycopg, _ = _psycopg()
        conn = self._connect()
        try:
            try:
                conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_NS, user))
            except psycopg.Error as exc:
                raise self._error("error from", exc) from None
            with self._held.hold(user, conn):
                yield
        finally:
            conn.close()                  # ends the session: the lock is released

    def put(self, user: str, data: bytes, *, action: str = "write", fact_ids: Sequence[str] = (),
            expect_version: Version | None = None, node: str | None = None) -> Memory:
        check_user(user)
        check_action(action)
        fingerprint, facts = memory_meta(data, f"memory of {user!r}")
        node = node or node_name()
        with self._conn(user) as conn, conn.transaction():
            # the same lock `lock` takes (re-entrant within one session): puts of one user
            # serialise even without `lock`
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_NS, user))
            row = conn.execute("SELECT version FROM engram_memory_current WHERE user_id = %s",
                               (user,)).fetchone()
            current = row[0] if row else ABSENT
            if expect_version is not None and current != expect_version:
                raise VersionConflict(user, expect_version, current)
            version, created = conn.execute(
                "INSERT INTO engram_memory_versions (user_id, version, data, fingerprint, facts, bytes, node) "
                "VALUES (%s, nextval('engram_memory_version_seq'), %s, %s, %s, %s, %s) "
                "RETURNING version, created", (user, bytes(data), fingerprint, facts, len(data), node)).fetchone()
            fault("inserted")
            conn.execute("INSERT INTO engram_memory_current (user_id, version) VALUES (%s, %s) "
                         "ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, updated = now()",
                         (user, version))
            keep = 1 if action == "forget" else self.keep_versions
            conn.execute("DELETE FROM engram_memory_versions WHERE user_id = %s AND version NOT IN "
                         "(SELECT version FROM engram_memory_versions WHERE user_id = %s "
                         " ORDER BY version DESC LIMIT %s)", (user, user, keep))
            self._log_and_notify(conn, user, version, action, fact_ids, node)
            fault("committing")
        return Memory(user, version, bytes(data), fingerprint, facts, created)

    def delete(self, user: str, *, node: str | None = None) -> bool:
        check_user(user)
        with self._conn(user) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_NS, user))
            gone = conn.execute("DELETE FROM engram_memory_current WHERE user_id = %s", (user,)).rowcount
            conn.execute("DELETE FROM engram_memory_versions WHERE user_id = %s", (user,))
            if gone:
                self._log_and_notify(conn, user, ABSENT, "delete", (), node or node_name())
        return bool(gone)

    @staticmethod
    def _log_and_notify(conn, user, version, action, fact_ids, node) -> None:
        conn.execute("INSERT INTO engram_memory_log (user_id, version, action, fact_ids, node) "
                     "VALUES (%s, %s, %s, %s, %s)", (user, version, action, [str(i) for i in fact_ids], node))
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{version} {user}"))   # sent at commit

    # ------------------------------------------------------------------ notifications

    def watch(self, callback: Callable[[str | None, Version], None]) -> "_Listener":
        listener = _Listener(self, callback)
        self._watchers.append(listener)
        listener.start()
        return listener


class _Listener:
    """A thread LISTENing on CHANNEL over its own connection, reconnecting after a loss (and then
    telling the callback that anything cached may be stale)."""

    def __init__(self, store: PostgresStore, callback):
        self.store, self.callback = store, callback
        self._stop = threading.Event()
        self.ready = threading.Event()       # listening now (cleared while reconnecting)
        self._thread = threading.Thread(target=self._run, name="engram-store-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.ready.wait(self.store._connect_timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        psycopg, _ = _psycopg()
        delay = 0.1
        while not self._stop.is_set():
            try:
                with self.store._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.ready.set()
                    delay = 0.1
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            version, _, user = n.payload.partition(" ")
                            self.callback(user, int(version))
            except (psycopg.Error, StoreError):
                pass
            if self.ready.is_set():
                self.ready.clear()
            self.callback(None, ABSENT)       # we may have missed notifications
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    @property
    def listening(self) -> bool:
        return self.ready.is_set()
