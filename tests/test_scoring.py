"""The head-to-head scorers (engram_local.eval.scoring) and the pure parts of the harness."""

from __future__ import annotations

import pytest

from engram_local.eval import scoring
from engram_local.eval.head_to_head import HeadToHeadError, aggregate, parse_conditions


def byte_tokenize(text: str) -> list[int]:
    """A stand-in tokenizer: " word" is one token (its hash), so first tokens are words."""
    out, word = [], ""
    for ch in text:
        if ch == " " and word.strip():
            out.append(hash(word))
            word = ""
        word += ch
    if word:
        out.append(hash(word))
    return out


# --------------------------------------------------------------------------- containment

@pytest.mark.parametrize("gold,text,hit", [
    ("Boston", " She lives in Boston.", True),
    ("boston", " BOSTON!", True),                       # case-insensitive both ways
    ("Dr. Krause", " dr. krause is my doctor", True),
    ("44", " I am 44 years old", True),
    ("44", " I am 4 4", False),                         # a substring, not a token match
    ("4", " I am 44", True),                            # the paper's rule: plain containment
    ("Maya Weber", " Maya", False),
    (1982, " born in 1982", True),                      # non-string gold
    ("No", "", False),
])
def test_containment_rule(gold, text, hit):
    assert scoring.contains(gold, text) is hit


# --------------------------------------------------------------------------- first-token rule

def test_gold_first_token_is_space_plus_first_word():
    seen = []

    def tok(text):
        seen.append(text)
        return byte_tokenize(text)

    assert scoring.gold_first_tokens(tok, "Dr. Krause") == [byte_tokenize(" Dr.")[0]]
    assert " Dr." in seen                               # only the first word, with the leading space
    assert scoring.gold_first_tokens(tok, "Monday, Tuesday") == [byte_tokenize(" Monday,")[0]]
    assert scoring.gold_first_tokens(tok, 44) == [byte_tokenize(" 44")[0]]


def test_gold_first_token_follows_the_prompt_spacing():
    seen = []

    def tok(text):
        seen.append(text)
        return [len(text)]

    scoring.gold_first_tokens(tok, "Boston", "I live in")
    assert " Boston" in seen
    seen.clear()
    scoring.gold_first_tokens(tok, "2200", "My rent is $")  # no space after an opening character
    assert seen == ["2200"]
    with pytest.raises(ValueError):
        scoring.gold_first_tokens(tok, "   ")


def digit_tokenize(text: str) -> list[int]:
    """SmolLM2-like: a space before a digit (or alone) is a token of its own, digits one token
    each, " word" one token."""
    out, i = [], 0
    while i < len(text):
        if text[i] == " " and (i + 1 == len(text) or text[i + 1].isdigit()):
            out.append(0)
            i += 1
        elif text[i].isdigit():
            out.append(100 + int(text[i]))
            i += 1
        else:
            j = i + 1
            while j < len(text) and text[j] not in " 0123456789":
                j += 1
            out.append(hash(text[i:j]) % 10**6 + 1000)
            i = j
    return out


def test_first_token_rule_with_a_lone_space_token():
    """" 48" -> [" ", "4", "8"]: the gold is the space and the first digit, so " 2026" is no hit."""
    assert digit_tokenize(" 48") == [0, 104, 108]
    gold = scoring.gold_first_tokens(digit_tokenize, "48")
    assert gold == [0, 104]
    assert scoring.first_token_hit(digit_tokenize(" 48 years"), gold)
    assert scoring.first_token_hit(digit_tokenize(" 4"), gold)       # the first piece of the word
    assert not scoring.first_token_hit(digit_tokenize(" 2026"), gold)
    assert not scoring.first_token_hit(digit_tokenize(" "), gold)
    # a word token that carries its space: one token, as in the paper
    assert scoring.gold_first_tokens(digit_tokenize, "Boston") == digit_tokenize(" Boston")


def test_first_token_hit():
    assert scoring.first_token_hit([7, 8, 9], 7)
    assert scoring.first_token_hit([7, 8, 9], [7])
    assert scoring.first_token_hit([7, 8, 9], [7, 8])
    assert not scoring.first_token_hit([8, 7], 7)      # only the first generated token counts
    assert not scoring.first_token_hit([], 7)          # nothing generated (end of turn at once)
    assert not scoring.first_token_hit([7], [7, 8])


