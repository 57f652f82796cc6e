"""Engram module mechanics on tiny random-weight Llama configs."""

import numpy as np
import pytest
import torch

from engram_local.text.canonical import build_canonical_map, normalize
from engram_local.native.hashing import hash_ids
from engram_local.model.engram import EngramLayer
from engram_local.native.reference import hash_layer_ref
from tests.tiny import tiny_engram, tiny_tokenizer


def ids(B=2, T=12, seed=1, vocab=120):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, size=(B, T)))


def test_shapes():
    em, _ = tiny_engram(random_tables=True)
    x = ids()
    rows = em.rows(x)
    assert set(rows) == {1, 2}
    assert rows[1].shape == (2, 12, em.cfg.n_columns) and rows[1].dtype == torch.int64
    mem = em.memory(rows)
    assert mem[2].shape == (2, 12, em.cfg.memory_dim)
    y, state = em.engram["2"](torch.randn(2, 12, 64), mem[2])
    assert y.shape == (2, 12, 64) and state.shape == (2, em.engram["2"].conv_history, 64)
    assert em(x).logits.shape == (2, 12, 120)


def test_zero_tables_equal_backbone_exactly():
    em, _ = tiny_engram(random_tables=False)
    x = ids()
    with torch.no_grad():
        assert torch.equal(em(x).logits, em.backbone(input_ids=x).logits)


def test_engram_off_equals_backbone_and_on_differs():
    em, _ = tiny_engram(random_tables=True)
    x = ids()
    with torch.no_grad():
        base = em.backbone(input_ids=x).logits
        on = em(x).logits
        em.enabled = False
        off = em(x).logits
    assert torch.equal(off, base)
    assert not torch.allclose(on, base)


def test_gradients_reach_only_engram_parameters():
    em, _ = tiny_engram(random_tables=True)
    x = ids()
    logits = em(x).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 120), x[:, 1:].reshape(-1)).backward()
    assert all(p.grad is None and not p.requires_grad for p in em.backbone.parameters())
    for name, p in em.engram.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hook_adds_engram_at_the_input_of_its_layer():
    """The term enters before attention of layer l: input(l) = output(l-1) + y."""
    em, _ = tiny_engram(layer_ids=(2,), write_layer=2, random_tables=True)
    layers = em.backbone.model.layers
    seen = {}
    h1 = layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("out1", out[0] if isinstance(out, tuple) else out))
    h2 = layers[2].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("in2", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    x = ids()
    with torch.no_grad():
        em(x)
        y, _ = em.engram["2"](seen["out1"], em.memory(em.rows(x))[2])
    h1.remove(), h2.remove()
    assert torch.equal(seen["in2"], seen["out1"] + y)
    assert not torch.equal(seen["in2"], seen["out1"])


def test_chunked_with_conv_state_equals_full_sequence():
    em, _ = tiny_engram(random_tables=True)
    layer: EngramLayer = em.engram["2"]
    h = torch.randn(1, 20, 64)
    e = torch.randn(1, 20, em.cfg.memory_dim)
    with torch.no_grad():
        full, _ = layer(h, e)
        a, st = layer(h[:, :7], e[:, :7])
        b, st = layer(h[:, 7:8], e[:, 7:8], st)
        c, _ = layer(h[:, 8:], e[:, 8:], st)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-5, atol=1e-6)


def test_module_rows_equal_numpy_reference_hash():
    em, cmap = tiny_engram()
    x = ids(B=1, T=30)
    canon = cmap[x[0].numpy()]
    for layer in em.cfg.layer_ids:
        args = em.layout.kernel_args(layer)
        args.pop("vocab")                                   # the reference does no range checks
        ref, _ = hash_layer_ref(canon, **args)
        assert np.array_equal(em.rows(x)[layer][0].numpy(), ref)
        assert np.array_equal(hash_ids(em.layout, canon, layer), ref)


def test_decode_history_rows_equal_full_sequence_rows():
    em, cmap = tiny_engram()
    x = ids(B=1, T=10)
    full = em.rows(x)[2][0]
    canon = cmap[x[0].numpy()]
    tail = em.rows(x[:, 6:], history=canon[None, 4:6])[2][0]
    assert torch.equal(tail, full[6:])


def test_normalize_rules():
    assert normalize("  Café\t\n") == "cafe"
    assert normalize("DOCTOR") == normalize(" doctor") == "doctor"
    assert normalize("   ") == " " and normalize("\n") == " "
    assert normalize("ﬁ") == "fi"                      # NFKC ligature


def test_canonical_map_is_dense_surjective_first_appearance():
    tok = tiny_tokenizer()
    cmap, n = build_canonical_map(tok)
    assert cmap.shape == (len(tok),) and cmap.dtype == np.int64
    assert set(cmap.tolist()) == set(range(n))          # dense and onto
    first = [int(np.argmax(cmap == c)) for c in range(n)]
    assert first == sorted(first)                      # ids assigned in order of first raw id
    v = tok.get_vocab()
    assert cmap[v["the"]] == cmap[v["The"]] == cmap[v["THE"]]
    assert cmap[v["café"]] == cmap[v["cafe"]]
    assert cmap[v[" "]] == cmap[v["  "]] == cmap[v["\n"]]
    assert cmap[v["doctor"]] != cmap[v["the"]]
    assert n < len(tok)


def test_write_layer_must_be_an_engram_layer():
    with pytest.raises(ValueError, match="write_layer"):
        tiny_engram(layer_ids=(1,), write_layer=2)


def test_qwen2_backbone_attaches_too():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engram_local.model.engram import EngramConfig, EngramModel

    torch.manual_seed(0)
    bb = Qwen2ForCausalLM(Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)).eval()
    cfg = EngramConfig(hidden_size=64, compressed_vocab_size=120, pad_id=0, layer_ids=[1, 2],
                       write_layer=2, head_dim=8, vocab_size_per_ngram=[50, 50])
    em = EngramModel(bb, cfg, np.arange(120))
    x = ids()
    with torch.no_grad():
        assert torch.equal(em(x).logits, bb(input_ids=x).logits)       # zero tables
        for layer in em.engram.values():
            layer.table.normal_()
        assert not torch.allclose(em(x).logits, bb(input_ids=x).logits)
