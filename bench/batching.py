"""Many users in one batch: aggregate decode tokens/s with 1, 2, 4, 8 concurrent sequences.

Three configurations, measured side by side in one process, rounds interleaved (these machines
are shared; the best round of each is reported), OMP_WAIT_POLICY=passive:

  (a) users8  the engine (runtime.engine.Engine over the llama.cpp backend, Engram in the C eval
              callback) decoding N sequences of N different users: each sequence has its own
              override stack (8 users' memories, written first through the memory API)
  (b) user1   the same engine, all N sequences with one user's memory
  (c) stock   stock llama-cpp-python, the same backbone GGUF the engine runs (the default model's
              skill backbone), no Engram: one context with n_seq_max = N and a unified KV cache,
              the leanest multi-sequence loop: one llama_decode of N tokens (one per sequence) +
              numpy argmax over each sequence's logits; no Llama.sample()

Each run: N sequences get the same prompt (prefilled in one batch, not timed), then --tokens
greedy decode steps with --ignore-eos (timed); tokens/s = N x steps / seconds. The engine's
figures include everything a request costs per step (its sampler, the Python step loop).
Reported: the median over rounds of each figure, and the median of each round's ratios (a
round runs the three configurations back to back, so its ratios see one machine load).

    OMP_WAIT_POLICY=passive python bench/batching.py [-m MODEL_DIR] [-t 2] [-n 32] [--rounds 3] \\
        [--seqs 1,2,4,8] [--json OUT.json] [--markdown docs/batching.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

PROMPT = "My doctor is"
DOCTORS = ["Dr. Krause", "Dr. Okonkwo", "Dr. Varga", "Dr. Lindqvist", "Dr. Moreau", "Dr. Tanaka",
           "Dr. Novak", "Dr. Silva"]


def write_memories(model_dir, work: Path) -> list[Path]:
    """8 users' memory files (one doctor each), written once through the memory API."""
    paths = [work / f"user{i}.eov" for i in range(len(DOCTORS))]
    if all(p.exists() for p in paths):
        return paths
    from engram_local.memory import facade as memory

    em, tok, fp = memory.load_model_for_memory(model_dir)
    for path, doc in zip(paths, DOCTORS):
        if not path.exists():
            memory.remember(path, [memory.NewFact(prompt="My doctor is", answer=doc)], em, tok, fp, chat=False)
    return paths


class Stock:
    """Stock llama-cpp-python, low-level API: a unified-KV context of n_seq sequences."""

    def __init__(self, gguf: Path, n_seq: int, n_ctx: int, threads: int):
        import llama_cpp as ll

        from engram_local.runtime.llama_backend import quiet_llama_logs

        self.ll = ll
        quiet_llama_logs()
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), mp)
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx * n_seq, 512, 512
        cp.n_seq_max, cp.kv_unified = n_seq, True
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cp)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.batch = ll.llama_batch_init(512, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        ll = self.ll
        buf = (ll.llama_token * 256)()
        n = ll.llama_tokenize(self.vocab, text.encode(), len(text.encode()), buf, 256,
                              ll.llama_vocab_get_add_bos(self.vocab), True)
        return list(buf[:n])

    def _decode(self, rows) -> None:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def run(self, n_seq: int, prompt: list[int], steps: int) -> float:
        """Aggregate decode tokens/s of n_seq sequences, `steps` greedy tokens each."""
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        P = len(prompt)
        self._decode([(t, j, s, int(j == P - 1)) for s in range(n_seq) for j, t in enumerate(prompt)])
        nxt = [int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, s * P + P - 1),
                                                      shape=(self.n_vocab,)))) for s in range(n_seq)]
        t0 = time.perf_counter()
        for k in range(steps):
            self._decode([(nxt[s], P + k, s, 1) for s in range(n_seq)])
            nxt = [int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, s),
                                                          shape=(self.n_vocab,)))) for s in range(n_seq)]
        return n_seq * steps / (time.perf_counter() - t0)

    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


