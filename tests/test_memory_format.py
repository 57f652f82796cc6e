"""The .eov user memory format: ledger, atomic private writes, locking, model binding, damage."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time

import gguf
import numpy as np
import pytest

from engram_local import constants
from engram_local.formats.eov import (LedgerFact, MemoryFileError, locked, open_override_file,
                                    read_memory_file, write_memory_file)


def sample(tmp_path, name="u.eov", fingerprint=0xABCDEF0123456789):
    rng = np.random.default_rng(0)
    rows = np.array([90, 7, 7, 300])
    keys = np.array([5, 11, 3, 42])
    values = rng.standard_normal((4, 8)).astype(np.float16)
    facts = [LedgerFact(id="doctor", prompt="My doctor is", answer="Dr. Krause", entries=[0, 1],
                        written="2026-01-01T00:00:00Z"),
             LedgerFact(id="f2", prompt="I live in", answer="Portland", entries=[1, 2, 3],
                        paraphrases=["Home city:"], written="2026-01-02T00:00:00Z")]
    path = tmp_path / name
    write_memory_file(path, fingerprint, {16: (rows, keys, values)}, facts)
    return path, rows, keys, values


def test_round_trip_with_ledger(tmp_path):
    path, rows, keys, values = sample(tmp_path)
    mf = read_memory_file(path, 0xABCDEF0123456789)
    s = mf.layers[16]
    assert s.rows.tolist() == [7, 7, 90, 300] and s.keys.tolist() == [3, 11, 5, 42]
    assert s.values.dtype == np.float16
    # each fact still points at the same (row, key) entries after the sort
    by_key = {(int(r), int(k)): v for r, k, v in zip(rows, keys, values)}
    entries = mf.entries()
    assert [(entries[e][1], entries[e][2]) for e in mf.fact("doctor").entries] == [(7, 11), (90, 5)]
    assert sorted((entries[e][1], entries[e][2]) for e in mf.fact("f2").entries) == [(7, 3), (7, 11), (300, 42)]
    for i, (layer, r, k) in enumerate(entries):
        assert np.array_equal(mf.values()[i], by_key[(r, k)].astype(np.float32))
    f2 = mf.fact("f2")
    assert (f2.prompt, f2.answer, f2.paraphrases, f2.written) == ("I live in", "Portland", ["Home city:"],
                                                                  "2026-01-02T00:00:00Z")


def test_file_is_private_and_gguf_tools_read_it(tmp_path):
    path, *_ = sample(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == constants.EOV_ARCH
    assert "Dr. Krause" in reader.fields[constants.KEY_EOV_LEDGER].contents()
    dump = shutil.which("gguf-dump")
    if dump:
        out = subprocess.run([dump, str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "eov.16.values" in out.stdout


def test_other_model_is_refused(tmp_path):
    path, *_ = sample(tmp_path)
    with pytest.raises(MemoryFileError, match=r"written for model fingerprint 0xabcdef0123456789, not "
                                              r"0x0000000000000001 \(the model in use\)"):
        read_memory_file(path, 1)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_damaged_files_give_clear_errors(tmp_path, damage):
    path, *_ = sample(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"not a gguf file at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(data[:40])
    with pytest.raises(MemoryFileError, match=str(path.name)):
        read_memory_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_memory_file(tmp_path / "none.eov")


def test_bad_ledger_is_refused(tmp_path):
    path = tmp_path / "bad.eov"
    with pytest.raises(ValueError, match="lists entry 9"):
        write_memory_file(path, 1, {3: ([1], [2], np.zeros((1, 4), np.float32))},
                          [LedgerFact(id="a", prompt="p", answer="a", entries=[9])])
    with pytest.raises(ValueError, match="duplicate fact id 'a'"):
        write_memory_file(path, 1, {3: ([1], [2], np.zeros((1, 4), np.float32))},
                          [LedgerFact(id="a", prompt="p", answer="a"), LedgerFact(id="a", prompt="q", answer="b")])
    assert not path.exists()


def test_failed_write_keeps_the_previous_file(tmp_path):
    path, *_ = sample(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="duplicate override entry"):
        write_memory_file(path, 1, {16: ([3, 3], [1, 1], np.zeros((2, 8), np.float16))}, [])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_writer_killed_mid_write_leaves_previous_file_intact(tmp_path):
    path, *_ = sample(tmp_path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import numpy as np
        from engram_local.formats.eov import write_memory_file, LedgerFact
        write_memory_file({str(path)!r}, 7, {{16: ([1, 2], [3, 4], np.ones((2, 8), np.float16))}},
                          [LedgerFact(id="new", prompt="p", answer="secret", entries=[0])])
    """)
    # the fault hook kills the writer after half of the new file reached its temporary file
    env = dict(os.environ, ENGRAM_LOCAL_FAULT="eov-write:half-written")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env)
    assert proc.returncode == -9
    assert path.read_bytes() == before
    read_memory_file(path, 0xABCDEF0123456789)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert leftovers and all(n.endswith(".tmp") for n in leftovers)
    with locked(path):        # the next writer removes what the dead one left
        pass
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_writers_are_serialized(tmp_path):
    path = tmp_path / "u.eov"
    order = []
    inside = threading.Event()

    def first():
        with locked(path):
            inside.set()
            order.append("first in")
            time.sleep(0.3)
            order.append("first out")

    def second():
        inside.wait()
        with locked(path):
            order.append("second in")

    a, b = threading.Thread(target=first), threading.Thread(target=second)
    a.start()
    b.start()
    a.join()
    b.join()
    assert order == ["first in", "first out", "second in"]


def test_minimal_api_still_reads_ledger_files(tmp_path):
    path, *_ = sample(tmp_path)
    sets = open_override_file(path, 0xABCDEF0123456789)
    assert sorted(sets) == [16] and len(sets[16]) == 4
