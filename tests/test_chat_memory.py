"""`engram-local eval chat-memory`: the persona reader, the scorer, and a tiny end-to-end run
(random-weight MODEL_DIR with a skill adapter; mechanics only, not recall)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engram_local.cli import main
from engram_local.eval import chat_memory as cm

PERSONA = {
    "persona": "A test person.",
    "statements": ["My doctor is Dr. Krause.", "I live in Paris."],
    "facts": [
        {"statement": "My doctor is Dr. Krause.", "answer": "Dr. Krause", "direct": ["Who is my doctor?"],
         "paraphrased": ["Which doctor do I see?", "Who treats me?"], "expect": ["Krause"]},
        {"statement": "I live in Paris.", "answer": "Paris", "direct": ["Where do I live?"],
         "paraphrased": ["Which city is my home?"], "expect": ["Paris", "France"]},
    ],
    "indirect": [{"question": "In which country do I live?", "expect": ["France"], "needs": [1]}],
    "general": [{"question": "What is 2 plus 2?", "expect": ["4", "four"]}],
}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the reader

def test_load_persona(tmp_path):
    p = cm.load_persona(write(tmp_path / "p.json", PERSONA))
    assert p.name == "p" and p.statements == PERSONA["statements"]
    assert [(f.prompt, f.answer, f.adds) for f in p.facts] == [("My doctor is", "Dr. Krause", False), ("I live in", "Paris", False)]
    kinds = [q.kind for q in p.questions]
    assert kinds == ["direct", "paraphrased", "paraphrased", "direct", "paraphrased", "indirect", "general"]
    assert p.questions[3].expect == ["Paris", "France"] and p.questions[3].fact == 1


def _with(**changes):
    d = json.loads(json.dumps(PERSONA))
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("data, message", [
    ("{not json", "invalid JSON"),
    ([1, 2], "expected a JSON object"),
    (_with(statements=None), 'missing "statements"'),
    (_with(statements=[]), '"statements" is empty'),
    (_with(statements=["Where do I live?"]), "is a question"),
    (_with(facts={"a": 1}), '"facts" must be a list'),
    (_with(facts=[{"direct": ["Q?"], "expect": "Paris"}]), '"facts"[0]."expect" must be a list'),
    (_with(facts=[{"direct": ["Q?"], "expect": []}]), '"facts"[0]."expect" is empty'),
    (_with(facts=[{"direct": "Q?", "expect": ["x"]}]), '"facts"[0]."direct" must be a list'),
    (_with(general=[{"expect": ["4"]}]), '"general"[0] must be an object with a "question"'),
    (_with(indirect=[{"question": "Q?"}]), '"indirect"[0]."expect"'),
])
def test_load_persona_rejects(tmp_path, data, message):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(cm.ChatMemoryError) as e:
        cm.load_persona(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_cli_bad_input_one_line(tmp_path):
    runner = CliRunner()
    missing = tmp_path / "nope.json"
    res = runner.invoke(main, ["eval", "chat-memory", "--personas", str(missing)])
    assert res.exit_code == 1 and res.output.strip() == f"Error: {missing}: persona file not found"
    bad = write(tmp_path / "bad.json", _with(facts=None))
    res = runner.invoke(main, ["eval", "chat-memory", "--personas", str(bad)])
    assert res.exit_code == 1 and res.output.strip() == f'Error: {bad}: missing "facts"'
    good = write(tmp_path / "good.json", PERSONA)
    res = runner.invoke(main, ["eval", "chat-memory", "--personas", str(good), "--conditions", "memory,nope"])
    assert res.exit_code == 2 and "unknown condition 'nope'" in res.output


# --------------------------------------------------------------------------- the scorer

def test_hit():
    assert cm.hit(["Krause"], "Your doctor is Dr. KRAUSE.")
    assert cm.hit(["Portland, Oregon", "Portland"], "You live in portland")
    assert not cm.hit(["Portland, Oregon"], "You live in Portland")
    assert not cm.hit(["1989"], "")
    assert not cm.hit([""], "anything")            # an empty expectation matches nothing


def test_tally_and_prompt():
    answers = [{"kind": "direct", "hit": True}, {"kind": "direct", "hit": False},
               {"kind": "general", "hit": True}]
    t = cm.tally(answers)
    assert t["direct"] == {"hits": 1, "total": 2, "rate": 0.5}
    assert t["paraphrased"] == {"hits": 0, "total": 0, "rate": None}
    assert t["all"] == {"hits": 2, "total": 3, "rate": 2 / 3}
    assert cm.context_prompt(["A is b.", "C is d."], "Q?") == "Things to know about me: A is b. C is d.\n\nQ?"
    assert cm.parse_conditions("memory, prompt,memory") == ("memory", "prompt")
    with pytest.raises(cm.ChatMemoryError):
        cm.parse_conditions(",")


# --------------------------------------------------------------------------- end to end

def test_end_to_end_tiny(tmp_path_factory, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from engram_local.memory import facade as memory
    from tests.runtime_fixtures import shared_model_dir

    real_statement_facts = memory.statement_facts

    md = shared_model_dir(tmp_path_factory, "model", adapter=True)
    # a paraphrase of a fact reaches the file as `remember` writes it
    persona = write(tmp_path / "p00.json", PERSONA)
    monkeypatch.setattr(memory, "statement_facts", lambda s: [
        memory.NewFact(f.prompt, f.answer, paraphrases=[f.prompt.lower()]) for f in real_statement_facts(s)])
    out_json, out_md, work = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "work"
    res = CliRunner().invoke(main, ["eval", "chat-memory", "--personas", str(persona), "-m", str(md),
                                    "--conditions", "memory,prompt", "--json", str(out_json),
                                    "--report", str(out_md), "--work-dir", str(work), "-t", "1", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads(out_json.read_text())
    assert set(r) >= {"command", "model", "settings", "conditions", "personas", "seconds"}
    assert "--personas" in r["command"] and "--conditions memory,prompt" in r["command"]
    assert list(r["conditions"]) == ["memory", "prompt"]
    for c in ("memory", "prompt"):
        agg = r["conditions"][c]
        assert agg["status"] == "ok"
        assert [agg[k]["total"] for k in cm.KINDS + ("all",)] == [2, 3, 1, 1, 7]
        assert 0 <= agg["all"]["hits"] <= 7
    (p,) = r["personas"]
    assert p["name"] == "p00" and p["statements"] == 2 and set(p["conditions"]) == {"memory", "prompt"}
    assert len(p["answers"]["memory"]) == 7 and set(p["answers"]["memory"][0]) == \
        {"kind", "question", "expect", "reply", "hit"}
    assert Path(p["remember"]["memory"]["eov"]).is_file()       # kept in --work-dir
    from engram_local.formats.eov import read_memory_file

    doctor = read_memory_file(p["remember"]["memory"]["eov"]).facts[0]
    assert (doctor.prompt, doctor.paraphrases) == ("My doctor is", ["my doctor is"])
    text = out_md.read_text()
    assert "| memory |" in text and "| p00 | prompt |" in text and r["command"] in text


def test_retrieval_unavailable(tmp_path_factory, tmp_path, monkeypatch):
    """Without the embedding model the retrieval condition reports "unavailable"; the run goes on."""
    pytest.importorskip("llama_cpp")
    from engram_local.runtime import retrieval
    from tests.runtime_fixtures import shared_model_dir

    def missing():
        raise retrieval.RetrievalUnavailable("no embedding model")

    monkeypatch.setattr(retrieval, "minilm_dir", missing)
    md = shared_model_dir(tmp_path_factory, "model", adapter=True)
    persona = write(tmp_path / "p00.json", PERSONA)
    res = CliRunner().invoke(main, ["eval", "chat-memory", "--personas", str(persona), "-m", str(md),
                                    "--conditions", "memory-noskill,retrieval", "-t", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert "| retrieval | unavailable |" in res.output and "| memory-noskill | " in res.output
    assert "condition retrieval unavailable: no embedding model" in res.output    # the notice (stderr)
