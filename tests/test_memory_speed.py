"""Mechanics of the fast writer on the tiny random model (no timing asserts): the sequence trie,
the shared-prefix capture against the whole-sequence capture, the bf16 copies, the candidate
logits, the N-gram score cache, and incremental add / forget touching only what they reach."""

import numpy as np
import pytest
import torch

from engram_local.formats.eov import read_memory_file
from engram_local.memory import facade as memory
from engram_local.memory.facade import NewFact, open_overrides
from engram_local.memory.batching import buckets, split
from engram_local.memory.items import conflicting_contexts, with_article_forms
from engram_local.memory.placement import letter_tokens, mark_rare
from engram_local.memory.prefix import sequence_trie
from engram_local.memory.writer import FactIn, FitSettings, Fitter
from tests.memory_fixtures import greedy_text, tiny_memory_model


@pytest.fixture(scope="module")
def model():
    em, tok = tiny_memory_model()
    return em, tok, memory.model_fingerprint(em)


def ids(tok, text):
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def contexts_facts(tok):
    """Facts with chat-like contexts: leads sharing a long common start, one lead repeated."""
    common = ids(tok, "<|im_start|> w90 w91 w92 w93 w94 <|im_end|> <|im_start|>")
    lead_a = common + ids(tok, "w95 w96 <|im_end|>")
    return [FactIn("x", ["w30 w31 w32"], "w40 w41", contexts=[(lead_a, "w30 w31 w32"),
                                                              (common + ids(tok, "w30 w31 <|im_end|>"), "w30 w31 w32")]),
            FactIn("y", ["w50 w51 w52"], "w60 w61 w62", contexts=[(lead_a, "w50 w51 w52")])]


def test_contradicted_contexts_are_left_out():
    lead = (1,)
    facts = [FactIn("a", ["My name is"], "Emma Carter", contexts=[(lead, "My name is")]),
             FactIn("b", ["My full name is"], "Aisha Rahman",
                    contexts=[(lead, " My name is"), (lead, "My full name is")]),
             FactIn("c", ["My job is a"], "nurse", contexts=[(lead, "My job is a")]),
             FactIn("d", ["My job is"], "Acme", contexts=[(lead, "My job is")]),
             FactIn("e", ["My cat is"], "Tom", contexts=[(lead, "my cat  is")]),
             FactIn("f", ["My old cat is"], "Tom", contexts=[(lead, "My cat is")])]
    # the same prompt with another answer, and a prompt another fact's words go on from
    # differently, are left out on both sides; own prompts never; agreeing answers stay
    assert conflicting_contexts(facts) == {(0, 0), (1, 0), (2, 0), (3, 0)}
    # an article form ("I'm" -> "a vegetarian", with_article_forms) gives way to the other
    # fact's form it contradicts ("I'm allergic to"); that one stays
    facts = with_article_forms([FactIn("g", ["I'm a"], "vegetarian", contexts=[(lead, "I'm a")]),
                                FactIn("h", ["I'm allergic to"], "penicillin", contexts=[(lead, "I'm allergic to")]),
                                FactIn("i", ["My car is a"], "Subaru", contexts=[(lead, "My car is a")])])
    assert facts[0].contexts[1] == (lead, "I'm", "a") and facts[2].contexts[1] == (lead, "My car is", "a")
    assert conflicting_contexts(facts) == {(0, 1)}


def test_sequence_trie_covers_every_sequence_once():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7], [1, 2, 3, 4], [9], [1, 2, 3]]
    segs, leaf = sequence_trie(seqs)
    for s, lf in zip(seqs, leaf):
        path = lf.path()
        assert path[0].lo == 0 and path[-1].hi == len(s)
        assert all(a.hi == b.lo for a, b in zip(path, path[1:]))
        for seg in path:                      # the segment's representative has the same tokens
            assert seqs[seg.rep][seg.lo:seg.hi] == s[seg.lo:seg.hi]
    # the shared start [1, 2] is one segment, run once
    assert sum(1 for seg in segs if seg.lo == 0) == 2
    assert leaf[0] is leaf[3]


