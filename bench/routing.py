#!/usr/bin/env python3
"""What choosing a chat reply's opening costs (runtime.routing): per memory file, the openings it
holds and the time `Session.chat_opening` takes per question (llama.cpp, the default model).

    OMP_WAIT_POLICY=passive python bench/routing.py FILE.eov [FILE.eov ...] [-t 2] [--json OUT]

Each file is timed over the same questions (general and personal ones, none from the persona
files), the session reset before each, so every question pays its whole prompt; the decode of
the prompt alone is timed too (what any reply pays first). An opening's prior is taken the first
time it is needed and kept (`priors_taken`: how many were; the max is a question that took one).
Each file is timed twice, side by side: routing by likelihood alone (`rule` "likelihood") and
with the sentence encoder's relevance ("relevance", when installed; `facts_embed_ms`: embedding
the memory's facts, once per memory version, before the first question; `encoder_load_ms`: the
encoder's loading, once per process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

QUESTIONS = ["What vehicle do I own?", "Who is my dentist?", "What is the capital of France?",
             "Remind me what my pet is called?", "How many days are there in a week?",
             "Where did I say I live?", "What do I do for a living?", "Which team do I support?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from engram_local.runtime.retrieval import sentence_encoder
    from engram_local.runtime.session import Session

    t = time.perf_counter()
    encoder = sentence_encoder(print)
    load_ms = round(1000 * (time.perf_counter() - t), 1)
    out = []
    for path in args.files:
        for rule in ("likelihood", "relevance") if encoder is not None else ("likelihood",):
            s = Session(None, overrides=[path], n_ctx=512, n_threads=args.threads, log=lambda m: None)
            s.encoder = encoder if rule == "relevance" else None
            try:
                n = len(s.memory_openings())
                route_s, prompt_s, routed = [], [], 0
                t = time.perf_counter()
                s.chat_opening(s.tokenize(QUESTIONS[0], chat=True), QUESTIONS[0])   # warm-up, facts embedded
                first_ms = round(1000 * (time.perf_counter() - t), 1)
                for q in QUESTIONS:
                    ids = s.tokenize(q, chat=True)
                    s.reset()
                    t = time.perf_counter()
                    s.backend.eval(ids)
                    prompt_s.append(time.perf_counter() - t)
                    s.reset()
                    t = time.perf_counter()
                    routed += s.chat_opening(ids, q) is not None
                    route_s.append(time.perf_counter() - t)
                row = {"file": path, "rule": rule, "openings": n, "questions": len(QUESTIONS), "routed": routed,
                       "priors_taken": len(s.memory_openings().priors),
                       "chat_opening_ms_median": round(1000 * statistics.median(route_s), 1),
                       "chat_opening_ms_max": round(1000 * max(route_s), 1),
                       "prompt_only_ms_median": round(1000 * statistics.median(prompt_s), 1),
                       "first_question_ms": first_ms}
                if rule == "relevance":
                    row["encoder_load_ms"] = load_ms
            finally:
                s.close()
            print(json.dumps(row), flush=True)
            out.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
