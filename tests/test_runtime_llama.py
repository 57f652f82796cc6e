"""The llama.cpp backend (Engram in llama.cpp's eval callback) against the torch backend.

A tiny F32 llama GGUF + Engram sidecar + LoRA adapter is built once (tests/runtime_fixtures.py);
with an F32 backbone and an F32 KV cache both backends compute the same function, so logits must
agree to float rounding, through prefill, decode, roll-backs and user overrides.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from engram_local.runtime import llama_backend
from engram_local.formats.sidecar import open_sidecar  # noqa: E402
from engram_local.runtime.session import RunError, Session  # noqa: E402
from engram_local.runtime.sampling import Sampler  # noqa: E402
from tests.runtime_fixtures import shared_model_dir, synthetic_overrides  # noqa: E402

TEXT = "The capital of France is Paris. My doctor is Dr. Krause and my usual coffee order is"
ATOL = 2e-4


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Path:
    return shared_model_dir(tmp_path_factory, "model", adapter=True)


@pytest.fixture(scope="module")
def sessions(md):
    lb = Session(md, backend="llama.cpp", n_ctx=256, n_threads=1, kv_f32=True)
    tb = Session(md, backend="torch", n_ctx=256, n_threads=1)
    yield lb, tb
    lb.close()
    tb.close()


def test_pinned_llama_cpp_python_and_node_names(md):
    """The graph nodes the callback reads exist in this llama.cpp (fail loudly if renamed)."""
    assert llama_cpp.__version__ == llama_backend.PINNED_LLAMA_CPP_PYTHON, (
        f"llama-cpp-python {llama_cpp.__version__} is not the pinned "
        f"{llama_backend.PINNED_LLAMA_CPP_PYTHON}: check the graph node names (l_out-N) first")
    sc = open_sidecar(md / "engram.gguf")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    names = []

    def cb(t, ask, ud):
        names.append(lib.ggml_get_name(t).decode())
        return False

    cbf = llama_cpp.ggml_backend_sched_eval_callback(cb)
    llama_backend.quiet_llama_logs()
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(md / "backbone.gguf").encode(),
                                                 llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 64, 8, 8, 1, 1
    cp.cb_eval = cbf
    ctx = llama_cpp.llama_init_from_model(model, cp)
    try:
        toks = (llama_cpp.llama_token * 3)(5, 6, 7)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(toks, 3)) == 0
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    for layer in sc.config.layer_ids:
        node = llama_backend.node_name(layer)
        assert node in names, (f"llama.cpp graph has no node {node} — the pinned llama-cpp-python changed? "
                               f"(nodes seen: {sorted(set(names))[:20]} ...)")


def test_run_uses_llama_cpps_flash_attention_default_except_for_exact_comparisons(md, sessions):
    """`run` decodes with llama.cpp's default flash attention (auto); kv_f32 sessions, which the
    torch comparisons here use, keep it off (docs/runtime.md)."""
    s = Session(md, backend="llama.cpp", n_ctx=64, n_threads=1)
    try:
        assert s.backend.flash_attn is None
        a = s.generate(s.backend.tokenize("The capital of France is"), 6, Sampler(temp=0.0), ignore_eos=True)
        assert len(a.tokens) == 6
    finally:
        s.close()
    assert sessions[0].backend.flash_attn is False


def test_use_backend_decodes_through_the_new_backend(md):
    """Session.use_backend swaps the backend under the engine (the old one is closed)."""
    s = Session(md, backend="llama.cpp", n_ctx=64, n_threads=1, kv_f32=True)
    ref = Session(md, backend="llama.cpp", n_ctx=64, n_threads=1, kv_f32=True)
    try:
        old = s.backend
        s.use_backend(llama_backend.LlamaCppBackend(s.model_dir.backbone_gguf(True), sidecar=s.sidecar,
                                                    overrides=s.overrides, n_ctx=64, n_threads=1, kv_f32=True))
        assert s.backend is not old and s.engine.backend is s.backend
        ids = ref.backend.tokenize("The capital of France is")
        got = s.generate(ids, 5, Sampler(temp=0.0), ignore_eos=True).tokens
        assert got == ref.generate(ids, 5, Sampler(temp=0.0), ignore_eos=True).tokens
    finally:
        s.close()
        ref.close()


def test_tokenizers_agree(sessions):
    lb, tb = sessions
    for text in (TEXT, "Hello world!  Numbers 12345; symbols @#$.", "<|im_start|>user\nhi<|im_end|>\n", " x"):
        assert lb.backend.tokenize(text) == tb.backend.tokenize(text), text
    msgs = [{"role": "user", "content": "My doctor is"}]
    assert lb.render(msgs) == tb.render(msgs)
    assert lb.tokenize("My doctor is", chat=True) == tb.tokenize("My doctor is", chat=True)


def test_prefill_decode_and_rollback_agree_with_torch(sessions):
    lb, tb = sessions
    a_be, b_be = lb.backend, tb.backend
    a_be.reset(), b_be.reset()
    ids = a_be.tokenize(TEXT)
    # prefill in two uneven chunks
    np.testing.assert_allclose(a_be.eval(ids[:7]), b_be.eval(ids[:7]), atol=ATOL, rtol=1e-4)
    a, b = a_be.eval(ids[7:]), b_be.eval(ids[7:])
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4)
    for _ in range(6):                                    # decode: same greedy tokens, same logits
        t = int(np.argmax(a))
        assert t == int(np.argmax(b))
        a, b = a_be.eval([t]), b_be.eval([t])
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4)
    # roll both back into the middle of the prompt and continue differently
    a_be.truncate(9), b_be.truncate(9)
    a, b = a_be.eval(ids[9:12]), b_be.eval(ids[9:12])
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4)
    fresh = a_be.tokens[:]
    a_be.reset()
    np.testing.assert_allclose(a_be.eval(fresh), a, atol=1e-5, rtol=1e-5)
    # all positions at once equal the torch model's full forward
    a_be.reset(), b_be.reset()
    np.testing.assert_allclose(a_be.eval(ids, all_logits=True), b_be.eval(ids, all_logits=True),
                               atol=ATOL, rtol=1e-4)


def test_small_batches_equal_one_batch(md):
    """Prompts longer than n_batch go through several llama_decode calls (one ubatch each)."""
    sc = open_sidecar(md / "engram.gguf")
    big = llama_backend.LlamaCppBackend(md / "backbone.gguf", sidecar=sc, n_ctx=128, n_batch=64, n_threads=1, kv_f32=True)
    small = llama_backend.LlamaCppBackend(md / "backbone.gguf", sidecar=sc, n_ctx=128, n_batch=3, n_threads=1, kv_f32=True)
    ids = big.tokenize(TEXT)
    np.testing.assert_allclose(big.eval(ids), small.eval(ids), atol=1e-5, rtol=1e-5)
    assert small.runtime.n_calls == 2 * -(-len(ids) // 3)
    big.close(), small.close()


def test_weights_read_into_memory_under_the_huge_page_tunable_give_the_same_logits(md, monkeypatch):
    """runtime.pages: with glibc's malloc huge-page tunable in the environment the backend reads
    the weights into memory instead of mapping the file; the function is the same."""
    from engram_local.runtime import pages

    sc = open_sidecar(md / "engram.gguf")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    mapped = llama_backend.LlamaCppBackend(md / "backbone.gguf", sidecar=sc, n_ctx=64, n_threads=1, kv_f32=True)
    monkeypatch.setenv("GLIBC_TUNABLES", pages.TUNABLE)
    read = llama_backend.LlamaCppBackend(md / "backbone.gguf", sidecar=sc, n_ctx=64, n_threads=1, kv_f32=True)
    assert (mapped.load_mode, read.load_mode) == ("mmap", "read")
    ids = mapped.tokenize(TEXT)
    assert np.array_equal(mapped.eval(ids), read.eval(ids))
    mapped.close(), read.close()


def test_generation_reuses_the_kv_cache_across_turns(sessions):
    lb, tb = sessions
    for s in (lb, tb):
        s.reset()
        greedy = Sampler(temp=0)
        turn1 = s.tokenize_rendered(s.render([{"role": "user", "content": "Hello world!"}]))
        g1 = s.generate(turn1, 5, greedy)
        assert g1.timings.prompt_tokens == len(turn1)
        msgs = [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": g1.text},
                {"role": "user", "content": "My doctor is"}]
        turn2 = s.tokenize_rendered(s.render(msgs))
        g2 = s.generate(turn2, 5, greedy)
        cached = len(turn1)            # at least the first turn's prompt was reused
        assert g2.timings.prompt_tokens <= len(turn2) - cached
        s.reset()
        g2_fresh = s.generate(turn2, 5, greedy)
        assert g2_fresh.tokens == g2.tokens and g2_fresh.timings.prompt_tokens == len(turn2)
    assert lb.generate(turn2, 5, Sampler(temp=0)).tokens == tb.generate(turn2, 5, Sampler(temp=0)).tokens


def test_overrides_change_only_positions_that_hit_their_rows(md, tmp_path):
    sc = open_sidecar(md / "engram.gguf")
    base = Session(md, backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    hit_text = "My usual coffee order is a cortado"
    hit_ids = base.backend.tokenize(hit_text)
    eov = tmp_path / "me.eov"
    synthetic_overrides(md, eov, hit_ids[:4], sc.config.write_layer, scale=5.0)
    mem = Session(md, overrides=[eov], backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    torch_mem = Session(md, overrides=[eov], backend="torch", n_ctx=128, n_threads=1)
    a0 = base.backend.eval(hit_ids, all_logits=True)
    a1 = mem.backend.eval(hit_ids, all_logits=True)
    # the written rows are those of positions 0..3 (their exact N-gram keys)
    assert np.abs(a0[:4] - a1[:4]).max() > 1e-2
    assert mem.backend.runtime.n_hits > 0
    np.testing.assert_allclose(torch_mem.backend.eval(hit_ids, all_logits=True), a1, atol=ATOL, rtol=1e-4)
    # text that never forms those N-grams is bit-identical
    other = base.backend.tokenize("Hello world! How are you today?")
    base.reset(), mem.reset()
    hits_before = mem.backend.runtime.n_hits
    np.testing.assert_array_equal(base.backend.eval(other, all_logits=True), mem.backend.eval(other, all_logits=True))
    assert mem.backend.runtime.n_hits == hits_before
    for s in (base, mem, torch_mem):
        s.close()


def test_stacked_override_files_later_wins(md, tmp_path):
    sc = open_sidecar(md / "engram.gguf")
    probe = Session(md, backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    ids = probe.backend.tokenize("My doctor is Dr. Krause")
    probe.close()
    first, second = tmp_path / "org.eov", tmp_path / "me.eov"
    synthetic_overrides(md, first, ids, sc.config.write_layer, seed=1)
    synthetic_overrides(md, second, ids, sc.config.write_layer, seed=2)   # same rows, other values
    both = Session(md, overrides=[first, second], backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    only2 = Session(md, overrides=[second], backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    only1 = Session(md, overrides=[first], backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    a, b, c = (s.backend.eval(ids, all_logits=True) for s in (both, only2, only1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    for s in (both, only2, only1):
        s.close()


def test_override_file_of_another_model_is_refused(md, tmp_path):
    from engram_local.formats.eov import write_override_file

    bad = tmp_path / "other.eov"
    write_override_file(bad, {1: (np.array([1]), None, np.zeros((1, 8), np.float16))}, 12345)
    with pytest.raises(RunError, match="belongs to another model"):
        Session(md, overrides=[bad], backend="llama.cpp")
    with pytest.raises(RunError, match="not found"):
        Session(md, overrides=[tmp_path / "missing.eov"], backend="llama.cpp")
    junk = tmp_path / "junk.eov"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(RunError, match="junk.eov"):
        Session(md, overrides=[junk], backend="llama.cpp")


def test_skill_adapter_is_applied(md, sessions):
    lb, _ = sessions
    no_skill = Session(md, backend="llama.cpp", skill=False, n_ctx=128, n_threads=1, kv_f32=True)
    no_skill_torch = Session(md, backend="torch", skill=False, n_ctx=128, n_threads=1)
    ids = lb.backend.tokenize(TEXT)
    lb.reset()
    with_skill = lb.backend.eval(ids)
    without = no_skill.backend.eval(ids)
    assert np.abs(with_skill - without).max() > 1e-3
    np.testing.assert_allclose(no_skill_torch.backend.eval(ids), without, atol=ATOL, rtol=1e-4)
    no_skill.close(), no_skill_torch.close()


def test_engram_off_is_the_plain_backbone(md):
    sc = open_sidecar(md / "engram.gguf")
    plain = llama_backend.LlamaCppBackend(md / "backbone.gguf", n_ctx=64, n_threads=1, kv_f32=True)
    eng = llama_backend.LlamaCppBackend(md / "backbone.gguf", sidecar=sc, n_ctx=64, n_threads=1, kv_f32=True)
    ids = plain.tokenize(TEXT)[:20]
    ref = plain.eval(ids)
    assert np.abs(eng.eval(ids) - ref).max() > 1e-3
    eng.reset()
    eng.runtime.enabled = False
    np.testing.assert_array_equal(eng.eval(ids), ref)
    plain.close(), eng.close()


def test_prompt_longer_than_context_is_an_error(md):
    s = Session(md, backend="llama.cpp", n_ctx=16, n_threads=1)
    ids = s.tokenize(TEXT * 3)
    from engram_local.runtime.session import PromptTooLong

    with pytest.raises(PromptTooLong, match="context holds 16"):
        s.generate(ids, 4, Sampler(temp=0))
    # a prompt that fits but leaves little room stops at the full context with a notice
    notes = []
    s.log = notes.append
    g = s.generate(ids[:12], 50, Sampler(temp=0))
    assert g.stop == "context" and len(g.tokens) == 16 - 12 + 1 and "full" in notes[-1]
    s.close()


def test_engram_at_layer_zero_reads_the_embedding_node(tmp_path_factory):
    """Layer 0's input is llama.cpp's `embd` node, not an l_out."""
    md0 = shared_model_dir(tmp_path_factory, "model-layer0", layer_ids=(0, 2), write_layer=2)
    a = Session(md0, backend="llama.cpp", n_ctx=64, n_threads=1, kv_f32=True)
    b = Session(md0, backend="torch", n_ctx=64, n_threads=1)
    ids = a.backend.tokenize(TEXT)
    np.testing.assert_allclose(a.backend.eval(ids, all_logits=True), b.backend.eval(ids, all_logits=True),
                               atol=ATOL, rtol=1e-4)
    assert a.backend.runtime.n_calls == 2
    a.close(), b.close()
