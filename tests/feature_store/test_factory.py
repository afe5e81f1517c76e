"""The clients the factory builds: asyncio retry policies, and not one warning from redis-py.

redis-py 8.2 warns (and converts) when an asyncio client is handed the synchronous
`redis.retry.Retry`; under this suite's `filterwarnings = error` that warning failed every Redis test.
These tests build each client kind with all warnings as errors and check the policy that each
connection ends up with: no retries, asyncio-shaped.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry

from feature_store.factory import open_feature_store
from feature_store.redis_store import RedisFeatureStore
from tests.feature_store.conftest import backend_url

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _retry_policies(client: Redis | RedisCluster) -> list[object]:
    """Every retry policy the client holds: its own (or its pool's template) and each live connection's."""
    if isinstance(client, RedisCluster):
        policies: list[object] = [client.retry]
        for node in client.get_nodes():
            policies.extend(conn.retry for conn in node._connections)
        return policies
    pool = client.connection_pool
    return [
        pool.connection_kwargs["retry"],
        *(conn.retry for conn in pool._in_use_connections | set(pool._available_connections)),
    ]


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_clients_warn_nothing_and_never_retry(
    request: pytest.FixtureRequest, backend: str, namespace: str
) -> None:
    url = backend_url(request, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = open_feature_store(url, cluster=backend == "cluster", timeout_s=5.0, namespace=namespace)
        try:
            # A write and a read open real connections, where redis-py applies the policy again.
            await store.append_events("u1", np.array([7, 8], np.int64), np.array([1, 2], np.int64))
            seq = await store.read_sequence("u1")
            assert seq.items.tolist() == [7, 8]
            assert isinstance(store, RedisFeatureStore)
            policies = _retry_policies(store._client)
        finally:
            await store.aclose()
    assert len(policies) >= 2  # the template and at least one live connection
    for policy in policies:
        assert isinstance(policy, AsyncRetry), type(policy)
        assert inspect.iscoroutinefunction(policy.call_with_retry)
        # No client-side retries (a retried APPEND whose reply was lost would duplicate events).
        assert policy.get_retries() == 0
