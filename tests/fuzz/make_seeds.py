"""Re-create the seed corpus in tests/fuzz/seeds/ (run from the repository root):

    python -m tests.fuzz.make_seeds

eov/: version-2 files (facts; history, f32 rows and two layers; no rows at all), a version-1
file and an encrypted one (key "5e" * 32, the key harnesses.EovTarget sets). gguf/: the
sidecar of a tiny MODEL_DIR (one Engram layer) as converted (with engram.integrity) and as
converted before engram.integrity existed, and a backbone-like header. kernel/: byte
strings the kernel harness decodes into arguments. (Not byte-reproducible: the encrypted seed
has a random nonce and the tiny model comes from a trained tokenizer.)
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import gguf
import numpy as np

from engram_local import constants
from engram_local.convert.tensors import write_gguf
from engram_local.formats.eov import LedgerFact, ReplacedFact, write_memory_file
from tests.test_hardening_eov import write_v1

SEEDS = Path(__file__).parent / "seeds"


def eov_seeds(d: Path):
    rng = np.random.default_rng(0)
    facts = [LedgerFact("doctor", "My doctor is", "Dr. Krause", [0, 1], written="2026-01-01T00:00:00Z"),
             LedgerFact("cat", "My cat is called", "Figaro", [2], paraphrases=["My cat's name is"])]
    sets = {16: ([5, 9, 40], [7, -1, 11], rng.standard_normal((3, 8)).astype(np.float16))}
    write_memory_file(d / "facts.eov", 0xABCDEF, sets, facts)
    hist = [ReplacedFact("car0", "I drive a", "Subaru", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "car")]
    write_memory_file(d / "history.eov", 0xABCDEF,
                      {2: ([1, 3], None, rng.standard_normal((2, 8)).astype(np.float32)),
                       16: ([4], [9], rng.standard_normal((1, 8)).astype(np.float32))},
                      [LedgerFact("car", "I drive a", "Toyota", [0, 2])], history=hist)
    write_memory_file(d / "empty.eov", 1, {}, None)
    os.environ["ENGRAM_LOCAL_KEY"] = "5e" * 32
    try:
        write_memory_file(d / "sealed.eov", 0xABCDEF, sets, facts)
    finally:
        del os.environ["ENGRAM_LOCAL_KEY"]
    write_v1(d / "v1.eov", '{"facts":[{"id":"f1","prompt":"p","answer":"a","entries":[0]}]}',
             **{"eov.16.rows": np.array([3], np.int64), "eov.16.keys": np.array([-1], np.int64),
                "eov.16.values": np.ones((1, 8), np.float16)})


def gguf_seeds(d: Path):
    from tests.runtime_fixtures import tiny_model_dir
    from tests.test_hardening_model import strip_integrity

    with tempfile.TemporaryDirectory() as tmp:
        md = tiny_model_dir(Path(tmp), layer_ids=(1,), write_layer=1, n_layers=2, hidden=16, table_size=11)
        (d / "sidecar-integrity.gguf").write_bytes((md / constants.MODEL_DIR_ENGRAM).read_bytes())
        strip_integrity(md / constants.MODEL_DIR_ENGRAM, d / "sidecar.gguf")
    w = gguf.GGUFWriter(None, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(20)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(20)])
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((20, 8), np.float16))
    write_gguf(w, d / "backbone.gguf")


def kernel_seeds(d: Path):
    rng = random.Random(0)
    for op in range(4):
        for i in range(3):
            (d / f"op{op}-{i}.bin").write_bytes(bytes([op]) + bytes(rng.randrange(256) for _ in range(400)))


if __name__ == "__main__":
    for name, make in (("eov", eov_seeds), ("gguf", gguf_seeds), ("kernel", kernel_seeds)):
        d = SEEDS / name
        d.mkdir(parents=True, exist_ok=True)
        make(d)
    for p in sorted(SEEDS.rglob("*")):
        if p.is_file():
            print(p.relative_to(SEEDS), p.stat().st_size)
