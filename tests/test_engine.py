"""The engine (runtime.engine): several users' sequences in one llama.cpp batch, each with its own
memory, joining and leaving between decode steps, on the tiny F32 model (tests/runtime_fixtures.py).

Isolation is proven as the issue asks: every sequence decoded in a shared batch produces exactly the
greedy tokens it produces decoded alone (a single-sequence backend over the same files), for 8 users
whose memories make the same prompt continue differently, and over random join/leave/cancel
schedules. The batched Engram term is also checked row for row against per-sequence forwards in C
(bit for bit) and against the numpy reference.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from engram_local import native
from engram_local.native.runtime import OverrideStacks
from tests.runtime_fixtures import engram_reference, shared_model_dir, synthetic_overrides
from tests.test_runtime_kernel import _kernel, _randomised

N_USERS = 8
PROMPTS = ["My doctor is", "The capital of France is Paris. My doctor is",
           "Hello world! How are you", "Numbers like 12345 and"]


# --------------------------------------------------------------------------- the batched Engram term

@pytest.mark.parametrize("layer", [1, 2])
def test_forward_batch_equals_each_segment_alone(layer):
    """ek_engram_forward_batch: per segment bit-identical to ek_engram_forward with that segment's
    own override stack, and close to the numpy reference."""
    em = _randomised()
    lay = em.engram[str(layer)]
    D, hist = em.cfg.hidden_size, lay.conv_history
    g = torch.Generator().manual_seed(3)
    # three sequences: (ids, start position, tokens in this batch)
    seqs = [(torch.randint(0, 120, (1, 9), generator=g), 0, 4),
            (torch.randint(0, 120, (1, 9), generator=g), 6, 3),
            (torch.randint(0, 120, (1, 9), generator=g), 1, 8)]
    ids0 = seqs[0][0]
    rows, keys = em.addresses(ids0)[layer]
    r2, k2 = rows[0, :2].reshape(-1).numpy(), keys[0, :2].reshape(-1).numpy()
    keep = np.unique(np.stack([r2, k2], 1), axis=0)           # one entry per (row, key)
    over = native.OverrideSet.build(keep[:, 0], np.full((len(keep), em.cfg.head_dim), 4.0, np.float32), keep[:, 1])
    stacks = [[over], [], [over, over]]
    T = sum(n for _, _, n in seqs)
    h = (torch.randn(T, D, generator=g) * 2).numpy()
    base = _kernel(em, layer)
    segments, xs_batch, y_alone, hits_alone, row = [], [], [], 0, 0
    for (ids, start, n), sets in zip(seqs, stacks):
        canon = em.canonical(ids)[0]
        xs = np.random.default_rng(start).standard_normal((hist + start + n, D)).astype(np.float32)
        if start == 0:
            xs[:] = 0.0                          # a fresh sequence: zero conv history
        xs_batch.append(xs.copy())
        segments.append((canon[:start + n], start, xs_batch[-1], hist + start, n, sets))
        y, hits = _kernel(em, layer, sets).forward(h[row:row + n], canon[:start + n], start, xs, hist + start)
        y_alone.append((y, xs))
        hits_alone += hits
        row += n
    y_b, hits_b = base.forward_batch(h, segments)
    np.testing.assert_array_equal(y_b, np.concatenate([y for y, _ in y_alone]))
    for xs_b, (_, xs_1) in zip(xs_batch, y_alone):
        np.testing.assert_array_equal(xs_b, xs_1)
    assert hits_b == hits_alone > 0
    # the first segment (zero history) against the numpy reference, its stack's rows included
    r0, k0 = (t[0, :4].reshape(-1).numpy() for t in (rows, keys))
    e = native.Gatherer(base.table, [over]).gather(r0, k0).reshape(4, -1)
    p = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731
    y_ref, _ = engram_reference(h[:4], e, p(lay.w_k.weight), p(lay.w_v.weight), p(lay.norm_q.weight),
                                p(lay.norm_k.weight), p(lay.norm_v.weight), p(lay.conv.weight)[:, 0, :],
                                em.cfg.norm_eps, em.cfg.max_ngram_size)
    np.testing.assert_allclose(y_b[:4], y_ref, rtol=1e-5, atol=1e-5)


def test_forward_batch_rejects_bad_segments():
    em = _randomised()
    kern, D = _kernel(em, 1), em.cfg.hidden_size
    xs = np.zeros((8, D), np.float32)
    with pytest.raises(native.KernelError, match="EK_ERR_ARG"):       # 3 rows, segments cover 2
        kern.forward_batch(np.zeros((3, D), np.float32), [(np.arange(4), 0, xs, 0, 2, [])])
    with pytest.raises(native.KernelError, match="EK_ERR_SIZE"):      # ids end before the tokens
        kern.forward_batch(np.zeros((2, D), np.float32), [(np.arange(1), 0, xs, 0, 2, [])])
    with pytest.raises(ValueError, match="xs must be"):
        kern.forward_batch(np.zeros((2, D), np.float32), [(np.arange(4), 0, xs.astype(np.float64), 0, 2, [])])


# --------------------------------------------------------------------------- engines on the tiny model

@pytest.fixture(scope="module")
def md(tmp_path_factory):
    return shared_model_dir(tmp_path_factory, "model", adapter=True)


@pytest.fixture(scope="module")
def world(md, tmp_path_factory):
    """The tiny model's files, 8 users' memories on the same prompt, and per-user overrides."""
    from engram_local.formats.eov import open_overrides
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.runtime import llama_backend

    sc = open_sidecar(md / "engram.gguf")
    probe = llama_backend.LlamaCppBackend(md / "backbone.gguf", n_ctx=64, n_threads=1)
    ids = probe.tokenize(PROMPTS[0])
    probe.close()
    d = tmp_path_factory.mktemp("users")
    users = {}
    for u in range(N_USERS):
        path = d / f"u{u}.eov"
        synthetic_overrides(md, path, ids, sc.config.write_layer, scale=6.0, seed=100 + u)
        users[u] = open_overrides([path], int(sc.fingerprint), engram_layers=sc.layer_ids)
    users[None] = {}
    return {"sc": sc, "users": users, "md": md}


def _backend(world, n_seq, overrides=None, n_batch=512, n_ctx=64):
    from engram_local.runtime import llama_backend

    return llama_backend.LlamaCppBackend(world["md"] / "backbone.gguf", sidecar=world["sc"], overrides=overrides,
                                         n_ctx=n_ctx, n_batch=n_batch, n_threads=1, kv_f32=True, n_seq=n_seq)


@pytest.fixture(scope="module")
def alone(world):
    """Greedy tokens of (user, prompt) decoded alone: a one-sequence backend with that user's
    memory as its own override stack, 12 tokens (a prefix serves shorter requests)."""
    from engram_local.runtime.engine import Engine, Request

    cache = {}

    def get(user, prompt, n):
        key = (user, prompt)
        if key not in cache:
            be = _backend(world, 1, overrides=world["users"][user])
            eng = Engine(be)
            cache[key] = eng.generate(Request(be.tokenize(prompt), max_tokens=12)).tokens
            be.close()
        return cache[key][:n]
    return get


def _engine(world, n_seq, **kw):
    from engram_local.runtime.engine import Engine

    be = _backend(world, n_seq, n_batch=kw.pop("n_batch", 512))
    eng = Engine(be, sidecar=world["sc"], **kw)
    stacks = {u: (eng.make_stack(ov) if u is not None else None) for u, ov in world["users"].items()}
    return be, eng, stacks


def test_eight_users_one_batch_each_gets_their_own_answer(world, alone):
    """8 users, memories that continue "My doctor is" differently, 4 sequences: requests queue,
    join and leave over many rounds; every one decodes exactly its user's answer."""
    from engram_local.runtime.engine import Request

    answers = {u: tuple(alone(u, PROMPTS[0], 8)) for u in range(N_USERS)}
    assert len(set(answers.values())) == N_USERS, "the users' memories must give 8 different answers"
    assert tuple(alone(None, PROMPTS[0], 8)) not in set(answers.values())
    be, eng, stacks = _engine(world, 4)
    prompt = be.tokenize(PROMPTS[0])
    rng = random.Random(0)
    for _ in range(6):
        order = [rng.randrange(N_USERS) for _ in range(10)]
        streams = [(u, eng.submit(Request(prompt, max_tokens=rng.randint(3, 8), stack=stacks[u]))) for u in order]
        steps = 0
        while eng.step():
            steps += 1
            assert eng.n_active <= 4
        for u, st in streams:
            assert st.finish_reason in ("length", "eog")
            assert tuple(st.tokens) == answers[u][:len(st.tokens)]
            assert len(st.tokens) == st.request.max_tokens or st.finish_reason == "eog"
        assert steps < sum(st.request.max_tokens for _, st in streams)    # batched, not one by one
    be.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_join_leave_schedules_match_decoding_alone(world, alone, seed):
    """Random schedules: requests (random user or none, prompt, length) arrive at random steps,
    some are cancelled; a small n_batch splits prompts over steps. Each finished sequence's
    greedy tokens equal what it produces alone; a cancelled one's are a prefix of them."""
    from engram_local.runtime.engine import Request

    rng = random.Random(seed)
    be, eng, stacks = _engine(world, 3, n_batch=rng.choice([5, 8, 32]))
    users = [rng.choice([None, *range(N_USERS)]) for _ in range(9)]
    plan = sorted((rng.randrange(12), i) for i in range(len(users)))
    live, done, step = [], [], 0
    while plan or eng.n_active or eng.n_waiting:
        while plan and plan[0][0] <= step:
            _, i = plan.pop(0)
            prompt = rng.choice(PROMPTS)
            st = eng.submit(Request(be.tokenize(prompt), max_tokens=rng.randint(1, 10), stack=stacks[users[i]]))
            live.append((users[i], prompt, st))
        if live and rng.random() < 0.05:
            rng.choice(live)[2].cancel()
        eng.step()
        step += 1
        assert step < 500
    for user, prompt, st in live:
        want = alone(user, prompt, 12)
        assert st.done and st.tokens == want[:len(st.tokens)], (user, prompt, st.finish_reason)
        if st.finish_reason == "length":
            assert len(st.tokens) == st.request.max_tokens
        done.append(st.finish_reason)
    assert "length" in done
    be.close()


