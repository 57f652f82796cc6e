"""Users and their memory for the server: ids, memory files, override stacks, background writes.

A user id names a file, `<memory dir>/<user>.eov`, so it is checked before anything else: 1 to
64 characters of [A-Za-z0-9_.-], not starting with a dot (never a path, never a hidden file).
An unknown user simply has no memory file yet.

`MemoryStore.stack(user)` is the override stack a request decodes with: the user's file opened
(memory-mapped) and made into an engine stack, cached per user and keyed on the file's identity
(inode, size, mtime): a write replaces the file atomically (rename), so the next request opens the
new file, while a request already running keeps the stack it started with (its mapping of the old
file stays valid). Only the most recently used stacks stay open: an idle user costs nothing.

`MemoryWriter` runs memory writes (remember, forget) as jobs on one background thread, one job at
a time for every user (one writer per file; fitting is CPU-heavy and would otherwise starve
decoding), each through `memory.learner.Learner` with the fitting model loaded once.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

USER_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
USER_RULE = "1 to 64 characters of A-Z a-z 0-9 _ . -, not starting with '.'"
FACT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_JOBS_KEPT = 10_000        # finished jobs remembered for GET /v1/memories/jobs/{id}


class UserError(ValueError):
    """A bad user id or fact id (the server answers 400)."""


def check_user(user) -> str:
    """The user id, or UserError saying why it is refused."""
    if not isinstance(user, str):
        raise UserError(f"the user id must be a string ({USER_RULE})")
    if not USER_RE.fullmatch(user):
        shown = user if len(user) <= 40 else user[:40] + "..."
        raise UserError(f"user id {shown!r} refused: {USER_RULE}")
    return user


def check_fact_id(fact_id) -> str:
    if not isinstance(fact_id, str) or not FACT_ID_RE.fullmatch(fact_id):
        raise UserError("fact id refused: 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    return fact_id


class MemoryStore:
    """Each user's memory file under `directory` and the override stack requests decode with.

    `open_stack(path)` opens a file as an engine stack (the server passes
    `engine.make_stack(open_override_stack([path], sidecar))`); `max_open` stacks stay cached."""

    def __init__(self, directory: str | os.PathLike, open_stack: Callable[[Path], object], max_open: int = 64):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._open_stack = open_stack
        self.max_open = max_open
        self._lock = threading.Lock()
        self._stacks: collections.OrderedDict[str, tuple[tuple, object]] = collections.OrderedDict()

    def path(self, user: str) -> Path:
        return self.directory / f"{check_user(user)}.eov"

    def stack(self, user: str | None):
        """The override stack of `user`'s memory as it is now (None: no user, or no file yet)."""
        if user is None:
            return None
        path = self.path(user)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self._lock:
                self._stacks.pop(user, None)
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._stacks.get(user)
            if hit is not None and hit[0] == sig:
                self._stacks.move_to_end(user)
                return hit[1]
        stack = self._open_stack(path)
        with self._lock:
            self._stacks[user] = (sig, stack)
            self._stacks.move_to_end(user)
            while len(self._stacks) > self.max_open:
                self._stacks.popitem(last=False)
        return stack

    @property
    def n_open(self) -> int:
        return len(self._stacks)

    def facts(self, user: str) -> list[dict]:
        """The user's facts as the memory routes list them: id, prompt, answer, rows, time."""
        from engram_local.formats.eov import read_memory_file

        path = self.path(user)
        if not path.exists():
            return []
        mf = read_memory_file(path)
        return [{"id": f.id, "prompt": f.prompt, "answer": f.answer, "rows": len(f.entries),
                 "time": f.written} for f in mf.facts]


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

    def __init__(self, store: MemoryStore, load_model: Callable[[], tuple], *, torch_threads: int = 1,
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

        learner = Learner(self.store.path(job.user), self.model())
        try:
            lj = learner.submit(job.facts) if job.kind == "remember" else learner.forget(job.ids)
            lj.wait()
        finally:
            learner.close(wait=False)
        if job.kind == "remember":
            job.fact_ids = [f.id for f in lj.written()]
        elif lj.error is None:
            job.fact_ids = list(job.ids)
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
        land (a write replaces the file atomically: a write cut short leaves the old file)."""
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
