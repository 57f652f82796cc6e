"""The native kernel against the numpy references, bit for bit, and its every error path."""

import numpy as np
import pytest

from engram_local import constants, native
from engram_local.native import Gatherer, KernelError, OverrideSet, Table
from engram_local.native.reference import (canonicalize_ref, dequantize_ref, gather_ref, hash_layer_ref,
                                    make_hash_constants, random_table_bytes)

QTYPES = [constants.QTYPE_F32, constants.QTYPE_F16, constants.QTYPE_BF16,
          constants.QTYPE_Q8_0, constants.QTYPE_Q4_0]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """float32 arrays equal bit for bit (NaN payloads and signed zeros included)."""
    return (a.dtype == b.dtype == np.float32 and a.shape == b.shape
            and np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def hash_ref(ids, kw, start=0):
    return hash_layer_ref(ids, kw["multipliers"], kw["primes"], kw["offsets"], kw["pad_id"],
                          kw["max_ngram"], kw["n_head"], start)


def random_table(seed, qtype, n_rows=16, dim=64):
    raw = random_table_bytes(np.random.default_rng(seed), qtype, n_rows, dim)
    return Table(raw, qtype, n_rows, dim), dequantize_ref(raw, qtype, dim)


# --------------------------------------------------------------------------- status codes

def test_every_status_code_has_a_message():
    errors = {name for name in dir(native.lib) if name.startswith("EK_ERR_")}
    assert errors == set(native.STATUS_TEXT)
    for name in errors:
        with pytest.raises(KernelError) as info:
            native._fail(getattr(native.lib, name), "where")
        assert str(info.value) == f"where: {native.STATUS_TEXT[name]} ({name})"
        assert info.value.status == getattr(native.lib, name) and info.value.status_name == name
    with pytest.raises(KernelError, match=r"where: unknown error \(ek_status 99\)"):
        native._fail(99, "where")


# --------------------------------------------------------------------------- row bytes

def test_row_bytes():
    assert native.row_bytes(constants.QTYPE_F32, 3) == 12
    assert native.row_bytes(constants.QTYPE_BF16, 3) == 6
    assert native.row_bytes(constants.QTYPE_Q8_0, 64) == 68
    assert native.row_bytes(constants.QTYPE_Q4_0, 32) == 18
    with pytest.raises(ValueError, match="multiple of Q8_0's block of 32"):
        native.row_bytes(constants.QTYPE_Q8_0, 48)
    with pytest.raises(ValueError, match="qtype 3 is not supported"):
        native.row_bytes(3, 32)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        native.row_bytes(constants.QTYPE_F32, 0)
    with pytest.raises(TypeError, match="dim must be an integer"):
        native.row_bytes(constants.QTYPE_F32, 2.0)
    with pytest.raises(ValueError, match="a row of 4611686018427387904 F32 values exceeds the int64 byte range"):
        native.row_bytes(constants.QTYPE_F32, 2**62)
    with pytest.raises(ValueError, match="dim must be <= 9223372036854775807"):
        native.row_bytes(constants.QTYPE_F32, 2**63)


# --------------------------------------------------------------------------- canonical ids

def test_canonicalize_matches_reference():
    rng = np.random.default_rng(0)
    id_map = rng.integers(0, 700, size=1000)
    raw = rng.integers(0, 1000, size=5000)
    np.testing.assert_array_equal(native.canonicalize(id_map, raw), canonicalize_ref(id_map, raw))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                   np.int64, np.uint64])
def test_canonicalize_accepts_every_integer_dtype(dtype):
    id_map = np.arange(100, dtype=np.int64)[::-1].copy()
    raw = np.array([0, 5, 99], dtype=dtype)
    out = native.canonicalize(id_map, raw)
    assert out.dtype == np.int64 and out.tolist() == [99, 94, 0]


def test_canonicalize_edges():
    id_map = np.array([3, 1, 2], dtype=np.int64)
    assert native.canonicalize(id_map, []).shape == (0,)
    assert native.canonicalize(id_map, [2]).tolist() == [2]
    assert native.canonicalize(id_map, [0, 1, 2, 2]).tolist() == [3, 1, 2, 2]
    strided = np.array([2, 9, 0, 9, 1], dtype=np.int64)[::2]  # non-contiguous: copied
    assert native.canonicalize(id_map, strided).tolist() == [2, 3, 1]


