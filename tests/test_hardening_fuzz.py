"""Issue 14: the fuzz harnesses run in CI, briefly (the long runs: docs/hardening.md).

The plain random-mutation runner always runs (2 s per harness); the atheris harnesses run a
few thousand coverage-guided inputs each where atheris is installed (it has wheels for
CPython <= 3.11).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESSES = ("eov", "eov-valid", "gguf", "kernel")


def test_random_mutation_runner_finds_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "all", "--seconds", "2",
                          "--save-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["harness"] for r in results] == list(HARNESSES), out.stderr[-2000:]
    for r in results:
        assert r["inputs"] > 100, r
        assert (r["crashes"], r["unhandled"], r["hangs"], r["silent"]) == (0, 0, 0, 0), r
    assert out.returncode == 0


def test_runner_reports_what_it_finds(monkeypatch, capsys):
    """The runner is not blind: a target that raises something unexpected is counted."""
    from tests.fuzz import harnesses, run

    class Broken(harnesses.KernelTarget):
        def __call__(self, data):
            if len(data) % 2:
                raise KeyError("planted")

    monkeypatch.setitem(harnesses.TARGETS, "kernel", Broken)
    run.child("kernel", 200, 10, 0, 5.0, None)
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["inputs"] == 200 and counts["unhandled"] > 50
    assert counts["findings"][0] == "unhandled: KeyError: 'planted'"


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
@pytest.mark.parametrize("harness", HARNESSES)
def test_atheris_harness(harness, tmp_path):
    out = subprocess.run([sys.executable, "tests/fuzz/atheris_main.py", harness, "-runs=3000",
                          f"-artifact_prefix={tmp_path}/"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 3000 runs" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_artifacts_stay_out_of_the_working_directory(tmp_path):
    """libFuzzer writes crash-<sha1> into the working directory unless told otherwise (a stray
    one once landed in the repository root): atheris_main sends it to a temporary directory."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.fuzz import harnesses

        class Broken(harnesses.KernelTarget):
            def __call__(self, data):
                if len(data) % 2:
                    raise KeyError("planted")

        harnesses.TARGETS["kernel"] = Broken
        sys.argv = ["atheris_main.py", "kernel", "-runs=2000"]
        runpy.run_path({str(ROOT / "tests" / "fuzz" / "atheris_main.py")!r}, run_name="__main__")
    """))
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    out = subprocess.run([sys.executable, str(driver)], cwd=work, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TMPDIR=str(tmp)))
    assert out.returncode != 0 and "planted" in out.stdout + out.stderr
    assert list(work.iterdir()) == []
    assert [p.name[:6] for p in tmp.glob("engram-fuzz-kernel-*/*")] == ["crash-"], out.stderr[-2000:]


@pytest.mark.slow
def test_long_fuzz_run(tmp_path):
    """The documented long run of the plain runner (docs/hardening.md), about 5 minutes on two
    cores: python -m tests.fuzz.run all --runs 100000 --seed 14"""
    out = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "all", "--runs", "100000", "--seed", "14",
                          "--save-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["harness"] for r in results] == list(HARNESSES), out.stderr[-2000:]
    for r in results:
        assert r["inputs"] == 100000, r
        assert (r["crashes"], r["unhandled"], r["hangs"], r["silent"]) == (0, 0, 0, 0), r
