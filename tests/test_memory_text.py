"""Turning user input into facts: the statement split rule, JSON-lines and the paper's user files."""

import json
from pathlib import Path

import pytest

from engram_local.memory.facade import (FactInputError, jsonl_facts, prompt_from_sentence, read_statement,
                                       split_statement, statement_facts, user_json_facts)

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


@pytest.mark.parametrize("statement, prompt, answer", [
    ("I drive a Toyota now", "I drive a", "Toyota"),
    ("Btw, I drive a Toyota now.", "I drive a", "Toyota"),
    ("by the way I live in Berlin", "I live in", "Berlin"),
    ("Just so you know, my doctor is Dr. Chen.", "my doctor is", "Dr. Chen"),       # case as typed
    ("For the record: I'm a nurse now.", "I'm a", "nurse"),
    ("FYI I am in Berlin at the moment", "I am in", "Berlin"),
    ("Oh and I'm vegetarian these days", "I'm", "vegetarian"),
    ("PS: my cat is named Figaro", "my cat is named", "Figaro"),
    ("P.S. my cat is named Figaro", "my cat is named", "Figaro"),
    ("Fun fact: I was born in 1990.", "I was born in", "1990"),
    ("Reminder: my dentist is Dr. Ro", "my dentist is", "Dr. Ro"),
    ("Heads up, I moved to Denver", "I moved to", "Denver"),
    ("Also I live in Berlin", "I live in", "Berlin"),
    ("Actually, I drive a Toyota nowadays, btw", "I drive a", "Toyota"),
    ("I live in Paris right now", "I live in", "Paris"),
    ("I now live in Berlin", "I live in", "Berlin"),
    ("I'm currently a nurse", "I'm a", "nurse"),
    ("My doctor is now Dr. Chen", "My doctor is", "Dr. Chen"),
    ("I don't drive a Subaru anymore", "I don't drive a", "Subaru"),
    ("From now on my name is Max", "my name is", "Max"),
    ("Actually I live in Porto now, not Lisbon", "I live in", "Porto"),
    ("I drive a Toyota (not a Subaru)", "I drive a", "Toyota"),
    ("please remember that my locker code is 4471", "my locker code is", "4471"),
    ("Update: I work at Stripe now", "I work at", "Stripe"),
    # not fillers: a word that starts a name, a capitalised last word, an answer that is all "now"
    ("Well water is what I drink in Ohio", "Well water is what I drink in", "Ohio"),
    ("My favourite film is Apocalypse Now", "My favourite film is", "Apocalypse Now"),
    ("Now That's What I Call Music is my favourite album", "Now That's What I Call Music is",
     "my favourite album"),
    ("My time is now", "My time is", "now"),
    ("My motto: now or never", "My motto:", "now or never"),
])
def test_split_statement_drops_words_no_answer_repeats(statement, prompt, answer):
    assert split_statement(statement) == (prompt, answer)


def test_prompt_key_is_the_same_fact_rule():
    from engram_local.text.facts import prompt_key

    assert prompt_key("My Doctor  is") == prompt_key("my doctor is")
    assert prompt_key("I'm a") == prompt_key("I am a") == prompt_key("I’m a")
    assert prompt_key("I now live in") == prompt_key("I live in")
    assert prompt_key("I drive a") != prompt_key("I drove a")


@pytest.mark.parametrize("statement, why", [
    ("Hello world.", "no linking word"),
    ("My doctor is", "no linking word"),
    ("I sing", "no linking word"),
    ("lol", "no linking word"),
    ("😊", "empty statement"),
    ("Who is my doctor?", "is a question"),
    ("   ", "empty statement"),
])
def test_unsplittable_statements(statement, why):
    with pytest.raises(FactInputError, match=why):
        split_statement(statement)


@pytest.mark.parametrize("statement, prompt, answer, adds", [
    # open statements (no linking word): a trailing name or number, else "I" + the verb, else a
    # known verb, else the last word; their answer adds to a fact with the same prompt
    ("I love hiking.", "I love", "hiking", True),
    ("I support Manchester United", "I support", "Manchester United", True),
    ("I speak French and Spanish", "I speak", "French and Spanish", True),
    ("i have two cats, Mochi and Pepper", "i have two cats,", "Mochi and Pepper", True),
    ("My birthday's March 3rd", "My birthday's", "March 3rd", True),
    ("My favourite band has always been Radiohead", "My favourite band has always been", "Radiohead", True),
    ("I take my coffee black", "I take", "my coffee black", True),
    ("I really love hiking", "I love", "hiking", True),
    ("I also absolutely love hiking", "I love", "hiking", True),
    ("I never drink alcohol", "I never drink", "alcohol", True),
    ("I don't eat pork", "I don't eat", "pork", True),
    ("I've got two older brothers", "I've got", "two older brothers", True),
    ("My son plays ice hockey", "My son plays", "ice hockey", True),
    ("My wife adores sushi", "My wife adores", "sushi", True),
    ("btw I love jazz 😊", "I love", "jazz", True),
    # a change word makes an open statement replace: "I drink tea now" after "I drink coffee"
    ("I drink tea now", "I drink", "tea", False),
    ("I switched to tea instead", "I switched to", "tea instead", False),
    # chat noise at the end is no part of the answer; linking-word statements replace as before
    ("my sister's called Anjali lol", "my sister's called", "Anjali", False),
    ("I'm allergic to penicillin!!", "I'm allergic to", "penicillin", False),
    ("my favorite color is green :)", "my favorite color is", "green", False),
    ("I'm a huge fan of the Cubs haha", "I'm a huge fan of the", "Cubs", False),
    ("I live at 8D Baker St", "I live at", "8D Baker St", False),
    ("My locker is 8D", "My locker is", "8D", False),                 # no emoticon "8D"
])
def test_read_statement(statement, prompt, answer, adds):
    assert read_statement(statement) == (prompt, answer, adds)
    assert split_statement(statement) == (prompt, answer)


