"""Evaluation metrics: AUC, GAUC (per-user AUC), logloss, normalized entropy and calibration; plain numpy."""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney); NaN when only one class is present."""
    y = np.asarray(labels) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC averaged over users with both labels, weighted by their impressions (as in DIN)."""
    users = np.asarray(users)
    order = np.argsort(users, kind="mergesort")
    u, y, s = users[order], np.asarray(labels)[order], np.asarray(scores)[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    total, weight = 0.0, 0
    for a, b in zip(starts, ends, strict=True):
        value = auc(y[a:b], s[a:b])
        if not np.isnan(value):
            total += value * (b - a)
            weight += b - a
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def entropy(labels: np.ndarray) -> float:
    """Binary entropy (nats) of the labels' base rate: the logloss of always predicting that rate."""
    rate = float(np.mean(np.asarray(labels, dtype=np.float64)))
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return float(-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Logloss over the entropy of the base rate (NE, as in He et al. 2014): below 1 means the
    scores carry information beyond the average click rate; NaN when only one class is present."""
    h = entropy(labels)
    return logloss(labels, probs) / h if h > 0 else float("nan")


def calibration_ratio(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted probability over the observed rate: 1 when the scores add up to the clicks."""
    observed = float(np.mean(np.asarray(labels, dtype=np.float64)))
    return float(np.mean(probs)) / observed if observed > 0 else float("nan")


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Reliability table: impressions split into `n_bins` equal-count bins by predicted probability
    (deciles by default), each with its mean prediction, observed rate and size."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    bins = []
    for part in np.array_split(order, n_bins):
        if len(part) == 0:
            continue
        bins.append({"predicted": float(p[part].mean()), "observed": float(y[part].mean()), "n": len(part)})
    return bins
