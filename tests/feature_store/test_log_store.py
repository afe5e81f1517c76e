"""The log streams on all three backends: order, paging, time ranges, bounds, and errors translated."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis

from feature_store.errors import FeatureStoreError, FeatureStoreUnavailable
from feature_store.factory import open_log_store
from feature_store.keys import KeySpace
from feature_store.log_store import LogStore, parse_id
from service.process import free_port
from tests.feature_store.conftest import backend_url

pytestmark = pytest.mark.asyncio(loop_scope="session")

LogFactory = Callable[..., LogStore]


@pytest_asyncio.fixture(loop_scope="session")
async def make_log(request: pytest.FixtureRequest, backend: str, namespace: str) -> AsyncIterator[LogFactory]:
    url = backend_url(request, backend)
    opened: list[LogStore] = []

    def make(**kwargs: object) -> LogStore:
        options: dict[str, object] = {"timeout_s": 5.0, "namespace": namespace, **kwargs}
        log = open_log_store(url, cluster=backend == "cluster", **options)  # type: ignore[arg-type]
        opened.append(log)
        return log

    try:
        yield make
    finally:
        for log in opened:
            await log.aclose()


def _records(prefix: str, n: int) -> list[bytes]:
    return [f'{{"{prefix}": {i}}}'.encode() for i in range(n)]


async def test_appends_keep_order_per_stream_and_ids_grow(make_log: LogFactory) -> None:
    log = make_log()
    imps, evs = _records("i", 5), _records("e", 3)
    await log.append([("impressions", imps[0]), ("events", evs[0]), ("impressions", imps[1])])
    await log.append([("impressions", r) for r in imps[2:]] + [("events", r) for r in evs[1:]])
    got_imps = await log.read("impressions")
    got_evs = await log.read("events")
    assert [e.data for e in got_imps] == imps and [e.data for e in got_evs] == evs
    ids = [parse_id(e.id) for e in got_imps]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert abs(got_imps[0].ms / 1000 - time.time()) < 600  # ids are the write time, in ms
    assert await log.length("impressions") == 5 and await log.length("events") == 3


async def test_paging_and_time_ranges(make_log: LogFactory) -> None:
    log = make_log()
    records = _records("i", 250)
    await log.append([("impressions", r) for r in records])
    pages, after = [], None
    while True:
        page = await log.read("impressions", after=after, count=100)
        pages.append(page)
        if len(page) < 100:
            break
        after = page[-1].id
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [e.data for p in pages for e in p] == records
    everything = await log.read("impressions")
    first, last = everything[0].ms, everything[-1].ms
    assert len(await log.read("impressions", since_ms=first, until_ms=last)) == 250
    assert await log.read("impressions", since_ms=last + 1) == []
    assert await log.read("impressions", until_ms=first - 1) == []


async def test_count_bound_keeps_the_newest(make_log: LogFactory, backend: str) -> None:
    log = make_log(maxlen=1000)
    records = _records("i", 3000)
    for start in range(0, 3000, 500):
        await log.append([("impressions", r) for r in records[start : start + 500]])
    held = await log.length("impressions")
    # Redis trims approximately (whole nodes of 100 entries), the in-memory log exactly.
    assert held == 1000 if backend == "memory" else 1000 <= held <= 1100
    newest = await log.read("impressions", count=held)
    assert [e.data for e in newest] == records[-held:]


async def test_age_bound_drops_older_entries(make_log: LogFactory) -> None:
    await make_log().append([("events", r) for r in _records("old", 250)])
    time.sleep(0.02)  # the old entries' ids must be strictly older than the retention below
    young = make_log(retention_s=0.01)
    await young.append([("events", b'{"new": 1}')])
    kept = await young.read("events")
    assert kept[-1].data == b'{"new": 1}'
    # Approximate MINID trimming keeps the node the new entry joined (at most 100 entries).
    assert len(kept) <= 101


async def test_bad_arguments_are_refused(make_log: LogFactory) -> None:
    log = make_log()
    with pytest.raises(ValueError, match="no log stream"):
        await log.read("clicks")
    with pytest.raises(ValueError, match="stream id"):
        await log.read("events", after="yesterday")
    with pytest.raises(ValueError, match="count"):
        await log.read("events", count=0)
    with pytest.raises(ValueError, match="maxlen"):
        make_log(maxlen=0)


async def test_a_key_of_the_wrong_type_fails_the_write(redis_url: str, namespace: str) -> None:
    with redis.Redis.from_url(redis_url) as raw:
        raw.set(KeySpace(namespace).log("impressions"), b"not a stream")
    log = open_log_store(redis_url, namespace=namespace, timeout_s=5.0)
    try:
        with pytest.raises(FeatureStoreError, match="WRONGTYPE"):
            await log.append([("impressions", b"{}")])
        await log.append([("events", b"{}")])  # the other stream is unaffected
        assert await log.length("events") == 1
    finally:
        await log.aclose()


async def test_nothing_listening_is_unavailable() -> None:
    log = open_log_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        with pytest.raises(FeatureStoreUnavailable):
            await log.append([("impressions", b"{}")])
        with pytest.raises(FeatureStoreUnavailable):
            await log.read("impressions")
    finally:
        await log.aclose()
