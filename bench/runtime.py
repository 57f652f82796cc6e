"""`engram-local run` (llama.cpp backend, user memory, skill adapter) vs stock llama-cpp-python.

Measured side by side in one run, rounds interleaved, every process started cold with
OMP_WAIT_POLICY=passive:

  * stock     llama_cpp.Llama(model_path=backbone, n_ctx=1024, n_threads=T, n_threads_batch=T):
              eval(prompt) timed for prefill, then `llm.eval([llm.sample(temp=0.0)])` N times
              for decode; no Engram.
  * engram    `engram-local run -m MODEL_DIR --overrides FILE -t T -f PROMPT -n N --temp 0
              --ignore-eos --timings` (llama.cpp backend, Engram in the eval callback, the skill
              adapter when the model has one); figures from its --timings line.
  * torch     the same command with --backend torch (for comparison).

Time to first token from a cold start = process start to the first byte of generated text on
stdout (stock: to its first sampled token). Peak RSS = the child's ru_maxrss.

    OMP_WAIT_POLICY=passive python bench/runtime.py [-m MODEL_DIR] [--overrides FILE] \\
        [--rounds 3] [-t 1] [-n 128] [--also-stock OTHER.gguf] [--json OUT]

Without --overrides, an override file of 100 synthetic facts is written first: 100 fact
sentences' write-layer rows (keyed, F16, random values), i.e. the row count and look-up pattern
of 100 remembered facts, without fitting them (fitting 100 facts takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = (
    "The history of the Roman Empire spans more than a thousand years, from the founding of the "
    "city on the banks of the Tiber to the fall of Constantinople. Historians usually divide it "
    "into the Kingdom, the Republic and the Empire. Under the Republic, Rome was governed by "
    "elected magistrates and a senate of aristocrats, and it expanded across the Italian peninsula "
    "through wars and alliances. The Punic Wars against Carthage made Rome the dominant power of "
    "the western Mediterranean. Civil wars in the first century BC ended the Republic, and "
    "Augustus became the first emperor. For two centuries the Pax Romana brought relative peace, "
    "trade and the construction of roads, aqueducts and cities across Europe, North Africa and "
    "the Middle East. In the third century the empire faced invasions, plagues and economic "
    "crisis. Diocletian divided the administration, and Constantine founded a new capital in the "
    "east. Write a short summary of the main causes of the decline of the western empire:")

SHORT_PROMPT = "The capital of France is"

STOCK = r"""
import json, sys, time, resource
t_start = float(sys.argv[4])
import llama_cpp
path, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mmap = sys.argv[5] == "mmap"
llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False,
                      use_mmap=mmap)
toks = llm.tokenize(sys.stdin.read().encode(), add_bos=False)
t0 = time.perf_counter(); llm.eval(toks); t1 = time.perf_counter()
first = llm.sample(temp=0.0)
ttft = time.time() - t_start
t2 = time.perf_counter()
llm.eval([first])
for _ in range(n - 1):
    llm.eval([llm.sample(temp=0.0)])
t3 = time.perf_counter()
print(json.dumps({"prompt_tokens": len(toks), "prompt_tokens_per_s": len(toks) / (t1 - t0),
                  "generated_tokens": n, "generated_tokens_per_s": n / (t3 - t2),
                  "cold_first_token_ms": ttft * 1000}))
