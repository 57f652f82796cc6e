"""runtime.pages: when the console entry re-executes itself with glibc's huge-page tunable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engram_local.runtime import pages


def test_reexec_only_for_commands_that_decode_with_llama_cpp(monkeypatch):
    monkeypatch.setattr(pages, "_glibc", lambda: True)
    monkeypatch.setattr(pages, "_thp_available", lambda path=pages.THP_SYSFS: True)
    env = {"PATH": "/bin", pages.ENV_SWITCH: "1"}
    linux = dict(environ=env, platform="linux")
    assert pages.should_reexec(["run", "-p", "hi"], **linux)
    assert pages.should_reexec(["serve"], **linux) and pages.should_reexec(["eval", "head-to-head"], **linux)
    assert not pages.should_reexec(["remember", "-o", "x.eov", "a."], **linux)     # torch only
    unset = {"PATH": "/bin"}                                  # by default: serve only (start-up cost)
    assert pages.should_reexec(["serve"], environ=unset, platform="linux")
    assert not pages.should_reexec(["run", "-p", "hi"], environ=unset, platform="linux")
    assert not pages.should_reexec([], **linux)
    assert not pages.should_reexec(["run", "--help"], **linux)                      # --help stays instant
    assert not pages.should_reexec(["run"], environ=env, platform="darwin")
    assert not pages.should_reexec(["run"], environ={**env, pages.ENV_SWITCH: "0"}, platform="linux")
    again = pages.reexec_env(env)                                                   # never twice
    assert pages.active(again) and not pages.should_reexec(["run"], environ=again, platform="linux")
    assert not pages.should_reexec(["run"], environ={pages.ENV_REEXEC: "1"}, platform="linux")
    monkeypatch.setattr(pages, "_thp_available", lambda path=pages.THP_SYSFS: False)
    assert not pages.should_reexec(["run"], **linux)


def test_the_tunable_joins_the_users_own():
    env = pages.reexec_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + pages.TUNABLE
    assert pages.active(env) and not pages.active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


def test_thp_setting_is_read_from_sysfs(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert pages._thp_available(str(f))
    f.write_text("always madvise [never]\n")
    assert not pages._thp_available(str(f))
    assert not pages._thp_available(str(tmp_path / "missing"))


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_the_console_entry_reexecutes_itself_with_the_tunable(tmp_path):
    """With ENGRAM_LOCAL_HUGE_PAGES=1, `engram-local run ...` (cli.entry) replaces itself by `python -m engram_local.cli run ...`
    with the tunable; a sitecustomize on PYTHONPATH reports what the new process started with.
    With ENGRAM_LOCAL_HUGE_PAGES=0 nothing is re-executed."""
    if not (pages._glibc() and pages._thp_available()):
        pytest.skip("no glibc or no transparent huge pages here")
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({pages.ENV_REEXEC!r}):\n"
        "    print('REEXEC', os.environ.get('GLIBC_TUNABLES'), ' '.join(sys.argv[1:]), flush=True)\n"
        "    os._exit(0)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", pages.ENV_REEXEC)}
    env[pages.ENV_SWITCH] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    entry = [sys.executable, "-c", "import sys; from engram_local.cli import entry; sys.argv[0] = 'engram-local'; "
                                   "sys.exit(entry())", "run", "-m", str(tmp_path / "nowhere"), "-p", "x"]
    out = subprocess.run(entry, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["REEXEC", pages.TUNABLE, "run", "-m", str(tmp_path / "nowhere"), "-p", "x"]
    off = subprocess.run(entry, env={**env, pages.ENV_SWITCH: "0"}, capture_output=True, text=True, timeout=120)
    assert "REEXEC" not in off.stdout and off.returncode != 0      # ran in place: the model is missing
