"""Probability quality: the metrics (NE, calibration ratio, reliability bins), the early-stopping rule,
and the validation-fitted Platt scaling folded into the ranker's head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exporters.bundle import load_bundle
from exporters.metrics import calibration_bins, calibration_ratio, entropy, logloss, normalized_entropy
from exporters.models import RankerConfig, TwoStageRanker
from exporters.train import EarlyStopping, _fit_logistic, fold_platt
from tests.conftest import TinyModels


def test_normalized_entropy_against_hand_values() -> None:
    y = np.array([1, 0, 0, 0])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(y) == pytest.approx(h)
    # Predicting the base rate everywhere is NE 1 exactly; a better scoring is below, a worse above.
    assert normalized_entropy(y, np.full(4, 0.25)) == pytest.approx(1.0)
    good = np.array([0.7, 0.1, 0.1, 0.1])
    assert normalized_entropy(y, good) == pytest.approx(logloss(y, good) / h)
    assert normalized_entropy(y, good) < 1.0
    assert normalized_entropy(y, np.array([0.1, 0.7, 0.1, 0.1])) > 1.0
    assert math.isnan(normalized_entropy(np.zeros(3), np.full(3, 0.1)))


def test_calibration_ratio_and_bins() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    assert calibration_ratio(y, p) == pytest.approx(p.mean() / 0.4)
    bins = calibration_bins(y, p, n_bins=5)
    assert [b["n"] for b in bins] == [2] * 5
    assert [b["predicted"] for b in bins] == pytest.approx([0.15, 0.35, 0.55, 0.75, 0.925])
    assert [b["observed"] for b in bins] == pytest.approx([0.0, 1.0, 0.5, 0.0, 0.5])
    # bins follow the predictions' order, not the input order
    shuffled = np.random.default_rng(0).permutation(10)
    assert calibration_bins(y[shuffled], p[shuffled], n_bins=5) == bins


def test_early_stopping_keeps_best_auc_and_stops_on_either_metric() -> None:
    # logloss turns first (overconfidence) while AUC still rises once
    watch = EarlyStopping(patience=2)
    kept = [watch.update(e, a, ll) for e, (a, ll) in enumerate([(0.70, 0.60), (0.72, 0.58), (0.73, 0.59)], 1)]
    assert kept == [True, True, True] and not watch.stop
    assert watch.update(4, 0.72, 0.61) is False
    assert watch.stop and watch.stopped_by == "valid_logloss"
    assert watch.best_epoch == 3 and watch.best_auc == 0.73 and watch.best_logloss == 0.58

    watch = EarlyStopping(patience=2)
    for e, (a, ll) in enumerate([(0.70, 0.60), (0.69, 0.59), (0.69, 0.58)], 1):
        watch.update(e, a, ll)
    assert watch.stopped_by == "valid_auc" and watch.best_epoch == 1

    watch = EarlyStopping(patience=2)
    for e in range(1, 6):
        watch.update(e, 0.6 + e / 100, 0.7 - e / 100)
    assert not watch.stop and watch.stopped_by == "epochs" and watch.best_epoch == 5


def test_platt_fit_recovers_a_known_scaling() -> None:
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 2, 200_000)
    # the truth is 0.5 * logit - 1: the raw scores are overconfident and too high
    y = (rng.random(logit.size) < 1 / (1 + np.exp(-(0.5 * logit - 1.0)))).astype(np.float64)
    c, a = _fit_logistic(logit, y)
    assert a == pytest.approx(0.5, abs=0.02) and c == pytest.approx(-1.0, abs=0.03)


def test_fold_platt_rescales_the_ranker_logit_exactly() -> None:
    torch.manual_seed(0)
    model = TwoStageRanker(
        RankerConfig("dare", 50, 5, attention_dim=4, representation_dim=8, top_k=4), np.arange(50) % 5
    )
    model.eval()
    n, length = 32, 10
    g = torch.Generator().manual_seed(1)
    args = (
        torch.randint(0, 50, (n,), generator=g),
        torch.randint(0, 50, (n, length), generator=g),
        torch.randint(0, 8, (n, length), generator=g),
        torch.rand(n, length, generator=g) > 0.2,
    )
    with torch.no_grad():
        before, _ = model(*args)
        fold_platt(model, 0.6, -0.3)
        after, _ = model(*args)
    torch.testing.assert_close(after, 0.6 * before - 0.3, rtol=1e-5, atol=1e-6)


def test_trained_rankers_report_calibrated_probabilities(tiny_models: TinyModels) -> None:
    for model in ("dare", "coupled"):
        r = tiny_models.results[model]
        m = r["metrics"]
        assert r["ne"] == m["ne"] and r["calibration"] == m["calibration"]
        assert r["stopped_by"] in {"epochs", "valid_auc", "valid_logloss"}
        training = (load_bundle(r["bundle"]).manifest.model_extra or {})["training"]
        assert training["calibration"]["fitted"] and training["calibration"]["slope"] > 0
        assert {"valid_auc", "valid_logloss", "valid_ne"} <= set(training["history"][0])
        # the scaling is monotone: the ranking metrics do not move, the probabilities do
        raw = m["uncalibrated"]
        assert m["auc"] == pytest.approx(raw["auc"], abs=1e-9)
        assert m["logloss"] != raw["logloss"]
        for part in (m, raw, m["popularity"]):
            assert part["ne"] == pytest.approx(part["logloss"] / entropy_of_test(part))
            assert len(part["calibration_deciles"]) == 10
            predicted = [b["predicted"] for b in part["calibration_deciles"]]
            assert predicted == sorted(predicted)


def entropy_of_test(part: dict) -> float:
    """The test split's base-rate entropy, from the reliability bins (equal-count, so their mean)."""
    bins = part["calibration_deciles"]
    n = sum(b["n"] for b in bins)
    rate = sum(b["observed"] * b["n"] for b in bins) / n
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