def test_canonicalize_errors():
    id_map = np.arange(10, dtype=np.int64)
    with pytest.raises(KernelError, match=r"raw_ids\[2\] = 10 is outside \[0, 10\)") as info:
        native.canonicalize(id_map, [0, 9, 10])
    assert info.value.status_name == "EK_ERR_RANGE" and "(EK_ERR_RANGE)" in str(info.value)
    with pytest.raises(ValueError, match=r"raw_ids\[0\] = -1 is outside"):
        native.canonicalize(id_map, [-1])
    with pytest.raises(TypeError, match="raw_ids must be an integer array, got dtype float64"):
        native.canonicalize(id_map, np.array([1.0]))
    with pytest.raises(TypeError, match="raw_ids must be an integer array, got dtype bool"):
        native.canonicalize(id_map, np.array([True]))
    with pytest.raises(ValueError, match=r"raw_ids must be 1-D, got shape \(1, 2\)"):
        native.canonicalize(id_map, [[1, 2]])
    with pytest.raises(ValueError, match="above the int64 maximum"):
        native.canonicalize(id_map, np.array([2**63], dtype=np.uint64))
    with pytest.raises(TypeError, match="id_map must be an integer array"):
        native.canonicalize(id_map.astype(np.float32), [1])
    with pytest.raises(ValueError, match=r"raw_ids\[0\] = 0 is outside \[0, 0\)"):
        native.canonicalize(np.array([], dtype=np.int64), [0])


# --------------------------------------------------------------------------- hashing

@pytest.mark.parametrize("max_ngram,n_head", [(2, 1), (3, 8), (4, 8), (5, 3)])
def test_hash_matches_reference(max_ngram, n_head):
    kw = make_hash_constants(seed=max_ngram * 10 + n_head, vocab=5000, max_ngram=max_ngram,
                             n_head=n_head)
    ids = np.random.default_rng(1).integers(0, 5000, size=300)
    rows, mix = native.hash_layer(ids, with_mix=True, **kw)
    want_rows, want_mix = hash_ref(ids, kw)
    assert rows.shape == (300, (max_ngram - 1) * n_head) and mix.shape == (300, max_ngram - 1)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(mix, want_mix)
    np.testing.assert_array_equal(native.hash_layer(ids, **kw), want_rows)


def test_hash_rows_stay_in_their_heads():
    kw = make_hash_constants(seed=3, vocab=1000, max_ngram=3, n_head=4)
    rows = native.hash_layer(np.arange(1000), **kw)
    assert np.all(rows >= kw["offsets"]) and np.all(rows < kw["offsets"] + kw["primes"])


def test_hash_edges():
    kw = make_hash_constants(seed=4, vocab=50, max_ngram=4, n_head=2)
    empty, empty_mix = native.hash_layer([], with_mix=True, **kw)
    assert empty.shape == (0, 6) and empty_mix.shape == (0, 3) and empty.dtype == np.int64
    one = native.hash_layer([7], **kw)
    np.testing.assert_array_equal(one, hash_ref([7], kw)[0])
    # Largest id, and the pad id itself inside the sequence.
    ids = [49, 49, kw["pad_id"], 0, 49]
    np.testing.assert_array_equal(native.hash_layer(ids, **kw), hash_ref(ids, kw)[0])


def test_hash_pads_positions_before_the_sequence():
    kw = make_hash_constants(seed=5, vocab=100, max_ngram=3, n_head=1)
    m, pad = kw["multipliers"], kw["pad_id"]
    rows, mix = native.hash_layer([11, 12], with_mix=True, **kw)
    assert mix[0].tolist() == [int(11 * m[0] ^ pad * m[1]), int(11 * m[0] ^ pad * m[1] ^ pad * m[2])]
    assert mix[1].tolist() == [int(12 * m[0] ^ 11 * m[1]), int(12 * m[0] ^ 11 * m[1] ^ pad * m[2])]
    assert rows[1, 1] == mix[1, 1] % kw["primes"][1] + kw["offsets"][1]


