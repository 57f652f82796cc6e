"""`engram-local convert` / `inspect` and the MODEL_DIR loader, on tiny random models.

The tiny backbone is a 4-layer Llama with a real byte-level BPE tokenizer (trained here in
milliseconds), so the converted backbone is a GGUF stock llama.cpp can run too
(tests/test_llamacpp_backbone.py uses the same builders).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engram_local import constants
from engram_local.formats.header import GGUFFormatError, scan_gguf
from engram_local.formats.lora_adapter import read_lora_adapter
from engram_local.formats.sidecar import open_sidecar

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("My doctor is Dr. Krause. The cafe on the corner serves a cortado. In 2024 the weather was "
          "mild, and the name of my cat is Pixel. Hello world! Numbers 12345 and 678.\n")
PROMPT = "My doctor is Dr. Krause. In 2024 the cafe"


# --------------------------------------------------------------------------- builders

def make_tokenizer():
    """A 320-token byte-level BPE tokenizer with SmolLM2's special tokens and chat format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([CORPUS * 20], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_backbone_dir(path: Path, tie: bool = True, seed: int = 0) -> Path:
    """A random 4-layer Llama (GQA, width 64) saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_checkpoint(hf_dir: Path, path: Path, head_dim: int = 32, seed: int = 1) -> Path:
    """An Engram checkpoint on `hf_dir` with random tables, norms and conv (f16 tables)."""
    from engram_local.model.backbone import load_hf_backbone
    from engram_local.text.canonical import build_canonical_map
    from engram_local.model.checkpoint import write_meta
    from engram_local.model.engram import EngramConfig, EngramModel

    backbone, tok = load_hf_backbone(hf_dir)
    cmap, n_canonical = build_canonical_map(tok)
    cfg = EngramConfig(hidden_size=64, compressed_vocab_size=n_canonical, pad_id=int(cmap[0]),
                       layer_ids=[1, 2], write_layer=2, head_dim=head_dim, n_head_per_ngram=4,
                       vocab_size_per_ngram=[40, 40])
    torch.manual_seed(seed)
    em = EngramModel(backbone, cfg, cmap)
    with torch.no_grad():
        for layer in em.engram.values():
            layer.table.normal_()
            layer.conv.weight.normal_(std=0.3)
            for norm in (layer.norm_q, layer.norm_k, layer.norm_v):
                norm.weight.uniform_(0.5, 1.5)
    em.save_engram(path)
    write_meta(path, {"backbone": str(hf_dir)})
    return path


def make_adapter(hf_dir: Path, path: Path, seed: int = 3) -> Path:
    """A random PEFT LoRA (r=4, alpha=8) on every projection, saved as a PEFT directory."""
    peft = pytest.importorskip("peft")
    from engram_local.model.backbone import load_hf_backbone

    backbone, _ = load_hf_backbone(hf_dir)
    torch.manual_seed(seed)
    model = peft.get_peft_model(backbone, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:    # PEFT starts B at zero; make the adapter do something
                p.normal_(std=0.1)
    model.save_pretrained(path)
    return path


def peft_logits(hf_dir: Path, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    from peft import PeftModel

    from engram_local.model.backbone import load_hf_backbone

    backbone, _ = load_hf_backbone(hf_dir)
    model = PeftModel.from_pretrained(backbone, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def convert(ckpt: Path, out: Path, **kw) -> Path:
    from engram_local.convert import convert_checkpoint

    kw.setdefault("table_type", "f32")
    kw.setdefault("outtype", "f32")
    return convert_checkpoint(ckpt, out, force=True, progress=False, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, home):
    """(hf_dir, checkpoint_dir, f32 MODEL_DIR) shared by the module's tests."""
    root = tmp_path_factory.mktemp("tiny")
    hf = make_backbone_dir(root / "hf")
    ckpt = make_checkpoint(hf, root / "ckpt")
    return hf, ckpt, convert(ckpt, root / "md")