@pytest.mark.parametrize("fast", [False, True])
def test_trie_capture_equals_whole_capture(model, fast):
    em, tok, _ = model
    f = Fitter(em, tok, FitSettings())
    facts = contexts_facts(tok)
    a, b = f.items_for(facts), f.items_for(facts)
    assert f.model.plain
    f.model.capture(a, fast=fast)
    f.model._capture_whole(b)
    tol = 5e-2 if fast else 1e-4
    for x, y in zip(a, b):
        assert torch.allclose(x.h, y.h, atol=tol * 10, rtol=tol), x.ids
        assert np.array_equal(x.rows, y.rows) and np.array_equal(x.keys, y.keys)
        for li in range(len(f.model.layers) - f.model.wl):
            kx, vx = f.model.prefix_kv(x, li, len(x.ids))
            ky, vy = f.model.prefix_kv(y, li, len(y.ids))
            assert torch.allclose(kx.float(), ky, atol=tol * 10, rtol=tol)
            assert torch.allclose(vx.float(), vy, atol=tol * 10, rtol=tol)
        assert np.allclose(x.base_margin, y.base_margin, atol=tol * 20)
        assert set(x.ttok) <= set(x.cand) and set(x.gtok) <= set(x.cand)
    # the shared lead ran once: fewer segment positions than item positions
    segs = {id(s): s for it in a for s in it.segs}
    assert sum(s.hi - s.lo for s in segs.values()) < sum(len(it.ids) for it in a)


def first_target_entries(f, items) -> dict:
    """Entries {(row, key): index} at each item's first target, two heads: a small fit's rows."""
    entries = {}
    for it in items:
        t = int(it.tpos[0])
        for c in f.hi_cols[:2]:
            entries.setdefault((int(it.rows[t, c]), int(it.keys[t, c])), len(entries))
    return entries


def test_fast_batch_logits_follow_the_fp32_ones(model):
    em, tok, _ = model
    f = Fitter(em, tok, FitSettings())
    items = f.items_for(contexts_facts(tok))
    f.model.capture(items)
    entries = first_target_entries(f, items)
    vals = torch.from_numpy(np.random.default_rng(0).standard_normal((len(entries), em.cfg.head_dim))
                            .astype(np.float32) * 3)
    f.batches.restage(items, entries)
    sel = list(range(len(items)))
    full = f.model.forward(f.batches.batch(items, sel), vals)
    bt = f.batches.batch(items, sel, fast=True)
    cand = f.model.forward(bt, vals)
    assert cand.shape == (full.shape[0], len(bt["cand"]))
    assert torch.allclose(cand, full[:, bt["cand"]], atol=0.25, rtol=0.05)
    # margins over the candidates are confirmed over the whole vocabulary
    _, m_fast = f.batches.run(items, sel, vals, backward=False, fast=True)
    _, m_full = f.batches.run(items, sel, vals, backward=False)
    for i in sel:
        assert np.all(m_fast[i] >= m_full[i] - 0.5) or np.all(m_fast[i] < items[i].need)



def test_buckets_split_for_the_workers():
    class It:
        def __init__(self, n):
            self.ids, self.start = list(range(n)), 0
    items = [It(n) for n in (3, 3, 3, 3, 60)]
    sel = list(range(len(items)))
    groups = buckets(items, sel)
    assert groups == [[0, 1, 2, 3], [4]]
    # the largest group that has two items is halved; the halves keep their group
    assert split(items, groups, 3) == [([0, 1], [0, 1, 2, 3]), ([2, 3], [0, 1, 2, 3]), ([4], [4])]
    # a lone item cannot be split further
    assert split(items, [[4]], 2) == [([4], [4])]


@pytest.mark.parametrize("fast", [False, True])
def test_buckets_on_worker_threads_equal_one_thread(model, fast):
    """Batches.run on 2 worker threads (one OpenMP thread each): the same loss, margins and
    gradient as on the calling thread, and torch's own thread count is left as it was."""
    em, tok, _ = model
    f = Fitter(em, tok, FitSettings())
    items = f.items_for(contexts_facts(tok))
    f.model.capture(items, fast=fast)
    entries = first_target_entries(f, items)
    vals = np.random.default_rng(0).standard_normal((len(entries), em.cfg.head_dim)).astype(np.float32)
    f.batches.restage(items, entries)
    sel = list(range(len(items)))
    threads = torch.get_num_threads()
    out = {}
    for workers in (1, 2):
        p = torch.nn.Parameter(torch.from_numpy(vals.copy()))
        loss, margins = f.batches.run(items, sel, p, backward=True, fast=fast, workers=workers)
        out[workers] = loss, margins, p.grad.clone()
    (l1, m1, g1), (l2, m2, g2) = out[1], out[2]
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert all(np.allclose(m1[i], m2[i], atol=1e-3) for i in sel)
    assert torch.allclose(g1, g2, atol=1e-4, rtol=1e-3)
    assert torch.get_num_threads() == threads

def test_rare_scores_are_cached(model):
    em, tok, _ = model
    f = Fitter(em, tok, FitSettings())
    items = f.items_for([FactIn("x", ["w30 w31 w32"], "w40 w41")])
    calls = []

    def scorer(x):
        calls.append(len(x))
        return f.model.token_logprobs(x)

    cache = {}
    letters = letter_tokens(tok)
    mark_rare(em, items, -8.0, letters, 0, scorer=scorer, cache=cache)
    first = [it.rare.copy() for it in items]
    assert calls and cache
    n = len(calls)
    mark_rare(em, items, -8.0, letters, 0, scorer=scorer, cache=cache)
    assert len(calls) == n and all(np.array_equal(a, it.rare) for a, it in zip(first, items))
    # the cached scores are the model's own: the fp32 scorer gives the default forward's scores
    plain = {}
    mark_rare(em, items, -8.0, letters, 0, cache=plain)
    assert all(abs(plain[g] - cache[g]) < 1e-4 for g in cache)


