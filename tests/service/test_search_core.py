"""Stage 1: the top-k kernel against a numpy oracle, the search and the engine against exact search."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.core.search import (
    SearchResult,
    Stage1Engine,
    checked_result,
    knn_exact,
    knn_plain,
    search_keys,
    search_queries,
)
from service.core.topk import topk_rows


def _oracle(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best first; among equal scores the lower position first (a stable sort of the negated scores)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    positions = np.full((len(scores), k), -1, np.int64)
    values = np.full((len(scores), k), np.nan, np.float32)
    topk_rows(np.ascontiguousarray(scores, np.float32), k, positions, values)
    return positions, values


# --- the kernel on given scores: exactly the oracle, ties included ---


@st.composite
def _score_rows(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    n_rows = draw(st.integers(1, 4))
    length = draw(st.integers(1, 700))
    k = draw(st.integers(1, length))
    pool = draw(
        st.sampled_from(
            [
                st.floats(-10, 10, width=32),
                st.integers(-3, 3).map(float),  # many exact ties
                st.sampled_from([-3.4e38, -1e30, -1.0, -0.0, 0.0, 1e30, 3.4e38]),
                st.floats(width=32, allow_nan=False),  # infinities and extremes
            ]
        )
    )
    scores = draw(hnp.arrays(np.float32, (n_rows, length), elements=pool))
    return scores, k


@settings(max_examples=300, deadline=None)
@given(_score_rows())
def test_kernel_equals_oracle(case: tuple[np.ndarray, int]) -> None:
    scores, k = case
    positions, values = _topk(scores, k)
    want_pos, want_val = _oracle(scores, k)
    np.testing.assert_array_equal(positions, want_pos)
    np.testing.assert_array_equal(values, want_val)


@pytest.mark.parametrize("length", [10, 63, 64, 65, 127, 128, 129, 511, 1_000, 4_097, 20_000])
@pytest.mark.parametrize("k", [1, 64, 250])
def test_kernel_shapes_around_k(length: int, k: int) -> None:
    k = min(k, length)
    rng = np.random.default_rng(length * 1000 + k)
    scores = rng.standard_normal((6, length)).astype(np.float32)
    scores[1] -= 1_000.0  # all negative
    scores[2] = np.round(scores[2])  # few distinct values
    scores[3, ::3] = scores[3].max()  # a third of the row ties for first place
    scores[4] = 0.0  # every score equal
    scores[5, ::5] = 50.0  # a fifth ties below a few larger scores: the k-th place is among them
    scores[5, rng.choice(length, min(k, length) // 3, replace=False)] = 100.0 + rng.random(
        min(k, length) // 3
    )
    positions, values = _topk(scores, k)
    want_pos, want_val = _oracle(scores, k)
    np.testing.assert_array_equal(positions, want_pos)
    np.testing.assert_array_equal(values, want_val)


def test_kernel_signed_zeros_and_infinities_tie_by_position() -> None:
    row = np.array([[0.0, -0.0, -np.inf, 5.0, -0.0, 0.0, np.inf, -np.inf, np.inf, 1e-45]], np.float32)
    positions, values = _topk(row, 10)
    np.testing.assert_array_equal(positions[0], [6, 8, 3, 9, 0, 1, 4, 5, 2, 7])
    np.testing.assert_array_equal(values, row[:, positions[0]])
    long_row = np.tile(row, (1, 300))  # long enough for the bound
    positions, _ = _topk(long_row, 64)
    np.testing.assert_array_equal(positions, _oracle(long_row, 64)[0])


def test_kernel_never_writes_outside_the_row_on_nan() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((3, 2_000)).astype(np.float32)
    scores[0, ::7] = np.nan
    scores[1] = np.nan
    positions, _ = _topk(scores, 64)
    assert ((positions >= 0) & (positions < 2_000)).all()
    assert all(len(set(row)) == 64 for row in positions)


@pytest.mark.parametrize("k,out_shape", [(0, (2, 0)), (11, (2, 11)), (3, (2, 4)), (3, (1, 3))])
def test_kernel_rejects_bad_k_and_shapes(k: int, out_shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        topk_rows(
            np.zeros((2, 10), np.float32), k, np.zeros(out_shape, np.int64), np.zeros(out_shape, np.float32)
        )


# --- the search: inner products and selection against exact search ---


def _assert_exact_topk(res: SearchResult, queries: np.ndarray, keys: np.ndarray, k: int) -> None:
    """The k best keys of each query up to float32 rounding, best first, with their scores.

    Another summation order moves a score by rounding, so keys whose scores lie that close to the
    k-th may swap; elsewhere the set is exactly the float64 one. The rounding of a float32 inner
    product of d terms is bounded by gamma_(d+1) * sum |q_i k_i| (Higham), whatever the order: with
    cancellation that is far more than a few ulps of the score itself.
    """
    k = min(k, len(keys))
    assert res.positions.shape == res.scores.shape == (len(queries), k)
    assert res.positions.dtype == np.int64 and res.scores.dtype == np.float32
    q64, k64 = queries.astype(np.float64), keys.astype(np.float64)
    exact = q64 @ k64.T
    n_u = (queries.shape[1] + 1) * 2.0**-24
    tol = 1e-5 + n_u / (1 - n_u) * (np.abs(q64) @ np.abs(k64).T).max(initial=0.0)
    for row, (pos, got) in enumerate(zip(res.positions, res.scores, strict=True)):
        assert len(set(pos.tolist())) == k
        np.testing.assert_allclose(got, exact[row, pos], rtol=0, atol=tol)
        assert (np.diff(got) <= 0).all()
        if k:
            kth = np.sort(exact[row])[::-1][k - 1]
            assert (exact[row, pos] >= kth - 2 * tol).all()
            np.testing.assert_allclose(got, np.sort(exact[row])[::-1][:k], rtol=0, atol=2 * tol)


@pytest.mark.parametrize("dim", [17, 65])
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
        (1, 50, 64),
        (10, 50, 64),
        (12, 5_000, 7),
        (4, 1_000, 250),
        (2, 50_000, 64),
    ],
)
def test_search_is_exact(dim: int, n_q: int, length: int, k: int) -> None:
    rng = np.random.default_rng(length + k + dim)
    keys = rng.standard_normal((length, dim)).astype(np.float32)
    queries = rng.standard_normal((n_q, dim)).astype(np.float32)
    res = knn_exact(queries, keys, k)
    _assert_exact_topk(res, queries, keys, k)
    ref = knn_plain(queries, keys, k)
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-6, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    n_q=st.integers(1, 10),
    length=st.integers(1, 400),
    dim=st.sampled_from([17, 65]),
    k=st.sampled_from([1, 16, 64]),
    scale=st.sampled_from([1e-3, 1.0, 1e3, 1e15]),
    seed=st.integers(0, 2**32 - 1),
)
def test_search_random_shapes(n_q: int, length: int, dim: int, k: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = (scale * rng.standard_normal((length, dim))).astype(np.float32)
    queries = rng.standard_normal((n_q, dim)).astype(np.float32)
    _assert_exact_topk(knn_exact(queries, keys, k), queries, keys, k)


@pytest.mark.parametrize("dim", [17, 65])
@pytest.mark.parametrize("length", [50, 4_000, 12_000])
def test_ties_and_repeated_behaviors(dim: int, length: int) -> None:
    rng = np.random.default_rng(dim + length)
    # small integers: every inner product is exact in float32, so equal keys tie exactly whatever
    # the summation order, and the lower positions must win
    base = rng.integers(-3, 4, (40, dim)).astype(np.float32)
    keys = base[rng.integers(0, 40, length)]
    queries = rng.integers(-3, 4, (20, dim)).astype(np.float32)
    res = knn_exact(queries, keys, 64)
    want_pos, want_val = _oracle(queries @ keys.T, 64)
    np.testing.assert_array_equal(res.positions, want_pos)
    np.testing.assert_array_equal(res.scores, want_val)


def test_empty_inputs() -> None:
    keys = np.zeros((0, 5), np.float32)
    assert knn_exact(np.ones((3, 5), np.float32), keys, 64).positions.shape == (3, 0)
    assert knn_exact(np.ones((0, 5), np.float32), np.ones((9, 5), np.float32), 4).positions.shape == (0, 4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_engine_splits_and_reassembles(threads: int) -> None:
    rng = np.random.default_rng(1)
    pairs = [
        (rng.standard_normal((c, 17)).astype(np.float32), rng.standard_normal((n, 17)).astype(np.float32))
        for c, n in [(200, 10_000), (3, 20), (150, 4_000), (1, 0), (0, 30), (7, 64)]
    ]
    engine = Stage1Engine(threads=threads)
    try:
        results = engine.search(pairs, 64)
    finally:
        engine.close()
    assert len(results) == len(pairs)
    for (q, keys), res in zip(pairs, results, strict=True):
        _assert_exact_topk(res, q, keys, 64)
    assert engine.faiss_device == "cpu"


def test_keys_and_queries_fold_the_time_bias() -> None:
    table = np.zeros((4, 4), np.float32)  # a search table: attention rows, a free last column
    table[:, :-1] = np.arange(12, dtype=np.float32).reshape(4, 3)
    bias = np.array([0.5, -1.0], np.float32)
    keys = search_keys(table, bias, np.array([1, 3]), np.array([1, 0]))
    np.testing.assert_array_equal(keys, [[3, 4, 5, -1.0], [9, 10, 11, 0.5]])
    np.testing.assert_array_equal(search_queries(table, np.array([2])), [[6, 7, 8, 1.0]])
    assert not table[:, -1].any(), "the bundle's table is left as it was"


def test_checked_result_refuses_what_would_score_the_wrong_behaviors() -> None:
    good = SearchResult(np.array([[2, 0], [1, 2]]), np.array([[0.5, 0.1], [0.3, 0.2]], np.float32))
    positions, scores = checked_result(good, n_candidates=2, n_behaviors=3, top_k=2)
    assert positions.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(positions, [[2, 0], [1, 2]])
    bad = [
        (SearchResult(np.array([[2, 3], [1, 2]]), good.scores), "positions"),  # past the sequence
        (SearchResult(np.array([[2, -1], [1, 2]]), good.scores), "positions"),
        (SearchResult(good.positions[:1], good.scores[:1]), "positions"),  # a candidate missing
        (SearchResult(good.positions, np.array([[np.nan, 0.1], [0.3, 0.2]], np.float32)), "scores"),
        (SearchResult(good.positions, good.scores[:, :1]), "scores"),
    ]
    for res, what in bad:
        with pytest.raises(RuntimeError, match=f"stage 1 returned {what}"):
            checked_result(res, n_candidates=2, n_behaviors=3, top_k=2)
    # k = min(K, L): a top-64 over 2 behaviors must have 2 columns, each position below 2
    with pytest.raises(RuntimeError, match="expected \\(2, 2\\)"):
        checked_result(good, n_candidates=2, n_behaviors=2, top_k=64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,recent", [(64, 16), (64, 64), (8, 3)])
def test_engine_keeps_the_newest_in_front_of_the_search(threads: int, k: int, recent: int) -> None:
    rng = np.random.default_rng(k + recent)
    # small integers: exact float32 inner products, so ties and scores compare exactly
    base = rng.integers(-3, 4, (30, 17)).astype(np.float32)
    pairs = [
        (rng.integers(-3, 4, (c, 17)).astype(np.float32), base[rng.integers(0, 30, n)])
        for c, n in [(200, 5_000), (3, 20), (5, recent), (4, recent - 1), (1, 0), (0, 30), (7, k), (6, k + 1)]
    ]
    engine = Stage1Engine(threads=threads)
    try:
        results = engine.search(pairs, k, recent)
    finally:
        engine.close()
    for (q, keys), res in zip(pairs, results, strict=True):
        length = len(keys)
        n_kept = min(recent, length)
        kept = np.arange(length - 1, length - 1 - n_kept, -1)
        older, older_scores = _oracle(q @ keys[: length - n_kept].T, min(k, length) - n_kept)
        want_pos = np.concatenate([np.broadcast_to(kept, (len(q), n_kept)), older], axis=1)
        want_val = np.concatenate([q @ keys[kept].T, older_scores], axis=1)
        np.testing.assert_array_equal(res.positions, want_pos)
        np.testing.assert_array_equal(res.scores, want_val)
        assert res.positions.shape == (len(q), min(k, length))
    with pytest.raises(ValueError, match="recent"):
        Stage1Engine(threads=1).search(pairs, k, k + 1)
