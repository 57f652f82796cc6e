"""Tiny models and helpers for the user-memory tests (no files, no hub)."""

from __future__ import annotations

import torch

from tests.tiny import tiny_engram, tiny_tokenizer


def tiny_memory_model(seed: int = 0):
    """(EngramModel, tokenizer): the tiny random model with random tables and a conv, and
    embeddings scaled up so logits span a few units (random init leaves them near zero)."""
    em, _ = tiny_engram(random_tables=True, seed=seed)
    with torch.no_grad():
        em.backbone.get_output_embeddings().weight.mul_(30)
    return em, tiny_tokenizer()


def with_overrides(em, stacks):
    """A context manager serving em's own tables through native Gatherers under `stacks`."""
    import contextlib

    from engram_local.memory.facade import attach_overrides

    @contextlib.contextmanager
    def cm():
        attach_overrides(em, stacks)
        try:
            yield em
        finally:
            for layer in stacks:
                em.engram[str(layer)].source = None

    return cm()


def logits(em, ids, stacks=None):
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        if stacks:
            with with_overrides(em, stacks):
                return em(x).logits[0].clone()
        return em(x).logits[0].clone()


def greedy_text(em, tok, prompt: str, n: int, stacks=None) -> str:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        out.append(int(logits(em, ids + out, stacks)[-1].argmax()))
    return tok.decode(ids + out)[len(tok.decode(ids)):]


def write(path, facts, model, **kw):
    """`memory.remember` of `facts` (anything with prompt, answer, id, paraphrases) with `model`
    = (em, tok, fingerprint)."""
    from engram_local.memory import facade as memory
    from engram_local.memory.facade import NewFact

    em, tok, fp = model
    facts = [NewFact(f.prompt, f.answer, id=f.id, paraphrases=list(f.paraphrases)) for f in facts]
    return memory.remember(path, facts, em, tok, fp, **kw)


def assert_refused_unchanged(src, path, facts, model, message):
    """A private copy of `src` at `path`; writing `facts` raises ValueError(`message`) and leaves
    the file byte for byte as it was."""
    import pytest

    path.write_bytes(src.read_bytes())
    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        write(path, facts, model)
    assert path.read_bytes() == before
