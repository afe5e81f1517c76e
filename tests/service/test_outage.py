"""Redis outage: bounded 503 with Retry-After, /readyz fails, recovery without restarting the app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from feature_store.factory import open_feature_store
from feature_store.fill import fill
from feature_store.memory_store import InMemoryFeatureStore
from service.app import create_app
from service.errors import StoreDownAnswer
from service.loop_lag import LoopLagMonitor
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


# -- the budget counts the store's time, not the event loop's stalls --------------------------------

BUDGET_S = 0.25


@contextlib.asynccontextmanager
async def _batch_scorer(redis_url: str, namespace: str, monitored: bool) -> AsyncIterator[BatchScorer]:
    """A BatchScorer on a real Redis with the service's budget rules, its loop watched or not."""
    metrics = Metrics()
    monitor = LoopLagMonitor(metrics.loop_lag) if monitored else None
    store = open_feature_store(redis_url, timeout_s=BUDGET_S, namespace=namespace)
    with ThreadPoolExecutor(1) as pool:
        scorer = BatchScorer(
            store,
            pool,
            metrics,
            retry_after_s=1,
            fm_use_expired=True,
            feature_timeout_s=BUDGET_S,
            loop_lag=monitor,
        )
        if monitor is not None:
            monitor.start()
        try:
            yield scorer
        finally:
            if monitor is not None:
                await monitor.aclose()
            await store.aclose()


def _model(served: ServedData) -> Any:
    # read_features needs the model's FM version, FM-history spec (none here) and variant only
    return SimpleNamespace(fm_version=served.fm_version, variant="dare", fm_history=None)


async def _read_while_the_loop_is_held(
    scorer: BatchScorer, model: Any, users: list[str], redis: RedisProcess
) -> Any:
    """A read whose reply Redis sends within the budget, while the event loop is held past it."""
    # Redis holds every reply for 0.1 s (CLIENT PAUSE), so the request is surely in flight when the
    # loop is held, and the reply, sent at 0.1 s, waits in the socket until the loop is free.
    redis.command("CLIENT", "PAUSE", int(0.4 * BUDGET_S * 1000), "ALL")
    task = asyncio.create_task(scorer.read_features(model, users))
    await asyncio.sleep(0.2 * BUDGET_S)  # the request is sent and waits for the paused server
    time.sleep(2 * BUDGET_S)  # the loop is held past the budget
    return await task


@pytest.mark.parametrize("monitored", [True, False])
def test_a_stalled_event_loop_is_not_a_store_outage(
    redis_process: RedisProcess, served: ServedData, monitored: bool
) -> None:
    users = served.fm_users[:3]
    namespace = served.fill_copy(redis_process.url, "held")
    model = _model(served)

    async def scenario() -> Any:
        async with _batch_scorer(redis_process.url, namespace, monitored) as scorer:
            await scorer.read_features(model, users)  # a connection in the pool
            await asyncio.sleep(0.05)  # the monitor is watching
            if not monitored:
                # what the budget did before the loop was watched: Redis answered in time, and a 503
                with pytest.raises(StoreDownAnswer):
                    await _read_while_the_loop_is_held(scorer, model, users, redis_process)
                assert scorer.store_failing
                return None
            features = await _read_while_the_loop_is_held(scorer, model, users, redis_process)
            assert not scorer.store_failing
            assert scorer.metrics.feature_retries._value.get() == 1
            return features

    features = asyncio.run(scenario())
    if not monitored:
        return
    for user in users:
        items, timestamps = served.history(user)
        got = features[user]
        np.testing.assert_array_equal(got.sequence.items, items)
        np.testing.assert_array_equal(got.sequence.timestamps, timestamps)
        np.testing.assert_array_equal(got.fm.vector, served.fm_vectors[user])


def test_a_frozen_store_still_gets_its_503_within_the_budget(
    redis_process: RedisProcess, served: ServedData
) -> None:
    user = served.fm_users[0]
    namespace = served.fill_copy(redis_process.url, "frozen")
    model = _model(served)

    async def scenario() -> None:
        async with _batch_scorer(redis_process.url, namespace, monitored=True) as scorer:
            assert (await scorer.read_features(model, [user]))[user] is not None
            redis_process.pause()  # SIGSTOP: the kernel accepts, nothing answers
            try:
                t0 = time.perf_counter()
                with pytest.raises(StoreDownAnswer):
                    await scorer.read_features(model, [user])
                took = time.perf_counter() - t0
            finally:
                redis_process.resume()
            # the loop was free: the store had its whole budget, and no second one
            assert scorer.metrics.feature_retries._value.get() == 0
            assert scorer.store_failing
            assert BUDGET_S <= took < BUDGET_S + 0.5
            assert (await scorer.read_features(model, [user]))[user] is not None
            assert not scorer.store_failing

    asyncio.run(scenario())
