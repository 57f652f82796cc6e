"""`engram-local serve` (engram_local.serve) through real clients: a live uvicorn server on a free
loopback port, driven by the official `openai` package and by raw HTTP, on the tiny random-weight
MODEL_DIR (tests/runtime_fixtures.py; F32, so greedy output is deterministic).

The real default model (memory written through the routes, recalled, forgotten; the chat page in
a headless browser) is in tests/test_serve_default_model.py (slow).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
openai = pytest.importorskip("openai")

from tests.runtime_fixtures import shared_model_dir  # noqa: E402
from tests.test_store import pg  # noqa: E402,F401 - a throwaway PostgreSQL server (skips without one)

KEY = "test-key-123"


# --------------------------------------------------------------------------- a live server

@contextlib.contextmanager
def running_server(model, memory_dir, *, api_key=KEY, n_parallel=2, ctx=512, preload_writer=False,
                   memory_store=None):
    """A live server (engram_local.serve.server) on a free loopback port, in this process:
    yields (base_url, state); stopped and closed afterwards."""
    from engram_local.serve import server as srv

    opts = srv.ServeOptions(model=None if model is None else str(model), memory_dir=str(memory_dir),
                            memory_store=memory_store, n_parallel=n_parallel, ctx=ctx, threads=1,
                            api_key=api_key, preload_writer=preload_writer)
    sock = srv.bind("127.0.0.1", 0)
    state = srv.load(opts, log=lambda m: None)
    server = srv.uvicorn_server(state, sock, grace=2.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        assert thread.is_alive() and time.time() - t0 < 30, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    finally:
        server.should_exit = True
        thread.join(15)
        srv.close(state, write_grace=60)
        sock.close()


def call(base, method, path, body=None, headers=None, key=KEY, raw: bytes | None = None):
    """(status, JSON document) of one HTTP request."""
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text or b"{}")
        except ValueError:
            return e.code, {"raw": text.decode("utf-8", "replace")}


def wait_job(base, job_id, timeout=300, key=KEY):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st, doc = call(base, "GET", f"/v1/memories/jobs/{job_id}", key=key)
        assert st == 200, doc
        if doc["status"] in ("done", "failed"):
            return doc
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {doc['status']} after {timeout} s")


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    return shared_model_dir(tmp_path_factory, "model", adapter=True)


@pytest.fixture(scope="module")
def live(md, tmp_path_factory):
    with running_server(md, tmp_path_factory.mktemp("serve-mem")) as (base, state):
        yield base, state


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _chat(client, content="Hello world! How are you", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="model", messages=[{"role": "user", "content": content}], **kw)


# --------------------------------------------------------------------------- OpenAI routes

def test_models_and_health(live, client):
    base, state = live
    assert [m.id for m in client.models.list().data] == ["model"]
    assert client.models.retrieve("model").id == "model"
    st, doc = call(base, "GET", "/health", key=None)       # open without the key
    assert st == 200 and doc["status"] == "ok" and doc["slots"] == 2


def test_api_key_is_required(live):
    base, _ = live
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path, method, body in [("/v1/models", "GET", None), ("/v1/memories?user=a", "GET", None),
                               ("/v1/chat/completions", "POST", {"messages": []})]:
        st, doc = call(base, method, path, body, key=None)
        assert st == 401 and doc["error"]["code"] == "invalid_api_key", (path, doc)
    st, _ = call(base, "GET", "/v1/models", headers={"Authorization": "Basic " + KEY}, key=None)
    assert st == 401


def test_chat_completion(client):
    r = _chat(client)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert _chat(client).choices[0].message.content == r.choices[0].message.content    # greedy: the same
    # seeded sampling repeats itself
    a, b = (_chat(client, temperature=1.2, top_p=0.9, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_chat_stream_matches_the_reply(client):
    whole = _chat(client, max_tokens=16)
    chunks = list(_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(chunks) >= 3


def test_completions_stream_and_stop(client):
    kw = dict(model="model", prompt="The capital of France is", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)
    text = whole.choices[0].text
    assert whole.object == "text_completion" and whole.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == text
    # a stop string taken from the middle of the greedy text cuts it there, streamed or not
    stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 1) if text[i:i + 2].strip())
    cut = text[:text.find(stop)]
    r = client.completions.create(stop=[stop, "\x00never"], **kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    s = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=stop, **kw) if c.choices)
    assert s == cut
    ids = client.completions.create(model="model", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_bad_requests_get_openai_errors(live, client):
    base, _ = live
    with pytest.raises(openai.BadRequestError):
        _chat(client, temperature=5)
    with pytest.raises(openai.BadRequestError):
        _chat(client, n=2)
    with pytest.raises(openai.BadRequestError, match="context|holds"):
        _chat(client, content="Hello world " * 400)
    for body in [{"messages": "hi"}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5},
                 {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}]:
        st, doc = call(base, "POST", "/v1/chat/completions", body)
        assert st == 400 and doc["error"]["message"], (body, doc)
    st, doc = call(base, "POST", "/v1/completions", raw=b"{not json")
    assert st == 400 and "JSON" in doc["error"]["message"]
    st, doc = call(base, "GET", "/v1/nothing-here")
    assert st == 404 and "error" in doc


BAD_USERS = ["../x", "", "a" * 10240, "ünïcödé", "x/y", ".hidden", "a b", "..", "x\x00y"]


@pytest.mark.parametrize("bad", BAD_USERS, ids=lambda u: repr(u[:12]))
def test_user_ids_are_validated(live, client, bad):
    base, state = live
    st, doc = call(base, "POST", "/v1/chat/completions",
                   {"user": bad, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert st == 400 and doc["error"]["param"] == "user", doc
    st, _ = call(base, "POST", "/v1/memories", {"user": bad, "statement": "My cat is called Figaro."})
    assert st == 400
    st, _ = call(base, "GET", "/v1/memories?user=" + urllib.request.quote(bad))
    assert st == 400
    if bad and "\x00" not in bad and len(bad) < 1000:
        st, _ = call(base, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                     headers={"X-Engram-User": bad.encode("utf-8").decode("latin-1")})
        assert st == 400
    with pytest.raises(openai.BadRequestError):
        _chat(client, user=bad)
    left = [p.name for p in state.store.directory.iterdir()]
    assert all(re.fullmatch(r"u\d\.eov(\.lock|\.log)?", n) for n in left), f"a refused user id left a file: {left}"


def test_request_body_size_is_limited(live):
    """413 for a body over the limit: refused on its Content-Length before it is sent, or counted
    as it arrives when chunked (the client sends just over the limit, then waits)."""
    base, state = live
    host, port = base.removeprefix("http://").split(":")
    for chunked in (False, True):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Type", "application/json")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            chunk = b"x" * 65536
            for _ in range(state.max_body // len(chunk) + 1):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            conn.putheader("Content-Length", str(state.max_body + 1))
            conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413, chunked
        assert json.loads(resp.read())["error"]["code"] == "request_too_large"
        conn.close()
    # just under the limit: an ordinary (bad) request
    body = json.dumps({"messages": "x" * (state.max_body - 100)}).encode()
    assert call(base, "POST", "/v1/chat/completions", raw=body)[0] == 400


def _slow_steps(state, seconds):
    """Make every decode step of the engine take at least `seconds` and never end a request at
    an end-of-generation token (returns the undo)."""
    be = state.session.backend
    real = be.decode_step

    def slow(entries):
        time.sleep(seconds)
        return real(entries)
    be.decode_step = slow
    be.is_eog = lambda token: False
    return lambda: [be.__dict__.pop(k, None) for k in ("decode_step", "is_eog")]


def _record_streams(state, monkeypatch):
    eng, streams = state.engine, []
    real = eng.submit

    def submit(request):
        st = real(request)
        streams.append(st)
        return st
    monkeypatch.setattr(eng, "submit", submit)
    return streams


def _free(base, timeout=10):
    t0 = time.time()
    while time.time() - t0 < timeout:
        doc = call(base, "GET", "/health")[1]
        if doc["slots_busy"] == 0 and doc["queued"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_frees_its_sequence(live, monkeypatch):
    base, state = live
    streams = _record_streams(state, monkeypatch)
    undo = _slow_steps(state, 0.03)
    try:
        host, port = base.removeprefix("http://").split(":")
        for stream in (True, False):
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            body = {"prompt": "Hello world! How are you", "max_tokens": 200, "temperature": 0, "stream": stream}
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            if stream:
                resp = conn.getresponse()
                assert resp.status == 200
                seen = 0
                while seen < 3:
                    seen += resp.readline().startswith(b"data:")
            else:
                time.sleep(0.5)
            conn.sock.shutdown(2)
            conn.close()
            st = streams[-1]
            t0 = time.time()
            while not st.done and time.time() - t0 < 10:
                time.sleep(0.05)
            assert st.finish_reason == "cancelled" and len(st.tokens) < 200, (stream, st.finish_reason)
            assert _free(base), "the sequence was not freed"
    finally:
        undo()


# --------------------------------------------------------------------------- memory routes

def test_memory_routes(live, client):
    base, state = live
    st, job = call(base, "POST", "/v1/memories", {"user": "u1", "statement": "My cat is called Figaro."})
    assert st == 202 and set(job) == {"id", "status"} and job["status"] == "queued"
    before = state.store.stack("u1")
    done = wait_job(base, job["id"])
    assert done["status"] == "done" and done["fact_ids"] and done["error"] is None, done
    assert set(done) == {"id", "status", "fact_ids", "error"}
    st, doc = call(base, "GET", "/v1/memories?user=u1")
    assert st == 200 and doc["user"] == "u1"
    (fact,) = doc["facts"]
    assert set(fact) == {"id", "prompt", "answer", "rows", "time"}
    assert (fact["id"], fact["prompt"], fact["answer"]) == (done["fact_ids"][0], "My cat is called", "Figaro")
    assert fact["rows"] > 0
    after = state.store.stack("u1")
    assert before is None and after is not None and state.store.stack("u1") is after   # the new file, cached
    assert _chat(client, user="u1").choices[0].message.content is not None
    # prompt + answer form, then forget
    st, job2 = call(base, "POST", "/v1/memories", {"user": "u1", "prompt": "My doctor is", "answer": "Dr. Krause"})
    assert st == 202 and wait_job(base, job2["id"])["status"] == "done"
    assert len(call(base, "GET", "/v1/memories?user=u1")[1]["facts"]) == 2
    st, job3 = call(base, "DELETE", f"/v1/memories/u1/{fact['id']}")
    assert st == 202 and job3["status"] == "queued"
    assert wait_job(base, job3["id"]) == {"id": job3["id"], "status": "done", "fact_ids": [fact["id"]], "error": None}
    left = call(base, "GET", "/v1/memories?user=u1")[1]["facts"]
    assert [f["answer"] for f in left] == ["Dr. Krause"]
    assert state.store.stack("u1") is not after
    # unknown things
    assert call(base, "DELETE", f"/v1/memories/u1/{fact['id']}")[0] == 404
    assert call(base, "GET", "/v1/memories/jobs/job-nope")[0] == 404
    assert call(base, "GET", "/v1/memories?user=nobody")[1] == {"user": "nobody", "facts": []}
    for body in [{"user": "u1"}, {"user": "u1", "statement": "hello"}, {"user": "u1", "statement": "x" * 500},
                 {"user": "u1", "prompt": "My doctor is"}, {"statement": "My cat is called Figaro."}]:
        assert call(base, "POST", "/v1/memories", body)[0] == 400, body


def test_chat_remember_queues_the_stated_fact(live, client):
    base, state = live
    r = client.chat.completions.create(model="model", user="u2", max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "btw my dog is called Rex."}],
                                       extra_body={"remember": True})
    job = r.model_extra["memory_job"]
    assert job["statements"] and wait_job(base, job["id"])["status"] == "done"
    facts = call(base, "GET", "/v1/memories?user=u2")[1]["facts"]
    assert [f["answer"] for f in facts] == ["Rex"]
    r = _chat(client, content="Hello world! How are you", user="u2", extra_body={"remember": True})
    assert r.model_extra.get("memory_job") is None


def test_open_statements_over_http_join_one_fact(live):
    """POST /v1/memories with "I love jazz" then "I love hiking lol": one fact, both answers."""
    base, _ = live
    for statement in ("I love jazz.", "I love hiking lol"):
        st, job = call(base, "POST", "/v1/memories", {"user": "open", "statement": statement})
        assert st == 202 and wait_job(base, job["id"])["status"] == "done"
    facts = call(base, "GET", "/v1/memories?user=open")[1]["facts"]
    assert [(f["prompt"], f["answer"]) for f in facts] == [("I love", "jazz, hiking")]


def test_memory_routes_over_postgres(md, tmp_path, request):
    """--memory-store postgresql://...: the same routes, the user's memory a versioned row."""
    pg = request.getfixturevalue("pg")
    from engram_local.store import open_store

    with running_server(md, tmp_path / "unused", memory_store=pg.url) as (base, state):
        assert state.store.directory is None and state.store.node.mode == "notify"
        done = wait_job(base, call(base, "POST", "/v1/memories", {"user": "pu", "statement": "My cat is called Figaro."})[1]["id"])
        assert done["status"] == "done", done
        (fact,) = call(base, "GET", "/v1/memories?user=pu")[1]["facts"]
        assert fact["answer"] == "Figaro" and state.store.stack("pu") is state.store.stack("pu")
        st, job = call(base, "DELETE", f"/v1/memories/pu/{fact['id']}")
        assert st == 202 and wait_job(base, job["id"])["status"] == "done"
        assert call(base, "GET", "/v1/memories?user=pu")[1]["facts"] == []
    assert not (tmp_path / "unused").exists()
    with open_store(pg.url) as store:
        assert [(e.action, e.fact_ids) for e in store.log("pu")] == [("remember", (fact["id"],)),
                                                                     ("forget", (fact["id"],))]


