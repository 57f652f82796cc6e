"""Engram checkpoints: a directory of Engram weights bound to a backbone, and the default one.

A checkpoint directory holds `engram_config.json`, `engram.safetensors` (tables, projections,
norms, conv, canonical map) and `checkpoint.json` (which backbone it was trained on; `null`
means the default SmolLM2 backbone). The repository ships the default checkpoint inside the
package (`engram_local/data/default-engram/`).
"""

from __future__ import annotations

from engram_local import constants
import json
from pathlib import Path

DEFAULT_CHECKPOINT = constants.DEFAULT_CHECKPOINT_DIR
CHECKPOINT_META = "checkpoint.json"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "engram_config.json").is_file() and (Path(path) / "engram.safetensors").is_file()


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / CHECKPOINT_META
    return json.loads(path.read_text()) if path.is_file() else {"backbone": None}


def write_meta(directory: str | Path, meta: dict):
    path = Path(directory) / CHECKPOINT_META
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path)


def load_engram_model(model: str | Path | None = None):
    """(EngramModel, tokenizer) for a checkpoint directory, or the default when `model` is None."""
    from engram_local.model.backbone import load_hf_backbone
    from engram_local.text.canonical import build_canonical_map
    from engram_local.model.engram import EngramModel, read_engram_config

    directory = Path(model) if model is not None else DEFAULT_CHECKPOINT
    if not is_checkpoint(directory):
        where = "the default Engram weights are missing from the package" if model is None else \
            f"{directory} is not an Engram checkpoint (needs engram_config.json and engram.safetensors)"
        raise FileNotFoundError(where)
    cfg = read_engram_config(directory)
    backbone, tok = load_hf_backbone(read_meta(directory).get("backbone"))
    cmap, _ = build_canonical_map(tok)
    em = EngramModel(backbone, cfg, cmap)
    em.load_engram(directory)
    em.eval()
    return em, tok
