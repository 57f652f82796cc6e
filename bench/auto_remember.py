"""Score the chat-turn fact detector (`engram_local.text.statements.extract_facts`) on a
labelled set of chat turns.

    python bench/auto_remember.py                          # both halves, markdown table
    python bench/auto_remember.py --split dev --errors     # the dev half, with its mistakes
    python bench/auto_remember.py --json OUT.json

The set (default tests/data/auto_remember.jsonl) has one object per line: {"turn": "...",
"facts": ["statement", ...], "split": "dev"|"heldout", "kind": "..."}; an empty "facts" list
marks a turn that must not be written. Two levels are scored:

* turn: a turn is predicted positive when the detector writes anything; precision = positive
  turns that hold a fact / all positive turns; recall = fact turns with a write / fact turns.
* statement: a written statement counts as right when it equals a labelled statement of the
  same turn under `statement_key` (case, quotes, spacing, final stop, "im"/"I'm" ignored);
  precision = right / written, recall = right / labelled. "recall (splittable)" only counts
  labelled statements `split_statement` can split (the others cannot be written by any detector
  that hands statements to `remember`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engram_local.text.facts import FactInputError, split_statement  # noqa: E402
from engram_local.text.statements import explain, extract_facts, statement_key  # noqa: E402

DEFAULT = ROOT / "tests" / "data" / "auto_remember.jsonl"


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            d = json.loads(line)
            if not isinstance(d.get("turn"), str) or not isinstance(d.get("facts"), list):
                raise SystemExit(f"{path}:{n}: expected {{\"turn\": str, \"facts\": [str]}}")
            rows.append(d)
    return rows


def _splittable(s: str) -> bool:
    try:
        split_statement(s)
        return True
    except FactInputError:
        return False


def score(rows: list[dict]) -> dict:
    tp = fp = fn = tn = 0
    written = right = labelled = labelled_split = right_split = 0
    errors = []
    by_kind: Counter = Counter()
    fp_kind: Counter = Counter()
    for r in rows:
        got = extract_facts(r["turn"])
        want = list(r["facts"])
        gk = {statement_key(s) for s in got}
        wk = {statement_key(s) for s in want}
        if got and want:
            tp += 1
        elif got:
            fp += 1
            fp_kind[r.get("kind", "?")] += 1
        elif want:
            fn += 1
        else:
            tn += 1
        by_kind[r.get("kind", "?")] += 1
        ok = gk & wk
        written += len(gk)
        right += len(ok)
        labelled += len(wk)
        for s in want:
            if _splittable(s):
                labelled_split += 1
                right_split += statement_key(s) in ok
        if gk != wk:
            errors.append({"turn": r["turn"], "kind": r.get("kind"), "wrote": got, "labelled": want,
                           "wrong": sorted(gk - wk), "missed": sorted(wk - gk)})

    def div(a, b):
        return a / b if b else float("nan")

    return {
        "turns": len(rows), "fact_turns": tp + fn,
        "turn_precision": div(tp, tp + fp), "turn_recall": div(tp, tp + fn),
        "turn_tp": tp, "turn_fp": fp, "turn_fn": fn, "turn_tn": tn,
        "statements_labelled": labelled, "statements_written": written, "statements_right": right,
        "statement_precision": div(right, written), "statement_recall": div(right, labelled),
        "statements_splittable": labelled_split,
        "statement_recall_splittable": div(right_split, labelled_split),
        "false_positive_kinds": dict(fp_kind), "kinds": dict(by_kind), "errors": errors,
    }


def table(results: dict[str, dict]) -> str:
    head = ("| set | turns | fact turns | turn precision | turn recall | statements labelled | written | "
            "statement precision | statement recall | recall (splittable) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['turns']} | {r['fact_turns']} | {r['turn_precision']:.1%} ({r['turn_tp']}/"
            f"{r['turn_tp'] + r['turn_fp']}) | {r['turn_recall']:.1%} ({r['turn_tp']}/{r['fact_turns']}) | "
            f"{r['statements_labelled']} | {r['statements_written']} | {r['statement_precision']:.1%} "
            f"({r['statements_right']}/{r['statements_written']}) | {r['statement_recall']:.1%} "
            f"({r['statements_right']}/{r['statements_labelled']}) | {r['statement_recall_splittable']:.1%} "
            f"(of {r['statements_splittable']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT, help="labelled JSONL (default: %(default)s)")
    ap.add_argument("--split", choices=["dev", "heldout", "all"], default=None,
                    help="score one half only (default: dev, held-out and all)")
    ap.add_argument("--errors", action="store_true", help="list the mistakes, with each clause's reason")
    ap.add_argument("--json", dest="json_out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    rows = load(args.data)
    splits = [args.split] if args.split else ["dev", "heldout", "all"]
    results = {}
    for sp in splits:
        sel = rows if sp == "all" else [r for r in rows if r.get("split", "dev") == sp]
        if sel:
            results[sp] = score(sel)
    print(table(results))
    if args.errors:
        for sp, r in results.items():
            if sp == "all" and len(results) > 1:
                continue
            print(f"\n## mistakes ({sp})")
            for e in r["errors"]:
                print(f"- [{e['kind']}] {e['turn']!r}: wrote {e['wrong']} missed {e['missed']}")
                for c in explain(e["turn"]):
                    print(f"    {c.text!r}: {c.reason}")
    if args.json_out:
        out = {sp: {k: v for k, v in r.items()} for sp, r in results.items()}
        args.json_out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