def test_first_token_rule_with_a_real_tokenizer():
    """With a BPE tokenizer the gold is the first piece of " " + first word."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["I live in Boston. Krause Krause Dr."] * 10,
                           trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    gold = scoring.gold_first_tokens(ids, "Boston Massachusetts")
    assert gold == ids(" Boston")[:1]
    assert scoring.first_token_hit(ids(" Boston, MA"), gold)
    assert not scoring.first_token_hit(ids(" Krause"), gold)
    # the gold is the token the model writes after the prompt
    prompt = ids("I live in")
    assert ids("I live in Boston")[len(prompt):len(prompt) + 1] == scoring.gold_first_tokens(ids, "Boston", "I live in")


# --------------------------------------------------------------------------- probes and texts

USER = {
    "facts": [],
    "direct_qa": [{"key": "name", "question": "What is my name?", "answer": "Maya Weber"},
                  {"key": "birth_year", "question": "What year was I born?", "answer": 1982}],
    "indirect_qa": [{"question": f"Question {i}?", "answer": str(i), "required_fact_keys": []} for i in range(25)],
}


def test_indirect_probes_first_20_in_file_order():
    probes = scoring.indirect_probes(USER)
    assert len(probes) == 20
    assert probes[0] == ("Q: Question 0?\nA:", "Question 0?", "0")
    assert [g for _, _, g in probes] == [str(i) for i in range(20)]
    assert len(scoring.indirect_probes(USER, 3)) == 3
    assert scoring.indirect_probes({}) == []


def test_chat_probes():
    assert scoring.chat_probes(USER) == [("What is my name?", "Maya Weber"), ("What year was I born?", "1982")]


def test_fact_sentence_and_context_block():
    assert scoring.fact_sentence("My name is", "Maya Weber") == "My name is Maya Weber."
    assert scoring.fact_sentence("My rent is $", "2200") == "My rent is $2200."
    block = scoring.context_block(["My name is Maya.", "I live in Boston."])
    assert block == "Facts about me: My name is Maya. I live in Boston.\n\n"
    assert scoring.context_block([]) == ""


def test_rates_means_and_users_worse():
    assert scoring.rate([True, False, True, True]) == 0.75
    assert scoring.rate([]) is None
    assert scoring.mean([1.0, None, 3.0]) == 2.0
    assert scoring.mean([None]) is None
    base = {"u0": 0.2, "u1": 0.5, "u2": 0.3}
    assert scoring.users_worse({"u0": 0.1, "u1": 0.5, "u2": 0.4}, base) == 1   # strictly below only
    assert scoring.users_worse({"u9": 0.1}, base) is None


# --------------------------------------------------------------------------- harness pieces

def test_parse_conditions():
    assert parse_conditions("A,C,F") == ("A", "C", "F")
    assert parse_conditions("f, a ,c") == ("A", "C", "F")      # any order / case, A-H order out
    assert parse_conditions("ACF") == ("A", "C", "F")
    assert parse_conditions(["H", "G"]) == ("G", "H")
    for bad in ("A,X", "", "Z"):
        with pytest.raises(HeadToHeadError, match="A,B,C,D,E,F,G,H"):
            parse_conditions(bad)


def test_aggregate_means_and_users_worse_than_base():
    def m(any_, ctx=0.0):
        return {"direct_top1": 1.0, "direct_full": 0.5, "chat_recall": 0.5, "indirect_any": any_,
                "indirect_top1": 0.0, "bpb": 1.0, "delta_bpb": 0.0, "context_tokens": ctx,
                "ms_per_query": 10.0, "bytes_stored": 100, "prep_s": 1.0, "eval_s": 2.0}

    results = [{"uid": "u0", "conditions": {"A": m(0.2), "G": m(0.5, 300.0)}},
               {"uid": "u1", "conditions": {"A": m(0.4), "G": m(0.3, 100.0)}}]
    agg = aggregate(results, ("A", "G"))
    assert agg["A"]["indirect_any"] == pytest.approx(0.3)
    assert agg["G"]["context_tokens"] == pytest.approx(200.0)
    assert agg["A"]["users_worse_than_A"] == 0
    assert agg["G"]["users_worse_than_A"] == 1
    assert agg["G"]["n_users"] == 2
    assert aggregate(results, ("G",))["G"]["users_worse_than_A"] == 1
    no_base = [{"uid": "u0", "conditions": {"G": m(0.5)}}]
    assert aggregate(no_base, ("G",))["G"]["users_worse_than_A"] is None
