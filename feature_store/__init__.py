"""dare-serve feature store: user behavior sequences and cached FM embeddings.

The service uses `open_feature_store(...)` and the types below; bulk loading lives in
`feature_store.ingest` (it needs pandas). The key layout is in docs/feature-store.md.
"""

from feature_store.base import FeatureStore, FmLookup, FmStatus, StoreStats, UserFeatures, UserSequence
from feature_store.errors import (
    CorruptFeatureData,
    FeatureStoreError,
    FeatureStoreUnavailable,
    InvalidFeatureData,
)
from feature_store.factory import open_feature_store, open_log_store
from feature_store.log_store import InMemoryLogStore, LogEntry, LogStore, RedisLogStore
from feature_store.memory_store import InMemoryFeatureStore
from feature_store.redis_store import RedisFeatureStore

__all__ = [
    "CorruptFeatureData",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreUnavailable",
    "FmLookup",
    "FmStatus",
    "InMemoryFeatureStore",
    "InMemoryLogStore",
    "InvalidFeatureData",
    "LogEntry",
    "LogStore",
    "RedisFeatureStore",
    "RedisLogStore",
    "StoreStats",
    "UserFeatures",
    "UserSequence",
    "open_feature_store",
    "open_log_store",
]
