"""Issue 14: a running session keeps what it loaded when its memory file changes underneath.

The probe: `: > me.eov` from another shell during a chat ended the process with SIGBUS (the
file was memory-mapped), and an in-place `cp` made it silently serve different rows. Memory
files are now read into private memory on open.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from engram_local.formats.sidecar import open_sidecar  # noqa: E402
from tests.runtime_fixtures import shared_model_dir, synthetic_overrides  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    return shared_model_dir(tmp_path_factory, "model")


@pytest.mark.parametrize("backend", ["llama.cpp", "torch"])
def test_session_survives_truncation_and_in_place_overwrite(md, tmp_path, backend):
    from engram_local.runtime.session import Session

    eov = tmp_path / "me.eov"
    other = tmp_path / "other.eov"
    write_layer = open_sidecar(md / "engram.gguf").settings["write_layer"]
    s = Session(md, backend="llama.cpp" if backend == "llama.cpp" else "torch", n_ctx=64, n_threads=1,
                overrides=[], allow_missing_last_override=False)
    ids = s.backend.tokenize(PROMPT)
    plain = s.backend.eval(ids)
    s.close()
    synthetic_overrides(md, eov, ids, write_layer, scale=6.0, seed=1)
    synthetic_overrides(md, other, ids, write_layer, scale=6.0, seed=2)
    s = Session(md, overrides=[eov], backend=backend, n_ctx=64, n_threads=1)
    s.backend.reset()
    loaded = s.backend.eval(ids)
    assert np.abs(loaded - plain).max() > 1e-3          # the rows are in use
    with open(eov, "r+b") as f:                          # `: > me.eov`
        f.truncate(0)
    s.backend.reset()
    np.testing.assert_array_equal(s.backend.eval(ids), loaded)
    with open(eov, "r+b") as f:                          # in-place `cp other.eov me.eov`
        f.write(other.read_bytes())
    s.backend.reset()
    np.testing.assert_array_equal(s.backend.eval(ids), loaded)
    s.close()
