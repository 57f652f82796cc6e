"""Where `run`'s decode time goes against the lean stock loop, in one process, rounds interleaved.

`contracts.py runtime` compares `engram-local run` (skill adapter folded in, Engram, a user's
memory) with the leanest stock llama-cpp-python loop over the plain backbone (eval + argmax). This
script splits the gap into its parts, each measured the same way (one thread, greedy, the
contract's prompt, 128 decode steps, best of --rounds interleaved rounds):

  stock-plain     llama_cpp.Llama over backbone.gguf, eval + argmax (the contract's baseline)
  stock-fold      the same loop over backbone-skill.gguf (what the skill fold costs by itself)
  ours-no-engram  our backend (LlamaCppBackend.decode_step + argmax) over backbone-skill.gguf,
                  no Engram, flash attention as `run` sets it (llama.cpp's default): our loop
  ours-disabled   our backend with the Engram runtime attached but switched off (cb_eval asks
                  for nothing): the callback's cost when it does nothing
  ours            our backend as `run` opens it: skill fold, Engram, the user's memory

    engram-local remember -q -o u001.eov --from-jsonl u001.jsonl    # a user's memory
    OMP_WAIT_POLICY=passive python bench/decode_cost.py --overrides u001.eov [--rounds 5]
        [--markdown OUT.md] [--json OUT.json]

(docs/runtime.md used the paper user u001's 32 facts, as `contracts.py runtime` writes them.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")


def _loop(step, first, n):
    import numpy as np

    out = first
    t0 = time.perf_counter()
    for _ in range(n):
        out = step(int(np.argmax(out)))
    return n / (time.perf_counter() - t0)


def stock(path, n, prompt=PROMPT):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode()))
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return n / (time.perf_counter() - t0)
    finally:
        llm.close()


def ours(be, n, prompt=PROMPT):
    be.reset()
    first = be.decode_step([(0, be.tokenize(prompt), True)])[0]
    return _loop(lambda t: be.decode_step([(0, [t], True)])[0], first, n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None, help="MODEL_DIR (default: the built-in model)")
    ap.add_argument("--overrides", required=True, help="a user's memory file (.eov)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--prompt-file", default=None,
                    help="prompt text (default: the contract's one-sentence prompt; bench/runtime.py "
                         "times a 190-token one)")
    a = ap.parse_args(argv)

    from engram_local.runtime import loader
    from engram_local.runtime.llama_backend import LlamaCppBackend
    from engram_local.runtime.session import Session

    md = loader.resolve(a.model)
    eov = Path(a.overrides)
    prompt = Path(a.prompt_file).read_text() if a.prompt_file else PROMPT
    sess = Session(a.model, overrides=[str(eov)], n_threads=1, skill=True, log=lambda m: None)
    be = sess.backend
    plain = LlamaCppBackend(md.backbone_gguf(True), n_threads=1, n_ctx=2048, flash_attn=None)   # as Session

    def disabled():
        be.runtime.enabled = False
        try:
            return ours(be, a.n, prompt)
        finally:
            be.runtime.enabled = True

    cases = {"stock-plain": lambda: stock(md.backbone, a.n, prompt),
             "stock-fold": lambda: stock(md.backbone_gguf(True), a.n, prompt),
             "ours-no-engram": lambda: ours(plain, a.n, prompt),
             "ours-disabled": disabled,
             "ours": lambda: ours(be, a.n, prompt)}
    res = {k: [] for k in cases}
    for r in range(a.rounds):
        for k, f in cases.items():
            res[k].append(f())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()), file=sys.stderr)
    # The host's speed drifts between rounds (shared cores): each round's ratio to that round's
    # stock loop, median over rounds, is the figure; best-of is shown beside it.
    base = max(res["stock-plain"])
    rows = [{"case": k, "best_tok_s": round(max(v), 2), "ms_per_token": round(1000 / max(v), 3),
             "ratio_best": round(max(v) / base, 4),
             "ratio_median_round": round(statistics.median(x / b for x, b in zip(v, res["stock-plain"])), 4),
             "all": [round(x, 2) for x in v]} for k, v in res.items()]
    lines = ["| case | best tok/s | ms/token (best) | vs stock-plain, median of per-round ratios | best vs best |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['best_tok_s']:.1f} | {r['ms_per_token']:.2f} | {r['ratio_median_round']:.3f} | "
              f"{r['ratio_best']:.3f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(md.path), "overrides": str(eov), "n": a.n,
                                            "rounds": a.rounds, "rows": rows}, indent=1) + "\n")
    sess.close()
    plain.close()


if __name__ == "__main__":
    main()