def recall(model, path, fact):
    em, tok, fp = model
    stacks = open_overrides([path], fp)
    n = len(tok(" " + fact.answer, add_special_tokens=False)["input_ids"])
    return greedy_text(em, tok, fact.prompt, n, stacks).strip() == fact.answer


BASE = [NewFact("w30 w31 w32", "w40 w41", id="a"), NewFact("w50 w51 w52", "w60 w61 w62", id="b"),
        NewFact("w70 w71 w72", "w80 w81", id="c")]


def fitted_items(model, fn):
    """(result, the Fitter's fitted items, all its items) of one remember / forget call."""
    seen = []
    orig = Fitter.fit

    def fit(self, *a, **k):
        seen.append(self)
        return orig(self, *a, **k)

    Fitter.fit = fit
    try:
        res = fn()
    finally:
        Fitter.fit = orig
    return res, seen[-1].live, seen[-1].items


def rows_of(path, fp) -> dict:
    """{(row, key): value} of a memory file."""
    m = read_memory_file(path, fp)
    return dict(zip(m.entries(), m.values()))


def test_adding_a_fact_fits_only_what_its_rows_reach(model, tmp_path):
    em, tok, fp = model
    path = tmp_path / "u.eov"
    memory.remember(path, [NewFact(f.prompt, f.answer, id=f.id) for f in BASE], em, tok, fp)
    old = rows_of(path, fp)
    new = NewFact("w90 w91 w92", "w100 w101", id="d")
    rep, live, items = fitted_items(model, lambda: memory.remember(path, [new], em, tok, fp))
    assert {items_fact for items_fact in {it.fact for it in live}} == {3}      # only the new fact
    assert len(live) < len(items)
    now = rows_of(path, fp)
    assert all(k in now and np.array_equal(old[k], now[k]) for k in old)       # earlier rows as they were
    for f in BASE + [new]:
        assert recall(model, path, f), f
    assert all(rep.recalled.values())


def test_a_fact_sharing_rows_reaches_their_readers(model, tmp_path):
    em, tok, fp = model
    path = tmp_path / "u.eov"
    memory.remember(path, [NewFact(f.prompt, f.answer, id=f.id) for f in BASE], em, tok, fp)
    new = NewFact("w35 w31 w32", "w45 w46", id="e")       # shares "w31 w32" with fact a
    rep, live, items = fitted_items(model, lambda: memory.remember(path, [new], em, tok, fp))
    for f in BASE + [new]:
        assert recall(model, path, f), f


def test_incremental_and_full_fits_both_recall(model, tmp_path):
    em, tok, fp = model
    for incremental in (True, False):
        path = tmp_path / f"u{incremental}.eov"
        memory.remember(path, [NewFact(f.prompt, f.answer, id=f.id) for f in BASE[:2]], em, tok, fp)
        s = FitSettings(incremental=incremental)
        rep, live, items = fitted_items(model, lambda: memory.remember(
            path, [NewFact(BASE[2].prompt, BASE[2].answer, id="c")], em, tok, fp, settings=s))
        assert (len(live) < len(items)) == incremental
        for f in BASE:
            assert recall(model, path, f), f


def test_forget_refits_only_what_the_dropped_rows_reach(model, tmp_path):
    em, tok, fp = model
    path = tmp_path / "u.eov"
    memory.remember(path, [NewFact(f.prompt, f.answer, id=f.id) for f in BASE], em, tok, fp)
    old = rows_of(path, fp)
    rep, live, items = fitted_items(model, lambda: memory.forget(path, ["b"], em, tok, fp))
    after = read_memory_file(path, fp)
    now = rows_of(path, fp)
    assert [f.id for f in after.facts] == ["a", "c"]
    assert len(live) < len(items)
    touched = {after.facts[it.fact].id for it in live if it.fact < len(after.facts)}
    untouched = [f for f in after.facts if f.id not in touched]
    assert untouched                           # some fact was not refitted at all ...
    for f in untouched:                        # ... and its rows are bit for bit as they were
        for e in f.entries:
            assert np.array_equal(old[after.entries()[e]], now[after.entries()[e]])
    for f in (BASE[0], BASE[2]):
        assert recall(model, path, f), f
    # the forgotten prompt behaves as without memory
    stacks = open_overrides([path], fp)
    assert greedy_text(em, tok, "w50 w51 w52", 3, stacks) == greedy_text(em, tok, "w50 w51 w52", 3)


