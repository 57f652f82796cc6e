"""Chat-form recall and indirect_any of users under A (no adapter, no rows), E (adapter only) and
F (rows fitted through the adapter + adapter): the `eval` contract's protocol, through the CLI.

    OMP_WAIT_POLICY=passive python bench/skill_chat.py [-m MODEL_DIR] --users u002.json [...] \\
        [--conditions A,E,F] [--show]

Per user: `remember --from-user-json` (the paper's prompt rule), then `run --prompts-jsonl` with
every direct_qa question as a chat turn (24 greedy tokens) and the first 20 indirect_qa items as
"Q: <q>\\nA:" (16 greedy tokens); an answer counts when it is contained, case-insensitively.
(engram-local eval head-to-head computes these and more in-process; this script checks the
commands a user runs.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ENV = dict(os.environ, OMP_WAIT_POLICY="passive")


def el(*args) -> str:
    p = subprocess.run(["engram-local", *map(str, args)], capture_output=True, text=True, env=ENV)
    if p.returncode != 0:
        raise SystemExit(f"engram-local {' '.join(map(str, args))}: {p.stderr.strip().splitlines()[-1:]}")
    return p.stdout


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--users", nargs="+", required=True, type=Path)
    ap.add_argument("--conditions", default="A,E,F")
    ap.add_argument("--show", action="store_true", help="print every reply")
    a = ap.parse_args()
    model = ["-m", a.model] if a.model else []
    conds = a.conditions.split(",")
    total = {c: [0, 0, 0, 0] for c in conds}
    for path in a.users:
        user = json.loads(path.read_text())
        tmp = Path(tempfile.mkdtemp())
        t0 = time.time()
        if "F" in conds:
            el("remember", *model, "-q", "-o", tmp / "u.eov", "--from-user-json", path)
        fit_s = time.time() - t0
        chat = jsonl(tmp / "chat.jsonl", [{"prompt": q["question"], "chat": True} for q in user["direct_qa"]])
        ind_qs = user["indirect_qa"][:20]
        ind = jsonl(tmp / "ind.jsonl", [{"prompt": f"Q: {q['question']}\nA:"} for q in ind_qs])
        flags = {"A": ["--no-skill"], "E": [], "F": ["--overrides", tmp / "u.eov"]}
        for c in conds:
            out = {}
            for name, f, n in (("chat", chat, 24), ("ind", ind, 16)):
                text = el("run", *model, *flags[c], "--prompts-jsonl", f, "-n", n, "--temp", 0)
                out[name] = [json.loads(line)["completion"] for line in text.splitlines() if line.strip()]
            hc = [str(q["answer"]).lower() in r.lower() for q, r in zip(user["direct_qa"], out["chat"])]
            hi = [str(q["answer"]).lower() in r.lower() for q, r in zip(ind_qs, out["ind"])]
            t = total[c]
            t[0] += sum(hc); t[1] += len(hc); t[2] += sum(hi); t[3] += len(hi)
            print(f"{path.stem} {c}: chat {sum(hc)}/{len(hc)}, indirect_any {sum(hi)}/{len(hi)}"
                  + (f" (remember {fit_s:.0f} s)" if c == "F" else ""), flush=True)
            if a.show:
                for q, r in zip(user["direct_qa"] + ind_qs, out["chat"] + out["ind"]):
                    print(f"    {q['question']} -> {r.strip()[:100]!r} | gold {q['answer']}")
    for c, t in total.items():
        print(f"TOTAL {c}: chat {t[0]}/{t[1]} = {t[0] / max(1, t[1]):.0%}, "
              f"indirect_any {t[2]}/{t[3]} = {t[2] / max(1, t[3]):.0%}")


if __name__ == "__main__":
    main()
