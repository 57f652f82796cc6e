"""Property tests: the kernel's entry points equal the numpy references on generated inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_local import constants, native
from engram_local.native import Gatherer, KernelError, OverrideSet, Table
from engram_local.native.reference import (canonicalize_ref, dequantize_ref, gather_ref, hash_layer_ref,
                                    make_hash_constants)

FAST = settings(max_examples=60, deadline=None)
QTYPES = [constants.QTYPE_F32, constants.QTYPE_F16, constants.QTYPE_BF16,
          constants.QTYPE_Q8_0, constants.QTYPE_Q4_0]
INT64 = st.integers(-(2**63), 2**63 - 1)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@FAST
@given(data=st.data(), map_len=st.integers(0, 100))
def test_canonicalize(data, map_len):
    id_map = np.array(data.draw(st.lists(INT64, min_size=map_len, max_size=map_len)), dtype=np.int64)
    raw = data.draw(st.lists(st.integers(-5, map_len + 5), max_size=50))
    if all(0 <= r < map_len for r in raw):
        np.testing.assert_array_equal(native.canonicalize(id_map, raw), canonicalize_ref(id_map, raw))
    else:
        with pytest.raises(KernelError, match="raw_ids"):
            native.canonicalize(id_map, raw)


@FAST
@given(data=st.data(), max_ngram=st.integers(2, 5), n_head=st.integers(1, 4),
       vocab=st.sampled_from([1, 2, 97, 99092, 2**31]), seed=st.integers(0, 2**32))
def test_hash_deepseek_constants(data, max_ngram, n_head, vocab, seed):
    kw = make_hash_constants(seed, vocab, max_ngram, n_head)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    start = data.draw(st.integers(0, len(ids)))
    rows, mix = native.hash_layer(ids, start=start, with_mix=True, **kw)
    want_rows, want_mix = hash_layer_ref(ids, kw["multipliers"], kw["primes"], kw["offsets"],
                                         kw["pad_id"], max_ngram, n_head, start)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(mix, want_mix)
    assert np.all(mix >= 0)  # DeepSeek's multiplier bound keeps every mix non-negative


@FAST
@given(data=st.data(), max_ngram=st.integers(2, 4), n_head=st.integers(1, 3))
def test_hash_any_int64_constants(data, max_ngram, n_head):
    """Arbitrary multipliers (products wrap), ids, pad and prime sizes: still numpy's int64."""
    n_cols = (max_ngram - 1) * n_head
    vocab = data.draw(st.integers(1, 2**63 - 1))
    multipliers = data.draw(st.lists(INT64, min_size=max_ngram, max_size=max_ngram))
    primes = data.draw(st.lists(st.integers(1, 2**62), min_size=n_cols, max_size=n_cols))
    offsets = [data.draw(st.integers(0, 2**63 - p)) for p in primes]
    pad_id = data.draw(st.integers(0, vocab - 1))
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=12))
    kw = dict(multipliers=multipliers, primes=primes, offsets=offsets, vocab=vocab, pad_id=pad_id,
              max_ngram=max_ngram, n_head=n_head)
    rows, mix = native.hash_layer(ids, with_mix=True, **kw)
    want_rows, want_mix = hash_layer_ref(ids, multipliers, primes, offsets, pad_id, max_ngram, n_head)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(mix, want_mix)


@FAST
@given(data=st.data(), qtype=st.sampled_from(QTYPES), n_rows=st.integers(1, 12),
       blocks=st.integers(1, 3))
def test_gather_with_overrides(data, qtype, n_rows, blocks):
    dim = blocks * (32 if qtype in (constants.QTYPE_Q8_0, constants.QTYPE_Q4_0) else 3)
    row_bytes = native.row_bytes(qtype, dim)
    raw = np.frombuffer(data.draw(st.binary(min_size=n_rows * row_bytes, max_size=n_rows * row_bytes)),
                        dtype=np.uint8).reshape(n_rows, row_bytes)
    base = dequantize_ref(raw, qtype, dim)

    # Up to three sets of distinct (row, key) entries, keys from a small pool so they collide.
    sets = []
    for _ in range(data.draw(st.integers(0, 3))):
        keyed = data.draw(st.booleans())
        pairs = data.draw(st.lists(st.tuples(st.integers(0, n_rows - 1),
                                             st.integers(-1, 2) if keyed else st.just(-1)),
                                   unique=True, max_size=8))
        dtype = data.draw(st.sampled_from([np.float16, np.float32]))
        bits = data.draw(st.binary(min_size=len(pairs) * dim * np.dtype(dtype).itemsize,
                                   max_size=len(pairs) * dim * np.dtype(dtype).itemsize))
        values = np.frombuffer(bits, dtype=dtype).reshape(len(pairs), dim)
        rows = np.array([p[0] for p in pairs], dtype=np.int64)
        keys = np.array([p[1] for p in pairs], dtype=np.int64) if keyed else None
        sets.append((rows, keys, values))

    look_rows = np.array(data.draw(st.lists(st.integers(0, n_rows - 1), max_size=20)), dtype=np.int64)
    look_keys = (None if data.draw(st.booleans()) else
                 np.array(data.draw(st.lists(st.integers(-1, 3), min_size=len(look_rows),
                                             max_size=len(look_rows))), dtype=np.int64))
    with Gatherer(Table(raw, qtype, n_rows, dim),
                  [OverrideSet.build(r, v, k) for r, k, v in sets]) as g:
        out = g.gather(look_rows, look_keys)
        want, hits = gather_ref(base, sets, look_rows, look_keys)
        assert same_bits(out, want)
        assert g.last_hits == hits


@FAST
@given(data=st.data())
def test_override_set_accepts_exactly_the_sorted_unique_entries(data):
    pairs = data.draw(st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 2)), max_size=8))
    rows = np.array([p[0] for p in pairs], dtype=np.int64)
    keys = np.array([p[1] for p in pairs], dtype=np.int64)
    values = np.zeros((len(pairs), 2), dtype=np.float32)
    strictly_sorted = all(a < b for a, b in zip(pairs, pairs[1:]))
    if strictly_sorted:
        assert len(OverrideSet(rows, values, keys)) == len(pairs)
    else:
        with pytest.raises(KernelError, match="strictly ascending"):
            OverrideSet(rows, values, keys)
