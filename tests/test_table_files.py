"""Tables and override sets read from real GGUF files: memory-mapped, validated, exact."""

import mmap
import types

import gguf
import numpy as np
import pytest

from engram_local import constants
from engram_local.native import Gatherer
from engram_local.formats.eov import open_override_file, write_override_file
from engram_local.native.reference import dequantize_ref, gather_ref
from engram_local.formats.table import open_table, tensor_bytes

QTYPES = [constants.QTYPE_F32, constants.QTYPE_F16, constants.QTYPE_BF16,
          constants.QTYPE_Q8_0, constants.QTYPE_Q4_0]


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def write_gguf(path, tensors: dict, arch="engram"):
    """A GGUF file with `tensors`: name -> ndarray, or (uint8 bytes, ggml type) when quantized."""
    writer = gguf.GGUFWriter(path, arch)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=gguf.GGMLQuantizationType(value[1]))
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantized(values, qtype):
    """What the exporter stores: F32/F16 typed, other types as (bytes, type)."""
    q = gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))
    return q if qtype in (constants.QTYPE_F32, constants.QTYPE_F16) else (q, qtype)


def memory_mapped(arr) -> bool:
    """Whether `arr` is a view into a file mapping (following .base), not a copy."""
    while arr is not None:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = getattr(arr, "base", None)
    return False


# --------------------------------------------------------------------------- tables