def test_plateau_stop_ends_a_component_that_stops_improving(model):
    """After `late` steps a component whose least margin has not improved for `plateau` steps
    stops (FitSettings.plateau): facts whose prompts contain each other and go on differently
    can never all reach an unreachable margin; without the stop they run to max_steps."""
    em, tok, _ = model
    facts = [FactIn("a", ["w10 w11 w12"], "w40 w41"), FactIn("b", ["w10 w11 w12 w13"], "w50 w51"),
             FactIn("c", ["w20 w11 w12"], "w60 w61"), FactIn("d", ["w10 w11"], "w70")]
    never = dict(late=0, late_margin=1e9, margin=50.0, context_margin=50.0, max_steps=40)
    assert Fitter(em, tok, FitSettings(plateau=10**6, **never)).fit(facts).steps == 40
    assert Fitter(em, tok, FitSettings(plateau=3, **never)).fit(facts).steps < 40


def test_give_up_ends_a_component_that_keeps_creeping(model):
    """A component stops `give_up` steps after its items first ran, whatever its margins do
    (FitSettings.give_up): the plateau stop never fires for a large component whose least
    margin keeps creeping up; without the limit it runs to max_steps."""
    em, tok, _ = model
    facts = [FactIn("a", ["w10 w11 w12"], "w40 w41"), FactIn("b", ["w10 w11 w12 w13"], "w50 w51"),
             FactIn("c", ["w20 w11 w12"], "w60 w61"), FactIn("d", ["w10 w11"], "w70")]
    never = dict(late=10**6, late_margin=1e9, plateau=10**6, margin=50.0, context_margin=50.0, max_steps=40)
    assert Fitter(em, tok, FitSettings(give_up=0, **never)).fit(facts).steps == 40
    assert Fitter(em, tok, FitSettings(give_up=12, **never)).fit(facts).steps <= 13


def test_give_up_chat_ends_a_component_whose_prompts_are_done(model):
    """FitSettings.give_up_chat: a component whose prompts all give their answers with their
    full margin stops `give_up_chat` steps after its items first ran, however far its chat forms
    still are from theirs; while a prompt falls short it goes on (to `give_up`)."""
    em, tok, _ = model
    lead = ids(tok, "<|im_start|> w90 w91 <|im_end|> <|im_start|>")
    facts = [FactIn("a", ["w10 w11 w12"], "w40 w41", contexts=[(lead, "w10 w11 w12")]),
             FactIn("b", ["w20 w21"], "w50", contexts=[(lead, "w20 w21")])]
    never = dict(late=10**6, late_margin=1e9, plateau=10**6, patience=10**6, fair=1e9, give_up=0,
                 context_margin=50.0, max_steps=40)
    assert Fitter(em, tok, FitSettings(give_up_chat=0, **never)).fit(facts).steps == 40
    res = Fitter(em, tok, FitSettings(give_up_chat=8, **never)).fit(facts)
    assert res.steps <= 12
    unreachable = dict(never, margin=50.0)
    assert Fitter(em, tok, FitSettings(give_up_chat=8, **unreachable)).fit(facts).steps == 40


def test_a_prompt_ending_in_an_article_is_also_fitted_with_the_article_said(model):
    """FitSettings.article_forms (on by default): a chat context whose prompt ends in "a" / "an"
    / "the" is also fitted with the article as the answer's first word ("My usual coffee order
    is" -> "a cold brew"): a reply that goes on past the prompt's last content word reads rows
    there too. The bare prompts (completion) are not changed."""
    em, tok, _ = model
    lead = ids(tok, "<|im_start|> w90 w91 <|im_end|> <|im_start|>")
    facts = [FactIn("x", ["w30 w31 a"], "w40 w41", contexts=[(lead, "w30 w31 a")]),
             FactIn("y", ["w50 w51"], "w60", contexts=[(lead, "w50 w51")])]
    off = Fitter(em, tok, FitSettings(article_forms=False)).items_for(facts)
    on = Fitter(em, tok, FitSettings()).items_for(facts)
    assert len(on) == len(off) + 1
    new = [it for it in on if not any(it.ids == o.ids and list(it.ttok) == list(o.ttok) for o in off)]
    assert len(new) == 1 and new[0].fact == 0
    assert list(new[0].ids[:len(lead)]) == list(lead)
    assert list(new[0].ttok) == list(ids(tok, "a w40 w41"))
    assert list(new[0].ids[len(lead):]) == list(ids(tok, "w30 w31 a w40"))
    f = Fitter(em, tok, FitSettings())
    res = f.fit(facts)
    assert res.recalled == {"x": True, "y": True}
    assert all(f.final_margins[i].min() > 0 for i in range(len(f.live)))
