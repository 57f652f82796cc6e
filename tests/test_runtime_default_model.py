"""Both backends on the real default model (SmolLM2-135M-Instruct Q4_1 + Engram): slow.

The llama.cpp backend runs the Q4_1 backbone with llama.cpp's quantized matmuls (activations
quantized to 8 bits per block of 32), the torch backend the same weights dequantized to fp32, so
their logits differ by up to about one logit (docs/runtime.md). Greedy tokens must therefore agree
wherever the decision is clear; at near-ties they may differ, and only there.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "My doctor is", "Water boils at a temperature of",
           "The quick brown fox", "Once upon a time, there was"]
CLEAR_MARGIN = 1.0      # logits: a top-1 lead this large is not flipped by quantization (flips seen: < 0.2)
MAX_LOGIT_DIFF = 3.0


@pytest.fixture(scope="module")
def sessions():
    from engram_local.runtime.session import RunError, Session

    try:
        lb = Session(None, backend="llama.cpp", n_ctx=256, n_threads=2)
    except (RunError, FileNotFoundError) as exc:
        pytest.skip(f"default model not available: {exc}")
    tb = Session(None, backend="torch", n_ctx=256, n_threads=2)
    yield lb, tb
    lb.close()
    tb.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_backends_agree_on_clear_greedy_decisions(sessions, prompt):
    lb, tb = sessions
    ids = lb.backend.tokenize(prompt)
    assert ids == tb.backend.tokenize(prompt)
    lb.reset(), tb.reset()
    a, b = lb.backend.eval(ids), tb.backend.eval(ids)
    for _ in range(16):               # teacher-forced on llama.cpp's greedy path
        assert np.abs(a - b).max() < MAX_LOGIT_DIFF
        top2 = np.sort(a)[-2:]
        t = int(np.argmax(a))
        if top2[1] - top2[0] >= CLEAR_MARGIN:
            assert int(np.argmax(b)) == t
        if lb.backend.is_eog(t):
            break
        a, b = lb.backend.eval([t]), tb.backend.eval([t])


def test_the_capital_of_france(sessions):
    from engram_local.runtime.sampling import Sampler

    lb, tb = sessions
    outs = []
    for s in sessions:
        s.reset()
        outs.append(s.generate(s.tokenize("The capital of France is"), 8, Sampler(temp=0)).text)
    assert "Paris" in outs[0]
    assert outs[0] == outs[1]
