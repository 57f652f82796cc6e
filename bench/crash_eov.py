"""Crash test of memory-file writes (issue 14): kill writers and check what is left.

    python bench/crash_eov.py [--trials 100] [--seed 0] [--json OUT]

Each trial starts from a file holding facts f0..f{k-1} and runs a writer in a child process
that adds facts one write at a time, printing each fact's id once its write returned. The
child is killed (SIGKILL) either by the fault-injection hook at one of the write's stages
(ENGRAM_LOCAL_FAULT=eov-write:STAGE: tmp-created, half-written, written, synced, renamed)
or, in every other trial, after a random delay. Then:
  corrupt    the file does not open (checksum, structure)      - must be 0
  lost       a fact the child reported written is missing        - must be 0
  mixed      the facts are not f0..f{m-1} for some m (a torn write) - must be 0
  leftover   temporary files still there after the next write    - must be 0
`tests/test_hardening_crash.py` runs a few trials in CI and this script's 100 trials as a
slow test; docs/hardening.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tmp-created", "half-written", "written", "synced", "renamed")

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from engram_local.formats.eov import LedgerFact, locked, read_memory_file, write_memory_file

    path, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for k in range(start, start + count):
        with locked(path):
            mf = read_memory_file(path, 7)
            s = mf.layers[16]
            rows = np.concatenate([s.rows, [1000 + k]])
            keys = np.concatenate([s.keys, [k]])
            values = np.concatenate([np.asarray(s.values), np.full((1, 8), k % 50, np.float16)])
            facts = mf.facts + [LedgerFact(f"f{k}", f"prompt {k}", f"answer {k}", [len(rows) - 1])]
            for f in facts[:-1]:
                f.entries = [int(np.flatnonzero((rows == 1000 + int(f.id[1:])))[0])]
            write_memory_file(path, 7, {16: (rows, keys, values)}, facts)
        print(f"f{k}", flush=True)
""")


def seed_file(path: Path, k: int):
    import numpy as np

    from engram_local.formats.eov import LedgerFact, write_memory_file

    rows = np.array([1000 + i for i in range(k)], np.int64)
    facts = [LedgerFact(f"f{i}", f"prompt {i}", f"answer {i}", [i]) for i in range(k)]
    values = np.array([[i % 50] * 8 for i in range(k)], np.float16).reshape(k, 8)
    write_memory_file(path, 7, {16: (rows, np.arange(k, dtype=np.int64), values)}, facts)


def trial(workdir: Path, rng: random.Random, stage: str | None) -> dict:
    from engram_local.formats.eov import MemoryFileError, read_memory_file, write_memory_file

    path = workdir / "me.eov"
    k0 = rng.randint(1, 30)
    seed_file(path, k0)
    env = dict(os.environ)
    count = 1 if stage else 10**6          # timed: writes until the kill lands
    if stage:
        env["ENGRAM_LOCAL_FAULT"] = f"eov-write:{stage}"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k0), str(count)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stage is None:
        time.sleep(rng.uniform(0.3, 1.5))          # the child's imports take ~0.3 s
        child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=120)
    reported = out.split()
    r = dict(stage=stage or "timed", killed=child.returncode == -9, reported=len(reported), corrupt=0,
             lost=0, mixed=0, leftover_before=0, leftover=0)
    try:
        mf = read_memory_file(path, 7)
    except MemoryFileError as exc:
        r["corrupt"], r["error"] = 1, str(exc)
        return r
    ids = [f.id for f in mf.facts]
    if ids != [f"f{i}" for i in range(len(ids))] or len(ids) < k0:
        r["mixed"] = 1
    r["lost"] = sum(1 for f in reported if f not in ids)
    r["leftover_before"] = len(list(workdir.glob(".me.eov.*.tmp")))
    s = mf.layers[16]
    write_memory_file(path, 7, {16: (s.rows, s.keys, s.values)}, mf.facts)      # the next write
    r["leftover"] = len(list(workdir.glob(".me.eov.*.tmp")))
    return r


def run(trials: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        stage = STAGES[(i // 2) % len(STAGES)] if i % 2 == 0 else None
        with tempfile.TemporaryDirectory() as d:
            results.append(trial(Path(d), rng, stage))
    summary = {k: sum(r[k] for r in results) for k in ("corrupt", "lost", "mixed", "leftover")}
    summary.update(trials=len(results), killed=sum(r["killed"] for r in results),
                   writes_reported=sum(r["reported"] for r in results),
                   leftover_temps_before_next_write=sum(r["leftover_before"] for r in results),
                   by_stage={s: sum(r["stage"] == s for r in results) for s in STAGES + ("timed",)})
    return {"summary": summary, "trials": results}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = run(a.trials, a.seed)
    print(json.dumps(res["summary"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    s = res["summary"]
    return 1 if s["corrupt"] or s["lost"] or s["mixed"] or s["leftover"] else 0


if __name__ == "__main__":
    sys.exit(main())
