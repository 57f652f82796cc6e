"""Bits per byte of the retrofitted default model vs its backbone, and the Engram knock-out.

The Engram knocked out is exactly the backbone (the hook adds nothing), so one model load gives
both columns. Texts: the validation split (in-domain), the out-of-domain text, and two kinds of
in-domain prose for the paper's knock-out asymmetry (encyclopedic Wikipedia vs narrative
novels; DeepSeek reports factual tasks losing far more than reading comprehension).

    python bench/model_eval.py --corpus data/corpus --chars 100000 --out docs/model-eval.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engram_local.model.checkpoint import load_engram_model
from engram_local.runtime.perplexity import bits_per_byte

TEXTS = {"valid (in-domain)": "valid.txt", "ood (Python tutorial)": "ood.txt",
         "valid: Wikipedia (encyclopedic)": "valid_wikipedia.txt",
         "valid: Austen + Moby-Dick (narrative)": ("valid_austen.txt", "valid_mobydick.txt")}


def read(corpus: Path, names, chars: int) -> str:
    names = (names,) if isinstance(names, str) else names
    per = chars // len(names)
    return "\n\n".join((corpus / n).read_text()[:per] for n in names)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("-m", "--model", default=None, help="checkpoint (default: the shipped one)")
    ap.add_argument("--chars", type=int, default=100_000, help="characters scored per text")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    em, tok = load_engram_model(a.model)
    rows = []
    for label, names in TEXTS.items():
        text = read(a.corpus, names, a.chars)
        t0 = time.time()
        em.enabled = True
        on = bits_per_byte(em, tok, text)
        em.enabled = False
        off = bits_per_byte(em, tok, text)
        rows.append({"text": label, "bytes": on.bytes, "tokens": on.tokens, "backbone_bpb": off.bpb,
                     "engram_bpb": on.bpb, "seconds": round(time.time() - t0)})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"Command: `python bench/model_eval.py --corpus {a.corpus} --chars {a.chars}"
             f"{' -m ' + a.model if a.model else ''}`", "",
             "| text | tokens | backbone bpb (= Engram knocked out) | retrofitted bpb | change | knock-out cost |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["engram_bpb"] - r["backbone_bpb"]
        lines.append(f"| {r['text']} | {r['tokens']:,} | {r['backbone_bpb']:.4f} | {r['engram_bpb']:.4f} | "
                     f"{d:+.4f} | {-d / r['backbone_bpb'] * 100:+.2f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
