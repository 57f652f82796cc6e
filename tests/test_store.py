"""The memory store (engram_local.store): the directory backend always, PostgreSQL against a real
server this module starts itself (initdb/pg_ctl in a temporary directory, loopback only; skipped
with the reason when the server binaries or psycopg are missing: apt-get install postgresql,
pip install 'engram-local[postgres]').

Memories here are small synthetic .eov files (formats.eov's writer; two rows per fact, values
derived from the fact id so a fact's bytes can be searched for)."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from engram_local.formats.eov import parse_memory_bytes
from engram_local.store import (ABSENT, CachedStore, DirectoryStore, StoreError, VersionConflict, check_user,
                                open_store)
from engram_local.store.testing import FINGERPRINT, answer_of, fact_values, synthetic_bytes, write_synthetic

FP = FINGERPRINT
ROOT = Path(__file__).resolve().parents[1]
write_eov, eov_bytes = write_synthetic, synthetic_bytes


def fact_ids_of(data: bytes | None) -> list[str]:
    return [] if data is None else [f.id for f in parse_memory_bytes(data, "test").facts]


def new_user() -> str:
    return "u-" + uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- writers in other processes

def append_facts(url: str, user: str, name: str, n: int, mode: str, barrier=None) -> None:
    """n writes of one new fact each: through edit (the lock) or put with compare-and-swap retry.
    With a barrier, every write starts together with the other writer's (contention each round)."""
    store = open_store(url)
    try:
        for j in range(n):
            if barrier is not None:
                barrier.wait(60)
            fid = f"{name}-{j}"
            if mode == "edit":
                with store.edit(user, "remember") as ed:
                    have = fact_ids_of(ed.path.read_bytes() if ed.path.exists() else None)
                    time.sleep(0.01)                        # widen the read-modify-write window
                    write_eov(ed.path, have + [fid])
                    ed.fact_ids = [fid]
                continue
            while True:
                cur = store.get(user)
                time.sleep(0.01)
                try:
                    store.put(user, eov_bytes(fact_ids_of(cur and cur.data) + [fid]), action="remember",
                              fact_ids=[fid], expect_version=cur.version if cur else ABSENT)
                    break
                except VersionConflict:
                    continue
    finally:
        store.close()


def run_writers(url: str, user: str, mode: str, n: int = 8) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=append_facts, args=(url, user, name, n, mode, barrier)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def killed_put(url: str, user: str, stage_env: str) -> int:
    """A process that puts a new version of `user` and is killed at `stage_env` (a fault-hook
    value); returns its exit code."""
    # the fault is armed after the bytes are made (making them writes an .eov file too)
    code = (f"import os; from tests.test_store import eov_bytes; from engram_local.store import open_store\n"
            f"s = open_store({url!r}); data = eov_bytes(['old', 'new'])\n"
            f"os.environ['ENGRAM_LOCAL_FAULT'] = {stage_env!r}\n"
            f"with s.lock({user!r}):\n"
            f"    s.put({user!r}, data, action='remember', fact_ids=['new'])\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pg():
    from engram_local.store.testing import LocalPostgres, PostgresUnavailable

    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed: pip install 'engram-local[postgres]'")
    try:
        server = LocalPostgres().start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server here: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["dir", "pg"])
def store_url(request, tmp_path):
    if request.param == "dir":
        return str(tmp_path / "memories")
    return request.getfixturevalue("pg").url


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def sql(pg, query: str, *args):
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else None


# --------------------------------------------------------------------------- both backends

