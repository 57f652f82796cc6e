"""The shared skill adapter: LoRA mechanics, training samples, and train-skill end to end on a
tiny MODEL_DIR (adapter GGUF loaded by stock llama.cpp, same logits as torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_local.model import lora
from engram_local.memory.facade import NewFact
from engram_local.train.skill import (ECHO_KINDS, RECITE_KINDS, SkillSettings, Tokens, build_samples, recitations,
                                      train_skill, user_files)
from tests.runtime_fixtures import shared_model_dir
from tests.tiny import tiny_backbone


# --------------------------------------------------------------------------- LoRA

def test_lora_starts_as_the_identity_and_only_adapters_train():
    m = tiny_backbone()
    x = torch.randint(0, 100, (2, 7))
    ref = m(x).logits
    names = lora.add_lora(m, r=4, alpha=8)
    assert len(names) == 3 * 4 and all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj") for n in names)
    torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=0)     # B = 0
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert lora.n_parameters(m) == sum(p.numel() for p in lora.lora_parameters(m))
    with pytest.raises(ValueError, match="already carries"):
        lora.add_lora(m, r=4, alpha=8)


def test_lora_save_load_merge_round_trip(tmp_path):
    m = tiny_backbone()
    lora.add_lora(m, r=4, alpha=8, seed=3)
    with torch.no_grad():
        for p in lora.lora_parameters(m):
            p.normal_(std=0.2)
    x = torch.randint(0, 100, (1, 9))
    want = m(x).logits
    lora.save_peft(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    fresh = tiny_backbone()
    lora.load_peft(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x).logits, want, rtol=0, atol=0)
    lora.set_lora_enabled(fresh, False)
    torch.testing.assert_close(fresh(x).logits, tiny_backbone()(x).logits, rtol=0, atol=0)
    lora.set_lora_enabled(fresh, True)
    lora.remove_lora(fresh, merge=True)
    assert not lora.lora_modules(fresh)
    torch.testing.assert_close(fresh(x).logits, want, rtol=1e-4, atol=1e-5)


def test_lora_load_rejects_a_foreign_adapter(tmp_path):
    m = tiny_backbone(hidden=64)
    lora.add_lora(m, r=2, alpha=4)
    lora.save_peft(m, tmp_path / "a")
    other = tiny_backbone(hidden=32)
    with pytest.raises(ValueError, match="expected"):
        lora.load_peft(other, tmp_path / "a")
    assert not lora.lora_modules(other)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_peft(other, tmp_path)


# --------------------------------------------------------------------------- samples

def test_recitation_leads_with_the_fact_that_names_the_subject():
    facts = [NewFact("My name is", "Maya Weber", "name"), NewFact("Maya Weber was born in", "1982", "by"),
             NewFact("My spouse is", "Avery", "sp"), NewFact("Avery was born in", "1978", "sy"),
             NewFact("My shoe size is", "7", "shoe"), NewFact("My monthly rent is $", "2200", "rent")]
    r = recitations(facts)
    assert r["name"] == "My name is Maya Weber."
    assert r["by"] == "My name is Maya Weber. Maya Weber was born in 1982."
    assert r["sy"] == "My spouse is Avery. Avery was born in 1978."
    assert r["shoe"] == "My shoe size is 7."          # short answers never lead
    assert r["rent"] == "My monthly rent is $2200."    # no space after an opening "$"


def _user(uid: str, name: str, spouse: str, year: int) -> dict:
    return {"uid": uid, "facts": [
        {"key": "name", "answer": name, "paraphrases": [f"My name is {name}."]},
        {"key": "spouse_name", "answer": spouse, "paraphrases": [f"My spouse is {spouse}."]},
        {"key": "spouse_year", "answer": year, "paraphrases": [f"{spouse} was born in {year}."]}],
        "direct_qa": [{"key": "name", "question": "What is my name?", "answer": name},
                      {"key": "spouse_year", "question": "When was my spouse born?", "answer": str(year)}],
        "indirect_qa": [{"schema": "AGE", "question": "How old is my spouse?", "answer": str(2026 - year),
                         "required_fact_keys": ["spouse_name", "spouse_year"]}]}


@pytest.fixture(scope="module")
def users_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("users")
    (d / "u1.json").write_text(json.dumps(_user("u1", "Ann Lee", "Bo", 1980)))
    (d / "u2.json").write_text(json.dumps(_user("u2", "Cy Dorn", "Eve", 1975)))
    return d


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Path:
    return shared_model_dir(tmp_path_factory, "skill-model")


def test_samples_put_the_loss_on_the_reply_only(md, users_dir):
    from engram_local.runtime.loader import load_model

    _, tok, _ = load_model(md)
    s = SkillSettings(kinds=RECITE_KINDS)
    samples = build_samples(user_files([users_dir]), tok, s)
    kinds = {k: [x for x in samples if x.kind == k] for k in s.kinds}
    assert [len(kinds[k]) for k in ("fact", "chat", "qa", "reason")] == [6, 4, 4, 2]
    t = Tokens(tok)
    for x in samples:
        assert len(x.ids) == len(x.labels)
        tail = [i for i, lab in zip(x.ids, x.labels) if lab != -100]
        assert tail == x.ids[len(x.ids) - len(tail):]          # the reply is a suffix
    chat = kinds["chat"][1]
    text = tok.decode(chat.ids)
    assert "When was my spouse born?" in text and text.endswith("My spouse is Bo. Bo was born in 1980." + t.eos_text)
    assert tok.decode([i for i, lab in zip(chat.ids, chat.labels) if lab != -100]) == \
        "My spouse is Bo. Bo was born in 1980." + t.eos_text
    reason = kinds["reason"][0]
    assert tok.decode(reason.ids).startswith("Facts: My spouse is Bo. Bo was born in 1980.\nQ: How old is my spouse?\nA:")
    assert tok.decode([i for i, lab in zip(reason.ids, reason.labels) if lab != -100]) == " 46"


def test_keep_samples_are_the_models_own_answer_to_plain_questions(md, users_dir):
    """The "keep" kind: each indirect question as "Q:/A:", its reply whatever `complete` (the
    model without the adapter) says there, in the loss; without `complete` it is an error."""
    from engram_local.runtime.loader import load_model

    _, tok, _ = load_model(md)
    s = SkillSettings(kinds=("keep",), keep_tokens=3)
    seen = []

    def complete(ids, n):
        seen.append(list(ids))
        return [7, 8, 9][:n]

    samples = build_samples(user_files([users_dir]), tok, s, complete=complete)
    assert len(samples) == len(seen) == 2 and {x.kind for x in samples} == {"keep"}
    t = Tokens(tok)
    for x, ctx in zip(samples, seen):
        assert x.ids == ctx + [7, 8, 9] and x.labels == [-100] * len(ctx) + [7, 8, 9]
        assert ctx[:len(t.bos)] == t.bos and tok.decode(ctx[len(t.bos):]).startswith("Q: How old is my ")
        assert tok.decode(ctx).endswith("?\nA:")
    with pytest.raises(ValueError, match="need the model"):
        build_samples(user_files([users_dir]), tok, s)


def test_the_adapter_names_the_chat_forms_memories_are_fitted_in(md, users_dir, tmp_path):
    """train-skill writes its recipe's chat forms into the adapter GGUF; the loader hands them
    to `remember` (facade.fact_inputs); an adapter without the key keeps the recite forms."""
    from engram_local import constants
    from engram_local.convert.adapter import write_lora_adapter
    from engram_local.formats.header import GGUFFormatError, scan_gguf
    from engram_local.formats.lora_adapter import adapter_chat_forms
    from engram_local.memory import facade
    from engram_local.train.skill import chat_forms

    assert chat_forms(RECITE_KINDS) == ("recite",) and chat_forms(ECHO_KINDS) == ("echo",)
    assert SkillSettings().kinds == ECHO_KINDS and not SkillSettings().rows      # the shipped recipe
    s = SkillSettings(steps=1, batch=2, kinds=("fact", "echo"), rows=False, echo_people=2)
    out = tmp_path / "echo.gguf"
    train_skill(out, model=md, users=[users_dir], settings=s, peft_out=tmp_path / "peft", threads=1,
                progress=False, log=lambda m: None)
    assert adapter_chat_forms(out) == ("echo",)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["engram_local"]["chat_forms"] == ["echo"]

    # the loader: a MODEL_DIR with this adapter fits echo forms, one with an older adapter recite
    from engram_local.runtime.loader import load_model

    md2 = tmp_path / "md"
    md2.mkdir()
    for f in ("backbone.gguf", "engram.gguf"):
        shutil.copy(md / f, md2 / f)
    shutil.copy(out, md2 / "adapter.gguf")
    em, tok, _ = load_model(md2)
    assert em.chat_forms == ("echo",)
    fact = [NewFact("My dog is called", "Rex", "f1")]
    want = facade.fact_inputs(fact, em, tok, forms=("echo",))[0].contexts
    assert want and facade.fact_inputs(fact, em, tok)[0].contexts == want
    assert facade.fact_inputs(fact, em, tok, forms=("recite",))[0].contexts != want

    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["engram_local"]["chat_forms"]
    cfg_path.write_text(json.dumps(cfg))
    header = scan_gguf(md / "backbone.gguf")
    from engram_local.convert import registry

    arch = registry.for_gguf(header.architecture)
    write_lora_adapter(tmp_path / "peft", arch, arch.config_from_gguf(header.fields), md2 / "adapter.gguf")
    assert adapter_chat_forms(md2 / "adapter.gguf") is None
    em, tok, _ = load_model(md2)
    assert em.chat_forms is None
    assert facade.fact_inputs(fact, em, tok)[0].contexts == facade.fact_inputs(fact, em, tok, forms=("recite",))[0].contexts

    cfg["engram_local"]["chat_forms"] = ["shout"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="chat_forms"):
        write_lora_adapter(tmp_path / "peft", arch, arch.config_from_gguf(header.fields), tmp_path / "bad.gguf")
    with pytest.raises(GGUFFormatError, match="not a LoRA adapter|adapter"):
        adapter_chat_forms(md / "backbone.gguf")
    assert constants.KEY_ADAPTER_CHAT_FORMS.startswith("engram_local.")


def test_user_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        user_files([tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="no user files"):
        user_files([tmp_path])
    assert [p.name for p in user_files(None)] == [f"u0{i}.json" for i in range(20, 30)]


# --------------------------------------------------------------------------- train-skill end to end

def test_train_skill_writes_a_llama_cpp_adapter_that_matches_torch(md, users_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from engram_local.formats.lora_adapter import read_lora_adapter
    from engram_local.runtime.session import Session

    s = SkillSettings(steps=4, batch=3, lr=5e-3, kinds=RECITE_KINDS, rows=True)
    out = tmp_path / "skill.gguf"
    rep = train_skill(out, model=md, users=[users_dir], settings=s, work_dir=tmp_path / "rows",
                      peft_out=tmp_path / "peft", threads=1, progress=False, log=lambda m: None)
    assert rep.steps == 4 and rep.users == ["u1", "u2"] and np.isfinite(rep.last_loss)
    assert sorted(p.name for p in (tmp_path / "rows").glob("*.eov")) == ["u1.eov", "u2.eov"]
    ad = read_lora_adapter(out)
    assert len(ad.tensors) == 3 * 4            # q, k, v of 4 layers
    a, b = next(iter(ad.tensors.values()))
    assert a.shape[0] == 16 and np.abs(b).max() > 0        # trained: B moved off zero

    # a MODEL_DIR with the adapter: stock llama.cpp and torch agree on its logits
    md2 = tmp_path / "md"
    md2.mkdir()
    for f in ("backbone.gguf", "engram.gguf"):
        shutil.copy(md / f, md2 / f)
    shutil.copy(out, md2 / "adapter.gguf")
    lb = Session(md2, backend="llama.cpp", n_ctx=128, n_threads=1, kv_f32=True)
    tb = Session(md2, backend="torch", n_ctx=128, n_threads=1)
    bare = Session(md2, backend="llama.cpp", skill=False, n_ctx=128, n_threads=1, kv_f32=True)
    ids = lb.tokenize("My spouse is Bo. Bo was born in")
    got = lb.backend.eval(ids)
    np.testing.assert_allclose(got, tb.backend.eval(ids), atol=2e-4, rtol=1e-4)
    assert np.abs(got - bare.backend.eval(ids)).max() > 1e-4
    for s_ in (lb, tb, bare):
        s_.close()

    # deterministic: the same settings give the same adapter bytes (rows reused from work_dir)
    out2 = tmp_path / "again.gguf"
    train_skill(out2, model=md, users=[users_dir], settings=s, work_dir=tmp_path / "rows", threads=1,
                progress=False, log=lambda m: None)
    assert out2.read_bytes() == out.read_bytes()


def test_adapter_folded_into_the_backbone(tmp_path_factory, tmp_path):
    """backbone-skill.gguf = the backbone with W + alpha/r B A: metadata and other tensors
    unchanged, folded weights exact in F32 (the tiny backbone) and within Q8_0 rounding."""
    import gguf

    from engram_local.convert.adapter import merge_lora_into_backbone
    from engram_local.formats.lora_adapter import read_lora_adapter

    md = shared_model_dir(tmp_path_factory, "model", adapter=True)
    assert (md / "backbone-skill.gguf").is_file()          # convert writes it beside adapter.gguf
    base = gguf.GGUFReader(str(md / "backbone.gguf"))
    ad = read_lora_adapter(md / "adapter.gguf")
    for qtype, tol in ((None, 1e-6), ("q8_0", 0.02)):
        out = tmp_path / f"skill-{qtype}.gguf"
        merge_lora_into_backbone(md / "backbone.gguf", md / "adapter.gguf", out, qtype)
        merged = gguf.GGUFReader(str(out))
        assert [f for f in merged.fields if not f.startswith("GGUF.")] == \
               [f for f in base.fields if not f.startswith("GGUF.")]
        got = {t.name: t for t in merged.tensors}
        assert list(got) == [t.name for t in base.tensors]
        for t in base.tensors:
            m = got[t.name]
            if t.name not in ad.tensors:
                assert bytes(m.data) == bytes(t.data)
                continue
            a, b = ad.tensors[t.name]
            want = np.asarray(t.data, np.float32).reshape(b.shape[0], a.shape[1]) + ad.scale(t.name) * (b @ a)
            have = (np.asarray(m.data, np.float32) if qtype is None else
                    gguf.quants.dequantize(m.data, gguf.GGMLQuantizationType.Q8_0)).reshape(want.shape)
            assert np.abs(have - want).max() <= tol * max(1.0, np.abs(want).max())
