"""The engine: many requests on one model, decoded together (continuous batching).

A request is a prompt (token ids, text or chat messages), its own sampling settings and its
user's override stack (the user's memory: `Engine.make_stack`, or None for the backend's own).
`submit` queues it and returns a `Stream` at once; the engine gives each admitted request a
sequence of the backend (its KV cells, its Engram history, its override stack) and runs decode
steps: each step decodes, in one llama_decode, the next token of every generating sequence plus
prompt chunks of newly admitted ones (at most n_batch tokens), then samples each sequence's next
token with that request's sampler. Requests join and leave between steps; `Stream.cancel()`
frees a sequence at the next step; a full queue refuses a request with `QueueFull`.

A finished request's sequence keeps its tokens: the next request of the same user whose prompt
starts the same way (the next chat turn) decodes only what differs. A sequence that moves to
another user's stack is forgotten first (its state was computed with other rows).

`Session.generate` (so `engram-local run`) is this engine with one sequence: `run` and the
server share one decode path, Backend.decode_step.

Threads: `step()` may be called by whoever consumes a stream (iterating a Stream of an engine
without a thread drives the steps itself, as `run` does), or `start()` runs the steps on a
background thread (the server). Everything that touches the backend runs under one lock.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from engram_local.runtime.backend import reusable
from engram_local.runtime.sampling import Sampler

FINISH_REASONS = ("eog", "length", "context", "cancelled", "error")


class EngineError(RuntimeError):
    """A request failed inside the engine (its decode step failed); `__cause__` says why."""


class QueueFull(EngineError):
    """The engine's queue holds max_queue requests already: try again later."""


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    decode_tokens: int = 0          # tokens produced after the first (each one eval + sample)
    decode_s: float = 0.0
    first_token_ms: float | None = None

    def add(self, other: "Timings") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.prompt_s += other.prompt_s
        self.generated_tokens += other.generated_tokens
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        if self.first_token_ms is None:
            self.first_token_ms = other.first_token_ms

    def as_dict(self) -> dict:
        def rate(n, s):
            return round(n / s, 2) if s > 0 and n > 0 else 0.0
        return {"prompt_tokens": self.prompt_tokens,
                "prompt_tokens_per_s": rate(self.prompt_tokens, self.prompt_s),
                "generated_tokens": self.generated_tokens,
                "generated_tokens_per_s": rate(self.decode_tokens, self.decode_s),
                "first_token_ms": round(self.first_token_ms, 2) if self.first_token_ms is not None else None}


@dataclass
class Request:
    """What to generate. prompt: token ids, or text (tokenized as is), or None with `messages`
    (chat messages, rendered with the model's chat template); both text forms need an engine
    built with an `encode` function. stack: the user's memory (Engine.make_stack), None for the
    backend's own override stack. sampler: this request's sampling (None: greedy)."""
    prompt: Sequence[int] | str | None = None
    messages: list[dict] | None = None
    max_tokens: int = 256
    sampler: Sampler | None = None
    stack: object | None = None
    ignore_eos: bool = False
    # Called (no arguments) after each new token of the stream and once when it ends, on the
    # thread that ran the step: it must be quick and must not call into the engine (the server
    # wakes its event loop with it: loop.call_soon_threadsafe).
    on_update: Callable[[], None] | None = None


_DONE = object()