def test_versions_and_current(store):
    user = new_user()
    assert store.get(user) is None and store.version(user) == ABSENT
    m1 = store.put(user, eov_bytes(["f1"]), action="remember", fact_ids=["f1"])
    assert (m1.facts, m1.fingerprint) == (1, FP)
    m2 = store.put(user, eov_bytes(["f1", "f2"]), action="remember", fact_ids=["f2"])
    assert m2.version != m1.version and store.version(user) == m2.version
    got = store.get(user)
    assert got.data == eov_bytes(["f1", "f2"]) and got.version == m2.version and got.facts == 2
    with pytest.raises(VersionConflict, match="another writer came first"):
        store.put(user, eov_bytes(["x"]), expect_version=m1.version)
    with pytest.raises(VersionConflict):
        store.put(user, eov_bytes(["x"]), expect_version=ABSENT)
    assert user in list(store.users())
    assert [(e.action, e.fact_ids) for e in store.log(user)] == [("remember", ("f1",)), ("remember", ("f2",))]
    with got.as_file() as path:                   # for openers that take a path
        assert path.read_bytes() == got.data and (path.stat().st_mode & 0o777) == 0o600
    assert not path.exists()
    assert store.delete(user) and store.get(user) is None and not store.delete(user)
    assert store.log(user)[-1].action == "delete"


def test_put_refuses_damaged_bytes_and_bad_users(store):
    user = new_user()
    with pytest.raises(StoreError, match="damaged|truncated|checksum"):
        store.put(user, eov_bytes(["f1"])[:-100])
    assert store.get(user) is None
    for bad in ("../x", "", "x" * 10_000, "x" * 65, "usér", ".hidden", "a/b", None):
        with pytest.raises(StoreError, match="invalid user id"):
            store.get(bad)
    assert check_user("alice.smith_1-x") == "alice.smith_1-x"


def test_edit_writes_a_new_version_and_rolls_back_on_error(store):
    user = new_user()
    with store.edit(user, "remember") as ed:
        assert ed.before is None and not ed.path.exists()
        write_eov(ed.path, ["f1"])
        ed.fact_ids = ["f1"]
    assert ed.memory is not None and fact_ids_of(store.get(user).data) == ["f1"]
    before = store.version(user)
    with pytest.raises(RuntimeError):
        with store.edit(user, "remember") as ed:
            write_eov(ed.path, ["f1", "f2"])
            raise RuntimeError("the fit failed")
    assert store.version(user) == before
    with store.edit(user, "remember") as ed:       # nothing changed: no new version
        pass
    assert ed.memory is None and store.version(user) == before


@pytest.mark.parametrize("mode", ["edit", "cas"])
def test_two_processes_writing_one_user_lose_nothing(store_url, mode):
    user = new_user()
    run_writers(store_url, user, mode)
    with open_store(store_url) as s:
        ids = fact_ids_of(s.get(user).data)
        assert sorted(ids) == sorted(f"{n}-{j}" for n in "ab" for j in range(8))
        writers = [e.fact_ids[0][0] for e in s.log(user) if e.action == "remember"]
        assert len(writers) == 16
        # they wrote at the same time, round by round: each round logs one of each
        assert all(sorted(writers[i:i + 2]) == ["a", "b"] for i in range(0, 16, 2)), writers


def test_directory_store_is_todays_layout(tmp_path):
    s = DirectoryStore(tmp_path)
    s.put("alice", eov_bytes(["f1"]))
    assert (tmp_path / "alice.eov").read_bytes() == eov_bytes(["f1"])
    assert list(s.users()) == ["alice"]


def test_directory_writer_killed_mid_write_leaves_old_or_new(tmp_path):
    user = "carol"
    s = DirectoryStore(tmp_path)
    s.put(user, eov_bytes(["old"]))
    for stage in ("eov-write:half-written", "eov-write:synced"):
        assert killed_put(str(tmp_path), user, stage) == -signal.SIGKILL
        assert fact_ids_of(s.get(user).data) == ["old"]
    assert killed_put(str(tmp_path), user, "eov-write:renamed") == -signal.SIGKILL
    assert fact_ids_of(s.get(user).data) == ["old", "new"]


