"""User memory on the default model (slow: loads SmolLM2 + the default Engram, fits real facts)."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "user-as-engram"


@pytest.fixture(scope="module")
def default_model():
    from engram_local.memory import facade as memory

    try:
        return memory.load_model_for_memory(None)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.mark.skipif(not (DATA / "users" / "u000.json").is_file(), reason="paper data not present")
def test_u000_recall_locality_forget(default_model, tmp_path):
    import torch

    from engram_local.memory import facade as memory
    from engram_local.runtime.loader import attach_tables, default_model_dir
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.runtime.perplexity import bits_per_byte
    from engram_local.memory.writer import answer_tokens

    em, tok, fp = default_model
    facts = memory.user_json_facts(DATA / "users" / "u000.json")[:12]
    path = tmp_path / "u.eov"
    report = memory.remember(path, facts, em, tok, fp)
    assert all(report.recalled.values())
    sidecar = open_sidecar(default_model_dir() / "engram.gguf")

    def use(files):
        attach_tables(em, sidecar, memory.open_overrides(files, fp) if files else {})

    def full_answer(f):
        p, a = answer_tokens(tok, f.prompt, f.answer)
        with torch.no_grad():
            pred = em(torch.tensor([(p + a)[:-1]])).logits[0].argmax(-1).tolist()
        return pred[len(p) - 1:] == a

    try:
        use([path])
        assert all(full_answer(f) for f in facts)
        text = (DATA / "LICENSE").read_text()
        with_file = bits_per_byte(em, tok, text)
        use([])
        without = bits_per_byte(em, tok, text)
        assert with_file.bpb == without.bpb            # no written N-gram in the text: bit-exact
        city = next(f for f in facts if f.id == "city")
        memory.forget(path, ["city"], em, tok, fp)
        assert city.answer.encode() not in path.read_bytes()
        use([path])
        assert not full_answer(city)
        assert all(full_answer(f) for f in facts if f.id != "city")
    finally:
        use([])
