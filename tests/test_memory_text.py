"""Turning user input into facts: the statement split rule, JSON-lines and the paper's user files."""

import json
from pathlib import Path

import pytest

from engram_local.memory.facade import (FactInputError, jsonl_facts, prompt_from_sentence, split_statement,
                                 user_json_facts)

USERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "user-as-engram" / "users"


@pytest.mark.parametrize("statement, prompt, answer", [
    ("My doctor is Dr. Krause.", "My doctor is", "Dr. Krause"),
    ("I live in Portland", "I live in", "Portland"),
    ("Harper Nguyen was born in 1993.", "Harper Nguyen was born in", "1993"),
    ("My usual coffee order is a cortado.", "My usual coffee order is a", "cortado"),
    ("I have a cat named Figaro!", "I have a cat named", "Figaro"),
    ("Home city: Portland.", "Home city:", "Portland"),
    ("My favorite band is The Beatles", "My favorite band is", "The Beatles"),
    ("I'm in PST.", "I'm in", "PST"),
    ("I'm Harper.", "I'm", "Harper"),
    ("  My   shoe size is 12 . ", "My shoe size is", "12"),
    ("My workday starts at 10:00.", "My workday starts at", "10:00"),
])
def test_split_statement(statement, prompt, answer):
    assert split_statement(statement) == (prompt, answer)


@pytest.mark.parametrize("statement, why", [
    ("Hello world.", "no linking word"),
    ("My doctor is", "no linking word"),
    ("Who is my doctor?", "is a question"),
    ("   ", "empty statement"),
])
def test_unsplittable_statements(statement, why):
    with pytest.raises(FactInputError, match=why):
        split_statement(statement)


def test_prompt_from_sentence_is_the_papers_rule():
    assert prompt_from_sentence("I live in Portland.", "Portland") == "I live in"
    assert prompt_from_sentence("Portland is home.", "Portland") is None


def test_jsonl(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "My doctor is", "answer": "Dr. Krause", "id": "doc",
                                "paraphrases": ["My physician is Dr. Krause.", "Who is my doctor? Dr."]})
                    + "\n\n" + json.dumps({"prompt": "Gym days:", "answer": ["Monday", "Friday"]}) + "\n")
    a, b = jsonl_facts(path)
    assert (a.id, a.prompt, a.answer) == ("doc", "My doctor is", "Dr. Krause")
    assert a.paraphrases == ["My physician is", "Who is my doctor? Dr."]
    assert (b.id, b.answer) == (None, "Monday, Friday")
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(FactInputError, match=r"f.jsonl:1: each line needs"):
        jsonl_facts(path)
    path.write_text("{oops\n")
    with pytest.raises(FactInputError, match=r"f.jsonl:1: not JSON"):
        jsonl_facts(path)


def test_user_json_rule(tmp_path):
    user = {"uid": "u", "facts": [
        {"key": "city", "answer": "Portland", "paraphrases": ["Harper lives in Portland.", "I live in Portland."]},
        {"key": "workdays", "answer": ["Monday", "Friday"], "paraphrases": ["I work Monday, Friday."]},
        {"key": "shoe_size", "answer": 12, "paraphrases": ["Size twelve."]},
    ]}
    path = tmp_path / "u.json"
    path.write_text(json.dumps(user))
    facts = user_json_facts(path)
    assert [(f.id, f.prompt, f.answer) for f in facts] == [
        ("city", "Harper lives in", "Portland"), ("workdays", "I work", "Monday, Friday"),
        ("shoe_size", "My shoe size is", "12")]
    assert user_json_facts(path, paraphrases=True)[0].paraphrases == ["I live in"]
    path.write_text("[]")
    with pytest.raises(FactInputError, match="not a user file"):
        user_json_facts(path)


@pytest.mark.skipif(not (USERS / "u000.json").is_file(), reason="paper data not present")
def test_user_json_matches_the_checks_rule():
    facts = user_json_facts(USERS / "u000.json")
    assert len(facts) == 34
    doctor = next(f for f in facts if f.id == "doctor")
    assert (doctor.prompt, doctor.answer) == ("My primary doctor is", "Dr. Krause")
    commute = next(f for f in facts if f.id == "commute_min")
    assert commute.prompt == "My commute min is"      # no paraphrase ends with "20": fallback
