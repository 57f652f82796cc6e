"""`engram-local convert`: Engram checkpoints -> MODEL_DIRs of GGUF files (ships as engram_local.convert).

  registry.py   backbone architectures (one module each: llama.py), looked up by HF config or GGUF
  llama.py      HF Llama -> llama.cpp `llama` GGUF (weights, rope permutation, BPE tokenizer)
  sidecar.py    Engram weights + hash constants -> the Engram sidecar GGUF, with its fingerprint
  adapter.py    PEFT LoRA -> llama.cpp LoRA adapter GGUF (the shared skill adapter)
  model_dir.py  the whole MODEL_DIR, and the default one built from the shipped pieces
  tensors.py    streamed, chunked tensor writing with progress bars
"""

from . import llama  # noqa: F401  (registers the architecture)
from .model_dir import convert_checkpoint, ensure_default_model_dir
from .registry import for_gguf, for_hf_config

__all__ = ["convert_checkpoint", "ensure_default_model_dir", "for_gguf", "for_hf_config"]
