"""Hugging Face Llama (SmolLM2, Llama 3, ...) -> llama.cpp `llama` GGUF.

Follows llama.cpp's convert_hf_to_gguf.py for this architecture: gguf-py's tensor name map,
the rotary row permutation of attn_q / attn_k (llama.cpp's rope pairs adjacent values, HF's
pairs the two halves of each head), hyper-parameters under `llama.*`, and a byte-level BPE
tokenizer as `gpt2` tokens, token types, merges, special ids, add-BOS flag and chat template.
Only what engram-local can vouch for is converted; anything else is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from engram_local.text.tokens import adds_bos, adds_eos

from .registry import BackboneArch, register
from .tensors import FILE_TYPES, StreamedTensor, add_matrix, matrix_qtype, write_gguf

# tokenizer.json pre-tokenizers llama.cpp implements, by their `tokenizer.ggml.pre` name.
# Matching the structure (not a hash of sample output, as convert_hf_to_gguf.py does) accepts
# any vocabulary trained with a known pre-tokenizer, e.g. small test tokenizers.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_REGEX = ("ByteLevel", False, True)        # (type, add_prefix_space, use_regex)
_PRE_TOKENIZERS = {
    (_BYTE_LEVEL_REGEX,): "gpt-2",
    (("Digits", True), _BYTE_LEVEL_REGEX): "smollm",     # single digits, then GPT-2's regex
    (("Split", _LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
}


def _pre_tokenizer_signature(pre: dict | None) -> tuple:
    """The parts of a tokenizer.json pre_tokenizer that change how text is split."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _pre_tokenizer_signature(p))
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre.get("add_prefix_space")), bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pre.get("individual_digits"))),)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (("Split", pattern.get("Regex", pattern.get("String")), pre.get("behavior"),
                 bool(pre.get("invert"))),)
    return ((kind,),)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary row order -> llama.cpp's (convert_hf_to_gguf.py `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Weights:
    """The safetensors weights of an HF directory (single file or sharded), read lazily."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        index = src / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (src / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{src}: no model.safetensors (other weight formats, e.g. "
                                    "pytorch_model.bin, are not supported: re-save with safetensors)")
        self._handles = {}
        self.location = {}
        for name in files:
            handle = safe_open(str(src / name), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self.location[key] = handle

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.location[key].get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self.location[key].get_slice(key)[start:stop].float().numpy()

    def full(self, key: str) -> np.ndarray:
        return self.location[key].get_tensor(key).float().numpy()


@register
class Llama(BackboneArch):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)

    # ---------------------------------------------------------------- names and row order
    def _tensor_map(self, hf_config: dict):
        return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(hf_config["num_hidden_layers"]))

    def gguf_tensor_name(self, hf_name: str, hf_config: dict) -> str | None:
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        return self._tensor_map(hf_config).get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def _rope_heads(self, gguf_name: str, hf_config: dict) -> int | None:
        if gguf_name.endswith("attn_q.weight"):
            return int(hf_config["num_attention_heads"])
        if gguf_name.endswith("attn_k.weight"):
            return int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"])
        return None

    def config_from_gguf(self, fields: dict) -> dict:
        key = lambda k: k.format(arch=self.name)   # noqa: E731
        n_head = fields[key(gguf.Keys.Attention.HEAD_COUNT)]
        return {"num_hidden_layers": fields[key(gguf.Keys.LLM.BLOCK_COUNT)],
                "num_attention_heads": n_head,
                "num_key_value_heads": fields.get(key(gguf.Keys.Attention.HEAD_COUNT_KV), n_head)}

    def to_gguf_rows(self, gguf_name: str, rows: np.ndarray, hf_config: dict) -> np.ndarray:
        heads = self._rope_heads(gguf_name, hf_config)
        return rows if heads is None else _permute(rows, heads)

    def from_gguf_rows(self, gguf_name: str, rows: np.ndarray, hf_config: dict) -> np.ndarray:
        heads = self._rope_heads(gguf_name, hf_config)
        return rows if heads is None else _unpermute(rows, heads)

    # ---------------------------------------------------------------- conversion
    def check_config(self, cfg: dict, where: Path):
        problems = []
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {cfg['hidden_act']!r} (llama.cpp's llama uses SiLU)")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                problems.append(f"{key} = true")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            problems.append(f"rope type {rope_type!r} (only plain RoPE is converted)")
        if problems:
            raise ValueError(f"{where}: cannot convert this Llama config: {'; '.join(problems)}")

    def write_backbone(self, src: Path, dest: Path, outtype: str, progress: bool = True) -> None:
        src = Path(src)
        cfg = json.loads((src / "config.json").read_text())
        self.check_config(cfg, src)
        if outtype not in FILE_TYPES:
            raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(FILE_TYPES)}")
        weights = _Weights(src)
        writer = gguf.GGUFWriter(None, self.name)
        self._add_hparams(writer, cfg, src, outtype)
        tokens = self._add_tokenizer(writer, src, int(cfg["vocab_size"]))
        if "model.embed_tokens.weight" not in weights.location:
            raise ValueError(f"{src}: no model.embed_tokens.weight")
        embed_rows = weights.shape("model.embed_tokens.weight")[0]
        if embed_rows != len(tokens):
            raise ValueError(f"{src}: the embedding has {embed_rows} rows but config vocab_size is {len(tokens)}")
        self._add_tensors(writer, weights, cfg, src, outtype, progress)
        write_gguf(writer, dest)

    def _add_hparams(self, w: gguf.GGUFWriter, cfg: dict, src: Path, outtype: str):
        n_head = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_head)
        rope = cfg.get("rope_parameters") or {}
        w.add_name(src.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(FILE_TYPES[outtype])
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def _add_tokenizer(self, w: gguf.GGUFWriter, src: Path, vocab_size: int) -> list[str]:
        """gpt2-style BPE vocabulary; returns the token list (padded to vocab_size)."""
        from transformers import AutoTokenizer

        tj_path = src / "tokenizer.json"
        if not tj_path.is_file():
            raise FileNotFoundError(f"{src}: no tokenizer.json (only fast byte-level BPE tokenizers "
                                    "are converted)")
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        if (tj.get("model") or {}).get("type") != "BPE" or tj.get("normalizer") is not None:
            raise ValueError(f"{src}: only byte-level BPE tokenizers without a normalizer are "
                             "converted (SentencePiece-style tokenizers are not)")
        signature = _pre_tokenizer_signature(tj.get("pre_tokenizer"))
        pre = _PRE_TOKENIZERS.get(signature)
        if pre is None:
            raise ValueError(f"{src}: tokenizer.json pre-tokenizer {signature!r} is not one llama.cpp "
                             f"implements under a known name ({', '.join(sorted(_PRE_TOKENIZERS.values()))})")

        tok = AutoTokenizer.from_pretrained(src)
        vocab = tok.get_vocab()
        if len(vocab) > vocab_size:
            raise ValueError(f"{src}: the tokenizer has {len(vocab)} tokens, more than vocab_size {vocab_size}")
        by_id = {i: t for t, i in vocab.items()}
        added = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in by_id:      # embedding rows no token uses (vocab padded for speed)
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)

        special = gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise ValueError(f"{src}: tokenizer.json has no BPE merges")
        # Whether BOS/EOS are added is what the HF tokenizer does, whatever its config files say.
        special.add_special_token = {"bos": adds_bos(tok), "eos": adds_eos(tok)}
        if special.chat_template is None and getattr(tok, "chat_template", None):
            special.chat_template = tok.chat_template
        special.add_to_gguf(w, quiet=True)
        return tokens

    def _add_tensors(self, w: gguf.GGUFWriter, weights: _Weights, cfg: dict, src: Path,
                     outtype: str, progress: bool):
        tied = bool(cfg.get("tie_word_embeddings", False))
        names = {}
        for key in weights.location:
            if tied and key == "lm_head.weight":
                continue        # llama.cpp falls back to token_embd when output.weight is absent
            name = self.gguf_tensor_name(key, cfg)
            if name is None:
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"{src}: tensor {key!r} has no llama.cpp counterpart")
            names[key] = name
        if not tied and "lm_head.weight" not in names:
            raise ValueError(f"{src}: no lm_head.weight and tie_word_embeddings is false")

        def order(item):    # token_embd, blk.0 ... blk.N, output_norm, output
            name = item[1]
            if name.startswith("blk."):
                return (1, int(name.split(".")[1]), name)
            return (0 if name.startswith("token_embd") else 2, 0, name)

        for key, name in sorted(names.items(), key=order):
            shape = weights.shape(key)
            if len(shape) == 1:
                w.add_tensor(name, weights.full(key).astype(np.float32))
                continue
            qtype = matrix_qtype(outtype, shape[1])
            if self._rope_heads(name, cfg) is not None:
                add_matrix(w, name, self.to_gguf_rows(name, weights.full(key), cfg), qtype, progress)
            else:
                StreamedTensor(name, shape[0], shape[1], qtype,
                               lambda a, b, key=key: weights.rows(key, a, b), progress).add_to(w)
