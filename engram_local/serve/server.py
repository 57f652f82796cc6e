"""Load the model, run the engine and the memory writer, serve HTTP with uvicorn, shut down cleanly.

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections and gives the requests in flight
`grace` seconds to finish (then cancels them); the engine then cancels whatever is left, the memory
writer fails the writes still queued and waits for the one running to land (a write stores the
user's new version in one atomic step: cut short by kill -9, it leaves the old version and its facts).

The memories live in `--memory-store` (engram_local.store.open_store: a directory, DIR/<user>.eov,
by default `--memory-dir`; or postgresql://... shared by several nodes), read through a bounded
node cache (CachedStore) that learns of other nodes' writes by LISTEN/NOTIFY.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engram_local.serve.users import MemoryWriter, UserMemories


class ServeError(Exception):
    """A problem with the server's options or model, explained in the message."""


@dataclass
class ServeOptions:
    model: str | None = None
    memory_dir: str = "memories"
    memory_store: str | None = None  # a directory or postgresql://...; None: memory_dir
    memory_cache_bytes: int = 256 << 20   # the node's cache of users' memories (LRU, by bytes)
    n_parallel: int = 4              # -np: sequences decoded together
    ctx: int = 8192                  # -c: KV cache cells in all (each sequence holds ctx // np)
    n_gpu_layers: int = 0
    threads: int | None = None
    max_queue: int = 64              # requests waiting for a sequence before 503
    api_key: str | None = None
    writer_threads: int = 1          # torch threads fitting memory writes
    preload_writer: bool = True      # load the fitting model at start (first write then is quick)
    grace: float = 10.0              # seconds in-flight requests get at shutdown
    write_grace: float = 120.0       # seconds a running memory write gets to land at shutdown


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(opts: ServeOptions, log: Callable[[str], None] = _stderr):
    """The ServerState of `opts`: the model loaded with `-np` sequences, its engine running,
    the memory store and writer."""
    from engram_local.memory import facade
    from engram_local.runtime.session import RunError, Session, open_override_stack
    from engram_local.serve.app import ServerState

    if opts.n_parallel < 1:
        raise ServeError(f"-np {opts.n_parallel}: at least one sequence")
    per_seq = opts.ctx // opts.n_parallel
    if per_seq < 64:
        raise ServeError(f"-c {opts.ctx} over -np {opts.n_parallel} leaves {per_seq} tokens per sequence; "
                         "give at least 64 per sequence")
    try:
        session = Session(opts.model, n_seq=opts.n_parallel, n_ctx=per_seq, n_threads=opts.threads,
                          n_gpu_layers=opts.n_gpu_layers, max_queue=opts.max_queue, backend="llama.cpp", log=log)
    except RunError as exc:
        raise ServeError(str(exc)) from None
    if session.model_dir is None or session.sidecar is None:
        session.close()
        raise ServeError("serve needs a MODEL_DIR (convert the checkpoint with `engram-local convert` first)")
    engine, sidecar = session.engine, session.sidecar
    model_path = session.model_dir.path

    def open_stack(path: Path):
        return engine.make_stack(open_override_stack([path], sidecar))

    try:
        store = UserMemories(open_node(opts), open_stack)
    except ServeError:
        session.close()
        raise
    writer = MemoryWriter(store, lambda: facade.load_model_for_memory(model_path),
                          torch_threads=opts.writer_threads, preload=opts.preload_writer, log=log)
    engine.start()
    return ServerState(session=session, store=store, writer=writer, model_id=Path(model_path).name,
                       api_key=opts.api_key or None)


def open_node(opts: ServeOptions):
    """The node's CachedStore over the store `opts` names (ServeError: one line)."""
    from engram_local.store import CachedStore, StoreError, open_store

    spec = opts.memory_store or opts.memory_dir
    flag = "--memory-store" if opts.memory_store else "--memory-dir"
    try:
        return CachedStore(open_store(spec), max_bytes=opts.memory_cache_bytes)
    except StoreError as exc:
        raise ServeError(f"{flag}: {exc}") from None
    except OSError as exc:
        raise ServeError(f"{flag} {spec}: {exc.strerror or exc}") from None


def store_name(store) -> str:
    """Where the memories are, for the start line (a directory's absolute path; a URL without
    its password)."""
    from engram_local.store.postgres import redact

    d = getattr(store, "dir", None)
    return os.path.abspath(d) if d is not None else redact(store.url)


def close(state, write_grace: float = 120.0) -> None:
    """Cancel what the engine still runs, let a running memory write land, close the memory
    store, free the model."""
    state.session.engine.close()
    state.writer.close(timeout=write_grace)
    state.store.close()
    state.session.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(state, sock: socket.socket, grace: float = 10.0):
    """A uvicorn.Server for the app of `state` on `sock` (call `.run(sockets=[sock])`)."""
    import contextlib

    import uvicorn

    from engram_local.serve.app import build_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn raises the signal it caught again once it has stopped serving, which would
            # end the process before the engine and the memory writer are closed: swallow it.
            with super().capture_signals():
                try:
                    yield
                finally:
                    getattr(self, "_captured_signals", []).clear()

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(state), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace, lifespan="off", server_header=False)
    return Server(config)


def serve(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8080,
          log: Callable[[str], None] = _stderr) -> None:
    """Run the server until SIGTERM / SIGINT (see the module docstring)."""
    sock = bind(host, port)
    state = load(opts, log)
    try:
        server = uvicorn_server(state, sock, opts.grace)
        s = state.session
        shown = f"[{host}]" if ":" in host else host
        log(f"engram-local: serving {state.model_id} on http://{shown}:{sock.getsockname()[1]} "
            f"({len(s.engine.slots)} sequences x {s.n_ctx} tokens, memory {store_name(state.store.node.store)}"
            + (", API key required" if state.api_key else "") + "); chat page at /")
        server.run(sockets=[sock])
    finally:
        log("engram-local: shutting down" + (" (waiting for a memory write to land)"
                                             if state.writer.current is not None else ""))
        close(state, opts.write_grace)
        sock.close()
