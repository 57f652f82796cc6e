"""Do the two backends run the same function? llama.cpp vs torch on the default model, in-process.

For each setting (skill adapter on / off) x (no memory / a 34-fact memory of one user), both
backends are opened through `engram_local.runtime.session.Session` exactly as `engram-local run`
opens them (backend="llama.cpp" / "torch", --temp 0), and every prompt below (50 of them: prose,
questions, lists, code, numbers, chat-style; short and long) is continued by 32 greedy tokens on
each. Reported per setting:

  * token agreement: generated tokens that agree position by position up to the first
    divergence, the rest of the sequence counted as disagreement (the rule of the `agreement`
    contract, on tokens instead of words), over all prompts;
  * the first-divergence positions (0-31; 32 = none);
  * the largest logit difference between the backends over the 32 generated positions,
    teacher-forced on llama.cpp's tokens (both backends evaluate prompt + llama.cpp's 32 tokens
    in one batch, so the logits are of the same sequence), and the same over the positions before
    the first divergence; at each divergence, llama.cpp's margin between its top-2 logits;
  * teacher-forced argmax agreement: positions where both backends' argmax is the same.

The memory is written with the CLI, as a user would: the paper's prompt rule over the user file
(the rule of `../shared/checks/contracts.py` user_pairs), then
`engram-local remember -o WORK/u000.eov --from-jsonl WORK/u000.jsonl`.

--variants compares llama.cpp configurations against the same torch model:
  run        what `run` does: Session's defaults (the headline table)
  kv_f16     F16 KV cache (Session(kv_f32=False); llama.cpp's own default)
  kv_f32     F32 KV cache (Session(kv_f32=True))
  f32_gguf   diagnostic: llama.cpp over an F32 copy of the setting's GGUF (every quantized weight
             dequantized), F32 KV: no matmul quantizes its activations, which isolates that effect
  f16_gguf   the option of a half-precision backbone: every matrix of the setting's GGUF
             dequantized and stored as F16 (ggml rounds matmul inputs to F16, not to 8-bit
             blocks), otherwise as `run`; torch keeps the quantized weights
and --torch-q8 adds, as a diagnostic, the torch model with llama.cpp's activation quantization
emulated (each quantized matmul's input rounded to Q8_1 / Q8_0 blocks of 32, with ggml's rounding,
including Q8_1's separately rounded block sum), compared with every llama.cpp variant.

    OMP_WAIT_POLICY=passive python bench/agreement.py [-m MODEL_DIR] [--prompts 50] [-n 32] \\
        [-t 2] [--variants run,kv_f16,kv_f32,f32_gguf,f16_gguf,fa_off] [--torch-q8] [--json OUT.json] [--markdown docs/agreement.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

ROOT = Path(__file__).resolve().parents[1]
USER_FILE = ROOT.parent / "shared" / "data" / "user-as-engram" / "users" / "u000.json"

PROMPTS = [
    # prose, short and long
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "It was a bright cold day in April, and the clocks were striking",
    "The old man looked at the sea and",
    "After the rain stopped, the children ran outside and",
    ("The history of the Roman Empire spans more than a thousand years, from the founding of the "
     "city on the banks of the Tiber to the fall of Constantinople. Historians usually divide it into"),
    ("Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
     "make glucose and oxygen. It takes place mainly in the leaves, where"),
    "My favourite food is",
    "The best way to learn a new language is",
    "Dear Sir or Madam, I am writing to complain about",
    "In the beginning of the twentieth century, most people in Europe",
    "The museum was closed on Monday, so we decided to",
    # questions
    "Q: What is the boiling point of water at sea level?\nA:",
    "Q: Who wrote Romeo and Juliet?\nA:",
    "Why is the sky blue?",
    "What are the three primary colours?",
    "How do I reset my password if I forgot my email address?",
    "Question: Which planet is closest to the sun?\nAnswer:",
    "Can you explain what a black hole is in simple words?",
    "What is the difference between weather and climate?",
    # lists
    "Here is a shopping list:\n1. Milk\n2. Eggs\n3.",
    "Three tips for better sleep:\n-",
    "The days of the week are Monday, Tuesday,",
    "Ingredients:\n- 2 cups of flour\n- 1 cup of sugar\n-",
    "Top five tourist attractions in London:\n1.",
    "Steps to make tea:\nStep 1:",
    # code
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import numpy as np\n\nx = np.arange(10)\ny =",
    "for (int i = 0; i < n; i++) {\n    ",
    "SELECT name, age FROM users WHERE",
    "<html>\n<head>\n<title>My page</title>\n</head>\n<body>\n",
    "# Sort a list of dictionaries by a key in Python\nrecords = [{'name': 'b'}, {'name': 'a'}]\n",
    "function add(a, b) {\n  return",
    # numbers
    "1, 2, 3, 4, 5,",
    "The year 1969 was important because",
    "In 2024 the population of the city was about",
    "12 + 7 =",
    "The temperature dropped from 25 degrees to",
    "Pi is approximately 3.14159, and e is approximately",
    "The invoice total is $1,250.00, including tax of",
    # chat-style
    "<|im_start|>user\nHello! How are you today?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me a short poem about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is my doctor's name?<|im_end|>\n<|im_start|>assistant\n",
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSummarise the plot "
     "of Hamlet in two sentences.<|im_end|>\n<|im_start|>assistant\n"),
    "<|im_start|>user\nTranslate 'good morning' into Spanish.<|im_end|>\n<|im_start|>assistant\n",
    "User: I feel tired all the time. Any advice?\nAssistant:",
    # about the user (where the memory's rows are looked up)
    "My doctor told me that",
    "My name is",
    "I live in",
    "The recipe needs two cups of",
]


# --------------------------------------------------------------------------- the memory

def user_pairs(path: Path) -> list[dict]:
    """The paper's rule (contracts.py user_pairs): first paraphrase ending with the answer, minus it."""
    user = json.loads(Path(path).read_text())
    out = []
    for f in user["facts"]:
        ans = ", ".join(map(str, f["answer"])) if isinstance(f["answer"], list) else str(f["answer"])
        prompt = None
        for p in f["paraphrases"]:
            s = p.rstrip().removesuffix(".")
            if s.endswith(ans):
                prompt = s[: -len(ans)].rstrip()
                break
        out.append({"id": f["key"], "prompt": prompt or f"My {f['key'].replace('_', ' ')} is", "answer": ans})
    return out