def test_prompt_cache_reuse_stays_per_user(world, alone):
    """A finished sequence keeps its tokens: the same user's next prompt reuses them; another
    user's request on that sequence starts it over (never decodes on another user's state)."""
    from engram_local.runtime.engine import Request

    be, eng, stacks = _engine(world, 1)
    p0, p1 = be.tokenize(PROMPTS[1]), be.tokenize(PROMPTS[0])
    a = eng.generate(Request(p0, max_tokens=4, stack=stacks[0]))
    b = eng.generate(Request(p0 + a.tokens + [p0[0]], max_tokens=2, stack=stacks[0]))
    assert b.timings.prompt_tokens == 2      # the last answer token (never decoded) + the new one
    c = eng.generate(Request(p1, max_tokens=5, stack=stacks[1]))
    assert c.timings.prompt_tokens == len(p1)
    assert c.tokens == alone(1, PROMPTS[0], 5)
    d = eng.generate(Request(p1, max_tokens=5, stack=stacks[0]))
    assert d.timings.prompt_tokens == len(p1) and d.tokens == alone(0, PROMPTS[0], 5)
    be.reset_all()                                             # everything forgotten, stacks kept
    assert be.seq_tokens(0) == [] and be.runtime.seq_n_past(0) == 0
    e = eng.generate(Request(p1, max_tokens=5, stack=stacks[0]))
    assert e.timings.prompt_tokens == len(p1) and e.tokens == d.tokens
    be.close()


