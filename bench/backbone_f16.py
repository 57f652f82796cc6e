"""Chat recall of the same memory files served by the default backbone and by an F16 copy of it
(docs/agreement.md, "Session 7: a half-precision backbone").

The F16 copy is the model directory with `backbone-skill.gguf` replaced by every matrix
dequantized and stored as F16 (bench/agreement.py `dequantized_copy`; the other files
hard-linked): llama.cpp then agrees with the torch function the rows were fitted against on
~96 % of greedy tokens instead of ~66 %. Per user: `remember` the paper's facts (the rule of
contracts.py user_pairs) once with the default model, then each `direct_qa` question as one chat
turn through `engram-local run` (greedy, 24 tokens) on both directories - the eval contract's
measure. An answer counts when the reply contains it.

    OMP_WAIT_POLICY=passive python bench/backbone_f16.py [--users u000,u001,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
USERS = HERE.parent.parent / "shared" / "data" / "user-as-engram" / "users"


def f16_model_dir(src: Path, dest: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from agreement import dequantized_copy

    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".gguf" and f.name != "backbone-skill.gguf":
            try:
                os.link(f, dest / f.name)
            except OSError:           # another file system
                shutil.copyfile(f, dest / f.name)
    dequantized_copy(src / "backbone-skill.gguf", dest / "backbone-skill.gguf", half=True)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", default="u000,u001,u002,u003,u004")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from agreement import write_memory
    from writespeed import completion_recall

    from engram_local.runtime.loader import ModelDir, resolve

    default = resolve(None)
    assert isinstance(default, ModelDir)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        half = f16_model_dir(Path(default.path), work / "f16")
        for u in args.users.split(","):
            user_file = USERS / f"{u}.json"
            eov, _, n = write_memory(work, None, user_file)
            qs = [{"prompt": q["question"], "answer": str(q["answer"])}
                  for q in json.loads(user_file.read_text())["direct_qa"]]
            res[u] = {"questions": len(qs)}
            for name, model_dir in (("default", Path(default.path)), ("f16", half)):
                res[u][name] = completion_recall(eov, qs, work, n=24, chat=True, model=model_dir)
            print(u, json.dumps(res[u]), flush=True)
    tot = {k: sum(r[k] for r in res.values()) for k in ("questions", "default", "f16")}
    print(f"\nchat recall: default backbone {tot['default']}/{tot['questions']}, "
          f"F16 copy {tot['f16']}/{tot['questions']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"users": res, "total": tot}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
