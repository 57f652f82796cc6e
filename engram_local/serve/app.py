"""The Starlette application: OpenAI routes, memory routes, the chat page, API key, body limit.

    POST /v1/chat/completions, POST /v1/completions     (stream: server-sent events)
    GET  /v1/models, GET /v1/models/{id}, GET /health
    POST /v1/memories                {"user", "statement"} | {"user", "prompt", "answer"} -> 202 job
    GET  /v1/memories?user=U         {"user", "facts": [{"id", "prompt", "answer", "rows", "time"}]}
    GET  /v1/memories/jobs/{id}      {"id", "status", "fact_ids", "error"}
    DELETE /v1/memories/{user}/{id}  -> 202 job
    GET  /                           the chat page (engram_local/serve/static)
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from engram_local.serve import api
from engram_local.serve.api import ApiError, Generation, bad
from engram_local.serve.users import MemoryWriter, UserError, UserMemories, check_fact_id, check_user
from engram_local.text.facts import MAX_FACT_CHARS

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20          # bytes; a larger request body is refused with 413
OPEN_PATHS = ("/health",)   # reachable without the API key (with the page and its static files)


@dataclass
class ServerState:
    """What the routes share: the loaded session (its engine running), the users' memory."""
    session: object
    store: UserMemories
    writer: MemoryWriter
    model_id: str
    api_key: str | None = None
    max_body: int = MAX_BODY
    created: int = 0

    @property
    def engine(self):
        return self.session.engine


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {"Retry-After": "1"} if err.status == 503 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# --------------------------------------------------------------------------- middleware (plain ASGI)

class Guard:
    """API key on every route but the page and /health; request bodies at most `max_body` bytes
    (read whole before the route runs: 413 beyond, whatever Content-Length claims)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.state.api_key
        if key and path.startswith("/v1") and path not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                err = ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               type="authentication_error", code="invalid_api_key")
                return await error_response(err)(scope, receive, send)
        limit = self.state.max_body
        too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            if int(headers.get("content-length") or 0) > limit:
                return await error_response(too_big)(scope, receive, send)
        except ValueError:
            return await error_response(bad("bad Content-Length header"))(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await error_response(too_big)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# --------------------------------------------------------------------------- helpers

async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _state(request: Request) -> ServerState:
    return request.app.state.engram


async def _user_stack(state: ServerState, user: str | None):
    try:
        return await anyio.to_thread.run_sync(state.store.stack, user)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign memory file
        raise ApiError(500, f"cannot open the memory of user {user!r}: {exc}", type="server_error",
                       code="memory_unreadable") from None


def _sse(events, generation: Generation):
    """An SSE response of the async iterator `events` (dicts), ended by `data: [DONE]`; the
    generation is cancelled if the stream ends early (client gone, shutdown)."""
    async def gen():
        try:
            async for doc in events:
                yield {"data": json.dumps(doc, ensure_ascii=False)}
            yield {"data": "[DONE]"}
        except ApiError as err:
            yield {"data": json.dumps(err.body())}
            yield {"data": "[DONE]"}
        finally:
            if not generation.stream.done:
                generation.stream.cancel()
    return EventSourceResponse(gen(), ping=15)


async def _start(request: Request, state: ServerState, body: dict, **prompt) -> tuple[Generation, str | None]:
    user = api.request_user(body, request.headers.get("x-engram-user"))
    params = api.gen_params(body)
    stack = await _user_stack(state, user)
    if prompt.get("messages") is not None and stack is not None and state.session.echo_replies:
        prompt = await anyio.to_thread.run_sync(_opened, state, user, stack, prompt["messages"])
    gen = Generation(state.engine, state.session.backend, params, stack=stack, **prompt)
    await anyio.to_thread.run_sync(gen.submit)
    return gen, user


def _opened(state: ServerState, user: str, stack, messages: list[dict]) -> dict:
    """The prompt of a chat request whose reply opens with the best of the user's fitted
    openings (`run`'s rule, runtime.routing, weighed by relevance to the last user message;
    scored only while the engine is idle): {"prompt": ids + opening, "opening": opening}, or
    {"messages": messages} as it came."""
    from engram_local.runtime import routing

    try:
        ids = state.session.encode(None, messages)
        found = state.store.openings(user, state.session.reply_tokenize)
        turn = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        route = state.engine.opening(ids, found, stack, neutral=state.session.neutral_prompts,
                                     **routing.turn_routing(found, lambda: state.session.encoder, turn))
    except Exception:  # noqa: BLE001 - no opening; the request reports its own problems as before
        route = None
    if route is None:
        return {"messages": messages}
    return {"prompt": ids + list(route.opening.tokens), "opening": route.opening.tokens}


# --------------------------------------------------------------------------- OpenAI routes

async def chat_completions(request: Request):
    state = _state(request)
    body = await json_body(request)
    messages = api.chat_messages(body)
    gen, user = await _start(request, state, body, messages=messages)
    extra = {}
    if body.get("remember") is True:
        try:
            extra["memory_job"] = await anyio.to_thread.run_sync(_auto_remember, state, user, messages)
        except BaseException:
            gen.stream.cancel()
            raise
    rid, model = api.new_id("chatcmpl"), state.model_id
    if gen.params.stream:
        def chunk(delta, finish=None):
            return api.response(rid, model, "chat.completion.chunk", {"delta": delta, "finish_reason": finish})

        async def events():
            yield {**chunk({"role": "assistant", "content": ""}), **extra}
            async for piece in gen.pieces():
                yield chunk({"content": piece})
            yield chunk({}, gen.finish_reason)
            if gen.params.include_usage:
                yield api.response(rid, model, "chat.completion.chunk", None, gen.usage)
        return _sse(events(), gen)
    await gen.run(request.is_disconnected)
    message = {"role": "assistant", "content": gen.text}
    return JSONResponse(api.response(rid, model, "chat.completion",
                                     {"message": message, "finish_reason": gen.finish_reason}, gen.usage, extra))


async def completions(request: Request):
    state = _state(request)
    body = await json_body(request)
    gen, _ = await _start(request, state, body, prompt=api.completion_prompt(body))
    rid, model = api.new_id("cmpl"), state.model_id
    if gen.params.stream:
        def chunk(text, finish=None):
            return api.response(rid, model, "text_completion", {"text": text, "finish_reason": finish})

        async def events():
            async for piece in gen.pieces():
                yield chunk(piece)
            yield chunk("", gen.finish_reason)
            if gen.params.include_usage:
                yield api.response(rid, model, "text_completion", None, gen.usage)
        return _sse(events(), gen)
    await gen.run(request.is_disconnected)
    return JSONResponse(api.response(rid, model, "text_completion",
                                     {"text": gen.text, "finish_reason": gen.finish_reason}, gen.usage))


def _model_doc(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "engram-local"}


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [_model_doc(_state(request))]})


async def model(request: Request):
    state = _state(request)
    if request.path_params["model"] != state.model_id:
        raise ApiError(404, f"no model {request.path_params['model']!r}", code="model_not_found")
    return JSONResponse(_model_doc(state))


async def health(request: Request):
    state = _state(request)
    eng = state.engine
    return JSONResponse({"status": "ok", "model": state.model_id, "slots": len(eng.slots),
                         "slots_busy": eng.n_active, "queued": eng.n_waiting,
                         "memory_jobs": state.writer.pending, "users_open": state.store.n_open})


# --------------------------------------------------------------------------- memory routes

def _fact_text(body: dict, key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v.strip():
        raise bad(f"`{key}` must be a non-empty string", key)
    if len(v) > MAX_FACT_CHARS:
        raise bad(f"`{key}` has {len(v)} characters; a fact's text is at most {MAX_FACT_CHARS}", key)
    return v


def _checked_user(value) -> str:
    try:
        return check_user(value)
    except UserError as exc:
        raise bad(str(exc), "user", "invalid_user") from None


def _queued(job) -> JSONResponse:
    return JSONResponse({"id": job.id, "status": "queued"}, status_code=202)   # it was, when accepted


def _enqueue(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as exc:      # shutting down
        raise ApiError(503, str(exc), type="server_error") from None


async def add_memory(request: Request):
    from engram_local.memory.facade import NewFact, statement_facts
    from engram_local.text.facts import FactInputError

    state = _state(request)
    body = await json_body(request)
    user = _checked_user(body.get("user"))
    if "statement" in body:
        statement = _fact_text(body, "statement")
        try:
            facts = statement_facts(statement)
        except FactInputError as exc:
            raise bad(f"cannot split the statement into prompt and answer: {exc}", "statement") from None
    elif "prompt" in body or "answer" in body:
        facts = [NewFact(prompt=_fact_text(body, "prompt"), answer=_fact_text(body, "answer"))]
    else:
        raise bad('give {"user", "statement"} or {"user", "prompt", "answer"}')
    return _queued(_enqueue(state.writer.remember, user, facts))


def _auto_remember(state: ServerState, user: str | None, messages: list[dict]) -> dict | None:
    """The chat-memory rule on the user's last turn: the facts it states, queued as one job."""
    from engram_local.memory.learner import Learner

    turn = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if user is None or not turn:
        return None
    with state.store.as_file(user) as path:
        proposals = Learner(path, None).propose(turn)
    if not proposals:
        return None
    job = _enqueue(state.writer.remember, user, [p.fact() for p in proposals])
    return {"id": job.id, "status": "queued", "statements": [p.statement for p in proposals]}


