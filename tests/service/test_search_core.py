"""Stage 1: the threshold search and the engine against plain faiss.knn (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.search import Stage1Engine, knn_plain, knn_threshold, search_keys, search_queries


def _same(res, ref) -> None:
    assert res.positions.shape == ref.positions.shape
    np.testing.assert_allclose(res.scores, ref.scores, rtol=0, atol=1e-5)
    # where scores tie exactly, either tied element is a right answer; elsewhere positions agree
    for row in range(len(ref.positions)):
        got = dict(zip(res.positions[row], res.scores[row], strict=True))
        want = dict(zip(ref.positions[row], ref.scores[row], strict=True))
        if len(set(ref.scores[row])) == len(ref.scores[row]):
            assert list(res.positions[row]) == list(ref.positions[row])
        else:
            assert sorted(got.values()) == pytest.approx(sorted(want.values()), abs=1e-5)


@pytest.mark.parametrize(
    "n_q,length,k",
    [
        (200, 10_000, 64),
        (37, 3_001, 64),
        (5, 300, 64),
        (8, 257, 64),
        (3, 64, 64),
        (3, 10, 64),
        (1, 1, 64),
        (12, 5_000, 7),
        (4, 1_000, 250),
        (9, 4_096, 64),
        (2, 50_000, 64),
    ],
)
def test_threshold_equals_faiss_knn(n_q: int, length: int, k: int) -> None:
    rng = np.random.default_rng(length + k)
    keys = rng.standard_normal((length, 17)).astype(np.float32)
    queries = rng.standard_normal((n_q, 17)).astype(np.float32)
    _same(knn_threshold(queries, keys, k), knn_plain(queries, keys, k))


@pytest.mark.parametrize("length", [4_000, 12_000])  # the heap-scan and the survivor-filter paths
def test_ties_and_repeated_behaviors(length: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 9)).astype(np.float32)
    keys = base[rng.integers(0, 40, length)]  # every key repeated 100+ times: massive exact ties
    queries = rng.standard_normal((20, 9)).astype(np.float32)
    res, ref = knn_threshold(queries, keys, 64), knn_plain(queries, keys, 64)
    # BLAS and FAISS may round the last bit differently; the chosen keys are the same multiset
    np.testing.assert_allclose(res.scores, ref.scores, rtol=0, atol=1e-5)
    chosen = np.sort(keys[res.positions].sum(-1), axis=1)
    oracle = np.sort(keys[ref.positions].sum(-1), axis=1)
    np.testing.assert_allclose(chosen, oracle, rtol=0, atol=1e-5)


def test_empty_inputs() -> None:
    keys = np.zeros((0, 5), np.float32)
    assert knn_threshold(np.ones((3, 5), np.float32), keys, 64).positions.shape == (3, 0)
    assert knn_threshold(np.ones((0, 5), np.float32), np.ones((9, 5), np.float32), 4).positions.shape == (
        0,
        4,
    )


def test_engine_splits_and_reassembles() -> None:
    rng = np.random.default_rng(1)
    pairs = [
        (rng.standard_normal((c, 17)).astype(np.float32), rng.standard_normal((n, 17)).astype(np.float32))
        for c, n in [(200, 10_000), (3, 20), (150, 4_000), (1, 0)]
    ]
    engine = Stage1Engine(threads=2)
    try:
        for (q, keys), res in zip(pairs, engine.search(pairs, 64), strict=True):
            _same(res, knn_plain(q, keys, 64))
    finally:
        engine.close()
    assert engine.faiss_device == "cpu"


def test_keys_and_queries_fold_the_time_bias() -> None:
    attention = np.arange(12, dtype=np.float32).reshape(4, 3)
    bias = np.array([0.5, -1.0], np.float32)
    keys = search_keys(attention, bias, np.array([1, 3]), np.array([1, 0]))
    np.testing.assert_array_equal(keys, [[3, 4, 5, -1.0], [9, 10, 11, 0.5]])
    np.testing.assert_array_equal(search_queries(attention, np.array([2])), [[6, 7, 8, 1.0]])