def test_hash_with_history_equals_the_tail_of_the_full_sequence():
    kw = make_hash_constants(seed=6, vocab=1000, max_ngram=4, n_head=3)
    ids = np.random.default_rng(2).integers(0, 1000, size=40)
    full_rows, full_mix = native.hash_layer(ids, with_mix=True, **kw)
    for start in (1, 2, 3, 17, 39, 40):
        rows, mix = native.hash_layer(ids, start=start, with_mix=True, **kw)
        np.testing.assert_array_equal(rows, full_rows[start:])
        np.testing.assert_array_equal(mix, full_mix[start:])
    # Decoding token by token with the last N-1 ids as history gives the same rows.
    for t in range(len(ids)):
        history = ids[max(0, t - 3):t + 1]
        step = native.hash_layer(history, start=len(history) - 1, **kw)
        np.testing.assert_array_equal(step[0], full_rows[t])


def test_hash_deepseek_cross_check():
    """V4.1 layer-1 multipliers (engram-architecture.md §3): largest ids, no int64 overflow."""
    vocab = 99092
    half_bound = (2**63 - 1) // vocab // 2
    assert half_bound == 46539438283891
    mult = np.random.default_rng(0 + 10007 * 1).integers(0, half_bound, size=4, dtype=np.int64) * 2 + 1
    assert mult.tolist() == [76632096046245, 4839876093313, 35959672319349, 73987337458391]
    assert max(mult) * (vocab - 1) < 2**63
    kw = dict(multipliers=mult, primes=np.array([1000003, 1000033, 1000037]),
              offsets=np.array([0, 1000003, 2000036]), vocab=vocab, pad_id=2, max_ngram=4, n_head=1)
    ids = [99091, 0, 99091, 5]
    rows, mix = native.hash_layer(ids, with_mix=True, **kw)
    assert rows.tolist() == [[502056, 1382578, 2939135], [308877, 1561593, 2333995],
                             [717096, 1418769, 2376937], [464699, 1111343, 2866993]]
    np.testing.assert_array_equal(mix, hash_ref(ids, kw)[1])
    assert np.all(mix >= 0)


def test_hash_wrapping_multipliers_match_numpy():
    """Beyond DeepSeek's bound products wrap; the kernel still matches numpy's int64."""
    kw = dict(multipliers=np.array([2**63 - 1, -(2**62) + 1, 3]), primes=np.array([1009, 1013, 1019, 1021]),
              offsets=np.array([0, 1009, 2022, 3041]), vocab=2**40, pad_id=2**40 - 1, max_ngram=3, n_head=2)
    ids = np.array([2**40 - 1, 2, 12345678901, 0])
    rows, mix = native.hash_layer(ids, with_mix=True, **kw)
    want_rows, want_mix = hash_ref(ids, kw)
    assert np.any(want_mix < 0)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(mix, want_mix)


def test_hash_accepts_int32_and_strided_ids():
    kw = make_hash_constants(seed=7, vocab=300, max_ngram=3, n_head=2)
    ids = np.random.default_rng(3).integers(0, 300, size=20)
    want = native.hash_layer(ids, **kw)
    np.testing.assert_array_equal(native.hash_layer(ids.astype(np.int32), **kw), want)
    np.testing.assert_array_equal(native.hash_layer(np.repeat(ids, 2)[::2], **kw), want)


