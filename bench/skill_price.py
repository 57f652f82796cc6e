"""The skill adapter's price on unrelated text: bits per byte with and without it (issue 13 item 6).

For each MODEL_DIR given (default: the built-in model), the torch model is loaded without and
with its skill adapter (`runtime.loader.load_model(md, adapter=False/True)`, the fp32 function
the memory writer fits against) and scored on the unrelated text (default: the evaluation's
`engram_local/texts/unrelated-austen.txt`, held out of the retrofit corpus). Δbpb = with − without.

    python bench/skill_price.py [MODEL_DIR ...] [--text FILE] [--json OUT]

A MODEL_DIR with another adapter: `convert.model_dir.skill_model_dir(default, ADAPTER.gguf, DEST)`
(or `--adapter FILE`, which builds one under /tmp).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="*", help="MODEL_DIRs (default: the built-in model)")
    ap.add_argument("--adapter", action="append", default=[], metavar="ADAPTER.gguf",
                    help="also score the default model with this adapter instead of its own (repeatable)")
    ap.add_argument("--text", default=None, help="unrelated UTF-8 text (default: the evaluation's)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the figures as JSON")
    a = ap.parse_args(argv)

    from engram_local import constants
    from engram_local.runtime.loader import ensure_default_model, load_model
    from engram_local.runtime.perplexity import bits_per_byte

    text_path = Path(a.text) if a.text else constants.UNRELATED_TEXT
    text = text_path.read_text(encoding="utf-8")
    dirs = [Path(d) for d in a.model_dirs] or ([] if a.adapter else [ensure_default_model().path])
    if a.adapter:
        from convert.model_dir import skill_model_dir

        base = ensure_default_model().path
        for ad in a.adapter:
            dest = Path(tempfile.gettempdir()) / f"engram-skill-{Path(ad).stem}"
            dirs.append(skill_model_dir(base, ad, dest))
    rows = []
    for md in dirs:
        bpb = {}
        for with_skill in (False, True):
            em, tok, _ = load_model(md, adapter=with_skill)
            bpb[with_skill] = bits_per_byte(em, tok, text, show_progress=False).bpb
        rows.append({"model_dir": str(md), "bpb_without": bpb[False], "bpb_with": bpb[True],
                     "delta_bpb": bpb[True] - bpb[False]})
        print(f"{md}: {bpb[False]:.4f} -> {bpb[True]:.4f} bpb (Δ {bpb[True] - bpb[False]:+.4f})",
              file=sys.stderr, flush=True)
    print("| model dir | bpb without adapter | with | Δbpb |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model_dir']} | {r['bpb_without']:.4f} | {r['bpb_with']:.4f} | {r['delta_bpb']:+.4f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"text": str(text_path), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
