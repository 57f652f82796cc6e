"""How the writer's optimizer steps should use two cores (docs/writespeed.md, "Threads").

Records the bf16 suffix batches (with their values) of the first optimizer steps of 40 natural
statements, then times their forward + backward - the optimizer's whole compute - in fresh
processes, one per thread arrangement (OpenMP reads its settings when it starts):

  omp2     torch's default: every op split over 2 OpenMP threads, OMP_WAIT_POLICY=passive
  omp1     one OpenMP thread (OMP_NUM_THREADS=1), passive
  spin     2 OpenMP threads, passive, GOMP_SPINCOUNT=10000 (threads spin ~0.1 ms before sleeping)
  workers  as `Batches.run` ships: the buckets on 2 Python threads, one OpenMP thread each, passive

Each arrangement runs alone and then as two copies side by side (a machine shared with another
job like it). Seconds per pass over the recorded batches, best of 3.

    OMP_WAIT_POLICY=passive python bench/writer_threads.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARRANGEMENTS = {
    "omp2": {},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "spin": {"GOMP_SPINCOUNT": "10000"},
    "workers": {},
}


def record(out: Path, statements: int = 40, batches: int = 40) -> None:
    """The first `batches` bf16 training batches of a fit of `statements` natural statements."""
    sys.path.insert(0, str(HERE))
    import torch
    import writespeed as ws
    from engram_local.memory import prefix

    got = []
    orig = prefix.FrozenPrefix.forward

    def forward(self, bt, values):
        if bt.get("fast") and values.requires_grad and len(got) < batches:
            got.append((bt, values.detach().clone()))
        return orig(self, bt, values)

    prefix.FrozenPrefix.forward = forward
    s = ws.Session()
    st, _ = ws.natural_statements()
    facts = [s.facade.NewFact(*s.facade.split_statement(x), id=f"f{i}") for i, x in enumerate(st[:statements])]
    with tempfile.TemporaryDirectory() as d:
        s.remember(Path(d) / "m.eov", facts)
    torch.save(got, out)


def time_pass(rec: Path, arrangement: str, rounds: int = 3) -> float:
    import torch
    import torch.nn.functional as F
    from engram_local.memory import batching, facade
    from engram_local.memory.prefix import FrozenPrefix

    em, _, _ = facade.load_model_for_memory(None)
    model = FrozenPrefix(em)
    got = torch.load(rec, weights_only=False)

    def one(pair):
        bt, v = pair
        p = torch.nn.Parameter(v.clone())
        F.cross_entropy(model.forward(bt, p), bt["tgt"], reduction="sum").backward()

    if arrangement == "workers":
        pool = batching._pool(2)
        run = lambda: list(pool.map(one, got))             # noqa: E731
    else:
        run = lambda: [one(x) for x in got]                  # noqa: E731
    run()                                                    # warm-up
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def measure(rec: Path, arrangement: str, copies: int) -> list[float]:
    env = dict(os.environ, OMP_WAIT_POLICY="passive", **ARRANGEMENTS[arrangement])
    cmd = [sys.executable, __file__, "--time", str(rec), "--arrangement", arrangement]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--time", help=argparse.SUPPRESS)            # child: time one arrangement
    ap.add_argument("--arrangement", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.time:
        print(round(time_pass(Path(args.time), args.arrangement), 2))
        return 0
    with tempfile.TemporaryDirectory() as d:
        rec = Path(d) / "batches.pt"
        record(rec)
        res = {}
        for name in ARRANGEMENTS:
            res[name] = {"alone_s": measure(rec, name, 1)[0], "side_by_side_s": measure(rec, name, 2)}
            print(name, json.dumps(res[name]), flush=True)
    print("\n| arrangement | alone (s) | two side by side (s each) |\n|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['alone_s']} | {', '.join(map(str, r['side_by_side_s']))} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