def test_hash_errors():
    kw = make_hash_constants(seed=8, vocab=100, max_ngram=3, n_head=2)
    ids = [1, 2, 3]
    with pytest.raises(KernelError, match=r"ids\[1\] = 100 is outside \[0, 100\)"):
        native.hash_layer([5, 100], **kw)
    with pytest.raises(KernelError, match=r"ids\[0\] = -3 is outside"):
        native.hash_layer([-3], **kw)
    with pytest.raises(TypeError, match="ids must be an integer array, got dtype float64"):
        native.hash_layer(np.array([1.0, 2.0]), **kw)
    with pytest.raises(ValueError, match="ids must be 1-D"):
        native.hash_layer(np.ones((2, 2), dtype=np.int64), **kw)
    with pytest.raises(ValueError, match="start must be <= 3"):
        native.hash_layer(ids, start=4, **kw)
    with pytest.raises(ValueError, match="start must be >= 0"):
        native.hash_layer(ids, start=-1, **kw)
    bad = dict(kw, multipliers=kw["multipliers"][:2])
    with pytest.raises(ValueError, match="multipliers needs 3 entries for max_ngram=3, n_head=2, got 2"):
        native.hash_layer(ids, **bad)
    with pytest.raises(ValueError, match="primes needs 4 entries"):
        native.hash_layer(ids, **dict(kw, primes=kw["primes"][:3]))
    with pytest.raises(ValueError, match="offsets needs 4 entries"):
        native.hash_layer(ids, **dict(kw, offsets=np.zeros(5, dtype=np.int64)))
    with pytest.raises(ValueError, match="pad_id must be <= 99"):
        native.hash_layer(ids, **dict(kw, pad_id=100))
    with pytest.raises(ValueError, match="max_ngram must be >= 2"):
        native.hash_layer(ids, **dict(kw, max_ngram=1))
    with pytest.raises(ValueError, match="n_head must be >= 1"):
        native.hash_layer(ids, **dict(kw, n_head=0))
    with pytest.raises(ValueError, match="vocab must be >= 1"):
        native.hash_layer(ids, **dict(kw, vocab=0))
    with pytest.raises(TypeError, match="n_head must be an integer, got bool"):
        native.hash_layer(ids, **dict(kw, n_head=True))
    with pytest.raises(TypeError, match="multipliers must be an integer array"):
        native.hash_layer(ids, **dict(kw, multipliers=kw["multipliers"].astype(float)))
    with pytest.raises(KernelError, match="primes must be >= 1, got 0"):
        native.hash_layer(ids, **dict(kw, primes=np.array([11, 0, 13, 17])))
    with pytest.raises(KernelError, match="offsets must be >= 0, got -1"):
        native.hash_layer(ids, **dict(kw, offsets=np.array([0, -1, 5, 9])))
    with pytest.raises(KernelError, match="exceed the int64 range"):
        native.hash_layer(ids, **dict(kw, offsets=np.array([0, 2**63 - 2, 5, 9])))


# --------------------------------------------------------------------------- tables

@pytest.mark.parametrize("qtype", QTYPES)
def test_gather_every_qtype_bit_exact(qtype):
    table, ref = random_table(seed=qtype, qtype=qtype, n_rows=64, dim=128)
    rows = np.random.default_rng(qtype).integers(0, 64, size=300)
    rows[:2] = [0, 63]  # both table ends
    with Gatherer(table) as g:
        out = g.gather(rows)
        assert same_bits(out, ref[rows])
        assert g.last_hits == 0
        assert same_bits(g.gather(np.arange(64)), ref)


def test_gather_f16_and_bf16_exhaustive():
    """Every one of the 65536 half / bfloat16 bit patterns: subnormals, inf, NaN payloads."""
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    for qtype in (constants.QTYPE_F16, constants.QTYPE_BF16):
        raw = bits.view(np.uint8)
        with Gatherer(Table(raw, qtype, 256, 256)) as g:
            assert same_bits(g.gather(np.arange(256)), dequantize_ref(raw, qtype, 256))


def test_gather_q8_0_every_scale_bit_pattern():
    """Q8_0 blocks whose f16 scale takes every one of the 65536 bit patterns (NaN, inf, subnormal)."""
    rng = np.random.default_rng(8)
    blocks = rng.integers(0, 256, size=(65536, 34), dtype=np.uint8)
    blocks[:, 0:2] = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(2048, 32 * 34)                       # 2048 rows of 32 blocks
    with Gatherer(Table(raw, constants.QTYPE_Q8_0, 2048, 1024)) as g:
        assert same_bits(g.gather(np.arange(2048)), dequantize_ref(raw, constants.QTYPE_Q8_0, 1024))


def test_quantized_tables_from_real_values():
    import gguf

    values = np.random.default_rng(9).standard_normal((20, 96)).astype(np.float32) * 3
    for qtype in (constants.QTYPE_Q8_0, constants.QTYPE_Q4_0, constants.QTYPE_BF16):
        raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))
        with Gatherer(Table(raw, qtype, 20, 96)) as g:
            out = g.gather(np.arange(20))
        assert same_bits(out, dequantize_ref(raw, qtype, 96))
        assert np.abs(out - values).max() < np.abs(values).max() / 7  # a fair approximation


