"""The OpenAI side of the server: request checks, generation with stop strings, response shapes.

Nothing here imports the web stack: `app` turns ApiError into an HTTP error with an OpenAI error
body ({"error": {"message", "type", "param", "code"}}) and streams what `Generation` yields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from engram_local.runtime.engine import QueueFull, Request
from engram_local.runtime.sampling import Sampler
from engram_local.runtime.session import _TextStream
from engram_local.serve.users import UserError, check_user

MAX_STOPS = 4
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered to the client: HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- request fields

def request_user(body: dict, header: str | None) -> str | None:
    """The request's user: the body's OpenAI `user` field or the X-Engram-User header (both:
    they must agree); None when neither is given (no memory). A bad id raises ApiError 400."""
    user = body.get("user") if isinstance(body, dict) else None
    if header is not None and user is not None and header != user:
        raise bad("the `user` field and the X-Engram-User header name different users", "user")
    user = user if user is not None else header
    if user is None:
        return None
    try:
        return check_user(user)
    except UserError as exc:
        raise bad(str(exc), "user", "invalid_user") from None


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not ((lo < v) if lo_open else (lo <= v)) or v > hi:
        kind = "an integer" if integer else "a number"
        raise bad(f"`{key}` must be {kind} in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", key)
    return v


@dataclass
class GenParams:
    sampler: Sampler
    max_tokens: int | None            # None: until the end of the context
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def gen_params(body: dict) -> GenParams:
    """Sampling and length fields shared by both completion routes (a max_tokens beyond the
    sequence's context ends at the context, finish_reason "length")."""
    if body.get("n", 1) not in (1, None):
        raise bad("`n` must be 1 (one choice per request)", "n")
    temp = _number(body, "temperature", 0.8, 0.0, 2.0)
    top_p = _number(body, "top_p", 0.95, 0.0, 1.0, lo_open=True)
    seed = _number(body, "seed", None, -2**63, 2**64 - 1, integer=True)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 0, 2**31 - 1, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad(f"`stop` must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("`stream` must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("`stream_options` must be an object", "stream_options")
    return GenParams(Sampler(temp=float(temp), top_p=float(top_p), seed=None if seed is None else seed % 2**64),
                     max_tokens, stops, stream, bool(opts.get("include_usage")))


def chat_messages(body: dict) -> list[dict]:
    """The request's messages as [{"role", "content": str}] (text content parts are joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}]: each message needs a role ({', '.join(ROLES)})", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise bad(f"messages[{i}]: only text content parts are supported", "messages")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}]: content must be a string or a list of text parts", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def completion_prompt(body: dict):
    """The /v1/completions prompt: a string or token ids (one prompt per request)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("`prompt` is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return p
    raise bad("`prompt` must be one string or one list of token ids", "prompt")


# --------------------------------------------------------------------------- generation

FINISH = {"eog": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class StopText:
    """Text out of a generation, cut at the first stop string: `feed` returns what can be sent
    now (text that might begin a stop string is held back until it is clear)."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = list(stops), "", 0, False

    def feed(self, new: str) -> str:
        self.text += new
        cut = None
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Generation:
    """One request on the engine, consumed from the event loop: `pieces()` yields text as it is
    generated; afterwards `finish_reason` (OpenAI's) and `usage` describe it. Leaving `pieces()`
    early (a client gone) cancels the request: its sequence is freed at the next step."""

    def __init__(self, engine, backend, params: GenParams, *, prompt=None, messages=None, stack=None,
                 opening=()):
        """opening: token ids the reply starts with (runtime.routing), already at the end of
        `prompt` (ids); they are the reply's first text and count as completion tokens."""
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.params, self.backend = params, backend
        self.opening = [int(t) for t in opening]
        n_max = params.max_tokens if params.max_tokens is not None else backend.n_ctx
        self.request = Request(prompt=prompt, messages=messages, max_tokens=max(n_max - len(self.opening), 0),
                               sampler=params.sampler, stack=stack, on_update=self._notify)
        self.engine = engine
        self.stream = None
        self.finish_reason: str | None = None
        self.text = ""

    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:       # the loop has closed (shutdown): nobody is listening
            pass

    def submit(self) -> None:
        """Queue the request (tokenizes; run it off the event loop)."""
        try:
            self.stream = self.engine.submit(self.request)
        except QueueFull as exc:
            raise ApiError(503, str(exc), type="server_error", code="server_busy") from None
        except ValueError as exc:
            raise bad(str(exc), code="context_length_exceeded" if "context" in str(exc) or "holds" in str(exc)
                      else None) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template refusing the messages
            raise bad(f"cannot build the prompt: {exc}") from None

    @property
    def usage(self) -> dict:
        st, k = self.stream, len(self.opening)
        p, c = (len(st.prompt) - k, len(st.tokens) + k) if st is not None else (0, 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def pieces(self, gone=None):
        """Text deltas as they come. `gone`: an async callable, True once the client has left
        (checked while waiting), for routes that do not stream."""
        st, out = self.stream, []
        text = _TextStream(self.backend, out.append)
        for t in self.opening:
            text.push(t)
        stop = StopText(self.params.stops)
        seen, checked = 0, time.monotonic()
        try:
            while True:
                self._wake.clear()
                n = len(st.tokens)
                for t in st.tokens[seen:n]:
                    text.push(t)
                seen = n
                ended = st.done and seen == len(st.tokens)
                if ended:
                    text.finish()
                piece = stop.feed("".join(out))
                out.clear()
                if stop.stopped:
                    st.cancel()
                    self.finish_reason = "stop"
                elif ended:
                    piece += stop.flush()
                    if st.finish_reason == "error":
                        raise ApiError(500, f"generation failed: {st.error}", type="server_error")
                    self.finish_reason = FINISH.get(st.finish_reason, "stop")
                if piece:
                    self.text += piece
                    yield piece
                if self.finish_reason is not None:
                    return
                if gone is None:
                    await self._wake.wait()
                    continue
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await gone():
                        return
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
        finally:
            if not st.done:
                st.cancel()

    async def run(self, gone=None) -> str:
        async for _ in self.pieces(gone):
            pass
        return self.text


# --------------------------------------------------------------------------- response shapes

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def response(rid: str, model: str, obj: str, choice: dict | None, usage: dict | None = None,
             extra: dict | None = None) -> dict:
    """An OpenAI response or stream chunk of object type `obj` ("chat.completion",
    "chat.completion.chunk", "text_completion") with its one choice (None: no choice, as in the
    final usage chunk of a stream)."""
    doc = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
           "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}]}
    if usage is not None:
        doc["usage"] = usage
    doc.update(extra or {})
    return doc
