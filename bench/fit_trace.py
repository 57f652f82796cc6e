"""The writer's trace on N synthetic facts (bench/writespeed.py's set) with a step cap: how many
components are left per step, and which facts (docs/writespeed.md, "where the cost turns").

    OMP_WAIT_POLICY=passive python bench/fit_trace.py 75 150      # facts, max_steps
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path


def main(n: int, max_steps: int) -> None:
    spec = importlib.util.spec_from_file_location("writespeed", Path(__file__).with_name("writespeed.py"))
    ws = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ws)
    from engram_local.memory import items

    init = items.FitSettings.__init__

    def capped(self, *a, **k):           # the default settings, with the step cap given
        init(self, *a, **k)
        self.max_steps = max_steps

    items.FitSettings.__init__ = capped
    session = ws.Session()
    facts = ws.synthetic_facts(n)
    path = Path(tempfile.mkdtemp(prefix="fit-trace-")) / "t.eov"
    rep, secs, fitter = session.remember(path, facts)
    trace = fitter.trace if fitter else []
    steps = [t for t in trace if isinstance(t[0], int)]
    checks = [t[1] for t in trace if t[0] == "check"]
    print(f"{n} facts, max_steps {max_steps}: {secs:.0f} s, recalled {sum(rep.recalled.values())}/{n} "
          f"in the fit's check, {len(steps)} steps, final checks failing {checks}")
    for step, loss, left, rows, facts_left, run in steps[::10] + steps[-3:]:
        print(f"step {step}: loss {loss}, components left {left}, rows {rows}, "
              f"facts left (first 8) {facts_left}, items run {run}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
