"""The plain random-mutation fuzz runner (no atheris needed; CI runs it briefly).

    python -m tests.fuzz.run HARNESS|all [--runs N] [--seconds S] [--seed K] [--json OUT]

Harnesses: eov (the .eov reader: any accepted change of a version-2 or encrypted file is a
"silent" finding), eov-valid (mutations re-checksummed, so they reach the field, row and
ledger validation behind the checksum), gguf (header scanner + sidecar opener), kernel (the
native entry points). Mutations: bit flips, byte sets, truncations, deletions, insertions,
duplicated ranges, splices of two seeds, and header-field edits (0, 1, -1, max, +-1, random).
Each harness runs in a child process, so a crash in native code is counted (and the input
that caused it kept under --save) instead of ending the run; an input running past --timeout
seconds is a hang. Prints one JSON line per harness; exit status 1 if anything was found.
Long run (docs/hardening.md): `nice -n 19 python -m tests.fuzz.run all --runs 100000`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HARNESSES = ("eov", "eov-valid", "gguf", "kernel")


class Hang(Exception):
    pass


def mutate(rng: random.Random, data: bytes, pool: list[bytes], fields) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(9)
        n = len(b)
        if op == 0 and n:                                  # bit flips
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                # byte sets
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:                                      # truncation
            del b[rng.randrange(n + 1):]
        elif op == 3 and n:                                # delete a range
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 64)]
        elif op == 4:                                      # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op == 5 and n:                                # duplicate a range
            i = rng.randrange(n)
            b[i:i] = b[i:i + rng.randint(1, 128)]
        elif op == 6 and pool:                             # splice two inputs
            other = rng.choice(pool)
            b = b[:rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1):]
        elif fields:                                       # header-field edit
            at, width = rng.choice(fields)
            if at + width <= len(b):
                old = int.from_bytes(b[at:at + width], "little")
                new = rng.choice((0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), old + 1, old - 1,
                                  old ^ (1 << rng.randrange(8 * width)), rng.getrandbits(8 * width)))
                b[at:at + width] = (new % 2**(8 * width)).to_bytes(width, "little")
    return bytes(b)


def child(harness: str, runs: int, seconds: float, seed: int, timeout: float, save: str | None):
    """Run one harness in this process; print the counts as JSON."""
    from tests.fuzz import harnesses as h

    target = h.make(harness)
    expected = target.expected
    pool = h.seeds(h.SEED_DIRS[harness])
    fields = {i: h.scalar_offsets(s) for i, s in enumerate(pool)}
    rng = random.Random(seed)
    counts = dict(harness=harness, inputs=0, accepted=0, expected_errors=0, crashes=0, unhandled=0,
                  hangs=0, silent=0, seconds=0.0, findings=[], accepted_kinds={})
    last = open(save, "wb") if save else None

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    t0 = time.monotonic()
    while counts["inputs"] < runs and time.monotonic() - t0 < seconds:
        if counts["inputs"] < len(pool):                   # the seeds themselves first
            data = pool[counts["inputs"]]
        else:
            i = rng.randrange(len(pool))
            data = mutate(rng, pool[i], pool, fields[i])
        if last:
            last.seek(0)
            last.truncate()
            last.write(data)
            last.flush()
        counts["inputs"] += 1
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            kind = target(data) or "ok"
            counts["accepted"] += 1
            counts["accepted_kinds"][kind] = counts["accepted_kinds"].get(kind, 0) + 1
        except Hang:
            counts["hangs"] += 1
            counts["findings"].append(f"hang: input {counts['inputs']}")
        except h.Silent as exc:
            counts["silent"] += 1
            counts["findings"].append(f"silent: {exc}")
        except expected:
            counts["expected_errors"] += 1
        except Exception as exc:                    # noqa: BLE001 - that is the finding
            counts["unhandled"] += 1
            if len(counts["findings"]) < 20:
                counts["findings"].append("unhandled: " + "".join(
                    traceback.format_exception_only(type(exc), exc)).strip()[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if save and (counts["unhandled"] or counts["hangs"] or counts["silent"]) and \
                not os.path.exists(save + ".finding"):
            Path(save + ".finding").write_bytes(data)
    counts["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(counts), flush=True)


def run_harness(harness: str, runs: int, seconds: float, seed: int, timeout: float, save_dir: Path | None):
    """Run a harness in child processes until `runs` inputs or `seconds`; a child killed by a
    signal is one crash (its last input is kept) and a fresh child continues."""
    total = dict(harness=harness, inputs=0, accepted=0, expected_errors=0, crashes=0, unhandled=0,
                 hangs=0, silent=0, seconds=0.0, findings=[], accepted_kinds={})
    t0 = time.monotonic()
    attempt = 0
    while total["inputs"] < runs and time.monotonic() - t0 < seconds:
        left = min(seconds - (time.monotonic() - t0), 86400.0)
        save = str(save_dir / f"{harness}-last.bin") if save_dir else None
        cmd = [sys.executable, "-m", "tests.fuzz.run", "--child", harness, "--runs", str(runs - total["inputs"]),
               "--seconds", str(left), "--seed", str(seed + attempt), "--timeout", str(timeout)]
        if save:
            cmd += ["--save", save]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=left + 60 + 5 * timeout,
                                 cwd=Path(__file__).resolve().parents[2])
        except subprocess.TimeoutExpired:
            total["hangs"] += 1
            total["findings"].append("hang: a child stopped answering (stuck in native code?)")
            break
        attempt += 1
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode < 0 or not lines:
            total["crashes"] += 1
            total["findings"].append(f"crash: child exited {out.returncode}: {out.stderr[-300:]}")
            if save and os.path.exists(save):
                os.replace(save, save_dir / f"{harness}-crash-{attempt}.bin")
            if not lines:
                total["inputs"] += 1
                continue
        counts = json.loads(lines[-1])
        for k in ("inputs", "accepted", "expected_errors", "unhandled", "hangs", "silent"):
            total[k] += counts[k]
        total["findings"] += counts["findings"][:20]
        for kind, n in counts["accepted_kinds"].items():
            total["accepted_kinds"][kind] = total["accepted_kinds"].get(kind, 0) + n
    total["seconds"] = round(time.monotonic() - t0, 1)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("harness", choices=HARNESSES + ("all",))
    ap.add_argument("--runs", type=int, default=10**9)
    ap.add_argument("--seconds", type=float, default=10**9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds one input may take")
    ap.add_argument("--json", default=None, help="also write the results (a list) to this file")
    ap.add_argument("--save", default=None, help="(child) file holding the input being run")
    ap.add_argument("--save-dir", default=None, help="keep crashing / finding inputs here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.runs == 10**9 and a.seconds == 10**9:
        ap.error("give --runs or --seconds")
    if a.child:
        child(a.harness, a.runs, a.seconds, a.seed, a.timeout, a.save)
        return 0
    save_dir = Path(a.save_dir) if a.save_dir else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for harness in (HARNESSES if a.harness == "all" else (a.harness,)):
        r = run_harness(harness, a.runs, a.seconds, a.seed, a.timeout, save_dir)
        print(json.dumps(r), flush=True)
        results.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    bad = any(r["crashes"] or r["unhandled"] or r["hangs"] or r["silent"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