def test_cache_evicts_by_bytes_and_sees_new_versions(tmp_path):
    base = DirectoryStore(tmp_path)
    size = len(eov_bytes(["f1"]))
    for u in ("u1", "u2", "u3"):
        base.put(u, eov_bytes(["f1"]))
    node = CachedStore(DirectoryStore(tmp_path), max_bytes=2 * (size + 256) + 10)
    assert node.mode == "version"
    for u in ("u1", "u2", "u1", "u3"):            # u3 evicts the least recently used, u2
        node.get(u)
    st = node.stats()
    assert (st["hits"], st["misses"], st["evictions"], st["entries"]) == (1, 3, 1, 2)
    assert st["bytes"] <= node.max_bytes
    node.get("u2")
    assert node.stats()["misses"] == 4
    base.put("u1", eov_bytes(["f1", "f2"]))       # another writer: the next get sees it
    assert fact_ids_of(node.get("u1").data) == ["f1", "f2"]
    assert node.get("nobody") is None and node.get("nobody") is None
    assert node.stats()["hits"] >= 1


def test_open_store_errors():
    with pytest.raises(StoreError, match="unsupported memory store mysql"):
        open_store("mysql://x@y/z")
    with pytest.raises(StoreError, match="empty memory store"):
        open_store("")


# --------------------------------------------------------------------------- PostgreSQL

def test_postgres_unreachable_is_one_line():
    from engram_local.store.testing import free_port

    pytest.importorskip("psycopg")
    port = free_port()
    with pytest.raises(StoreError) as err:
        open_store(f"postgresql://engram:secret@127.0.0.1:{port}/postgres", connect_timeout=2)
    msg = str(err.value)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/postgres" in msg
    assert "\n" not in msg and "secret" not in msg


def test_postgres_schema_is_created_and_versioned(pg):
    from engram_local.store.postgres import SCHEMA_VERSION, PostgresStore

    PostgresStore(pg.url).close()
    PostgresStore(pg.url).close()                 # a second node: nothing to migrate
    assert sql(pg, "SELECT version FROM engram_schema") == [(SCHEMA_VERSION,)]
    sql(pg, "INSERT INTO engram_schema (version) VALUES (%s)", SCHEMA_VERSION + 1)
    try:
        with pytest.raises(StoreError, match="schema version .*upgrade engram-local"):
            PostgresStore(pg.url)
    finally:
        sql(pg, "DELETE FROM engram_schema WHERE version > %s", SCHEMA_VERSION)


def test_postgres_versions_rows_and_retention(pg):
    from engram_local.store.postgres import PostgresStore

    user = new_user()
    with PostgresStore(pg.url, keep_versions=2) as s:
        vs = [s.put(user, eov_bytes([f"f{i}" for i in range(k + 1)]), fact_ids=[f"f{k}"]).version
              for k in range(4)]
        assert vs == sorted(vs)
        rows = sql(pg, "SELECT version, facts, bytes, fingerprint FROM engram_memory_versions "
                       "WHERE user_id = %s ORDER BY version", user)
        assert [r[0] for r in rows] == vs[-2:] and [r[1] for r in rows] == [3, 4]
        assert int(rows[-1][3]) == FP and rows[-1][2] == len(s.get(user).data)
        assert sql(pg, "SELECT version FROM engram_memory_current WHERE user_id = %s", user) == [(vs[-1],)]


