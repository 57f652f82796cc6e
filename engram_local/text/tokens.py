"""Token rules read from the tokenizer: where a sequence starts, whether BOS goes in front, which
tokens end a turn, which one pads a batch. Every rule reads the tokenizer (its behaviour, its
special tokens, its vocabulary); no token id is written down here.

The runtime, the skill adapter's training samples, the memory writer, perplexity and convert
all ask these functions, so they cannot disagree on a model's tokens.
"""

from __future__ import annotations

# Texts of special tokens that end a turn (llama.cpp's llama-vocab.cpp detects the same ones).
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>",
             "<|end_of_text|>", "<|return|>", "<|eom_id|>")
# Of those, the ones a chat template closes an assistant turn with.
TURN_END_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# Texts of the token pretraining corpora put between documents.
DOCUMENT_END_TEXTS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def encode(tok, text: str) -> list[int]:
    """Token ids of `text` alone: special tokens written in it are parsed, nothing is added."""
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _added(tok) -> tuple[list[int], list[int]]:
    """(ids with the tokenizer's own special tokens, ids without) of a one-letter text."""
    return tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]


def adds_bos(tok) -> bool:
    """The tokenizer puts BOS in front of a text (what it does, whatever its config files say)."""
    full, plain = _added(tok)
    return len(full) > len(plain) and tok.bos_token_id is not None and full[0] == tok.bos_token_id


def adds_eos(tok) -> bool:
    """The tokenizer puts EOS after a text."""
    full, plain = _added(tok)
    return len(full) > len(plain) and tok.eos_token_id is not None and full[-1] == tok.eos_token_id


def sequence_start(tok) -> list[int]:
    """The tokens a sequence starts with, as the runtime starts it: [BOS] where the tokenizer adds
    one, else none."""
    return [tok.bos_token_id] if adds_bos(tok) else []


def tokenize(tok, text: str, add_bos: bool) -> list[int]:
    """Token ids of `text`, with BOS in front when `add_bos`."""
    return ([tok.bos_token_id] if add_bos else []) + encode(tok, text)


def bos_needed(rendered: str, bos_token: str, add_bos: bool) -> bool:
    """Whether a rendered chat prompt gets BOS in front: where the model adds one, unless the
    template already wrote it (the one rule, for every backend: llama.cpp's add-BOS flag or
    the HF tokenizer's behaviour comes in as `add_bos`)."""
    return bool(add_bos) and not (bos_token and rendered.startswith(bos_token))


def document_start_id(tok) -> int:
    """The token a document starts after, so that its first token is scored (perplexity) or looked
    up (the writer's common N-grams) as at the start of a text: BOS where the tokenizer adds
    one; else the token pretraining put between documents (found by its text: SmolLM2's
    <|endoftext|>); else EOS. Retrofit trained on windows cut from a token stream with no start
    token at all, so this is the backbone's own convention."""
    if adds_bos(tok):
        return int(tok.bos_token_id)
    vocab = tok.get_vocab()
    for text in DOCUMENT_END_TEXTS:
        if text in vocab:
            return int(vocab[text])
    for t in (tok.eos_token_id, tok.bos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("the tokenizer has no BOS, EOS or end-of-text token to start a document with")


def eog_ids(tok) -> set[int]:
    """Ids that end generation: EOS and every turn- or text-ending special token in the vocab."""
    out = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()
    return out | {int(vocab[t]) for t in EOG_TEXTS if t in vocab}


def end_of_turn(tok) -> str:
    """The text that closes an assistant turn: the vocab's turn-end token, else EOS."""
    vocab = tok.get_vocab()
    return next((t for t in TURN_END_TEXTS if t in vocab), tok.eos_token or "")


def pad_id(tok) -> int:
    """The id that pads a batch (never attended to): the tokenizer's pad, else EOS, else the
    document start."""
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return document_start_id(tok)


def special_texts(tok) -> dict:
    """{"bos_token", "eos_token"}: the texts a chat template may write, "" where there is none."""
    return {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
