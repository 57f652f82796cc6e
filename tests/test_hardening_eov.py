"""Issue 14: memory files cannot be silently corrupted; writes through odd paths fail cleanly.

Each probe failure of the issue has a test here that failed before the fix:
  silent corruption accepted      -> test_every_single_byte_change_is_refused, test_bit_flips_are_refused
  NaN/Inf rows written and read    -> test_writer_refuses_bad_rows, test_reader_refuses_bad_rows
  type-confused metadata           -> test_type_confused_metadata_is_one_clean_error
  SIGBUS / rows changed in place   -> test_changing_the_file_under_a_reader_changes_nothing
  forget through a symlink         -> test_symlink_is_written_through
  FIFO hang, devices, directories  -> test_fifo_device_directory_are_refused_without_blocking
  read-only / unwritable targets   -> test_read_only_and_unwritable_targets
"""

import json
import os
import stat
import struct
import threading

import gguf
import numpy as np
import pytest
import xxhash

from engram_local import constants
from engram_local.formats import eov
from engram_local.formats.eov import (LedgerFact, MemoryFileError, gguf_bytes, open_overrides, parse_memory_bytes,
                                      read_memory_file, write_memory_file)
from engram_local.formats.header import scan_gguf_bytes

FP = 0x1234_5678_9ABC_DEF0


def write_sample(path, value_type=np.float16, **kw):
    rng = np.random.default_rng(0)
    rows, keys = np.array([5, 9, 9, 40]), np.array([7, -1, 3, 11])
    values = rng.standard_normal((4, 8)).astype(value_type)
    facts = [LedgerFact(id="doctor", prompt="My doctor is", answer="Dr. Krause", entries=[0, 1],
                        written="2026-01-01T00:00:00Z"),
             LedgerFact(id="city", prompt="I live in", answer="Portland", entries=[2, 3])]
    write_memory_file(path, FP, {16: (rows, keys, values)}, facts, **kw)
    return path


@pytest.fixture
def sample(tmp_path):
    return write_sample(tmp_path / "me.eov")


# --------------------------------------------------------------------------- checksum

def test_version_2_with_checksum_over_the_whole_file(sample):
    data = sample.read_bytes()
    header = scan_gguf_bytes(data, sample)
    assert header.fields[constants.KEY_EOV_VERSION] == constants.EOV_WRITE_VERSION == 2
    at = header.scalar_offsets[constants.KEY_EOV_CHECKSUM]
    stored = header.fields[constants.KEY_EOV_CHECKSUM]
    assert stored == xxhash.xxh3_64_intdigest(data[:at] + bytes(8) + data[at + 8:])
    # stock gguf-py reads the file (the serializer writes plain GGUF v3)
    reader = gguf.GGUFReader(sample)
    assert reader.fields[constants.KEY_EOV_CHECKSUM].contents() == header.fields[constants.KEY_EOV_CHECKSUM]
    assert [t.name for t in reader.tensors] == ["eov.16.rows", "eov.16.keys", "eov.16.values"]


def test_every_single_byte_change_is_refused(sample):
    """All bytes of a file, each changed once (xor 0x01 and 0xff): none is accepted."""
    data = sample.read_bytes()
    accepted = []
    for i in range(len(data)):
        for mask in (0x01, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            try:
                parse_memory_bytes(bytes(bad), "x.eov")
                accepted.append((i, mask))
            except MemoryFileError as exc:
                assert "\n" not in str(exc) and str(exc).startswith("x.eov")
    assert accepted == []


def test_bit_flips_truncations_and_appends_are_refused(sample):
    data = sample.read_bytes()
    rng = np.random.default_rng(1)
    cases = [data[:n] for n in range(0, len(data), 7)] + [data + b"\0", data + data[-32:]]
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        cases.append(bytes(bad))
    for bad in cases:
        if bad == data:
            continue
        with pytest.raises(MemoryFileError):
            parse_memory_bytes(bad, "x.eov")


def test_checksum_mismatch_message_names_the_file(sample):
    data = bytearray(sample.read_bytes())
    data[-3] ^= 0x10                      # a bit of the last row value
    sample.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match=rf"^{sample}: checksum mismatch .*it is not used$"):
        read_memory_file(sample)


# --------------------------------------------------------------------------- version 1 files

