"""Redis outage: bounded 503 with Retry-After, /readyz fails, recovery without restarting the app."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from feature_store.fill import fill
from feature_store.memory_store import InMemoryFeatureStore
from service.app import create_app
from service.metrics import Metrics
from service.scoring import BatchScorer, ScoreJob
from tests.conftest import ServedData
from tests.redis_proc import RedisProcess
from tests.service.conftest import SettingsFactory, TestClient, is_problem

TIMEOUT_MS = 200.0


def test_redis_down_gives_fast_503_and_recovers(
    redis_process: RedisProcess, make_settings: SettingsFactory, served: ServedData
) -> None:
    user = served.fm_users[0]
    subset = served.events[served.events["user_id"] == user]
    fill(
        redis_process.url,
        "outage",
        events=subset,
        fm={user: served.fm_vectors[user]},
        fm_version=served.fm_version,
    )
    settings = make_settings(
        redis_url=redis_process.url, redis_namespace="outage", feature_timeout_ms=TIMEOUT_MS, retry_after_s=3
    )
    body = {"user_id": user, "candidates": served.items[:5]}
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        ok = c.post("/v1/score", json=body)
        assert ok.status_code == 200 and ok.json()["user"]["fm_embedding"] == "hit"

        # A server that accepts but does not answer: the request budget, not a socket error, ends it.
        import redis

        with redis.Redis.from_url(redis_process.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        t0 = time.monotonic()
        r = c.post("/v1/score", json=body)
        assert is_problem(r, 503) and time.monotonic() - t0 < 1.0
        time.sleep(1.0)
        assert c.post("/v1/score", json=body).status_code == 200

        redis_process.stop()
        for batched in (True, False):
            t0 = time.monotonic()
            r = c.post("/v1/score", json=body, headers={"X-Experiment": "dare" if batched else "coupled"})
            took = time.monotonic() - t0
            assert is_problem(r, 503) and r.headers["retry-after"] == "3", r.text
            assert "redis" not in r.text.lower(), "no internals in the body"
            assert took < 1.5, f"503 took {took:.2f}s"
        ready = c.get("/readyz")
        assert is_problem(ready, 503) and "feature store" in ready.json()["detail"]
        assert c.get("/healthz").status_code == 200  # alive, just not ready
        events = c.post("/v1/events", json={"user_id": user, "events": [{"item_id": 1, "timestamp": 5}]})
        assert is_problem(events, 503)
        metrics = c.get("/metrics").text
        assert 'dare_feature_store_errors_total{kind="unavailable"}' in metrics
        assert 'dare_score_requests_total{outcome="unavailable",variant="dare"}' in metrics

        redis_process.start()  # same port, empty data: the store reconnects by itself
        deadline, status = time.monotonic() + 10, 0
        while status != 200 and time.monotonic() < deadline:
            status = c.post("/v1/score", json=body).status_code
            time.sleep(0.05)
        assert status == 200
        assert c.get("/readyz").status_code == 200


def test_queueing_counts_against_the_feature_budget_only_while_the_store_fails() -> None:
    with ThreadPoolExecutor(1) as pool:
        scorer = BatchScorer(
            InMemoryFeatureStore(),
            pool,
            Metrics(),
            retry_after_s=1,
            fm_use_expired=True,
            feature_timeout_s=0.25,
        )
        now = time.perf_counter()
        jobs = [ScoreJob(u, np.array([1]), 0, now - waited) for u, waited in (("a", 0.1), ("b", 0.3))]
        assert scorer.feature_budget(jobs) is None  # healthy: a slow queue is never a 503
        scorer.store_failing = True
        assert scorer.feature_budget(jobs) < -0.04  # the oldest request has used up its 0.25 s
        assert 0.1 < scorer.feature_budget(jobs[:1]) <= 0.15
