"""Fixtures of the service tests: settings against the tiny bundles and the data that `served`
(tests/conftest.py) holds in the session Redis, and app clients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import ServedData, TinyModels

with warnings.catch_warnings():
    # starlette warns at import that it prefers httpx2 over httpx; httpx is what is installed.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ADMIN_TOKEN = "admin-token-0123456789"
WRITE_TOKEN = "write-token-0123456789"


SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def make_settings(tiny_models: TinyModels, served: ServedData) -> SettingsFactory:
    """Settings against the tiny bundles and the session Redis namespace; keywords override."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "bundles": tiny_models.root,
            "redis_url": served.redis_url,
            "redis_namespace": served.namespace,
            "feature_timeout_ms": 2000.0,
        }
        return Settings(**(base | overrides))

    return make


@pytest.fixture(scope="module")
def client(make_settings: SettingsFactory) -> Iterator[TestClient]:
    """A running app with default settings (batching on), shared by a test module."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as c:
        yield c


def score(c: TestClient, user: str, candidates: list[int], variant: str | None = None, **body: Any) -> Any:
    """POST /v1/score and return the response."""
    headers = {"X-Experiment": variant} if variant else {}
    return c.post("/v1/score", json={"user_id": user, "candidates": candidates, **body}, headers=headers)


def is_problem(response: Any, status: int) -> bool:
    """The response is an RFC 9457 problem of this status, without internals."""
    body = response.json()
    return (
        response.status_code == status
        and response.headers["content-type"].startswith("application/problem+json")
        and body["status"] == status
        and isinstance(body.get("type"), str)
        and isinstance(body.get("title"), str)
        and "Traceback" not in response.text
    )
