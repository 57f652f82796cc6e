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

`--keep OLD.json` keeps, per user, the conditions of an earlier merged run that the new runs do
not have (e.g. after a change that moves only the skill-adapter conditions E and F, rerun
`--conditions A,E,F` and keep B, C, D, G, H from the earlier table); the report's settings and
command say which conditions came from where.
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
    ap.add_argument("--keep", type=Path, default=None,
                    help="an earlier merged JSON whose per-user conditions fill in those the new runs lack")
    a = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in sorted(a.results)]
    letters = "".join(sorted(set.intersection(*(set(r["settings"]["conditions"]) for r in runs))))
    users = [u for r in runs for u in r["users"]]
    kept = ""
    if a.keep is not None:
        old = json.loads(a.keep.read_text())
        by_uid = {u["uid"]: u for u in old["users"]}
        missing = [u["uid"] for u in users if u["uid"] not in by_uid]
        if missing:
            sys.exit(f"--keep {a.keep}: no results for users {missing}")
        kept = "".join(sorted(set(old["settings"]["conditions"]) - set(letters)))
        for u in users:
            prev = by_uid[u["uid"]]
            u["conditions"] = {**{c: prev["conditions"][c] for c in kept}, **u["conditions"]}
            u["prepare"] = {**prev.get("prepare", {}), **u.get("prepare", {})}
        letters = "".join(sorted(set(letters) | set(kept)))
    merged = dict(runs[0], users=users, conditions=aggregate(users, letters),
                  seconds=round(sum(r["seconds"] for r in runs), 1),
                  command=" && ".join(r["command"] for r in runs if r.get("command")))
    merged["settings"] = dict(merged["settings"], conditions=letters)
    if kept:
        merged["settings"]["kept_from"] = {"file": str(a.keep), "conditions": kept}
        merged["command"] += f" (conditions {kept} kept from {a.keep})"
    written = report.write(merged, a.json, a.report)
    if not written:
        sys.stdout.write(report.markdown(merged))
    print(f"{len(users)} users: " + ", ".join(u["uid"] for u in users), file=sys.stderr)


if __name__ == "__main__":
    main()
