"""Shared fixtures: a real redis-server per test session (override with --redis-url)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_proc import RedisProcess


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-url", default=None,
                     help="use this Redis instead of starting a private redis-server")


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a redis-server started for this session on a free loopback port."""
    override = request.config.getoption("--redis-url")
    if override:
        yield override
        return
    proc = RedisProcess().start()
    try:
        yield proc.url
    finally:
        proc.cleanup()


@pytest.fixture()
def redis_process() -> Iterator[RedisProcess]:
    """A private redis-server that a test may stop and restart (fault tests)."""
    proc = RedisProcess().start()
    try:
        yield proc
    finally:
        proc.cleanup()
