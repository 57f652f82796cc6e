#!/usr/bin/env python3
"""Build the offline English training corpus (train/valid/ood + manifest) from packages.

    python scripts/build_corpus.py --out data/corpus [--cache ~/.cache/engram-local/corpus-src]

Needs apt-get + dpkg-deb (Debian/Ubuntu), pip, and the PyPI packages `rdata` and `tqdm`.
See docs/corpus.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_local.train.corpus import (  # noqa: E402
    DEFAULT_CACHE_DIR, CorpusBuildError, build_corpus, summary_rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory (e.g. data/corpus)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR,
                    help=f"where downloaded packages are kept (default {DEFAULT_CACHE_DIR})")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    try:
        manifest = build_corpus(args.out, cache_dir=args.cache.expanduser(), progress=not args.quiet)
    except CorpusBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.monotonic() - t0

    rows = summary_rows(manifest)
    total = ("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows))
    head = ("source", "license", "train chars", "valid chars", "ood chars")
    table = [[str(c) if i < 2 else f"{c:,}" for i, c in enumerate(r)] for r in rows + [total]]
    widths = [max(len(x[i]) for x in table + [list(head)]) for i in range(5)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    print(fmt(head))
    print(rule)
    for cells in table[:-1]:
        print(fmt(cells))
    print(rule)
    print(fmt(table[-1]))
    print(f"\n~{total[2] // 4:,} / {total[3] // 4:,} / {total[4] // 4:,} tokens (train/valid/ood, "
          "at ~4 chars/token)")
    for name, o in manifest["outputs"].items():
        print(f"{args.out / name}: {o['bytes']:,} bytes, {o['documents']:,} documents, "
              f"sha256 {o['sha256'][:16]}...")
    print(f"{args.out / 'manifest.json'}  (built in {dt:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