def logits(em, ids: list[int], engram: bool = True) -> np.ndarray:
    em.enabled = engram
    with torch.no_grad():
        return em(torch.tensor([ids])).logits[0].numpy()


# --------------------------------------------------------------------------- round trip

def test_f32_round_trip_logits_equal_the_checkpoint(tiny):
    from engram_local.model.checkpoint import load_engram_model
    from engram_local.runtime.loader import load_model

    hf, ckpt, md = tiny
    ref, ref_tok = load_engram_model(ckpt)
    em, tok, info = load_model(md)
    assert info.engram == (md / constants.MODEL_DIR_ENGRAM).resolve() and info.adapter is None
    ids = ref_tok(PROMPT)["input_ids"]
    assert tok(PROMPT)["input_ids"] == ids                       # tokenizer survives the GGUF
    assert all(layer.table.numel() == 0 for layer in em.engram.values())   # rows come from the mmap
    with_engram = logits(em, ids)
    np.testing.assert_allclose(with_engram, logits(ref, ids), rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits(em, ids, engram=False), logits(ref, ids, engram=False), rtol=0, atol=1e-5)
    assert np.abs(with_engram - logits(em, ids, engram=False)).max() > 1e-2   # the Engram is live


def test_untied_output_round_trips(tmp_path, home):
    from engram_local.model.backbone import load_hf_backbone
    from engram_local.runtime.loader import load_backbone

    hf = make_backbone_dir(tmp_path / "hf", tie=False, seed=5)
    ckpt = make_checkpoint(hf, tmp_path / "ckpt")
    md = convert(ckpt, tmp_path / "md")
    assert "output.weight" in scan_gguf(md / constants.MODEL_DIR_BACKBONE).tensors
    ref, tok = load_hf_backbone(hf)
    got, _ = load_backbone(md / constants.MODEL_DIR_BACKBONE)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_overrides_reach_the_memory_mapped_table(tiny):
    from engram_local.runtime.loader import attach_tables, load_model
    from engram_local.native import OverrideSet

    _, _, md = tiny
    em, tok, info = load_model(md)
    ids = tok(PROMPT)["input_ids"]
    rows = em.rows(torch.tensor([ids]))[2][0].reshape(-1).unique().numpy()
    base = logits(em, ids)
    values = np.random.default_rng(0).normal(size=(len(rows), em.cfg.head_dim)).astype(np.float32)
    sidecar = open_sidecar(info.engram)
    attach_tables(em, sidecar, {2: [OverrideSet.build(rows, values)]})
    assert np.abs(logits(em, ids) - base).max() > 1e-3
    attach_tables(em, sidecar)                       # and out again
    np.testing.assert_array_equal(logits(em, ids), base)
    with pytest.raises(ValueError, match="layers"):
        attach_tables(em, sidecar, {7: []})


# --------------------------------------------------------------------------- sidecar contents

