"""Engram layer placement on SmolLM2-135M-Instruct, measured with short equal-budget retrofits.

Each candidate (early layer, write layer) is retrofitted for the same number of steps on the
same batches, then scored on the first --eval-tokens of the validation split; the Engram
knocked out gives the backbone's figure in the same run.

    python bench/placement.py --corpus data/corpus --steps 50 --out docs/placement.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from engram_local.model.backbone import load_hf_backbone
from engram_local.text.canonical import build_canonical_map
from engram_local.model.engram import EngramConfig, EngramModel
from engram_local.runtime.perplexity import bits_per_byte
from engram_local.train.retrofit import RetrofitSettings, retrofit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--candidates", default="1,16;2,16;1,22;1,10")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--table-size", type=int, default=10000)
    ap.add_argument("--eval-chars", type=int, default=60000)
    ap.add_argument("--out", type=Path, default=Path("docs/placement.md"))
    a = ap.parse_args()

    bb, tok = load_hf_backbone()
    cmap, n_canon = build_canonical_map(tok)
    valid = (a.corpus / "valid.txt").read_text()[: a.eval_chars]
    rows = []
    for cand in a.candidates.split(";"):
        layers = [int(x) for x in cand.split(",")]
        cfg = EngramConfig(hidden_size=bb.config.hidden_size, compressed_vocab_size=n_canon,
                           pad_id=int(cmap[0]), layer_ids=layers, write_layer=max(layers),
                           vocab_size_per_ngram=[a.table_size, a.table_size])
        torch.manual_seed(0)
        em = EngramModel(bb, cfg, cmap)
        s = RetrofitSettings(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                             checkpoint_every=a.steps)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d:
            retrofit(em, tok, a.corpus / "train.txt", Path(d), s, log=lambda m: None)
        train_s = time.time() - t0
        if not rows:
            em.enabled = False
            base = bits_per_byte(em, tok, valid).bpb
            em.enabled = True
        bpb = bits_per_byte(em, tok, valid).bpb
        rows.append({"layers": layers, "bpb": bpb, "train_s": round(train_s)})
        print(json.dumps(rows[-1]), flush=True)
        for h in em._hooks:
            h.remove()

    lines = ["# Engram placement on SmolLM2-135M-Instruct (30 layers)", "",
             f"Command: `python bench/placement.py --corpus {a.corpus} --steps {a.steps} "
             f"--batch-size {a.batch_size} --seq-len {a.seq_len} --candidates '{a.candidates}'`", "",
             f"Each candidate: {a.steps} steps x {a.batch_size} x {a.seq_len} tokens "
             f"({a.steps * a.batch_size * a.seq_len:,} tokens), same batches, table target "
             f"{a.table_size} rows per head; scored on the first {a.eval_chars:,} characters of "
             "valid.txt. Backbone alone (Engram knocked out): "
             f"**{base:.4f}** bits per byte.", "",
             "| Engram layers (0-based) | valid bpb | change vs backbone | retrofit wall s |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['bpb']:.4f} | {r['bpb'] - base:+.4f} | {r['train_s']} |")
    a.out.write_text("\n".join(lines) + "\n")
    print(a.out.read_text())


if __name__ == "__main__":
    main()
