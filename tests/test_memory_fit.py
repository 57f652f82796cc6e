"""Writing facts on a tiny random model: recall, exact-key locality, composition, forget, errors."""

import numpy as np
import pytest
import torch

from engram_local.memory import facade as memory
from engram_local.memory.facade import NewFact, open_overrides
from engram_local.native import OverrideSet
from engram_local.formats.eov import MemoryFileError, read_memory_file
from engram_local.memory.writer import FactIn, FitSettings, Fitter
from tests.memory_fixtures import assert_refused_unchanged, greedy_text, logits, tiny_memory_model, write

FACTS = [NewFact("my name is", "krause", id="name"),
         NewFact("the doctor is", "dr krause w41", id="doctor"),
         NewFact("w30 w31 w32", "w40 w41 w42 w43", id="w"),
         NewFact("w50 w31 w32", "w60 w41 w42 w44", id="w2")]   # same trailing 2-gram as "w"


@pytest.fixture(scope="module")
def model():
    em, tok = tiny_memory_model()
    return em, tok, memory.model_fingerprint(em)


def recall(model, files, fact):
    em, tok, fp = model
    stacks = open_overrides(files, fp)
    n = len(tok(" " + fact.answer, add_special_tokens=False)["input_ids"])
    return greedy_text(em, tok, fact.prompt, n, stacks).strip() == fact.answer


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "u.eov"
    report = write(path, FACTS, model)
    return path, report


def test_suffix_forward_equals_full_forward_through_the_kernel(model):
    """The fitter's cached-prefix forward is the model's forward with the rows in the kernel."""
    em, tok, _ = model
    f = Fitter(em, tok, FitSettings())
    items = f.items_for([FactIn("a", ["w30 w31 w32 my name is"], "krause dr w40"),
                         FactIn("b", ["w33 the doctor is"], "dr krause w41 w42")])
    f.model.capture(items)
    entries = {}
    for it in items[:2]:
        for t in it.tpos[1:]:
            for c in f.hi_cols[:3]:
                entries.setdefault((int(it.rows[t, c]), int(it.keys[t, c])), len(entries))
    vals = np.random.default_rng(0).standard_normal((len(entries), em.cfg.head_dim)).astype(np.float32) * 5
    f.batches.restage(items, entries)
    got = f.model.forward(f.batches.batch(items, list(range(len(items)))), torch.from_numpy(vals))
    ov = OverrideSet.build(np.array([k[0] for k in entries]), vals, np.array([k[1] for k in entries]))
    k = 0
    for it in items:
        want = logits(em, it.ids, {em.cfg.write_layer: [ov]})[it.tpos]
        assert torch.allclose(got[k:k + len(it.tpos)], want, atol=1e-4), it.ids
        k += len(it.tpos)
    assert items[0].start > 0          # a real prefix was cached


def test_remember_recalls_every_whole_answer(model, written):
    path, report = written
    assert report.new_ids == ["name", "doctor", "w", "w2"] and all(report.recalled.values())
    for fact in FACTS:
        assert recall(model, [path], fact), fact
    mf = read_memory_file(path, model[2])
    assert [f.id for f in mf.facts] == ["name", "doctor", "w", "w2"]
    assert set(mf.layers) == {model[0].cfg.write_layer}
    assert all(k >= 0 for k in mf.layers[model[0].cfg.write_layer].keys)   # exact keys only
    assert mf.layers[model[0].cfg.write_layer].values.dtype == np.float16


def written_keys(mf, layer):
    s = mf.layers[layer]
    return set(zip(s.rows.tolist(), s.keys.tolist()))


def test_locality_is_bit_exact_without_a_written_ngram(model, written):
    em, tok, fp = model
    path, _ = written
    stacks = open_overrides([path], fp)
    wl = em.cfg.write_layer
    keys = written_keys(read_memory_file(path, fp), wl)
    rows = {r for r, _ in keys}
    rng = np.random.default_rng(3)
    clean = collided = 0
    for _ in range(60):
        ids = rng.integers(3, 120, size=24).tolist()
        r, k = (a[0].numpy() for a in em.addresses(torch.tensor([ids]))[wl])
        lookups = set(zip(r.reshape(-1).tolist(), k.reshape(-1).tolist()))
        if lookups & keys:
            continue
        clean += 1
        collided += bool(set(r.reshape(-1).tolist()) & rows)   # same row, other N-gram
        assert torch.equal(logits(em, ids, stacks), logits(em, ids)), ids
    assert clean >= 30 and collided >= 5      # hash collisions happen and change nothing


