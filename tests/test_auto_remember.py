"""Learning from conversation: the fact detector (text.statements), its labelled set, the
background writer (memory.learner) and the chat REPL's offer / --auto-remember flow."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from engram_local.text.facts import split_statement
from engram_local.text.statements import explain, extract_facts, statement_key

DATA = Path(__file__).parent / "data" / "auto_remember.jsonl"


# --------------------------------------------------------------------------- the detector

@pytest.mark.parametrize("turn, facts", [
    ("btw I'm allergic to penicillin", ["I'm allergic to penicillin"]),
    ("my sister is called Anjali", ["My sister is called Anjali"]),
    ("My doctor is Dr. Krause.", ["My doctor is Dr. Krause"]),
    ("I have a cat named Figaro", ["I have a cat named Figaro"]),
    ("im a nurse lol", ["I'm a nurse"]),
    ("my name's Sam", ["My name is Sam"]),
    ("I drive a Toyota now", ["I drive a Toyota"]),
    ("Please remember that my gate code is 4711", ["My gate code is 4711"]),
    ("can you remember that I'm vegan?", ["I'm vegan"]),
    # a statement and a question; two statements; a shared subject
    ("I'm vegetarian, what should I cook tonight?", ["I'm vegetarian"]),
    ("My name is Sam and I'm a nurse.", ["My name is Sam", "I'm a nurse"]),
    ("I live in Pune and work as a nurse", ["I live in Pune", "I work as a nurse"]),
    ("Hi! I'm Marta. I live in Valencia.", ["I'm Marta", "I live in Valencia"]),
    ("Anjali is my sister", ["Anjali is my sister"]),
    ("My wife and I live in Cardiff", ["My wife and I live in Cardiff"]),
])
def test_facts_about_the_user_are_found(turn, facts):
    got = extract_facts(turn)
    assert [statement_key(s) for s in got] == [statement_key(s) for s in facts]
    for s in got:
        split_statement(s)                      # every statement can be written


@pytest.mark.parametrize("turn", [
    "My sister is allergic to nuts",            # another person's fact
    "my mom lives in Ohio",
    "If I had a dog I'd call him Rex",          # hypothetical
    "I wish I had a Tesla",
    "What is my name?",                         # questions
    "Do you know where I live?",
    "what's my dog called",
    "My name is Sam, right?",
    "She said 'I live in Paris'",               # quotes and reported speech
    'The sign said "I\'m closed on Mondays"',
    "I think I might move to Berlin",           # hedged
    "I'm tired",                                # passing states
    "I'm so hungry rn",
    "I have a headache",
    "I'm at the airport",
    "I'm going to the store",                   # plans
    "I'll be in Rome next week",
    "I went to the beach yesterday",            # episodes
    "Write me a poem about my cat",             # commands, greetings, opinions
    "hello!",
    "Python is better than Java",
    "I used to live in Madrid",                 # former
    "I love it",
    "My name is a secret",
    "",
])
def test_other_turns_are_not_written(turn):
    assert extract_facts(turn) == []


def test_explain_gives_a_reason_for_every_clause():
    clauses = explain("I'm vegetarian, what should I cook tonight?")
    assert [c.statement for c in clauses] == ["I'm vegetarian", None]
    assert all(c.reason for c in clauses)


def test_statement_key_ignores_spelling_noise():
    assert statement_key("im allergic to penicillin.") == statement_key("I’m allergic to  penicillin")
    assert statement_key("I am 41") == statement_key("I'm 41")


# --------------------------------------------------------------------------- the labelled set

def _rows():
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_labelled_set_is_large_and_well_formed():
    rows = _rows()
    assert len(rows) >= 200
    assert {r["split"] for r in rows} == {"dev", "heldout"}
    assert sum(bool(r["facts"]) for r in rows) >= 100 and sum(not r["facts"] for r in rows) >= 100
    for r in rows:
        assert isinstance(r["turn"], str) and isinstance(r["facts"], list)
    assert len({r["turn"] for r in rows}) == len(rows)


def test_precision_on_the_labelled_set():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_auto_remember",
                                                  Path(__file__).parents[1] / "bench" / "auto_remember.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = _rows()
    for split in ("dev", "heldout", "all"):
        sel = rows if split == "all" else [r for r in rows if r["split"] == split]
        res = bench.score(sel)
        assert res["statement_precision"] >= 0.95, (split, res["errors"])
        assert res["turn_precision"] >= 0.95, split
    res = bench.score(rows)
    assert res["statement_recall"] >= 0.75 and res["turn_recall"] >= 0.75


# --------------------------------------------------------------------------- the learner

@pytest.fixture(scope="module")
def tiny():
    from engram_local.memory import facade
    from tests.memory_fixtures import tiny_memory_model

    em, tok = tiny_memory_model()
    return em, tok, facade.model_fingerprint(em)


def test_learner_writes_in_the_background(tiny, tmp_path):
    from engram_local.formats.eov import read_memory_file
    from engram_local.memory.learner import Learner
    from engram_local.text.facts import FactInputError

    gate = threading.Event()

    def slow_loader(model):
        assert gate.wait(60)                    # the write cannot start before the test lets it
        return tiny

    path = tmp_path / "me.eov"
    learner = Learner(path, "unused", loader=slow_loader)
    done = []
    t0 = time.monotonic()
    job = learner.submit(["my name is krause"], on_done=done.append)
    forget = learner.forget(["f1"])             # queued behind the write
    assert time.monotonic() - t0 < 5 and not job.done.is_set()
    assert learner.pending == 2
    assert not path.exists()
    gate.set()
    assert learner.wait(300)
    assert done == [job] and job.ok and job.new_ids == ["f1"] and job.error is None
    assert [(f.id, f.prompt, f.answer) for f in job.written()] == [("f1", "my name is", "krause")]
    assert forget.ok and read_memory_file(path).facts == []
    with pytest.raises(FactInputError):
        learner.submit(["hello world"])          # no linking word: refused before it is queued
    learner.close()


def test_learner_proposals_skip_stored_facts_and_name_updates(tiny, tmp_path):
    from engram_local.memory.learner import Learner

    path = tmp_path / "me.eov"
    learner = Learner(path, tiny)
    assert learner.propose("What is my name?") == []
    job = learner.submit(["my name is krause"])
    assert job.wait(300) and job.ok
    assert learner.propose("my name is krause") == []            # stored already
    (p,) = learner.propose("btw my name is dr")
    assert (p.prompt, p.answer, p.replaces) == ("My name is", "dr", "f1")
    learner.close()


def test_learner_writes_the_good_facts_of_a_job_when_one_is_refused(tmp_path, monkeypatch):
    from engram_local.memory import facade
    from engram_local.memory.learner import Learner
    from engram_local.text.facts import FactInputError

    written = []

    def fake_remember(path, facts, em, tok, fp, **kw):
        if any(f.answer == "bad" for f in facts):
            raise FactInputError("refused")
        for f in facts:
            f.id = f"f{len(written) + 1}"
            written.append(f)
        return facade.WriteReport(new_ids=[f.id for f in facts], recalled={f.id: True for f in facts}, rows=1,
                                  file_bytes=1, seconds=0.0, steps=0)

    monkeypatch.setattr(facade, "remember", fake_remember)
    learner = Learner(tmp_path / "me.eov", ("em", "tok", 0))
    job = learner.submit(["my name is krause", "my car is bad", "I live in Leeds"])
    assert job.wait(30)
    assert job.new_ids == ["f1", "f2"] and job.error is None
    assert [s for s, _ in job.errors] == ["my car is bad"]
    bad = learner.submit(["my car is bad"])
    assert bad.wait(30) and isinstance(bad.error, FactInputError) and not bad.ok
    learner.close()


# --------------------------------------------------------------------------- the chat REPL

@pytest.fixture(scope="module")
def md(tmp_path_factory):
    from tests.runtime_fixtures import shared_model_dir

    return shared_model_dir(tmp_path_factory, "model", adapter=True)


def _chat(md, eov, script, *extra):
    from click.testing import CliRunner

    from engram_local.cli import main

    args = ["run", "-m", str(md), "--backend", "torch", "--overrides", str(eov), "-n", "3", "--temp", "0",
            "-t", "1", *extra]
    return CliRunner().invoke(main, args, input=script, catch_exceptions=False)


def test_repl_offers_a_stated_fact_and_writes_it_on_y(md, tmp_path):
    eov = tmp_path / "me.eov"
    script = "btw My doctor is Dr. Krause.\ny\nI live in Paris\nn\nWhat is my name?\n/facts\n/exit\n"
    r = _chat(md, eov, script)
    assert r.exit_code == 0, r.stderr
    assert 'remember "My doctor is Dr. Krause"? [y/N]' in r.stderr
    assert 'remember "I live in Paris"? [y/N]' in r.stderr
    assert "(remembered [f1] 'My doctor is' -> 'Dr. Krause'" in r.stderr and "/forget f1 to undo)" in r.stderr
    assert "[f1] My doctor is Dr. Krause" in r.stderr
    assert "Paris" not in r.stderr.split("[f1] My doctor is Dr. Krause")[1]       # declined: not written
    assert r.stderr.count("? [y/N]") == 2                                        # no offer for the question


def test_repl_auto_remember_keeps_answering_while_the_write_runs(md, tmp_path, monkeypatch):
    """--auto-remember: no question; the chat answers the next turns while the write is held
    back, and the new file is swapped in between turns, never during a reply."""
    from engram_local.memory import facade
    from engram_local.runtime.session import Session

    gate, calls = threading.Event(), {"n": 0, "busy": False, "reload_busy": [], "opened_by_reply": False}
    real_loader, real_generate, real_reload = facade.load_model_for_memory, Session.generate, Session.reload_overrides

    def slow_loader(model=None):
        gate.wait(120)
        return real_loader(model)

    def generate(self, *a, **k):
        calls["busy"] = True
        try:
            return real_generate(self, *a, **k)
        finally:
            calls["busy"] = False
            calls["n"] += 1
            if calls["n"] == 2 and not gate.is_set():       # the reply after the fact's turn
                calls["opened_by_reply"] = True
                gate.set()

    def reload(self, *a, **k):
        calls["reload_busy"].append(calls["busy"])
        return real_reload(self, *a, **k)

    monkeypatch.setattr(facade, "load_model_for_memory", slow_loader)
    monkeypatch.setattr(Session, "generate", generate)
    monkeypatch.setattr(Session, "reload_overrides", reload)
    eov = tmp_path / "me.eov"
    r = _chat(md, eov, "I'm allergic to penicillin.\nHello world\n/exit\n", "--auto-remember")
    assert r.exit_code == 0, r.stderr
    assert "[y/N]" not in r.stderr
    assert calls["opened_by_reply"]              # a second reply came while the write was held back
    assert "(remembered [f1] \"I'm allergic to\" -> 'penicillin'" in r.stderr and "/forget f1 to undo)" in r.stderr
    assert calls["reload_busy"] and not any(calls["reload_busy"])
    assert eov.exists()


def test_repl_open_statements_add_to_one_fact(md, tmp_path):
    """"I love jazz" then "I also love hiking": one fact "I love" -> "jazz, hiking", and the
    REPL says the second joined the first (forgetting it forgets both)."""
    eov = tmp_path / "me.eov"
    r = _chat(md, eov, "I love jazz lol\nI also love hiking.\n/facts\n/exit\n", "--auto-remember")
    assert r.exit_code == 0, r.stderr
    assert "(remembered [f1] 'I love' -> 'jazz'" in r.stderr
    assert "(remembered [f2] 'I love' -> 'hiking', added to f1's answer" in r.stderr
    assert "/forget f2 forgets both)" in r.stderr
    assert "\n  [f2] I love jazz, hiking" in r.stderr and "\n  [f1]" not in r.stderr      # the /facts list
