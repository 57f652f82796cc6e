#!/usr/bin/env python3
"""Write speed of user memory -> docs/writespeed.md.

Usage (from the repository root; the default model, which carries the skill adapter, so every
fact is also fitted in its chat forms):
    OMP_WAIT_POLICY=passive python bench/writespeed.py --json bench/writespeed_results.json
    OMP_WAIT_POLICY=passive python bench/writespeed.py --parts profile,add,forget     # a subset

Parts:
  profile  `memory.remember` of the 100 natural statements into a fresh file, model loaded in
           this process: time per stage (load, address, capture, mark_rare, placement, optimizer
           steps with their forward/backward/batch time, final check, file write) from the
           writer's timing dict;
  cli      `engram-local remember -q -o m.eov <100 statements>` from scratch, wall time including
           the model load, and completion recall through `engram-local run --prompts-jsonl`
           (llama.cpp, quantised backbone, -n 12 --temp 0) - what `contracts.py writespeed` runs;
  add      one fact added to the 100-fact file in a live session (model loaded): median over
           --samples facts (the natural statements left over, then synthetic ones);
  forget   one fact of the 100 forgotten: median over --samples facts;
  big      --big synthetic facts ("My aunt's dog is called Rex") from scratch through the API,
           wall time, and completion recall through `engram-local run`;
  grow     --big synthetic facts added --chunk at a time to one file in a live session (how a
           memory reaches 1,000 facts in use): each chunk's time as it lands (printed at once, so
           a stopped run still leaves its curve), then completion recall of every fact through
           `engram-local run`;
  compare  the writer of an earlier commit (--compare-commit, default ae3c22b: before this
           work) against this one on the first --compare-n statements, the same inputs
           (facade.fact_inputs), alternating in one process (the machine is shared: ratios).

The natural statements are those of ../shared/data/chat-memory/p*.json with one fact per prompt
(as the contract check dedupes them); they are used for timing only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO.parent / "shared" / "data" / "chat-memory"
ENV = dict(os.environ, OMP_WAIT_POLICY="passive")


def natural_statements(limit: int | None = None) -> tuple[list[str], list[dict]]:
    """Statements (one per prompt, lower-cased prompts deduped) and their {prompt, answer}."""
    st, pr, seen = [], [], set()
    for path in sorted(CHAT.glob("p*.json")):
        p = json.loads(path.read_text())
        for s, f in zip(p["statements"], p["facts"]):
            prompt = s.rstrip(".")[: -len(f["answer"])].rstrip()
            if prompt.lower() in seen or (limit is not None and len(st) >= limit):
                continue
            seen.add(prompt.lower())
            st.append(s)
            pr.append({"prompt": prompt, "answer": f["answer"]})
    return st, pr


RELATIONS = ("mother", "father", "sister", "brother", "wife", "husband", "son", "daughter", "aunt", "uncle",
             "cousin", "grandmother", "grandfather", "niece", "nephew", "neighbour", "boss", "manager",
             "colleague", "friend", "roommate", "landlord", "dentist", "doctor", "vet", "lawyer", "accountant",
             "mechanic", "coach", "teacher", "tutor", "partner", "girlfriend", "boyfriend", "godmother",
             "godfather", "stepmother", "stepfather", "barber", "plumber")
NAMES = ("Rex", "Bella", "Milo", "Luna", "Oscar", "Daisy", "Felix", "Ruby", "Hugo", "Nora", "Jasper", "Iris",
         "Otto", "Mabel", "Rufus", "Hazel", "Leo", "Pearl", "Finn", "Olive", "Arlo", "Ivy", "Bruno", "Maisie",
         "Teddy", "Willow", "Ziggy", "Poppy", "Monty", "Clara", "Dexter", "Greta", "Alfie", "Nina", "Rocco",
         "Tilly", "Gus", "Elsie", "Archie", "Freya")
VALUES = {
    "'s name is": NAMES,
    "'s dog is called": NAMES,
    "'s cat is named": NAMES,
    "'s parrot is called": NAMES,
    "'s car is a": ("Toyota", "Volvo", "Skoda", "Mazda", "Subaru", "Peugeot", "Renault", "Honda", "Kia", "Fiat"),
    "'s favourite colour is": ("teal", "crimson", "ochre", "lilac", "mustard", "navy", "coral", "olive", "amber"),
    "'s favourite food is": ("lasagne", "ramen", "paella", "falafel", "goulash", "risotto", "dumplings", "tacos"),
    "'s hometown is": ("Leeds", "Bergen", "Graz", "Porto", "Lyon", "Ghent", "Turku", "Cork", "Brno", "Malmo"),
    "'s job is": ("carpenter", "pharmacist", "architect", "nurse", "baker", "pilot", "translator", "geologist"),
    "'s birthday is on": ("March 3", "July 19", "October 8", "May 27", "January 14", "August 2", "June 30"),
    "'s phone number ends in": ("4417", "9023", "1185", "7350", "2268", "6094", "3801", "5532"),
    "'s favourite band is": ("Coldplay", "Radiohead", "Blondie", "Queen", "Oasis", "Metallica", "Abba"),
    "'s favourite sport is": ("rowing", "fencing", "curling", "squash", "handball", "archery", "cricket"),
    "'s middle name is": NAMES,
    "'s house number is": ("12", "47", "103", "8", "221", "64", "39", "150"),
    "'s favourite drink is": ("espresso", "lemonade", "cider", "matcha", "kombucha", "stout", "rooibos"),
    "'s horse is called": NAMES,
    "'s boat is named": NAMES,
    "'s favourite book is": ("Dune", "Emma", "Beloved", "Ulysses", "Persuasion", "Rebecca", "Kindred"),
    "'s allergy is": ("peanuts", "pollen", "shellfish", "latex", "dust", "gluten", "penicillin"),
    "'s blood type is": ("A positive", "O negative", "B positive", "AB negative", "O positive"),
    "'s garden has a": ("pond", "greenhouse", "beehive", "treehouse", "sundial", "fountain"),
    "'s nickname is": NAMES,
    "'s favourite city is": ("Kyoto", "Lisbon", "Vienna", "Quebec", "Seville", "Tallinn", "Bologna"),
    "'s goldfish is called": NAMES,
}


def synthetic_facts(n: int, seed: int = 0):
    """n facts "My <relation><thing> <value>" with distinct prompts (40 relations x 25 things)."""
    from engram_local.memory.facade import NewFact

    rng = random.Random(seed)
    prompts = [f"My {r}{t}" for t in VALUES for r in RELATIONS]
    rng.shuffle(prompts)
    out = []
    for i, p in enumerate(prompts[:n]):
        thing = next(t for t in VALUES if p.endswith(t))
        out.append(NewFact(prompt=p, answer=rng.choice(VALUES[thing]), id=f"s{i}"))
    return out


def completion_recall(path: Path, facts: list[dict], work: Path, n: int = 12, chat: bool = False,
                      model: Path | None = None) -> int:
    """How many answers `engram-local run --overrides path` gives to the facts' prompts (as
    contracts.py does: completion, 12 tokens; `chat`: each prompt one chat turn)."""
    q = work / "q.jsonl"
    q.write_text("".join(json.dumps({"prompt": f["prompt"], **({"chat": True} if chat else {})}) + "\n"
                         for f in facts))
    out = subprocess.run(["engram-local", "run", *(["-m", str(model)] if model else []), "--overrides", str(path),
                          "--prompts-jsonl", str(q), "-n", str(n), "--temp", "0"],
                         capture_output=True, text=True, env=ENV, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return sum(f["answer"].lower() in r["completion"].lower() for f, r in zip(facts, rows))


class Session:
    """The default model loaded once; every remember/forget keeps the last Fitter's timing."""

    def __init__(self):
        t0 = time.time()
        from engram_local.memory import facade
        from engram_local.memory.writer import Fitter

        self.facade = facade
        self.em, self.tok, self.fp = facade.load_model_for_memory(None)
        self.load_s = time.time() - t0
        self.fitters = []
        orig = Fitter.fit
        fitters = self.fitters

        def fit(fitter, *a, **k):
            fitters.append(fitter)
            return orig(fitter, *a, **k)

        Fitter.fit = fit

    def remember(self, path, facts):
        self.fitters.clear()
        t = time.time()
        rep = self.facade.remember(path, facts, self.em, self.tok, self.fp)
        return rep, time.time() - t, (self.fitters[-1] if self.fitters else None)

    def forget(self, path, ids):
        self.fitters.clear()
        t = time.time()
        rep = self.facade.forget(path, ids, self.em, self.tok, self.fp)
        return rep, time.time() - t, (self.fitters[-1] if self.fitters else None)


