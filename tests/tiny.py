"""Tiny random-weight models and tokenizers for fast mechanics tests (no files, no hub)."""

from __future__ import annotations

import numpy as np

WORDS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "the", "The", " the", "THE", "doctor", "Doctor",
         "is", "dr", "krause", "café", "cafe", "my", "name", ".", ",", " ", "  ", "\n", "a", "b", "c"]


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS plus filler words (whitespace-split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    for i in range(len(WORDS), 120):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def tiny_backbone(vocab=120, hidden=64, layers=4, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_engram(layer_ids=(1, 2), write_layer=2, table_size=50, seed=0, random_tables=False):
    """(EngramModel, canonical map) on a tiny backbone; tables zero unless random_tables."""
    import torch

    from engram_local.model.engram import EngramConfig, EngramModel

    bb = tiny_backbone(seed=seed)
    vocab = bb.config.vocab_size
    cmap = np.arange(vocab, dtype=np.int64) % 97          # a surjective map onto 97 canonical ids
    cfg = EngramConfig(hidden_size=bb.config.hidden_size, compressed_vocab_size=97, pad_id=0,
                       layer_ids=list(layer_ids), write_layer=write_layer, head_dim=8,
                       vocab_size_per_ngram=[table_size, table_size])
    torch.manual_seed(seed)
    em = EngramModel(bb, cfg, cmap)
    if random_tables:
        with torch.no_grad():
            for layer in em.engram.values():
                layer.table.normal_()
                layer.conv.weight.normal_(std=0.3)
    return em, cmap
