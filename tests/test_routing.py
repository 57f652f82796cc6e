"""Reply openings (runtime.routing): the scoring against a numpy reference, the choice on a scripted
backend, the openings the writer fits, a Session reply that opens with given tokens (tiny model,
both backends) and, slow, the real default model routing a paraphrased question to its fact."""

from __future__ import annotations

import numpy as np
import pytest

from engram_local.runtime import loader, routing
from tests.runtime_fixtures import shared_model_dir

# Resolved at collection, before any fixture points ENGRAM_LOCAL_HOME elsewhere.
DEFAULT = loader.default_model_dir()


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_mean_logprob_matches_a_log_softmax_reference():
    rng = np.random.default_rng(0)
    first, rows = rng.normal(size=11).astype(np.float32) * 3, rng.normal(size=(4, 11)).astype(np.float32) * 3
    tokens = [3, 7, 0, 10]
    want = np.mean([_log_softmax(first)[3], _log_softmax(rows[0])[7], _log_softmax(rows[1])[0],
                    _log_softmax(rows[2])[10]])
    assert routing.mean_logprob(first, rows, tokens) == pytest.approx(want, abs=1e-9)


class ScriptedBackend:
    """One sequence whose next-token logits put `boost` on the token `(last token + 1) % V` and,
    after token 5, on token 6 (so the continuation [5, 6] is the likeliest); `rollback` False:
    truncating anywhere but the end starts over, as a backend that cannot roll back."""

    def __init__(self, vocab=8, boost=4.0, rollback=True):
        self.V, self.boost, self.rollback = vocab, boost, rollback
        self.tokens, self.n_ctx, self.evals = [], 64, 0

    @property
    def n_past(self):
        return len(self.tokens)

    def _logits(self, last):
        row = np.zeros(self.V, np.float32)
        row[6 if last == 5 else (last + 1) % self.V] = self.boost
        return row

    def eval(self, tokens, all_logits=False):
        self.evals += 1
        rows = []
        for t in tokens:
            self.tokens.append(int(t))
            rows.append(self._logits(int(t)))
        return np.stack(rows) if all_logits else rows[-1]

    def truncate(self, n):
        if n < len(self.tokens) and not self.rollback:
            self.tokens = []
        else:
            del self.tokens[n:]


def _opening(fid, tokens):
    return routing.Opening(fid, f"t{tokens}", tuple(tokens))


@pytest.mark.parametrize("rollback", [True, False])
def test_best_opening_takes_the_likeliest_and_leaves_the_prompt(rollback):
    be = ScriptedBackend(rollback=rollback)
    prompt = [1, 2, 4]                      # after 4 comes 5, after 5 comes 6
    cands = [_opening("f1", [3, 4]), _opening("f2", [5, 6]), _opening("f3", [5, 1])]
    got = routing.best_opening(be, prompt, cands, min_score=-1.0)
    assert got is not None and got.opening.fact_id == "f2"
    lp = _log_softmax(be._logits(4))[5]
    assert got.score == pytest.approx(lp, abs=1e-6)        # both tokens are the boosted one
    assert be.tokens == prompt
    # nothing likely enough: no opening, the prompt still held
    assert routing.best_opening(be, prompt, cands, min_score=lp + 0.01) is None
    assert be.tokens == prompt
    assert routing.best_opening(be, prompt, []) is None


def test_best_opening_reuses_what_the_backend_holds():
    be = ScriptedBackend()
    be.eval([1, 2, 4, 5, 6])                # an earlier turn: the prompt plus a reply
    n = be.evals
    routing.best_opening(be, [1, 2, 4], [_opening("f", [5, 6])], min_score=-10)
    assert be.tokens == [1, 2, 4] and be.evals == n + 2     # the last prompt token, one candidate


