"""Small helpers shared by the feature store tests: seeded events and planting bad bytes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import redis

from feature_store.base import FeatureStore, UserSequence
from feature_store.memory_store import InMemoryFeatureStore
from feature_store.redis_store import RedisFeatureStore

T0 = 1_700_000_000


def events(rng: np.random.Generator, n: int, t0: int = T0) -> tuple[np.ndarray, np.ndarray]:
    """n events with random int64 item ids (full range) and non-decreasing timestamps."""
    items = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
    timestamps = t0 + np.cumsum(rng.integers(0, 5, n)).astype(np.int64)
    return items, timestamps


def pairs(seq: UserSequence) -> Counter[tuple[int, int]]:
    """The multiset of (item, timestamp) of a sequence."""
    return Counter(zip(seq.items.tolist(), seq.timestamps.tolist(), strict=True))


def plant_sequence(
    store: FeatureStore, raw: redis.Redis | redis.RedisCluster | None, user: str, value: bytes
) -> None:
    """Put raw bytes under a user's sequence key, bypassing the store's encoder."""
    if isinstance(store, InMemoryFeatureStore):
        store._sequences[user] = bytearray(value)
    else:
        assert isinstance(store, RedisFeatureStore) and raw is not None
        raw.set(store.keys.sequence(user), value)


def plant_fm(
    store: FeatureStore, raw: redis.Redis | redis.RedisCluster | None, user: str, version: str, blob: bytes
) -> None:
    """Put a raw FM blob under a user's FM hash, bypassing the store's encoder."""
    if isinstance(store, InMemoryFeatureStore):
        store._fm.setdefault(user, {})[version.encode()] = blob
    else:
        assert isinstance(store, RedisFeatureStore) and raw is not None
        raw.hset(store.keys.fm(user), version, blob)
