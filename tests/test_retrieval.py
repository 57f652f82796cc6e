"""The sentence encoder (runtime.retrieval): numpy BertEncoder == transformers Embedder on a tiny
random BERT saved as a model directory, and on the shipped all-MiniLM-L6-v2 where installed."""

from __future__ import annotations

import numpy as np
import pytest

from engram_local.runtime import retrieval

TEXTS = ["My dog is called Biscuit", "What is my pet called?", "w30 w31", "dog", "",
         " ".join(["biscuit"] * 80)]


def _tiny_bert_dir(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "my", "dog", "is", "called", "biscuit", "what", "pet"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), 60)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)
    bert.save_pretrained(tmp_path, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    return bert, tok


def test_numpy_encoder_equals_transformers_on_a_tiny_bert(tmp_path):
    bert, tok = _tiny_bert_dir(tmp_path)
    ref = retrieval.Embedder(bert, tok, max_length=40).embed(TEXTS)
    enc = retrieval.BertEncoder(tmp_path, max_length=40)
    got = enc.embed(TEXTS)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # one at a time (no padding) or from the cache: the same vectors
    assert np.abs(np.stack([enc.embed([t])[0] for t in TEXTS]) - got).max() < 1e-5
    assert enc.embed([]).shape == (0, 0)


def test_numpy_encoder_equals_transformers_on_minilm():
    if not retrieval.installed():
        pytest.skip(f"all-MiniLM-L6-v2 is not installed ({retrieval.MINILM_PIP})")
    texts = TEXTS + ["I have a golden retriever named Biscuit.", "Remind me what my pet is called?"]
    got = retrieval.BertEncoder().embed(texts)
    ref = retrieval.Embedder().embed(texts)
    assert np.abs(got - ref).max() < 1e-5
    assert retrieval.sentence_encoder() is retrieval.sentence_encoder()     # loaded once per process


def test_no_encoder_where_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(retrieval.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(retrieval, "_encoder", {})
    assert not retrieval.installed() and retrieval.sentence_encoder() is None
    with pytest.raises(retrieval.RetrievalUnavailable):
        retrieval.BertEncoder()
