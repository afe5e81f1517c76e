"""Statistics of an A/B readout: pure numpy/scipy functions over per-user and per-impression arrays.

Users are the randomisation unit, so every interval resamples users (a user's impressions are
correlated). Per-user sums make most bootstrap replicates one matrix product; AUC needs the rows
and is computed for a block of replicates at a time from one sort.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Predicted probabilities are clipped here before logs: a served score is in (0, 1), but float32
# rounding can put it at 1.0.
_EPS = 1e-7
# Replicates per block of the AUC bootstrap: bounds its [block, rows] weight matrix.
_AUC_BLOCK = 32


def bootstrap_counts(n_units: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_units] multiplicities of a resample of `n_units` units with replacement."""
    if n_units < 1 or n_boot < 1:
        raise ValueError(f"need at least one unit and one replicate, got {n_units} and {n_boot}")
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(np.float64)


def percentile_interval(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    """The (alpha/2, 1 - alpha/2) percentile interval of bootstrap replicates (NaNs ignored)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def binary_entropy(p: np.ndarray | float) -> np.ndarray:
    """H(p) in nats; 0 at p in {0, 1}."""
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def logloss_terms(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row log loss of predicted probabilities against 0/1 labels."""
    p = np.clip(np.asarray(scores, np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, np.float64)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def normalized_entropy(logloss_sum: np.ndarray, rows: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """NE: mean log loss over the entropy of the base rate (1: no better than always predicting it)."""
    return ratio(ratio(logloss_sum, rows), binary_entropy(ratio(positives, rows)))


def _auc_sorted(labels: np.ndarray, groups: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC per row of `weights` [B, n] over items sorted by score, `groups` marking tie runs."""
    pos = weights * labels
    neg = weights - pos
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    gpos = np.add.reduceat(pos, starts, axis=1)
    gneg = np.add.reduceat(neg, starts, axis=1)
    below = np.cumsum(gneg, axis=1) - gneg  # negatives scored strictly lower than the group
    wins = (gpos * (below + 0.5 * gneg)).sum(axis=1)
    return ratio(wins, gpos.sum(axis=1) * gneg.sum(axis=1))


def auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count half), optionally with row weights; NaN with one class."""
    return float(auc_replicates(scores, labels, None if weights is None else np.asarray(weights)[None, :])[0])


def auc_replicates(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """AUC for each row of `weights` [B, n] (None: one unweighted AUC), from one sort of the scores."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.float64)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of equal length")
    if scores.size == 0:
        return np.full(1 if weights is None else len(weights), np.nan)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    groups = np.cumsum(np.r_[True, s[1:] != s[:-1]])
    if weights is None:
        return _auc_sorted(y, groups, np.ones((1, len(s))))
    w = np.asarray(weights, np.float64)[:, order]
    return np.concatenate(
        [_auc_sorted(y, groups, w[i : i + _AUC_BLOCK]) for i in range(0, len(w), _AUC_BLOCK)]
    )


def auc_bootstrap(
    scores: np.ndarray, labels: np.ndarray, row_unit: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """AUC of each bootstrap replicate: row weights are their unit's multiplicity in `counts` [B, U]."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="stable")
    s, y, unit = scores[order], np.asarray(labels, np.float64)[order], np.asarray(row_unit)[order]
    groups = np.cumsum(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.empty(0, np.int64)
    if len(s) == 0:
        return np.full(len(counts), np.nan)
    blocks = (
        _auc_sorted(y, groups, counts[i : i + _AUC_BLOCK][:, unit]) for i in range(0, len(counts), _AUC_BLOCK)
    )
    return np.concatenate(list(blocks))


@dataclass(frozen=True, slots=True)
class MeanTest:
    """Difference of two means (b - a) with Welch's standard error and two-sided test."""

    diff: float
    se: float
    low: float
    high: float
    p_value: float
    df: float


def welch(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> MeanTest:
    """Welch's unequal-variance t test of mean(b) - mean(a), with its (1 - alpha) interval."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return MeanTest(float(b.mean() - a.mean()) if len(a) and len(b) else math.nan, *([math.nan] * 5))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(b.mean() - a.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return MeanTest(diff, 0.0, diff, diff, 1.0 if diff == 0 else 0.0, math.inf)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    q = float(stats.t.ppf(1 - alpha / 2, df))
    return MeanTest(diff, se, diff - q * se, diff + q * se, float(2 * stats.t.sf(abs(t), df)), float(df))


@dataclass(frozen=True, slots=True)
class Cuped:
    """CUPED: outcomes adjusted by a pre-period covariate, `y - theta * (x - mean(x))`."""

    adjusted: np.ndarray
    theta: float
    covered: float  # share of units with a pre-period value (the rest keep their outcome as is)


def cuped(y: np.ndarray, x: np.ndarray, has_x: np.ndarray) -> Cuped:
    """Adjust `y` by covariate `x` (pooled over arms; units without one get the mean, so no change)."""
    y, x, has_x = np.asarray(y, np.float64), np.asarray(x, np.float64), np.asarray(has_x, bool)
    if y.shape != x.shape or y.shape != has_x.shape:
        raise ValueError("y, x and has_x must have equal shapes")
    if has_x.sum() < 2:
        return Cuped(y.copy(), 0.0, float(has_x.mean()) if len(has_x) else 0.0)
    filled = np.where(has_x, x, x[has_x].mean())
    var = filled.var(ddof=1)
    theta = 0.0 if var == 0 else float(np.cov(y, filled, ddof=1)[0, 1] / var)
    return Cuped(y - theta * (filled - filled.mean()), theta, float(has_x.mean()))


def mixture_halfwidth(variance: float, alpha: float, tau: float) -> float:
    """Half-width of the always-valid (1 - alpha) interval of an estimate with this variance.

    The normal-mixture sequential probability ratio test (mSPRT; Johari et al. 2017, Howard et al.
    2021's normal mixture) with mixing N(0, tau^2): the set of effects it has not rejected. It holds
    at every look at once, so a test may be read daily and stopped any time without inflating
    errors; the price is a wider interval than the fixed-sample one.
    """
    if variance == 0:
        return 0.0
    if not variance > 0:  # NaN: too few units to know
        return math.nan
    if not (0 < alpha < 1 and tau > 0):
        raise ValueError(f"need 0 < alpha < 1 and tau > 0, got {alpha} and {tau}")
    t2 = tau * tau
    return math.sqrt(
        variance * (variance + t2) / t2 * (2 * math.log(1 / alpha) + math.log((variance + t2) / variance))
    )


@dataclass(frozen=True, slots=True)
class Srm:
    """Sample-ratio-mismatch check: units per arm against the configured split."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    passed: bool


def srm_check(observed: Mapping[str, int], weights: Mapping[str, float], alpha: float = 0.001) -> Srm:
    """Pearson chi-square of units per arm against `weights`, over the arms observed or weighted."""
    arms = sorted(set(observed) | {a for a, w in weights.items() if w > 0})
    observed = {a: int(observed.get(a, 0)) for a in arms}
    if any(weights.get(a, 0) <= 0 and observed[a] > 0 for a in arms):
        # Hash-assigned units in an arm the split never sends anyone to: no ratio explains that.
        expected = {a: 0.0 for a in arms}
        return Srm(observed, expected, math.inf, 0.0, False)
    counts = np.array([observed[a] for a in arms], np.float64)
    share = np.array([weights[a] for a in arms], np.float64)
    expected = counts.sum() * share / share.sum()
    if len(arms) < 2 or counts.sum() == 0:
        return Srm(observed, dict(zip(arms, expected.tolist(), strict=True)), 0.0, 1.0, True)
    chi2, p = stats.chisquare(counts, expected)
    return Srm(
        observed,
        dict(zip(arms, expected.tolist(), strict=True)),
        float(chi2),
        float(p),
        bool(p >= alpha),
    )


def checkpoints(times: np.ndarray, n: int) -> Iterator[int]:
    """Up to `n` evenly spaced times from the first to the last of `times` (the last always included)."""
    if len(times) == 0:
        return iter(())
    lo, hi = int(np.min(times)), int(np.max(times))
    points = np.unique(np.linspace(lo, hi, max(1, n) + 1)[1:].round().astype(np.int64))
    return iter(int(t) for t in points)