def test_positions_before_the_first_written_lookup_are_bit_exact(model, written):
    em, tok, fp = model
    path, _ = written
    stacks = open_overrides([path], fp)
    wl = em.cfg.write_layer
    keys = written_keys(read_memory_file(path, fp), wl)
    ids = [5, 7, 9, 60, 61] + tok("the doctor is dr krause w41 w70 w71", add_special_tokens=False)["input_ids"]
    r, k = (a[0].numpy() for a in em.addresses(torch.tensor([ids]))[wl])
    hit = [t for t in range(len(ids)) if set(zip(r[t].tolist(), k[t].tolist())) & keys]
    assert hit and hit[0] > 3
    with_file, without = logits(em, ids, stacks), logits(em, ids)
    assert torch.equal(with_file[:hit[0]], without[:hit[0]])
    assert not torch.equal(with_file[hit[0]], without[hit[0]])


def test_files_for_disjoint_facts_stack_without_loss(model, tmp_path):
    a, b = tmp_path / "a.eov", tmp_path / "b.eov"
    write(a, FACTS[:2], model)
    write(b, FACTS[2:], model)
    for fact in FACTS:
        assert recall(model, [a, b], fact) and recall(model, [b, a], fact), fact


def test_later_file_wins_on_a_shared_row(model, tmp_path):
    from engram_local.native import Gatherer, Table

    em, tok, fp = model
    a, b = tmp_path / "a.eov", tmp_path / "b.eov"
    write(a, [NewFact("w70 w71 w72", "w80 w81", id="x")], model)
    write(b, [NewFact("w70 w71 w72", "w90 w91", id="x")], model)
    wl = em.cfg.write_layer
    fa, fb = read_memory_file(a, fp), read_memory_file(b, fp)
    va = dict(zip(fa.entries(), fa.values()))
    vb = dict(zip(fb.entries(), fb.values()))
    shared = sorted(set(va) & set(vb))
    assert shared                                   # the trigger's rows
    table = em.engram[str(wl)].table.detach().numpy()
    rows = np.array([r for _, r, _ in shared])
    keys = np.array([k for _, _, k in shared])
    for stack, want in (([fa, fb], vb), ([fb, fa], va)):
        g = Gatherer(Table(table, 0, *table.shape), [f.layers[wl] for f in stack])
        got = g.gather(rows, keys)
        assert np.array_equal(got, np.stack([want[e] for e in shared]))
    # and the model follows the file stacked last
    stacks = open_overrides([a, b], fp)
    ids = tok("w70 w71 w72", add_special_tokens=False)["input_ids"]
    only_b = open_overrides([b], fp)
    if set(va) <= set(vb):
        assert torch.equal(logits(em, ids, stacks)[-1], logits(em, ids, only_b)[-1])


def test_adding_facts_keeps_earlier_recall_and_rows(model, tmp_path):
    path = tmp_path / "u.eov"
    write(path, FACTS[:2], model)
    before = read_memory_file(path, model[2])
    old = {k: v for k, v in zip(before.entries(), before.values())}
    report = write(path, [NewFact("w50 w51 w52", "w53 w54", id="new")], model)
    assert report.new_ids == ["new"]
    after = read_memory_file(path, model[2])
    assert [f.id for f in after.facts] == ["name", "doctor", "new"]
    for fact in FACTS[:2] + [NewFact("w50 w51 w52", "w53 w54")]:
        assert recall(model, [path], fact), fact
    now = {k: v for k, v in zip(after.entries(), after.values())}
    untouched = [k for k in old if k in now]
    assert untouched and all(np.array_equal(old[k], now[k]) for k in untouched)


def test_forget(model, tmp_path):
    em, tok, fp = model
    path = tmp_path / "u.eov"
    write(path, FACTS, model)
    before = read_memory_file(path, fp)
    gone = before.fact("name")
    gone_keys = {before.entries()[e] for e in gone.entries}
    shared = {before.entries()[e] for f in before.facts if f.id != "name" for e in f.entries}
    only_gone = gone_keys - shared
    assert only_gone
    memory.forget(path, ["name"], em, tok, fp)
    after = read_memory_file(path, fp)
    assert [f.id for f in after.facts] == ["doctor", "w", "w2"]
    assert not only_gone & set(after.entries())
    data = path.read_bytes()
    assert b"krause\"" not in data.replace(b"dr krause", b"") and b"my name is" not in data
    for fact in FACTS[1:]:
        assert recall(model, [path], fact), fact
    # the forgotten prompt behaves as with no memory at all
    stacks = open_overrides([path], fp)
    ids = tok("my name is", add_special_tokens=False)["input_ids"]
    assert torch.equal(logits(em, ids, stacks), logits(em, ids))
    assert greedy_text(em, tok, "my name is", 3, stacks) == greedy_text(em, tok, "my name is", 3)


def test_forget_everything_leaves_an_empty_memory(model, tmp_path):
    em, tok, fp = model
    path = tmp_path / "u.eov"
    write(path, FACTS[:1], model)
    memory.forget(path, ["name"], em, tok, fp)
    mf = read_memory_file(path, fp)
    assert mf.facts == [] and sum(len(s) for s in mf.layers.values()) == 0
    assert b"krause" not in path.read_bytes()