@pytest.mark.parametrize("qtype", QTYPES)
def test_open_table_every_qtype(tmp_path, qtype):
    values = np.random.default_rng(qtype).standard_normal((37, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "t.gguf", {"engram.1.table": quantized(values, qtype),
                                            "other": np.zeros(3, dtype=np.float32)})
    table = open_table(path, "engram.1.table")
    assert (table.qtype, table.n_rows, table.dim) == (qtype, 37, 64)
    assert memory_mapped(table.data) and not table.data.flags.writeable
    stored = gguf.GGUFReader(path).tensors[0].data
    want = dequantize_ref(stored, qtype, 64)
    rows = np.array([0, 36, 5, 5, 17])
    with Gatherer(table) as g:
        assert same_bits(g.gather(rows), want[rows])
        assert same_bits(g.gather(np.arange(37)), gguf.quants.dequantize(stored, qtype).reshape(37, 64))


def test_open_table_errors(tmp_path):
    q8 = gguf.quants.quantize(np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.Q4_1)
    path = write_gguf(tmp_path / "t.gguf", {"flat": np.zeros(8, dtype=np.float32),
                                            "ints": np.zeros((2, 4), dtype=np.int32),
                                            "q4_1": (q8, gguf.GGMLQuantizationType.Q4_1),
                                            "ok": np.zeros((2, 4), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"t.gguf: no tensor 'missing'; available: flat, ints, ok, q4_1"):
        open_table(path, "missing")
    with pytest.raises(ValueError, match=r"tensor 'flat' must be 2-D \[n_rows, dim\], has ggml shape \[8\]"):
        open_table(path, "flat")
    with pytest.raises(ValueError, match="tensor 'ints' has type I32; supported table types: BF16, F16, F32, Q4_0, Q8_0"):
        open_table(path, "ints")
    with pytest.raises(ValueError, match="tensor 'q4_1' has type Q4_1"):
        open_table(path, "q4_1")
    with pytest.raises(FileNotFoundError):
        open_table(tmp_path / "absent.gguf", "ok")


def test_truncated_and_corrupt_files(tmp_path):
    values = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    data = write_gguf(tmp_path / "t.gguf", {"table": quantized(values, constants.QTYPE_Q8_0)}).read_bytes()
    cases = {"truncated": data[:len(data) - 200], "header_only": data[:40], "empty": b"",
             "garbage": b"not a gguf file at all" * 10, "bad_magic": b"XXXX" + data[4:]}
    for name, content in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}.gguf: not a readable GGUF file: "):
            open_table(path, "table")


def test_tensor_bytes_rejects_data_beyond_the_file():
    """The guard behind open_table's reads, for a reader that let a short tensor through."""
    reader = types.SimpleNamespace(data=np.zeros(100, dtype=np.uint8))
    short = types.SimpleNamespace(name="t", data_offset=64, n_bytes=68, data=np.zeros(36, np.uint8))
    with pytest.raises(ValueError, match=r"x.gguf: truncated file: tensor 't' needs bytes up to offset 132, "
                                         r"the file has 100"):
        tensor_bytes("x.gguf", reader, short)
    whole = types.SimpleNamespace(name="t", data_offset=32, n_bytes=68, data=np.zeros(68, np.uint8))
    assert tensor_bytes("x.gguf", reader, whole) is whole.data


# --------------------------------------------------------------------------- override files

def test_override_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    sets = {
        14: (np.array([9, 2, 9, 0]), np.array([-1, 5, 3, -1]), rng.standard_normal((4, 32)).astype(np.float16)),
        1: (np.array([3]), None, rng.standard_normal((1, 32)).astype(np.float32)),
        7: (np.zeros(0, np.int64), None, np.zeros((0, 32), np.float32)),  # empty: left out
    }
    path = tmp_path / "user.eov"
    write_override_file(path, sets, fingerprint=2**64 - 3)
    loaded = open_override_file(path, fingerprint=2**64 - 3)
    assert sorted(loaded) == [1, 14]
    ov = loaded[14]
    assert ov.rows.tolist() == [0, 2, 9, 9] and ov.keys.tolist() == [-1, 5, -1, 3]
    assert ov.values.dtype == np.float16 and ov.values.shape == (4, 32)
    assert np.array_equal(ov.values, sets[14][2][[3, 1, 0, 2]])  # sorted by (row, key)
    assert loaded[1].keys.tolist() == [-1] and loaded[1].values.dtype == np.float32
    for arr in (ov.rows, ov.keys, ov.values):   # private memory: changing the file cannot reach them
        assert not memory_mapped(arr), "override sets must be read into memory, not mapped"

    # File-backed sets drive a gather exactly like in-memory ones.
    table_path = write_gguf(tmp_path / "t.gguf", {"table": rng.standard_normal((12, 32)).astype(np.float32)})
    table = open_table(table_path, "table")
    rows, keys = np.array([0, 2, 2, 9, 9, 9, 3]), np.array([-1, 5, 4, 3, 1, -1, 8])
    with Gatherer(table, [loaded[14]]) as g:
        want, hits = gather_ref(np.asarray(table.data).view(np.float32).reshape(12, 32),
                                [(ov.rows, ov.keys, ov.values)], rows, keys)
        assert same_bits(g.gather(rows, keys), want) and g.last_hits == hits == 5


def test_empty_override_file(tmp_path):
    write_override_file(tmp_path / "e.eov", {}, fingerprint=0)
    assert open_override_file(tmp_path / "e.eov") == {}


def test_override_file_write_errors(tmp_path):
    v = np.zeros((2, 4), np.float32)
    path = tmp_path / "o.eov"
    with pytest.raises(ValueError, match=r"duplicate override entry \(row 3, key -1\)"):
        write_override_file(path, {0: ([3, 3], None, v)}, fingerprint=1)
    with pytest.raises(ValueError, match=r"fingerprint must be an integer in \[0, 2\*\*64\)"):
        write_override_file(path, {}, fingerprint=-1)
    with pytest.raises(ValueError, match="layer ids must be integers"):
        write_override_file(path, {-2: ([1, 3], None, v)}, fingerprint=1)
    with pytest.raises(TypeError, match=r"sets\[0\] must be a \(rows, keys, values\) tuple"):
        write_override_file(path, {0: ([1, 3], v)}, fingerprint=1)
    with pytest.raises(TypeError, match="values must be float16 or float32"):
        write_override_file(path, {0: ([1, 3], None, v.astype(np.float64))}, fingerprint=1)
    assert not path.exists() and not (tmp_path / "o.eov.tmp").exists()


def test_override_file_read_errors(tmp_path):
    good = tmp_path / "good.eov"
    write_override_file(good, {3: ([1], None, np.zeros((1, 4), np.float32))}, fingerprint=77)
    with pytest.raises(ValueError, match="written for model fingerprint 0x000000000000004d, not 0x0000000000000005"):
        open_override_file(good, fingerprint=5)

    table = write_gguf(tmp_path / "t.gguf", {"table": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="t.gguf: not an override file \\(architecture 'engram'"):
        open_override_file(table)

    def eov(name, version=constants.EOV_FORMAT_VERSION, layers=(3,), tensors=None):
        writer = gguf.GGUFWriter(tmp_path / name, constants.EOV_ARCH)
        writer.add_uint32(constants.KEY_EOV_VERSION, version)
        writer.add_uint64(constants.KEY_EOV_FINGERPRINT, 77)
        writer.add_array(constants.KEY_EOV_LAYERS, list(layers))
        for tensor_name, value in (tensors or {}).items():
            writer.add_tensor(tensor_name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    rows, keys = np.array([2, 1], np.int64), np.array([-1, -1], np.int64)
    values = np.zeros((2, 4), np.float32)
    layer3 = {"eov.3.rows": rows, "eov.3.keys": keys, "eov.3.values": values}
    with pytest.raises(ValueError, match="override format version 3, this engram-local reads versions 1, 2"):
        open_override_file(eov("v3.eov", version=3))
    with pytest.raises(ValueError, match=r"no eov.checksum \(uint64\) in a version 2 file"):
        open_override_file(eov("v2.eov", version=2))
    with pytest.raises(ValueError, match="layer 3: .*does not follow entry 0"):
        open_override_file(eov("unsorted.eov", tensors=layer3))
    with pytest.raises(ValueError, match="no tensor 'eov.3.keys'"):
        open_override_file(eov("missing.eov", tensors={"eov.3.rows": rows, "eov.3.values": values}))
    with pytest.raises(ValueError, match="tensor 'eov.3.keys' has type I32, expected I64"):
        open_override_file(eov("i32.eov", tensors=dict(layer3, **{"eov.3.keys": keys.astype(np.int32)})))
    with pytest.raises(ValueError, match="tensors of layers not listed in eov.layers: eov.4.rows"):
        open_override_file(eov("extra.eov", tensors=dict(layer3, **{"eov.4.rows": rows})))
    with pytest.raises(ValueError, match="missing key 'eov.model_fingerprint'"):
        writer = gguf.GGUFWriter(tmp_path / "nofp.eov", constants.EOV_ARCH)
        writer.add_uint32(constants.KEY_EOV_VERSION, 1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        open_override_file(tmp_path / "nofp.eov")
