"""What a file holds, as plain dicts (JSON-ready), for `engram-local inspect`.

`file_kind` (formats.header) tells which describer a file takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np

from engram_local import constants
from engram_local.formats.header import ArraySummary, GGUFHeader
from engram_local.formats.eov import read_memory_file
from engram_local.formats.lora_adapter import check_lora_header, header_chat_forms
from engram_local.formats.sidecar import Sidecar


def describe_backbone(header: GGUFHeader) -> dict:
    arch = header.architecture or ""
    key = lambda k: header.fields.get(k.format(arch=arch))   # noqa: E731
    file_type = header.fields.get(gguf.Keys.General.FILE_TYPE)
    try:
        file_type = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        file_type = None if file_type is None else str(file_type)
    tokens = header.fields.get(gguf.Keys.Tokenizer.LIST)
    return {
        "path": str(header.path), "architecture": arch,
        "name": header.fields.get(gguf.Keys.General.NAME), "file_type": file_type,
        "size_bytes": header.file_size,
        "n_params": sum(int(np.prod(t.shape, dtype=object)) for t in header.tensors.values()),
        "block_count": key(gguf.Keys.LLM.BLOCK_COUNT),
        "embedding_length": key(gguf.Keys.LLM.EMBEDDING_LENGTH),
        "head_count": key(gguf.Keys.Attention.HEAD_COUNT),
        "context_length": key(gguf.Keys.LLM.CONTEXT_LENGTH),
        "vocab_size": tokens.count if isinstance(tokens, ArraySummary) else len(tokens or []),
        "tokenizer": header.fields.get(gguf.Keys.Tokenizer.MODEL),
        "tokenizer_pre": header.fields.get(gguf.Keys.Tokenizer.PRE),
        "chat_template": gguf.Keys.Tokenizer.CHAT_TEMPLATE in header.fields,
    }


def describe_sidecar(sidecar: Sidecar) -> dict:
    cfg = SimpleNamespace(**sidecar.settings)
    layers = []
    for layer in cfg.layer_ids:
        info = sidecar.header.tensors[sidecar.table_name(layer)]
        layers.append({"layer": layer, "rows": info.shape[1], "dim": info.shape[0],
                       "table_type": info.type_name, "table_bytes": info.nbytes,
                       "write_layer": layer == cfg.write_layer})
    return {
        "path": str(sidecar.path), "format_version": sidecar.format_version,
        "fingerprint": f"{sidecar.fingerprint:#018x}", "size_bytes": sidecar.header.file_size,
        "backbone_arch": sidecar.backbone_arch, "hidden_size": cfg.hidden_size,
        "max_ngram_size": cfg.max_ngram_size, "n_head_per_ngram": cfg.n_head_per_ngram,
        "head_dim": cfg.head_dim, "compressed_vocab_size": cfg.compressed_vocab_size,
        "raw_vocab_size": sidecar.header.tensors[constants.TENSOR_CANONICAL_MAP].shape[0],
        "pad_id": cfg.pad_id, "seed": cfg.seed, "write_layer": cfg.write_layer,
        "layers": layers, "source_digest": sidecar.source_digest,
    }


def describe_adapter(header: GGUFHeader) -> dict:
    alpha = check_lora_header(header)
    suffix_a = constants.TENSOR_LORA_A.format(base="")
    bases = [n[:-len(suffix_a)] for n in header.tensors if n.endswith(suffix_a)]
    return {
        "path": str(header.path), "architecture": header.architecture, "alpha": alpha,
        "ranks": sorted({header.tensors[constants.TENSOR_LORA_A.format(base=b)].shape[1] for b in bases}),
        "n_weights": len(bases), "size_bytes": header.file_size,
        # blk.3.attn_q.weight -> attn_q: which projections it adapts
        "targets": sorted({b.split(".")[-2] if b.startswith("blk.") else b for b in bases}),
        "chat_forms": list(header_chat_forms(header) or ()),    # [] = not recorded (recite)
    }


def describe_overrides(path: str | os.PathLike) -> dict:
    """An .eov file: the model fingerprint it binds to, rows per layer, facts in its ledger."""
    memory = read_memory_file(path)         # checks the whole file (checksum, rows, ledger)
    return {
        "path": str(Path(path)), "format_version": memory.format_version, "encrypted": memory.sealed,
        "fingerprint": f"{memory.fingerprint:#018x}",
        "layers": {str(layer): len(s) for layer, s in sorted(memory.layers.items())},
        "rows": sum(len(s) for s in memory.layers.values()), "facts": len(memory.facts),
        "size_bytes": os.stat(path).st_size,
    }
