"""Users and their memory for the server: ids, memories, override stacks, background writes.

The memories live in a store (engram_local.store: DIR/<user>.eov by default, or a PostgreSQL
database shared by several `serve` nodes), read through the node's `CachedStore`. A user id
becomes a file name or a database key, so it is checked first (`store.check_user`): 1 to 64
characters of [A-Za-z0-9_.-], not starting with a dot. An unknown user simply has no memory yet.

`UserMemories.stack(user)` is the override stack a request decodes with: the user's current
version (one whole `Memory`, never a mix of two) opened as an engine stack, cached per user and
keyed on the version: a write stores a new version, so the next request opens it, while a
request already running keeps the stack it started with. Only the most recently used stacks
stay open: an idle user costs nothing.

`MemoryWriter` runs memory writes (remember, forget) as jobs on one background thread, one job at
a time (fitting is CPU-heavy and would otherwise starve decoding), each through
`memory.learner.Learner` on a private copy of the user's memory (`store.edit`: under the user's
write lock, which spans every node; stored as the new version, compare-and-swap, on success).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from engram_local.store import CachedStore, Memory, StoreError
from engram_local.store import check_user as store_check_user

FACT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_JOBS_KEPT = 10_000        # finished jobs remembered for GET /v1/memories/jobs/{id}


class UserError(ValueError):
    """A bad user id or fact id (the server answers 400)."""


def check_user(user) -> str:
    """The user id, or UserError saying why it is refused (the store's rule)."""
    try:
        return store_check_user(user)
    except StoreError as exc:
        raise UserError(str(exc)) from None


def check_fact_id(fact_id) -> str:
    if not isinstance(fact_id, str) or not FACT_ID_RE.fullmatch(fact_id):
        raise UserError("fact id refused: 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    return fact_id


class UserMemories:
    """The users' memories as this node reads them (`node`, a CachedStore over the store) and the
    override stacks requests decode with.

    `open_stack(path)` opens a memory file as an engine stack (the server passes
    `engine.make_stack(open_override_stack([path], sidecar))`); `max_open` stacks stay cached."""

    def __init__(self, node: CachedStore, open_stack: Callable[[Path], object], max_open: int = 64):
        self.node = node
        self._open_stack = open_stack
        self.max_open = max_open
        self._lock = threading.Lock()
        self._stacks: collections.OrderedDict[str, tuple[object, object]] = collections.OrderedDict()
        self._openings: dict[str, tuple[object, list]] = {}     # user -> (memory version, routing.Openings)

    @property
    def directory(self) -> Path | None:
        """The directory of a directory store (None: a database)."""
        d = getattr(self.node.store, "dir", None)
        return Path(d) if d is not None else None

    def get(self, user: str) -> Memory | None:
        return self.node.get(check_user(user))

    def stack(self, user: str | None):
        """The override stack of `user`'s memory as it is now (None: no user, or no memory yet)."""
        if user is None:
            return None
        m = self.get(user)
        if m is None:
            with self._lock:
                self._stacks.pop(user, None)
            return None
        with self._lock:
            hit = self._stacks.get(user)
            if hit is not None and hit[0] == m.version:
                self._stacks.move_to_end(user)
                return hit[1]
        with m.as_file() as path:
            stack = self._open_stack(path)
        with self._lock:
            self._stacks[user] = (m.version, stack)
            self._stacks.move_to_end(user)
            while len(self._stacks) > self.max_open:
                self._stacks.popitem(last=False)
        return stack

    @property
    def n_open(self) -> int:
        return len(self._stacks)

    def openings(self, user: str | None, tokenize: Callable[[str], list[int]]) -> list:
        """The reply openings `user`'s memory was fitted after (runtime.routing.openings), kept
        per memory version with the priors routing takes of them; [] without a user or a memory."""
        from engram_local.formats.eov import parse_memory_bytes
        from engram_local.runtime import routing

        m = self.get(user) if user is not None else None
        if m is None:
            return []
        with self._lock:
            hit = self._openings.get(user)
            if hit is not None and hit[0] == m.version:
                return hit[1]
        found = routing.openings(parse_memory_bytes(m.data, f"memory of {user!r}").facts, tokenize)
        with self._lock:
            self._openings[user] = (m.version, found)
            while len(self._openings) > self.max_open:
                self._openings.pop(next(iter(self._openings)))
        return found

    def facts(self, user: str) -> list[dict]:
        """The user's facts as the memory routes list them: id, prompt, answer, rows, time."""
        from engram_local.formats.eov import parse_memory_bytes

        m = self.get(user)
        if m is None:
            return []
        mf = parse_memory_bytes(m.data, f"memory of {user!r}")
        return [{"id": f.id, "prompt": f.prompt, "answer": f.answer, "rows": len(f.entries),
                 "time": f.written} for f in mf.facts]

    @contextlib.contextmanager
    def as_file(self, user: str) -> Iterator[Path]:
        """The user's current memory as a private file (a path that does not exist: none yet)."""
        m = self.get(user)
        if m is not None:
            with m.as_file() as path:
                yield path
            return
        with tempfile.TemporaryDirectory(prefix="engram-memory-") as tmp:
            yield Path(tmp) / f"{user}.eov"

    def close(self) -> None:
        with self._lock:
            self._stacks.clear()
        self.node.close()


@dataclass
class MemoryJob:
    """One write of one user's memory: remember `facts` (memory.facade.NewFact) or forget `ids`."""
    id: str
    user: str
    kind: str                                   # "remember" | "forget"
    facts: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    status: str = "queued"                      # queued | running | done | failed
    fact_ids: list[str] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)

    def as_json(self) -> dict:
        return {"id": self.id, "status": self.status, "fact_ids": list(self.fact_ids), "error": self.error}


class MemoryWriter:
    """Memory writes as jobs, run one at a time on a background thread (see the module docstring).

    `load_model()` returns the fitting model `(EngramModel, tokenizer, fingerprint)`; it is called
    once, on the writer thread (first job, or at once with `preload`). `torch_threads`: the
    intra-op threads torch fits with (1 leaves the other cores to decoding)."""

    def __init__(self, store: UserMemories, load_model: Callable[[], tuple], *, torch_threads: int = 1,
                 preload: bool = False, log: Callable[[str], None] = lambda m: None):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self._load_model, self.torch_threads, self.log = store, load_model, torch_threads, log
        self._model = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-serve-writer")
        self._jobs: collections.OrderedDict[str, MemoryJob] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self.current: MemoryJob | None = None
        if preload:
            self._pool.submit(self._preload)

    # ---------------------------------------------------------------- jobs
    def remember(self, user: str, facts: list) -> MemoryJob:
        return self._enqueue(MemoryJob(self._new_id(), check_user(user), "remember", facts=list(facts)))

    def forget(self, user: str, ids: list[str]) -> MemoryJob:
        return self._enqueue(MemoryJob(self._new_id(), check_user(user), "forget",
                                       ids=[check_fact_id(i) for i in ids]))

    def job(self, job_id: str) -> MemoryJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(j.status in ("queued", "running") for j in self._jobs.values())

    def _new_id(self) -> str:
        return f"job-{next(self._ids)}-{os.urandom(4).hex()}"

    def _enqueue(self, job: MemoryJob) -> MemoryJob:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down: no more memory writes")
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                old_id, old = next(iter(self._jobs.items()))
                if old.status in ("queued", "running"):
                    break
                del self._jobs[old_id]
            self._pool.submit(self._work, job)
        return job

    # ---------------------------------------------------------------- the thread
    def model(self):
        if self._model is None:
            try:
                import torch

                torch.set_num_threads(max(1, self.torch_threads))
            except ImportError:
                pass
            self._model = self._load_model()
        return self._model

    def _preload(self) -> None:
        try:
            self.model()
        except Exception as exc:  # noqa: BLE001 - reported again by the first job that needs it
            self.log(f"engram-local: could not load the model for memory writes: {exc}")

    def _work(self, job: MemoryJob) -> None:
        if self._closed:
            self._end(job, "failed", "the server shut down before this write ran")
            return
        self.current = job
        job.status = "running"
        try:
            self._run(job)
        except Exception as exc:  # noqa: BLE001 - reported through the job
            self._end(job, "failed", str(exc) or type(exc).__name__)
        finally:
            self.current = None

    def _run(self, job: MemoryJob) -> None:
        from engram_local.memory.learner import Learner

        # a private copy of the user's current version, stored as the new one on a clean exit
        with self.store.node.edit(job.user, job.kind) as ed:
            learner = Learner(ed.path, self.model())
            try:
                lj = learner.submit(job.facts) if job.kind == "remember" else learner.forget(job.ids)
                lj.wait()
            finally:
                learner.close(wait=False)
            if job.kind == "remember":
                job.fact_ids = [f.id for f in lj.written()]
            elif lj.error is None:
                job.fact_ids = list(job.ids)
            ed.fact_ids = list(job.fact_ids)
        if lj.error is not None and not job.fact_ids:
            self._end(job, "failed", str(lj.error) or type(lj.error).__name__)
        else:
            self._end(job, "done", "; ".join(m for _, m in lj.errors) or None)
        self.log(f"engram-local: memory job {job.id} ({job.kind}, user {job.user}): {job.status}"
                 + (f": {job.error}" if job.error else ""))

    @staticmethod
    def _end(job: MemoryJob, status: str, error: str | None) -> None:
        job.status, job.error = status, error
        job.done.set()

    def close(self, timeout: float | None = 120.0) -> None:
        """Stop: queued jobs fail ("shut down"), a running write is given `timeout` seconds to
        land (a write is stored in one atomic step: a write cut short leaves the old version)."""
        with self._lock:
            self._closed = True
            queued = [j for j in self._jobs.values() if j.status == "queued"]
        running = self.current
        self._pool.shutdown(wait=False, cancel_futures=True)
        for job in queued:
            if job is not running:
                self._end(job, "failed", "the server shut down before this write ran")
        if running is not None:
            running.done.wait(timeout)
