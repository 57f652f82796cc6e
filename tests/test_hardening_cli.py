"""Issue 14: every bad invocation is one line on stderr and a non-zero exit, never a traceback.

The table below is what the probe tried (and what gave tracebacks, hangs or silent success
before): device files, FIFOs, directories, damaged and crafted memory files, out-of-range
flags, oversized statements, deeply nested JSON. Commands that would load the model are cut
short before it (they check their paths and flags first), so this runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from engram_local.cli import main
from engram_local.formats.eov import LedgerFact, write_memory_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.eov"
    write_memory_file(good, 7, {16: ([1, 2], [-1, -1], np.ones((2, 8), np.float16))},
                      [LedgerFact("f1", "My cat is called", "Figaro", [0, 1])])
    flipped = d / "flipped.eov"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 4
    flipped.write_bytes(bytes(data))
    os.mkfifo(d / "fifo.eov")
    (d / "dir.eov").mkdir()
    (d / "deep.jsonl").write_text("[" * 100000 + "\n")
    (d / "null.jsonl").write_text(json.dumps({"prompt": "My cat is called", "answer": "Figaro"}) + "\n" + "{oops\n")
    (d / "empty.eov").write_bytes(b"")
    for name, answer in (("null", None), ("bool", True), ("object", {"a": 1}), ("nested", [["x"]]),
                         ("number", 12)):
        (d / f"answer-{name}.jsonl").write_text(
            json.dumps({"prompt": "My cat is called", "answer": "Figaro"}) + "\n"
            + json.dumps({"prompt": "My dog is called", "answer": answer}) + "\n")
    escape = d / "escape.eov"
    write_memory_file(escape, 7, {16: ([1], [-1], np.ones((1, 8), np.float16))},
                      [LedgerFact("\x1b]0;pwned\x07id\x9b31m", "My \x1b[2J cat is", "Fi\u202egaro", [0],
                                  written="\x1b[31mred")])
    return d


def bad_invocations(d):
    long_statement = "My favourite word is " + "a" * 10000 + "."
    return [
        ["facts", "/dev/null"],
        ["facts", d / "fifo.eov"],
        ["facts", d / "flipped.eov"],
        ["facts", d / "empty.eov"],
        ["facts", d / "missing.eov"],
        ["facts", d / "dir.eov"],
        ["inspect", d / "flipped.eov"],
        ["inspect", d / "fifo.eov"],
        ["inspect", "/dev/null"],
        ["forget", d / "fifo.eov", "f1"],
        ["forget", d / "flipped.eov", "f1"],
        ["forget", d / "good.eov", "no-such-id"],
        ["remember", "-t", "0", "-o", d / "x.eov", "My cat is called Figaro."],
        ["remember", "-t", "-3", "-o", d / "x.eov", "My cat is called Figaro."],
        ["remember", "--max-steps", "0", "-o", d / "x.eov", "My cat is called Figaro."],
        ["remember", "--max-steps", "-5", "-o", d / "x.eov", "My cat is called Figaro."],
        ["remember", "-o", d / "fifo.eov", "My cat is called Figaro."],
        ["remember", "-o", "/dev/null", "My cat is called Figaro."],
        ["remember", "-o", d / "dir.eov", "My cat is called Figaro."],
        ["remember", "-o", d / "no" / "dir" / "x.eov", "My cat is called Figaro."],
        ["remember", "-o", d / "x.eov", long_statement],
        ["remember", "-o", d / "x.eov", "--prompt", "My cat is called", "--answer", "x" * 5000],
        ["remember", "-o", d / "x.eov", "--from-jsonl", d / "deep.jsonl"],
        ["remember", "-o", d / "x.eov", "--from-jsonl", d / "null.jsonl"],
        *[["remember", "-o", d / "x.eov", "--from-jsonl", d / f"answer-{name}.jsonl"]
          for name in ("null", "bool", "object", "nested", "number")],
        ["remember", "-o", d / "x.eov"],
        ["run", "-t", "0", "-p", "x"],
        ["run", "-t", "-3", "-p", "x"],
        ["run", "--seed", "-1", "-p", "x"],
        ["perplexity", "-f", d / "null.jsonl", "--window", "0"],
        ["retrofit", "--corpus", d, "-o", d / "ck", "--steps", "0"],
        ["no-such-command"],
    ]


def test_bad_invocations_fail_in_one_line(files):
    runner = CliRunner()
    problems = []
    for args in bad_invocations(files):
        res = runner.invoke(main, [str(a) for a in args])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        if res.exit_code == 0 or len(lines) != 1 or "Traceback" in res.output + res.stderr \
                or not lines[0].startswith("Error: ") or "internal error" in lines[0]:
            problems.append((args[:3], res.exit_code, res.stderr[-300:]))
    assert problems == []


@pytest.mark.parametrize("name", ["null", "bool", "object", "nested", "number"])
def test_non_string_answers_are_refused(files, name):
    """A jsonl `"answer": null` used to be stored as the text "None"."""
    res = CliRunner().invoke(main, ["remember", "-o", str(files / "x.eov"), "--from-jsonl",
                                    str(files / f"answer-{name}.jsonl")])
    assert res.exit_code != 0 and "Traceback" not in res.output + res.stderr
    message = '"answer" must be a string or a list of strings'
    # with the jsonl line number once memory.facade.jsonl_facts passes it to _answer_text
    assert res.stderr.strip().splitlines() in ([f"Error: {files / f'answer-{name}.jsonl'}:2: {message}"],
                                               [f"Error: {message}"])
    assert not (files / "x.eov").exists()


def test_non_string_answers_in_user_files_are_refused(files, tmp_path):
    user = {"uid": "u", "facts": [{"key": "shoe_size", "answer": 12, "paraphrases": []},
                                  {"key": "city", "answer": None, "paraphrases": ["I live in None."]}]}
    path = tmp_path / "u.json"
    path.write_text(json.dumps(user))
    res = CliRunner().invoke(main, ["remember", "-o", str(tmp_path / "x.eov"), "--from-user-json", str(path)])
    assert res.exit_code != 0 and "Traceback" not in res.output + res.stderr
    assert res.stderr.strip().splitlines() == [
        f'Error: {path}: fact 1: "answer" must be a string, a number or a list of them']


def test_fifo_does_not_hang_the_installed_command(files):
    exe = shutil.which("engram-local") or pytest.skip("engram-local is not installed")
    for args in (["facts", files / "fifo.eov"], ["forget", files / "fifo.eov", "f1"],
                 ["remember", "-o", files / "fifo.eov", "My cat is called Figaro."]):
        out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines() == [f"Error: {files / 'fifo.eov'}: is a FIFO (named pipe), "
                                                   "not a memory (.eov) file"]


def test_unexpected_errors_are_one_line_with_a_debug_switch(files, monkeypatch):
    """The last line of defence: an exception nobody planned for is still one line."""
    from engram_local.commands import memory as memory_cmds

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(memory_cmds, "check_fact_lengths", boom)
    res = CliRunner().invoke(main, ["remember", "-o", str(files / "x.eov"), "My cat is called Figaro."])
    assert res.exit_code == 1
    assert res.stderr.strip() == ("Error: internal error: KeyError: 'surprise' "
                                  "(set ENGRAM_LOCAL_DEBUG=1 for details)")
    monkeypatch.setenv("ENGRAM_LOCAL_DEBUG", "1")
    res = CliRunner().invoke(main, ["remember", "-o", str(files / "x.eov"), "My cat is called Figaro."])
    assert isinstance(res.exception, KeyError)


def test_terminal_control_characters_are_escaped(files):
    runner = CliRunner()
    for args in (["facts", files / "escape.eov"], ["facts", "--json", files / "escape.eov"],
                 ["facts", "--history", files / "escape.eov"]):
        res = runner.invoke(main, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        for c in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert c not in res.output, (args, res.output)
    doc = json.loads(runner.invoke(main, ["facts", "--json", str(files / "escape.eov")]).stdout)
    assert doc["facts"][0]["id"] == "\x1b]0;pwned\x07id\x9b31m"       # the JSON still carries the value
    text = runner.invoke(main, ["facts", str(files / "escape.eov")]).stdout
    assert "\\x1b]0;pwned\\x07id\\x9b31m" in text and "\\x1b[31mred" in text


def test_closed_pipe_is_quiet(files):
    exe = shutil.which("engram-local") or pytest.skip("engram-local is not installed")
    p = subprocess.run(f"{exe} facts --help | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}",
                       shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


@pytest.mark.parametrize("flag", ["-t", "--max-steps"])
def test_range_flags_are_documented(flag):
    res = CliRunner().invoke(main, ["remember", "--help"])
    assert flag in res.stdout and "x>=1" in res.stdout
    assert sys.executable
