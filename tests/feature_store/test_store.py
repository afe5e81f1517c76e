"""One suite, three backends: in-memory, a real redis-server and a real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from feature_store import codec
from feature_store.base import FeatureStore, FmStatus, UserSequence
from feature_store.errors import CorruptFeatureData, InvalidFeatureData
from feature_store.redis_store import RedisFeatureStore
from tests.feature_store.conftest import StoreFactory
from tests.feature_store.helpers import T0, events, pairs, plant_fm, plant_sequence

pytestmark = pytest.mark.asyncio(loop_scope="session")

RawClient = redis.Redis | redis.RedisCluster | None


async def test_append_and_read_round_trip_exact(store: FeatureStore) -> None:
    rng = np.random.default_rng(1)
    items, ts = events(rng, 300)
    assert await store.append_events("u1", items[:120], ts[:120]) == 120
    assert await store.append_events("u1", items[120:], ts[120:]) == 300
    seq = await store.read_sequence("u1")
    assert seq.items.dtype == np.int64 and seq.timestamps.dtype == np.int64
    np.testing.assert_array_equal(seq.items, items)
    np.testing.assert_array_equal(seq.timestamps, ts)
    # Extreme values of the layout survive exactly.
    edge_items = np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], np.int64)
    edge_ts = np.array([0, 1, 2**31, codec.MAX_TIMESTAMP], np.int64)
    await store.append_events("edge", edge_items, edge_ts)
    seq = await store.read_sequence("edge")
    np.testing.assert_array_equal(seq.items, edge_items)
    np.testing.assert_array_equal(seq.timestamps, edge_ts)


async def test_replace_sorts_stably_caps_and_replaces(make_store: StoreFactory) -> None:
    store = make_store(max_len=50)
    rng = np.random.default_rng(2)
    await store.append_events("u", *events(rng, 10))
    items = np.arange(80, dtype=np.int64)
    ts = rng.integers(T0, T0 + 20, 80)  # many ties: the stable order must be kept among them
    await store.replace_sequences({"u": UserSequence(items, ts), "gone": UserSequence.empty()})
    order = np.argsort(ts, kind="stable")
    seq = await store.read_sequence("u")
    np.testing.assert_array_equal(seq.items, items[order][-50:])
    np.testing.assert_array_equal(seq.timestamps, ts[order][-50:])
    assert len(await store.read_sequence("gone")) == 0


async def test_out_of_order_appends_are_read_in_timestamp_order(store: FeatureStore) -> None:
    await store.append_events("u", np.array([1, 2, 3]), np.array([T0 + 10, T0 + 20, T0 + 30]))
    # A late event (older timestamp) and a tie arriving after the existing event with that time.
    await store.append_events("u", np.array([4, 5]), np.array([T0 + 15, T0 + 20]))
    seq = await store.read_sequence("u")
    np.testing.assert_array_equal(seq.items, [1, 4, 2, 5, 3])
    np.testing.assert_array_equal(seq.timestamps, np.array([10, 15, 20, 20, 30]) + T0)


async def test_cap_keeps_the_most_recent_events(make_store: StoreFactory) -> None:
    store = make_store(max_len=100)
    rng = np.random.default_rng(3)
    items, ts = events(rng, 250)
    lengths = [await store.append_events("u", items[i : i + 60], ts[i : i + 60]) for i in range(0, 250, 60)]
    assert lengths == [60, 100, 100, 100, 100]
    seq = await store.read_sequence("u")
    np.testing.assert_array_equal(seq.items, items[-100:])
    np.testing.assert_array_equal(seq.timestamps, ts[-100:])
    # One append larger than the cap keeps its own newest events.
    big_items, big_ts = events(rng, 130, t0=T0 + 10_000)
    assert await store.append_events("u", big_items, big_ts) == 100
    np.testing.assert_array_equal((await store.read_sequence("u")).items, big_items[-100:])


async def test_read_max_len_returns_the_newest(store: FeatureStore) -> None:
    rng = np.random.default_rng(4)
    items, ts = events(rng, 40)
    await store.append_events("u", items, ts)
    np.testing.assert_array_equal((await store.read_sequence("u", max_len=7)).items, items[-7:])
    assert len(await store.read_sequence("u", max_len=0)) == 0
    assert len(await store.read_sequence("u", max_len=10**9)) == 40
    (feat,) = await store.read_users(["u"], max_len=5)
    np.testing.assert_array_equal(feat.sequence.timestamps, ts[-5:])


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)  # two stores, one data set
async def test_a_lowered_cap_reads_the_newest_until_rewritten(make_store: StoreFactory) -> None:
    wide, narrow = make_store(max_len=100), make_store(max_len=10)
    rng = np.random.default_rng(12)
    items, ts = events(rng, 100)
    await wide.append_events("u", items, ts)
    np.testing.assert_array_equal((await narrow.read_sequence("u")).items, items[-10:])
    (feat,) = await narrow.read_users(["u"])
    np.testing.assert_array_equal(feat.sequence.timestamps, ts[-10:])
    assert await narrow.append_events("u", np.array([1]), np.array([ts[-1]])) == 10


async def test_concurrent_appends_lose_and_duplicate_nothing(store: FeatureStore) -> None:
    n_writers, m_events = 16, 25
    order = np.random.default_rng(7).permutation(n_writers * m_events)
    calls = [
        store.append_events("hot", np.array([w * 1000 + j]), np.array([T0 + j]))
        for w, j in (divmod(int(k), m_events) for k in order)
    ]
    # All 400 appends in flight at once: more than the 64 connections, so they also queue.
    lengths = await asyncio.gather(*calls)
    assert sorted(lengths) == list(range(1, n_writers * m_events + 1))  # each saw a distinct length
    seq = await store.read_sequence("hot")
    expected = {(w * 1000 + j, T0 + j): 1 for w in range(n_writers) for j in range(m_events)}
    assert pairs(seq) == expected
    assert len(seq) == n_writers * m_events


async def test_concurrent_appends_at_the_cap(make_store: StoreFactory) -> None:
    store = make_store(max_len=50)
    calls = [store.append_events("hot", np.array([i, i]), np.array([T0 + i, T0 + i])) for i in range(200)]
    lengths = await asyncio.gather(*calls)
    assert max(lengths) == 50 and all(n % 2 == 0 for n in lengths)
    seq = await store.read_sequence("hot")
    assert len(seq) == 50
    # Whole appends survive or go together; each kept pair is one written pair.
    assert all(count == 2 for count in pairs(seq).values())
    assert all(item + T0 == t for item, t in zip(seq.items.tolist(), seq.timestamps.tolist(), strict=True))


async def test_unknown_user_is_empty_with_fm_miss(store: FeatureStore) -> None:
    seq = await store.read_sequence("nobody")
    assert len(seq) == 0 and seq.items.dtype == np.int64 and seq.timestamps.dtype == np.int64
    (feat,) = await store.read_users(["nobody"])
    assert feat.user_id == "nobody" and len(feat.sequence) == 0
    assert feat.fm.status is FmStatus.MISS and feat.fm.vector is None and feat.fm.version is None
    assert await store.active_fm_version() is None
    assert await store.append_events("nobody", np.array([], np.int64), np.array([], np.int64)) == 0


async def test_fm_hit_miss_and_stale_by_version(store: FeatureStore) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    await store.write_fm_embeddings("v1", ["a", "b", "c"], vectors, written_at=T0 + 0.5)
    await store.set_active_fm_version("v1")
    assert await store.active_fm_version() == "v1"
    feats = await store.read_users(["a", "b", "c", "d"])
    assert [f.fm.status for f in feats] == [FmStatus.HIT] * 3 + [FmStatus.MISS]
    for f, row in zip(feats[:3], vectors, strict=True):
        np.testing.assert_array_equal(f.fm.vector, row)
        assert f.fm.vector is not None and f.fm.vector.dtype == np.float32
        assert f.fm.version == "v1" and f.fm.written_at == T0 + 0.5
    # A caller that wants another version still gets the vector, flagged stale.
    (feat,) = await store.read_users(["a"], fm_version="v0")
    assert feat.fm.status is FmStatus.STALE and feat.fm.version == "v1"
    np.testing.assert_array_equal(feat.fm.vector, vectors[0])
    (feat,) = await store.read_users(["a"], fm_version="v1")
    assert feat.fm.status is FmStatus.HIT


async def test_fm_without_any_version_pointer_is_a_hit(store: FeatureStore) -> None:
    await store.write_fm_embeddings("v9", ["a"], np.ones((1, 3), np.float32))
    (feat,) = await store.read_users(["a"])
    assert feat.fm.status is FmStatus.HIT and feat.fm.version == "v9"


async def test_fm_older_than_ttl_is_stale(make_store: StoreFactory) -> None:
    store = make_store(fm_ttl_s=60.0)
    await store.write_fm_embeddings("v1", ["old"], np.ones((1, 4)), written_at=time.time() - 120)
    await store.write_fm_embeddings("v1", ["new"], np.ones((1, 4)))
    await store.set_active_fm_version("v1")
    old, new = await store.read_users(["old", "new"])
    assert old.fm.status is FmStatus.STALE and old.fm.vector is not None
    assert new.fm.status is FmStatus.HIT


async def test_fm_version_switch_is_atomic(store: FeatureStore) -> None:
    users = [f"u{i}" for i in range(40)]
    await store.write_fm_embeddings("v1", users, np.full((40, 8), 1.0, np.float32))
    await store.set_active_fm_version("v1")
    seen: list[set[tuple[FmStatus, str | None]]] = []
    switched = asyncio.Event()

    async def reader() -> None:
        while not switched.is_set():
            feats = await store.read_users(users)
            seen.append({(f.fm.status, f.fm.version) for f in feats})
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    # The background job writes v2 in slices while v1 serves, then flips the pointer.
    for lo in range(0, 40, 10):
        await store.write_fm_embeddings("v2", users[lo : lo + 10], np.full((10, 8), 2.0, np.float32))
        await asyncio.sleep(0)
    await store.set_active_fm_version("v2")
    switched.set()
    await task
    feats = await store.read_users(users)
    seen.append({(f.fm.status, f.fm.version) for f in feats})
    # Every read saw one consistent version, all hits: v1 until the flip, v2 after it.
    assert len(seen) > 2 and all(len(snapshot) == 1 for snapshot in seen), seen
    versions = [next(iter(snapshot)) for snapshot in seen]
    assert versions[0] == (FmStatus.HIT, "v1") and versions[-1] == (FmStatus.HIT, "v2")
    assert versions == sorted(versions, key=lambda v: v[1])  # never back to v1 once v2 was seen
    assert all(f.fm.vector is not None and f.fm.vector[0] == 2.0 for f in feats)


async def test_fm_keeps_only_the_new_and_the_active_version(store: FeatureStore) -> None:
    await store.write_fm_embeddings("v1", ["a", "b"], np.full((2, 2), 1.0), written_at=T0)
    await store.set_active_fm_version("v1")
    await store.write_fm_embeddings("v2", ["a"], np.full((1, 2), 2.0), written_at=T0 + 1)
    await store.set_active_fm_version("v2")
    await store.write_fm_embeddings("v3", ["a"], np.full((1, 2), 3.0), written_at=T0 + 2)
    # v1 of "a" was dropped when v3 was written (v2 active); "b" never got v2: v1 served stale.
    a, b = await store.read_users(["a", "b"])
    assert a.fm.status is FmStatus.HIT and a.fm.version == "v2"
    (a1,) = await store.read_users(["a"], fm_version="v1")
    assert a1.fm.status is FmStatus.STALE and a1.fm.version == "v3"  # the newest of what is left
    assert b.fm.status is FmStatus.STALE and b.fm.version == "v1"


async def test_read_users_of_32_users_in_order(store: FeatureStore) -> None:
    rng = np.random.default_rng(5)
    users = [f"user-{i}" for i in range(32)]
    seqs = {u: UserSequence(*events(rng, int(rng.integers(0, 300)))) for u in users}
    await store.replace_sequences(seqs)
    vectors = rng.standard_normal((32, 16)).astype(np.float32)
    await store.write_fm_embeddings("v1", users[::2], vectors[::2])
    await store.set_active_fm_version("v1")
    asked = [*users, "missing", users[3]]
    feats = await store.read_users(asked)
    assert [f.user_id for f in feats] == asked
    for f in feats[:32]:
        i = users.index(f.user_id)
        np.testing.assert_array_equal(f.sequence.items, seqs[f.user_id].items)
        np.testing.assert_array_equal(f.sequence.timestamps, seqs[f.user_id].timestamps)
        if i % 2 == 0:
            assert f.fm.status is FmStatus.HIT
            np.testing.assert_array_equal(f.fm.vector, vectors[i])
        else:
            assert f.fm.status is FmStatus.MISS
    assert len(feats[32].sequence) == 0 and feats[32].fm.status is FmStatus.MISS
    np.testing.assert_array_equal(feats[33].sequence.items, seqs[users[3]].items)
    assert await store.read_users([]) == []


@pytest.mark.parametrize("backend", ["cluster"], indirect=True)
async def test_cluster_batches_span_nodes_and_users_keep_one_slot(store: FeatureStore) -> None:
    assert isinstance(store, RedisFeatureStore)
    users = [f"user-{i}" for i in range(32)]
    for u in users:
        assert key_slot(store.keys.sequence(u)) == key_slot(store.keys.fm(u))
    await store.ping()
    client = store.client
    assert isinstance(client, redis.asyncio.RedisCluster)
    nodes = {client.nodes_manager.get_node_from_slot(key_slot(store.keys.sequence(u))).name for u in users}
    assert len(nodes) == 3  # one batched read_users call reaches all three masters


async def test_odd_user_ids_get_distinct_keys(store: FeatureStore) -> None:
    odd = ["", "{", "}", "a{b}c", "{a}", "a b", "%41", "A", "ü", "用户", "\ud800", "a\nb", "x" * 300]
    for i, u in enumerate(odd):
        await store.append_events(u, np.array([i]), np.array([T0 + i]))
    feats = await store.read_users(odd)
    assert [f.sequence.items.tolist() for f in feats] == [[i] for i in range(len(odd))]


async def test_corrupt_sequence_is_typed_counted_and_isolated(
    store: FeatureStore, raw_redis: RawClient
) -> None:
    rng = np.random.default_rng(6)
    await store.replace_sequences(
        {"good": UserSequence(*events(rng, 20)), "good2": UserSequence(*events(rng, 3))}
    )
    plant_sequence(store, raw_redis, "bad", b"\x00" * 13)  # not a whole number of 12-byte records
    with pytest.raises(CorruptFeatureData, match="'bad'") as err:
        await store.read_sequence("bad")
    assert err.value.user_ids == ("bad",)
    assert store.stats.corrupt_reads == 1
    with pytest.raises(CorruptFeatureData) as err:
        await store.read_users(["good", "bad", "good2"])
    assert err.value.user_ids == ("bad",) and store.stats.corrupt_reads == 2
    partial = err.value.partial
    assert partial is not None and partial[1] is None
    assert [len(p.sequence) for p in (partial[0], partial[2]) if p is not None] == [20, 3]
    # Other users stay readable, and an append never extends the corrupt value.
    assert [len(f.sequence) for f in await store.read_users(["good", "good2"])] == [20, 3]
    with pytest.raises(CorruptFeatureData):
        await store.append_events("bad", np.array([1]), np.array([T0]))
    # A long corrupt value is caught even when only its (aligned-looking) tail is read.
    plant_sequence(store, raw_redis, "bad", b"\x01" * (12 * 50 + 5))
    with pytest.raises(CorruptFeatureData):
        await store.read_sequence("bad", max_len=10)
    # Replacing the value repairs the user.
    await store.replace_sequences({"bad": UserSequence(np.array([9]), np.array([T0]))})
    assert (await store.read_sequence("bad")).items.tolist() == [9]


async def test_corrupt_fm_blob_is_typed_and_counted(store: FeatureStore, raw_redis: RawClient) -> None:
    await store.write_fm_embeddings("v1", ["good"], np.ones((1, 4)))
    plant_fm(store, raw_redis, "bad", "v1", b"DF\x01\x01garbage")
    with pytest.raises(CorruptFeatureData, match="FM embedding") as err:
        await store.read_users(["good", "bad"])
    assert err.value.user_ids == ("bad",) and store.stats.corrupt_reads == 1
    assert err.value.partial is not None and err.value.partial[0] is not None
    assert err.value.partial[0].fm.status is FmStatus.HIT
    # read_sequence does not touch the FM hash.
    assert len(await store.read_sequence("bad")) == 0


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)  # memory has no key types
async def test_wrong_key_type_is_corrupt(store: FeatureStore, raw_redis: RawClient) -> None:
    assert isinstance(store, RedisFeatureStore) and raw_redis is not None
    raw_redis.rpush(store.keys.sequence("listy"), b"x")
    raw_redis.set(store.keys.fm("stringy"), b"x")
    with pytest.raises(CorruptFeatureData):
        await store.read_sequence("listy")
    with pytest.raises(CorruptFeatureData) as err:
        await store.read_users(["listy", "stringy", "fine"])
    assert set(err.value.user_ids) == {"listy", "stringy"}
    with pytest.raises(CorruptFeatureData):
        await store.append_events("listy", np.array([1]), np.array([T0]))
    with pytest.raises(CorruptFeatureData):
        await store.write_fm_embeddings("v1", ["stringy", "fine"], np.ones((2, 2)))
    assert store.stats.corrupt_reads == 5


async def test_invalid_writes_are_refused_and_write_nothing(store: FeatureStore) -> None:
    bad_calls = [
        store.append_events("u", np.array([1]), np.array([-1])),
        store.append_events("u", np.array([1]), np.array([2**32])),
        store.append_events("u", np.array([1, 2]), np.array([T0])),
        store.append_events("u", np.array([1.5]), np.array([T0])),
        store.write_fm_embeddings("v1", ["u"], np.array([[np.nan]])),
        store.write_fm_embeddings("v1", ["u", "w"], np.ones((1, 3))),
        store.write_fm_embeddings("", ["u"], np.ones((1, 3))),
        store.set_active_fm_version(""),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidFeatureData):
            await call
    (feat,) = await store.read_users(["u"])
    assert len(feat.sequence) == 0 and feat.fm.status is FmStatus.MISS
    with pytest.raises(ValueError):
        await store.read_sequence("u", max_len=-1)


async def test_lifelong_histories_up_to_the_cap(make_store: StoreFactory) -> None:
    # a cap of 100,000 events (1.2 MB per user): stored, read whole or at a depth, capped on append
    store = make_store(max_len=100_000)
    rng = np.random.default_rng(21)
    items, ts = events(rng, 100_000)
    await store.replace_sequences({"life": UserSequence(items, ts)})
    (feat,) = await store.read_users(["life"])
    np.testing.assert_array_equal(feat.sequence.items, items)
    np.testing.assert_array_equal(feat.sequence.timestamps, ts)
    (deep,) = await store.read_users(["life"], max_len=2_000)
    np.testing.assert_array_equal(deep.sequence.items, items[-2_000:])
    more_items, more_ts = events(rng, 500, t0=int(ts[-1]) + 1)
    assert await store.append_events("life", more_items, more_ts) == 100_000
    seq = await store.read_sequence("life")
    np.testing.assert_array_equal(seq.items, np.r_[items[500:], more_items])


async def test_the_cap_is_bounded() -> None:
    from feature_store.base import MAX_LEN_LIMIT
    from feature_store.factory import open_feature_store

    assert open_feature_store(None, max_len=MAX_LEN_LIMIT).max_len == MAX_LEN_LIMIT >= 100_000
    for bad in (0, MAX_LEN_LIMIT + 1):
        with pytest.raises(ValueError, match="max_len"):
            open_feature_store(None, max_len=bad)


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
async def test_appends_at_the_cap_trim_in_steps(make_store: StoreFactory, raw_redis: RawClient) -> None:
    from feature_store.redis_store import TRIM_SLACK_SHARE

    cap = 160
    slack = cap // TRIM_SLACK_SHARE
    store = make_store(max_len=cap)
    assert isinstance(store, RedisFeatureStore) and raw_redis is not None
    rng = np.random.default_rng(22)
    items, ts = events(rng, cap + 3 * slack)
    await store.replace_sequences({"full": UserSequence(items[:cap], ts[:cap])})
    stored = []
    for i in range(cap, len(items)):
        # a full history: every append reports the cap and every read returns the newest cap events
        assert await store.append_events("full", items[i : i + 1], ts[i : i + 1]) == cap
        np.testing.assert_array_equal((await store.read_sequence("full")).items, items[i + 1 - cap : i + 1])
        stored.append(int(raw_redis.strlen(store.keys.sequence("full"))) // codec.EVENT_BYTES)
    # the stored value runs at most `slack` events past the cap, then is cut back to the cap
    assert stored[: slack + 1] == [*range(cap + 1, cap + slack + 1), cap]
    assert max(stored) == cap + slack and stored.count(cap) == len(stored) // (slack + 1)