async def list_memories(request: Request):
    state = _state(request)
    user = _checked_user(request.query_params.get("user"))
    try:
        facts = await anyio.to_thread.run_sync(state.store.facts, user)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(500, f"cannot read the memory of user {user!r}: {exc}", type="server_error") from None
    return JSONResponse({"user": user, "facts": facts})


async def memory_job(request: Request):
    job = _state(request).writer.job(request.path_params["job"])
    if job is None:
        raise ApiError(404, f"no memory job {request.path_params['job']!r}", code="job_not_found")
    return JSONResponse(job.as_json())


async def forget_memory(request: Request):
    state = _state(request)
    user = _checked_user(request.path_params["user"])
    try:
        fact_id = check_fact_id(request.path_params["fact_id"])
    except UserError as exc:
        raise bad(str(exc), "fact_id") from None
    facts = await anyio.to_thread.run_sync(state.store.facts, user)
    if not any(f["id"] == fact_id for f in facts):
        raise ApiError(404, f"user {user!r} has no fact {fact_id!r}", code="fact_not_found")
    return _queued(_enqueue(state.writer.forget, user, [fact_id]))


# --------------------------------------------------------------------------- the page

async def page(request: Request):
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- the app

async def _api_error(request, exc: ApiError):
    return error_response(exc)


async def _http_error(request, exc: HTTPException):
    return error_response(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))


async def _internal(request, exc: Exception):
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


def build_app(state: ServerState) -> Starlette:
    state.created = state.created or int(time.time())
    routes = [
        Route("/", page),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/memories", add_memory, methods=["POST"]),
        Route("/v1/memories", list_memories, methods=["GET"]),
        Route("/v1/memories/jobs/{job}", memory_job),
        Route("/v1/memories/{user}/{fact_id}", forget_memory, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                                       Exception: _internal})
    app.state.engram = state
    app.add_middleware(Guard, state=state)
    return app