def test_a_bad_memory_store_is_one_line():
    from engram_local.serve.server import ServeError, ServeOptions, open_node

    for spec, want in [("ftp://x/y", "unsupported memory store"), ("postgresql://nobody@127.0.0.1:1/x",
                                                                    "cannot connect")]:
        with pytest.raises(ServeError, match=want) as err:
            open_node(ServeOptions(memory_store=spec))
        assert str(err.value).startswith("--memory-store") and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the command, SIGTERM

@contextlib.contextmanager
def serve_process(md, memory_dir):
    """`engram-local serve` as a process on a free port: yields (Popen, base_url)."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    proc = subprocess.Popen([sys.executable, "-m", "engram_local.cli", "serve", "-m", str(md), "--port", "0",
                             "--memory-dir", str(memory_dir), "-np", "2", "-c", "512", "-t", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line + proc.stderr.read()[-2000:]
        yield proc, f"http://127.0.0.1:{m.group(1)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _write_started(base, statement, user="zed"):
    st, job = call(base, "POST", "/v1/memories", {"user": user, "statement": statement}, key=None)
    assert st == 202
    t0 = time.time()
    while call(base, "GET", f"/v1/memories/jobs/{job['id']}", key=None)[1]["status"] == "queued":
        assert time.time() - t0 < 120
        time.sleep(0.05)
    return job["id"]


def test_serve_command_stops_cleanly_on_sigterm(md, tmp_path):
    """SIGTERM lets the running memory write land before the process exits (0)."""
    from engram_local.formats.eov import read_memory_file

    with serve_process(md, tmp_path / "mem") as (proc, base):
        assert call(base, "GET", "/health", key=None)[0] == 200
        _write_started(base, "My cat is called Figaro.")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr.read()
    assert [f.answer for f in read_memory_file(tmp_path / "mem" / "zed.eov").facts] == ["Figaro"]


def test_kill_9_during_a_write_leaves_the_earlier_memory(md, tmp_path):
    """kill -9 while a write runs: the file is still readable, with its earlier facts."""
    from engram_local.formats.eov import read_memory_file

    with serve_process(md, tmp_path / "mem") as (proc, base):
        assert wait_job(base, _write_started(base, "My cat is called Figaro."), key=None)["status"] == "done"
        _write_started(base, "My doctor is Dr. Krause.")
        proc.kill()
        proc.wait(30)
    answers = [f.answer for f in read_memory_file(tmp_path / "mem" / "zed.eov").facts]
    assert answers in (["Figaro"], ["Figaro", "Dr. Krause"]), answers

