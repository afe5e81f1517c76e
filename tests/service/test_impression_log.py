"""The impression log: what the service served is what the log holds (against a real redis-server and
a real `dare-serve serve`), and a log that is down, broken or behind never fails a score."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import redis

from feature_store.keys import KeySpace
from feature_store.log_store import InMemoryLogStore, LogStore
from service.app import create_app
from service.core.ab import in_log_sample
from service.impression_log import LogWriter, ServedImpression, score_ranks
from service.log_export import read_server
from service.metrics import Metrics
from service.process import ServeProcess, free_port
from service.state import STATE_KEY, AppState
from tests.conftest import ServedData, TinyModels
from tests.service.conftest import ADMIN_TOKEN, SettingsFactory, TestClient, is_problem

N_THREADS = 8
PER_THREAD = 12


def _stream(redis_url: str, namespace: str, stream: str) -> list[tuple[str, dict[str, Any]]]:
    with redis.Redis.from_url(redis_url) as raw:
        rows = raw.xrange(KeySpace(namespace).log(stream))
    return [(i.decode(), orjson.loads(fields[b"r"])) for i, fields in rows]


def _sample(state: AppState, name: str, **labels: str) -> float:
    return state.metrics.registry.get_sample_value(name, labels) or 0.0


def test_the_log_holds_exactly_the_served_requests_under_concurrency(
    tiny_models: TinyModels, served: ServedData, tmp_path: Path
) -> None:
    namespace = served.fill_copy(served.redis_url, "implog")
    env = {
        "DARE_REDIS_NAMESPACE": namespace,
        "DARE_IMPRESSION_LOG": "true",
        "DARE_IMPRESSION_LOG_BATCH": "16",
    }
    server = ServeProcess(tiny_models.root, redis_url=served.redis_url, env=env, log=tmp_path / "serve.log")
    base = server.start().base
    rng = np.random.default_rng(5)
    plans = []
    for t in range(N_THREADS):
        for j in range(PER_THREAD):
            user = served.users[int(rng.integers(len(served.users)))] if j % 5 else f"cold-{t}-{j}"
            cands = rng.choice(served.items, int(rng.integers(3, 40))).tolist()
            plans.append((t, j, user, cands))

    def run(thread: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        out = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for t, j, user, cands in (p for p in plans if p[0] == thread):
                headers = {"X-Request-ID": f"req-{t}-{j}"}
                if j % 4 == 0:
                    headers["X-Experiment"] = "coupled"
                body = {"user_id": user, "candidates": cands, "timestamp": served.now + j}
                r = client.post("/v1/score", json=body, headers=headers)
                assert r.status_code == 200, r.text
                out.append((body | {"header": "X-Experiment" in headers}, r.json()))
                if j % 6 == 0:
                    ev = {
                        "user_id": user,
                        "type": "click",
                        "events": [{"item_id": cands[0], "timestamp": served.now + j}],
                    }
                    assert client.post("/v1/events", json=ev).status_code == 200
        return out

    try:
        with ThreadPoolExecutor(N_THREADS) as pool:
            answers = [a for part in pool.map(run, range(N_THREADS)) for a in part]
    finally:
        server.stop()  # a graceful stop writes what is still queued
    logged = _stream(served.redis_url, namespace, "impressions")
    assert len(logged) == len(answers) == N_THREADS * PER_THREAD
    by_request = {rec["request_id"]: rec for _, rec in logged}
    assert len(by_request) == len(logged), "each request logged once"
    for body, answer in answers:
        rec = by_request[answer["request_id"]]
        assert rec["user_id"] == body["user_id"] and rec["ts"] == body["timestamp"]
        assert rec["variant"] == answer["variant"] and rec["model_version"] == answer["model_version"]
        assert rec["assigned_by"] == ("header" if body["header"] else "hash")
        assert rec["fm_embedding"] == answer["user"]["fm_embedding"]
        assert rec["candidates"] == body["candidates"] and rec["n_candidates"] == len(body["candidates"])
        assert rec["scores"] == answer["scores"], "the exact values the response carried"
        assert rec["ranks"] == score_ranks(np.array(answer["scores"])).tolist()
    events = _stream(served.redis_url, namespace, "events")
    sent = {
        (b["user_id"], b["candidates"][0], b["timestamp"])
        for b, _ in answers
        if int(b["timestamp"] - served.now) % 6 == 0
    }
    got = {(rec["user_id"], rec["items"][0], rec["timestamps"][0]) for _, rec in events}
    assert got == sent and all(rec["type"] == "click" for _, rec in events)


def test_a_log_on_a_dead_port_never_fails_a_score(make_settings: SettingsFactory, served: ServedData) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(impression_log=True, impression_log_url=dead, impression_log_timeout_ms=200.0)
    plain = make_settings()
    bodies = [
        {"user_id": u, "candidates": served.items[:8], "timestamp": served.now} for u in served.users[:20]
    ]
    with TestClient(create_app(plain)) as c:
        expected = [c.post("/v1/score", json=b).json()["scores"] for b in bodies]
    with TestClient(create_app(settings)) as c:
        state: AppState = c.app_state[STATE_KEY]
        for body, scores in zip(bodies, expected, strict=True):
            r = c.post("/v1/score", json=body)
            assert r.status_code == 200 and r.json()["scores"] == scores
        assert c.get("/readyz").status_code == 200, "the log is not part of readiness"
    dropped = sum(
        _sample(state, "dare_impression_log_dropped_total", stream="impressions", reason=reason)
        for reason in ("write_failed", "shutdown")
    )
    assert _sample(state, "dare_impression_log_written_total", stream="impressions") == 0
    assert (
        _sample(state, "dare_impression_log_dropped_total", stream="impressions", reason="write_failed") > 0
    )
    assert dropped == len(bodies)


def test_a_failing_stream_write_drops_its_records_and_counts_them(
    make_settings: SettingsFactory, served: ServedData
) -> None:
    namespace = served.fill_copy(served.redis_url, "implog-wrongtype")
    with redis.Redis.from_url(served.redis_url) as raw:
        raw.set(KeySpace(namespace).log("impressions"), b"not a stream")
    settings = make_settings(redis_namespace=namespace, impression_log=True)
    user = served.users[3]
    with TestClient(create_app(settings)) as c:
        state: AppState = c.app_state[STATE_KEY]
        for i in range(10):
            assert (
                c.post("/v1/score", json={"user_id": user, "candidates": served.items[i : i + 5]}).status_code
                == 200
            )
        ev = {"user_id": user, "events": [{"item_id": served.items[0], "timestamp": served.now}]}
        assert c.post("/v1/events", json=ev).status_code == 200
    assert (
        _sample(state, "dare_impression_log_dropped_total", stream="impressions", reason="write_failed") == 10
    )
    assert _sample(state, "dare_impression_log_written_total", stream="events") == 1
    (entry,) = _stream(served.redis_url, namespace, "events")
    assert entry[1]["user_id"] == user and entry[1]["type"] == "click"


class _StuckStore(InMemoryLogStore):
    """A log whose writes wait until released (a log that has stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def append(self, entries: Any) -> None:
        self.started.set()
        await self.release.wait()
        await super().append(entries)


def _impression(user: str, n: int = 4) -> ServedImpression:
    return ServedImpression(
        "r", 1, 1.0, user, "dare", "1", "hash", "hit", np.arange(n, dtype=np.int64), np.linspace(0.1, 0.9, n)
    )


async def test_a_full_queue_drops_new_records_without_waiting() -> None:
    store = _StuckStore()
    metrics = Metrics()
    writer = LogWriter(store, metrics, salt="s", queue_size=3, batch_size=2)
    writer.start()
    writer.offer(_impression("a"))
    await store.started.wait()  # the writer holds the first record in a write that does not return
    for i in range(10):
        writer.offer(_impression(f"u{i}"))  # never awaits: 3 queue, 7 dropped
    dropped = metrics.registry.get_sample_value(
        "dare_impression_log_dropped_total", {"stream": "impressions", "reason": "queue_full"}
    )
    assert dropped == 7
    store.release.set()
    await writer.flush()
    await writer.aclose()
    assert await store.length("impressions") == 4
    assert (
        metrics.registry.get_sample_value("dare_impression_log_written_total", {"stream": "impressions"}) == 4
    )


async def test_records_queued_at_shutdown_are_written_or_counted() -> None:
    store = _StuckStore()
    metrics = Metrics()
    writer = LogWriter(store, metrics, salt="s", queue_size=100, batch_size=5)
    writer.start()
    for i in range(12):
        writer.offer(_impression(f"u{i}"))
    await store.started.wait()
    await writer.aclose(drain_s=0.05)  # the log never answers: the drain gives up
    writer.offer(_impression("late"))  # after close: counted, not queued
    reasons = {
        r: metrics.registry.get_sample_value(
            "dare_impression_log_dropped_total", {"stream": "impressions", "reason": r}
        )
        for r in ("shutdown", "write_failed")
    }
    # 5 were in the write that was cancelled, 7 still queued, 1 offered after the close
    assert reasons == {"shutdown": 13, "write_failed": 0} and await store.length("impressions") == 0


def test_record_encoding_ranks_and_top_n() -> None:
    from service.impression_log import encode_impression

    imp = ServedImpression(
        "req", 7, 2.5, "u", "dare", "3", "header", "stale",
        np.array([10, 11, 12, 13, 14]), np.array([0.2, 0.9, 0.2, 0.5, 0.1], dtype=np.float32),
    )  # fmt: skip
    full = orjson.loads(encode_impression(imp))
    assert full["ranks"] == [3, 1, 4, 2, 5], "ties keep candidate order"
    assert full["scores"] == np.array([0.2, 0.9, 0.2, 0.5, 0.1], dtype=np.float32).tolist()
    top = orjson.loads(encode_impression(imp, top_n=2))
    assert top["candidates"] == [11, 13] and top["ranks"] == [1, 2] and top["n_candidates"] == 5


def test_sampling_keeps_whole_users_and_the_memory_log_reads_back(make_settings: SettingsFactory) -> None:
    settings = make_settings(
        redis_url=None, impression_log=True, impression_log_sample=0.5, impression_log_top_n=3,
        admin_token=ADMIN_TOKEN,
    )  # fmt: skip
    users = [f"sample-{i}" for i in range(40)]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(settings)) as c:
        for round_ in range(3):
            for u in users:
                r = c.post(
                    "/v1/score",
                    json={"user_id": u, "candidates": [1, 2, 3, 4, 5, 6], "timestamp": 1000 + round_},
                )
                assert r.status_code == 200
        for u in users:
            ev = {"user_id": u, "type": "purchase", "events": [{"item_id": 2, "timestamp": 1001}]}
            assert c.post("/v1/events", json=ev).status_code == 200
        state: AppState = c.app_state[STATE_KEY]
        assert state.log is not None
        c.portal.call(state.log.flush)
        records = read_server("http://testserver", ADMIN_TOKEN, "impressions", page=7, client=c)
        events = read_server("http://testserver", ADMIN_TOKEN, "events", client=c)
        assert is_problem(c.get("/admin/log/impressions"), 401)
        assert is_problem(c.get("/admin/log/clicks", headers=auth), 422)
        assert is_problem(c.get("/admin/log/events", params={"after": "x"}, headers=auth), 422)
    sampled = {u for u in users if in_log_sample(u, settings.ab_salt, 0.5)}
    assert 10 < len(sampled) < 30, "the hash sample is about half"
    assert {rec["user_id"] for _, rec in records} == sampled
    assert len(records) == 3 * len(sampled), "a sampled user is logged whole"
    assert all(len(rec["candidates"]) == 3 and sorted(rec["ranks"]) == [1, 2, 3] for _, rec in records)
    assert {rec["user_id"] for _, rec in events} == sampled
    assert all(rec["type"] == "purchase" and rec["items"] == [2] for _, rec in events)
    ids = [i for i, _ in records]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))), "pages in order, none twice"