def test_postgres_forget_deletes_older_versions_and_logs_ids_only(pg):
    from engram_local.store.postgres import PostgresStore

    user, gone = new_user(), "secret-" + uuid.uuid4().hex[:8]
    with PostgresStore(pg.url, keep_versions=5) as s:
        s.put(user, eov_bytes([gone, "keep"]), action="remember", fact_ids=[gone, "keep"])
        s.put(user, eov_bytes([gone, "keep", "k2"]), action="remember", fact_ids=["k2"])
        s.put(user, eov_bytes(["keep", "k2"]), action="forget", fact_ids=[gone])
        assert fact_ids_of(s.get(user).data) == ["keep", "k2"]
        assert [e.action for e in s.log(user)] == ["remember", "remember", "forget"]
    needles = [answer_of(gone).encode(), fact_values(gone).tobytes()]
    for needle in needles:
        assert sql(pg, "SELECT count(*) FROM engram_memory_versions WHERE position(%s in data) > 0",
                   needle) == [(0,)]
    assert sql(pg, "SELECT count(*) FROM engram_memory_versions WHERE user_id = %s", user) == [(1,)]
    log_text = str(sql(pg, "SELECT * FROM engram_memory_log WHERE user_id = %s", user))
    assert gone in log_text and answer_of(gone) not in log_text and "My code for" not in log_text
    # On disk too, once the table is rewritten (VACUUM FULL): the pages hold no trace of it.
    sql(pg, "VACUUM FULL engram_memory_versions")
    sql(pg, "CHECKPOINT")
    files = sql(pg, "SELECT pg_relation_filepath(c.oid) FROM pg_class c WHERE c.oid = "
                    "'engram_memory_versions'::regclass OR c.oid = (SELECT reltoastrelid FROM pg_class "
                    "WHERE oid = 'engram_memory_versions'::regclass)")
    blob = b"".join((pg.root / "data" / f).read_bytes() for (f,) in files)
    assert needles[1] and all(n not in blob for n in needles)
    assert b"keep" in blob                                   # the search does see what is there


def test_postgres_notify_reaches_another_node_within_1s(pg):
    from engram_local.store.postgres import PostgresStore

    user, seen, got = new_user(), {}, threading.Event()

    def on_change(u, v):
        if u == user:
            seen[v] = time.monotonic()
            got.set()

    with PostgresStore(pg.url) as writer, PostgresStore(pg.url) as other:
        handle = other.watch(on_change)
        assert handle.listening
        t0 = time.monotonic()
        m = writer.put(user, eov_bytes(["f1"]))
        assert got.wait(1.0), "no notification within 1 s"
        assert m.version in seen and seen[m.version] - t0 < 1.0


def test_postgres_node_cache_sees_new_versions_within_1s(pg):
    from engram_local.store.postgres import PostgresStore

    user = new_user()
    with PostgresStore(pg.url) as writer:
        node = CachedStore(PostgresStore(pg.url), max_bytes=1 << 20)
        try:
            assert node.mode == "notify"
            assert node.get(user) is None and node.get(user) is None     # absent users cached too
            v1 = writer.put(user, eov_bytes(["f1"])).version
            deadline = time.monotonic() + 1.0
            while node.get(user) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert node.get(user).version == v1
            hits = node.stats()["hits"]
            assert node.get(user).version == v1 and node.stats()["hits"] == hits + 1
            v2 = writer.put(user, eov_bytes(["f1", "f2"]), action="remember").version
            deadline = time.monotonic() + 1.0
            while node.get(user).version != v2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert node.get(user).version == v2
            with node.edit(user, "forget") as ed:                         # writes through
                write_eov(ed.path, ["f2"])
                ed.fact_ids = ["f1"]
            assert fact_ids_of(node.get(user).data) == ["f2"]
            node.get(user)
            assert writer.delete(user)                                    # another node erases
            deadline = time.monotonic() + 1.0
            while node.get(user) is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert node.get(user) is None
        finally:
            node.close()


def test_postgres_cache_version_mode(pg):
    from engram_local.store.postgres import PostgresStore

    user = new_user()
    with PostgresStore(pg.url) as writer:
        node = CachedStore(PostgresStore(pg.url), max_bytes=1 << 20, mode="version")
        try:
            assert node.mode == "version" and node.get(user) is None
            v1 = writer.put(user, eov_bytes(["f1"])).version
            assert node.get(user).version == v1 and node.get(user).version == v1     # no wait at all
            assert node.stats()["hits"] >= 1
            v2 = writer.put(user, eov_bytes(["f1", "f2"])).version
            assert node.get(user).version == v2
        finally:
            node.close()


