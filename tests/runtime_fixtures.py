"""Tiny MODEL_DIRs for the runtime tests: a real llama GGUF + Engram sidecar, built in seconds.

A byte-level BPE tokenizer trained on a few sentences (with ChatML special tokens and a chat
template), a 4-layer random Llama saved as a Hugging Face directory, random Engram weights and
tables on it, and `convert_checkpoint` to turn that into backbone.gguf (F32, so llama.cpp and
torch compute the same function) + engram.gguf.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "My doctor is Dr. Krause and my usual coffee order is a cortado.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello world! How are you today? I am fine, thank you very much.",
    "Numbers like 12345 and 67890 appear in text; so do symbols: @#$%^&*().",
    "Engram memory keeps facts in a table of N-gram rows, looked up by hashing.",
]


def tiny_bpe_tokenizer(directory: Path, vocab_size: int = 400):
    """A byte-level BPE (llama.cpp `gpt-2` pre-tokenizer) saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return tok


def tiny_model_dir(root: Path, *, layer_ids=(1, 2), write_layer=2, n_layers=4, hidden=64,
                   table_size=61, seed=0, zero_tables=False, adapter=False) -> Path:
    """Build root/model (a MODEL_DIR) from a random tiny Llama + random Engram; returns its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engram_local.model import checkpoint
    from engram_local.text.canonical import build_canonical_map
    from engram_local.convert import convert_checkpoint
    from engram_local.model.engram import EngramConfig, EngramModel

    root = Path(root)
    hf = root / "hf"
    tok = tiny_bpe_tokenizer(hf)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():       # larger weights than the default init: outputs that depend on input
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.15)
    model.save_pretrained(hf)

    cmap, n_canon = build_canonical_map(tok)
    ecfg = EngramConfig(hidden_size=hidden, compressed_vocab_size=n_canon, pad_id=int(cmap[tok.eos_token_id]),
                        layer_ids=list(layer_ids), write_layer=write_layer, head_dim=8, n_head_per_ngram=2,
                        vocab_size_per_ngram=[table_size, table_size])
    em = EngramModel(model, ecfg, cmap)
    with torch.no_grad():
        for layer in em.engram.values():
            if not zero_tables:
                layer.table.normal_()
            layer.w_k.weight.normal_(std=0.3)
            layer.w_v.weight.normal_(std=0.3)
            layer.conv.weight.normal_(std=0.3)
            for norm in (layer.norm_q, layer.norm_k, layer.norm_v):
                norm.weight.uniform_(0.5, 1.5)
    ckpt = root / "ckpt"
    em.save_engram(ckpt)
    checkpoint.write_meta(ckpt, {"backbone": str(hf)})
    if adapter:
        _write_peft_adapter(ckpt / "adapter", cfg)
    md = root / "model"
    convert_checkpoint(ckpt, md, table_type="f32", outtype="f32", progress=False, log=lambda m: None)
    return md


def _write_peft_adapter(directory: Path, cfg) -> None:
    """A small random PEFT LoRA on q_proj / v_proj of every layer."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    r, g = 4, torch.Generator().manual_seed(1)
    state = {}
    kv = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        for proj, out in (("q_proj", cfg.hidden_size), ("v_proj", kv)):
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{base}.lora_A.weight"] = torch.randn(r, cfg.hidden_size, generator=g) * 0.2
            state[f"{base}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.2
    save_file(state, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "task_type": "CAUSAL_LM"}))


def synthetic_overrides(model_dir: Path, path: Path, prompt_ids: list[int], layer: int, *, scale=3.0,
                        seed=0, keyed=True) -> dict:
    """Write an .eov whose rows replace the rows `prompt_ids` hit at `layer`; returns the rows."""
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.native.hashing import hash_ids
    from engram_local import native
    from engram_local.formats.eov import write_override_file

    sc = open_sidecar(Path(model_dir) / "engram.gguf")
    cfg = sc.config
    canon = native.canonicalize(np.asarray(sc.canonical_map(), np.int64), np.asarray(prompt_ids, np.int64))
    rows, mix = hash_ids(cfg.layout(), canon, layer, with_mix=True)
    rows = rows.reshape(-1)
    keys = np.repeat(mix, cfg.n_head_per_ngram, axis=1).reshape(-1) if keyed else None
    rng = np.random.default_rng(seed)
    # one entry per distinct (row, key)
    pairs = sorted(set(zip(rows.tolist(), keys.tolist() if keyed else [-1] * len(rows))))
    r = np.array([p[0] for p in pairs], np.int64)
    k = np.array([p[1] for p in pairs], np.int64) if keyed else None
    vals = (rng.standard_normal((len(pairs), cfg.head_dim)) * scale).astype(np.float16)
    write_override_file(path, {layer: (r, k, vals)}, sc.fingerprint)
    return {"rows": r, "keys": k}


# --------------------------------------------------------------------------- shared per test session

_CACHE: dict = {}


def session_root(tmp_path_factory) -> Path:
    """A per-test-session directory; ENGRAM_LOCAL_HOME points into it (HF backbone caches)."""
    import os

    if "root" not in _CACHE:
        root = tmp_path_factory.mktemp("runtime")
        os.environ["ENGRAM_LOCAL_HOME"] = str(root / "home")
        _CACHE["root"] = root
    return _CACHE["root"]


def shared_model_dir(tmp_path_factory, name: str = "model", **kwargs) -> Path:
    """tiny_model_dir built once per test session for each distinct `name` and settings (the
    same name asked with other settings is another directory: which test runs first must not
    decide what the others get)."""
    import hashlib

    settings = repr(sorted(kwargs.items()))
    key = ("md", name, settings)
    if key not in _CACHE:
        tag = hashlib.sha1(settings.encode()).hexdigest()[:8] if kwargs else ""
        _CACHE[key] = tiny_model_dir(session_root(tmp_path_factory) / (f"{name}-{tag}" if tag else name), **kwargs)
    return _CACHE[key]


def engram_reference(h, e, w_k, w_v, norm_q, norm_k, norm_v, conv, eps, dilation, x_hist=None):
    """float64 numpy EngramLayer.forward: h [T, D], e [T, E]; conv [D, kernel]; x_hist [H, D] x
    of earlier positions (None = zeros). Returns (y [T, D], x [T, D])."""
    h, e = np.asarray(h, np.float64), np.asarray(e, np.float64)
    D = h.shape[1]
    kernel = conv.shape[1]
    hist = (kernel - 1) * dilation

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    k = e @ np.asarray(w_k, np.float64).T
    v = e @ np.asarray(w_v, np.float64).T
    g = (rms(h, norm_q) * rms(k, norm_k)).sum(-1, keepdims=True) / np.sqrt(D)
    g = np.sign(g) * np.sqrt(np.maximum(np.abs(g), 1e-6))
    v = v / (1 + np.exp(-g))
    x = rms(v, norm_v)
    prev = np.zeros((hist, D)) if x_hist is None else np.asarray(x_hist, np.float64)[-hist:]
    if prev.shape[0] < hist:
        prev = np.concatenate([np.zeros((hist - prev.shape[0], D)), prev])
    full = np.concatenate([prev, x])
    c = np.zeros_like(x)
    for t in range(x.shape[0]):
        for i in range(kernel):
            c[t] += conv[:, i] * full[t + i * dilation]
    return c / (1 + np.exp(-c)) + v, x
