"""The C Engram term (native/engram_runtime.c) against torch's EngramLayer and a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_local import constants, native
from tests.runtime_fixtures import engram_reference
from tests.tiny import tiny_engram


def _randomised(layer_ids=(1, 2), seed=0):
    em, cmap = tiny_engram(layer_ids=layer_ids, seed=seed, random_tables=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in em.engram.values():
            layer.w_k.weight.copy_(torch.randn(layer.w_k.weight.shape, generator=g) * 0.3)
            layer.w_v.weight.copy_(torch.randn(layer.w_v.weight.shape, generator=g) * 0.3)
            for norm in (layer.norm_q, layer.norm_k, layer.norm_v):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
    return em


def _kernel(em, layer: int, overrides=()):
    lay = em.engram[str(layer)]
    tab = np.ascontiguousarray(lay.table.detach().numpy(), dtype=np.float32)
    table = native.Table(tab, constants.QTYPE_F32, tab.shape[0], tab.shape[1])
    p = lambda t: t.detach().numpy()  # noqa: E731
    return native.EngramLayerKernel(
        table, overrides, em.layout.kernel_args(layer), w_k=p(lay.w_k.weight), w_v=p(lay.w_v.weight),
        norm_q=p(lay.norm_q.weight), norm_k=p(lay.norm_k.weight), norm_v=p(lay.norm_v.weight),
        conv=p(lay.conv.weight), eps=em.cfg.norm_eps, dilation=em.cfg.max_ngram_size)


@pytest.mark.parametrize("layer", [1, 2])
def test_c_forward_equals_torch_and_numpy(layer):
    em = _randomised()
    lay = em.engram[str(layer)]
    T, D = 23, em.cfg.hidden_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 120, (1, T), generator=g)
    h = torch.randn(1, T, D, generator=g) * 2
    rows, keys = em.addresses(ids)[layer]
    e = lay.lookup(rows, keys)
    with torch.no_grad():
        y_torch, _ = lay(h, e)
    kern = _kernel(em, layer)
    canon = em.canonical(ids)[0]
    hist = lay.conv_history
    xs = np.zeros((hist + T, D), np.float32)
    y_c, hits = kern.forward(h[0].numpy(), canon, 0, xs, hist)
    assert hits == 0
    np.testing.assert_allclose(y_c, y_torch[0].numpy(), rtol=1e-5, atol=1e-5)
    p = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731
    y_ref, x_ref = engram_reference(h[0].numpy(), e[0].detach().numpy(), p(lay.w_k.weight), p(lay.w_v.weight),
                                    p(lay.norm_q.weight), p(lay.norm_k.weight), p(lay.norm_v.weight),
                                    p(lay.conv.weight)[:, 0, :], em.cfg.norm_eps, em.cfg.max_ngram_size)
    np.testing.assert_allclose(y_c, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xs[hist:], x_ref, rtol=1e-5, atol=1e-5)


def test_chunked_forward_with_history_equals_one_pass():
    em = _randomised()
    kern = _kernel(em, 2)
    T, D = 30, em.cfg.hidden_size
    rng = np.random.default_rng(3)
    canon = rng.integers(0, em.cfg.compressed_vocab_size, T)
    h = rng.standard_normal((T, D)).astype(np.float32)
    xs_full = np.zeros((T, D), np.float32)
    y_full, _ = kern.forward(h, canon, 0, xs_full, 0)
    xs = np.zeros((T, D), np.float32)
    parts, p = [], 0
    for n in (1, 5, 1, 1, 9, 13):
        y, _ = kern.forward(h[p:p + n], canon[:p + n], p, xs, p)
        parts.append(y)
        p += n
    np.testing.assert_array_equal(np.concatenate(parts), y_full)
    np.testing.assert_array_equal(xs, xs_full)


def test_zero_table_adds_exactly_zero():
    em, _ = tiny_engram(random_tables=False)
    kern = _kernel(em, 1)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((6, em.cfg.hidden_size)).astype(np.float32)
    xs = np.zeros((6, em.cfg.hidden_size), np.float32)
    y, _ = kern.forward(h, rng.integers(0, 97, 6), 0, xs, 0)
    assert not y.any()


def test_overrides_apply_only_to_their_exact_key():
    em = _randomised()
    layer = 2
    T, D = 8, em.cfg.hidden_size
    ids = torch.arange(10, 10 + T)[None]
    rows, keys = em.addresses(ids)[layer]
    canon = em.canonical(ids)[0]
    # replace the rows of position 5 (its own exact keys) with large values
    r5, k5 = rows[0, 5].numpy(), keys[0, 5].numpy()
    vals = np.full((len(r5), em.cfg.head_dim), 4.0, np.float16)
    ov = native.OverrideSet.build(r5, vals, k5)
    base, over = _kernel(em, layer), _kernel(em, layer, [ov])
    h = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    y0, _ = base.forward(h, canon, 0, np.zeros((T, D), np.float32), 0)
    y1, hits = over.forward(h, canon, 0, np.zeros((T, D), np.float32), 0)
    assert hits == len(r5)
    np.testing.assert_array_equal(y0[:5], y1[:5])          # before: untouched
    assert np.abs(y0[5] - y1[5]).max() > 1e-3              # the written position changes
    # and the same rows looked up under other keys (a collision) are not served
    wrong = native.OverrideSet.build(r5, vals, k5 + 1)
    y2, hits2 = _kernel(em, layer, [wrong]).forward(h, canon, 0, np.zeros((T, D), np.float32), 0)
    assert hits2 == 0
    np.testing.assert_array_equal(y0, y2)


def test_forward_rejects_bad_arguments():
    em = _randomised()
    kern = _kernel(em, 1)
    D = em.cfg.hidden_size
    h = np.zeros((4, D), np.float32)
    with pytest.raises(ValueError, match="h must be"):
        kern.forward(np.zeros((4, D + 1), np.float32), np.zeros(4, np.int64), 0, np.zeros((4, D), np.float32), 0)
    with pytest.raises(native.KernelError):     # xs too short for the rows to write
        kern.forward(h, np.zeros(4, np.int64), 0, np.zeros((3, D), np.float32), 0)
    with pytest.raises(native.KernelError):     # ids too short
        kern.forward(h, np.zeros(3, np.int64), 0, np.zeros((4, D), np.float32), 0)
    with pytest.raises(native.KernelError):     # canonical id outside the hash vocabulary
        kern.forward(h, np.full(4, 10_000, np.int64), 0, np.zeros((4, D), np.float32), 0)
    with pytest.raises(ValueError, match="w_k"):
        lay = em.engram["1"]
        native.EngramLayerKernel(kern.table, [], em.layout.kernel_args(1), w_k=np.zeros((D, 3), np.float32),
                                 w_v=np.zeros((D, 3), np.float32), norm_q=np.ones(D), norm_k=np.ones(D),
                                 norm_v=np.ones(D), conv=lay.conv.weight.detach().numpy(), eps=1e-5, dilation=3)


def _runtime(em, n_ctx=16, max_tokens=4):
    kernels = [_kernel(em, l) for l in em.cfg.layer_ids]
    noop = {k: 1 for k in ("get_name", "nelements", "nbytes", "tensor_get", "tensor_set", "is_contiguous")}  # never called here
    return native.EngramRuntime(kernels, list(em.cfg.layer_ids), em.canonical_map.numpy(), n_ctx, max_tokens, noop)


def test_runtime_bookkeeping_and_loud_failures():
    em = _randomised()
    rt = _runtime(em)
    assert rt.n_past == 0 and rt.status == 0
    rt.begin([1, 2, 3])
    # no llama.cpp graph ran: the Engram layers did not fire, so commit must fail loudly
    with pytest.raises(native.EngramRuntimeError, match=r"no node l_out-0 .*llama-cpp-python changed"):
        rt.commit()
    with pytest.raises(native.EngramRuntimeError):   # stays failed until reset
        rt.begin([1])
    rt.reset()
    rt.enabled = False                               # plain backbone: nothing to check
    rt.begin([1, 2, 3, 4])
    rt.commit()
    assert rt.n_past == 4
    with pytest.raises(native.EngramRuntimeError, match="batch of 5 tokens"):
        rt.begin([1] * 5)
    rt.reset()
    for _ in range(4):
        rt.begin([1, 2, 3, 4])
        rt.commit()
    with pytest.raises(native.EngramRuntimeError, match="context full"):
        rt.begin([1])
    rt.reset()
    with pytest.raises(native.EngramRuntimeError, match="outside the canonical map"):
        rt.begin([10_000])
    rt.reset()
    rt.begin([1, 2])
    rt.commit()
    rt.truncate(1)
    assert rt.n_past == 1
    with pytest.raises(native.EngramRuntimeError):
        rt.truncate(5)