def test_engine_api_queue_cancel_sampling_and_thread(world, alone):
    from engram_local.runtime.engine import Engine, EngineError, QueueFull, Request
    from engram_local.runtime.sampling import Sampler

    be, eng, stacks = _engine(world, 2, max_queue=1)
    prompt = be.tokenize(PROMPTS[0])
    s1, s2, s3 = (eng.submit(Request(prompt, max_tokens=6, stack=stacks[u])) for u in (1, 2, 3))
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit(Request(prompt, max_tokens=6))
    with pytest.raises(ValueError, match="empty"):
        eng.submit(Request([], max_tokens=6))
    with pytest.raises(ValueError, match="holds 64"):
        eng.submit(Request(prompt * 20, max_tokens=6))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.submit(Request(prompt, max_tokens=-1))
    s3.cancel()                                  # waiting: dropped
    eng.step()
    s1.cancel()                                  # running: its sequence is freed
    eng.step()
    assert s1.finish_reason == "cancelled" and s3.finish_reason == "cancelled" and s3.tokens == []
    assert s1.tokens == alone(1, PROMPTS[0], len(s1.tokens))
    assert eng.n_active == 1
    assert s2.result().tokens == alone(2, PROMPTS[0], 6)
    zero = eng.generate(Request(prompt, max_tokens=0))
    assert zero.tokens == [] and zero.finish_reason == "length"
    # per-request sampling: a seeded sampler gives what it gives alone, whatever runs beside it
    solo = Engine(_backend(world, 1, overrides=world["users"][4]))
    want = solo.generate(Request(prompt, max_tokens=8, sampler=Sampler(temp=1.5, top_p=0.9, seed=7))).tokens
    solo.backend.close()
    greedy = eng.submit(Request(prompt, max_tokens=8, stack=stacks[5]))
    hot = eng.submit(Request(prompt, max_tokens=8, stack=stacks[4], sampler=Sampler(temp=1.5, top_p=0.9, seed=7)))
    assert hot.result().tokens == want and greedy.result().tokens == alone(5, PROMPTS[0], 8)
    # a background thread drives the steps; clients on their own threads
    eng.start()
    outs = {}

    def client(u):
        outs[u] = list(eng.submit(Request(prompt, max_tokens=5, stack=stacks[u])))
    threads = [threading.Thread(target=client, args=(u,)) for u in (0, 6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outs == {u: alone(u, PROMPTS[0], 5) for u in (0, 6, 7)}
    eng.close()
    assert not eng.running
    with pytest.raises(EngineError, match="closed"):
        eng.submit(Request(prompt, max_tokens=1))
    be.close()


def test_override_stacks_are_checked_against_the_layers(world):
    be = _backend(world, 2)
    good = world["users"][0]
    with pytest.raises(ValueError, match="one override list per Engram layer"):
        OverrideStacks(be.runtime.layers, [[]])
    bad = native.OverrideSet(np.array([10**9]), np.zeros((1, world["sc"].config.head_dim), np.float16))
    with pytest.raises(native.KernelError):
        be.runtime.stacks([[bad]] * len(be.runtime.layers))
    with pytest.raises(TypeError, match="OverrideStacks"):
        be.runtime.set_stacks(1, good)
    with pytest.raises(ValueError, match="seq must be <= 1"):
        be.runtime.set_stacks(2, None)
    with pytest.raises(ValueError, match="2 tokens but 1 sequence ids"):
        be.runtime.begin([1, 2], [0])
    with pytest.raises(native.EngramRuntimeError, match="two runs"):
        be.runtime.begin([1, 2, 3], [0, 1, 0])
    be.runtime.reset()                                   # a refused batch fails the runtime until reset
    be.runtime.begin([1, 2], [1, 1])
    be.runtime.abort()
    be.close()


def test_session_generates_through_the_engine(world):
    """`run`'s path: Session.generate is the engine with one sequence."""
    from engram_local.runtime.sampling import Sampler
    from engram_local.runtime.session import Session

    s = Session(world["md"], backend="llama.cpp", n_ctx=64, n_threads=1, kv_f32=True)
    g = s.generate(s.tokenize(PROMPTS[0]), 4, Sampler(temp=0))
    assert s.engine.n_steps >= 4 and len(g.tokens) <= 4
    s.close()


def test_backend_sequences_are_independent(world):
    """With n_seq > 1, sequence 0 is still the Backend sequence (eval / truncate / reset) and
    leaves the other sequences alone; decode_step checks its entries."""
    be = _backend(world, 3, n_batch=16)
    ids = be.tokenize(PROMPTS[1])
    ref = _backend(world, 1).eval(ids[:10])
    stack = be.make_stack(world["sc"], world["users"][2])
    be.set_seq_stack(2, stack)
    be.decode_step([(1, ids[:4], False), (2, ids[:6], True)])
    # other sequences' KV cells change llama.cpp's attention shapes, not what it computes
    np.testing.assert_allclose(be.eval(ids[:10]), ref, rtol=1e-4, atol=1e-4)
    be.reset()                                                          # sequence 0 only
    assert be.seq_tokens(1) == ids[:4] and be.runtime.seq_n_past(2) == 6
    out = be.decode_step([(1, ids[4:10], True)])
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4)      # seq 1 continued = seq 0 alone
    be.seq_truncate(1, 2)
    assert be.seq_tokens(1) == ids[:2] and be.runtime.seq_n_past(1) == 2
    with pytest.raises(ValueError, match="twice"):
        be.decode_step([(1, ids[:1], True), (1, ids[:1], True)])
    with pytest.raises(ValueError, match="n_batch"):
        be.decode_step([(0, ids[:10], True), (1, ids[:10], True)])
    with pytest.raises(ValueError, match="outside"):
        be.decode_step([(3, ids[:1], True)])
    be.set_seq_stack(2, None)                                           # another stack: forgotten
    assert be.seq_tokens(2) == [] and be.runtime.seq_n_past(2) == 0
    be.close()