class Stream:
    """One submitted request: iterate it for its token ids as they are generated (blocking);
    `tokens`, `finish_reason` (one of FINISH_REASONS, None while running), `timings` and
    `error` describe it; `cancel()` stops it at the next step."""

    def __init__(self, engine: "Engine", request: Request, prompt: list[int], rid: int):
        self.engine, self.request, self.prompt, self.id = engine, request, prompt, rid
        self.sampler = request.sampler or Sampler(temp=0.0)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.timings = Timings()
        self.cancelled = False
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._t0 = time.perf_counter()
        self._t_first = self._t_last = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating (finish_reason "cancelled"); the sequence is freed at the next step."""
        self.cancelled = True
        self.engine._wake()

    def __iter__(self) -> Iterator[int]:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                if self.engine.running:
                    item = self._q.get()
                else:
                    try:
                        busy = self.engine.step()
                    except BaseException:
                        self.engine._drop(self)      # e.g. Ctrl-C: this request ends, cancelled
                        raise
                    if not busy and not self.done:
                        raise EngineError(f"request {self.id} is neither queued nor running (engine closed?)")
                    continue
            if item is _DONE:
                if self.error is not None:
                    raise EngineError(f"request {self.id} failed: {self.error}") from self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> "Stream":
        """Wait until the request has finished (driving the steps if no engine thread runs)."""
        if self.engine.running:
            if not self._done.wait(timeout):
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
        else:
            for _ in self:
                pass
        if self.error is not None and self.finish_reason == "error":
            raise EngineError(f"request {self.id} failed: {self.error}") from self.error
        return self

    # ---------------------------------------------------------------- engine side
    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self._q.put(token)
        self._notify()

    def _notify(self) -> None:
        fn = self.request.on_update
        if fn is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a listener must never break a step
                pass

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        t = self.timings
        t.generated_tokens = len(self.tokens)
        if self._t_first is not None:
            t.decode_tokens = len(self.tokens) if reason == "eog" else max(0, len(self.tokens) - 1)
            t.decode_s = self._t_last - self._t_first
        self._done.set()
        self._q.put(_DONE)
        self._notify()


@dataclass
class _Slot:
    seq: int
    stack: object | None = None
    stream: Stream | None = None
    pending: list[int] = field(default_factory=list)    # prompt tokens still to decode
    feed: int | None = None                               # the sampled token to decode next


class Engine:
    """Continuous batching over one backend (runtime.backend.Backend; llama.cpp for n_seq > 1).

    max_queue: requests waiting for a sequence before `submit` raises QueueFull. encode: turns
    a text prompt or chat messages into token ids (Session passes its own). sidecar: the model's
    Engram sidecar (for make_stack).
    """

    def __init__(self, backend, *, max_queue: int = 64, encode: Callable | None = None, sidecar=None,
                 log: Callable[[str], None] | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.backend, self.max_queue, self.encode, self.sidecar = backend, int(max_queue), encode, sidecar
        self.log = log or (lambda msg: None)
        self.slots = [_Slot(seq) for seq in range(backend.n_seq)]
        self._waiting: collections.deque[Stream] = collections.deque()
        self._lock = threading.RLock()           # the backend and the slots (held for a whole step)
        self._qlock = threading.Lock()           # the waiting queue (held briefly: submit never waits for a step)
        self._work = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False
        self._next_id = 0
        self.n_steps = 0

    # ---------------------------------------------------------------- requests
    def make_stack(self, overrides):
        """A user's override stack ({layer: [native.OverrideSet]}, e.g. from
        session.open_override_stack) for Request.stack; share it between that user's requests."""
        if self.sidecar is None:
            raise RuntimeError("this engine has no Engram sidecar: no user memory")
        with self._lock:
            return self.backend.make_stack(self.sidecar, overrides)

    def _prompt_ids(self, request: Request) -> list[int]:
        if request.messages is not None or isinstance(request.prompt, str):
            if self.encode is None:
                raise ValueError("this engine takes token ids only (built without an encode function)")
            ids = self.encode(request.prompt, request.messages)
        else:
            ids = request.prompt
        return [int(t) for t in (ids or ())]

    def submit(self, request: Request) -> Stream:
        """Queue a request; its Stream at once. ValueError for a request that can never run
        (empty prompt, prompt that fills the context, max_tokens < 0); QueueFull when full."""
        prompt = self._prompt_ids(request)
        n_ctx = self.backend.n_ctx
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= n_ctx:
            raise ValueError(f"the prompt is {len(prompt)} tokens but a sequence holds {n_ctx} (and at "
                             "least one more is needed to generate)")
        if request.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {request.max_tokens}")
        with self._qlock:
            if self._closed:
                raise EngineError("the engine is closed")
            free = sum(s.stream is None for s in self.slots)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"the engine's queue is full ({len(self._waiting)} requests waiting for "
                                f"{len(self.slots)} sequences); try again later")
            stream = Stream(self, request, prompt, self._next_id)
            self._next_id += 1
            self._waiting.append(stream)
        self._wake()
        return stream

    def generate(self, request: Request) -> Stream:
        """submit + wait: the finished Stream."""
        return self.submit(request).result()

    def opening(self, prompt: Sequence[int], candidates, stack=None,
                neutral: Sequence[Sequence[int]] = (), **judge):
        """The runtime.routing.Route a chat reply to `prompt` (token ids) on `stack` (a user's
        override stack, None: the backend's own) opens with, scored on sequence 0 while no request
        runs (runtime.routing.best_opening; `neutral`: the token ids of routing.NEUTRAL_TURNS
        rendered as `prompt` was; `judge`: best_opening's `relevance` and `min_score`, as
        routing.turn_routing gives them for the user's turn). None when
        the best does not pass the gate, when the prompt
        leaves no room, or when the engine is busy (the reply then opens as the model likes).
        Sequence 0 is left holding `prompt` for that stack, which the next request reuses."""
        from engram_local.runtime import routing

        if not candidates or len(prompt) >= self.backend.n_ctx - 1:
            return None
        try:
            with self.exclusive() as be:
                slot = self.slots[0]
                if slot.stack is not stack:
                    be.set_seq_stack(0, stack)      # another user's rows: sequence 0 starts over
                    slot.stack = stack
                return routing.best_opening(be, prompt, candidates, neutral, **judge)
        except EngineError:
            return None

    @contextlib.contextmanager
    def exclusive(self):
        """The backend, held by the caller between requests (e.g. to score continuations,
        runtime.routing): EngineError while a request runs or waits. What the caller leaves in
        sequence 0 is reused by the next request whose prompt starts with it."""
        with self._lock:
            if self.n_active or self._waiting:
                raise EngineError("the engine is busy with requests")
            yield self.backend

    @property
    def n_active(self) -> int:
        return sum(s.stream is not None for s in self.slots)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    # ---------------------------------------------------------------- the step
    def step(self) -> bool:
        """One round: admit waiting requests, one decode step, sample. False when idle."""
        with self._lock:
            self._reap()
            self._admit()
            active = [s for s in self.slots if s.stream is not None]
            if not active:
                return False
            entries, slots = self._plan(active)
            if not entries:
                return True
            try:
                rows = self.backend.decode_step(entries)
            except BaseException as exc:
                # The backend forgot every sequence: every running request ends here.
                for s in active:
                    self._release(s, "cancelled" if not isinstance(exc, Exception) else "error",
                                  exc if isinstance(exc, Exception) else None)
                if not isinstance(exc, Exception):
                    raise
                self.log(f"engram-local: a decode step failed: {exc}")
                return True
            self.n_steps += 1
            for slot, (_, chunk, want), logits in zip(slots, entries, rows):
                if want:
                    try:
                        self._advance(slot, logits)
                    except Exception as exc:  # noqa: BLE001 - e.g. a sampler refusing NaN logits: this request fails
                        self._release(slot, "error", exc)
            return True

    def _reap(self) -> None:
        """Cancelled requests leave: waiting ones are dropped, running ones free their sequence."""
        with self._qlock:
            gone = [st for st in self._waiting if st.cancelled]
            for st in gone:
                self._waiting.remove(st)
        for st in gone:
            st._finish("cancelled")
        for s in self.slots:
            if s.stream is not None and s.stream.cancelled:
                self._release(s, "cancelled")

    def _admit(self) -> None:
        be = self.backend
        while True:
            free = [s for s in self.slots if s.stream is None]
            with self._qlock:
                if not free or not self._waiting:
                    return
                st = self._waiting.popleft()
            stack = st.request.stack

            def reuse(s: _Slot) -> int:       # prompt tokens the sequence already holds
                return reusable(be.seq_tokens(s.seq), st.prompt) if s.stack is stack else 0

            slot = max(free, key=lambda s: (reuse(s), -s.seq))
            common = reuse(slot)
            try:
                be.set_seq_stack(slot.seq, stack)       # a different user's stack: forgotten first
                slot.stack = stack
                be.seq_truncate(slot.seq, common)
            except Exception as exc:  # noqa: BLE001 - this request fails, the engine goes on
                st._finish("error", exc)
                continue
            common = len(be.seq_tokens(slot.seq))        # a backend may roll back further
            slot.stream, slot.pending, slot.feed = st, st.prompt[common:], None
            st.timings.prompt_tokens = len(slot.pending)

    def _plan(self, active: list[_Slot]):
        """The step's entries: one token of every generating sequence, then prompt chunks in
        admission order within what is left of n_batch."""
        budget = self.backend.n_batch
        entries, slots = [], []
        for s in active:
            if not s.pending and s.feed is not None:
                entries.append((s.seq, [s.feed], True))
                slots.append(s)
                s.feed = None
                budget -= 1
        for s in sorted((s for s in active if s.pending), key=lambda s: s.stream.id):
            if budget <= 0:
                break
            chunk, s.pending = s.pending[:budget], s.pending[budget:]
            entries.append((s.seq, chunk, not s.pending))
            slots.append(s)
            budget -= len(chunk)
        return entries, slots

    def _advance(self, slot: _Slot, logits) -> None:
        """Sample the slot's next token from its logits; emit it or finish the request."""
        st, be = slot.stream, self.backend
        now = time.perf_counter()
        if st._t_first is None and not st.tokens:
            st.timings.prompt_s = now - st._t0
        if len(st.tokens) >= st.request.max_tokens:
            self._release(slot, "length")
            return
        tok = st.sampler.sample(logits)
        now = time.perf_counter()
        if st._t_first is None:
            st._t_first = now
            st.timings.first_token_ms = (now - st._t0) * 1000.0
        st._t_last = now
        if be.is_eog(tok) and not st.request.ignore_eos:
            self._release(slot, "eog")
            return
        st._emit(tok)
        if len(st.tokens) >= st.request.max_tokens:
            self._release(slot, "length")
        elif len(be.seq_tokens(slot.seq)) >= be.n_ctx:
            self._release(slot, "context")
        else:
            slot.feed = tok

    def _release(self, slot: _Slot, reason: str, error: BaseException | None = None) -> None:
        st, slot.stream, slot.pending, slot.feed = slot.stream, None, [], None
        if st is not None:
            st._finish(reason, error)

    def _drop(self, stream: Stream) -> None:
        """End one request now (its consumer gave up, e.g. Ctrl-C)."""
        with self._lock:
            with self._qlock:
                if stream in self._waiting:
                    self._waiting.remove(stream)
            for s in self.slots:
                if s.stream is stream:
                    self._release(s, "cancelled")
            stream._finish("cancelled")

    # ---------------------------------------------------------------- the background thread
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def start(self) -> "Engine":
        """Run the steps on a background thread (for callers that consume streams concurrently)."""
        if self.running:
            return self
        self._thread = threading.Thread(target=self._loop, name="engram-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._closed:
            try:
                busy = self.step()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive one bad step
                self.log(f"engram-local: engine step failed: {exc}")
                with self._lock:
                    for s in self.slots:
                        self._release(s, "error", exc)
                continue
            if not busy:
                with self._work:
                    if not self._closed and not self._waiting and not any(
                            s.stream is not None for s in self.slots):
                        self._work.wait(0.5)

    def close(self) -> None:
        """Cancel every request and stop the thread (the backend stays open: its owner closes it)."""
        with self._lock:
            with self._qlock:
                self._closed = True
                waiting, self._waiting = list(self._waiting), collections.deque()
            for st in waiting:
                st._finish("cancelled")
            for s in self.slots:
                self._release(s, "cancelled")
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
