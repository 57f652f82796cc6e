"""`engram-local serve`: the OpenAI-compatible server (engram_local.serve). Heavy imports stay
inside the command."""

from __future__ import annotations

import click

from engram_local.commands.common import MODEL_HELP


@click.command()
@click.option("-m", "--model", type=click.Path(exists=True, file_okay=False), default=None,
              help=MODEL_HELP + " Must be a MODEL_DIR.")
@click.option("--memory-dir", default="memories", show_default=True, type=click.Path(file_okay=False),
              help="Users' memory files: a request of user U decodes with DIR/U.eov (created by the memory routes).")
@click.option("--memory-store", default=None, metavar="URL", envvar="ENGRAM_LOCAL_MEMORY_STORE",
              help="Where users' memories live: postgresql://user@host:port/db (shared by several serve "
                   "nodes; pip install 'engram-local[postgres]') or a directory (default: --memory-dir). "
                   "Also from $ENGRAM_LOCAL_MEMORY_STORE.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network: use --api-key).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free one).")
@click.option("--api-key", default=None, envvar="ENGRAM_LOCAL_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every /v1 route (also from $ENGRAM_LOCAL_API_KEY).")
@click.option("-np", "--parallel", "n_parallel", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Requests decoded together (sequences); more wait in a queue.")
@click.option("-c", "--ctx-size", "ctx", default=8192, show_default=True, type=click.IntRange(64),
              help="KV cache size in tokens, in all: each sequence holds CTX // NP.")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", default=0, show_default=True, type=click.IntRange(0),
              help="Backbone layers to offload to the GPU (llama.cpp).")
@click.option("-t", "--threads", type=click.IntRange(1), default=None, help="CPU threads for decoding (default: llama.cpp's).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests waiting for a sequence before the server answers 503.")
def serve(model, memory_dir, memory_store, host, port, api_key, n_parallel, ctx, n_gpu_layers, threads, max_queue):
    """Serve the model over HTTP: OpenAI-compatible chat and completions, per-user memory, a chat page.

    \b
      engram-local serve --memory-dir memories --api-key secret
      curl localhost:8080/v1/chat/completions -H 'Authorization: Bearer secret' \\
           -d '{"user": "alice", "messages": [{"role": "user", "content": "Who is my doctor?"}]}'

    The request's `user` field (or an X-Engram-User header) picks the memory, DIR/<user>.eov (or
    the user's row with --memory-store postgresql://...: many nodes, one store);
    POST /v1/memories writes facts, DELETE /v1/memories/USER/ID forgets one (docs/serve.md).
    """
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"the server needs its extra: pip install 'engram-local[serve]' ({exc})")
    from engram_local.serve.server import ServeError, ServeOptions, serve as run_server

    opts = ServeOptions(model=model, memory_dir=memory_dir, memory_store=memory_store, n_parallel=n_parallel, ctx=ctx,
                        n_gpu_layers=n_gpu_layers, threads=threads, max_queue=max_queue, api_key=api_key)
    try:
        run_server(opts, host, port)
    except ServeError as exc:
        raise click.ClickException(str(exc))
