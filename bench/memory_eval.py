#!/usr/bin/env python3
"""Evaluate user memory (.eov writing): recall, locality, storage, wall time -> docs/memory.md.

Usage (from the repository root; the default model unless -m):
    OMP_WAIT_POLICY=passive python bench/memory_eval.py --sets u000:10,u000:34,xl:100 --out bench/memory_results.json

Sets: `uNNN:K` = the first K facts of a paper user file (the paper's prompt rule, as the
contract check builds pairs.jsonl); `xl:K` / `xxl:K` = the first K facts of user 0 of
corpora_xl / corpora_xxl (`multi_users`, 100 facts) or, for K > 100, of `user_facts`.
For every set:
  * write: `memory.remember` into a fresh .eov (wall time of the whole write, model loaded);
  * direct recall: teacher-forced greedy check of every answer token after the prompt (the same
    thing as greedy generation reproducing the full answer), and first-token top-1;
  * locality: bits per byte of --text with and without the file (exact look-up keys: the
    change is exactly 0 unless the text contains a written N-gram), and how many of its look-ups
    hit a written (row, key);
  * storage: file size and rows;
  * for user files also paraphrase recall (the user's other sentences ending with the answer,
    never written) and chat-form recall (the user's direct_qa questions through the chat
    template, answer contained in 24 greedy tokens), each with and without the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "user-as-engram"


def load_set(spec: str):
    from engram_local.memory.facade import NewFact, prompt_from_sentence, user_json_facts

    name, k = spec.split(":")
    k = int(k)
    if name.startswith("u"):
        path = DATA / "users" / f"{name}.json"
        facts = user_json_facts(path)[:k]
        user = json.loads(path.read_text())
        extra = {}
        for f in user["facts"]:
            ans = ", ".join(map(str, f["answer"])) if isinstance(f["answer"], list) else str(f["answer"])
            prompts = [p for p in (prompt_from_sentence(s, ans) for s in f["paraphrases"]) if p]
            extra[f["key"]] = prompts[1:]
        return facts, {"user": user, "paraphrases": extra}
    corpus = json.loads((DATA / f"corpora_{name}.json").read_text())
    src = corpus["multi_users"][0]["facts"] if k <= 100 else corpus["user_facts"]
    facts, seen = [], set()
    for i, f in enumerate(src):
        if f["prompt"] in seen:
            continue
        seen.add(f["prompt"])
        facts.append(NewFact(prompt=f["prompt"], answer=f["gold"].strip(), id=f"{name}{i}"))
    return facts[:k], None


class Model:
    """The model once, with user memory swapped in and out."""

    def __init__(self, model):
        from engram_local.memory.facade import load_model_for_memory

        self.em, self.tok, self.fp = load_model_for_memory(model)
        self.sidecar = None
        from engram_local.runtime.loader import ModelDir, resolve

        target = resolve(model)
        if isinstance(target, ModelDir):
            from engram_local.formats.sidecar import open_sidecar

            self.sidecar = open_sidecar(target.engram)
        self.desc = str(target.path if isinstance(target, ModelDir) else target)

    def use(self, files):
        from engram_local.memory.facade import attach_overrides, open_overrides

        stacks = open_overrides(files, self.fp) if files else {}
        if self.sidecar is not None:
            from engram_local.runtime.loader import attach_tables

            attach_tables(self.em, self.sidecar, stacks)
        else:
            for layer in self.em.cfg.layer_ids:
                self.em.engram[str(layer)].source = None
            if stacks:
                attach_overrides(self.em, stacks)
        return stacks


def teacher_forced(m: Model, pairs, batch: int = 32):
    """Per (prompt, answer): (full answer is the greedy continuation, first token top-1)."""
    import torch

    from engram_local.memory.writer import answer_tokens

    seqs = []
    for prompt, answer in pairs:
        p, a = answer_tokens(m.tok, prompt, answer)
        seqs.append((p, a))
    out = []
    for c0 in range(0, len(seqs), batch):
        chunk = seqs[c0:c0 + batch]
        T = max(len(p) + len(a) - 1 for p, a in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, (p, a) in enumerate(chunk):
            ids = (p + a)[:-1]
            x[b, :len(ids)] = torch.tensor(ids)
        with torch.no_grad():
            pred = m.em(x).logits.argmax(-1)
        for b, (p, a) in enumerate(chunk):
            got = pred[b, len(p) - 1:len(p) - 1 + len(a)].tolist()
            out.append((got == list(a), got[0] == a[0]))
    return out


def chat_recall(m: Model, qa, n: int = 24):
    import torch

    hits = []
    for q in qa:
        text = m.tok.apply_chat_template([{"role": "user", "content": q["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        ids = m.tok(text, add_special_tokens=False)["input_ids"]
        gen = []
        with torch.no_grad():
            for _ in range(n):
                tok = int(m.em(torch.tensor([ids + gen])).logits[0, -1].argmax())
                gen.append(tok)
                if tok == m.tok.eos_token_id or m.tok.decode([tok]) == "<|im_end|>":
                    break
        completion = m.tok.decode(gen, skip_special_tokens=True)
        hits.append(str(q["answer"]).lower() in completion.lower())
    return hits


def written_hits(m: Model, path, text: str) -> int:
    """Look-ups of `text` (as scored: windows from the document start) that hit a written entry."""
    import torch

    from engram_local.formats.eov import read_memory_file
    from engram_local.text.tokens import document_start_id

    mf = read_memory_file(path, m.fp)
    wl = m.em.cfg.write_layer
    if wl not in mf.layers:
        return 0
    keys = set(zip(mf.layers[wl].rows.tolist(), mf.layers[wl].keys.tolist()))
    ids = m.tok(text, add_special_tokens=False)["input_ids"]
    hits, start = 0, document_start_id(m.tok)
    for s in range(0, len(ids), 1023):
        x = torch.tensor([[start] + ids[s:s + 1023]])
        r, k = (a[0].numpy() for a in m.em.addresses(x)[wl])
        hits += sum(bool(set(zip(r[t].tolist(), k[t].tolist())) & keys) for t in range(r.shape[0]))
    return hits


def evaluate(m: Model, spec: str, text: str, method: str, workdir: Path, chat: bool = True) -> dict:
    from engram_local.memory import facade as memory
    from engram_local.runtime.perplexity import bits_per_byte

    facts, extra = load_set(spec)
    path = workdir / f"{spec.replace(':', '_')}.eov"
    if path.exists():
        path.unlink()
    m.use([])
    t0 = time.time()
    report = memory.remember(path, facts, m.em, m.tok, m.fp, method=method)
    write_s = time.time() - t0
    res = {"set": spec, "facts": len(facts), "method": method, "write_seconds": round(write_s, 2),
           "fit_steps": report.steps, "rows": report.rows, "file_bytes": report.file_bytes,
           "bytes_per_100_facts": round(report.file_bytes * 100 / len(facts)),
           "rows_f16_bytes_per_100_facts": round(report.rows * m.em.cfg.head_dim * 2 * 100 / len(facts))}
    pairs = [(f.prompt, f.answer) for f in facts]
    base = teacher_forced(m, pairs)
    m.use([path])
    got = teacher_forced(m, pairs)
    res.update(full_answer=sum(g[0] for g in got), first_token=sum(g[1] for g in got),
               full_answer_without=sum(b[0] for b in base))
    # locality
    with_file = bits_per_byte(m.em, m.tok, text)
    m.use([])
    without = bits_per_byte(m.em, m.tok, text)
    res.update(bpb=without.bpb, delta_bpb=with_file.bpb - without.bpb,
               text_lookups_hitting_written_rows=written_hits(m, path, text))
    if extra is not None:
        para = [(p, f.answer) for f in facts for p in extra["paraphrases"].get(f.id, [])]
        if para:
            m.use([])
            b = teacher_forced(m, para)
            m.use([path])
            g = teacher_forced(m, para)
            res.update(paraphrases=len(para), paraphrase_full=sum(x[0] for x in g),
                       paraphrase_first=sum(x[1] for x in g), paraphrase_full_without=sum(x[0] for x in b))
        ids = {f.id for f in facts}
        qa = [q for q in extra["user"]["direct_qa"] if q.get("key", q.get("fact_key")) in ids] \
            if any("key" in q or "fact_key" in q for q in extra["user"]["direct_qa"]) else extra["user"]["direct_qa"]
        if chat and len(facts) == len(extra["user"]["facts"]) and qa:
            m.use([path])
            c = chat_recall(m, qa)
            m.use([])
            c0 = chat_recall(m, qa)
            res.update(chat_questions=len(qa), chat_recall=sum(c), chat_recall_without=sum(c0))
    m.use([])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--sets", default="u000:10,u000:34,xl:100")
    ap.add_argument("--text", default=str(DATA / "LICENSE"), help="Unrelated text for locality.")
    ap.add_argument("--method", default="joint", choices=["joint", "opt", "unembed"])
    ap.add_argument("--out", default=None, help="Append results as JSON lines here.")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--no-chat", action="store_true", help="Skip the (slow) chat-form recall.")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    m = Model(a.model)
    load_s = time.time() - t0
    text = Path(a.text).read_text(encoding="utf-8")
    print(f"# model {m.desc} (fingerprint {m.fp:#018x}), loaded in {load_s:.1f} s, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        for spec in a.sets.split(","):
            res = evaluate(m, spec, text, a.method, Path(d), chat=not a.no_chat)
            res.update(model=m.desc, threads=torch.get_num_threads())
            line = json.dumps(res)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