def test_the_log_endpoint_is_absent_when_the_log_is_off(make_settings: SettingsFactory) -> None:
    with TestClient(create_app(make_settings(admin_token=ADMIN_TOKEN))) as c:
        r = c.get("/admin/log/impressions", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert is_problem(r, 404) and "DARE_IMPRESSION_LOG" in r.json()["detail"]


def test_log_settings_are_checked(make_settings: SettingsFactory) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DARE_IMPRESSION_LOG is off"):
        make_settings(impression_log_url="redis://127.0.0.1:1/0")
    with pytest.raises(ValidationError, match="impression_log_sample"):
        make_settings(impression_log=True, impression_log_sample=0)


def test_closing_twice_and_offering_after_close_are_safe() -> None:
    async def run() -> None:
        store: LogStore = InMemoryLogStore()
        writer = LogWriter(store, Metrics(), salt="s")
        writer.start()
        await writer.aclose()
        writer.offer(_impression("late"))
        await writer.aclose()  # twice is fine

    asyncio.run(run())


def test_events_that_fail_validation_are_not_logged(make_settings: SettingsFactory) -> None:
    settings = make_settings(redis_url=None, impression_log=True)
    with TestClient(create_app(settings)) as c:
        bad = {"user_id": "u", "type": "Not A Type", "events": [{"item_id": 1, "timestamp": 1}]}
        assert is_problem(c.post("/v1/events", json=bad), 422)
        state: AppState = c.app_state[STATE_KEY]
    assert _sample(state, "dare_impression_log_written_total", stream="events") == 0