def write_v1(path, ledger: str | None = None, **tensors):
    """A version-1 file as engram-local wrote it before the checksum (gguf-py's writer)."""
    from engram_local.convert.tensors import write_gguf

    w = gguf.GGUFWriter(None, constants.EOV_ARCH)
    w.add_uint32(constants.KEY_EOV_VERSION, 1)
    w.add_uint64(constants.KEY_EOV_FINGERPRINT, FP)
    if tensors:
        w.add_array(constants.KEY_EOV_LAYERS, [16])
    if ledger is not None:
        w.add_string(constants.KEY_EOV_LEDGER, ledger)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    write_gguf(w, path)
    return path


def test_version_1_is_read_and_upgraded_on_the_next_write(tmp_path):
    path = write_v1(tmp_path / "old.eov", json.dumps({"facts": [
        {"id": "f1", "prompt": "My cat is called", "answer": "Figaro", "written": "w", "entries": [0]}]}),
        **{"eov.16.rows": np.array([3], np.int64), "eov.16.keys": np.array([-1], np.int64),
           "eov.16.values": np.ones((1, 8), np.float16)})
    mf = read_memory_file(path, FP)
    assert mf.format_version == 1 and mf.fact("f1").answer == "Figaro"
    write_memory_file(path, FP, {16: (mf.layers[16].rows, mf.layers[16].keys, mf.layers[16].values)},
                      mf.facts)
    again = read_memory_file(path, FP)
    assert again.format_version == 2 and again.fact("f1").answer == "Figaro"
    assert np.array_equal(again.layers[16].values, mf.layers[16].values)


def test_version_1_with_unknown_keys_is_refused(tmp_path):
    """A version-2 file whose version byte flipped to 1 still carries eov.checksum: refused."""
    data = bytearray(write_sample(tmp_path / "me.eov").read_bytes())
    at = scan_gguf_bytes(bytes(data), "x").scalar_offsets[constants.KEY_EOV_VERSION]
    data[at:at + 4] = struct.pack("<I", 1)
    with pytest.raises(MemoryFileError, match="unexpected key 'eov.checksum'"):
        parse_memory_bytes(bytes(data), "x.eov")


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 2e6])
def test_writer_refuses_bad_rows(tmp_path, bad):
    values = np.ones((2, 8), np.float32)
    values[1, 3] = bad
    path = tmp_path / "nan.eov"
    with pytest.raises(MemoryFileError, match="entry 1 has value .*finite and within"):
        write_memory_file(path, FP, {16: ([1, 2], [-1, -1], values)}, [])
    assert not path.exists() and list(tmp_path.iterdir()) == []


def v2_bytes(kvs_extra=(), tensors=None, layers=(16,), ledger=None, version=2, fingerprint=FP):
    """A version-2 file with a valid checksum around whatever it holds (a crafted file)."""
    kvs = [("general.architecture", gguf.GGUFValueType.STRING, constants.EOV_ARCH),
           (constants.KEY_EOV_VERSION, gguf.GGUFValueType.UINT32, version),
           (constants.KEY_EOV_CHECKSUM, gguf.GGUFValueType.UINT64, 0),
           (constants.KEY_EOV_FINGERPRINT, gguf.GGUFValueType.UINT64, fingerprint)]
    if layers:
        kvs.append((constants.KEY_EOV_LAYERS, gguf.GGUFValueType.INT32, list(layers)))
    if ledger is not None:
        kvs.append((constants.KEY_EOV_LEDGER, gguf.GGUFValueType.STRING, ledger))
    kvs += list(kvs_extra)
    data, offsets = gguf_bytes(kvs, list((tensors or {}).items()))
    at = offsets[constants.KEY_EOV_CHECKSUM]
    data[at:at + 8] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(data)))
    return bytes(data)


def layer(rows, keys, values):
    return {"eov.16.rows": np.asarray(rows, np.int64), "eov.16.keys": np.asarray(keys, np.int64),
            "eov.16.values": np.asarray(values)}


GOOD = layer([1, 2], [-1, -1], np.ones((2, 8), np.float16))


