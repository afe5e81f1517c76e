"""Stage-1 retrieval metrics: planted-truth precision/recall/lift and the mutual-information NDCG, on
hand-built cases with known answers and against plain-loop oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporters.retrieval import (
    MiTable,
    bucket_bounds,
    csr_take,
    mi_ndcg,
    planted_metrics,
    position_buckets,
)

# -- planted truth -------------------------------------------------------------------------------------------


def test_planted_metrics_hand_case() -> None:
    # k = 2. Impression 0: 4 behaviors, related {1, 3}, top [3, 0] -> 1 hit.
    # Impression 1: 1 behavior (short), related {0}, top [0, -1] -> 1 hit of min(2, 1) = 1 chosen.
    # Impression 2: no history (skipped). Impression 3: 5 behaviors, nothing related, top [4, 2] -> 0 hits.
    hist_len = np.array([4, 1, 0, 5])
    topk = np.array([[3, 0, 2], [0, -1, -1], [-1, -1, -1], [4, 2, 1]])  # a third column beyond k is ignored
    indptr = np.array([0, 2, 3, 3, 3])
    related = np.array([1, 3, 0])
    m = planted_metrics(hist_len, topk, indptr, related, k=2)
    assert m["n"] == 3 and m["n_long"] == 2 and m["k"] == 2
    assert m["precision_at_k"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["base_rate"] == pytest.approx((2 / 4 + 1 / 1 + 0 / 5) / 3)
    assert m["recall_at_k"] == pytest.approx((1 / 2 + 1 / 1) / 2)  # only impressions with related behaviors
    assert m["lift"] == pytest.approx(m["precision_at_k"] / m["base_rate"])
    assert m["precision_at_k_long"] == pytest.approx(0.25)
    assert m["base_rate_long"] == pytest.approx(0.25)
    assert m["recall_at_k_long"] == pytest.approx(0.5)
    assert m["lift_long"] == pytest.approx(1.0)


def test_planted_metrics_ignores_out_of_history_and_duplicate_related() -> None:
    # related 7 lies outside the 3-behavior history, related 2 is listed twice
    m = planted_metrics(np.array([3]), np.array([[2, 1]]), np.array([0, 3]), np.array([2, 7, 2]), k=2)
    assert m["base_rate"] == pytest.approx(1 / 3)
    assert m["precision_at_k"] == pytest.approx(0.5)
    assert m["recall_at_k"] == pytest.approx(1.0)
    assert m["n_long"] == 1 and m["lift_long"] == pytest.approx(1.5)
    # top-k columns fewer than k: missing ranks hold nothing but k still defines "long"
    m = planted_metrics(np.array([5]), np.array([[0]]), np.array([0, 1]), np.array([0]), k=2)
    assert m["precision_at_k"] == pytest.approx(0.5) and m["n_long"] == 1


def test_planted_metrics_no_related_anywhere() -> None:
    m = planted_metrics(np.array([3, 4]), np.array([[0, 1], [2, 3]]), np.array([0, 0, 0]), np.array([]), k=2)
    assert m["precision_at_k"] == 0.0 and m["base_rate"] == 0.0
    assert math.isnan(m["lift"]) and math.isnan(m["recall_at_k"])


def _planted_loop(hist_len, topk, indptr, rel_pos, k):  # type: ignore[no-untyped-def]
    """The per-impression loop the training code ran before, as an oracle."""
    prec, base, recall, prec_long, base_long = [], [], [], [], []
    for i, n_hist in enumerate(hist_len):
        if n_hist == 0:
            continue
        rel = rel_pos[indptr[i] : indptr[i + 1]]
        rel = rel[(rel >= 0) & (rel < n_hist)]
        chosen = topk[i][: min(k, n_hist)]
        hits = np.isin(chosen, rel).sum()
        p, b = hits / len(chosen), len(rel) / n_hist
        prec.append(p)
        base.append(b)
        if len(rel):
            recall.append(hits / min(len(rel), len(chosen)))
        if n_hist > k:
            prec_long.append(p)
            base_long.append(b)
    return np.mean(prec), np.mean(base), np.mean(recall), np.mean(prec_long), np.mean(base_long)


def test_planted_metrics_matches_the_loop_on_random_cases() -> None:
    rng = np.random.default_rng(3)
    k, n_imp = 8, 300
    hist_len = rng.integers(0, 40, n_imp)
    topk = np.full((n_imp, k), -1)
    rel_lists = []
    for i, n in enumerate(hist_len):
        m = min(k, n)
        topk[i, :m] = rng.choice(n, m, replace=False) if n else []
        rel_lists.append(np.sort(rng.choice(max(n, 1), rng.integers(0, max(n, 1) // 2 + 1), replace=False)))
    indptr = np.r_[0, np.cumsum([len(r) for r in rel_lists])]
    rel_pos = np.concatenate(rel_lists)
    m = planted_metrics(hist_len, topk, indptr, rel_pos, k)
    p, b, r, pl, bl = _planted_loop(hist_len, topk, indptr, rel_pos, k)
    assert m["precision_at_k"] == pytest.approx(p)
    assert m["base_rate"] == pytest.approx(b)
    assert m["recall_at_k"] == pytest.approx(r)
    assert m["precision_at_k_long"] == pytest.approx(pl)
    assert m["lift_long"] == pytest.approx(pl / bl)


def test_csr_take_with_offsets() -> None:
    indptr = np.array([0, 2, 2, 5])
    values = np.array([10, 11, 20, 21, 22])
    ip, v = csr_take(indptr, values, np.array([2, 0, 1]), offsets=np.array([20, 10, 0]))
    assert ip.tolist() == [0, 3, 5, 5]
    assert v.tolist() == [0, 1, 2, 0, 1]


# -- position buckets ----------------------------------------------------------------------------------------


def test_position_buckets() -> None:
    p = np.array([0, 1, 7, 8, 11, 12, 15, 16, 23, 24, 31, 32, 1023, 1024, 1535, 1536, 1999])
    assert position_buckets(p, 8).tolist() == [0, 1, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 21, 22, 22, 23, 23]
    assert position_buckets(np.arange(9), 2).tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 6]
    for b in range(24):
        lo, hi = bucket_bounds(b, 8)
        assert (position_buckets(np.arange(lo, hi), 8) == b).all()
        assert position_buckets(np.array([hi]), 8)[0] == b + 1
    for bad in (1, 6):
        with pytest.raises(ValueError, match="power of two"):
            position_buckets(np.array([1]), bad)


# -- the MI table --------------------------------------------------------------------------------------------


def _ragged(histories: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(h) for h in histories])
    indptr = np.r_[0, np.cumsum(lengths)]
    flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if histories else np.zeros(0)
    return flat.astype(np.int64), indptr[:-1], indptr[1:]


def _mi_entropy(a: float, b: float, c: float, d: float) -> float:
    """MI = H(Y) - H(Y | X) of a 2x2 table a (x1 y1), b (x1 y0), c (x0 y1), d (x0 y0), in bits."""

    def h(*ps: float) -> float:
        return -sum(p * math.log2(p) for p in ps if p > 0)

    s = a + b + c + d
    return (
        h((a + c) / s, (b + d) / s)
        - ((a + b) / s) * h(a / (a + b), b / (a + b))
        - ((c + d) / s) * h(c / (c + d), d / (c + d))
    )


def test_mi_of_a_deterministic_cell_is_one_bit() -> None:
    # target category 1; one behavior each; category 2 -> always clicked, category 3 -> never
    hist = [[2]] * 200 + [[3]] * 200
    label = np.r_[np.ones(200), np.zeros(200)]
    ec, start, end = _ragged(hist)
    table = MiTable.fit(np.ones(400, np.int64), label, ec, start, end)
    assert table.relevance(1, 2, 0) == pytest.approx(1.0)
    assert table.relevance(1, 3, 0) == pytest.approx(1.0)
    assert table.relevance(1, 4, 0) == 0.0  # never seen
    assert table.relevance(2, 2, 0) == 0.0  # no impression of target category 2
    assert table.relevance(99, 2, 0) == 0.0 and table.relevance(1, -1, 0) == 0.0  # unknown ids
    assert table.n_impressions == 400 and table.n_behaviors == 400 and table.n_buckets == 1


def test_mi_matches_the_entropy_formula_and_positions_are_kept_apart() -> None:
    # 400 impressions of target category 5, histories [older, newest].
    # newest (p = 0): category 7 in 40 clicked + 10 unclicked, category 8 in the other 110 + 240.
    # older (p = 1): category 7 / 8 independent of the label (half and half in both classes).
    rng = np.random.default_rng(0)
    label = np.r_[np.ones(150), np.zeros(250)]
    newest = np.r_[np.full(40, 7), np.full(110, 8), np.full(10, 7), np.full(240, 8)]
    older = np.r_[np.tile([7, 8], 75), np.tile([7, 8], 125)]
    perm = rng.permutation(400)
    hist = [[int(older[i]), int(newest[i])] for i in perm]
    ec, start, end = _ragged(hist)
    table = MiTable.fit(np.full(400, 5), label[perm], ec, start, end, min_g=0.0)
    expected = _mi_entropy(40, 10, 110, 240)
    assert table.relevance(5, 7, 0) == pytest.approx(expected, rel=1e-9)
    assert table.relevance(5, 8, 0) == pytest.approx(expected, rel=1e-9)  # the complement carries the same
    assert table.relevance(5, 7, 1) == pytest.approx(0.0, abs=1e-12)
    # the significance threshold drops the older, uninformative cells but keeps the strong ones
    strict = MiTable.fit(np.full(400, 5), label[perm], ec, start, end)
    assert strict.relevance(5, 7, 0) == pytest.approx(expected) and len(strict.keys) == 2


def test_sparse_target_categories_are_not_trusted() -> None:
    # the same perfect association, once with 200 impressions and once with 20 (below min_count = 100)
    hist = [[2]] * 100 + [[3]] * 100 + [[2]] * 10 + [[3]] * 10
    target = np.r_[np.full(200, 1), np.full(20, 9)]
    label = np.r_[np.ones(100), np.zeros(100), np.ones(10), np.zeros(10)]
    ec, start, end = _ragged(hist)
    table = MiTable.fit(target, label, ec, start, end)
    assert table.relevance(1, 2, 0) == pytest.approx(1.0)
    assert table.relevance(9, 2, 0) == 0.0
    loose = MiTable.fit(target, label, ec, start, end, min_count=10)
    assert loose.relevance(9, 2, 0) == pytest.approx(1.0)


def test_bucketed_positions_pool_their_observations() -> None:
    # histories of 12 behaviors, exact = 4: relative positions 8..11 form one bucket ([8, 12)).
    # clicked impressions carry category 2 at relative position 9, unclicked ones at position 10;
    # everything else is category 1. Pooled over the 4 positions of the bucket (400 observations each
    # class): category 2 is 100 of 400 clicked and 100 of 400 unclicked pairs -> independent, MI 0.
    # At the exact positions 0..3, always category 1 -> MI 0 (never both values of x).
    n_imp, length = 100, 12
    hist = []
    for i in range(2 * n_imp):
        h = [1] * length
        h[length - 1 - (9 if i < n_imp else 10)] = 2
        hist.append(h)
    label = np.r_[np.ones(n_imp), np.zeros(n_imp)]
    ec, start, end = _ragged(hist)
    table = MiTable.fit(np.zeros(2 * n_imp, np.int64), label, ec, start, end, exact=4, min_g=0.0)
    assert position_buckets(np.array([9, 10]), 4).tolist() == [6, 6]
    assert table.relevance(0, 2, 9) == pytest.approx(0.0, abs=1e-12)
    assert len(table.keys) == 0
    # with exact = 16 positions 9 and 10 are separate, and each predicts the label perfectly
    exact = MiTable.fit(np.zeros(2 * n_imp, np.int64), label, ec, start, end, exact=16)
    assert exact.relevance(0, 2, 9) == pytest.approx(_mi_entropy(100, 0, 0, 100))
    assert exact.relevance(0, 2, 10) == pytest.approx(1.0)


def test_fit_samples_to_the_behavior_budget() -> None:
    rng = np.random.default_rng(1)
    n_imp = 500
    lengths = rng.integers(1, 30, n_imp)
    ec = rng.integers(0, 5, int(lengths.sum()))
    end = np.cumsum(lengths)
    start = end - lengths
    target = rng.integers(0, 5, n_imp)
    label = rng.integers(0, 2, n_imp)
    full = MiTable.fit(target, label, ec, start, end)
    assert full.n_impressions == n_imp and full.n_behaviors == lengths.sum()
    part = MiTable.fit(target, label, ec, start, end, max_behaviors=2000, seed=3)
    assert part.n_impressions < n_imp and part.n_behaviors <= 2000
    assert part.n_impressions_available == n_imp
    again = MiTable.fit(target, label, ec, start, end, max_behaviors=2000, seed=3)
    assert np.array_equal(part.keys, again.keys) and np.array_equal(part.mi, again.mi)


def test_sparse_lookup_equals_dense_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    n_imp = 3000
    lengths = rng.integers(1, 50, n_imp)
    end = np.cumsum(lengths)
    start = end - lengths
    target = rng.integers(0, 4, n_imp)
    ec = rng.integers(0, 4, int(lengths.sum()))
    # clicks follow category 1 at the newest position, so some cells are kept
    newest = ec[end - 1]
    label = (rng.random(n_imp) < np.where(newest == 1, 0.8, 0.2)).astype(int)
    table = MiTable.fit(target, label, ec, start, end)
    assert len(table.keys) > 0
    t, c, p = np.meshgrid(np.arange(-1, 6), np.arange(-1, 6), np.arange(0, 80), indexing="ij")
    dense = table.relevance(t, c, p)
    monkeypatch.setattr("exporters.retrieval._DENSE_CELLS", 0)
    sparse_table = MiTable.fit(target, label, ec, start, end)
    assert np.array_equal(sparse_table.relevance(t, c, p), dense)


# -- NDCG ----------------------------------------------------------------------------------------------------


def _table(
    cells: dict[tuple[int, int, int], float], n_categories: int, n_buckets: int, exact: int
) -> MiTable:
    keys = np.array([(t * n_categories + c) * n_buckets + b for (t, c, b) in cells], dtype=np.int64)
    order = np.argsort(keys)
    return MiTable(
        n_categories=n_categories,
        n_buckets=n_buckets,
        exact=exact,
        keys=keys[order],
        mi=np.array(list(cells.values()))[order],
        n_impressions=0,
        n_impressions_available=0,
        n_behaviors=0,
        n_cells_counted=len(cells),
        min_count=0,
        min_g=0.0,
    )


def _dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_mi_ndcg_hand_case() -> None:
    # target category 1; behavior category 2 has relevance 0.5 at relative positions 0..3 (exact = 4) and
    # 0.25 beyond; category 3 has relevance 0.1 at relative position 1; everything else 0.
    cells = {(1, 2, b): 0.5 for b in range(4)} | {(1, 2, b): 0.25 for b in range(4, 10)} | {(1, 3, 1): 0.1}
    table = _table(cells, 4, 10, 4)
    # impression 0, history oldest first: [2, 0, 0, 0, 3, 2]; relative positions 5, 4, 3, 2, 1, 0
    # relevances by history index: [0.25, 0, 0, 0, 0.1, 0.5]
    # impression 1, history [0, 3]: category 3 sits at relative position 0, not 1 -> nothing relevant, not
    # scored. Impression 2: empty history.
    ec, start, end = _ragged([[2, 0, 0, 0, 3, 2], [0, 3], []])
    target = np.array([1, 1, 1])
    k = 2
    topk = np.array([[0, 4], [1, 0], [-1, -1]])
    m = mi_ndcg(table, target, ec, start, end, topk, k)
    ideal = _dcg([0.5, 0.25])
    assert m["n_impressions"] == 2 and m["n_scored"] == 1 and m["n_scored_long"] == 1
    assert m["ndcg"] == pytest.approx(_dcg([0.25, 0.1]) / ideal)
    assert m["ndcg_recency"] == pytest.approx(_dcg([0.5, 0.1]) / ideal)
    mean_rel = (0.25 + 0.1 + 0.5) / 6
    assert m["ndcg_random"] == pytest.approx(mean_rel * _dcg([1, 1]) / ideal)
    assert m["ndcg_long"] == m["ndcg"]
    # the ideal ranking scores 1; a ranking with a padded rank and an out-of-history index loses those ranks
    best = mi_ndcg(table, target, ec, start, end, np.array([[5, 0], [0, 1], [-1, -1]]), k)
    assert best["ndcg"] == pytest.approx(1.0)
    partial = mi_ndcg(table, target, ec, start, end, np.array([[9, 5], [0, 1], [-1, -1]]), k)
    assert partial["ndcg"] == pytest.approx(0.5 / math.log2(3) / ideal)


def test_mi_ndcg_short_history_measures_order() -> None:
    # a history shorter than k: every ranking retrieves everything, only the order differs
    table = _table({(0, 1, 0): 1.0, (0, 2, 1): 0.5}, 3, 2, 2)
    ec, start, end = _ragged([[2, 1]])  # index 0 is relative position 1 (cat 2 -> 0.5), index 1 is p 0 (1.0)
    m = mi_ndcg(table, np.array([0]), ec, start, end, np.array([[0, 1, -1, -1]]), k=4)
    ideal = _dcg([1.0, 0.5])
    assert m["ndcg"] == pytest.approx(_dcg([0.5, 1.0]) / ideal)
    assert m["ndcg_recency"] == pytest.approx(1.0)
    assert m["ndcg_random"] == pytest.approx(0.75 * _dcg([1, 1]) / ideal)
    assert m["n_scored_long"] == 0 and math.isnan(m["ndcg_long"])


def _ndcg_loop(table, target, ec, start, end, topk, k):  # type: ignore[no-untyped-def]
    """Per-impression NDCG written the plain way, as an oracle."""
    model, recent, rand = [], [], []
    for i in range(len(target)):
        n = end[i] - start[i]
        if n == 0:
            continue
        rel = np.array(
            [float(table.relevance(target[i], ec[start[i] + j], n - 1 - j)) for j in range(n)], dtype=float
        )
        d = 1 / np.log2(np.arange(min(k, n)) + 2)
        ideal = (np.sort(rel)[::-1][: min(k, n)] * d).sum()
        if ideal <= 0:
            continue
        model.append((rel[topk[i][: min(k, n)]] * d).sum() / ideal)
        recent.append((rel[::-1][: min(k, n)] * d).sum() / ideal)
        rand.append(rel.mean() * d.sum() / ideal)
    return np.mean(model), np.mean(recent), np.mean(rand)


def test_mi_ndcg_matches_the_loop_and_the_random_expectation() -> None:
    rng = np.random.default_rng(5)
    n_imp, k, n_cat = 400, 6, 5
    lengths = rng.integers(0, 40, n_imp)
    end = np.cumsum(lengths)
    start = end - lengths
    ec = rng.integers(0, n_cat, int(lengths.sum()))
    target = rng.integers(0, n_cat, n_imp)
    cells = {
        (int(t), int(c), int(b)): float(rng.random()) for t, c, b in rng.integers(0, [5, 5, 10], (60, 3))
    }
    table = _table(cells, n_cat, 10, 4)
    topk = np.full((n_imp, k), -1)
    for i, n in enumerate(lengths):
        topk[i, : min(k, n)] = rng.choice(n, min(k, n), replace=False) if n else []
    m = mi_ndcg(table, target, ec, start, end, topk, k)
    want_model, want_recent, want_rand = _ndcg_loop(table, target, ec, start, end, topk, k)
    assert m["ndcg"] == pytest.approx(want_model)
    assert m["ndcg_recency"] == pytest.approx(want_recent)
    assert m["ndcg_random"] == pytest.approx(want_rand)
    # the expectation equals the average over many random permutations of one history
    i = int(np.argmax(lengths))
    one = mi_ndcg(table, target[i : i + 1], ec, start[i : i + 1], end[i : i + 1], topk[i : i + 1], k)
    sampled = [
        mi_ndcg(table, target[i : i + 1], ec, start[i : i + 1], end[i : i + 1], p[None, :k], k)["ndcg"]
        for p in (rng.permutation(lengths[i]) for _ in range(400))
    ]
    assert one["ndcg_random"] == pytest.approx(np.mean(sampled), abs=0.03)


def test_mi_ndcg_sampling_reports_counts() -> None:
    table = _table({(0, 1, 0): 1.0}, 2, 1, 2)
    ec, start, end = _ragged([[1]] * 50 + [[]] * 5)
    topk = np.zeros((55, 1), np.int64)
    m = mi_ndcg(table, np.zeros(55, np.int64), ec, start, end, topk, 1, max_impressions=20, seed=1)
    assert m["n_impressions"] == 20 and m["n_impressions_available"] == 50 and m["ndcg"] == 1.0
    with pytest.raises(ValueError, match="topk must be"):
        mi_ndcg(table, np.zeros(55, np.int64), ec, start, end, topk[:3], 1)
