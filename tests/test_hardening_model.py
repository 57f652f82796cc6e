"""Issue 14: model files are checked when they load, and no bit flip in them can hang a command.

Probe failures covered (each failed before):
  67/67 table flips accepted by `run`     -> test_table_flips_are_refused_on_every_open
  w_k/w_v flips pass --verify              -> test_integrity_hash_covers_every_other_tensor_and_the_header
                                              (and tests/test_convert.py, a freshly converted model)
  n_head_per_ngram flip hangs every load   -> test_no_header_bit_flip_hangs_or_passes
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from engram_local import constants
from engram_local.formats import sidecar as sidecar_mod
from engram_local.formats.header import GGUFFormatError, scan_gguf
from engram_local.formats.sidecar import open_sidecar
from tests.runtime_fixtures import shared_model_dir


@pytest.fixture(scope="module")
def source_md(tmp_path_factory) -> Path:
    return shared_model_dir(tmp_path_factory, "model")


def strip_integrity(src: Path, dest: Path) -> Path:
    """A copy of sidecar `src` without KEY_INTEGRITY: a file as `engram-local convert` wrote it
    before the integrity hash existed (the fingerprint does not change)."""
    from engram_local.convert.tensors import write_gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(None, reader.fields["general.architecture"].contents())
    writer.add_custom_alignment(reader.alignment)
    for f in reader.fields.values():
        if f.name in ("general.architecture", "general.alignment", constants.KEY_INTEGRITY) \
                or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        assert t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.I64)
        writer.add_tensor(t.name, np.array(t.data))
    write_gguf(writer, dest)
    return dest


@pytest.fixture
def engram(tmp_path, source_md) -> Path:
    """A copy of a freshly converted sidecar (it carries KEY_INTEGRITY)."""
    dest = tmp_path / "engram.gguf"
    shutil.copy(source_md / constants.MODEL_DIR_ENGRAM, dest)
    return dest


@pytest.fixture
def legacy(tmp_path, source_md) -> Path:
    """The same sidecar as converted before KEY_INTEGRITY existed."""
    return strip_integrity(source_md / constants.MODEL_DIR_ENGRAM, tmp_path / "legacy.gguf")


def flip(path: Path, offset: int, bit: int = 0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def test_converted_sidecar_carries_the_integrity_hash(engram, legacy):
    a, b = open_sidecar(engram), open_sidecar(legacy)
    assert a.header.fields[constants.KEY_INTEGRITY] == a.compute_integrity() != 0
    assert constants.KEY_INTEGRITY not in b.header.fields
    # the integrity key changes no fingerprint: every .eov written for the model stays valid
    assert a.fingerprint == b.fingerprint == a.compute_fingerprint()
    a.verify_fingerprint()
    b.verify_fingerprint()


def test_table_flips_are_refused_on_every_open(engram):
    info = scan_gguf(engram).tensors["engram.2.table"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        at = info.offset + int(rng.integers(info.nbytes))
        bit = int(rng.integers(8))
        flip(engram, at, bit)
        with pytest.raises(GGUFFormatError, match="fingerprint mismatch"):
            open_sidecar(engram)
        flip(engram, at, bit)
        open_sidecar(engram)


@pytest.mark.parametrize("tensor", ["engram.2.w_k", "engram.2.w_v", "engram.1.norm_q", "engram.2.norm_v",
                                    "engram.2.conv", "engram.canonical_map"])
def test_integrity_hash_covers_every_other_tensor_and_the_header(engram, tensor):
    info = scan_gguf(engram).tensors[tensor]
    flip(engram, info.offset + info.nbytes // 2, 3)
    with pytest.raises(GGUFFormatError, match="integrity hash mismatch"):
        open_sidecar(engram)


def test_header_float_flip_is_caught_by_the_integrity_hash(engram):
    at = scan_gguf(engram).scalar_offsets[constants.KEY_NORM_EPS]
    flip(engram, at + 6, 1)
    with pytest.raises(GGUFFormatError, match="integrity hash mismatch"):
        open_sidecar(engram)


@pytest.mark.parametrize("bit", [0, 1, 5])
def test_flip_in_a_key_name_cannot_hide_the_integrity_hash(engram, bit):
    """A flipped bit in the name "engram.integrity" would leave a file without the key (read as
    converted before it existed): an unknown key is refused instead."""
    at = scan_gguf(engram).scalar_offsets[constants.KEY_INTEGRITY]
    flip(engram, at - 4 - 1, bit)          # the name's last byte, before its uint32 value type
    with pytest.raises(GGUFFormatError, match="unexpected key 'engram.integrit"):
        open_sidecar(engram)


def test_no_header_bit_flip_hangs_or_passes(engram):
    """Every bit of every scalar of the header, flipped alone: each open ends quickly with one
    GGUFFormatError (the prime search used to run for ever on a flipped head count)."""
    script = textwrap.dedent(f"""
        import shutil, sys, time
        from pathlib import Path
        from engram_local.formats.header import GGUFFormatError, scan_gguf
        from engram_local.formats.sidecar import open_sidecar
        src = Path({str(engram)!r})
        header = scan_gguf(src)
        data = src.read_bytes()
        work = src.with_name("flipped.gguf")
        accepted, slowest, n = [], 0.0, 0
        for key, at in header.scalar_offsets.items():
            width = {{4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8, 7: 1, 0: 1, 1: 1, 2: 2, 3: 2}}[header.field_types[key]]
            for bit in range(8 * width):
                bad = bytearray(data)
                bad[at + bit // 8] ^= 1 << (bit % 8)
                work.write_bytes(bytes(bad))
                t = time.perf_counter()
                try:
                    open_sidecar(work)
                    accepted.append((key, bit))
                except GGUFFormatError as exc:
                    assert "\\n" not in str(exc)
                slowest = max(slowest, time.perf_counter() - t)
                n += 1
        print(n, len(accepted), accepted[:5], round(slowest, 3))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    n, n_accepted, *_ = out.stdout.split(maxsplit=2)
    assert int(n) > 300 and int(n_accepted) == 0, out.stdout
    assert float(out.stdout.split()[-1]) < 5.0, out.stdout


def test_count_flip_without_integrity_key_is_refused_quickly(legacy):
    """Files converted before KEY_INTEGRITY: the counts are still checked against the tensors."""
    at = scan_gguf(legacy).scalar_offsets[constants.KEY_N_HEAD]
    flip(legacy, at + 3, 6)              # K = 2 -> 2 + 2**30
    with pytest.raises(GGUFFormatError, match="n_head_per_ngram .* disagree with its tensors"):
        open_sidecar(legacy)


def test_large_tables_are_hashed_once_per_file_identity(engram, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sidecar_mod, "ALWAYS_HASH_TABLE_BYTES", 0)
    hashed = []
    real = sidecar_mod.Sidecar.compute_fingerprint
    monkeypatch.setattr(sidecar_mod.Sidecar, "compute_fingerprint",
                        lambda self: hashed.append(1) or real(self))
    open_sidecar(engram)
    open_sidecar(engram)
    assert len(hashed) == 1                      # the second open found the verified identity
    info = scan_gguf(engram).tensors["engram.1.table"]
    flip(engram, info.offset + 5, 2)             # changes mtime/ctime: hashed again, refused
    with pytest.raises(GGUFFormatError, match="fingerprint mismatch"):
        open_sidecar(engram)
    assert len(hashed) == 2


def test_zeroed_fingerprint_is_not_a_way_around_the_check(engram):
    """Found by the fuzzer: fingerprint 0 (what convert's unfinished temporary file holds) skipped
    the hashes. Convert now opens its temporary file with verify=False; every other open of any
    file, a temporary-looking name included, checks the hashes."""
    at = scan_gguf(engram).scalar_offsets[constants.KEY_FINGERPRINT]
    with open(engram, "r+b") as f:
        f.seek(at)
        f.write(bytes(8))
    with pytest.raises(GGUFFormatError, match="fingerprint mismatch: stored 0x0000000000000000"):
        open_sidecar(engram)
    tmp = engram.with_name(".engram.gguf.123.tmp")
    engram.rename(tmp)
    with pytest.raises(GGUFFormatError, match="fingerprint mismatch: stored 0x0000000000000000"):
        open_sidecar(tmp)
    assert open_sidecar(tmp, verify=False).fingerprint == 0