@pytest.mark.parametrize("statement, facts", [
    ("My name is Sam and I'm a nurse.", [("My name is", "Sam"), ("I'm a", "nurse")]),
    ("My cat is called Figaro. My dog is called Rex.", [("My cat is called", "Figaro"), ("My dog is called", "Rex")]),
    ("btw I love jazz and I support Celtic lol", [("I love", "jazz"), ("I support", "Celtic")]),
    # one fact: no new subject after "and", or a clause that is no fact on its own
    ("I work at Marks and Spencer", [("I work at", "Marks and Spencer")]),
    ("My wife and I live in Oslo", [("My wife and I live in", "Oslo")]),
    ("I'm allergic to penicillin, so no antibiotics like that",
     [("I'm allergic to", "penicillin, so no antibiotics like that")]),
])
def test_a_statement_of_several_facts_writes_each(statement, facts):
    assert [(f.prompt, f.answer) for f in statement_facts(statement)] == facts


def test_a_statement_fact_keeps_the_words_as_typed():
    (f,) = statement_facts("i live in lyon lol")
    assert (f.prompt, f.answer, f.paraphrases) == ("i live in", "lyon", [])


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


# --------------------------------------------------------------------------- token and chat rules

# words the tiny tokenizer knows, so every rendered piece is one token
_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} w100 {{ m['content'] }}"
             "<|im_end|>{% else %} {{ m['content'] }} <|im_end|>{% endif %}{% endfor %}"
             "{% if add_generation_prompt %} w100 {% endif %}")


def _tiny_tok(adds_bos: bool):
    from tokenizers import processors

    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<|im_start|>", "additional_special_tokens": ["<|im_end|>"]})
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)])
    return tok


def _vocab(tok, template=_TEMPLATE):
    import dataclasses

    from engram_local.text.chat import ChatVocab

    return dataclasses.replace(ChatVocab.of(tok), template=template)


def test_token_rules_are_read_from_the_tokenizer():
    from engram_local.text import tokens

    plain, bos = _tiny_tok(False), _tiny_tok(True)
    end, start, im_end = (plain.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert not tokens.adds_bos(plain) and tokens.adds_bos(bos) and not tokens.adds_eos(bos)
    assert tokens.sequence_start(plain) == [] and tokens.sequence_start(bos) == [start]
    assert tokens.document_start_id(plain) == end          # <|endoftext|> (SmolLM2's id 0)
    assert tokens.document_start_id(bos) == start          # BOS where the tokenizer adds one
    assert tokens.end_of_turn(plain) == "<|im_end|>" and tokens.pad_id(plain) == plain.eos_token_id
    assert {end, im_end} <= tokens.eog_ids(plain)
    assert tokens.tokenize(bos, "w30", True) == [start, 30] and tokens.encode(bos, "w30") == [30]
    assert tokens.bos_needed("w30", "<|im_start|>", True)
    assert not tokens.bos_needed("<|im_start|> w30", "<|im_start|>", True)
    assert not tokens.bos_needed("w30", "<|im_start|>", False)


@pytest.mark.parametrize("adds_bos", [False, True])
@pytest.mark.parametrize("writes_bos", [False, True])
def test_render_conversation_bos_once_and_the_reply_masked(adds_bos, writes_bos):
    from engram_local.text.chat import encode_rendered, render_conversation

    tok = _tiny_tok(adds_bos)
    vocab = _vocab(tok, _TEMPLATE if writes_bos else _TEMPLATE.removeprefix("{{ bos_token }}"))
    start, im_end = tok.bos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    user = [{"role": "user", "content": "w30"}]
    prompt, pmask = render_conversation(vocab, user)
    assert prompt == encode_rendered(vocab, vocab.render(user)) and set(pmask) == {0}
    assert prompt == ([start] if (adds_bos or writes_bos) else []) + [30, im_end, 100]   # BOS at most once
    turn = user + [{"role": "assistant", "content": "w40 w41"}]
    ids, mask = render_conversation(vocab, turn)
    assert ids == prompt + [40, 41, im_end] and mask == pmask + [1, 1, 1]
    open_ids, open_mask = render_conversation(vocab, turn, reply_open=True)
    assert open_ids == prompt + [40, 41] and open_mask == pmask + [1, 1]
    more, more_mask = render_conversation(vocab, turn + [{"role": "user", "content": "w50"}])
    assert more[:len(ids)] == ids and more[len(ids):] == [50, im_end, 100] and more_mask[len(ids):] == [0, 0, 0]