@pytest.mark.parametrize("tensors, message", [
    (layer([1, 2], [-1, -1], np.array([[np.nan] * 8, [1] * 8], np.float16)), "entry 0 has value nan"),
    (layer([1, 2], [-1, -1], np.array([[np.inf] * 8, [1] * 8], np.float32)), "entry 0 has value inf"),
    (layer([1, 2], [-1, -1], np.full((2, 8), 3e7, np.float32)), "finite and within"),
    (layer([2, 1], [-1, -1], np.ones((2, 8), np.float16)), "does not follow entry 0"),
    (layer([1, 1], [4, 4], np.ones((2, 8), np.float16)), "does not follow entry 0"),
    (layer([-1, 2], [-1, -1], np.ones((2, 8), np.float16)), "layer 16"),
    (layer([1, 2], [-1, -5], np.ones((2, 8), np.float16)), "layer 16"),
    (layer([1, 2, 3], [-1, -1, -1], np.ones((2, 8), np.float16)), "do not match"),
    (layer([1, 2], [-1, -1], np.ones((2, 8), np.float64)), "has type F64"),
    (dict(GOOD, **{"eov.16.values": np.ones(16, np.float16)}), "has 1 dimensions, expected 2"),
])
def test_reader_refuses_bad_rows(tensors, message):
    with pytest.raises(MemoryFileError, match=message):
        parse_memory_bytes(v2_bytes(tensors=tensors), "x.eov")


def fact(**kw):
    return dict({"id": "f1", "prompt": "p", "answer": "a", "written": "", "entries": [0]}, **kw)


@pytest.mark.parametrize("ledger, message", [
    ({"facts": [fact(answer=None)]}, "'answer' must be a string, got NoneType"),
    ({"facts": [fact(answer=3)]}, "'answer' must be a string, got int"),
    ({"facts": [fact(id=7)]}, "'id' must be a string"),
    ({"facts": [fact(id="")]}, "empty id"),
    ({"facts": [fact(), fact()]}, "duplicate fact id 'f1'"),
    ({"facts": [fact(entries=[5])]}, "lists entry 5, the file has 2"),
    ({"facts": [fact(entries=[-1])]}, "lists entry -1"),
    ({"facts": [fact(entries=[0, 0])]}, "lists an entry twice"),
    ({"facts": [fact(entries=[True])]}, "'entries' must be a list of integers"),
    ({"facts": [fact(entries="0")]}, "'entries' must be a list of integers"),
    ({"facts": [fact(paraphrases=[1])]}, "'paraphrases' must be a list of strings"),
    ({"facts": [fact(written={"a": 1})]}, "'written' must be a string"),
    ({"facts": {"f1": fact()}}, "holds no list of facts"),
    ({"facts": [[1, 2]]}, "malformed fact"),
    ({"facts": [fact()], "history": {}}, "history is not a list"),
    ({"facts": [fact()], "history": [{"id": "h", "prompt": "p", "answer": None}]}, "'answer' must be a string"),
    ("[" * 100000, "not valid JSON"),
])
def test_type_confused_ledger_is_one_clean_error(ledger, message):
    text = ledger if isinstance(ledger, str) else json.dumps(ledger)
    with pytest.raises(MemoryFileError, match=message):
        parse_memory_bytes(v2_bytes(tensors=GOOD, ledger=text), "x.eov")


@pytest.mark.parametrize("kvs, message", [
    ([(constants.KEY_EOV_LAYERS, gguf.GGUFValueType.INT32, 16)], "eov.layers"),
    ([(constants.KEY_EOV_FINGERPRINT, gguf.GGUFValueType.STRING, "0xabc")], "eov.model_fingerprint"),
    ([(constants.KEY_EOV_LEDGER, gguf.GGUFValueType.UINT32, 5)], "eov.ledger"),
    ([(constants.KEY_EOV_VERSION, gguf.GGUFValueType.STRING, "2")], "eov.format_version"),
    ([("eov.extra", gguf.GGUFValueType.UINT32, 1)], "unexpected key 'eov.extra'"),
])
def test_type_confused_metadata_is_one_clean_error(kvs, message):
    """Keys of the wrong type (or unknown ones): one MemoryFileError, never a traceback."""
    base = {k: (t, v) for k, t, v in [("general.architecture", gguf.GGUFValueType.STRING, constants.EOV_ARCH),
                                       (constants.KEY_EOV_VERSION, gguf.GGUFValueType.UINT32, 2),
                                       (constants.KEY_EOV_CHECKSUM, gguf.GGUFValueType.UINT64, 0),
                                       (constants.KEY_EOV_FINGERPRINT, gguf.GGUFValueType.UINT64, FP)]}
    for k, t, v in kvs:
        base[k] = (t, v)
    data, offsets = gguf_bytes([(k, t, v) for k, (t, v) in base.items()], [])
    at = offsets[constants.KEY_EOV_CHECKSUM]
    data[at:at + 8] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(data)))
    with pytest.raises(MemoryFileError, match=message):
        parse_memory_bytes(bytes(data), "x.eov")