def test_openings_are_the_forms_the_writer_fits():
    from types import SimpleNamespace

    from engram_local.text.questions import echo_prefixes

    facts = [SimpleNamespace(id="f1", prompt="I have a golden retriever named", answer="Biscuit"),
             SimpleNamespace(id="f2", prompt="My doctor is", answer="Dr. Krause"),
             SimpleNamespace(id="f3", prompt="My favorite hobby is", answer="bouldering"),
             SimpleNamespace(id="f4", prompt="I also enjoy", answer="pottery")]
    encode = lambda text: [ord(c) for c in text]            # noqa: E731 - a stand-in tokenizer
    got = routing.openings(facts, encode)
    want = [(fid, e) for fid, forms in echo_prefixes(facts, encode).items() for _, e in forms]
    assert [(o.fact_id, o.text) for o in got] == want
    assert all(o.tokens == tuple(encode(o.text)) for o in got)
    texts = [o.text for o in got]
    assert "My golden retriever's name is" in texts and "My doctor is" in texts
    assert "My doctor's name is" not in texts               # forks from "My doctor is" (never fitted)


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_a_reply_opens_with_the_given_tokens(tmp_path_factory, backend):
    if backend == "llama.cpp":
        pytest.importorskip("llama_cpp")
    from engram_local.runtime.sampling import Sampler
    from engram_local.runtime.session import Session

    md = shared_model_dir(tmp_path_factory)
    s = Session(md, backend=backend, n_ctx=64, n_threads=1)
    try:
        prompt = s.tokenize("a b c")
        opening = s.tokenize(" d e")
        plain = s.generate(prompt + opening, 6, Sampler(temp=0))
        s.reset()
        seen = []
        got = s.generate(prompt, 6 + len(opening), Sampler(temp=0), on_text=seen.append, opening=opening)
        assert got.tokens == opening + plain.tokens
        assert "".join(seen) == got.text and got.text.startswith(s.backend.detokenize(opening))
        assert s.chat_opening(prompt) is None                # no memory: nothing to route to
        assert s.chat_opening(prompt, "What is my dog's name?") is None
        assert "encoder" not in s.__dict__                   # ... and no sentence encoder loaded
    finally:
        s.close()


@pytest.mark.slow
def test_default_model_routes_a_paraphrase_to_its_fact(tmp_path):
    """The real default model: a fact said one way, asked another; a general question is left alone."""
    pytest.importorskip("llama_cpp")
    default = DEFAULT
    if not (default / "engram.gguf").exists():
        pytest.skip(f"the default model is not built at {default}")
    from engram_local.memory import facade as memory
    from engram_local.runtime.sampling import Sampler
    from engram_local.runtime.session import Session

    em, tok, fp = memory.load_model_for_memory(default)
    eov = tmp_path / "me.eov"
    memory.remember(eov, [memory.NewFact(prompt="My manager is", answer="Ingrid Holm"),
                          memory.NewFact(prompt="I drive a", answer="red Volvo")], em, tok, fp)
    s = Session(default, overrides=[eov], backend="llama.cpp", n_ctx=256, n_threads=2)
    try:
        # unrouted, the echo adapter answers in the question's words ("I own a Honda Civic.")
        ids = s.tokenize("What vehicle do I own?", chat=True)
        route = s.chat_opening(ids)
        assert route is not None and route.opening.fact_id == "f2", route
        reply = s.generate(ids, 16, Sampler(temp=0), opening=route.opening.tokens).text
        assert "Volvo" in reply, reply
        assert s.chat_opening(s.tokenize("What is the capital of France?", chat=True)) is None
        # with the user's turn, relevance (the sentence encoder, where installed) weighs the facts
        # ... and small talk in the first person is left alone (routing.RELEVANCE_MIN)
        for q, fid in (("Which car is mine?", "f2"), ("Who is my boss?", "f1"), ("What is the capital of France?", None),
                       ("I'm bored, tell me a joke.", None)):
            route = s.chat_opening(s.tokenize(q, chat=True), q)
            assert (route.opening.fact_id if route is not None else None) == fid, (q, route)
    finally:
        s.close()
    off = Session(default, overrides=[eov], backend="llama.cpp", n_ctx=256, n_threads=2, route=False)
    try:
        assert off.chat_opening(off.tokenize("What vehicle do I own?", chat=True)) is None
    finally:
        off.close()


def test_many_openings_are_shortlisted_by_their_first_two_tokens():
    be = ScriptedBackend(vocab=16)
    prompt = [1, 2, 4]
    cands = [_opening(f"g{i}", [i, (i + 3) % 16, 9]) for i in range(10)]   # none likely at the 2nd
    cands.insert(4, _opening("right", [5, 6, 7]))
    got = routing.best_opening(be, prompt, cands, min_score=-10, keep=3)
    assert got is not None and got.opening.fact_id == "right"
    # the prompt's last token, one call per distinct first token (10: "right" shares 5), three whole
    assert be.evals == 1 + 10 + 3 and be.tokens == prompt


def test_gate_is_the_mean_of_likelihood_and_lift():
    assert routing.gate(-2.0, -5.0) == pytest.approx((-2.0 + 3.0) / 2)
    assert routing.gate(-1.0, -1.0) >= -1.0                 # never below the likelihood
    o = _opening("f", [1])
    assert routing.Route(o, -2.0).gate == -2.0             # no prior taken: the likelihood alone
    assert routing.Route(o, -2.0, -5.0).gate == routing.gate(-2.0, -5.0)