"""

SYNTHETIC_FACTS = [
    "My doctor is Dr. {}.", "My favourite colour number {} is teal.", "My locker code {} is 4417.",
    "My cousin number {} lives in Lisbon.", "My project {} deadline is next Friday.",
]
NAMES = ["Krause", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Haddad", "Singh", "Rossi"]


def synthetic_override_file(model_dir: Path, dest: Path, n_facts: int = 100) -> int:
    """Rows that n_facts written facts would occupy at the write layer (keyed, F16). Returns rows."""
    import numpy as np

    from engram_local import native
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.runtime.llama_backend import LlamaCppBackend
    from engram_local.formats.eov import write_override_file

    sc = open_sidecar(model_dir / "engram.gguf")
    s = sc.settings
    be = LlamaCppBackend(model_dir / "backbone.gguf", n_ctx=64, n_threads=1)
    cmap = np.asarray(sc.canonical_map(), np.int64)
    entries = {}
    rng = np.random.default_rng(0)
    layer = s["write_layer"]
    N, K = s["max_ngram_size"], s["n_head_per_ngram"]
    for i in range(n_facts):
        text = SYNTHETIC_FACTS[i % len(SYNTHETIC_FACTS)].format(NAMES[i % len(NAMES)] + str(i))
        canon = native.canonicalize(cmap, np.asarray(be.tokenize(text), np.int64))
        rows, mix = native.hash_layer(canon, with_mix=True, **sc.layout.kernel_args(layer))
        # the highest order's heads at every position after the first (the answer's positions)
        hi = (N - 2) * K
        for t in range(1, rows.shape[0]):
            for j in range(K):
                entries[(int(rows[t, hi + j]), int(mix[t, N - 2]))] = None
    be.close()
    keys = list(entries)
    r = np.array([k[0] for k in keys], np.int64)
    k = np.array([k[1] for k in keys], np.int64)
    vals = (rng.standard_normal((len(keys), s["head_dim"])) * 0.05).astype(np.float16)
    write_override_file(dest, {layer: (r, k, vals)}, sc.fingerprint)
    return len(keys)


def synthetic_adapter_model_dir(model_dir: Path, work: Path, rank: int) -> Path:
    """A MODEL_DIR beside `work` sharing model_dir's backbone and sidecar, plus a random F32 LoRA
    adapter of `rank` on attn_q and attn_v of every layer (what `convert` writes for PEFT q/v)."""
    import gguf
    import numpy as np

    from engram_local import constants
    from engram_local.formats.header import scan_gguf

    out = work / "model-with-adapter"
    out.mkdir()
    for name in (constants.MODEL_DIR_BACKBONE, constants.MODEL_DIR_ENGRAM):
        (out / name).symlink_to((model_dir / name).resolve())
    header = scan_gguf(model_dir / constants.MODEL_DIR_BACKBONE)
    arch = header.architecture
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(out / constants.MODEL_DIR_ADAPTER), arch)
    w.add_type(constants.ADAPTER_GENERAL_TYPE)
    w.add_string(constants.KEY_ADAPTER_TYPE, constants.ADAPTER_TYPE_LORA)
    w.add_float32(constants.KEY_ADAPTER_LORA_ALPHA, float(rank))
    for name, info in header.tensors.items():
        if name.endswith(("attn_q.weight", "attn_v.weight")):
            n_in, n_out = info.shape[0], info.shape[1]
            base = name
            w.add_tensor(constants.TENSOR_LORA_A.format(base=base),
                         (rng.standard_normal((rank, n_in)) * 0.01).astype(np.float32))
            w.add_tensor(constants.TENSOR_LORA_B.format(base=base),
                         (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _child(cmd: list[str], stdin: bytes | None, env: dict) -> tuple[bytes, bytes, float | None, int, float]:
    """(stdout, stderr, seconds to first stdout byte, peak RSS KB, wall s) of a cold child."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if stdin is not None:
        p.stdin.write(stdin)
    p.stdin.close()
    first = p.stdout.read(1)
    t_first = time.time() - t0 if first else None
    rest = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    return first + rest, err, t_first, usage.ru_maxrss, time.time() - t0


def run_stock(backbone: Path, n: int, threads: int, env: dict, prompt: str = PROMPT, huge: bool = False) -> dict:
    """The stock loop; `huge`: the weights read into memory by a process whose malloc uses huge
    pages, as `engram-local run` loads them (runtime.pages) - the same memory setting for stock."""
    from engram_local.runtime import pages

    if huge:
        env = pages.reexec_env(env)
    out, _, _, rss, _ = _child([sys.executable, "-c", STOCK, str(backbone), str(n), str(threads), str(time.time()),
                                "read" if huge else "mmap"], prompt.encode(), env)
    d = json.loads(out.decode().strip().splitlines()[-1])
    d["peak_rss_mb"] = rss / 1024
    return d