def test_sidecar_tensors_have_the_shapes_the_hash_layout_implies(tiny):
    from engram_local.model.engram import read_engram_config

    _, ckpt, md = tiny
    cfg = read_engram_config(ckpt)
    layout = cfg.layout()
    reader = gguf.GGUFReader(md / constants.MODEL_DIR_ENGRAM)   # gguf-py's own reader
    tensors = {t.name: t for t in reader.tensors}
    field = lambda k: reader.fields[k].contents()                # noqa: E731
    assert field("general.architecture") == constants.SIDECAR_ARCH
    assert field(constants.KEY_FORMAT_VERSION) == constants.SIDECAR_FORMAT_VERSION
    assert field(constants.KEY_LAYER_IDS) == [1, 2]
    assert (field(constants.KEY_MAX_NGRAM), field(constants.KEY_N_HEAD), field(constants.KEY_PAD_ID)) == \
        (cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.pad_id)
    assert field(constants.KEY_NORM_EPS) == cfg.norm_eps
    assert reader.alignment == constants.SIDECAR_ALIGNMENT
    assert all(len(name) < 64 for name in tensors)               # ggml's name limit
    cmap = tensors[constants.TENSOR_CANONICAL_MAP]
    assert cmap.tensor_type == gguf.GGMLQuantizationType.I64 and list(cmap.shape) == [320]
    for layer in cfg.layer_ids:
        t = lambda name: tensors[name.format(layer=layer)]      # noqa: E731
        table = t(constants.TENSOR_TABLE)
        assert [int(d) for d in table.shape] == [cfg.head_dim, layout.rows_per_layer[layer]]   # ggml order
        assert table.tensor_type == gguf.GGMLQuantizationType.F32
        assert table.data_offset % constants.SIDECAR_ALIGNMENT == 0
        args = layout.kernel_args(layer)
        for name, key in ((constants.TENSOR_MULTIPLIERS, "multipliers"), (constants.TENSOR_PRIMES, "primes"),
                          (constants.TENSOR_OFFSETS, "offsets")):
            np.testing.assert_array_equal(t(name).data, args[key])
        assert int(args["offsets"][-1] + args["primes"][-1]) == layout.rows_per_layer[layer]
        for name in (constants.TENSOR_W_K, constants.TENSOR_W_V):
            assert [int(d) for d in t(name).shape] == [cfg.memory_dim, cfg.hidden_size]
        for name in (constants.TENSOR_NORM_Q, constants.TENSOR_NORM_K, constants.TENSOR_NORM_V):
            assert [int(d) for d in t(name).shape] == [cfg.hidden_size]
        assert [int(d) for d in t(constants.TENSOR_CONV).shape] == [cfg.kernel_size, cfg.hidden_size]