def test_an_opening_far_likelier_than_its_prior_is_said():
    """Not likely enough on its own, but after neutral turns much less likely still: said; as likely
    after a neutral turn as here: not said. The prior is taken once per opening (Openings.priors)."""
    be = ScriptedBackend(boost=2.0)
    prompt = [1, 2, 4]                      # after 4 comes 5, after 5 comes 6
    lp = _log_softmax(be._logits(4))[5]                     # -0.67: each boosted token
    other = _log_softmax(be._logits(4))[0]                  # -2.67: any other
    cands = routing.Openings([_opening("f", [5, 6])])
    assert routing.best_opening(be, prompt, cands, min_score=-0.3) is None         # no neutral turns
    got = routing.best_opening(be, prompt, cands, neutral=[[1, 2, 7]], min_score=-0.3)
    assert got is not None and got.opening.fact_id == "f" and be.tokens == prompt
    assert got.score == pytest.approx(lp) and got.prior == pytest.approx((other + lp) / 2)
    assert cands.priors == {cands[0]: pytest.approx((other + lp) / 2)}
    n = be.evals
    assert routing.best_opening(be, prompt, cands, neutral=[[1, 2, 7]], min_score=-0.3) is not None
    assert be.evals == n + 2 and be.tokens == prompt        # the last prompt token, the opening
    # a neutral turn after which it is just as likely (the prompt itself): no lift, not said
    fresh = routing.Openings([_opening("f", [5, 6])])
    assert routing.best_opening(be, prompt, fresh, neutral=[[3, 2, 4], [1, 2, 7]], min_score=-0.3) is None
    assert fresh.priors[fresh[0]] == pytest.approx(lp) and be.tokens == prompt


def test_relevance_picks_the_fact_and_moves_the_gate():
    """With relevance only the most relevant facts' openings are scored; a likelier opening of a
    less relevant fact loses to the relevant one, and the gate gains (or loses)
    RELEVANCE_WEIGHT x (relevance - RELEVANCE_FLOOR)."""
    be = ScriptedBackend(vocab=16)
    prompt = [1, 2, 4]                      # [5, 6] is the likeliest continuation
    others = [_opening(f"o{i}", [7, i]) for i in range(routing.RELEVANT_FACTS)]
    cands = routing.Openings([_opening("likely", [5, 6]), _opening("asked", [3, 9])] + others)
    rel = {"likely": 0.0, "asked": 0.90, **{o.fact_id: -0.1 - 0.1 * i for i, o in enumerate(others)}}
    got = routing.best_opening(be, prompt, cands, min_score=-100, relevance=rel)
    assert got is not None and got.opening.fact_id == "asked" and got.relevance == pytest.approx(0.90)
    assert be.tokens == prompt
    assert got.gate == pytest.approx(got.score + routing.RELEVANCE_WEIGHT * (0.90 - routing.RELEVANCE_FLOOR))
    # only the RELEVANT_FACTS most relevant facts' openings are scored: the last other never is
    near = routing.relevant(cands, rel)
    assert len(near) == routing.RELEVANT_FACTS and others[-1] not in near
    n = be.evals
    routing.best_opening(be, prompt, cands, min_score=-100, relevance=rel)
    assert be.evals == n + 1 + len(near)    # the last prompt token, then each opening
    # equally relevant: the likelier opening; a turn close to no fact holds back a likely opening
    even = routing.best_opening(be, prompt, cands, min_score=-100, relevance={"likely": 0.5, "asked": 0.5})
    assert even.opening.fact_id == "likely"
    alone = routing.best_opening(be, prompt, cands, min_score=-100)
    far = {"likely": 0.0, "asked": -0.1}
    assert routing.best_opening(be, prompt, cands, min_score=alone.score, relevance=far) is None
    assert routing.best_opening(be, prompt, cands, min_score=alone.score) is not None


def test_nothing_is_said_for_a_fact_below_the_relevance_floor():
    """However likely its opening, a fact less relevant to the turn than RELEVANCE_MIN is not
    said (small talk), and no prior is taken for it."""
    be = ScriptedBackend(vocab=16)
    prompt = [1, 2, 4]
    cands = routing.Openings([_opening("likely", [5, 6])])
    low = {"likely": routing.RELEVANCE_MIN - 0.01}
    assert routing.best_opening(be, prompt, cands, neutral=[[1, 2, 7]], min_score=-100, relevance=low) is None
    assert cands.priors == {} and be.tokens == prompt
    ok = {"likely": routing.RELEVANCE_MIN}
    assert routing.best_opening(be, prompt, cands, min_score=-100, relevance=ok).opening.fact_id == "likely"
    assert routing.best_opening(be, prompt, cands, min_score=-100, relevance=low, min_relevance=0.0) is not None


