"""Learning from conversation: spot facts a user states about themselves in a chat turn and
write them to their memory file in the background.

    learner = Learner("me.eov", model_dir)              # model: a MODEL_DIR, None = the default
    for p in learner.propose("btw I'm allergic to penicillin"):
        learner.submit([p], on_done=lambda job: print(job.new_ids, job.error))
    ...
    learner.wait(); learner.close()

`propose` is pure text (`engram_local.text.statements.extract_facts`) plus a look at the file's
ledger: a fact already stored (same prompt and answer) or already queued is not proposed again; a
stored fact with the same prompt and another answer is named in `Proposal.replaces` (an update,
"I drive a Toyota now").

`submit` queues a write and returns at once: one worker thread runs the jobs one at a time, in
order, with `engram_local.memory.facade.remember` / `forget` (which write the .eov atomically
under its lock: a reader - the chat reloading its overrides - sees the old file or the new one,
never a part). The fitting model is loaded by the worker on its first job, so neither loading nor
fitting ever blocks the caller. `on_done(job)` is called in the worker thread when a job ends,
with `job.new_ids`, `job.replaced` (new id -> id of the fact it replaced, when the facade reports
it) and `job.error`; the caller applies the new file at its own safe point (a chat between turns:
`Session.reload_overrides()`).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from engram_local.text.facts import FactInputError
from engram_local.text.statements import extract_facts

__all__ = ["Learner", "Proposal", "Job"]


@dataclass
class Proposal:
    """A fact spotted in a user turn: the statement, its (prompt, answer) split, and the id of a
    stored fact with the same prompt that it would replace (None: a new fact)."""
    statement: str
    prompt: str
    answer: str
    replaces: str | None = None
    adds: bool = False        # its answer joins the stored fact's (facade.NewFact.adds)

    def fact(self):
        """The facade.NewFact to write (facade.statement_fact of the statement)."""
        from engram_local.memory.facade import statement_fact

        return statement_fact(self.statement)


@dataclass
class Job:
    """One queued write. `kind` is "remember" or "forget"; after `done` is set, `new_ids`
    (remember: the ids of the facts written), `unchanged` (ids of stored facts that a fact only
    restated: nothing written for it), `replaced` (new id -> the id it replaced), `recalled`
    (new id -> recalled exactly after the fit), `report` (the facade's last WriteReport) and
    `error` (None on success; a remember of several facts that fails as a whole is retried one
    fact at a time, and `errors` lists the facts that still failed, with the message)."""
    kind: str
    facts: list = field(default_factory=list)          # remember: NewFact; ids assigned by the facade
    ids: list[str] = field(default_factory=list)       # forget: the ids to remove
    on_done: Callable[["Job"], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    new_ids: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)
    recalled: dict[str, bool] = field(default_factory=dict)
    reports: list = field(default_factory=list)
    error: BaseException | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)   # (statement, message)

    @property
    def report(self):
        return self.reports[-1] if self.reports else None

    @property
    def ok(self) -> bool:
        return self.done.is_set() and self.error is None

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def written(self) -> list:
        """The facts of a remember job that were written or restated (with their ids)."""
        ids = set(self.new_ids) | set(self.unchanged)
        return [f for f in self.facts if f.id in ids]


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _prompt_key(prompt: str) -> str:
    """Prompts compared as the facade compares them when it can (text.facts.prompt_key: case,
    spacing, "I'm"/"I am" aside), else by case and spacing."""
    from engram_local.text import facts

    pk = getattr(facts, "prompt_key", None)
    return pk(prompt) if pk is not None else _key(prompt)


class Learner:
    """Background writer of one user's memory file (see the module docstring).

    `model`: a MODEL_DIR path (None: the default model), or an already loaded
    `(EngramModel, tokenizer, fingerprint)` tuple. `loader(model)` loads it (default:
    `facade.load_model_for_memory`, looked up when first needed). `method`, `chat`: passed to
    `facade.remember`."""

    def __init__(self, path: str | os.PathLike, model=None, *, loader=None, method: str = "joint",
                 chat: bool | None = None):
        self.path = Path(path)
        self._model_arg = model
        self._loaded = model if isinstance(model, tuple) else None
        self._loader = loader
        self.method = method
        self.chat = chat
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[Job] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ proposing

    def stored(self) -> list:
        """The ledger facts of the file (empty when it does not exist or cannot be read)."""
        if not self.path.exists():
            return []
        from engram_local.formats.eov import read_memory_file

        try:
            return list(read_memory_file(self.path).facts)
        except Exception:  # noqa: BLE001 - a damaged file is reported by the write, not here
            return []

    def propose(self, turn: str) -> list[Proposal]:
        """The facts about the user in `turn` not yet stored or queued (possibly none)."""
        from engram_local.memory.facade import statement_fact

        statements = extract_facts(turn)
        if not statements:
            return []
        stored = self.stored()
        by_prompt = {_prompt_key(f.prompt): f for f in stored}
        known = {(_prompt_key(f.prompt), _key(f.answer)) for f in stored}
        with self._lock:
            queued = {(_prompt_key(f.prompt), _key(f.answer)) for j in self._pending if j.kind == "remember"
                      for f in j.facts}
        out, seen = [], set()
        for s in statements:
            try:
                fact = statement_fact(s)
            except FactInputError:
                continue
            prompt, answer, adds = fact.prompt, fact.answer, fact.adds
            k = (_prompt_key(prompt), _key(answer))
            if k in known or k in queued or k in seen:
                continue
            seen.add(k)
            old = by_prompt.get(k[0])
            out.append(Proposal(s, prompt, answer, replaces=old.id if old is not None and not adds else None,
                                adds=adds))
        return out

    # ------------------------------------------------------------------ the queue

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return len(self._pending)

    def pending_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._pending)

    def submit(self, statements: Iterable, on_done: Callable[[Job], None] | None = None) -> Job:
        """Queue a write of `statements` (str statements, Proposals or facade.NewFact) and return
        its Job at once. A statement that cannot be split raises FactInputError here, before
        anything is queued."""
        from engram_local.memory.facade import NewFact, statement_facts

        facts = []
        for s in statements:
            if isinstance(s, NewFact):
                facts.append(s)
            elif isinstance(s, Proposal):
                facts.append(s.fact())
            else:
                facts += statement_facts(str(s))
        if not facts:
            raise FactInputError("no facts given")
        return self._enqueue(Job("remember", facts=facts, on_done=on_done))

    def forget(self, ids: Sequence[str], on_done: Callable[[Job], None] | None = None) -> Job:
        """Queue the removal of facts `ids` behind every write queued before it."""
        return self._enqueue(Job("forget", ids=list(ids), on_done=on_done))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every job queued so far has ended; False on timeout."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.pending_jobs():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.wait(left):
                return False
        return True

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the worker (after the queued jobs when `wait`)."""
        if wait:
            self.wait(timeout)
        self._closed = True
        self._queue.put(None)

    def _enqueue(self, job: Job) -> Job:
        if self._closed:
            raise RuntimeError("the learner is closed")
        with self._lock:
            self._pending.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="engram-learner", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job

    # ------------------------------------------------------------------ the worker

    def _model(self):
        if self._loaded is None:
            loader = self._loader
            if loader is None:
                from engram_local.memory import facade

                loader = facade.load_model_for_memory
            self._loaded = loader(self._model_arg)
        return self._loaded

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.kind == "remember":
                    self._remember(job)
                else:
                    self._forget(job)
            except BaseException as exc:  # noqa: BLE001 - reported through the job
                job.error = exc
            finally:
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)
                job.done.set()
                if job.on_done is not None:
                    try:
                        job.on_done(job)
                    except Exception:  # noqa: BLE001 - a caller's callback must not stop the worker
                        pass

    def _note(self, job: Job, report) -> None:
        job.reports.append(report)
        same = list(getattr(report, "unchanged", None) or [])
        job.unchanged.extend(same)
        job.new_ids.extend(i for i in report.new_ids if i not in same)
        job.recalled.update({k: v for k, v in report.recalled.items() if k in report.new_ids})
        job.replaced.update(getattr(report, "replaced", None) or {})

    def _remember(self, job: Job) -> None:
        from engram_local.memory import facade

        em, tok, fp = self._model()
        try:
            self._note(job, facade.remember(self.path, job.facts, em, tok, fp, method=self.method, chat=self.chat))
            return
        except FactInputError as exc:
            if len(job.facts) == 1:
                job.errors.append((facade_sentence(job.facts[0]), str(exc)))
                job.error = exc
                return
        # several facts, one of them refused: write the others one at a time
        for f in job.facts:
            f.id = None
            try:
                self._note(job, facade.remember(self.path, [f], em, tok, fp, method=self.method, chat=self.chat))
            except FactInputError as exc:
                job.errors.append((facade_sentence(f), str(exc)))
        if job.errors and not job.new_ids:
            job.error = FactInputError("; ".join(m for _, m in job.errors))

    def _forget(self, job: Job) -> None:
        from engram_local.memory import facade

        if not self.path.exists():
            raise FactInputError(f"no fact {', '.join(map(repr, job.ids))}: {self.path} does not exist yet")
        em, tok, fp = self._model()
        job.reports.append(facade.forget(self.path, job.ids, em, tok, fp, chat=self.chat))


def facade_sentence(fact) -> str:
    """The sentence of a NewFact ("My doctor is" + "Dr. Krause" -> "My doctor is Dr. Krause")."""
    from engram_local.text.facts import join_answer

    return fact.prompt + join_answer(fact.prompt, fact.answer)
