"""The readout statistics against hand computations and scipy, and the readout on simulated tests:
A/A covers zero, a real effect is found, a skewed split fails SRM, CUPED narrows the interval, and
the always-valid interval keeps its error rate under repeated looks where the fixed one does not."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from service.core import readout as rd
from service.core.experiment import ReadoutConfig, analyse, eligible, user_rates


def test_welch_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 0.1, 300), rng.normal(0.23, 0.2, 500)
    got = rd.welch(a, b, alpha=0.05)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert got.diff == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert got.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (got.low, got.high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert got.df == pytest.approx(ref.df, rel=1e-9)


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_auc_with_ties_and_weights_matches_the_pairwise_count() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 12, 300) / 12.0  # many ties
    labels = (rng.random(300) < 0.3 + 0.4 * scores).astype(np.int64)
    assert rd.auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
    # integer weights are the same as repeated rows
    w = rng.integers(0, 4, 300)
    repeated = np.repeat(np.arange(300), w)
    assert rd.auc(scores, labels, w) == pytest.approx(
        _pairwise_auc(scores[repeated], labels[repeated]), abs=1e-12
    )
    assert math.isnan(rd.auc(scores, np.zeros(300)))  # one class: undefined


def test_auc_bootstrap_is_the_weighted_auc_of_each_resample() -> None:
    rng = np.random.default_rng(2)
    n_users, rows = 40, 400
    unit = rng.integers(0, n_users, rows)
    scores, labels = rng.random(rows), (rng.random(rows) < 0.4).astype(np.int64)
    counts = rd.bootstrap_counts(n_users, 70, rng)
    assert counts.sum(axis=1).tolist() == [n_users] * 70
    got = rd.auc_bootstrap(scores, labels, unit, counts)
    expected = [rd.auc(scores, labels, counts[b, unit]) for b in range(70)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_normalized_entropy_and_calibration_by_hand() -> None:
    p = np.array([0.1, 0.4, 0.8, 0.3])
    y = np.array([0, 1, 1, 0])
    logloss = -(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(0.7)) / 4
    base = 0.5
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    got = rd.normalized_entropy(rd.logloss_terms(p, y).sum(), np.float64(4), np.float64(2))
    assert float(got) == pytest.approx(logloss / entropy, rel=1e-12)


def test_mixture_halfwidth_is_where_the_mixture_likelihood_ratio_reaches_one_over_alpha() -> None:
    variance, alpha, tau = 0.0004, 0.05, 0.02
    half = rd.mixture_halfwidth(variance, alpha, tau)
    # The normal-mixture likelihood ratio of the estimate at distance `half` from the effect
    lr = math.sqrt(variance / (variance + tau**2)) * math.exp(
        tau**2 * half**2 / (2 * variance * (variance + tau**2))
    )
    assert lr == pytest.approx(1 / alpha, rel=1e-9)
    assert half > stats.norm.ppf(1 - alpha / 2) * math.sqrt(variance), "wider than the one-look interval"
    assert rd.mixture_halfwidth(0.0, alpha, tau) == 0.0 and math.isnan(
        rd.mixture_halfwidth(math.nan, alpha, tau)
    )


def test_always_valid_interval_keeps_its_error_rate_under_daily_looks() -> None:
    # 2,000 A/A tests, each looked at 20 times as users accumulate: a fixed-sample interval that is
    # read at every look excludes zero at some look far more often than alpha; the always-valid
    # one does not.
    rng = np.random.default_rng(4)
    runs, looks, per_look, alpha = 2000, 20, 50, 0.05
    a = rng.normal(0.0, 1.0, (runs, looks * per_look))
    b = rng.normal(0.0, 1.0, (runs, looks * per_look))
    n = per_look * np.arange(1, looks + 1)
    ca, cb = np.cumsum(a, axis=1)[:, n - 1], np.cumsum(b, axis=1)[:, n - 1]
    diff = cb / n - ca / n
    var = 2.0 / n  # known unit variances
    fixed = np.abs(diff) > stats.norm.ppf(1 - alpha / 2) * np.sqrt(var)
    half = np.array([rd.mixture_halfwidth(v, alpha, 0.2) for v in var])
    seq = np.abs(diff) > half
    assert fixed.any(axis=1).mean() > 2 * alpha
    assert seq.any(axis=1).mean() <= alpha


def test_srm_check() -> None:
    ok = rd.srm_check({"dare": 5020, "coupled": 4980}, {"dare": 0.5, "coupled": 0.5})
    assert ok.passed and ok.chi2 == pytest.approx((20**2 + 20**2) / 5000)
    skewed = rd.srm_check({"dare": 5300, "coupled": 4700}, {"dare": 0.5, "coupled": 0.5})
    ref = stats.chisquare([4700, 5300], [5000, 5000])
    assert not skewed.passed and skewed.p_value == pytest.approx(ref.pvalue)
    # 70/30 configured and observed: passes; an arm the split never sends anyone to: fails
    assert rd.srm_check({"dare": 7010, "coupled": 2990}, {"dare": 0.7, "coupled": 0.3}).passed
    assert not rd.srm_check({"dare": 10, "fm": 3}, {"dare": 1.0}).passed
    # a weighted arm with no users at all is a mismatch, not a missing row
    assert not rd.srm_check({"dare": 1000}, {"dare": 0.5, "coupled": 0.5}).passed


def test_cuped_removes_covariate_variance() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, 4000)
    y = 2.0 * x + rng.normal(0, 0.5, 4000)
    has = rng.random(4000) < 0.9
    got = rd.cuped(y, x, has)
    filled = np.where(has, x, x[has].mean())  # users without a pre-period get the mean: no change
    assert got.theta == pytest.approx(np.cov(y, filled)[0, 1] / filled.var(ddof=1))
    assert got.theta == pytest.approx(2.0, abs=0.1)
    assert got.covered == pytest.approx(has.mean())
    assert got.adjusted.mean() == pytest.approx(y.mean())
    assert got.adjusted.var() < 0.25 * y.var()
    np.testing.assert_allclose(got.adjusted[~has], y[~has], rtol=0, atol=1e-12)


# -- the readout on simulated tests -------------------------------------------------------------------


def simulate(
    n_users: int = 3000,
    effect: float = 0.0,
    split: float = 0.5,
    seed: int = 0,
    requests: int = 4,
    k: int = 5,
) -> tuple[pd.DataFrame, pd.Series]:
    """Impression rows of a test: each user has a propensity (their pre-period rate is a noisy read of
    it), `treatment` adds `effect` to it; items are shown k per request with scores near it."""
    rng = np.random.default_rng(seed)
    propensity = rng.beta(2, 8, n_users)
    arm = np.where(rng.random(n_users) < split, "coupled", "dare")
    user = np.repeat(np.arange(n_users), requests * k)
    request = np.repeat(np.arange(n_users * requests), k)
    p = np.clip(propensity[user] + np.where(arm[user] == "dare", effect, 0.0), 0.001, 0.999)
    outcome = (rng.random(len(user)) < p).astype(np.int8)
    score = np.clip(p + rng.normal(0, 0.05, len(user)), 0.001, 0.999)
    ts = 1_700_000_000 + request % requests * 3600 + rng.integers(0, 3600, len(user))
    rank = np.tile(np.arange(1, k + 1), n_users * requests)
    rows = pd.DataFrame(
        {
            "log_id": request.astype(str),
            "user_id": np.char.add("u", user.astype(str)),
            "variant": arm[user],
            "assigned_by": "hash",
            "item_id": rng.integers(0, 1000, len(user)),
            "ts": ts,
            "score": score,
            "rank": rank,
            "outcome": outcome,
            "outcome_ts": np.where(outcome == 1, ts + 5, -1),
        }
    )
    pre = pd.Series(rng.binomial(20, propensity) / 20, index=[f"u{i}" for i in range(n_users)])
    return rows, pre


CFG = ReadoutConfig(k=5, n_boot=300, seed=1)


def test_aa_interval_covers_zero_and_srm_passes() -> None:
    rows, pre = simulate(effect=0.0, seed=11)
    r = analyse(rows, weights={"dare": 0.5, "coupled": 0.5}, covariate=pre, config=CFG)
    (c,) = r.comparisons
    assert r.srm.passed
    assert c.control == "coupled" and c.treatment == "dare"
    for interval in (c.bootstrap, c.welch, c.cuped, c.sequential):
        assert interval is not None and interval.low < 0 < interval.high
    assert c.p_value > 0.05


def test_a_real_effect_is_found_and_cuped_narrows_the_interval() -> None:
    rows, pre = simulate(effect=0.03, seed=22)
    r = analyse(rows, covariate=pre, config=CFG)
    (c,) = r.comparisons
    assert c.bootstrap.low > 0 and c.welch.low > 0 and c.p_value < 0.001
    assert c.cuped is not None and c.variance_reduction is not None
    assert c.welch.low < 0.03 < c.welch.high and c.cuped.low < 0.03 < c.cuped.high
    assert c.cuped.high - c.cuped.low < c.welch.high - c.welch.low
    assert c.variance_reduction > 0.2 and c.cuped.low > 0
    # the always-valid interval is wider than the one-look one, and still excludes zero here
    assert c.sequential.high - c.sequential.low > c.welch.high - c.welch.low and c.sequential.low > 0
    # per-arm metrics: the user rate is the mean of each user's rate at k, equal to the pooled rate
    # here (every user has the same number of shown items)
    for arm in r.arms:
        part = rows[rows["variant"] == arm.variant]
        assert arm.user_rate.value == pytest.approx(part.groupby("user_id")["outcome"].mean().mean())
        assert arm.rate.value == pytest.approx(part["outcome"].mean())
        assert arm.calibration.value == pytest.approx(part["score"].sum() / part["outcome"].sum())
        assert arm.auc.low < arm.auc.value < arm.auc.high
    # the series ends where the readout does: every impression and outcome known
    last = c.series[-1]
    assert last.users == sum(a.users for a in r.arms)
    assert last.diff == pytest.approx(c.diff) and (last.low, last.high) == pytest.approx(
        (c.welch.low, c.welch.high)
    )
    assert (last.seq_low, last.seq_high) == pytest.approx((c.sequential.low, c.sequential.high))
    assert [p.users for p in c.series] == sorted(p.users for p in c.series)


def test_a_skewed_split_fails_srm() -> None:
    rows, _ = simulate(n_users=4000, split=0.46, seed=13)
    r = analyse(rows, weights={"dare": 0.5, "coupled": 0.5}, config=CFG)
    assert not r.srm.passed and r.srm.p_value < 0.001
    assert any("SRM failed" in note for note in r.notes)


def test_header_overrides_and_users_in_both_arms_are_left_out() -> None:
    rows, _ = simulate(n_users=200, seed=14)
    rows.loc[rows["log_id"] == "0", "assigned_by"] = "header"  # one forced request of user u0
    u1 = rows["user_id"] == "u1"
    first_request = rows.loc[u1, "log_id"].iloc[0]
    flip = {"dare": "coupled", "coupled": "dare"}
    rows.loc[rows["log_id"] == first_request, "variant"] = rows.loc[
        rows["log_id"] == first_request, "variant"
    ].map(flip)
    kept, ex = eligible(rows)
    assert ex.header_requests == 1 and ex.header_users == 1
    assert ex.mixed_users == 1 and ex.mixed_requests == 4
    assert "u1" not in set(kept["user_id"]) and "0" not in set(kept["log_id"])
    assert "u0" in set(kept["user_id"])  # u0's hash-assigned requests still count


def test_user_rates_counts_the_top_k_only() -> None:
    rows = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "rank": [1, 2, 3, 1], "outcome": [1, 0, 1, 0]})
    assert user_rates(rows, 2).to_dict() == {"a": 0.5, "b": 0.0}


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="k"):
        ReadoutConfig(k=0)
    with pytest.raises(ValueError, match="alpha"):
        ReadoutConfig(alpha=1.5)
    rows, _ = simulate(n_users=50, seed=15)
    with pytest.raises(ValueError, match="control arm"):
        analyse(rows, config=ReadoutConfig(k=5, n_boot=20, control="nope"))
