"""Capacity of a multi-node deployment over one PostgreSQL memory store (docs/capacity.md).

Five measurements, each printed and written to --json:

  sizes    real .eov files (made with `engram-local remember`): bytes, facts, bytes per 100 facts,
           how the bytes split (F16 rows, ledger, header), how much zlib would shrink them (why
           the store keeps them uncompressed), and what PostgreSQL stores for each (pg_column_size)
  db       a throwaway PostgreSQL (engram_local.store.testing.LocalPostgres) loaded with --db-users
           users (each one of the real files): database bytes per user beyond the file itself
           (row, TOAST chunking, indexes, pointer) and per log line
  latency  PostgresStore.get of 1, 10 and 100 KB memories (synthetic .eov files of those sizes),
           one thread, loopback: p50 / p95 / p99; version() (the per-request check) and a
           CachedStore hit for comparison
  cache    a simulation of a node's LRU (by bytes) under Zipf(s) access over --users users of
           --kb KB each: hit rate for several cache sizes and skews (the LRU is the same rule as
           CachedStore's, entries of equal size so bytes and entries bound alike)
  lora     per-user bytes of a rank-r q/k/v LoRA of the default model's backbone, from its dims

    python bench/capacity.py --eov /tmp/capacity_eov/*.eov [--db-users 2000] [--users 1000000]
        [--requests 3000000] [--kb 44,191] [--skip db|cache] [--json docs/capacity.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_local.store.cache import ENTRY_OVERHEAD  # noqa: E402


def sizes(files: list[Path]) -> list[dict]:
    from engram_local.formats.eov import parse_memory_bytes

    out = []
    for f in files:
        data = f.read_bytes()
        mf = parse_memory_bytes(data, str(f))
        rows = sum(len(s) for s in mf.layers.values())
        row_bytes = sum(s.values.nbytes for s in mf.layers.values())
        ledger = len(json.dumps({"facts": [x.as_json() for x in mf.facts],
                                 "history": [r.as_json() for r in mf.history]},
                                ensure_ascii=False, separators=(",", ":")).encode())
        n = len(mf.facts)
        out.append({"file": f.name, "bytes": len(data), "facts": n, "rows": rows,
                    "dim": int(next(iter(mf.layers.values())).values.shape[1]) if mf.layers else 0,
                    "row_value_bytes": row_bytes, "ledger_bytes": ledger,
                    "bytes_per_100_facts": round(len(data) * 100 / n) if n else None,
                    "zlib_ratio": round(len(zlib.compress(data, 6)) / len(data), 3)})
    return out


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "n": len(xs)}


def compressed(conn, data: bytes) -> dict:
    """What PostgreSQL would store for `data` as the store keeps it (uncompressed), with pglz
    (the default) and with lz4."""
    out = {}
    for name, alter in (("stored", "SET STORAGE EXTERNAL"), ("pglz", "SET COMPRESSION pglz"),
                        ("lz4", "SET COMPRESSION lz4")):
        conn.execute(f"CREATE TEMP TABLE t_{name} (d bytea)")
        conn.execute(f"ALTER TABLE t_{name} ALTER COLUMN d {alter}")
        conn.execute(f"INSERT INTO t_{name} VALUES (%s)", (data,))
        out[f"{name}_bytes"] = conn.execute(f"SELECT pg_column_size(d) FROM t_{name}").fetchone()[0]
        conn.execute(f"DROP TABLE t_{name}")
    return out


def db_and_latency(files: list[Path], db_users: int, fetches: int) -> dict:
    import psycopg

    from engram_local.store import CachedStore
    from engram_local.store.postgres import PostgresStore
    from engram_local.store.testing import LocalPostgres, synthetic_bytes

    out: dict = {}
    blobs = [f.read_bytes() for f in files]
    with LocalPostgres() as pg, PostgresStore(pg.url, pool_size=2) as store:
        conn = psycopg.connect(pg.url, autocommit=True)
        # --- what PostgreSQL stores per memory, and per user
        t0 = time.perf_counter()
        for i in range(db_users):
            store.put(f"user{i:07d}", blobs[i % len(blobs)], action="remember", fact_ids=["f1", "f2"])
        load_s = time.perf_counter() - t0
        conn.execute("VACUUM ANALYZE")
        rel = {t: conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]
               for t in ("engram_memory_versions", "engram_memory_current", "engram_memory_log")}
        stored = conn.execute("SELECT sum(pg_column_size(data)), sum(bytes) FROM engram_memory_versions").fetchone()
        file_bytes = int(stored[1])
        out["db"] = {"users": db_users, "load_s": round(load_s, 1), "puts_per_s": round(db_users / load_s),
                     "relation_bytes": rel, "data_bytes": file_bytes,
                     "column_bytes": int(stored[0]),
                     "overhead_per_user": round((rel["engram_memory_versions"] + rel["engram_memory_current"]
                                                 - file_bytes) / db_users),
                     "log_bytes_per_line": round(rel["engram_memory_log"] / db_users),
                     "stored_per_file": [dict(file=f.name, bytes=len(b), **compressed(conn, b))
                                         for f, b in zip(files, blobs)]}
        # --- fetch latency by size
        lat = {}
        per_size = 200
        for kb in (1, 10, 100):
            # synthetic files grow linearly with their facts: size(n) = a + b n
            a_ = len(synthetic_bytes(["f0"]))
            b_ = len(synthetic_bytes(["f0", "f1"])) - a_
            data = synthetic_bytes([f"f{j}" for j in range(max(1, 1 + round((kb * 1024 - a_) / b_)))])
            users = [f"lat{kb}k-{i}" for i in range(per_size)]
            for u in users:
                store.put(u, data)
            rng = random.Random(kb)
            get_t, ver_t = [], []
            for _ in range(fetches):
                u = rng.choice(users)
                t = time.perf_counter()
                m = store.get(u)
                get_t.append(time.perf_counter() - t)
                assert len(m.data) == len(data)
                t = time.perf_counter()
                store.version(u)
                ver_t.append(time.perf_counter() - t)
            lat[f"{kb}KB"] = {"bytes": len(data), "get": percentiles(get_t), "version": percentiles(ver_t)}
        node = CachedStore(store, max_bytes=64 << 20, mode="notify")
        users = [f"lat100k-{i}" for i in range(per_size)]
        for u in users:
            node.get(u)
        hit_t = []
        for _ in range(fetches):
            u = random.choice(users)
            t = time.perf_counter()
            node.get(u)
            hit_t.append(time.perf_counter() - t)
        lat["cache_hit_100KB"] = percentiles(hit_t)
        out["latency"] = lat
        conn.close()
    return out


def zipf_ranks(n_users: int, s: float, n: int, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, n_users + 1, dtype=np.float64) ** s
    p /= p.sum()
    return rng.choice(n_users, size=n, p=p)


def lru_hit_rate(requests: np.ndarray, capacity: int, warmup: int) -> float:
    cache: OrderedDict = OrderedDict()
    hits = 0
    for i, u in enumerate(requests.tolist()):
        if u in cache:
            cache.move_to_end(u)
            if i >= warmup:
                hits += 1
        else:
            cache[u] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / (len(requests) - warmup)


def cache_sim(n_users: int, kbs, n_requests: int, skews, cache_gb) -> list[dict]:
    """LRU hit rate over the last 2/3 of `n_requests` Zipf(s) requests (the first third warms the
    cache), for each memory size in `kbs` and cache size in `cache_gb`."""
    rng = np.random.default_rng(0)
    out = []
    for s in skews:
        req = zipf_ranks(n_users, s, n_requests, rng)
        warmup = n_requests // 3
        active = len(np.unique(req[warmup:]))
        for kb in kbs:
            for gb in cache_gb:
                cap = int(gb * (1 << 30) // (kb * 1024 + ENTRY_OVERHEAD))
                hr = lru_hit_rate(req, cap, warmup)
                out.append({"zipf_s": s, "memory_KB": kb, "cache_GB": gb, "entries": cap, "hit_rate": round(hr, 4),
                            "distinct_users_in_window": int(active), "window_requests": n_requests - warmup})
                print(f"  zipf {s}: {kb} KB memories, cache {gb} GB ({cap} users): hit rate {hr:.3f}", flush=True)
    return out


def lora(rank: int = 16) -> dict:
    import gguf

    from engram_local.runtime.loader import default_model_dir

    path = default_model_dir() / "backbone.gguf"
    r = gguf.GGUFReader(str(path))

    def val(key):
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    d, heads, kv, layers = (val(f"llama.{k}") for k in ("embedding_length", "attention.head_count",
                                                         "attention.head_count_kv", "block_count"))
    head_dim = d // heads
    q_out, kv_out = heads * head_dim, kv * head_dim
    params = layers * rank * ((d + q_out) + 2 * (d + kv_out))
    return {"model": path.name, "hidden": d, "heads": heads, "kv_heads": kv, "layers": layers, "rank": rank,
            "params_per_user": params, "bytes_f16": params * 2, "bytes_f32": params * 4}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eov", nargs="+", type=Path, required=True, help="real .eov files")
    ap.add_argument("--db-users", type=int, default=2000)
    ap.add_argument("--fetches", type=int, default=2000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--kb", default="44,191", help="memory sizes per user (KB) for the cache simulation")
    ap.add_argument("--requests", type=int, default=3_000_000)
    ap.add_argument("--skews", default="0.8,1.0,1.2")
    ap.add_argument("--cache-gb", default="1,4,16")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: db,cache")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    res = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                       "platform": platform.platform()}, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["sizes"] = sizes(a.eov)
    for s in res["sizes"]:
        print(f"  {s['file']}: {s['bytes']} B, {s['facts']} facts, {s['bytes_per_100_facts']} B/100 facts, "
              f"rows {s['rows']} x {s['dim']}, ledger {s['ledger_bytes']} B, zlib {s['zlib_ratio']}")
    res["lora"] = lora()
    print(f"  LoRA r16 q/k/v: {res['lora']['bytes_f16']} B/user (F16)")
    if "db" not in skip:
        res.update(db_and_latency(a.eov, a.db_users, a.fetches))
        print(json.dumps({k: res[k] for k in ("db", "latency")}, indent=1))
    if "cache" not in skip:
        res["cache"] = cache_sim(a.users, [float(x) for x in a.kb.split(",")], a.requests, [float(x) for x in a.skews.split(",")],
                                 [float(x) for x in a.cache_gb.split(",")])
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
