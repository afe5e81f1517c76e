"""Builds the configured store: Redis (single node or Cluster) from a URL, else the in-memory default."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from feature_store.base import DEFAULT_FM_HISTORY_MAX_LEN, DEFAULT_MAX_LEN, FeatureStore
from feature_store.log_store import DEFAULT_LOG_MAXLEN, InMemoryLogStore, LogStore, RedisLogStore
from feature_store.memory_store import InMemoryFeatureStore
from feature_store.redis_store import RedisFeatureStore


def open_feature_store(
    redis_url: str | None,
    *,
    cluster: bool = False,
    timeout_s: float = 0.25,
    max_len: int = DEFAULT_MAX_LEN,
    fm_ttl_s: float | None = None,
    pool_size: int = 64,
    namespace: str = "dare",
    fm_history_max_len: int = DEFAULT_FM_HISTORY_MAX_LEN,
) -> FeatureStore:
    """A Redis-backed store for `redis_url` (a Redis Cluster when `cluster`), in-memory when None."""
    if redis_url is None:
        return InMemoryFeatureStore(max_len=max_len, fm_ttl_s=fm_ttl_s, fm_history_max_len=fm_history_max_len)
    return RedisFeatureStore(
        redis_client(redis_url, cluster=cluster, timeout_s=timeout_s, pool_size=pool_size),
        timeout_s=timeout_s,
        max_len=max_len,
        fm_ttl_s=fm_ttl_s,
        pool_size=pool_size,
        namespace=namespace,
        fm_history_max_len=fm_history_max_len,
    )


def open_log_store(
    redis_url: str | None,
    *,
    cluster: bool = False,
    timeout_s: float = 1.0,
    maxlen: int = DEFAULT_LOG_MAXLEN,
    retention_s: float | None = None,
    pool_size: int = 4,
    namespace: str = "dare",
) -> LogStore:
    """The impression and event logs: Redis Streams for `redis_url`, bounded lists in memory when None."""
    if redis_url is None:
        return InMemoryLogStore(maxlen=maxlen, retention_s=retention_s)
    return RedisLogStore(
        redis_client(redis_url, cluster=cluster, timeout_s=timeout_s, pool_size=pool_size),
        namespace=namespace,
        timeout_s=timeout_s,
        maxlen=maxlen,
        retention_s=retention_s,
    )


def redis_client(redis_url: str, *, cluster: bool, timeout_s: float, pool_size: int) -> Redis | RedisCluster:
    """A redis-py asyncio client configured as every store here needs it (no retries, bounded pool)."""
    common: dict[str, Any] = {
        "max_connections": pool_size,
        "socket_connect_timeout": timeout_s,
        # No client-side retries: a retried APPEND whose reply was lost would duplicate events, and
        # retries with backoff would overrun the timeout. A failed call raises; the next one
        # reconnects (and, on a cluster, re-reads the topology). The asyncio class: redis-py 8.2 warns
        # about (and converts) the synchronous one.
        "retry": Retry(NoBackoff(), 0),
        # Off: redis-py skips its check for dead pooled connections while maintenance notifications
        # (a managed-Redis feature, on by default over RESP3) are enabled, so after a Redis restart
        # a request could draw a connection to the old process and fail although Redis is back.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    if cluster:
        return RedisCluster.from_url(redis_url, socket_timeout=timeout_s, **common)
    # No socket_timeout: every call already runs under the store's own deadline
    # (`RedisFeatureStore._call`), and a per-socket one costs each command an extra asyncio task
    # (the send) and timeout scope (each reply), a sixth of a feature read's CPU. A call cut
    # short by the deadline still drops its connection: redis-py disconnects on any exception
    # inside a send or a read, cancellation included.
    return Redis.from_pool(BlockingConnectionPool.from_url(redis_url, timeout=timeout_s, **common))