@pytest.mark.parametrize("facts, message", [
    ([NewFact("my name is", "")], "empty answer"),
    ([NewFact("my name is", "zebra")], "cannot produce the answer 'zebra'"),
    ([NewFact("my name is", "krause", id="doctor")], "fact id 'doctor' is already in"),
    ([NewFact("w61 w62", "w63", id="a"), NewFact("w64 w65", "w66", id="a")], "fact id 'a' is given twice in this call"),
])
def test_bad_input_changes_nothing(model, written, tmp_path, facts, message):
    assert_refused_unchanged(written[0], tmp_path / "u.eov", facts, model, message)


def test_bad_files_change_nothing(model, written, tmp_path):
    em, tok, fp = model
    path, _ = written
    truncated = tmp_path / "t.eov"
    truncated.write_bytes(path.read_bytes()[:-64])
    before = truncated.read_bytes()
    with pytest.raises(MemoryFileError, match="t.eov: .*damaged or truncated"):
        write(truncated, [NewFact("w65 w66", "w67")], model)
    with pytest.raises(MemoryFileError, match="t.eov: .*damaged or truncated"):
        memory.forget(truncated, ["name"], em, tok, fp)
    assert truncated.read_bytes() == before
    with pytest.raises(MemoryFileError, match="written for model fingerprint"):
        memory.remember(path, [NewFact("w65 w66", "w67")], em, tok, fp ^ 1)
    with pytest.raises(ValueError, match="no fact with id 'nope'"):
        memory.forget(path, ["nope"], em, tok, fp)


@pytest.mark.parametrize("method", ["unembed", "opt"])
def test_other_methods_write_files(model, tmp_path, method):
    path = tmp_path / f"{method}.eov"
    report = write(path, FACTS[:2], model, method=method)
    mf = read_memory_file(path, model[2])
    assert [f.method for f in mf.facts] == [method, method] and report.rows > 0


def test_writing_ignores_memory_attached_to_the_model(model, written, tmp_path):
    from tests.memory_fixtures import with_overrides

    em, tok, fp = model
    path, _ = written
    fact = [NewFact("w70 w71 w72", "w80 w81", id="x")]
    write(tmp_path / "plain.eov", fact, model)
    stacks = open_overrides([path], fp)
    with with_overrides(em, stacks):
        attached = [em.engram[str(l)].source for l in stacks]
        write(tmp_path / "attached.eov", fact, model)
        assert [em.engram[str(l)].source for l in stacks] == attached
    a = read_memory_file(tmp_path / "plain.eov", fp)
    b = read_memory_file(tmp_path / "attached.eov", fp)
    assert a.entries() == b.entries() and np.array_equal(a.values(), b.values())


def test_common_ngrams_get_no_rows_where_avoidable(model, tmp_path):
    """With every 3-gram 'common', a fact is written only at its trigger (the fallback) and
    never at its answer positions; with the rule off, answer positions get rows too; with only
    the N-grams past the trigger allowed (`answer_common_logp` above every score), the answer
    positions get rows and the prompt positions before the trigger still none."""
    em, tok, fp = model
    fact = NewFact("w70 w71 w72", "w80 w81 w82 w83", id="x")
    ids = tok("w70 w71 w72 w80 w81 w82 w83", add_special_tokens=False)["input_ids"]
    r, k = (a[0].numpy() for a in em.addresses(torch.tensor([ids]))[em.cfg.write_layer])
    key_at = {int(k[t, em.cfg.n_head_per_ngram]): t for t in range(len(ids))}
    positions = {}
    for name, logp, answer_logp in (("common", float("-inf"), None), ("off", None, None),
                                    ("answer", float("-inf"), 1.0)):
        path = tmp_path / f"{name}.eov"
        write(path, [fact], model, settings=FitSettings(common_logp=logp, answer_common_logp=answer_logp))
        positions[name] = {key_at[key] for _, _, key in read_memory_file(path, fp).entries()}
    assert positions["common"] == {2}                  # the trigger only
    assert positions["off"] - {2}                      # answer positions too
    assert positions["answer"] - {2} and min(positions["answer"]) == 2


def test_a_chat_form_ends_its_sentence_after_the_answer():
    from engram_local.memory.items import sentence_end

    class Chars:                            # one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    tok = Chars()
    p, a = [ord(c) for c in "My dog is"], [ord(c) for c in " Biscuit"]
    assert sentence_end(tok, "My dog is", "Biscuit", p, a) == [ord(".")]
    assert sentence_end(tok, "My doctor is", "Dr. Krause Jr.", p, a) == []      # ends one already
    merged = type("Merged", (Chars,), {"__call__": lambda self, t, add_special_tokens=False:
                                        {"input_ids": [ord(c) for c in t.replace("t.", "@")]}})()
    assert sentence_end(merged, "My dog is", "Biscuit", p, a) == []             # "t." one token