def test_fingerprint_is_deterministic_and_covers_the_table(tiny, tmp_path):
    _, ckpt, md = tiny
    sidecar = open_sidecar(md / constants.MODEL_DIR_ENGRAM)
    assert sidecar.fingerprint == sidecar.compute_fingerprint() != 0
    sidecar.verify_fingerprint()
    again = convert(ckpt, tmp_path / "again")
    assert open_sidecar(again / constants.MODEL_DIR_ENGRAM).fingerprint == sidecar.fingerprint
    f16 = convert(ckpt, tmp_path / "f16", table_type="f16")
    assert open_sidecar(f16 / constants.MODEL_DIR_ENGRAM).fingerprint != sidecar.fingerprint

    # One flipped bit in a table row: the file still opens, the fingerprint check catches it.
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(md / constants.MODEL_DIR_ENGRAM, bad)
    info = scan_gguf(bad).tensors[constants.TENSOR_TABLE.format(layer=2)]
    with open(bad, "r+b") as f:
        f.seek(info.offset + info.nbytes // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 1]))
    with pytest.raises(GGUFFormatError, match="fingerprint mismatch"):
        open_sidecar(bad).verify_fingerprint()


def test_integrity_hash_is_written_and_a_flip_in_w_k_is_refused_on_load(tiny, tmp_path):
    """The fingerprint covers the tables; convert also writes KEY_INTEGRITY over the header and
    every other tensor, so a flipped bit in w_k (which the fingerprint cannot see) stops the load."""
    from engram_local.cli import main
    from engram_local.runtime.loader import load_model

    _, _, md = tiny
    sidecar = open_sidecar(md / constants.MODEL_DIR_ENGRAM)
    assert gguf.GGUFReader(md / constants.MODEL_DIR_ENGRAM).fields[constants.KEY_INTEGRITY].contents() \
        == sidecar.compute_integrity() != 0

    bad = tmp_path / "bad"
    shutil.copytree(md, bad)
    info = scan_gguf(bad / constants.MODEL_DIR_ENGRAM).tensors[constants.TENSOR_W_K.format(layer=1)]
    with open(bad / constants.MODEL_DIR_ENGRAM, "r+b") as f:
        f.seek(info.offset + info.nbytes // 3)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    assert open_sidecar(bad / constants.MODEL_DIR_ENGRAM, verify=False).compute_fingerprint() == \
        sidecar.fingerprint                                       # the fingerprint alone would pass it
    with pytest.raises(GGUFFormatError, match="integrity hash mismatch"):
        load_model(bad)
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "integrity hash mismatch" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("table_type,atol", [("f16", 0.0), ("bf16", 1e-2), ("q8_0", 2e-2), ("q4_0", 0.2)])
def test_table_types_store_what_they_say(tiny, tmp_path, table_type, atol):
    from engram_local.runtime.loader import load_model
    from engram_local.native import Gatherer

    _, ckpt, md = tiny
    out = convert(ckpt, tmp_path / table_type, table_type=table_type)
    sidecar = open_sidecar(out / constants.MODEL_DIR_ENGRAM)
    reference = open_sidecar(md / constants.MODEL_DIR_ENGRAM)
    for layer in sidecar.layer_ids:
        info = sidecar.header.tensors[sidecar.table_name(layer)]
        assert info.type_name == table_type.upper()
        rows = np.arange(info.shape[1])
        values = Gatherer(sidecar.table(layer)).gather(rows)
        exact = Gatherer(reference.table(layer)).gather(rows)
        # The checkpoint stores f16 tables: f16 is exact, the others are within their precision.
        assert np.abs(values - exact).max() <= atol * np.abs(exact).max()
        np.testing.assert_array_equal(
            values, gguf.quants.dequantize(sidecar.tensor(sidecar.table_name(layer)), info.qtype))
    em, tok, _ = load_model(out)
    assert np.isfinite(logits(em, tok(PROMPT)["input_ids"])).all()


# --------------------------------------------------------------------------- adapter

def test_adapter_is_written_and_merged_like_peft(tmp_path, home):
    """Also: every file of a full MODEL_DIR opens with gguf-dump."""
    from engram_local.runtime.loader import load_model

    hf = make_backbone_dir(tmp_path / "hf", seed=7)
    ckpt = make_checkpoint(hf, tmp_path / "ckpt")
    make_adapter(hf, ckpt / constants.CHECKPOINT_ADAPTER_DIR)
    md = convert(ckpt, tmp_path / "md")
    header = scan_gguf(md / constants.MODEL_DIR_ADAPTER)
    assert header.general_type == "adapter" and header.architecture == "llama"
    assert header.fields[constants.KEY_ADAPTER_TYPE] == "lora"
    adapter = read_lora_adapter(md / constants.MODEL_DIR_ADAPTER)
    assert adapter.alpha == 8 and adapter.ranks == {4} and len(adapter.tensors) == 4 * 7
    a, b = adapter.tensors["blk.0.attn_q.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)

    for name in (constants.MODEL_DIR_BACKBONE, constants.MODEL_DIR_ENGRAM, constants.MODEL_DIR_ADAPTER):
        dump = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", str(md / name)],
                              capture_output=True, text=True)
        assert dump.returncode == 0 and "tensor(s)" in dump.stdout, (name, dump.stderr[-2000:])

    em, tok, info = load_model(md)
    assert info.adapter is not None
    ids = tok(PROMPT)["input_ids"]
    want = peft_logits(hf, ckpt / constants.CHECKPOINT_ADAPTER_DIR, ids)
    np.testing.assert_allclose(logits(em, ids, engram=False), want, rtol=0, atol=1e-5)
    plain, _, _ = load_model(md, adapter=False)
    assert np.abs(logits(plain, ids, engram=False) - want).max() > 1e-2


# --------------------------------------------------------------------------- bad files

def _patched(src: Path, dest: Path, key: str, value: int) -> Path:
    """A copy of GGUF `src` with the unsigned integer field `key` set to `value`."""
    shutil.copyfile(src, dest)
    header = scan_gguf(dest)
    fmt = {gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.UINT64: "<Q"}[header.field_types[key]]
    with open(dest, "r+b") as f:
        f.seek(header.scalar_offsets[key])
        f.write(struct.pack(fmt, value))
    return dest


def test_bad_sidecars_fail_with_a_clear_message(tiny, tmp_path):
    _, _, md = tiny
    good = md / constants.MODEL_DIR_ENGRAM
    data = good.read_bytes()
    cases = {
        "empty": (b"", "empty file"),
        "garbage": (b"PK\x03\x04" + bytes(range(256)) * 4, "not a GGUF file"),
        "truncated_header": (data[:40], "truncated"),
        "truncated_data": (data[:len(data) - 5000], "truncated file"),
        "bad_version": (data[:4] + struct.pack("<I", 99) + data[8:], "GGUF version 99"),
        "huge_counts": (data[:8] + struct.pack("<Q", 2**60) + data[16:], "cannot fit"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(GGUFFormatError, match=message):
            open_sidecar(path)

    future = _patched(good, tmp_path / "future.gguf", constants.KEY_FORMAT_VERSION,
                      constants.SIDECAR_FORMAT_VERSION + 1)
    with pytest.raises(GGUFFormatError, match="newer than this engram-local"):
        open_sidecar(future)
    with pytest.raises(GGUFFormatError, match="'llama' model GGUF, not an Engram sidecar"):
        open_sidecar(md / constants.MODEL_DIR_BACKBONE)
    with pytest.raises(GGUFFormatError, match="an Engram sidecar, not a LoRA adapter"):
        read_lora_adapter(good)
    with pytest.raises(FileNotFoundError):
        open_sidecar(tmp_path / "missing.gguf")


def test_wrong_layout_in_a_sidecar_is_refused(tiny, tmp_path):
    _, _, md = tiny
    # Another N: the configuration no longer describes the tensors the file holds.
    bad = _patched(md / constants.MODEL_DIR_ENGRAM, tmp_path / "n.gguf", constants.KEY_MAX_NGRAM, 4)
    with pytest.raises(GGUFFormatError, match="shape|configuration"):
        open_sidecar(bad)
    # Another seed: the stored multipliers are no longer the ones the hash configuration draws.
    bad = _patched(md / constants.MODEL_DIR_ENGRAM, tmp_path / "seed.gguf", constants.KEY_SEED, 12345)
    with pytest.raises(GGUFFormatError, match="multipliers disagree"):
        open_sidecar(bad)


def test_loader_and_cli_report_bad_model_dirs(tiny, tmp_path):
    from engram_local.cli import main
    from engram_local.runtime.loader import load_model

    _, ckpt, md = tiny
    broken = tmp_path / "broken"
    shutil.copytree(md, broken)
    data = (broken / constants.MODEL_DIR_ENGRAM).read_bytes()
    (broken / constants.MODEL_DIR_ENGRAM).write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFFormatError, match="truncated"):
        load_model(broken)
    result = CliRunner().invoke(main, ["inspect", str(broken)])
    assert result.exit_code == 1 and "truncated" in result.stderr and "Traceback" not in result.output

    (broken / constants.MODEL_DIR_BACKBONE).unlink()
    with pytest.raises(FileNotFoundError, match="not a MODEL_DIR"):
        load_model(broken)
    with pytest.raises(FileNotFoundError, match="neither a MODEL_DIR"):
        load_model(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(ckpt)])
    assert result.exit_code == 1 and "engram-local convert" in result.stderr


# --------------------------------------------------------------------------- CLI

def test_cli_convert_inspect_and_perplexity(tiny, tmp_path):
    from engram_local.cli import main

    hf, ckpt, md = tiny
    runner = CliRunner()
    out = tmp_path / "cli-md"
    result = runner.invoke(main, ["convert", str(ckpt), "-o", str(out), "--table-type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "fingerprint 0x" in result.stdout
    assert runner.invoke(main, ["convert", str(ckpt), "-o", str(out)]).exit_code == 1   # no --force
    result = runner.invoke(main, ["convert", str(ckpt), "-o", str(out), "--table-type", "q4_0", "--force"])
    assert result.exit_code == 0, result.output

    info = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).stdout)
    assert info["model_dir"] == str(out.resolve()) and info["adapter"] is None
    assert info["backbone"] == str(out.resolve() / constants.MODEL_DIR_BACKBONE)
    assert info["engram"] == str(out.resolve() / constants.MODEL_DIR_ENGRAM)
    assert [layer["table_type"] for layer in info["engram_info"]["layers"]] == ["Q4_0", "Q4_0"]
    text = runner.invoke(main, ["inspect", str(out)]).stdout
    assert "MODEL_DIR" in text and "Q4_0" in text and info["fingerprint"] in text
    sidecar = json.loads(runner.invoke(main, ["inspect", str(out / "engram.gguf"), "--json", "--verify"]).stdout)
    assert sidecar["kind"] == "engram" and sidecar["fingerprint"] == info["fingerprint"]
    backbone = json.loads(runner.invoke(main, ["inspect", info["backbone"], "--json"]).stdout)
    assert backbone["kind"] == "backbone" and backbone["vocab_size"] == 320 and backbone["chat_template"]

    corpus = tmp_path / "text.txt"
    corpus.write_text(CORPUS * 3)
    scores = [json.loads(runner.invoke(main, ["perplexity", "-m", str(m), "-f", str(corpus), "--json"]).stdout)
              for m in (md, ckpt)]
    assert abs(scores[0]["bpb"] - scores[1]["bpb"]) < 1e-6


def test_eov_files_are_described(tiny, tmp_path):
    from engram_local.cli import main
    from engram_local.formats.eov import LedgerFact, write_memory_file

    _, _, md = tiny
    fingerprint = open_sidecar(md / constants.MODEL_DIR_ENGRAM).fingerprint
    path = tmp_path / "me.eov"
    facts = [LedgerFact(id="f1", prompt="My doctor is", answer=" Dr. Krause", entries=[0, 1])]
    write_memory_file(path, fingerprint, {2: (np.array([3, 1]), None, np.ones((2, 32), np.float16))}, facts)
    runner = CliRunner()
    info = json.loads(runner.invoke(main, ["inspect", str(path), "--json"]).stdout)
    assert info["kind"] == "overrides" and info["fingerprint"] == f"{fingerprint:#018x}"
    assert info["layers"] == {"2": 2} and info["rows"] == 2 and info["facts"] == 1
    text = runner.invoke(main, ["inspect", str(path)]).stdout
    assert f"bound to model fingerprint {fingerprint:#018x}" in text and "1 fact," in text


def test_convert_refuses_what_it_cannot_do(tiny, tmp_path):
    from engram_local.convert import convert_checkpoint
    from engram_local.convert.sidecar import write_sidecar

    hf, ckpt, md = tiny
    with pytest.raises(FileNotFoundError, match="not an Engram checkpoint"):
        convert_checkpoint(hf, tmp_path / "x")
    gguf_ckpt = tmp_path / "gguf-ckpt"
    shutil.copytree(ckpt, gguf_ckpt)
    (gguf_ckpt / "checkpoint.json").write_text(json.dumps({"backbone": str(md / "backbone.gguf")}))
    with pytest.raises(ValueError, match="is not one of"):
        convert_checkpoint(gguf_ckpt, tmp_path / "y", outtype="q4_1")
    narrow = make_checkpoint(hf, tmp_path / "narrow", head_dim=8)
    with pytest.raises(ValueError, match="multiple"):
        write_sidecar(narrow, tmp_path / "n.gguf", table_type="q8_0", backbone_arch="llama", vocab_size=320)
    with pytest.raises(ValueError, match="another tokenizer"):
        write_sidecar(narrow, tmp_path / "n.gguf", table_type="f16", backbone_arch="llama", vocab_size=100)
    # A GGUF backbone is used as it is: linked or copied byte for byte.
    out = convert_checkpoint(gguf_ckpt, tmp_path / "z", progress=False, log=lambda m: None)
    assert (out / "backbone.gguf").read_bytes() == (md / "backbone.gguf").read_bytes()


def test_a_gguf_backbone_is_restored_in_the_outtype_asked(tiny, tmp_path):
    """The default MODEL_DIR's path: a quantized GGUF backbone with its matrices stored as F16 -
    every value the dequantized one rounded to F16, vectors and metadata kept, file type F16."""
    from engram_local.convert import convert_checkpoint
    from engram_local.convert.tensors import restore_gguf

    _, ckpt, md = tiny
    q8 = tmp_path / "q8.gguf"
    restore_gguf(md / "backbone.gguf", q8, "q8_0", progress=False)
    ckpt2 = tmp_path / "ckpt"
    shutil.copytree(ckpt, ckpt2)
    (ckpt2 / "checkpoint.json").write_text(json.dumps({"backbone": str(q8)}))
    out = convert_checkpoint(ckpt2, tmp_path / "md", outtype="f16", progress=False, log=lambda m: None)
    src, dst = gguf.GGUFReader(str(q8)), gguf.GGUFReader(str(out / "backbone.gguf"))
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    F16, Q8 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    for a, b in zip(src.tensors, dst.tensors):
        if len(a.shape) == 1:
            assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
            continue
        assert b.tensor_type == F16
        want = gguf.quants.dequantize(a.data, a.tensor_type) if a.tensor_type == Q8 else np.asarray(a.data)
        assert np.array_equal(np.asarray(b.data, np.float32), want.astype(np.float16).astype(np.float32))
    file_type = dst.fields[gguf.Keys.General.FILE_TYPE].contents()
    assert file_type == gguf.LlamaFileType.MOSTLY_F16
    assert dst.fields[gguf.Keys.Tokenizer.LIST].contents() == src.fields[gguf.Keys.Tokenizer.LIST].contents()


def test_default_model_dir_is_built_once_and_refreshed(tiny, tmp_path, monkeypatch):
    from engram_local.model import checkpoint
    from engram_local.cli import main

    _, ckpt, _ = tiny
    default_ckpt = tmp_path / "default-engram"
    shutil.copytree(ckpt, default_ckpt)
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", default_ckpt)
    monkeypatch.setenv("ENGRAM_LOCAL_HOME", str(tmp_path / "home"))
    runner = CliRunner()

    first = runner.invoke(main, ["inspect", "--json"])
    assert first.exit_code == 0, first.output
    assert "creating the default model" in first.stderr
    info = json.loads(first.stdout)
    assert info["model_dir"] == str(tmp_path / "home" / "models" / "default")
    assert {"model_dir", "backbone", "engram", "adapter"} <= set(info) and info["adapter"] is None
    tables = [t for t in gguf.GGUFReader(info["engram"]).tensors if len(t.shape) == 2]
    assert tables and info["engram_info"]["layers"][0]["table_type"] == constants.DEFAULT_TABLE_TYPE.upper()

    second = runner.invoke(main, ["inspect", "--json"])
    assert second.exit_code == 0 and second.stderr == "" and json.loads(second.stdout) == info

    config = json.loads((default_ckpt / "engram_config.json").read_text())
    config["seed"] = 7                      # new committed weights -> the directory is rebuilt
    (default_ckpt / "engram_config.json").write_text(json.dumps(config))
    third = runner.invoke(main, ["inspect", "--json"])
    assert third.exit_code == 0 and "updating the default model" in third.stderr
    assert json.loads(third.stdout)["fingerprint"] != info["fingerprint"]


def test_missing_default_weights_are_reported(monkeypatch, tmp_path):
    from engram_local.model import checkpoint
    from engram_local.cli import main

    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "nothing")
    monkeypatch.setenv("ENGRAM_LOCAL_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["inspect"])
    assert result.exit_code == 1 and "default Engram weights are missing" in result.stderr
