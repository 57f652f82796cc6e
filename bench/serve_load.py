"""Load and isolation of `engram-local serve` (loopback only, bounded in count and time).

20 users each get a canary fact ("My doctor is Dr. <name>") through POST /v1/memories; then N chat
requests ("Who is my doctor?") from C concurrent clients in random user order, while a writer
client keeps adding and forgetting other facts of random users (POST / DELETE /v1/memories). An
answer that names another user's canary is a leak. Reports leaks, recall, p50/p95 latency,
requests/s, and the server's memory (VmRSS, RssAnon from /proc) with 1,000 users' memory files
present, before and after each of those users has made a request.

    OMP_WAIT_POLICY=passive python bench/serve_load.py --requests 2000 --clients 16
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

DOCTORS = ["Krause", "Okonkwo", "Varga", "Lindqvist", "Moreau", "Tanaka", "Novak", "Silva", "Haddad",
           "Kowalski", "Fischer", "Nakamura", "Oyelaran", "Petrov", "Quintero", "Rasmussen", "Sato",
           "Bergstrom", "Abernathy", "Castellano"]
PETS = ["Figaro", "Biscuit", "Pepper", "Mochi", "Ziggy", "Luna", "Tofu", "Noodle"]
KEY = "bench-key"


def call(base, method, path, body=None, timeout=600):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def wait_job(base, jid, deadline):
    while time.time() < deadline:
        st, j = call(base, "GET", f"/v1/memories/jobs/{jid}")
        if j.get("status") in ("done", "failed"):
            return j
        time.sleep(0.5)
    return {"status": "timeout"}


def memory_kb(pid) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--files", type=int, default=1000, help="users' memory files present for the footprint")
    ap.add_argument("-np", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--time-limit", type=float, default=1800, help="seconds for the chat phase, at most")
    ap.add_argument("--port", type=int, default=0, help="0: a free one")
    ap.add_argument("--no-writes", action="store_true", help="no memory writes during the chat phase")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    assert a.users <= len(DOCTORS)
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    mem = tmp / "mem"
    log = open(tmp / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "engram_local.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(a.port), "--memory-dir", str(mem), "--api-key", KEY, "-np", str(a.np)],
                            stderr=subprocess.PIPE, text=True)
    fig: dict = {"requests": a.requests, "clients": a.clients, "users": a.users, "np": a.np,
                 "writes": not a.no_writes}
    try:
        m, seen = None, []
        while m is None:
            line = proc.stderr.readline()
            if not line:
                print("the server did not start: " + "".join(seen)[-2000:], file=sys.stderr)
                return 1
            seen.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        threading.Thread(target=lambda: shutil.copyfileobj(proc.stderr, log), daemon=True).start()
        base = f"http://127.0.0.1:{m.group(1)}"
        fig["rss_started_kb"] = memory_kb(proc.pid)

        # ---- canaries
        users = [f"user{i:02d}" for i in range(a.users)]
        canary = dict(zip(users, DOCTORS))
        t0 = time.time()
        jobs = [call(base, "POST", "/v1/memories", {"user": u, "statement": f"My doctor is Dr. {d}."})[1]["id"]
                for u, d in canary.items()]
        done = [wait_job(base, j, time.time() + 1800) for j in jobs]
        fig["canary_writes_s"] = round(time.time() - t0, 1)
        assert all(j["status"] == "done" for j in done), done

        # ---- 1,000 users' files: copies of a written file (a few KB each)
        src = mem / f"{users[0]}.eov"
        for i in range(a.files):
            shutil.copyfile(src, mem / f"idle{i:04d}.eov")
        fig["rss_files_present_kb"] = memory_kb(proc.pid)

        # ---- the chat phase, writes and forgets interleaved
        order = [rng.choice(users) for _ in range(a.requests)]
        lat, outs, errors = [None] * len(order), [None] * len(order), [0]
        stop = threading.Event()
        writes = {"remember": 0, "forget": 0, "failed": 0}

        def writer():
            wr = random.Random(1)
            while not stop.is_set():
                u = wr.choice(users)
                st, j = call(base, "POST", "/v1/memories", {"user": u, "statement": f"My cat is called {wr.choice(PETS)}."})
                if st != 202:
                    writes["failed"] += 1
                    continue
                j = wait_job(base, j["id"], time.time() + 600)
                writes["remember"] += j["status"] == "done"
                facts = call(base, "GET", f"/v1/memories?user={u}")[1].get("facts", [])
                cats = [f for f in facts if f["prompt"].startswith("My cat")]
                if cats and wr.random() < 0.7:
                    st, j = call(base, "DELETE", f"/v1/memories/{u}/{cats[0]['id']}")
                    if st == 202:
                        writes["forget"] += wait_job(base, j["id"], time.time() + 600)["status"] == "done"

        deadline = time.time() + a.time_limit

        def ask(i):
            if time.time() > deadline:
                return
            t = time.perf_counter()
            st, r = call(base, "POST", "/v1/chat/completions",
                         {"model": "default", "user": order[i], "max_tokens": a.max_tokens, "temperature": 0,
                          "messages": [{"role": "user", "content": "Who is my doctor?"}]})
            if st != 200:
                errors[0] += 1
                return
            lat[i] = time.perf_counter() - t
            outs[i] = r["choices"][0]["message"]["content"]

        wt = threading.Thread(target=writer, daemon=True)
        t0 = time.time()
        if not a.no_writes:
            wt.start()
        with cf.ThreadPoolExecutor(a.clients) as ex:
            list(ex.map(ask, range(len(order))))
        wall = time.time() - t0
        stop.set()
        if wt.is_alive():
            wt.join(600)
        got = [(u, o) for u, o in zip(order, outs) if o is not None]
        ls = sorted(x for x in lat if x is not None)
        fig.update({
            "completed": len(got), "errors": errors[0], "wall_s": round(wall, 1),
            "req_per_s": round(len(got) / wall, 2),
            "p50_s": round(statistics.median(ls), 3) if ls else None,
            "p95_s": round(ls[min(len(ls) - 1, int(0.95 * len(ls)))], 3) if ls else None,
            "leaks": sum(any(d in o for v, d in canary.items() if v != u) for u, o in got),
            "recall": sum(canary[u] in o for u, o in got),
            "writes_during": dict(writes),
        })
        fig["rss_after_load_kb"] = memory_kb(proc.pid)

        # ---- every one of the 1,000 idle users makes a request: then they are idle again
        files = [f"idle{i:04d}" for i in range(a.files)]
        t0 = time.time()
        with cf.ThreadPoolExecutor(a.clients) as ex:
            list(ex.map(lambda u: call(base, "POST", "/v1/completions",
                                       {"user": u, "prompt": "My doctor is", "max_tokens": 1, "temperature": 0}),
                        files))
        fig["files_touched_s"] = round(time.time() - t0, 1)
        fig["rss_after_1000_users_kb"] = memory_kb(proc.pid)
        fig["health"] = call(base, "GET", "/health")[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(fig, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1) + "\n")
    return 0 if fig.get("leaks") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
