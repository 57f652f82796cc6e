"""Kernel calls release the GIL: concurrent gathers and hashes on shared objects stay exact."""

import threading

import numpy as np

from engram_local import constants, native
from engram_local.native import Gatherer, OverrideSet, Table
from engram_local.native.reference import make_hash_constants, random_table_bytes

N_THREADS = 4
ROUNDS = 25


def test_concurrent_gathers_and_hashes_equal_serial():
    rng = np.random.default_rng(0)
    kw = make_hash_constants(seed=1, vocab=99092, max_ngram=3, n_head=8, head_size=250)
    n_rows, dim = int(kw["primes"].sum()), 128  # one layer's table: every head's rows
    table = Table(random_table_bytes(rng, constants.QTYPE_Q8_0, n_rows, dim),
                  constants.QTYPE_Q8_0, n_rows, dim)
    overrides = [OverrideSet.build(rng.choice(n_rows, size=500, replace=False),
                                   rng.standard_normal((500, dim)).astype(np.float16),
                                   rng.integers(-1, 3, size=500))
                 for _ in range(3)]
    inputs = [(rng.integers(0, 99092, size=400), rng.integers(-1, 3, size=(400, 16)))
              for _ in range(N_THREADS)]

    gatherer = Gatherer(table, overrides)

    def work(ids, keys):
        rows, mix = native.hash_layer(ids, with_mix=True, **kw)
        return rows, mix, gatherer.gather(rows, keys)

    serial = [work(*inp) for inp in inputs]

    results = [[] for _ in range(N_THREADS)]
    errors = []
    barrier = threading.Barrier(N_THREADS)

    def run(i):
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                results[i].append(work(*inputs[i]))
        except Exception as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(N_THREADS):
        assert len(results[i]) == ROUNDS
        for rows, mix, out in results[i]:
            np.testing.assert_array_equal(rows, serial[i][0])
            np.testing.assert_array_equal(mix, serial[i][1])
            assert np.array_equal(out.view(np.uint32), serial[i][2].view(np.uint32))
    gatherer.close()