def run_engram(model_dir: Path, overrides: Path | None, n: int, threads: int, backend: str, env: dict,
               prompt_file: Path, short_prompt: bool = False) -> dict:
    src = ["-p", SHORT_PROMPT] if short_prompt else ["-f", str(prompt_file)]
    cmd = [sys.executable, "-m", "engram_local.cli", "run", "-m", str(model_dir), *src,
           "-n", str(n), "--temp", "0", "--ignore-eos", "--timings", "-t", str(threads), "--backend", backend,
           "-c", "1024"]
    if overrides is not None:
        cmd += ["--overrides", str(overrides)]
    _, err, t_first, rss, _ = _child(cmd, None, env)
    d = json.loads(err.decode().strip().splitlines()[-1])
    d["cold_first_token_ms"] = t_first * 1000 if t_first is not None else None
    d["peak_rss_mb"] = rss / 1024
    return d


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=None, help="MODEL_DIR (default: the default model)")
    ap.add_argument("--overrides", type=Path, default=None, help="override file (default: 100 synthetic facts)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-n", "--n-predict", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend rows")
    ap.add_argument("--synthetic-adapter", type=int, default=0, metavar="RANK",
                    help="when the model has no skill adapter: also measure with a random F32 LoRA of "
                         "this rank on attn_q/attn_v")
    ap.add_argument("--also-stock", type=Path, action="append", default=[], metavar="GGUF",
                    help="also time the stock loop on this backbone in the same rounds (e.g. the "
                         "package's Q4_1 file against the default MODEL_DIR's F16 copy of it)")
    ap.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    a = ap.parse_args()

    from engram_local.runtime import loader

    md = loader.resolve(a.model)
    if not isinstance(md, loader.ModelDir):
        sys.exit(f"{a.model}: the benchmark needs a MODEL_DIR")
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    work = Path(tempfile.mkdtemp(prefix="engram-bench-"))
    prompt_file = work / "prompt.txt"
    prompt_file.write_text(PROMPT)
    overrides, note = a.overrides, f"override file {a.overrides}"
    if overrides is None:
        overrides = work / "facts100.eov"
        rows = synthetic_override_file(md.path, overrides)
        note = f"synthetic override file: 100 facts' write-layer rows ({rows} keyed F16 entries, random values)"
    print(f"model {md.path}; adapter: {md.adapter or 'none'}; {note}; threads {a.threads}; "
          f"{a.n_predict} decode tokens; {a.rounds} rounds", file=sys.stderr)

    adapter_md = None
    if a.synthetic_adapter and md.adapter is None:
        adapter_md = synthetic_adapter_model_dir(md.path, work, a.synthetic_adapter)
    results: dict[str, list[dict]] = {"stock": [], "stock_huge": [], "engram": [], "engram_huge": [],
                                      "engram+lora": [], "torch": [], "stock_short": [], "engram_short": []}
    from engram_local.runtime import pages

    huge_env = dict(env, **{pages.ENV_SWITCH: "1"})
    for r in range(a.rounds):
        results["stock"].append(run_stock(md.backbone, a.n_predict, a.threads, env))
        results["stock_huge"].append(run_stock(md.backbone, a.n_predict, a.threads, env, huge=True))
        results["engram_huge"].append(run_engram(md.path, overrides, a.n_predict, a.threads, "llama.cpp", huge_env,
                                                 prompt_file))
        for other in a.also_stock:
            results.setdefault(f"stock:{other}", []).append(run_stock(other, a.n_predict, a.threads, env))
            print(f"         stock {other.name} {results[f'stock:{other}'][-1]}", file=sys.stderr)
        results["engram"].append(run_engram(md.path, overrides, a.n_predict, a.threads, "llama.cpp", env, prompt_file))
        print(f"round {r + 1}: stock {results['stock'][-1]}\n         engram {results['engram'][-1]}",
              file=sys.stderr)
        results["stock_short"].append(run_stock(md.backbone, 2, a.threads, env, SHORT_PROMPT))
        results["engram_short"].append(run_engram(md.path, overrides, 1, a.threads, "llama.cpp", env, prompt_file,
                                                  short_prompt=True))
        if adapter_md is not None:
            results["engram+lora"].append(run_engram(adapter_md, overrides, a.n_predict, a.threads, "llama.cpp",
                                                     env, prompt_file))
            print(f"         engram+lora {results['engram+lora'][-1]}", file=sys.stderr)
    if not a.no_torch:
        results["torch"].append(run_engram(md.path, overrides, min(a.n_predict, 32), a.threads, "torch", env,
                                           prompt_file))
        print(f"torch {results['torch'][-1]}", file=sys.stderr)

    med = {k: {key: _median(v, key) for key in ("prompt_tokens_per_s", "generated_tokens_per_s",
                                                  "cold_first_token_ms", "peak_rss_mb", "prompt_tokens")}
           for k, v in results.items() if v}
    s, e = med["stock"], med["engram"]
    decode_ratio = e["generated_tokens_per_s"] / s["generated_tokens_per_s"]
    prefill_ratio = e["prompt_tokens_per_s"] / s["prompt_tokens_per_s"]

    def row(name, m, ratio_d="", ratio_p=""):
        f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        return (f"| {name} | {f(m['prompt_tokens_per_s'])} {ratio_p} | {f(m['generated_tokens_per_s'])} {ratio_d} | "
                f"{f(m['cold_first_token_ms'], 0)} | {f(m['peak_rss_mb'], 0)} |")

    lines = [
        f"Prompt {int(s['prompt_tokens'])} tokens, {a.n_predict} greedy decode tokens, -t {a.threads}, "
        f"OMP_WAIT_POLICY=passive, median of {a.rounds} interleaved rounds (torch: one run, "
        f"{min(a.n_predict, 32)} tokens). Backbone {md.backbone.name}; adapter: "
        f"{md.adapter.name if md.adapter else 'none in this model'}; {note}.",
        "",
        "| runtime | prefill tok/s | decode tok/s | first token, cold (ms) | peak RSS (MB) |",
        "|---|---|---|---|---|",
        row("stock llama-cpp-python (no Engram)", s),
        row("engram-local run, llama.cpp", e, f"(x{decode_ratio:.3f})", f"(x{prefill_ratio:.3f})"),
    ]
    for name, key in (("stock llama-cpp-python, weights in huge pages (no mmap, glibc tunable)", "stock_huge"),
                      ("engram-local run, llama.cpp, weights in huge pages (ENGRAM_LOCAL_HUGE_PAGES=1)",
                       "engram_huge")):
        m = med[key]
        lines.append(row(name, m, f"(x{m['generated_tokens_per_s'] / s['generated_tokens_per_s']:.3f})",
                         f"(x{m['prompt_tokens_per_s'] / s['prompt_tokens_per_s']:.3f})"))
    h = med["stock_huge"]
    huge_ratio = med["engram_huge"]["generated_tokens_per_s"] / h["generated_tokens_per_s"]
    if "engram+lora" in med:
        m = med["engram+lora"]
        lines.append(row(f"engram-local run, llama.cpp + synthetic r={a.synthetic_adapter} q/v LoRA", m,
                         f"(x{m['generated_tokens_per_s'] / s['generated_tokens_per_s']:.3f})",
                         f"(x{m['prompt_tokens_per_s'] / s['prompt_tokens_per_s']:.3f})"))
    for other in a.also_stock:
        m = med[f"stock:{other}"]
        lines.append(row(f"stock llama-cpp-python on {other.name} (no Engram)", m,
                         f"(x{m['generated_tokens_per_s'] / s['generated_tokens_per_s']:.3f})",
                         f"(x{m['prompt_tokens_per_s'] / s['prompt_tokens_per_s']:.3f})"))
    if "torch" in med:
        lines.append(row("engram-local run, torch", med["torch"]))
    ss, es = med["stock_short"], med["engram_short"]
    lines += ["", f"Cold start to first token with a short prompt ({SHORT_PROMPT!r}, {int(es['prompt_tokens'])} "
                  f"tokens): stock {ss['cold_first_token_ms']:.0f} ms, engram-local run "
                  f"{es['cold_first_token_ms']:.0f} ms (peak RSS {es['peak_rss_mb']:.0f} MB).",
              "", f"decode ratio {decode_ratio:.3f} (target >= 0.95; with huge pages on both sides "
                  f"{huge_ratio:.3f}), prefill ratio {prefill_ratio:.3f} "
                  f"(target >= 0.90), cold first token {e['cold_first_token_ms']:.0f} ms with the long prompt, "
                  f"{es['cold_first_token_ms']:.0f} ms with the short one (target <= 2000)."]
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps({"results": results, "median": med, "decode_ratio": decode_ratio,
                                      "decode_ratio_same_memory_setting": huge_ratio,
                                      "prefill_ratio": prefill_ratio}, indent=1))


if __name__ == "__main__":
    main()
