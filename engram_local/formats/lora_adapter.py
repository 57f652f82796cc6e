"""LoRA adapter GGUFs in llama.cpp's format (the skill adapter, per-user adapters).

`read_lora_adapter` reads and checks one (pairs complete, ranks consistent); `check_lora_header`
checks only its keys, as llama.cpp's loader does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engram_local import constants
from engram_local.formats.header import (GGUFFormatError, GGUFHeader, TensorInfo, as_float32,
                                         describe_arch_mismatch, scan_gguf, tensor_view)


@dataclass
class LoraAdapter:
    """A llama.cpp LoRA adapter: per base tensor, A [r, in] and B [out, r] (numpy order)."""

    path: Path
    architecture: str
    alpha: float
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _ in self.tensors.values()}

    def scale(self, base: str) -> float:
        """llama.cpp's factor alpha / r (alpha 0 means 1: llama-adapter.h `get_scale`)."""
        rank = self.tensors[base][0].shape[0]
        return self.alpha / rank if self.alpha else 1.0


def adapter_chat_forms(path: str | os.PathLike) -> tuple[str, ...] | None:
    """The chat forms an adapter's memories are fitted in (KEY_ADAPTER_CHAT_FORMS), None when
    the adapter does not say (adapters written before the key: the recite recipe)."""
    header = scan_gguf(path)
    check_lora_header(header)
    return header_chat_forms(header)


def header_chat_forms(header: GGUFHeader) -> tuple[str, ...] | None:
    """adapter_chat_forms of a scanned adapter header."""
    forms = header.fields.get(constants.KEY_ADAPTER_CHAT_FORMS)
    return None if forms is None else check_chat_forms(forms, header.path)


def check_chat_forms(forms, where) -> tuple[str, ...]:
    """`forms` as a tuple when it is a non-empty list of CHAT_FORM_NAMES (the adapter key's value,
    read or about to be written); GGUFFormatError naming `where` otherwise."""
    if not isinstance(forms, (list, tuple)) or not forms or \
            any(f not in constants.CHAT_FORM_NAMES for f in forms):
        raise GGUFFormatError(f"{where}: {constants.KEY_ADAPTER_CHAT_FORMS} = {forms!r}; expected "
                              f"a non-empty list of {', '.join(constants.CHAT_FORM_NAMES)}")
    return tuple(forms)


def check_lora_header(header: GGUFHeader) -> float:
    """Validate an adapter's keys as llama.cpp's loader does; returns alpha."""
    if header.general_type != constants.ADAPTER_GENERAL_TYPE:
        raise GGUFFormatError(describe_arch_mismatch(header, "a LoRA adapter (general.type "
                                                             f"{constants.ADAPTER_GENERAL_TYPE!r})"))
    adapter_type = header.typed(constants.KEY_ADAPTER_TYPE, "str")
    if adapter_type != constants.ADAPTER_TYPE_LORA:
        raise GGUFFormatError(f"{header.path}: adapter type {adapter_type!r} is not supported "
                              f"(only {constants.ADAPTER_TYPE_LORA!r})")
    alpha = header.typed(constants.KEY_ADAPTER_LORA_ALPHA, "float", required=False)
    return float(alpha or 0.0)


def read_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and check a LoRA adapter GGUF (pairs complete, ranks consistent); values as float32."""
    header = scan_gguf(path)
    alpha = check_lora_header(header)
    suffix_a, suffix_b = constants.TENSOR_LORA_A.format(base=""), constants.TENSOR_LORA_B.format(base="")
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        if name.endswith(suffix_a):
            pairs.setdefault(name[:-len(suffix_a)], {})["a"] = info
        elif name.endswith(suffix_b):
            pairs.setdefault(name[:-len(suffix_b)], {})["b"] = info
        else:
            raise GGUFFormatError(f"{header.path}: tensor {name!r} is neither a {suffix_a} nor a {suffix_b}")
    tensors = {}
    with open(header.path, "rb") as f:          # adapters are small: plain reads, no mapping
        for base, pair in sorted(pairs.items()):
            if set(pair) != {"a", "b"}:
                raise GGUFFormatError(f"{header.path}: {base!r} has only lora_{''.join(pair)}")
            a, b = (_read_float32(f, pair[k]) for k in ("a", "b"))
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise GGUFFormatError(f"{header.path}: {base!r}: lora_a {list(a.shape)} and lora_b "
                                      f"{list(b.shape)} do not form [out, r] x [r, in]")
            tensors[base] = (a, b)
    return LoraAdapter(header.path, header.architecture or "", alpha, tensors)


def _read_float32(f, info: TensorInfo) -> np.ndarray:
    f.seek(info.offset)
    return as_float32(tensor_view(info, np.frombuffer(f.read(info.nbytes), dtype=np.uint8)), info.qtype)
