"""Backbone architectures the converter knows, one class per llama.cpp architecture.

An architecture turns a Hugging Face model directory into a GGUF that stock llama.cpp runs
(`write_backbone`), and maps tensor names and row orders between the two worlds, which the
LoRA adapter writer (HF -> GGUF) and the loader's adapter merge (GGUF -> HF) both need.
Register a new one with `@register` in its own module and import that module in
`convert/__init__.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class BackboneArch:
    name: str = ""                           # llama.cpp architecture (general.architecture)
    hf_architectures: tuple[str, ...] = ()   # config.json "architectures" entries it converts

    def write_backbone(self, src: Path, dest: Path, outtype: str, progress: bool = True) -> None:
        """Convert the Hugging Face model directory `src` into the GGUF file `dest`."""
        raise NotImplementedError

    def gguf_tensor_name(self, hf_name: str, hf_config: dict) -> str | None:
        """GGUF name of an HF parameter (`model.layers.0.self_attn.q_proj.weight`), None if unused."""
        raise NotImplementedError

    def config_from_gguf(self, fields: dict) -> dict:
        """The HF config entries `gguf_tensor_name` / `to_gguf_rows` need, from a GGUF's keys
        (for a checkpoint whose backbone is a GGUF file, e.g. the default SmolLM2)."""
        raise NotImplementedError

    def to_gguf_rows(self, gguf_name: str, rows: np.ndarray, hf_config: dict) -> np.ndarray:
        """Reorder the output rows of a weight (or LoRA B) from HF order to the GGUF file's order."""
        return rows

    def from_gguf_rows(self, gguf_name: str, rows: np.ndarray, hf_config: dict) -> np.ndarray:
        """Inverse of `to_gguf_rows`."""
        return rows


_BY_NAME: dict[str, BackboneArch] = {}
_BY_HF: dict[str, BackboneArch] = {}


def register(cls: type[BackboneArch]) -> type[BackboneArch]:
    arch = cls()
    _BY_NAME[arch.name] = arch
    for hf in arch.hf_architectures:
        _BY_HF[hf] = arch
    return cls


def names() -> list[str]:
    return sorted(_BY_NAME)


def for_gguf(name: str) -> BackboneArch:
    """The architecture of a GGUF's general.architecture."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"backbone architecture {name!r} is not supported by engram-local "
                         f"(supported: {', '.join(names())})") from None


def for_hf_config(config: dict, where: str | Path) -> BackboneArch:
    """The architecture that converts a Hugging Face config.json."""
    archs = config.get("architectures") or []
    for hf in archs:
        if hf in _BY_HF:
            return _BY_HF[hf]
    supported = ", ".join(sorted(_BY_HF))
    raise ValueError(f"{where}: model architecture {', '.join(archs) or '(none listed)'} cannot be "
                     f"converted (supported: {supported})")
