"""Row-gather throughput of the native kernel vs a memcpy of the same bytes, in one run.

For Q8_0 and F16 tables bigger than the CPU caches (memory-mapped GGUF files), gathers random
rows with 0, 1,000 and 100,000 override rows layered on top (half of them keyed), and times in
the same loop two baselines moving the same bytes:
  * memcpy-rows:  numpy fancy indexing of the same random rows' raw bytes (a per-row memcpy
                  from the mmap, no dequantization) -- the memory-bound floor of a gather;
  * memcpy-out:   one contiguous memcpy of the float32 output bytes.
Rounds are interleaved (every variant once per round) and the median per variant is reported,
so machine noise hits all variants alike.

    python bench/gather.py --rows 4000000 --dim 32 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from engram_local import native
from engram_local.formats.table import open_table

QTYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "F16": gguf.GGMLQuantizationType.F16}


def write_table(path: Path, name: str, qtype, n_rows: int, dim: int, rng) -> None:
    """A random table in its stored form: F16 normals, or Q8_0 blocks (f16 scale, int8 quants)."""
    w = gguf.GGUFWriter(str(path), "engram-bench")
    if qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, rng.standard_normal((n_rows, dim), dtype=np.float32).astype(np.float16))
    else:
        data = rng.integers(0, 256, size=(n_rows, dim // 32, 34), dtype=np.uint8)
        data[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        w.add_tensor(name, data.reshape(n_rows, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def overrides(n: int, n_rows: int, dim: int, rng) -> list[native.OverrideSet]:
    if n == 0:
        return []
    rows = rng.choice(n_rows, size=n, replace=False).astype(np.int64)
    keys = np.where(rng.random(n) < 0.5, -1, rng.integers(0, 2**62, size=n)).astype(np.int64)
    values = rng.standard_normal((n, dim)).astype(np.float16)
    return [native.OverrideSet.build(rows, values, keys)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000, help="table rows (pick > CPU caches)")
    ap.add_argument("--dim", type=int, default=32, help="row width (the default model's head dim)")
    ap.add_argument("--batch", type=int, default=16384, help="look-ups per gather call")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    lines = []
    with tempfile.TemporaryDirectory() as d:
        for qname, qtype in QTYPES.items():
            path = Path(d) / f"{qname}.gguf"
            write_table(path, "t", qtype, a.rows, a.dim, rng)
            table = open_table(path, "t")
            raw = np.asarray(table.data).view(np.uint8).reshape(a.rows, -1)
            row_bytes = raw.shape[1]
            variants = {f"gather, {n:,} overrides": native.Gatherer(table, overrides(n, a.rows, a.dim, rng))
                        for n in (0, 1_000, 100_000)}
            times = {k: [] for k in [*variants, "memcpy-rows (raw bytes)", "memcpy-out (contiguous)"]}
            out = np.empty((a.batch, a.dim), np.float32)
            src = np.empty_like(out)
            for _ in range(a.rounds):
                ids = rng.integers(0, a.rows, size=a.batch, dtype=np.int64)
                keys = rng.integers(0, 2**62, size=a.batch, dtype=np.int64)
                for name, g in variants.items():
                    t = time.perf_counter()
                    g.gather(ids, keys)
                    times[name].append(time.perf_counter() - t)
                t = time.perf_counter()
                np.take(raw, ids, axis=0)
                times["memcpy-rows (raw bytes)"].append(time.perf_counter() - t)
                t = time.perf_counter()
                np.copyto(out, src)
                times["memcpy-out (contiguous)"].append(time.perf_counter() - t)
            med = {k: float(np.median(v)) for k, v in times.items()}
            plain = med["gather, 0 overrides"]
            lines.append(f"\n**{qname}** table: {a.rows:,} rows x {a.dim} "
                         f"({a.rows * row_bytes / 2**20:,.0f} MiB, {row_bytes} B/row), "
                         f"{a.batch:,} random look-ups per call, median of {a.rounds} interleaved rounds\n")
            lines.append("| variant | rows/s | GB/s read | GB/s written (f32) | time vs plain gather |")
            lines.append("|---|---|---|---|---|")
            for k, v in med.items():
                lines.append(f"| {k} | {a.batch / v / 1e6:,.1f} M | {a.batch * row_bytes / v / 1e9:.2f} | "
                             f"{a.batch * a.dim * 4 / v / 1e9:.2f} | {v / plain:.2f}x |")
            for g in variants.values():
                g.close()
    head = [f"\n## Row gather (native kernel)\n",
            f"Command: `python bench/gather.py --rows {a.rows} --dim {a.dim} --batch {a.batch} "
            f"--rounds {a.rounds}` on {platform.machine()}, {os.cpu_count()} cores "
            f"({platform.processor() or 'cpu'}), shared machine; ratios are what to read."]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
