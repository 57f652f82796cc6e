"""Guards: where a fact's rows can reach the words of a chat reply before its answer, the model
must still say those words (tiny random model)."""

from engram_local.memory import batching
from engram_local.memory.placement import Placement
from engram_local.memory.writer import FactIn, FitSettings, Fitter
from tests.memory_fixtures import tiny_memory_model


def ids(tok, text):
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def fit(monkeypatch, break_guards: bool):
    em, tok = tiny_memory_model()
    run = batching.Batches.run
    seen = []

    def spy(self, items, sel, values, backward, **kw):
        out = run(self, items, sel, values, backward, **kw)
        if backward:
            seen.append(dict(self.guards_ok))
            if break_guards:
                self.guards_ok = {i: False for i in self.guards_ok}
        return out

    monkeypatch.setattr(batching.Batches, "run", spy)
    # the chat form's rows one position before its trigger (as when the trigger's N-gram is
    # common): they reach the guard that predicts the trigger's word
    before = Placement.trigger_position
    monkeypatch.setattr(Placement, "trigger_position",
                        lambda self, it: before(self, it) - 1 if it.chat else before(self, it))
    lead = ids(tok, "<|im_start|> w90 w91 <|im_end|> <|im_start|>")
    f = Fitter(em, tok, FitSettings(give_up_chat=12))
    res = f.fit([FactIn("x", ["w30 w31 w32"], "w40 w41", contexts=[(lead, "w30 w31 w32")])])
    return res, seen


def test_a_chat_form_whose_guard_breaks_is_not_done(monkeypatch):
    """Each training step reports, per chat form with guards its rows reach, whether they held;
    a form whose guards break has not met its margin (the component runs on until a give-up
    bound), one whose guards hold stops as soon as its answer does."""
    held, seen = fit(monkeypatch, break_guards=False)
    assert seen and all(seen) and all(all(step.values()) for step in seen[-1:])
    broken, _ = fit(monkeypatch, break_guards=True)
    assert broken.steps > held.steps and broken.steps >= 12
