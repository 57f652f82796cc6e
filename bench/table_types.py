"""File size and bits-per-byte change of each Engram table type (the table in docs/convert.md).

Converts one Engram checkpoint once per table type (the backbone GGUF is linked, not copied),
loads each MODEL_DIR through the normal loader (memory-mapped table, native gather) and scores
the same validation text. The change is against the F32 table, the lossless reference; the
knock-out row (Engram off) shows how much the memory contributes at all.

    python bench/table_types.py --corpus data/corpus [--chars 100000] [-m CHECKPOINT] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from engram_local import constants
from engram_local.model.checkpoint import DEFAULT_CHECKPOINT
from engram_local.convert import convert_checkpoint
from engram_local.formats.sidecar import open_sidecar
from engram_local.runtime.loader import load_model
from engram_local.runtime.perplexity import bits_per_byte

TABLE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="corpus directory with valid.txt")
    ap.add_argument("-m", "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                    help="Engram checkpoint (default: the shipped one)")
    ap.add_argument("--chars", type=int, default=100_000, help="characters of valid.txt scored")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    a = ap.parse_args()
    text = (a.corpus / "valid.txt").read_text(encoding="utf-8")[:a.chars]

    rows, knockout = [], None
    with tempfile.TemporaryDirectory(prefix="table-types-") as tmp:
        for table_type in TABLE_TYPES:
            t0 = time.time()
            out = convert_checkpoint(a.checkpoint, Path(tmp) / table_type, table_type=table_type,
                                     progress=False, log=lambda m: None)
            sidecar = open_sidecar(out / constants.MODEL_DIR_ENGRAM)
            table_bytes = sum(sidecar.header.tensors[sidecar.table_name(l)].nbytes
                              for l in sidecar.layer_ids)
            em, tok, _ = load_model(out)
            res = bits_per_byte(em, tok, text)
            if knockout is None:
                em.enabled = False
                knockout = bits_per_byte(em, tok, text).bpb
            rows.append({"table_type": table_type, "sidecar_bytes": sidecar.header.file_size,
                         "table_bytes": table_bytes, "bpb": res.bpb, "tokens": res.tokens,
                         "bytes": res.bytes, "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)

    base = rows[0]["bpb"]
    lines = [f"Validation text: first {rows[0]['bytes']:,} bytes of valid.txt ({rows[0]['tokens']:,} tokens); "
             f"Engram knocked out: {knockout:.4f} bpb.", "",
             "| table type | tables | engram.gguf | bits per byte | change vs F32 |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['table_type'].upper()} | {mb(r['table_bytes'])} | {mb(r['sidecar_bytes'])} | "
                     f"{r['bpb']:.4f} | {r['bpb'] - base:+.1e} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
