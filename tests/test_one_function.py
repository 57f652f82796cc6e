"""One model function per MODEL_DIR setting: every consumer takes its weights from one file.

Skill on = backbone-skill.gguf (the adapter folded in by the one merge rule, model.lora.merge_into),
skill off = backbone.gguf; llama.cpp decodes the file and torch loads the same file dequantized.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_local import constants
from tests.runtime_fixtures import shared_model_dir


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Path:
    return shared_model_dir(tmp_path_factory, "model", adapter=True)


def _copy(md: Path, dest: Path, folded: str | None) -> Path:
    """A MODEL_DIR like `md` whose backbone-skill.gguf is folded as `folded` (None: absent)."""
    from engram_local.convert.adapter import merge_lora_into_backbone

    dest.mkdir()
    for name in (constants.MODEL_DIR_BACKBONE, constants.MODEL_DIR_ENGRAM, constants.MODEL_DIR_ADAPTER):
        shutil.copyfile(md / name, dest / name)
    if folded is not None:
        merge_lora_into_backbone(dest / constants.MODEL_DIR_BACKBONE, dest / constants.MODEL_DIR_ADAPTER,
                                 dest / constants.MODEL_DIR_SKILL_BACKBONE, folded)
    return dest


def _q_proj(em) -> np.ndarray:
    return em.backbone.model.layers[0].self_attn.q_proj.weight.detach().numpy().copy()


def test_merge_rule_is_one_rule():
    """remove_lora(merge=True), the loader's merge and the fold compute the same bits."""
    from engram_local.model import lora

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    a, b = torch.randn(8, 96, generator=g) * 0.1, torch.randn(64, 8, generator=g) * 0.1
    merged = lora.merge_into(w.clone(), a, b, 0.75)
    want = (w.double() + 0.75 * (b.double() @ a.double())).float()
    assert torch.equal(merged, want)
    lin = torch.nn.Sequential(torch.nn.Linear(96, 64, bias=False))
    lin[0].weight.data = w.clone()
    lora.add_lora(lin, r=8, alpha=6.0, targets=("0",))
    with torch.no_grad():
        lin[0].lora_A.copy_(a), lin[0].lora_B.copy_(b)
    lora.remove_lora(lin, merge=True)
    assert torch.equal(lin[0].weight.data, want)


def test_model_dir_names_the_gguf_of_each_setting(md, tmp_path):
    from engram_local.runtime.loader import ModelDir

    d = ModelDir.at(md)
    assert d.backbone_gguf(True) == d.skill_backbone == md.resolve() / constants.MODEL_DIR_SKILL_BACKBONE
    assert d.backbone_gguf(False) == d.backbone and d.unfolded_adapter(True) is None
    old = ModelDir.at(_copy(md, tmp_path / "old", None))          # written before the fold existed
    assert old.backbone_gguf(True) == old.backbone and old.unfolded_adapter(True) == old.adapter
    assert old.unfolded_adapter(False) is None


def test_torch_loads_the_folded_file_llama_cpp_decodes(md, tmp_path):
    """Quantized fold: torch's weights are the file's, dequantized (not an fp32 merge); an old
    MODEL_DIR without the fold gets the fp32 merge, which equals the F32 fold bit for bit."""
    import gguf

    from engram_local.convert import for_gguf
    from engram_local.formats.header import scan_gguf
    from engram_local.runtime.loader import load_model

    q51 = _copy(md, tmp_path / "q5_1", "q5_1")
    em, _, info = load_model(q51)
    t = {t.name: t for t in gguf.GGUFReader(str(info.skill_backbone)).tensors}["blk.0.attn_q.weight"]
    assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.Q5_1
    arch = for_gguf("llama")
    cfg = arch.config_from_gguf(scan_gguf(info.backbone).fields)
    want = arch.from_gguf_rows(t.name, gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q5_1), cfg)
    np.testing.assert_array_equal(_q_proj(em), want.astype(np.float32))

    folded, _, _ = load_model(md)                                  # F32 fold
    old, _, old_info = load_model(_copy(md, tmp_path / "old", None))
    assert old_info.skill_backbone is None
    np.testing.assert_array_equal(_q_proj(old), _q_proj(folded))
    assert np.abs(_q_proj(em) - _q_proj(folded)).max() > 0        # Q5_1 is another function


def test_sessions_of_both_backends_read_the_setting_file(md, tmp_path):
    """Session skill on/off: llama.cpp and torch agree on the F32 tiny model, and a MODEL_DIR whose
    folded file differs from adapter.gguf runs the folded file on both backends."""
    pytest.importorskip("llama_cpp")
    from engram_local.runtime.session import Session

    q51 = _copy(md, tmp_path / "q5_1", "q5_1")
    out = {}
    for model in (md, q51):
        for skill in (True, False):
            for backend in ("llama.cpp", "torch"):
                s = Session(model, backend=backend, skill=skill, n_ctx=64, n_threads=1, kv_f32=True)
                try:
                    out[model, skill, backend] = s.backend.eval(s.tokenize("The capital of France is"))
                finally:
                    s.close()
    for model in (md, q51):
        for skill in (True, False):
            # Q5_1 weights: llama.cpp rounds activations to 8 bits in those matmuls, torch does not
            atol = 2e-4 if model == md else 0.1
            np.testing.assert_allclose(out[model, skill, "llama.cpp"], out[model, skill, "torch"], atol=atol)
    for backend in ("llama.cpp", "torch"):
        np.testing.assert_array_equal(out[md, False, backend], out[q51, False, backend])   # same backbone.gguf
        assert np.abs(out[md, True, backend] - out[q51, True, backend]).max() > 1e-5    # the folded file counts


def test_head_to_head_folds_an_explicit_adapter(md, tmp_path):
    """E/F run a MODEL_DIR's skill-on setting: its own, or one with --adapter folded in."""
    from engram_local.eval.head_to_head import HeadToHead, Settings

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (constants.MODEL_DIR_BACKBONE, constants.MODEL_DIR_ENGRAM):
        os.symlink(md / name, bare / name)
    own = HeadToHead(md, Settings(conditions=("E",)), log=lambda m: None)
    own.work = tmp_path / "w1"
    assert own._skill_model_dir().path == own.md.path
    other = HeadToHead(bare, Settings(conditions=("E",)), adapter=md / constants.MODEL_DIR_ADAPTER,
                       log=lambda m: None)
    other.work = tmp_path / "w2"
    skill_md = other._skill_model_dir()
    assert skill_md.path.parent == other.work and skill_md.skill_backbone is not None
    assert skill_md.skill_backbone.read_bytes() == (md / constants.MODEL_DIR_SKILL_BACKBONE).read_bytes()
    assert other._skill_model_dir() is skill_md