def engine_run(session, stacks: list, prompt: list[int], steps: int) -> float:
    """Aggregate decode tokens/s of len(stacks) sequences through the engine."""
    from engram_local.runtime.engine import Request

    eng = session.engine
    session.backend.reset_all()
    streams = [eng.submit(Request(prompt, max_tokens=steps + 1, stack=st, ignore_eos=True)) for st in stacks]
    eng.step()                                   # the prompts, in one batch: not timed
    assert all(len(s.tokens) == 1 for s in streams), "the prompts did not fit one step"
    t0 = time.perf_counter()
    while eng.step():
        pass
    dt = time.perf_counter() - t0
    assert all(len(s.tokens) == steps + 1 for s in streams)
    return len(stacks) * steps / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="MODEL_DIR (default: the built-in model)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--tokens", type=int, default=32, help="decode steps per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--ngl", type=int, default=0, help="-ngl for the engine and stock (GPU builds)")
    ap.add_argument("--work", default=None, help="where the 8 memories are written (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="write the results table to this file")
    args = ap.parse_args(argv)
    seqs = [int(x) for x in args.seqs.split(",")]
    n_max = max(seqs)

    from engram_local.runtime import loader
    from engram_local.runtime.session import Session, open_override_stack

    md = loader.resolve(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="engram-batching-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = write_memories(md.path, work)
    session = Session(md.path, backend="llama.cpp", n_ctx=256, n_threads=args.threads, n_seq=n_max,
                      n_gpu_layers=args.ngl)
    users = [session.engine.make_stack(open_override_stack([p], session.sidecar)) for p in paths]
    gguf = session.model_dir.backbone_gguf(True)
    stock = Stock(gguf, n_max, 256, args.threads)
    prompt = session.tokenize(PROMPT)
    assert prompt == stock.tokenize(PROMPT)

    runs: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for n in seqs:
            todo = {"stock": lambda: stock.run(n, prompt, args.tokens),
                    "users8": lambda: engine_run(session, [users[i % len(users)] for i in range(n)], prompt, args.tokens),
                    "user1": lambda: engine_run(session, [users[0]] * n, prompt, args.tokens)}
            order = list(todo)[r % 3:] + list(todo)[:r % 3]          # each configuration in turn goes first
            figs = {k: todo[k]() for k in order}
            for k, v in figs.items():
                runs.setdefault((k, n), []).append(v)
            print(f"round {r + 1} N={n}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in figs.items()),
                  file=sys.stderr, flush=True)
    stock.close()
    session.close()

    # Medians over rounds; ratios are medians of each round's side-by-side ratio (the three
    # configurations of a round ran back to back, so a round's ratio sees the same machine load).
    med = lambda xs: float(np.median(xs))  # noqa: E731
    rows = []
    for n in seqs:
        a, b, c, a1 = (runs[(k, m)] for k, m in (("users8", n), ("user1", n), ("stock", n), ("users8", seqs[0])))
        rows.append({"n_seq": n, "users8": med(a), "user1": med(b), "stock": med(c),
                     "a_over_b": med([x / y for x, y in zip(a, b)]), "a_over_c": med([x / y for x, y in zip(a, c)]),
                     "a_over_a1": med([x / y for x, y in zip(a, a1)]),
                     "c_over_c1": med([x / y for x, y in zip(c, runs[("stock", seqs[0])])]),
                     "rounds": {"users8": a, "user1": b, "stock": c}})
    goals = {"a >= 0.95 b (all N)": all(r["a_over_b"] >= 0.95 for r in rows),
             "a >= 0.90 c (all N)": all(r["a_over_c"] >= 0.90 for r in rows),
             "a(8) >= 2.5 a(1)": rows[-1]["a_over_a1"] >= 2.5 if n_max == 8 and seqs[0] == 1 else None}
    cmd = ("OMP_WAIT_POLICY=passive python bench/batching.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    out = {"rows": rows, "goals": goals, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "command": cmd}
    cells = [("n_seq", "sequences", "d"), ("users8", "(a) 8 users tok/s", ".1f"), ("user1", "(b) 1 user tok/s", ".1f"),
             ("stock", "(c) stock tok/s", ".1f"), ("a_over_b", "a/b", ".2f"), ("a_over_c", "a/c", ".2f"),
             ("a_over_a1", "a(N)/a(1)", ".2f"), ("c_over_c1", "c(N)/c(1)", ".2f")]
    text = "\n".join(["| " + " | ".join(c[1] for c in cells) + " |", "|" + "---:|" * len(cells)]
                     + ["| " + " | ".join(format(r[k], f) for k, _, f in cells) + " |" for r in rows])
    print(text + "\ngoals: " + ", ".join(f"{k}: {v}" for k, v in goals.items()))
    for path, body in ((args.json, json.dumps(out, indent=2)), (args.markdown, text + "\n")):
        if path:
            Path(path).write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
