"""PEFT LoRA directory -> llama.cpp LoRA adapter GGUF (what convert_lora_to_gguf.py writes).

The adapter file carries general.type = "adapter", the base model's general.architecture,
adapter.type = "lora", adapter.lora.alpha, and per adapted weight `<base>.lora_a` [r, in] and
`<base>.lora_b` [out, r] (numpy order), where `<base>` is the backbone GGUF's tensor name.
llama.cpp applies `W x + scale * alpha / r * B (A x)`, PEFT `W x + lora_alpha / r * B (A x)`:
the same with alpha = lora_alpha (rsLoRA's lora_alpha / sqrt(r) is folded into alpha).
B's rows follow the backbone GGUF's row order (the rope permutation of attn_q / attn_k).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np

from engram_local import constants
from engram_local.formats.header import as_float32
from engram_local.formats.lora_adapter import check_chat_forms

from .registry import BackboneArch
from .tensors import copy_metadata, write_gguf

# base_model.model.<module>.lora_A[.<adapter name>].weight
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def read_peft_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    cfg = json.loads(path.read_text())
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg['peft_type']!r} (only LORA)")
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank_pattern / alpha_pattern (llama.cpp has one alpha)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (full module copies)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}")
    if problems:
        raise ValueError(f"{adapter_dir}: this LoRA cannot be a llama.cpp adapter: {'; '.join(problems)}")
    return cfg


def write_lora_adapter(adapter_dir: Path, arch: BackboneArch, hf_config: dict, dest: Path) -> None:
    """Convert the PEFT LoRA in `adapter_dir` for a backbone of `arch` / `hf_config` to `dest`."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg = read_peft_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")

    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)
            if m is None:
                raise ValueError(f"{weights}: tensor {key!r} is not a LoRA A/B matrix of a linear layer")
            module = m["module"]
            base = arch.gguf_tensor_name(module + ".weight", hf_config)
            if base is None or base.startswith("token_embd") or base.startswith("output."):
                # Embedding LoRAs need llama.cpp's transposed special case; not supported here.
                raise ValueError(f"{weights}: LoRA on {module!r} has no llama.cpp projection to attach to")
            pairs.setdefault(base, {})[m["ab"]] = f.get_tensor(key).float().numpy()

    ranks = set()
    for base, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights}: {base} has lora_{''.join(pair)} only")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise ValueError(f"{weights}: {base}: A {pair['A'].shape} and B {pair['B'].shape} ranks differ")
        ranks.add(pair["A"].shape[0])
    if not pairs:
        raise ValueError(f"{weights}: no LoRA tensors")
    alpha = float(cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        if len(ranks) != 1:
            raise ValueError(f"{adapter_dir}: rsLoRA with mixed ranks {sorted(ranks)} cannot be one alpha")
        alpha *= math.sqrt(ranks.pop())     # PEFT scale alpha / sqrt(r) == (alpha * sqrt(r)) / r

    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(constants.ADAPTER_GENERAL_TYPE)
    writer.add_string(constants.KEY_ADAPTER_TYPE, constants.ADAPTER_TYPE_LORA)
    writer.add_float32(constants.KEY_ADAPTER_LORA_ALPHA, alpha)
    forms = (cfg.get("engram_local") or {}).get("chat_forms")
    if forms is not None:       # train-skill's recipe: the replies memories are fitted in
        writer.add_array(constants.KEY_ADAPTER_CHAT_FORMS, list(check_chat_forms(forms, adapter_dir)))
    for base in sorted(pairs):
        a, b = pairs[base]["A"], arch.to_gguf_rows(base, pairs[base]["B"], hf_config)
        writer.add_tensor(constants.TENSOR_LORA_A.format(base=base), np.ascontiguousarray(a, np.float32))
        writer.add_tensor(constants.TENSOR_LORA_B.format(base=base), np.ascontiguousarray(b, np.float32))
    write_gguf(writer, dest)


# Storage of a folded weight whose backbone weight was quantized (merge_lora_into_backbone).
FOLDED_QTYPE = "q5_1"


def merge_lora_into_backbone(backbone: Path, adapter: Path, dest: Path, qtype: str | None = None) -> None:
    """Write `dest`: the backbone GGUF with the LoRA adapter GGUF folded into its weights.

    This file is the skill-on model of a MODEL_DIR for every consumer: llama.cpp decodes it, the
    torch loader dequantizes it (runtime.loader, ModelDir.backbone_gguf), so both backends, the
    memory writer, `perplexity` and the head-to-head's E/F run the same weights. Each adapted
    weight becomes W + alpha/r * B A by the one merge rule (model.lora.merge_into; W dequantized
    from its stored type) and is re-quantized; every other tensor and every metadata key is
    copied unchanged, so stock llama.cpp runs the file, and decoding costs what the stock
    backbone costs instead of llama.cpp's four extra LoRA ops per adapted weight per token.
    qtype: storage of the folded weights ("q5_1", "q8_0", "f16", ...). Default: FOLDED_QTYPE
    (Q5_1) for a quantized weight, its own type for F16/F32.

    Measured on the default model (SmolLM2-135M Q4_1; llama-cpp-python 0.3.36 built for
    AVX2/FMA/F16C; one thread; Engram + a 34-fact memory; 128 greedy tokens; best of 5
    interleaved rounds on a shared 2-core VM): the lean stock loop on the plain backbone 53.4
    tok/s; our backend on the plain backbone 51.1, on the fold as Q4_1 51.8, Q5_1 50.5, Q8_0
    49.7. Q5_1 costs ~1 % against the plain backbone, Q8_0 ~3 % (it reads 7 MB more per token);
    Q4_1 costs nothing but rounds the adapter's update to 4 bits. The storage type does not
    separate the backends (both read this file); they differ only by llama.cpp quantizing
    matmul inputs to 8 bits (docs/agreement.md).
    """
    import torch

    from engram_local.formats.lora_adapter import read_lora_adapter
    from engram_local.model.lora import merge_into

    lora = read_lora_adapter(adapter)
    reader = gguf.GGUFReader(str(backbone))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if lora.architecture != arch:
        raise ValueError(f"{adapter}: adapter for {lora.architecture!r}, the backbone is {arch!r}")
    writer = copy_metadata(reader)
    names = {t.name for t in reader.tensors}
    missing = sorted(set(lora.tensors) - names)
    if missing:
        raise ValueError(f"{adapter}: adapts {missing[:3]}, which {backbone} does not have")
    for t in reader.tensors:
        if t.name in lora.tensors:
            a, b = lora.tensors[t.name]
            qtype_of = gguf.GGMLQuantizationType(t.tensor_type)
            w = as_float32(t.data, qtype_of).reshape(b.shape[0], a.shape[1])    # (out, in), a copy
            merge_into(torch.from_numpy(w), torch.from_numpy(a), torch.from_numpy(b), lora.scale(t.name))
            if qtype:
                out = gguf.GGMLQuantizationType[qtype.upper()]
            elif qtype_of in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                out = qtype_of
            else:
                out = gguf.GGMLQuantizationType[FOLDED_QTYPE.upper()]
            if out == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(t.name, w.astype(np.float16))
            elif out == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(t.name, w)
            else:
                q = gguf.quants.quantize(w, out)                     # (out, bytes per row) uint8
                writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=out)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    write_gguf(writer, dest)
