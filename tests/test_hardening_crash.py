"""Issue 14: a write killed at any stage loses nothing and leaves nothing behind after the
next write (bench/crash_eov.py; the 100-trial run is the slow test below, figures in
docs/hardening.md)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import crash_eov  # noqa: E402


@pytest.mark.parametrize("stage", crash_eov.STAGES)
def test_kill_at_each_stage_of_a_write(tmp_path, stage):
    r = crash_eov.trial(tmp_path, random.Random(stage), stage)
    assert r["killed"], r
    assert (r["corrupt"], r["lost"], r["mixed"], r["leftover"]) == (0, 0, 0, 0), r
    # before the rename the old file stands and the partial copy waits for the next write
    assert r["leftover_before"] == (0 if stage == "renamed" else 1), r


def test_timed_kill(tmp_path):
    r = crash_eov.trial(tmp_path, random.Random(1), None)
    assert r["killed"] and (r["corrupt"], r["lost"], r["mixed"], r["leftover"]) == (0, 0, 0, 0), r


@pytest.mark.slow
def test_crash_run_of_100_trials(tmp_path):
    """python bench/crash_eov.py --trials 100 (about a minute on two cores)."""
    out = subprocess.run([sys.executable, "bench/crash_eov.py", "--trials", "100"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["trials"] == 100 and s["killed"] == 100, s
    assert (s["corrupt"], s["lost"], s["mixed"], s["leftover"]) == (0, 0, 0, 0), s
    assert out.returncode == 0