def writer_at(commit: str, work: Path):
    """The memory writer (memory/writer.py and its stages) of `commit`, importable as a package
    of its own; its Fitter class."""
    import importlib

    pkg = work / "writer_at"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    names = ("writer", "items", "prefix", "batching", "placement", "optimize")
    for n in names:
        src = subprocess.run(["git", "show", f"{commit}:engram_local/memory/{n}.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        for m in names:
            src = src.replace(f"engram_local.memory.{m}", f"writer_at.{m}")
        (pkg / f"{n}.py").write_text(src)
    sys.path.insert(0, str(work))
    return importlib.import_module("writer_at.writer").Fitter


def compare(s: "Session", statements: list[str], commit: str, work: Path, rounds: int = 1) -> dict:
    from engram_local.memory.writer import Fitter

    Old = writer_at(commit, work)
    facts = [s.facade.NewFact(*s.facade.split_statement(x), id=f"f{i}") for i, x in enumerate(statements)]
    ins = s.facade.fact_inputs(facts, s.em, s.tok)
    out: dict = {"facts": len(facts), "items_old": None, commit: [], "this": []}
    for r in range(rounds):
        for name, cls in ((commit, Old), ("this", Fitter)) if r % 2 == 0 else (("this", Fitter), (commit, Old)):
            f = cls(s.em, s.tok)
            t = time.time()
            res = f.fit(ins)
            out[name].append({"s": round(time.time() - t, 1), "steps": res.steps, "rows": len(res.rows),
                              "recalled": sum(res.recalled.values())})
            print(f"compare {name}: {out[name][-1]}", flush=True)
    return out


def stage_profile(fitter, total: float) -> dict:
    t = dict(fitter.timing)
    fit_s = sum(t.get(k, 0.0) for k in ("address", "capture", "mark_rare", "placement", "optimize",
                                         "final_check"))
    return {"stages_s": {k: round(v, 2) for k, v in t.items() if k != "tokens"},
            "suffix_token_steps": int(t.get("tokens", 0)), "steps": len([x for x in fitter.trace if x[0] != "check"]),
            "items": len(fitter.items), "items_fitted": len(fitter.live),
            "outside_fit_s": round(total - fit_s, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="profile,cli,add,forget,big")
    ap.add_argument("-n", type=int, default=100, help="natural statements (default 100)")
    ap.add_argument("--samples", type=int, default=5, help="facts added / forgotten, one at a time")
    ap.add_argument("--big", type=int, default=1000, help="synthetic facts of the `big` part")
    ap.add_argument("--chunk", type=int, default=100, help="facts per write of the `grow` part")
    ap.add_argument("--compare-commit", default="ae3c22b")
    ap.add_argument("--compare-n", type=int, default=20)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    res: dict = {"n": args.n}
    statements, pairs = natural_statements()
    base_st, base_pr = statements[:args.n], pairs[:args.n]
    work = Path(tempfile.mkdtemp(prefix="writespeed-"))
    try:
        if "cli" in parts:
            m = work / "cli.eov"
            t = time.time()
            subprocess.run(["engram-local", "remember", "-q", "-o", str(m), *base_st], check=True, env=ENV,
                           capture_output=True)
            wall = time.time() - t
            hit = completion_recall(m, base_pr, work)
            res["cli"] = {"wall_s": round(wall, 1), "per_statement_s": round(wall / len(base_st), 3),
                          "recall": hit, "facts": len(base_st), "file_bytes": m.stat().st_size}
            print(f"cli: {len(base_st)} statements {wall:.1f} s wall, recall {hit}/{len(base_st)}", flush=True)
        need_session = any(p in parts for p in ("profile", "add", "forget", "big", "grow", "compare"))
        if not need_session:
            return finish(res, args)
        s = Session()
        res["load_s"] = round(s.load_s, 2)
        if "compare" in parts:
            res["compare"] = compare(s, base_st[:args.compare_n], args.compare_commit, work)
        base = work / "base.eov"
        if any(p in parts for p in ("profile", "add", "forget")):
            facts = [s.facade.NewFact(*s.facade.split_statement(x)) for x in base_st]
            rep, secs, fitter = s.remember(base, facts)
            res["profile"] = {"remember_s": round(secs, 1), "rows": rep.rows, "file_bytes": rep.file_bytes,
                              "recalled": sum(rep.recalled.values()), "facts": len(facts),
                              **stage_profile(fitter, secs)}
            print("profile:", json.dumps(res["profile"]), flush=True)
        if "add" in parts:
            extra = [s.facade.NewFact(*s.facade.split_statement(x)) for x in statements[args.n:]]
            extra += synthetic_facts(args.samples)
            times, ok, fitted = [], 0, []
            for f in extra[:args.samples]:
                p = work / "add.eov"
                shutil.copyfile(base, p)
                rep, secs, fitter = s.remember(p, [f])
                times.append(secs)
                ok += bool(rep.recalled.get(rep.new_ids[0], False))
                fitted.append(len(fitter.live) if fitter else 0)
            res["add"] = {"median_s": round(statistics.median(times), 2), "times_s": [round(x, 2) for x in times],
                          "recalled": ok, "samples": len(times), "items_fitted": fitted}
            print("add:", json.dumps(res["add"]), flush=True)
        if "forget" in parts:
            from engram_local.formats.eov import read_memory_file

            ids = [f.id for f in read_memory_file(base).facts]
            rng = random.Random(1)
            times, fitted, kept = [], [], []
            for fid in rng.sample(ids, min(args.samples, len(ids))):
                p = work / "forget.eov"
                shutil.copyfile(base, p)
                rep, secs, fitter = s.forget(p, [fid])
                times.append(secs)
                fitted.append(len(fitter.live) if fitter else 0)
                kept.append(sum(rep.recalled.values()))
            res["forget"] = {"median_s": round(statistics.median(times), 2), "times_s": [round(x, 2) for x in times],
                             "samples": len(times), "items_fitted": fitted, "recalled_after": kept}
            print("forget:", json.dumps(res["forget"]), flush=True)
        if "big" in parts:
            facts = synthetic_facts(args.big)
            pr = [{"prompt": f.prompt, "answer": f.answer} for f in facts]
            p = work / "big.eov"
            rep, secs, fitter = s.remember(p, facts)
            hit = completion_recall(p, pr, work)
            res["big"] = {"facts": len(facts), "remember_s": round(secs, 1), "rows": rep.rows,
                          "file_bytes": rep.file_bytes, "recalled_fit": sum(rep.recalled.values()),
                          "recall_llama": hit, **stage_profile(fitter, secs)}
            print("big:", json.dumps(res["big"]), flush=True)
        if "grow" in parts:
            facts = synthetic_facts(args.big)
            p = work / "grow.eov"
            chunks = []
            for i in range(0, len(facts), args.chunk):
                rep, secs, fitter = s.remember(p, facts[i:i + args.chunk])
                chunks.append({"facts_before": i, "added": len(facts[i:i + args.chunk]), "seconds": round(secs, 1),
                               "rows": rep.rows, "file_bytes": rep.file_bytes,
                               "items_fitted": len(fitter.live) if fitter else 0,
                               "recalled_fit": sum(rep.recalled.values())})
                print("grow:", json.dumps(chunks[-1]), flush=True)
            pr = [{"prompt": f.prompt, "answer": f.answer} for f in facts]
            res["grow"] = {"facts": len(facts), "chunk": args.chunk, "chunks": chunks,
                           "total_s": round(sum(c["seconds"] for c in chunks), 1),
                           "recall_llama": completion_recall(p, pr, work)}
            print("grow:", json.dumps({k: v for k, v in res["grow"].items() if k != "chunks"}), flush=True)
        return finish(res, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# part -> (measurement, time, detail): format strings over the part's result dict
ROWS = {
    "cli": ("`remember` 100 statements from scratch (CLI, incl. load)", "{wall_s} s",
            "{per_statement_s} s per statement; completion recall {recall}/{facts}"),
    "add": ("add 1 fact to 100 (live session)", "{median_s} s median",
            "{times_s}; recalled {recalled}/{samples}; items fitted {items_fitted}"),
    "forget": ("forget 1 fact of 100", "{median_s} s median", "{times_s}; items fitted {items_fitted}"),
    "big": ("{facts} synthetic facts from scratch (model loaded)", "{remember_s} s",
            "completion recall {recall_llama}/{facts} (llama.cpp), {recalled_fit} in the fit's check; "
            "{rows} rows, {file_bytes} bytes"),
    "grow": ("{facts} synthetic facts added {chunk} at a time (live session)", "{total_s} s in all",
             "completion recall {recall_llama}/{facts} (llama.cpp); per chunk: see the JSON"),
}


def finish(res: dict, args) -> dict:
    rows = []
    if "profile" in res:
        p = res["profile"]
        rows.append(("profile: remember 100 statements (model loaded)", f"{p['remember_s']} s",
                     ", ".join(f"{k} {v}" for k, v in p["stages_s"].items()) + f"; write etc. {p['outside_fit_s']} s; "
                     f"{p['steps']} steps, {p['suffix_token_steps']} suffix token-steps, {p['items']} items; "
                     f"recalled {p['recalled']}/{p['facts']}"))
    rows += [tuple(f.format(**res[part]) for f in fmt) for part, fmt in ROWS.items() if part in res]
    if "compare" in res:
        c = res["compare"]
        old = [k for k in c if k not in ("facts", "items_old", "this")][0]
        for name in (old, "this"):
            x = c[name][0]
            rows.append((f"writer {'of ' + old if name == old else 'now'}: {c['facts']} statements (model loaded)",
                         f"{x['s']} s", f"{x['steps']} steps, {x['rows']} rows, recalled {x['recalled']}/{c['facts']}"))
    print("\n| measurement | time | detail |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
