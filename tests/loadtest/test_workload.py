"""The traffic model and the content checks, without locust or a server."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.workload import (
    SYNTHETIC_USERS,
    TrafficConfig,
    WorkloadError,
    check_events,
    check_score,
    load_workload,
    zipf_cdf,
)

VARIANTS = ("coupled", "dare")
MODELS = {"variants": [{"variant": "coupled", "n_items": 700}, {"variant": "dare", "n_items": 801}]}


def good(n: int = 3, variant: str = "dare") -> tuple[dict[str, str], dict[str, Any]]:
    """Headers (lower-case) and body of a right answer to n candidates."""
    headers = {"x-model-variant": variant, "x-model-version": "1", "x-request-id": "r1"}
    body = {
        "request_id": "r1",
        "variant": variant,
        "model_version": "1",
        "scores": [0.25] * n,
        "user": {"sequence_length": 12, "fm_embedding": "hit", "cold_start": False},
        "unknown_items": 0,
        "explain": None,
    }
    return headers, body


def test_right_answer_passes() -> None:
    headers, body = good()
    check = check_score(200, headers, json.dumps(body).encode(), 3, "dare", VARIANTS, "r1")
    assert check.reason is None and check.variant == "dare" and check.body["scores"] == [0.25] * 3
    assert check_score(200, headers, json.dumps(body).encode(), 3, None, VARIANTS).reason is None


def _drop(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "status,headers,body,asked,reason",
    [
        (200, {}, {"scores": [0.2, 0.3]}, None, "scores count differs"),
        (200, {}, {"scores": [0.2, 0.3, 1.0]}, None, "outside (0, 1)"),
        (200, {}, {"scores": [0.2, 0.3, 0.0]}, None, "outside (0, 1)"),
        (200, {}, {"scores": [0.2, 0.3, float("nan")]}, None, "outside (0, 1)"),
        (200, {}, {"scores": [0.2, 0.3, True]}, None, "not a number"),
        (200, {}, {"scores": [0.2, 0.3, "0.5"]}, None, "not a number"),
        (200, {}, {"scores": None}, None, "no scores list"),
        (200, {"x-model-variant": None}, {}, None, "no X-Model-Variant"),
        (200, {}, {}, "coupled", "differs from X-Experiment"),
        (200, {"x-model-variant": "fm"}, {"variant": "fm"}, None, "no loaded variant"),
        (200, {"x-model-version": None}, {}, None, "no X-Model-Version"),
        (200, {"x-request-id": "other"}, {}, None, "X-Request-ID not echoed"),
        (200, {}, {"variant": "coupled"}, None, "body variant differs"),
        (200, {}, {"user": None}, None, "lacks user"),
        (200, {}, {"user": {"sequence_length": 3, "fm_embedding": "maybe"}}, None, "lacks user"),
        (503, {}, {"type": "urn:dare-serve:problem:feature-store-unavailable"}, None, "status 503 urn:"),
    ],
)
def test_wrong_answers_fail_with_a_reason(
    status: int, headers: dict[str, Any], body: dict[str, Any], asked: str | None, reason: str
) -> None:
    h, b = good()
    h = {k: v for k, v in (h | headers).items() if v is not None}
    check = check_score(status, h, json.dumps(b | body).encode(), 3, asked, VARIANTS, "r1")
    assert check.reason is not None and reason in check.reason, check.reason


def test_body_that_is_not_json_fails() -> None:
    h, _ = good()
    assert check_score(200, h, b"<html>oops</html>", 3, None, VARIANTS).reason == "body is not JSON"
    assert check_score(200, h, b"[0.5]", 3, None, VARIANTS).reason == "body is not a JSON object"


def test_events_check() -> None:
    ok = json.dumps({"user_id": "u1", "appended": 2, "sequence_length": 40}).encode()
    assert check_events(200, ok, "u1", 2) is None
    assert check_events(200, ok, "u2", 2) == "events answer does not match the request"
    assert check_events(200, ok, "u1", 3) == "events answer does not match the request"
    assert check_events(401, b'{"type": "urn:dare-serve:problem:unauthorized"}', "u1", 2) == (
        "status 401 urn:dare-serve:problem:unauthorized"
    )


def test_config_from_env_round_trips_and_names_bad_values(tmp_path: Path) -> None:
    (tmp_path / "events.parquet").write_bytes(b"")
    cfg = TrafficConfig(data=tmp_path, candidates=7, experiment_share=0.5, events_share=0.0, seed=3)
    assert TrafficConfig.from_env(cfg.to_env()) == cfg
    assert TrafficConfig.from_env({}) == TrafficConfig()
    with pytest.raises(WorkloadError, match="DARE_LT_CANDIDATES"):
        TrafficConfig.from_env({"DARE_LT_CANDIDATES": "many"})
    with pytest.raises(WorkloadError, match="experiment-share"):
        TrafficConfig.from_env({"DARE_LT_EXPERIMENT_SHARE": "1.5"})
    with pytest.raises(WorkloadError, match="candidates"):
        TrafficConfig(candidates=0)
    with pytest.raises(WorkloadError, match="no events.parquet"):
        TrafficConfig(data=tmp_path / "nowhere")


def test_dataset_workload_draws_zipfian_users_and_catalog_items(tiny_data: Path) -> None:
    import pandas as pd

    events = pd.read_parquet(tiny_data / "events.parquet", columns=["user_id", "item_id"])
    w = load_workload(TrafficConfig(data=tiny_data, candidates=50), MODELS)
    assert w.source == "dataset" and w.variants == VARIANTS
    assert set(w.users) == set(events["user_id"]) and set(w.items) == set(events["item_id"])
    rng = np.random.default_rng(0)
    drawn = Counter(w.draw_user(rng) for _ in range(3000))
    # Hot users repeat: the hottest user alone gets far more than a uniform share (1/150).
    assert drawn[str(w.users[0])] / 3000 > 10 / len(w.users)
    assert drawn.most_common(1)[0][0] == str(w.users[0])
    cands = w.draw_candidates(rng)
    assert len(cands) == 50 == len(set(cands)) and set(cands) <= set(events["item_id"])
    new = w.draw_events(rng, 1_700_000_000)
    assert 1 <= len(new) <= 3 and all(e["timestamp"] == 1_700_000_000 for e in new)


def test_synthetic_workload_without_a_dataset() -> None:
    w = load_workload(TrafficConfig(candidates=900), MODELS)
    assert w.source == "synthetic" and len(w.users) == SYNTHETIC_USERS
    assert w.items[0] == 1 and w.items[-1] == 801  # the largest n_items of the variants
    cands = w.draw_candidates(np.random.default_rng(1))
    assert len(cands) == 900 and min(cands) >= 1 and max(cands) <= 801  # with repeats past 801
    with pytest.raises(WorkloadError, match="no variant"):
        load_workload(TrafficConfig(), {"variants": []})


def test_zipf_cdf() -> None:
    cdf = zipf_cdf(4, 1.0)
    assert cdf[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(cdf, prepend=0.0), np.array([12, 6, 4, 3]) / 25)
    np.testing.assert_allclose(zipf_cdf(4, 0.0), [0.25, 0.5, 0.75, 1.0])