def test_layers_must_be_distinct_and_ascending():
    with pytest.raises(MemoryFileError, match="distinct ascending"):
        parse_memory_bytes(v2_bytes(tensors=GOOD, layers=(16, 16)), "x.eov")


def test_writer_refuses_duplicate_ids_and_non_string_fields(tmp_path):
    sets = {16: ([1, 2], [-1, -1], np.ones((2, 8), np.float16))}
    with pytest.raises(ValueError, match="duplicate fact id 'a'"):
        write_memory_file(tmp_path / "d.eov", FP, sets, [LedgerFact("a", "p", "x", [0]), LedgerFact("a", "q", "y", [1])])
    with pytest.raises(MemoryFileError, match="'answer' must be a string, got NoneType"):
        write_memory_file(tmp_path / "d.eov", FP, sets, [LedgerFact("a", "p", None, [0])])
    with pytest.raises(ValueError, match="different widths"):
        write_memory_file(tmp_path / "d.eov", FP, {1: ([1], None, np.ones((1, 8), np.float16)),
                                                   2: ([1], None, np.ones((1, 4), np.float16))})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- private memory

def test_changing_the_file_under_a_reader_changes_nothing(sample):
    """The rows a session loaded are its own: truncating the file (which killed a session with
    SIGBUS when the file was mapped) or overwriting it in place changes nothing it serves."""
    stacks = open_overrides([sample], FP)
    before = {k: (s[0].rows.copy(), s[0].values.copy()) for k, s in stacks.items()}
    for arr in (stacks[16][0].rows, stacks[16][0].values):
        base = arr
        while base is not None and not isinstance(base, bytes):
            assert not isinstance(base, np.memmap)
            base = getattr(base, "base", None)
    with open(sample, "r+b") as f:       # `: > me.eov`
        f.truncate(0)
    for layer, (rows, values) in before.items():
        assert np.array_equal(stacks[layer][0].rows, rows) and np.array_equal(stacks[layer][0].values, values)
    other = write_sample(sample.with_name("other.eov"), value_type=np.float32)
    with open(sample, "r+b") as f:       # an in-place `cp other.eov me.eov`
        f.write(other.read_bytes())
    for layer, (rows, values) in before.items():
        assert np.array_equal(stacks[layer][0].values, values)


# --------------------------------------------------------------------------- paths

def test_symlink_is_written_through(tmp_path):
    """`forget l/me.eov` used to replace the link, leaving the fact in the real file."""
    real = tmp_path / "real" / "me.eov"
    real.parent.mkdir()
    write_sample(real)
    link_dir = tmp_path / "l"
    link_dir.mkdir()
    link = link_dir / "me.eov"
    link.symlink_to(real)
    mf = read_memory_file(link, FP)
    keep = [f for f in mf.facts if f.id != "doctor"]
    s = mf.layers[16]
    write_memory_file(link, FP, {16: (s.rows, s.keys, s.values)}, keep)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert b"Dr. Krause" not in real.read_bytes()
    assert [f.id for f in read_memory_file(real, FP).facts] == ["city"]
    assert sorted(p.name for p in link_dir.iterdir()) == ["me.eov"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    with eov.locked(link):               # the lock sits beside the real file
        assert (real.parent / "me.eov.lock").exists()


def test_fifo_device_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "me.eov"
    os.mkfifo(fifo)
    results = {}

    def attempt():
        for name, call in (("read", lambda: read_memory_file(fifo)),
                           ("open", lambda: open_overrides([fifo])),
                           ("write", lambda: write_sample(fifo)),
                           ("dev-read", lambda: read_memory_file("/dev/zero")),
                           ("dev-write", lambda: write_sample("/dev/null")),
                           ("dir-read", lambda: read_memory_file(tmp_path)),
                           ("dir-write", lambda: write_sample(tmp_path))):
            try:
                call()
                results[name] = "accepted"
            except MemoryFileError as exc:
                results[name] = str(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), f"blocked (done: {sorted(results)})"
    assert "is a FIFO (named pipe), not a memory (.eov) file" in results["read"]
    assert "FIFO" in results["open"] and "FIFO" in results["write"]
    assert "character device" in results["dev-read"] and "character device" in results["dev-write"]
    assert "is a directory" in results["dir-read"] and "is a directory" in results["dir-write"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)      # the FIFO was not replaced


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_and_unwritable_targets_as_user(tmp_path):
    check_read_only_and_unwritable(tmp_path)


def test_read_only_and_unwritable_targets(tmp_path):
    """Permission checks use os.access, which root passes: run the checks as they apply."""
    if os.geteuid() == 0:
        path = write_sample(tmp_path / "ro.eov")
        os.chmod(path, 0o400)
        # root may write anyway; the write must still work or fail in one line
        try:
            write_sample(path)
        except MemoryFileError as exc:
            assert "\n" not in str(exc)
        missing = tmp_path / "no" / "such" / "dir" / "me.eov"
        with pytest.raises(MemoryFileError, match="does not exist"):
            write_sample(missing)
    else:
        check_read_only_and_unwritable(tmp_path)


def check_read_only_and_unwritable(tmp_path):
    path = write_sample(tmp_path / "ro.eov")
    os.chmod(path, 0o400)
    with pytest.raises(MemoryFileError, match="read-only"):
        write_sample(path)
    d = tmp_path / "locked"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        with pytest.raises(MemoryFileError, match="not writable"):
            write_sample(d / "me.eov")
        with pytest.raises(MemoryFileError, match="cannot lock"):
            with eov.locked(d / "me.eov"):
                pass
    finally:
        os.chmod(d, 0o700)


def test_temp_files_private_removed_on_error_and_stale_ones_by_the_next_write(tmp_path, monkeypatch):
    path = write_sample(tmp_path / "me.eov")
    dead = tmp_path / ".me.eov.999999999.tmp"          # a pid that cannot be alive
    dead.write_bytes(b"partial private rows")
    modes = []
    real_replace = os.replace

    def failing_replace(src, dst):
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eov.os, "replace", failing_replace)
    with pytest.raises(MemoryFileError, match=r"me.eov: cannot write the memory file: No space left on device$"):
        write_sample(path)
    monkeypatch.setattr(eov.os, "replace", real_replace)
    assert modes == [0o600]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.eov"]   # stale and own temp gone
    read_memory_file(path, FP)


