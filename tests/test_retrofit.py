"""Retrofit mechanics: determinism, resume, only Engram weights change."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engram_local.train.retrofit import RetrofitSettings, batch_starts, retrofit
from tests.tiny import tiny_engram, tiny_tokenizer


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30, 120)] + ["the", "doctor", "is", "dr", "krause", "."]
    text = " ".join(rng.choice(words, size=3000))
    path = tmp_path / "train.txt"
    path.write_text(text)
    return path


def run(corpus, out, steps, resume=False, checkpoint_every=3):
    em, _ = tiny_engram()
    s = RetrofitSettings(steps=steps, batch_size=2, seq_len=16, lr=1e-2, seed=3,
                         checkpoint_every=checkpoint_every, warmup=2)
    stats = retrofit(em, tiny_tokenizer(), corpus, out, s, resume=resume, log=lambda m: None)
    return em, stats


def weights(directory):
    return load_file(str(directory / "engram.safetensors"))


def test_retrofit_is_deterministic_and_learns(tmp_path, corpus):
    em, stats = run(corpus, tmp_path / "a", 6)
    run(corpus, tmp_path / "b", 6)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert float(wa["2.table"].abs().sum()) > 0         # tables moved away from zero
    assert stats["train_tokens"] == 6 * 2 * 16


def test_resume_refuses_other_settings(tmp_path, corpus):
    run(corpus, tmp_path / "part", 3)
    s = RetrofitSettings(steps=6, batch_size=2, seq_len=16, lr=1e-2, seed=3, checkpoint_every=3, warmup=2)
    em, _ = tiny_engram()
    with pytest.raises(ValueError, match="different settings"):
        retrofit(em, tiny_tokenizer(), corpus, tmp_path / "part", s, resume=True, log=lambda m: None)


def test_resume_continues_same_batches(tmp_path, corpus):
    em, _ = tiny_engram()
    s = RetrofitSettings(steps=6, batch_size=2, seq_len=16, lr=1e-2, seed=3, checkpoint_every=3, warmup=2)
    out = tmp_path / "r"
    # Interrupt after the first checkpoint by making step 4's forward fail once.
    calls = {"n": 0}
    orig = em.forward

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(*a, **k)
    em.forward = flaky
    with pytest.raises(KeyboardInterrupt):
        retrofit(em, tiny_tokenizer(), corpus, out, s, log=lambda m: None)
    em2, _ = tiny_engram()
    retrofit(em2, tiny_tokenizer(), corpus, out, s, resume=True, log=lambda m: None)
    run(corpus, tmp_path / "full", 6)
    wr, wf = weights(out), weights(tmp_path / "full")
    assert all(torch.allclose(wr[k], wf[k], atol=1e-6) for k in wf)


def test_backbone_unchanged_by_retrofit(tmp_path, corpus):
    em, _ = tiny_engram()
    before = {k: v.clone() for k, v in em.backbone.state_dict().items()}
    s = RetrofitSettings(steps=3, batch_size=2, seq_len=16, lr=1e-2, seed=3, checkpoint_every=3, warmup=1)
    retrofit(em, tiny_tokenizer(), corpus, tmp_path / "x", s, log=lambda m: None)
    assert all(torch.equal(before[k], v) for k, v in em.backbone.state_dict().items())


def test_batch_starts_cover_windows_and_reject_tiny_corpus():
    st = batch_starts(1000, 10, 4, 30, seed=0)
    assert st.shape == (30, 4) and st.max() + 11 <= 1000
    assert len(set(st[:24].reshape(-1).tolist())) == 96   # first epoch: distinct windows
    with pytest.raises(ValueError, match="corpus too small"):
        batch_starts(20, 10, 4, 1, seed=0)


# --------------------------------------------------------------------------- the shared loop (train/trainer.py)

def test_collate_right_pads_ids_labels_and_mask():
    from engram_local.train.trainer import IGNORE, collate

    ids, labels, mask = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="labels"):
        collate([([1, 2], [1])], pad=0)


def test_train_schedule_stop_hooks_and_resumable_state(tmp_path):
    import itertools

    from engram_local.train.trainer import TrainState, load_state, save_state, train

    w = torch.nn.Parameter(torch.tensor([4.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    lrs, seen, saved = [], [], []

    def loss(model, batch):
        lrs.append(opt.param_groups[0]["lr"])
        return ((model * batch) ** 2).sum(), {"w": float(model.detach())}

    st = train(w, opt, itertools.repeat(torch.tensor([1.0])), loss, 4, schedule=lambda s: 1 / (s + 1),
               on_step=lambda s, info: seen.append(s.step),
               checkpoint=lambda s: saved.append(s.step), checkpoint_every=3)
    assert st.step == 4 and len(st.history) == 4 and seen == [1, 2, 3, 4] and saved == [3, 4]
    assert lrs == [0.5, 0.25, 0.5 / 3, 0.125]
    assert st.history[1] < st.history[0]
    # stop: asked after each loss, before its update; the last loss stays in the history
    st2 = train(w, opt, itertools.repeat(torch.tensor([1.0])), loss, 10,
                stop=lambda s, info: s.step == 2)
    assert st2.step == 2 and len(st2.history) == 3
    # the optimizer and the state round-trip; other settings are refused
    save_state(tmp_path / "s.pt", opt, st, {"a": 1})
    opt2 = torch.optim.SGD([w], lr=0.1)
    back = load_state(tmp_path / "s.pt", opt2, {"a": 1})
    assert isinstance(back, TrainState) and (back.step, back.history) == (st.step, st.history)
    assert opt2.param_groups[0]["base_lr"] == 0.5
    with pytest.raises(ValueError, match="different settings"):
        load_state(tmp_path / "s.pt", opt2, {"a": 2})
