"""Merge per-user `engram-local eval head-to-head --json` results into one report.

The ten development users were evaluated one user per process (two processes side by side on
the two cores, each with -t 1), so that a long run leaves every finished user on disk:

    for u in u000 ... u009:
        OMP_WAIT_POLICY=passive engram-local eval head-to-head \\
            --users ../shared/data/user-as-engram/users/$u.json --json OUT/$u.json \\
            --report OUT/$u.md --work-dir OUT/work -t 1 -q
    python bench/head_to_head_merge.py OUT/u0*.json --json docs/head-to-head-results.json \\
        --report docs/head-to-head-results.md

The merged table is what one `eval head-to-head --users u000.json ... u009.json` run writes
(the same per-user results, aggregated by engram_local.eval.head_to_head.aggregate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engram_local.eval import report
from engram_local.eval.head_to_head import aggregate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None)
    a = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in sorted(a.results)]
    letters = "".join(sorted(set.intersection(*(set(r["settings"]["conditions"]) for r in runs))))
    users = [u for r in runs for u in r["users"]]
    merged = dict(runs[0], users=users, conditions=aggregate(users, letters),
                  seconds=round(sum(r["seconds"] for r in runs), 1),
                  command=" && ".join(r["command"] for r in runs if r.get("command")))
    merged["settings"] = dict(merged["settings"], conditions=letters)
    written = report.write(merged, a.json, a.report)
    if not written:
        sys.stdout.write(report.markdown(merged))
    print(f"{len(users)} users: " + ", ".join(u["uid"] for u in users), file=sys.stderr)


if __name__ == "__main__":
    main()
