"""`remember`, `facts`, `forget` as commands (tiny model in place of the default one)."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from engram_local.memory import facade as memory
from engram_local.cli import main
from tests.memory_fixtures import tiny_memory_model


@pytest.fixture(scope="module")
def tiny():
    em, tok = tiny_memory_model()
    return em, tok, memory.model_fingerprint(em)


@pytest.fixture
def cli(tiny, monkeypatch):
    monkeypatch.setattr(memory, "load_model_for_memory", lambda model=None: tiny)
    runner = CliRunner()

    def run(*args, ok=True):
        res = runner.invoke(main, [str(a) for a in args])
        if ok:
            assert res.exit_code == 0, (res.output, res.exception)
        return res
    return run


def test_remember_facts_forget(cli, tmp_path):
    path = tmp_path / "me.eov"
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text(json.dumps({"prompt": "w30 w31 w32", "answer": "w40 w41", "id": "w"}) + "\n")
    res = cli("remember", "-q", "-o", path, "my name is krause", "--prompt", "the doctor is",
              "--answer", "dr krause", "--from-jsonl", jsonl)
    assert res.stdout.split() == ["f1", "f2", "w"]
    listed = json.loads(cli("facts", path, "--json").stdout)
    assert [(f["id"], f["prompt"], f["answer"]) for f in listed["facts"]] == [
        ("f1", "my name is", "krause"), ("f2", "the doctor is", "dr krause"), ("w", "w30 w31 w32", "w40 w41")]
    assert all(f["rows"] >= 1 for f in listed["facts"])
    text = cli("facts", path).stdout
    assert "f2\t'the doctor is' -> 'dr krause'" in text
    cli("forget", "-q", path, "f1")
    assert [f["id"] for f in json.loads(cli("facts", path, "--json").stdout)["facts"]] == ["f2", "w"]
    res = cli("remember", "-q", "-o", path, "my name is krause")
    assert res.stdout.split() == ["f3"]


def test_a_statement_of_two_facts_writes_two(cli, tmp_path):
    path = tmp_path / "me.eov"
    res = cli("remember", "-q", "-o", path, "my name is krause and my doctor is dr")
    assert res.stdout.split() == ["f1", "f2"]
    listed = json.loads(cli("facts", path, "--json").stdout)["facts"]
    assert [(f["prompt"], f["answer"]) for f in listed] == [("my name is", "krause"), ("my doctor is", "dr")]


def test_errors(cli, tmp_path):
    path = tmp_path / "me.eov"
    res = cli("remember", "-o", path, "hello world", ok=False)
    assert res.exit_code == 1 and "cannot split 'hello world'" in res.output and not path.exists()
    res = cli("remember", "-o", path, "--prompt", "my name is", ok=False)
    assert res.exit_code == 2 and "in pairs" in res.output
    res = cli("remember", "-o", path, ok=False)
    assert res.exit_code == 2 and "no facts" in res.output
    res = cli("remember", "-o", path, "--prompt", "my name is", "--answer", "zebra", ok=False)
    assert res.exit_code == 1 and "cannot produce the answer 'zebra'" in res.output and not path.exists()
    cli("remember", "-q", "-o", path, "my name is krause")
    before = path.read_bytes()
    res = cli("forget", path, "nope", ok=False)
    assert res.exit_code == 1 and "no fact with id 'nope'" in res.output
    bad = tmp_path / "bad.eov"
    bad.write_bytes(before[:50])
    for args in (("facts", bad), ("forget", bad, "f1"), ("remember", "-o", bad, "my name is krause")):
        res = cli(*args, ok=False)
        assert res.exit_code == 1 and "damaged or truncated" in res.output, args
    assert path.read_bytes() == before


def test_help_is_instant():
    code = ("import sys, time; t = time.time(); from engram_local.cli import main\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    for cmd in ("remember", "facts", "forget"):
        out = subprocess.run([sys.executable, "-m", "engram_local.cli", cmd, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "Usage" in out
