"""FM-history entries in the three stores: bulk replace by version, capped appends, reads in the batch."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from feature_store import fm_history as fh
from feature_store.base import FeatureStore
from feature_store.errors import CorruptFeatureData, InvalidFeatureData
from feature_store.memory_store import InMemoryFeatureStore
from feature_store.redis_store import RedisFeatureStore
from tests.feature_store.conftest import StoreFactory
from tests.feature_store.helpers import T0, events

pytestmark = pytest.mark.asyncio(loop_scope="session")

RawClient = redis.Redis | redis.RedisCluster | None


def entries(times: list[int] | np.ndarray, fm: str = "fm:1", enc: str = "pca-a", dim: int = 4) -> list[bytes]:
    """Entries whose first value is their time offset from T0, so a read shows which ones were kept."""
    t = np.asarray(times, np.int64)
    vectors = np.repeat((t - T0)[:, None], dim, axis=1).astype(np.float32)
    return fh.encode_entries(t, vectors, fm_version=fm, encoder_version=enc, encoding="fp32")


def summary(found: fh.HistoryEntries) -> list[tuple[int, int, int]]:
    """(time offset, FM id, encoder id) of each stored entry, in stored order."""
    return [
        (int(t) - T0, int(f), int(e))
        for t, f, e in zip(found.times, found.fm_ids, found.encoder_ids, strict=True)
    ]


def ids(fm: str, enc: str) -> tuple[int, int]:
    return fh.version_id(fm), fh.version_id(enc)


def plant_history(store: FeatureStore, raw: RawClient, user: str, blobs: list[bytes]) -> None:
    """Put raw entries under a user's FM-history key, bypassing the store's checks."""
    if isinstance(store, InMemoryFeatureStore):
        store._fm_history[user] = list(blobs)
    else:
        assert isinstance(store, RedisFeatureStore) and raw is not None
        raw.delete(store.keys.fm_history(user))
        raw.rpush(store.keys.fm_history(user), *blobs)


async def test_written_entries_come_back_in_time_order_with_the_batch_read(store: FeatureStore) -> None:
    times = [T0 + 30, T0 + 10, T0 + 20]
    await store.write_fm_history("fm:1", "pca-a", {"u": entries(times), "v": entries([T0 + 5])})
    await store.append_events("u", *events(np.random.default_rng(0), 3))
    found = await store.read_fm_history("u")
    assert [t for t, _, _ in summary(found)] == [10, 20, 30]
    np.testing.assert_array_equal(fh.decode_vectors(found, np.arange(3), 4)[:, 0], [10, 20, 30])
    u, v, nobody = await store.read_users(["u", "v", "nobody"], fm_history=True)
    assert len(u.sequence) == 3 and summary(u.fm_history) == summary(found)
    assert v.fm_history is not None and summary(v.fm_history)[0][0] == 5
    assert nobody.fm_history is not None and len(nobody.fm_history) == 0
    # without asking, nothing is read
    (plain,) = await store.read_users(["u"])
    assert plain.fm_history is None and len(plain.sequence) == 3


async def test_a_rewrite_of_the_same_versions_replaces_them(store: FeatureStore) -> None:
    await store.write_fm_history("fm:1", "pca-a", {"u": entries([T0 + 1, T0 + 2, T0 + 3])})
    await store.write_fm_history("fm:1", "pca-a", {"u": entries([T0 + 7, T0 + 8])})
    assert [t for t, _, _ in summary(await store.read_fm_history("u"))] == [7, 8]
    await store.write_fm_history("fm:1", "pca-a", {"u": []})
    assert len(await store.read_fm_history("u")) == 0


async def test_versions_in_use_are_kept_while_another_is_written(store: FeatureStore) -> None:
    await store.write_fm_history("fm:1", "pca-a", {"u": entries([T0 + 1, T0 + 2], "fm:1", "pca-a")})
    # another encoder of the same FM: both kept
    await store.write_fm_history("fm:1", "pca-b", {"u": entries([T0 + 3], "fm:1", "pca-b")})
    assert summary(await store.read_fm_history("u")) == [
        (1, *ids("fm:1", "pca-a")),
        (2, *ids("fm:1", "pca-a")),
        (3, *ids("fm:1", "pca-b")),
    ]
    # a new FM while fm:1 is active: fm:1's entries stay for the rankers that read them
    await store.set_active_fm_version("fm:1")
    await store.write_fm_history("fm:2", "pca-c", {"u": entries([T0 + 4], "fm:2", "pca-c")})
    assert [t for t, _, _ in summary(await store.read_fm_history("u"))] == [1, 2, 3, 4]
    # once fm:2 is active, writing fm:3 drops fm:1 (neither written nor active)
    await store.set_active_fm_version("fm:2")
    await store.write_fm_history("fm:3", "pca-d", {"u": entries([T0 + 5], "fm:3", "pca-d")})
    assert summary(await store.read_fm_history("u")) == [
        (4, *ids("fm:2", "pca-c")),
        (5, *ids("fm:3", "pca-d")),
    ]


async def test_the_cap_keeps_the_newest_and_the_written_entries_first(make_store: StoreFactory) -> None:
    store = make_store(fm_history_max_len=5)
    times = T0 + np.random.default_rng(1).permutation(12)
    await store.write_fm_history("fm:1", "pca-a", {"u": entries(times)})
    assert [t for t, _, _ in summary(await store.read_fm_history("u"))] == [7, 8, 9, 10, 11]
    # another encoder's 4 entries fill the key: one of the kept ones remains, ahead of them
    await store.write_fm_history("fm:1", "pca-b", {"u": entries(T0 + 100 + np.arange(4), enc="pca-b")})
    assert [t for t, _, _ in summary(await store.read_fm_history("u"))] == [11, 100, 101, 102, 103]


async def test_appends_keep_the_newest_and_lose_nothing_under_concurrency(make_store: StoreFactory) -> None:
    store = make_store(fm_history_max_len=40)
    assert await store.append_fm_history("u", entries([T0 + 1, T0 + 2])) == 2
    assert await store.append_fm_history("u", []) == 2
    counts = await asyncio.gather(*(store.append_fm_history("u", entries([T0 + 10 + i])) for i in range(30)))
    assert sorted(counts) == list(range(3, 33))
    found = await store.read_fm_history("u")
    assert sorted(t for t, _, _ in summary(found)) == [1, 2, *range(10, 40)]
    assert await store.append_fm_history("u", entries(T0 + 100 + np.arange(20))) == 40
    assert [t for t, _, _ in summary(await store.read_fm_history("u"))][-20:] == list(range(100, 120))


async def test_many_users_are_written_in_several_pipelines(store: FeatureStore) -> None:
    users = {f"user-{i}": entries([T0 + i, T0 + i + 1]) for i in range(2_300)}
    await store.write_fm_history("fm:1", "pca-a", users)
    found = await store.read_users(["user-0", "user-2299"], fm_history=True)
    assert [[t for t, _, _ in summary(f.fm_history)] for f in found] == [[0, 1], [2299, 2300]]


async def test_writes_the_layout_or_the_versions_do_not_fit_are_refused(store: FeatureStore) -> None:
    await store.write_fm_history("fm:1", "pca-a", {"u": entries([T0 + 1])})
    for bad in (
        {"u": entries([T0 + 2], enc="pca-b")},
        {"u": [b"not an entry"]},
        {"w": entries([T0], fm="fm:2")},
    ):
        with pytest.raises(InvalidFeatureData):
            await store.write_fm_history("fm:1", "pca-a", bad)
    with pytest.raises(InvalidFeatureData):
        await store.write_fm_history("", "pca-a", {"u": []})
    with pytest.raises(InvalidFeatureData):
        await store.append_fm_history("u", [b"\x01\x03"])
    assert [t for t, _, _ in summary(await store.read_fm_history("u"))] == [1]
    assert len(await store.read_fm_history("w")) == 0


async def test_corrupt_entries_fail_that_user_only(store: FeatureStore, raw_redis: RawClient) -> None:
    good = entries([T0 + 1])
    await store.write_fm_history("fm:1", "pca-a", {"a": good, "c": good})
    plant_history(store, raw_redis, "b", [good[0], good[0][:-1]])
    with pytest.raises(CorruptFeatureData) as info:
        await store.read_users(["a", "b", "c"], fm_history=True)
    assert info.value.user_ids == ("b",)
    assert info.value.partial is not None and info.value.partial[1] is None
    assert [p is not None and len(p.fm_history or ()) == 1 for p in info.value.partial] == [True, False, True]
    with pytest.raises(CorruptFeatureData):
        await store.read_fm_history("b")
    # a read that does not ask for the history is not affected
    assert len(await store.read_users(["b"])) == 1
    # a rewrite repairs it: the bad entry's ids are those written, so it is replaced
    await store.write_fm_history("fm:1", "pca-a", {"b": good})
    assert len(await store.read_fm_history("b")) == 1
    assert store.stats.corrupt_reads == 2


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
async def test_a_key_of_the_wrong_type_is_corrupt(store: FeatureStore, raw_redis: RawClient) -> None:
    assert isinstance(store, RedisFeatureStore) and raw_redis is not None
    raw_redis.set(store.keys.fm_history("s"), b"a string")
    with pytest.raises(CorruptFeatureData) as info:
        await store.read_users(["s"], fm_history=True)
    assert info.value.user_ids == ("s",)
    with pytest.raises(CorruptFeatureData):
        await store.write_fm_history("fm:1", "pca-a", {"s": entries([T0])})
    with pytest.raises(CorruptFeatureData):
        await store.append_fm_history("s", entries([T0]))
    with pytest.raises(CorruptFeatureData):
        await store.read_fm_history("s")