# --------------------------------------------------------------------------- encryption at rest

def test_encryption_at_rest(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    key = "11" * 32
    monkeypatch.setenv("ENGRAM_LOCAL_KEY", key)
    path = write_sample(tmp_path / "me.eov")
    data = path.read_bytes()
    assert data.startswith(b"EOVSEAL1") and b"Krause" not in data and b"GGUF" not in data
    assert read_memory_file(path, FP).fact("doctor").answer == "Dr. Krause"
    assert read_memory_file(path, FP).sealed
    monkeypatch.setenv("ENGRAM_LOCAL_KEY", "22" * 32)
    with pytest.raises(MemoryFileError, match=r"me.eov: cannot decrypt the memory file: wrong key"):
        read_memory_file(path)
    monkeypatch.delenv("ENGRAM_LOCAL_KEY")
    with pytest.raises(MemoryFileError, match="is encrypted; set ENGRAM_LOCAL_KEY or ENGRAM_LOCAL_KEY_FILE"):
        read_memory_file(path)
    keyfile = tmp_path / "key"
    keyfile.write_text(key + "\n")
    os.chmod(keyfile, 0o644)
    monkeypatch.setenv("ENGRAM_LOCAL_KEY_FILE", str(keyfile))
    with pytest.raises(MemoryFileError, match="readable by others"):
        read_memory_file(path)
    os.chmod(keyfile, 0o600)
    assert read_memory_file(path, FP).fact("city").answer == "Portland"
    bad = bytearray(data)
    bad[40] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(MemoryFileError, match="wrong key, or the file was changed"):
        read_memory_file(path)
    monkeypatch.setenv("ENGRAM_LOCAL_KEY", "not hex")
    with pytest.raises(MemoryFileError, match="must be 64 hex digits"):
        read_memory_file(path)


def test_impossible_tensor_shape_is_refused():
    """Found by atheris: a zero-row tensor with a huge second dimension made numpy raise
    'Maximum allowed dimension exceeded' (a ValueError the CLI showed as a traceback)."""
    data = bytearray(v2_bytes(tensors=layer(np.zeros(0, np.int64), np.zeros(0, np.int64),
                                            np.zeros((0, 8), np.float16))))
    name = b"eov.16.values"
    at = data.index(name) + len(name) + 4            # after the name: n_dims (u32), then dims (u64)
    data[at:at + 8] = struct.pack("<Q", 2**40)       # ggml shape [2**40, 0]: no bytes, no error before
    with pytest.raises(MemoryFileError, match="impossible in"):
        parse_memory_bytes(bytes(data), "x.eov")