def test_typed_tables_and_shapes():
    f32 = np.random.default_rng(10).standard_normal((5, 4)).astype(np.float32)
    with Gatherer(Table(f32, constants.QTYPE_F32, 5, 4)) as g:
        out = g.gather(np.array([[4, 0, 1], [2, 2, 3]]))
        assert out.shape == (2, 3, 4) and same_bits(out, f32[[[4, 0, 1], [2, 2, 3]]])
        assert g.gather([]).shape == (0, 4)
        assert g.gather(np.int64(3)).shape == (4,)
    f16 = f32.astype(np.float16)
    with Gatherer(Table(f16, constants.QTYPE_F16, 5, 4)) as g:
        assert same_bits(g.gather([1, 3]), f16[[1, 3]].astype(np.float32))
    assert repr(Table(f16, constants.QTYPE_F16, 5, 4)) == "Table(F16, n_rows=5, dim=4)"


def test_table_errors():
    raw = np.zeros((4, 34), dtype=np.uint8)
    with pytest.raises(ValueError, match="qtype 3 is not supported; supported: F32"):
        Table(raw, 3, 4, 32)
    with pytest.raises(ValueError, match="not a multiple of Q4_0's block of 32"):
        Table(raw, constants.QTYPE_Q4_0, 4, 40)
    with pytest.raises(ValueError, match="table data holds 136 bytes; 5 rows of 32 Q8_0 values need 170"):
        Table(raw, constants.QTYPE_Q8_0, 5, 32)
    with pytest.raises(ValueError, match="C-contiguous"):
        Table(np.zeros((4, 68), dtype=np.uint8)[:, :34], constants.QTYPE_Q8_0, 4, 32)
    with pytest.raises(TypeError, match="dtype float32 cannot hold F16 rows"):
        Table(np.zeros((4, 8), dtype=np.float32), constants.QTYPE_F16, 4, 8)
    with pytest.raises(TypeError, match="dtype int64 cannot hold F32 rows"):
        Table(np.zeros((4, 8), dtype=np.int64), constants.QTYPE_F32, 4, 8)
    with pytest.raises(TypeError, match="must be a numpy array, got bytes"):
        Table(b"\0" * 136, constants.QTYPE_Q8_0, 4, 32)
    with pytest.raises(ValueError, match="n_rows must be >= 0"):
        Table(raw, constants.QTYPE_Q8_0, -1, 32)


def test_gather_errors():
    table, _ = random_table(seed=11, qtype=constants.QTYPE_F16, n_rows=8, dim=4)
    g = Gatherer(table)
    with pytest.raises(KernelError, match=r"gather: rows\[1\] = 8 is outside \[0, 8\)"):
        g.gather([0, 8])
    with pytest.raises(KernelError, match=r"rows\[1, 0\] = -1 is outside"):
        g.gather([[0], [-1]])
    with pytest.raises(KernelError, match=r"gather: rows = 9 is outside \[0, 8\)"):
        g.gather(9)
    with pytest.raises(TypeError, match="rows must be an integer array, got dtype float64"):
        g.gather(np.array([1.0]))
    with pytest.raises(ValueError, match=r"keys shape \(1,\) does not match rows shape \(2,\)"):
        g.gather([0, 1], keys=[5])
    with pytest.raises(TypeError, match="keys must be an integer array"):
        g.gather([0, 1], keys=np.array([0.5, 1.5]))
    with pytest.raises(TypeError, match="table must be a Table"):
        Gatherer(np.zeros((8, 4), dtype=np.float32))
    g.close()
    with pytest.raises(RuntimeError, match="Gatherer is closed"):
        g.gather([0])


# --------------------------------------------------------------------------- overrides

def override(rows, keys, dim, seed, dtype=np.float32):
    values = np.random.default_rng(seed).standard_normal((len(rows), dim)).astype(dtype)
    return (np.asarray(rows, dtype=np.int64), None if keys is None else np.asarray(keys, dtype=np.int64),
            values)


def check_gather(table, table_f32, sets, rows, keys):
    with Gatherer(table, [OverrideSet(r, v, k) for r, k, v in sets]) as g:
        out = g.gather(rows, keys)
        want, hits = gather_ref(table_f32, sets, rows, keys)
        assert same_bits(out, want)
        assert g.last_hits == hits
    return out, hits


