#!/usr/bin/env python3
"""How well a chat turn's reply opening is picked (runtime.routing), every opening scored in full.

    python bench/routing_pick.py --work-dir DIR PERSONA.json... [--json OUT] [-t 2] [--smalltalk FILE]

DIR holds the personas' memory files as `engram-local eval chat-memory --work-dir DIR` leaves them
(`p00-skill.eov`). For every direct, paraphrased and general question of each persona, every
fitted opening of its memory is scored after the question (mean token log-probability, llama.cpp,
the default model) and after `routing.NEUTRAL_TURNS` (its prior), without the shortlist; with
the sentence encoder installed, each fact's relevance to the question too (`routing.relevance`).
Reported per question kind: how often the right fact's opening is the likeliest and the right
fact the most relevant, and how often the opening picked is said and is the right fact's /
another's under each rule - the likelihood alone at session 12's bound (-1.5), session 13's gate
(the likeliest, `routing.gate` >= `routing.MIN_GATE`) and the shipped rule with relevance
(`routing.relevant`, `routing.rank`, `Route.gate`; "relevance_s14": session 14's bound, MIN_GATE
for every turn; "relevance": the shipped one, `routing.turn_routing`'s bound and
`routing.RELEVANCE_MIN`) - plus the highest a general question's pick reaches under each (what the
bound must stay above). `--smalltalk` (default bench/data/smalltalk.txt, "" for none): first-person
small talk asked of every persona's memory, kind "smalltalk": any opening said is a wrong one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

LIKELIHOOD_BOUND = -1.5          # session 12's rule: the likelihood alone
SMALLTALK = Path(__file__).with_name("data") / "smalltalk.txt"


def smalltalk(path) -> list[str]:
    """The turns of a small-talk file: one per line, # comments and blank lines skipped."""
    if not path:
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("personas", nargs="+")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smalltalk", default=str(SMALLTALK))
    args = ap.parse_args()

    from engram_local.eval.chat_memory import load_persona
    from engram_local.formats.eov import read_memory_file
    from engram_local.runtime import routing
    from engram_local.runtime.retrieval import sentence_encoder
    from engram_local.runtime.session import Session

    kinds = ("direct", "paraphrased", "general", "smalltalk")
    rule_names = ("likelihood", "gate", "relevance_s14", "relevance")
    chat = smalltalk(args.smalltalk)
    encoder = sentence_encoder(print)
    tally = {k: {"n": 0, "likeliest_right": 0, "relevant_right": 0, **{r: [0, 0] for r in rule_names}}
             for k in kinds}
    general_max = dict.fromkeys(rule_names)
    per = []
    for path in args.personas:
        persona = load_persona(path)
        eov = Path(args.work_dir) / f"{persona.name}-skill.eov"
        if not eov.exists():
            raise SystemExit(f"{eov} not found: run `engram-local eval chat-memory --work-dir "
                             f"{args.work_dir}` first")
        ledger = [f.id for f in read_memory_file(eov).facts]
        s = Session(None, overrides=[eov], n_ctx=2048, n_threads=args.threads, log=lambda m: None)
        try:
            ops = s.memory_openings()
            be = s.backend
            priors = {o: routing.prior(be, o, s.neutral_prompts) for o in ops}
            turns = list(persona.questions) + [SimpleNamespace(kind="smalltalk", text=t, fact=None) for t in chat]
            for q in turns:
                if q.kind not in kinds:
                    continue
                prompt = s.tokenize(q.text, chat=True)
                first = routing.hold_prompt(be, prompt)
                scores = [routing.score_opening(be, prompt, first, o) for o in ops]
                i = max(range(len(ops)), key=scores.__getitem__)
                asked = ledger[q.fact] if q.fact is not None else None
                right = ops[i].fact_id == asked
                t = tally[q.kind]
                t["n"] += 1
                t["likeliest_right"] += right
                rules = [("likelihood", ops[i], scores[i], scores[i] >= LIKELIHOOD_BOUND),
                         ("gate", ops[i], g := routing.gate(scores[i], priors[ops[i]]), g >= routing.MIN_GATE)]
                row = {"persona": persona.name, "kind": q.kind, "question": q.text, "best": ops[i].text,
                       "right": right, "score": round(scores[i], 3), "prior": round(priors[ops[i]], 3)}
                if encoder is not None:
                    rel = routing.relevance(ops, encoder, q.text)
                    t["relevant_right"] += max(rel, key=rel.get) == asked
                    by = {o: sc for o, sc in zip(ops, scores)}
                    r = max((routing.Route(o, by[o], priors[o], rel[o.fact_id])
                             for o in routing.relevant(ops, rel)), key=routing.rank)
                    rules.append(("relevance_s14", r.opening, r.gate, r.gate >= routing.MIN_GATE))
                    # shipped: the turn's own bound, and nothing said below RELEVANCE_MIN (a general
                    # question's gate counts towards the highest only when its fact is that near)
                    bound = routing.min_gate(q.text, rel)
                    rules.append(("relevance", r.opening,
                                  r.gate if routing.passes(r, -float("inf")) else None, routing.passes(r, bound)))
                    row.update(picked=r.opening.text, picked_right=r.opening.fact_id == asked,
                               relevance=round(r.relevance, 3), picked_gate=round(r.gate, 3), bound=bound)
                for rule, o, value, said in rules:
                    if said:
                        t[rule][0 if o.fact_id == asked else 1] += 1
                    if q.kind == "general" and value is not None and (general_max[rule] is None
                                                                       or value > general_max[rule]):
                        general_max[rule] = round(value, 3)
                per.append(row)
        finally:
            s.close()
        print(persona.name, len(ops), "openings", flush=True)
    out = {"personas": [Path(p).name for p in args.personas], "likelihood_bound": LIKELIHOOD_BOUND,
           "min_gate": routing.MIN_GATE, "min_gate_about_user": routing.MIN_GATE_ABOUT_USER,
           "relevance_min": routing.RELEVANCE_MIN, "smalltalk": args.smalltalk and Path(args.smalltalk).name,
           "relevance": encoder is not None, "tally": tally,
           "general_max": general_max, "questions": per}
    for k, t in tally.items():
        print(f"{k}: {t['n']} questions, right fact likeliest {t['likeliest_right']}, most relevant "
              f"{t['relevant_right']}; said right/wrong: "
              f"likelihood >= {LIKELIHOOD_BOUND} {t['likelihood'][0]}/{t['likelihood'][1]}, "
              f"gate >= {routing.MIN_GATE} {t['gate'][0]}/{t['gate'][1]}, "
              f"with relevance (session 14) {t['relevance_s14'][0]}/{t['relevance_s14'][1]}, "
              f"shipped {t['relevance'][0]}/{t['relevance'][1]}")
    print("best general question:", general_max)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