class WordEncoder:
    """embed(texts): unit bag-of-words vectors over a fixed vocabulary (a stand-in sentence encoder)."""

    WORDS = ["dog", "biscuit", "car", "volvo", "pet", "drive"]

    def __init__(self):
        self.calls = []

    def embed(self, texts):
        self.calls.append(list(texts))
        v = np.array([[t.lower().count(w) for w in self.WORDS] for t in texts], np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_relevance_compares_the_turn_with_each_fact_and_keeps_their_vectors():
    class Fact:
        def __init__(self, id, prompt, answer):
            self.id, self.prompt, self.answer = id, prompt, answer

    facts = [Fact("f1", "My dog is called", "Biscuit"), Fact("f2", "I drive a", "red Volvo")]
    found = routing.openings(facts, lambda s: [len(w) for w in s.split()])
    assert found.facts == {"f1": "My dog is called Biscuit", "f2": "I drive a red Volvo"}
    enc = WordEncoder()
    r = routing.relevance(found, enc, "What car do I drive?")
    assert set(r) == {"f1", "f2"} and r["f2"] > r["f1"]
    routing.relevance(found, enc, "Who is my dog?")
    assert enc.calls == [["My dog is called Biscuit", "I drive a red Volvo"], ["What car do I drive?"],
                         ["Who is my dog?"]]                      # the facts embedded once
    assert routing.relevance(found, enc, "  ") == {}


def test_a_turn_about_the_user_says_so_in_the_first_person():
    for turn in ("What's my go-to hot drink?", "Remind me what I drive", "Which one is mine?",
                 "I\u2019m curious: what do I do for work?", "who am i?", "Tell me about MYSELF"):
        assert routing.about_user(turn), turn
    for turn in ("How do bees make honey?", "Who wrote Romeo and Juliet?", "What is 12 plus 15?",
                 "Summarise the Iliad", "Is mimicry common?", "Imagine a city"):
        assert not routing.about_user(turn), turn


def test_turn_routing_lowers_the_gate_for_a_turn_about_the_user():
    """With relevance, a turn about the user is routed at MIN_GATE_ABOUT_USER and any other at
    MIN_GATE; without an encoder (or a turn) routing is by likelihood alone at MIN_GATE."""
    class Fact:
        def __init__(self, id, prompt, answer):
            self.id, self.prompt, self.answer = id, prompt, answer

    found = routing.openings([Fact("f1", "My dog is called", "Biscuit"), Fact("f2", "I drive a", "red Volvo")],
                             lambda s: [len(w) for w in s.split()])
    enc = WordEncoder()
    mine = routing.turn_routing(found, lambda: enc, "What car do I drive?")
    assert mine["min_score"] == routing.MIN_GATE_ABOUT_USER < routing.MIN_GATE
    assert mine["relevance"]["f2"] > mine["relevance"]["f1"]
    other = routing.turn_routing(found, lambda: enc, "Which car is fastest?")
    assert other["min_score"] == routing.MIN_GATE and set(other["relevance"]) == {"f1", "f2"}
    for enc_, turn in ((None, "What car do I drive?"), (enc, None), (enc, "")):
        assert routing.turn_routing(found, lambda: enc_, turn) == {"relevance": None, "min_score": routing.MIN_GATE}

    def never():
        raise AssertionError("the encoder is loaded only for openings and a turn")

    assert routing.turn_routing(routing.Openings(), never, "my car?") == {"relevance": None,
                                                                         "min_score": routing.MIN_GATE}
    assert routing.turn_routing(found, never, None)["relevance"] is None


def test_a_fact_is_compared_in_the_first_person():
    """"Casey was born in 1986" is about "my sibling" when another fact says so: a question asks
    "my sibling", and the sentence encoder cannot know who Casey is."""
    class Fact:
        def __init__(self, id, prompt, answer):
            self.id, self.prompt, self.answer = id, prompt, answer

    facts = [Fact("f1", "My sibling is", "Casey"), Fact("f2", "Casey was born in", "1986")]
    assert [routing.fact_text(f, facts) for f in facts] == ["My sibling is Casey", "My sibling was born in 1986"]
    assert routing.openings(facts, lambda s: [len(w) for w in s.split()]).facts["f2"] == "My sibling was born in 1986"
