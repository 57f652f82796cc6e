#!/usr/bin/env python3
"""Chat recall when the same facts are typed sloppily -> docs/chat-memory.md (session 16).

Each persona's statements are rewritten the way people type in a chat window, by fixed rules and
a fixed seed (the questions and expected answers are left as they are): the final stop dropped,
about half of the statements in lower case ("i live in portland, oregon"), a third opened with a
filler ("btw", "fyi", "oh and", "just so you know,"), a quarter closed with chat noise (" lol",
" :)", "!!"). Then `engram-local eval chat-memory` runs on the rewritten files.

    OMP_WAIT_POLICY=passive python bench/sloppy_statements.py ../shared/data/chat-memory/p0[0-2].json \\
        --work-dir /tmp/sloppy --json docs/chat-memory-sloppy.json --report docs/chat-memory-sloppy.md
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

FILLERS = ("btw ", "fyi ", "oh and ", "just so you know, ")
NOISE = (" lol", " :)", "!!")


def sloppy(statement: str, rng: random.Random) -> str:
    s = statement.rstrip().rstrip(".")
    if rng.random() < 0.5:
        s = s.lower()
    if rng.random() < 1 / 3:
        s = rng.choice(FILLERS) + s
    if rng.random() < 0.25:
        s += rng.choice(NOISE)
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("personas", nargs="+", type=Path)
    ap.add_argument("--work-dir", type=Path, required=True, help="rewritten persona files and .eov files")
    ap.add_argument("--conditions", default="memory")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--json")
    ap.add_argument("--report")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    paths = []
    for p in args.personas:
        d = json.loads(p.read_text(encoding="utf-8"))
        d["statements"] = [sloppy(s, rng) for s in d["statements"]]
        for f, s in zip(d["facts"], d["statements"]):
            f["statement"] = s
        out = args.work_dir / p.name
        out.write_text(json.dumps(d, indent=1, ensure_ascii=False), encoding="utf-8")
        paths.append(str(out))
        for s in d["statements"]:
            print(f"{p.stem}: {s}", file=sys.stderr)
    cmd = ["engram-local", "eval", "chat-memory", "--personas", *paths, "--conditions", args.conditions,
           "--work-dir", str(args.work_dir), "--threads", str(args.threads), "--quiet"]
    if args.json:
        cmd += ["--json", args.json]
    if args.report:
        cmd += ["--report", args.report]
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
