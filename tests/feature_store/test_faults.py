"""Faults: Redis unreachable, silent or paused gives FeatureStoreUnavailable in time, then recovery."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest
import redis

from feature_store.base import FeatureStore, UserSequence
from feature_store.errors import FeatureStoreUnavailable
from feature_store.factory import open_feature_store
from service.process import free_port
from tests.feature_store.helpers import T0, events, pairs
from tests.redis_proc import RedisProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")

TIMEOUT_S = 0.3
# What scheduling on two shared cores may add to the configured timeout.
SLACK_S = 0.7


def every_call(store: FeatureStore) -> list[Callable[[], Awaitable[object]]]:
    """One call of each store method that talks to Redis."""
    one = (np.array([1]), np.array([T0]))
    return [
        store.ping,
        lambda: store.read_sequence("u"),
        lambda: store.read_users(["u", "v"]),
        lambda: store.append_events("u", *one),
        lambda: store.replace_sequences({"u": UserSequence(*one)}),
        lambda: store.write_fm_embeddings("v1", ["u"], np.ones((1, 2))),
        lambda: store.set_active_fm_version("v1"),
        store.active_fm_version,
    ]


async def assert_unavailable_in_time(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    with pytest.raises(FeatureStoreUnavailable):
        await call()
    elapsed = time.perf_counter() - started
    assert elapsed < TIMEOUT_S + SLACK_S, f"took {elapsed:.3f}s"
    return elapsed


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A loopback port that completes TCP handshakes (kernel backlog) but never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
async def test_nothing_listening_is_unavailable_in_time(cluster: bool) -> None:
    store = open_feature_store(f"redis://127.0.0.1:{free_port()}/0", cluster=cluster, timeout_s=TIMEOUT_S)
    try:
        calls = every_call(store)
        for call in calls:
            await assert_unavailable_in_time(call)
        assert store.stats.errors == len(calls)
    finally:
        await store.aclose()


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
async def test_silent_server_times_out_in_time(silent_port: int, cluster: bool) -> None:
    store = open_feature_store(f"redis://127.0.0.1:{silent_port}/0", cluster=cluster, timeout_s=TIMEOUT_S)
    try:
        for call in every_call(store)[:4]:
            elapsed = await assert_unavailable_in_time(call)
            assert elapsed >= TIMEOUT_S * 0.9  # it really waited for the server, then gave up
        assert store.stats.timeouts >= 1 and store.stats.errors == 4
    finally:
        await store.aclose()


async def test_restart_recovers_without_a_new_store(redis_process: RedisProcess) -> None:
    store = open_feature_store(redis_process.url, timeout_s=TIMEOUT_S)
    try:
        assert await store.append_events("u", np.array([1, 2]), np.array([T0, T0 + 1])) == 2
        redis_process.stop()
        for call in every_call(store):
            await assert_unavailable_in_time(call)
        redis_process.start()  # same port, empty data (the test server keeps nothing on disk)
        await store.ping()
        assert len(await store.read_sequence("u")) == 0
        assert await store.append_events("u", np.array([7]), np.array([T0])) == 1
        (feat,) = await store.read_users(["u"])
        assert feat.sequence.items.tolist() == [7]
    finally:
        await store.aclose()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_while_idle_fails_no_call(redis_process: RedisProcess, how: str) -> None:
    """Pooled connections to the old process are replaced before use, not found dead by a request."""
    store = open_feature_store(redis_process.url, timeout_s=TIMEOUT_S)
    try:
        # several connections in the pool, all idle when Redis goes away
        await asyncio.gather(*(store.read_users([f"u{i}"]) for i in range(16)))
        if how == "stop":
            redis_process.stop()
        else:
            redis_process.kill()
        redis_process.start()
        await asyncio.sleep(0.2)  # the event loop sees the old connections' EOF
        for call in every_call(store) * 4:
            await call()
        # and under concurrency, where each call takes another pooled connection
        await asyncio.gather(*(store.read_users([f"u{i}"]) for i in range(16)))
    finally:
        await store.aclose()


async def test_paused_server_times_out_then_answers_correctly(redis_process: RedisProcess) -> None:
    store = open_feature_store(redis_process.url, timeout_s=TIMEOUT_S)
    rng = np.random.default_rng(11)
    a, b = events(rng, 500), events(rng, 300)
    try:
        await store.replace_sequences({"a": UserSequence(*a), "b": UserSequence(*b)})
        with redis.Redis.from_url(redis_process.url) as raw:
            raw.execute_command("CLIENT", "PAUSE", 800, "ALL")
            paused_at = time.monotonic()
            await assert_unavailable_in_time(lambda: store.read_users(["a", "b"]))
            # A timed-out append has an unknown outcome; it is never retried, so never doubled.
            await assert_unavailable_in_time(lambda: store.append_events("b", np.array([5]), np.array([T0])))
            assert store.stats.timeouts == 2
            await asyncio.sleep(max(0.0, 0.9 - (time.monotonic() - paused_at)))
        # The connections cut mid-reply were dropped: no reply is read by the wrong caller.
        for _ in range(3):
            got_a, got_b = await store.read_users(["a", "b"])
            np.testing.assert_array_equal(got_a.sequence.items, a[0])
            extra = pairs(got_b.sequence) - pairs(UserSequence(*b))
            assert len(got_b.sequence) - len(b[0]) == sum(extra.values()) <= 1
            assert set(extra) <= {(5, T0)}
    finally:
        await store.aclose()
