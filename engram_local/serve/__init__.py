"""`engram-local serve`: an OpenAI-compatible HTTP server where each request carries its user and
decodes with that user's memory (docs/serve.md).

  * `users`  - user ids, each user's memory file and override stack, the background memory writer
  * `api`    - OpenAI request parsing, response shapes, generation (stop strings, streaming)
  * `app`    - the Starlette application: routes, API key, body size limit
  * `server` - load the model, start the engine, run uvicorn, shut down cleanly
  * `static` - the chat page served at `/` (plain HTML/JS, no build step)

Starlette, uvicorn and sse-starlette are the optional extra `engram-local[serve]`; they are
imported only by `app` and `server`.
"""