def write_memory(work: Path, model: str | None, user_file: Path) -> tuple[Path, str, int]:
    """The user's memory file in `work` (written once; an existing one is reused)."""
    pairs = user_pairs(user_file)
    jsonl = work / f"{user_file.stem}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    eov = work / f"{user_file.stem}.eov"
    cmd = ["engram-local", "remember", "-q", "-o", str(eov), "--from-jsonl", str(jsonl)]
    if model:
        cmd[2:2] = ["-m", model]
    if not eov.exists():
        print(f"agreement: {' '.join(map(shlex.quote, cmd))}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return eov, " ".join(map(shlex.quote, cmd)), len(pairs)


# --------------------------------------------------------------------------- diagnostics

def no_extra_bufts() -> None:
    """Every llama.cpp model loaded in this process skips the extra CPU buffer types (AMX, repack)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = llama_cpp.llama_model_default_params = params


def dequantized_copy(src: Path, dest: Path, half: bool = False) -> Path:
    """`dest`: the GGUF `src` with every matrix dequantized to F32 (llama.cpp then multiplies in
    F32), or with `half` stored as F16 (vectors stay F32): convert.tensors.restore_gguf."""
    if not dest.is_file():
        from engram_local.convert.tensors import restore_gguf

        restore_gguf(src, dest, "f16" if half else "f32", progress=False)
    return dest


def emulate_activation_quantization(backbone, gguf_path: Path) -> int:
    """Make each nn.Linear of `backbone` whose GGUF weight is quantized multiply the way ggml's CPU
    kernels do: the input quantized per block of 32 to Q8_1 (Q4_1 / Q5_1 weights) or Q8_0 (Q8_0
    weights), x86 rounding (scale 127/amax, round half to even, d stored as F16); for Q8_1 the
    weight's block minimum multiplies the block sum stored separately as F16, emulated by a
    correction term. Returns how many layers were changed."""
    import gguf
    import torch

    from engram_local.convert import for_gguf
    from engram_local.formats.header import scan_gguf

    header = scan_gguf(gguf_path)
    arch = for_gguf(header.architecture)
    cfg = arch.config_from_gguf(header.fields)
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    block_bytes = {Q.Q4_1: 20, Q.Q5_1: 24}
    n = 0
    for name, mod in backbone.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        g = arch.gguf_tensor_name(name + ".weight", cfg)
        if g not in tensors and name.endswith("lm_head"):
            g = "token_embd.weight"                          # tied output
        t = tensors.get(g)
        if t is None:
            continue
        kind = Q(t.tensor_type)
        if kind == Q.Q8_0:
            mins = None
        elif kind in block_bytes:
            raw = np.asarray(t.data, np.uint8)
            rows = raw.shape[0]
            m = raw.reshape(rows, -1, block_bytes[kind])[:, :, 2:4].copy().view(np.float16)[..., 0]
            mins = torch.from_numpy(np.ascontiguousarray(arch.from_gguf_rows(g, m.astype(np.float32), cfg)))
        else:
            continue
        mod.forward = _q8_forward(mod, mins)
        n += 1
    return n


def _q8_forward(mod, mins):
    import torch
    import torch.nn.functional as F

    def forward(x):
        xb = x.reshape(*x.shape[:-1], -1, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        d = amax / 127.0
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(xb * inv)                           # half to even, like _mm256_round_ps
        dh = d.half().float()
        y = F.linear((q * dh).reshape(x.shape), mod.weight, mod.bias)
        if mins is not None:                                 # Q8_1: m * s with s = F16(d * sum q)
            qs = q.sum(-1)
            corr = (d[..., 0] * qs).half().float() - dh[..., 0] * qs
            y = y + corr @ mins.t()
        return y
    return forward


# --------------------------------------------------------------------------- measuring

def first_divergence(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def generate(session, ids: list[int], n: int) -> list[int]:
    from engram_local.runtime.sampling import Sampler

    session.reset()
    return session.generate(ids, n, Sampler(temp=0.0), ignore_eos=True).tokens


def teacher_forced(session, seq: list[int], n_prompt: int) -> np.ndarray:
    """Logits predicting positions n_prompt .. len(seq)-1 (one batch over the whole sequence)."""
    session.reset()
    out = session.backend.eval(seq, all_logits=True)
    session.reset()
    return out[n_prompt - 1:len(seq) - 1]


def compare(gen_a: list[int], gen_b: list[int], la: np.ndarray, lb: np.ndarray) -> dict:
    k = first_divergence(gen_a, gen_b)
    diff = np.abs(la - lb).max(axis=1)
    top2 = np.sort(la, axis=1)[:, -2:]
    return {"agree": k, "total": max(len(gen_a), len(gen_b), 1), "first_divergence": k,
            "max_logit_diff": float(diff.max()),
            "max_logit_diff_before_divergence": float(diff[:k + 1].max()) if len(diff) else 0.0,
            "tf_argmax_agree": int((la.argmax(1) == lb.argmax(1)).sum()), "tf_positions": int(len(la)),
            "margin_at_divergence": (float(top2[k, 1] - top2[k, 0]) if k < len(diff) else None)}


def summarize(rows: list[dict]) -> dict:
    agree, total = sum(r["agree"] for r in rows), sum(r["total"] for r in rows)
    div = [r["first_divergence"] for r in rows if r["first_divergence"] < r["total"]]
    margins = [r["margin_at_divergence"] for r in rows if r["margin_at_divergence"] is not None]
    return {"token_agreement": agree / max(total, 1), "agree": agree, "total": total,
            "prompts_identical": sum(r["first_divergence"] >= r["total"] for r in rows),
            "first_divergences": sorted(div),
            "max_logit_diff": max(r["max_logit_diff"] for r in rows),
            "median_max_logit_diff": float(np.median([r["max_logit_diff"] for r in rows])),
            "max_logit_diff_before_divergence": max(r["max_logit_diff_before_divergence"] for r in rows),
            "tf_argmax_agreement": sum(r["tf_argmax_agree"] for r in rows) / max(sum(r["tf_positions"] for r in rows), 1),
            "max_margin_at_divergence": max(margins) if margins else None}


def run_setting(model, skill: bool, overrides: list[str], prompts: list[str], n: int, threads: int | None,
                variants: list[str], torch_q8: bool, work: Path, log) -> dict:
    from engram_local.runtime import llama_backend
    from engram_local.runtime.session import Session

    torch_sessions = {"torch": Session(model, overrides=overrides, backend="torch", skill=skill,
                                       n_threads=threads, log=log)}
    if torch_q8:
        q8 = Session(model, overrides=overrides, backend="torch", skill=skill, n_threads=threads, log=log)
        gguf_path = q8.model_dir.backbone_gguf(skill)
        emulate_activation_quantization(q8.backend.em.backbone, gguf_path)
        torch_sessions["torch_q8"] = q8
    llama_sessions = {}
    for v in variants:
        kw = {} if v == "run" else {"kv_f32": v in ("kv_f32", "f32_gguf")}
        s = Session(model, overrides=overrides, backend="llama.cpp", skill=skill, n_threads=threads,
                    log=log, **kw)
        if v == "fa_off":               # `run` before session 6: flash attention off
            s.use_backend(llama_backend.LlamaCppBackend(s.model_dir.backbone_gguf(skill), sidecar=s.sidecar,
                                                        overrides=s.overrides, n_threads=threads,
                                                        flash_attn=False, log=log))
        if v == "f32_gguf":
            src = s.model_dir.backbone_gguf(skill)
            path = dequantized_copy(src, work / f"{src.stem}-f32.gguf")
            s.use_backend(llama_backend.LlamaCppBackend(path, sidecar=s.sidecar, overrides=s.overrides,
                                                        n_threads=threads, kv_f32=True, log=log))
        if v == "f16_gguf":
            src = s.model_dir.backbone_gguf(skill)
            path = dequantized_copy(src, work / f"{src.stem}-f16.gguf", half=True)
            s.use_backend(llama_backend.LlamaCppBackend(path, sidecar=s.sidecar, overrides=s.overrides,
                                                        n_threads=threads, log=log))
        llama_sessions[v] = s
    rows = {(lv, tv): [] for lv in llama_sessions for tv in torch_sessions}
    gen_s = {lv: 0.0 for lv in llama_sessions}       # greedy generation time (prompt included)
    tokenizer_mismatch = 0
    try:
        for i, p in enumerate(prompts):
            ref = torch_sessions["torch"]
            ids = next(iter(llama_sessions.values())).backend.tokenize(p)
            tokenizer_mismatch += ids != ref.backend.tokenize(p)
            gens_t = {tv: generate(ts, ids, n) for tv, ts in torch_sessions.items()}
            for lv, ls in llama_sessions.items():
                t0 = time.perf_counter()
                gen_l = generate(ls, ids, n)
                gen_s[lv] += time.perf_counter() - t0
                seq = ids + gen_l
                la = teacher_forced(ls, seq, len(ids))
                for tv, ts in torch_sessions.items():
                    lb = teacher_forced(ts, seq, len(ids))
                    r = compare(gen_l, gens_t[tv], la, lb)
                    r.update(prompt=p, llama=ls.backend.detokenize(gen_l), torch=ts.backend.detokenize(gens_t[tv]))
                    rows[lv, tv].append(r)
            print(f"  [{i + 1}/{len(prompts)}] " + "  ".join(
                f"{lv}/{tv}: {rs[-1]['first_divergence']}" for (lv, tv), rs in rows.items()),
                file=sys.stderr, flush=True)
    finally:
        for s in (*torch_sessions.values(), *llama_sessions.values()):
            s.close()
    return {"tokenizer_mismatches": tokenizer_mismatch,
            "generation_tok_s": {lv: round(len(prompts) * n / max(t, 1e-9), 1) for lv, t in gen_s.items()},
            "pairs": {f"{lv} vs {tv}": dict(summarize(rs), prompts=rs) for (lv, tv), rs in rows.items()}}


# --------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    head = res["headline"]
    out = ["# Backend agreement: llama.cpp vs torch", "",
           f"Command: `{res['command']}`", "",
           f"Model: `{res['model']['model_dir']}` (skill on: `{Path(res['model']['skill_backbone'] or res['model']['backbone']).name}`, "
           f"skill off: `{Path(res['model']['backbone']).name}`); {res['n_prompts']} prompts x {res['n_tokens']} greedy "
           f"tokens per setting; memory: {res['memory']['facts']} facts of `{res['memory']['user']}` "
           f"written with `{res['memory']['command']}`; threads {res['threads']}; {res['seconds']:.0f} s.", "",
           f"## What `run` does (`{head}`)", "",
           "| setting | token agreement | prompts identical | first divergences (position of 0-31) | max logit diff (all 32 positions) | median per-prompt max | max before divergence | teacher-forced argmax agreement | largest top-2 margin at a divergence |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, st in res["settings"].items():
        s = st["pairs"][head]
        div = ", ".join(map(str, s["first_divergences"])) or "-"
        mm = "-" if s["max_margin_at_divergence"] is None else f"{s['max_margin_at_divergence']:.3f}"
        out.append(f"| {name} | {s['token_agreement']:.1%} ({s['agree']}/{s['total']}) | {s['prompts_identical']}/{res['n_prompts']} "
                   f"| {div} | {s['max_logit_diff']:.3f} | {s['median_max_logit_diff']:.3f} | "
                   f"{s['max_logit_diff_before_divergence']:.3f} | {s['tf_argmax_agreement']:.1%} | {mm} |")
    pairs = list(next(iter(res["settings"].values()))["pairs"])
    if len(pairs) > 1:
        out += ["", "## Other configurations", "",
                "| setting | pair | token agreement | max logit diff | median per-prompt max | teacher-forced argmax agreement |",
                "|---|---|---|---|---|---|"]
        for name, st in res["settings"].items():
            for pair in pairs:
                s = st["pairs"][pair]
                out.append(f"| {name} | {pair} | {s['token_agreement']:.1%} | {s['max_logit_diff']:.3f} | "
                           f"{s['median_max_logit_diff']:.3f} | {s['tf_argmax_agreement']:.1%} |")
        out += ["", "llama.cpp greedy generation, tokens/s (prompt included, one process, read the ratios): " +
                "; ".join(f"{name}: " + ", ".join(f"{v} {t}" for v, t in st.get("generation_tok_s", {}).items())
                          for name, st in res["settings"].items())]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="MODEL_DIR (default: the built-in model)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("-n", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--user", type=Path, default=USER_FILE, help="user file of the memory (paper schema)")
    ap.add_argument("--settings", default="skill,skill+memory,no-skill,no-skill+memory")
    ap.add_argument("--variants", default="run", help="llama.cpp: run,kv_f16,kv_f32,f32_gguf,f16_gguf,fa_off (first = headline)")
    ap.add_argument("--torch-q8", action="store_true", help="also torch with llama.cpp's activation quantization")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="load llama.cpp models with use_extra_bufts = false (no AMX / repacked weight "
                         "buffers): on CPUs with AMX, ggml's AMX Q4_1 kernel can fault (ldtilecfg GP)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/engram-agreement"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    command = "python bench/agreement.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))

    from engram_local.runtime import loader
    from engram_local.runtime.session import _quiet_transformers

    _quiet_transformers()
    if args.no_extra_bufts:
        no_extra_bufts()
    args.work.mkdir(parents=True, exist_ok=True)
    md = loader.resolve(args.model)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    prompts = PROMPTS[:args.prompts]
    t0 = time.perf_counter()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    eov = cmd = n_facts = None
    if any("memory" in s for s in settings):
        eov, cmd, n_facts = write_memory(args.work, args.model, args.user)
    res = {"command": command, "model": md.as_dict(), "n_prompts": len(prompts), "n_tokens": args.n,
           "threads": args.threads, "variants": variants, "use_extra_bufts": not args.no_extra_bufts,
           "headline": f"{variants[0]} vs torch",
           "memory": {"user": args.user.name, "facts": n_facts, "command": cmd, "eov": str(eov) if eov else None},
           "settings": {}}
    for name in settings:
        skill = not name.startswith("no-skill")
        overrides = [str(eov)] if "memory" in name else []
        print(f"agreement: {name}", file=sys.stderr, flush=True)
        res["settings"][name] = run_setting(args.model, skill, overrides, prompts, args.n, args.threads,
                                            variants, args.torch_q8, args.work, log=lambda m: None)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
