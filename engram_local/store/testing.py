"""Helpers for the store's tests, the multi-node test and bench/capacity.py (one piece of code
for all of them): a throwaway PostgreSQL server in a temporary directory, loopback only, and
synthetic memories.

    with LocalPostgres() as pg:           # initdb + pg_ctl start; stop and remove on exit
        store = PostgresStore(pg.url)

Needs the server binaries (Debian: apt-get install postgresql); `find_bindir()` says where they
are or why not. initdb refuses to run as root, so under root the cluster is created and run as
the `postgres` user (or `nobody`) through runuser.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

# The default model's fingerprint and row width (head_dim), so synthetic files look like real ones.
FINGERPRINT = 0x713096113DE531CE
DIM = 64
ROWS_PER_FACT = 2


def answer_of(fact_id: str) -> str:
    """The answer text of a synthetic fact (unique to its id, to search stored bytes for)."""
    return f"answer-{fact_id}-{zlib.crc32(fact_id.encode()):08x}"


def fact_values(fact_id: str, dim: int = DIM) -> np.ndarray:
    """The F16 rows of a synthetic fact, the same in every file that holds it."""
    rng = np.random.default_rng(zlib.crc32(fact_id.encode()))
    return rng.standard_normal((ROWS_PER_FACT, dim)).astype(np.float16)


def write_synthetic(path: str | os.PathLike, fact_ids: Sequence[str], dim: int = DIM) -> None:
    """An .eov file of the facts `fact_ids` (ROWS_PER_FACT rows each, formats.eov's writer)."""
    from engram_local.formats.eov import LedgerFact, write_memory_file

    fact_ids = list(fact_ids)
    n = ROWS_PER_FACT * len(fact_ids)
    rows = np.arange(n, dtype=np.int64) * 7 + 11
    values = (np.concatenate([fact_values(i, dim) for i in fact_ids]) if fact_ids
              else np.zeros((0, dim), np.float16))
    facts = [LedgerFact(id=i, prompt=f"My code for {i} is", answer=answer_of(i),
                        entries=list(range(ROWS_PER_FACT * k, ROWS_PER_FACT * (k + 1))))
             for k, i in enumerate(fact_ids)]
    write_memory_file(path, FINGERPRINT, {16: (rows, None, values)} if fact_ids else {}, facts)


def synthetic_bytes(fact_ids: Sequence[str], dim: int = DIM) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.eov"
        write_synthetic(path, fact_ids, dim)
        return path.read_bytes()


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or they could not start a cluster (the reason)."""


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (PostgresUnavailable otherwise)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
                        if p.split("/")[-2].isdigit() else 0, reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(os.path.realpath(which)).parent))
    for d in candidates:
        if all(os.access(Path(d) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) in "
                              "/usr/lib/postgresql/*/bin or on PATH: apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    """The account to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and no 'postgres' or 'nobody' account to run PostgreSQL as")


class LocalPostgres:
    """A PostgreSQL cluster under a temporary directory, listening on 127.0.0.1:`port` (a free
    one by default) and a unix socket in that directory; trust authentication for the loopback
    user `engram`. `settings`: extra `-c name=value` server settings."""

    def __init__(self, port: int | None = None, settings: dict | None = None, root: str | None = None):
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self._root_arg = root
        self.root: Path | None = None
        self.user = "engram"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        who = _run_as()
        return (["runuser", "-u", who, "--"] if who else []) + list(args)

    def _check(self, *args: str, timeout: float = 120) -> None:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise PostgresUnavailable(f"{Path(args[0]).name} failed: {' / '.join(tail)}")

    def start(self) -> "LocalPostgres":
        self.root = Path(self._root_arg or tempfile.mkdtemp(prefix="engram-pg-"))
        who = _run_as()
        if who:
            pw = pwd.getpwnam(who)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        data = self.root / "data"
        self._check(str(self.bindir / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
                    "-E", "UTF8", "--locale=C", "--no-instructions")
        opts = ["-c listen_addresses=127.0.0.1", f"-p {self.port}", f"-k {self.root}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._check(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"),
                    "-o", " ".join(opts), "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                                 "-w", "stop"), capture_output=True, timeout=120)
        if self._root_arg is None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "LocalPostgres":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