def test_override_precedence():
    table, base = random_table(seed=12, qtype=constants.QTYPE_Q8_0, n_rows=10, dim=32)
    set0 = override([1, 2, 2, 9], [-1, -1, 7, -1], 32, seed=1)
    set1 = override([2, 5], [9, 3], 32, seed=2, dtype=np.float16)
    rows = np.array([0, 1, 2, 2, 2, 2, 5, 5, 9, 9])
    keys = np.array([-1, 5, 7, 9, 8, -1, 3, 4, 0, 9])
    out, hits = check_gather(table, base, [set0, set1], rows, keys)
    v0, v1 = set0[2], set1[2].astype(np.float32)
    assert same_bits(out[0], base[0])          # no entry: base
    assert same_bits(out[1], v0[0])            # key -1 entry serves any key
    assert same_bits(out[2], v0[2])            # exact key beats key -1 in the same set
    assert same_bits(out[3], v1[0])            # the later set wins
    assert same_bits(out[4], v0[1])            # later set's key does not match: earlier set's -1
    assert same_bits(out[5], v0[1])            # a key-less look-up: only key -1 entries
    assert same_bits(out[6], v1[1])            # keyed match in the later set
    assert same_bits(out[7], base[5])          # keyed entry, non-matching key: base
    assert same_bits(out[8], v0[3]) and same_bits(out[9], v0[3])  # last table row
    assert hits == 8


def test_override_zero_one_many_sets():
    table, base = random_table(seed=13, qtype=constants.QTYPE_Q4_0, n_rows=50, dim=64)
    rng = np.random.default_rng(14)
    rows = rng.integers(0, 50, size=200)
    keys = rng.integers(-1, 4, size=200)
    check_gather(table, base, [], rows, keys)
    sets = []
    for s in range(5):
        entry_rows = np.sort(rng.choice(50, size=15, replace=False))
        entry_keys = None if s == 2 else rng.integers(-1, 4, size=15)
        sets.append(override(entry_rows, entry_keys, 64, seed=20 + s, dtype=[np.float16, np.float32][s % 2]))
        check_gather(table, base, sets, rows, keys)
        check_gather(table, base, sets, rows, None)


def test_override_keys_none_means_any():
    table, base = random_table(seed=15, qtype=constants.QTYPE_F32, n_rows=4, dim=8)
    rows, _, values = override([1, 3], None, 8, seed=3)
    with Gatherer(table, [OverrideSet(rows, values)]) as g:
        out = g.gather([0, 1, 3], keys=[4, 5, 6])
        assert same_bits(out[1:], values) and same_bits(out[0], base[0]) and g.last_hits == 2


def test_override_set_build_sorts():
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    ov = OverrideSet.build([5, 2, 5, 0], values, keys=[8, -1, -1, 3])
    assert ov.rows.tolist() == [0, 2, 5, 5] and ov.keys.tolist() == [3, -1, -1, 8]
    assert ov.values[:, 0].tolist() == [9, 3, 6, 0]
    unkeyed = OverrideSet.build([3, 1], values[:2])
    assert unkeyed.keys is None and unkeyed.rows.tolist() == [1, 3] and unkeyed.values[0, 0] == 3
    assert len(ov) == 4 and repr(ov) == "OverrideSet(n=4, dim=3, F32, keyed=True)"
    with pytest.raises(ValueError, match=r"duplicate override entry \(row 5, key -1\)"):
        OverrideSet.build([5, 5], values[:2])
    with pytest.raises(ValueError, match="keys has 1 entries but rows has 2"):
        OverrideSet.build([5, 6], values[:2], keys=[1])
    with pytest.raises(ValueError, match=r"values must be \[n, dim\] with n = 2"):
        OverrideSet.build([5, 6], values)
    with pytest.raises(TypeError, match="values must be a numpy array"):
        OverrideSet.build([5, 6], [[1.0], [2.0]])


