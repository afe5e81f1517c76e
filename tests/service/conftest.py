"""Fixtures of the service tests: the tiny bundles, their data in the session Redis, app clients.

The tiny dataset's events and FM embeddings are loaded once into the session's redis-server under
a namespace of their own, so these tests never collide with other test folders on that server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TinyModels

with warnings.catch_warnings():
    # starlette warns at import that it prefers httpx2 over httpx; httpx is what is installed.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

ADMIN_TOKEN = "admin-token-0123456789"
WRITE_TOKEN = "write-token-0123456789"
NO_FM_EVERY = 5  # every 5th user (by sorted id) gets no FM embedding


@dataclass(frozen=True)
class ServedData:
    """What the session Redis holds for the service tests."""

    redis_url: str
    namespace: str
    events: pd.DataFrame  # the tiny dataset's events, sorted by (user, timestamp) stably
    fm_vectors: dict[str, np.ndarray]  # the users that have an FM embedding ("fm:1")
    fm_version: str
    users: list[str]
    items: list[int]  # known item ids
    now: int  # later than every event
    _history: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def history(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """(items, timestamps) of a user, oldest first, as the store returns them."""
        if user not in self._history:
            rows = self.events[self.events["user_id"] == user]
            self._history[user] = (
                rows["item_id"].to_numpy(np.int64),
                rows["timestamp"].to_numpy(np.int64),
            )
        return self._history[user]

    @property
    def fm_users(self) -> list[str]:
        return sorted(self.fm_vectors)

    @property
    def no_fm_users(self) -> list[str]:
        return [u for u in self.users if u not in self.fm_vectors]


async def _load(
    url: str, namespace: str, events: pd.DataFrame, fm: dict[str, np.ndarray], version: str
) -> None:
    from feature_store.factory import open_feature_store
    from feature_store.ingest import ingest_events

    store = open_feature_store(url, timeout_s=10.0, namespace=namespace)
    try:
        await ingest_events(store, events, progress=False)
        users = sorted(fm)
        await store.write_fm_embeddings(version, users, np.stack([fm[u] for u in users]))
        await store.set_active_fm_version(version)
    finally:
        await store.aclose()


def load_into(
    url: str, namespace: str, events: pd.DataFrame, fm: dict[str, np.ndarray], version: str
) -> None:
    """Ingest events and FM embeddings into a Redis namespace (blocking)."""
    asyncio.run(_load(url, namespace, events, fm, version))


@pytest.fixture(scope="session")
def served(tiny_models: TinyModels, redis_url: str) -> ServedData:
    from exporters.bundle import load_bundle
    from exporters.fm_embed import compute_user_embeddings

    events = pd.read_parquet(tiny_models.data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
    events = events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    emb = compute_user_embeddings(load_bundle(tiny_models.fm), events, progress=False)
    users = sorted(events["user_id"].unique().tolist())
    no_fm = set(users[::NO_FM_EVERY])
    fm = {u: v for u, v in zip(emb.user_ids, emb.vectors, strict=True) if u not in no_fm}
    namespace = f"svc-{uuid.uuid4().hex[:10]}"
    load_into(redis_url, namespace, events, fm, emb.fm_version)
    items = sorted(set(events["item_id"].tolist()))
    return ServedData(
        redis_url=redis_url,
        namespace=namespace,
        events=events,
        fm_vectors=fm,
        fm_version=emb.fm_version,
        users=users,
        items=items,
        now=int(events["timestamp"].max()) + 3600,
    )


@pytest.fixture(autouse=True)
def _no_dare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from the developer's DARE_* environment."""
    for name in list(os.environ):
        if name.startswith("DARE_"):
            monkeypatch.delenv(name)


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


def copy_root(tiny_models: TinyModels, dest: Path) -> Path:
    """A private copy of the bundle root that a test may add versions to or corrupt."""
    shutil.copytree(tiny_models.root, dest)
    return dest


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
