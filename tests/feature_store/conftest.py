"""Fixtures of the feature store suite: a real 3-master Redis Cluster and one store per backend."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio
import redis

from feature_store.base import FeatureStore
from feature_store.factory import open_feature_store
from service.process import free_port
from tests.redis_proc import RedisProcess

BACKENDS = ["memory", "redis", "cluster"]


def _start_cluster(n_masters: int = 3, timeout: float = 20.0) -> list[RedisProcess]:
    procs: list[RedisProcess] = []
    try:
        for _ in range(n_masters):
            # cluster-port picks the bus port explicitly: the default (port + 10000) may be taken.
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(free_port()),
                "--cluster-node-timeout",
                "5000",
            ]
            procs.append(RedisProcess(extra_args=args).start())
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p.port}" for p in procs),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        for p in procs:
            with redis.Redis(host="127.0.0.1", port=p.port, socket_timeout=2) as client:
                while client.cluster("INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {p.port} did not reach cluster_state:ok")
                    time.sleep(0.05)
        return procs
    except BaseException:
        for p in procs:
            p.cleanup()
        raise


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[RedisProcess]]:
    """Three redis-server masters on loopback ports joined into one cluster (all 16384 slots)."""
    procs = _start_cluster()
    try:
        yield procs
    finally:
        for p in procs:
            p.cleanup()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: list[RedisProcess]) -> str:
    """URL of one node of the session cluster; the client discovers the others."""
    return redis_cluster[0].url


def backend_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    """The URL a backend runs against; fixtures are resolved lazily so memory-only runs start nothing."""
    if backend == "memory":
        return None
    return request.getfixturevalue("redis_url" if backend == "redis" else "redis_cluster_url")


@pytest.fixture()
def namespace() -> str:
    """A fresh key prefix per test, so tests share the session servers without flushing them."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which store the test runs against: in-memory, a single redis-server, or the 3-master cluster."""
    return str(request.param)


StoreFactory = Callable[..., FeatureStore]


@pytest_asyncio.fixture(loop_scope="session")
async def make_store(
    request: pytest.FixtureRequest, backend: str, namespace: str
) -> AsyncIterator[StoreFactory]:
    """Opens stores of the test's backend (same namespace, so they share data) and closes them all."""
    url = backend_url(request, backend)
    opened: list[FeatureStore] = []

    def make(**kwargs: object) -> FeatureStore:
        # A timeout generous enough for 2 shared cores; the fault tests use tight ones.
        options: dict[str, object] = {"timeout_s": 5.0, "namespace": namespace, **kwargs}
        fs = open_feature_store(url, cluster=backend == "cluster", **options)  # type: ignore[arg-type]
        opened.append(fs)
        return fs

    try:
        yield make
    finally:
        for fs in opened:
            await fs.aclose()


@pytest.fixture()
def store(make_store: StoreFactory) -> FeatureStore:
    """A store of the test's backend with the default cap (10,000 events)."""
    return make_store()


@pytest.fixture()
def raw_redis(
    request: pytest.FixtureRequest, backend: str
) -> Iterator[redis.Redis | redis.RedisCluster | None]:
    """A plain synchronous redis-py client on the backend's server (None for memory), to plant bad bytes."""
    url = backend_url(request, backend)
    if url is None:
        yield None
        return
    client = redis.RedisCluster.from_url(url) if backend == "cluster" else redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.close()