def test_override_set_errors():
    v = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(KernelError, match=r"entry 1 \(row 1, key -1\) does not follow entry 0 "
                                          r"\(row 2, key -1\).*OverrideSet.build sorts them") as info:
        OverrideSet([2, 1, 3], v)
    assert info.value.status_name == "EK_ERR_UNSORTED"
    with pytest.raises(KernelError, match=r"entry 2 \(row 3, key 4\) does not follow entry 1 \(row 3, key 4\)"):
        OverrideSet([1, 3, 3], v, keys=[0, 4, 4])
    with pytest.raises(KernelError, match=r"rows\[0\] = -1 is outside"):
        OverrideSet([-1, 0, 1], v)
    with pytest.raises(KernelError, match=r"keys\[1\] = -2; keys must be >= -1"):
        OverrideSet([0, 1, 2], v, keys=[0, -2, 0])
    with pytest.raises(TypeError, match="values must be float16 or float32, got dtype float64"):
        OverrideSet([0, 1, 2], v.astype(np.float64))
    with pytest.raises(ValueError, match=r"values must be 2-D \[n, dim\]"):
        OverrideSet([0, 1, 2], np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="values has 3 rows but rows has 2 entries"):
        OverrideSet([0, 1], v)
    with pytest.raises(ValueError, match="keys has 2 entries but rows has 3"):
        OverrideSet([0, 1, 2], v, keys=[1, 2])
    with pytest.raises(TypeError, match="rows must be an integer array"):
        OverrideSet(np.array([0.0, 1.0, 2.0]), v)
    # Non-contiguous values are copied, harmlessly.
    ov = OverrideSet([0, 1, 2], np.zeros((3, 8), dtype=np.float16)[:, ::2])
    assert ov.values.flags.c_contiguous and ov.dim == 4


def test_gatherer_validates_sets_against_the_table():
    table, _ = random_table(seed=16, qtype=constants.QTYPE_F32, n_rows=4, dim=8)
    with pytest.raises(KernelError, match=r"overrides\[1\]: rows\[1\] = 4 is outside \[0, 4\)"):
        Gatherer(table, [OverrideSet([0], np.zeros((1, 8), np.float32)),
                         OverrideSet([3, 4], np.zeros((2, 8), np.float32))])
    with pytest.raises(ValueError, match=r"overrides\[0\] has rows of 4 values, the table 8"):
        Gatherer(table, [OverrideSet([0], np.zeros((1, 4), np.float32))])
    with pytest.raises(TypeError, match=r"overrides\[0\] must be an OverrideSet"):
        Gatherer(table, [([0], None, np.zeros((1, 8), np.float32))])


def test_empty_override_set():
    table, base = random_table(seed=17, qtype=constants.QTYPE_F16, n_rows=4, dim=8)
    empty = OverrideSet(np.zeros(0, np.int64), np.zeros((0, 8), np.float16), np.zeros(0, np.int64))
    with Gatherer(table, [empty]) as g:
        assert same_bits(g.gather([0, 3]), base[[0, 3]]) and g.last_hits == 0


def test_row_index_and_binary_search_agree_and_a_damaged_index_is_refused():
    """OverrideSet's O(1) row index serves exactly what the index-free binary search serves."""
    rng = np.random.default_rng(31)
    table, base = random_table(seed=30, qtype=constants.QTYPE_F16, n_rows=5000, dim=32)
    rows = np.sort(rng.choice(5000, size=700, replace=False))
    rows = np.repeat(rows, 3)                                   # several keyed entries per row
    keys = np.tile(np.array([-1, 5, 11]), 700)
    ov = OverrideSet(rows, rng.standard_normal((2100, 32)).astype(np.float16), keys)
    look_rows = rng.integers(0, 5000, size=4000)
    look_rows[::3] = rows[rng.integers(0, 2100, size=len(look_rows[::3]))]
    look_keys = rng.integers(-1, 13, size=4000)
    with Gatherer(table, [ov]) as g:
        indexed = g.gather(look_rows, look_keys)
        hits = g.last_hits
    assert ov._c.index != native.ffi.NULL and hits > 1000
    ov._c.index, ov._c.index_cap = native.ffi.NULL, 0
    with Gatherer(table, [ov]) as g:
        assert same_bits(g.gather(look_rows, look_keys), indexed)
    damaged = np.full(4096, -1, dtype=np.int64)              # an index that finds nothing
    ov._c.index, ov._c.index_cap = native.ffi.from_buffer("int64_t[]", damaged), 4096
    with pytest.raises(KernelError):
        Gatherer(table, [ov])
