"""The engine on the real default model (SmolLM2-135M + Engram, Q4_1 backbone): 8 users whose
memories answer "My doctor is" with 8 different doctors, decoded together in one batch over many
rounds of requests joining and leaving. Every answer names its user's doctor and nobody else's.

Slow (the default model must exist; its first build takes minutes): the memories are written
once per test session through the memory API (engram_local.memory.facade.remember), ~2 s each,
into a temporary directory; nothing binary is committed.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("llama_cpp")

from engram_local.runtime import loader  # noqa: E402

pytestmark = pytest.mark.slow

# Resolved at collection, before any fixture points ENGRAM_LOCAL_HOME elsewhere.
DEFAULT = loader.default_model_dir()
DOCTORS = ["Dr. Krause", "Dr. Okonkwo", "Dr. Varga", "Dr. Lindqvist", "Dr. Moreau", "Dr. Tanaka",
           "Dr. Novak", "Dr. Silva"]


@pytest.fixture(scope="module")
def memories(tmp_path_factory):
    if not (DEFAULT / "engram.gguf").exists():
        pytest.skip(f"the default model is not built at {DEFAULT} (run `engram-local inspect` once)")
    from engram_local.memory import facade as memory

    em, tok, fp = memory.load_model_for_memory(DEFAULT)
    d = tmp_path_factory.mktemp("doctors")
    paths = []
    for i, doc in enumerate(DOCTORS):
        path = d / f"user{i}.eov"
        memory.remember(path, [memory.NewFact(prompt="My doctor is", answer=doc)], em, tok, fp, chat=False)
        paths.append(path)
    return paths


def test_eight_doctors_in_one_batch(memories):
    from engram_local.runtime.engine import Request
    from engram_local.runtime.session import Session, open_override_stack

    s = Session(DEFAULT, backend="llama.cpp", n_ctx=128, n_threads=2, n_seq=8)
    eng = s.engine
    stacks = [eng.make_stack(open_override_stack([p], s.sidecar)) for p in memories]
    prompt = s.tokenize("My doctor is")
    surname = [d.split()[-1] for d in DOCTORS]
    rng = random.Random(0)
    for _ in range(4):
        users = [rng.randrange(len(DOCTORS)) for _ in range(12)]
        streams = [eng.submit(Request(prompt, max_tokens=rng.randint(8, 12), stack=stacks[u], ignore_eos=True))
                   for u in users]
        while eng.step():
            pass
        for u, st in zip(users, streams):
            text = s.backend.detokenize(st.tokens)
            assert surname[u] in text, (DOCTORS[u], text)
            assert not any(other in text for v, other in enumerate(surname) if v != u), (DOCTORS[u], text)
    plain = eng.generate(Request(prompt, max_tokens=10))          # no memory: none of them
    assert not any(n in s.backend.detokenize(plain.tokens) for n in surname)
    s.close()
