"""POST /v1/score over HTTP against the offline PyTorch model, explain, cold start, headers."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from exporters.bundle import read_manifest
from exporters.offline import load_torch_model, score_offline
from feature_store.base import FmStatus
from service.app import create_app
from service.core.pipeline import ScoredJob
from service.routes.score import explain_of
from service.scoring import ScoreOutcome
from tests.conftest import ServedData, TinyModels
from tests.service.conftest import TestClient, score

# ONNX Runtime vs PyTorch float32 kernels: differences stay far below this (seen: ~1e-7).
PARITY_ATOL = 1e-5
UNKNOWN_ID = 10**15


@dataclass(frozen=True)
class Oracle:
    """The PyTorch model of a bundle and what score_offline needs with it."""

    model: Any
    item_ids: np.ndarray
    max_seq_len: int

    def scores(self, served: ServedData, user: str, cands: list[int], fm: np.ndarray | None) -> np.ndarray:
        items, ts = served.history(user)  # all of it: the service reads everything the store keeps
        return self.scores_over(items, ts, cands, served.now, fm, len(items))

    def scores_over(
        self, items: np.ndarray, ts: np.ndarray, cands: list[int], now: int, fm: np.ndarray | None, depth: int
    ) -> np.ndarray:
        """Scores over the newest `depth` behaviors, as the service reads them."""
        return score_offline(self.model, self.item_ids, items[-depth:], ts[-depth:], np.array(cands), now, fm)


@pytest.fixture(scope="module")
def oracles(tiny_models: TinyModels) -> dict[str, Oracle]:
    out = {}
    for variant in ("dare", "coupled"):
        path = tiny_models.root / variant / "1"
        out[variant] = Oracle(
            load_torch_model(path),
            np.load(path / "item_ids.npy", allow_pickle=False),
            read_manifest(path).max_seq_len,
        )
    return out


def _candidates(served: ServedData, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [*rng.choice(served.items, n, replace=False).tolist(), UNKNOWN_ID]


def _longest(users: list[str], served: ServedData) -> str:
    return max(users, key=lambda u: (len(served.history(u)[0]), u))


@pytest.mark.parametrize("variant", ["dare", "coupled"])
@pytest.mark.parametrize("with_fm", [True, False], ids=["fm-hit", "no-fm"])
def test_scores_match_the_offline_model(
    client: Any, served: ServedData, oracles: dict[str, Oracle], variant: str, with_fm: bool
) -> None:
    user = _longest(served.fm_users if with_fm else served.no_fm_users, served)
    cands = _candidates(served, 60, seed=len(user))
    r = score(client, user, cands, variant, timestamp=served.now)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["variant"] == variant and body["model_version"] == "1"
    assert body["user"]["fm_embedding"] == ("hit" if with_fm else "miss")
    assert body["user"]["sequence_length"] == len(served.history(user)[0]) > 16
    assert body["unknown_items"] == 1
    want = oracles[variant].scores(served, user, cands, served.fm_vectors.get(user))
    np.testing.assert_allclose(body["scores"], want, rtol=0, atol=PARITY_ATOL)
    assert np.ptp(body["scores"]) > 1e-4, "scores should differ across candidates"
    if with_fm:  # the embedding really reached the ranker: without it the scores differ
        missing = oracles[variant].scores(served, user, cands, None)
        assert np.abs(np.asarray(body["scores"]) - missing).max() > 1e-4


def test_a_history_longer_than_the_training_window_is_read_whole(
    client: Any, served: ServedData, oracles: dict[str, Oracle], make_settings: Any
) -> None:
    # 1,000 behaviors against a training window of 300: every one is read and searched by default
    rng = np.random.default_rng(11)
    user, n = f"lifelong-{uuid.uuid4().hex[:8]}", 1_000
    items = rng.choice(np.array(served.items), n)
    times = served.now - 3600 - 60 * np.arange(n, dtype=np.int64)[::-1]
    events = [{"item_id": int(i), "timestamp": int(t)} for i, t in zip(items, times, strict=True)]
    assert client.post("/v1/events", json={"user_id": user, "events": events}).status_code == 200
    cands = _candidates(served, 30, seed=4)
    for variant in ("dare", "coupled"):
        assert oracles[variant].max_seq_len < n
        r = score(client, user, cands, variant, timestamp=served.now)
        assert r.json()["user"]["sequence_length"] == n
        assert f'desc="{n} behaviors"' in r.headers["server-timing"]
        want = oracles[variant].scores_over(items, times, cands, served.now, None, n)
        np.testing.assert_allclose(r.json()["scores"], want, rtol=0, atol=PARITY_ATOL)
    # DARE_SEARCH_DEPTH and the per-variant override: only the newest that many are read
    with TestClient(create_app(make_settings(search_depth=700, variant_search_depth="dare=250"))) as c:
        depths = {m["variant"]: m["search_depth"] for m in c.get("/v1/models").json()["variants"]}
        assert depths == {"dare": 250, "coupled": 700}
        for variant, depth in depths.items():
            r = score(c, user, cands, variant, timestamp=served.now)
            assert r.json()["user"]["sequence_length"] == depth
            want = oracles[variant].scores_over(items, times, cands, served.now, None, depth)
            np.testing.assert_allclose(r.json()["scores"], want, rtol=0, atol=PARITY_ATOL)


def test_the_two_arms_are_different_models(client: Any, served: ServedData) -> None:
    user, cands = served.fm_users[0], _candidates(served, 20, seed=3)
    a = score(client, user, cands, "dare").json()["scores"]
    b = score(client, user, cands, "coupled").json()["scores"]
    assert a != b


def test_cold_start_user_is_scored(client: Any, served: ServedData, oracles: dict[str, Oracle]) -> None:
    cands = _candidates(served, 10, seed=5)
    r = score(client, "never-seen-user", cands, "dare", timestamp=served.now)
    assert r.status_code == 200
    body = r.json()
    assert body["user"] == {"sequence_length": 0, "fm_embedding": "miss", "cold_start": True}
    assert all(0.0 < s < 1.0 for s in body["scores"])
    want = score_offline(
        oracles["dare"].model, oracles["dare"].item_ids, np.zeros(0, np.int64), np.zeros(0, np.int64),
        np.array(cands), served.now, None,
    )  # fmt: skip
    np.testing.assert_allclose(body["scores"], want, rtol=0, atol=PARITY_ATOL)


def test_duplicates_and_unknown_items(client: Any, served: ServedData) -> None:
    a, b = served.items[3], served.items[40]
    r = score(client, served.fm_users[1], [a, b, a, UNKNOWN_ID, UNKNOWN_ID + 1, a], "dare")
    assert r.status_code == 200
    body = r.json()
    s = body["scores"]
    assert s[0] == s[2] == s[5] and s[3] == s[4] and len(s) == 6
    assert body["unknown_items"] == 2
    metrics = client.get("/metrics").text
    assert re.search(r'dare_unknown_items_total\{variant="dare"\} [1-9]', metrics)


def test_explain_lists_retrieved_behaviors(client: Any, served: ServedData, tiny_models: TinyModels) -> None:
    user = _longest(served.fm_users, served)
    cands = _candidates(served, 3, seed=9)[:3]
    r = score(client, user, cands, "dare", explain=True, timestamp=served.now)
    body = r.json()
    assert r.status_code == 200 and len(body["explain"]) == 3
    top_k = read_manifest(tiny_models.root / "dare" / "1").top_k
    items, ts = served.history(user)
    history = set(zip(items.tolist(), ts.tolist(), strict=True))
    for cand, entry in zip(cands, body["explain"], strict=True):
        assert entry["item_id"] == cand
        behaviors = entry["behaviors"]
        assert len(behaviors) == min(top_k, len(items))
        assert all((b["item_id"], b["timestamp"]) in history for b in behaviors)
        assert not any(b["recent"] for b in behaviors), "the tiny bundles keep no behaviors by recency"
        weights = np.array([b["attention"] for b in behaviors])
        assert (weights >= 0).all() and abs(weights.sum() - 1.0) < 1e-4
        nonzero = weights[weights > 0]
        want = float(np.exp(-(nonzero * np.log(nonzero)).sum()))
        assert entry["effective_behaviors"] == pytest.approx(want, rel=1e-6)
        assert 1.0 <= entry["effective_behaviors"] <= len(behaviors) + 1e-6
    plain = score(client, user, cands, "dare", timestamp=served.now).json()
    assert plain["explain"] is None and plain["scores"] == body["scores"]


def test_explain_marks_the_behaviors_kept_by_recency() -> None:
    """A ranker with recent_k keeps its newest behaviors in the first slots: those are marked."""
    positions = np.array([[4, 3, 0, 2], [4, 3, 1, 0]])
    attention = np.full((2, 4), 0.25, np.float32)
    scored = ScoredJob(np.array([0.3, 0.6], np.float32), positions, attention, 0.0, 0.0, kept=2)
    items, times = np.array([10, 11, 12, 13, 14]), np.array([100, 101, 102, 103, 104])
    outcome = ScoreOutcome(scored, items, times, 5, FmStatus.HIT, True, 0, 0.0, 0.0)
    explained = explain_of([7, 8], outcome)
    assert [b["item_id"] for b in explained[1]["behaviors"]] == [14, 13, 11, 10]
    assert [[b["recent"] for b in e["behaviors"]] for e in explained] == [[True, True, False, False]] * 2
    assert [b["timestamp"] for b in explained[0]["behaviors"]] == [104, 103, 100, 102]


def test_explain_for_a_cold_user_is_empty(client: Any, served: ServedData) -> None:
    body = score(client, "nobody-at-all", served.items[:2], "coupled", explain=True).json()
    assert [e["behaviors"] for e in body["explain"]] == [[], []]
    assert [e["effective_behaviors"] for e in body["explain"]] == [0.0, 0.0]


def test_response_headers(client: Any, served: ServedData) -> None:
    r = client.post(
        "/v1/score",
        json={"user_id": served.users[0], "candidates": served.items[:5]},
        headers={"X-Request-ID": "req-123", "X-Experiment": "coupled"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-123" and r.json()["request_id"] == "req-123"
    assert r.headers["x-model-variant"] == "coupled" and r.headers["x-model-version"] == "1"
    timing = dict(
        (part.split(";dur=")[0].strip(), float(part.split(";dur=")[1].split(";")[0]))
        for part in r.headers["server-timing"].split(",")
    )
    assert {"feature", "search", "rank"} <= set(timing) and all(v >= 0 for v in timing.values())
    read = r.json()["user"]["sequence_length"]
    assert f'search;dur={timing["search"]:.3f};desc="{read} behaviors"' in r.headers["server-timing"]
    generated = score(client, served.users[0], served.items[:2]).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # a header value that is not a sane token is replaced, not echoed
    odd = client.post(
        "/v1/score", json={"user_id": "u", "candidates": [1]}, headers={"X-Request-ID": "a b" * 100}
    )
    assert odd.headers["x-request-id"] != "a b" * 100


def test_default_time_is_now(client: Any, served: ServedData) -> None:
    user = served.fm_users[2]
    r = score(client, user, served.items[:4], "dare")
    assert r.status_code == 200 and r.json()["user"]["sequence_length"] > 0


def test_models_endpoint(client: Any) -> None:
    body = client.get("/v1/models").json()
    variants = {v["variant"]: v for v in body["variants"]}
    assert set(variants) == {"dare", "coupled"}
    assert variants["dare"]["dims"]["attention"] == 8 and variants["dare"]["top_k"] == 16
    assert variants["dare"]["fm_version"] == "fm:1"
    assert body["weights"] == {"coupled": 0.5, "dare": 0.5}
    assert "CPUExecutionProvider" in body["device"]["execution_providers"]
    assert body["device"]["faiss_device"] in ("cpu", "cuda")
    assert body["batching"]["enabled"] is True


def test_health_readiness_and_metrics(client: Any, served: ServedData) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["serving"] == {"dare": "1", "coupled": "1"}
    score(client, served.fm_users[0], served.items[:3], "dare")
    text = client.get("/metrics").text
    for series in (
        'dare_score_requests_total{outcome="ok",variant="dare"}',
        'dare_stage_duration_seconds_count{stage="search",variant="dare"}',
        'dare_stage_duration_seconds_count{stage="feature",variant="dare"}',
        'dare_stage_duration_seconds_count{stage="rank",variant="dare"}',
        'dare_fm_embeddings_total{status="hit",variant="dare"}',
        'dare_batch_size_count{variant="dare"}',
        'dare_http_requests_total{endpoint="/v1/score",method="POST",status="200"}',
        'dare_model_info{model="dare",variant="dare",version="1"} 1.0',
        "dare_feature_store_client_errors_total",
    ):
        assert series in text, series