@pytest.mark.parametrize("stage", ["store-put:inserted", "store-put:committing"])
def test_postgres_writer_killed_mid_transaction(pg, stage):
    user = new_user()
    with open_store(pg.url) as s:
        old = s.put(user, eov_bytes(["old"]))
        assert killed_put(pg.url, user, stage) == -signal.SIGKILL
        cur = s.get(user)
        assert cur.version == old.version and fact_ids_of(cur.data) == ["old"]
        # the dead writer's lock went with its connection: the next writer is not blocked
        done = threading.Event()
        threading.Thread(target=lambda: (s.put(user, eov_bytes(["old", "next"])), done.set()),
                         daemon=True).start()
        assert done.wait(10), "the killed writer's lock was not released"
        assert fact_ids_of(s.get(user).data) == ["old", "next"]


def test_postgres_writer_killed_at_random_times(pg):
    """A writer looping puts, killed at random moments: the current version is always one whole
    version that was written (a logged one), readable."""
    user = new_user()
    code = (f"from tests.test_store import eov_bytes; from engram_local.store import open_store\n"
            f"s = open_store({pg.url!r})\n"
            f"for i in range(10**6):\n"
            f"    s.put({user!r}, eov_bytes([f'f{{j}}' for j in range(i % 7 + 1)]), fact_ids=[str(i)])\n")
    rng = np.random.default_rng(0)
    with open_store(pg.url) as s:
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
            time.sleep(1.5 + float(rng.uniform(0, 1.0)))
            p.send_signal(signal.SIGKILL)
            p.wait()
            cur = s.get(user)
            assert cur is not None and len(fact_ids_of(cur.data)) == cur.facts
            assert cur.version == s.log(user)[-1].version


def test_postgres_lost_server_is_one_line(pg):
    from engram_local.store.postgres import PostgresStore
    from engram_local.store.testing import LocalPostgres

    user = new_user()
    with LocalPostgres() as own:
        s = PostgresStore(own.url, connect_timeout=2)
        s.put(user, eov_bytes(["f1"]))
        own.stop()
        with pytest.raises(StoreError) as err:
            s.get(user)
        assert f"PostgreSQL at 127.0.0.1:{own.port}/postgres" in str(err.value) and "\n" not in str(err.value)
        s.close()


def test_postgres_node_cache_under_concurrent_writes_serves_whole_versions(pg):
    """Readers on a caching node while another node writes: every memory served is exactly the
    bytes of one written version, and the node converges on the last one within 1 s."""
    from engram_local.store.postgres import PostgresStore

    user, written, errors, stop = new_user(), {}, [], threading.Event()
    with PostgresStore(pg.url) as writer:
        node = CachedStore(PostgresStore(pg.url), max_bytes=1 << 20)

        def read():
            while not stop.is_set():
                m = node.get(user)
                if m is not None and written.get(m.version, m.data) != m.data:
                    errors.append(m.version)

        try:
            for k in range(3):
                data = eov_bytes([f"f{j}" for j in range(k + 1)])
                written[writer.put(user, data).version] = data
            readers = [threading.Thread(target=read) for _ in range(3)]
            for t in readers:
                t.start()
            for k in range(3, 40):
                data = eov_bytes([f"f{j}" for j in range(k % 9 + 1)])
                m = writer.put(user, data)
                written[m.version] = data
            last = m.version
            deadline = time.monotonic() + 1.0
            while node.get(user).version != last and time.monotonic() < deadline:
                time.sleep(0.01)
            stop.set()
            for t in readers:
                t.join()
            assert not errors and node.get(user).version == last
            # with no write in flight the node serves from its cache (during the writes every
            # NOTIFY may land between two reads, so hits there depend on timing)
            hits = node.stats()["hits"]
            assert node.get(user).version == last and node.get(user).version == last
            assert node.stats()["hits"] > hits
        finally:
            stop.set()
            node.close()


def test_stale_private_copies_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import os
    import tempfile

    from engram_local.store.base import EDIT_PREFIX, remove_stale_edits

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{EDIT_PREFIX}{dead.pid}-abc"
    stale.mkdir()
    (stale / "u.eov").write_bytes(b"rows")
    alive = tmp_path / f"{EDIT_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    assert remove_stale_edits() == 1
    assert not stale.exists() and alive.exists()
