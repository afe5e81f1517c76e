"""Shared fixtures: a real redis-server per test session (override with --redis-url), tiny models
trained once per session, and their data loaded into that Redis for the service and reliability tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from feature_store.fill import fill
from tests.redis_proc import RedisProcess

if TYPE_CHECKING:
    from exporters.fm_embed import UserEmbeddings


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url", default=None, help="use this Redis instead of starting a private redis-server"
    )


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


@pytest.fixture(autouse=True)
def _no_dare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings and tracing come from the test, never from the developer's DARE_* or OTEL_* environment."""
    for name in list(os.environ):
        if name.startswith(("DARE_", "OTEL_")):
            monkeypatch.delenv(name)


@pytest.fixture()
def redis_process() -> Iterator[RedisProcess]:
    """A private redis-server that a test may stop and restart (fault tests)."""
    proc = RedisProcess().start()
    try:
        yield proc
    finally:
        proc.cleanup()


# -- tiny data and models trained once per session -------------------------------------------------

TINY_SYNTH = {"users": 150, "items": 800, "categories": 12, "max_seq_len": 300, "seed": 1}


@dataclass(frozen=True)
class TinyModels:
    """A tiny synthetic dataset and bundles trained on it in this session."""

    data: Path
    root: Path  # bundle root: ROOT/dare/1, ROOT/coupled/1 (both with FM input)
    fm: Path  # the fm bundle
    results: dict[str, dict]  # train() result per model


def train_tiny(data: Path, model: str, out: Path, **kw) -> dict:
    from exporters.train import TrainConfig, train

    sizes = {
        "epochs": 2,
        "seed": 0,
        "max_seq_len": 300,
        "attention_dim": 8,
        "representation_dim": 16,
        "top_k": 16,
        "fm_dim": 8,
        "fm_hidden": 16,
    }
    cfg = TrainConfig(data=data, model=model, out=out, progress=False, **{**sizes, **kw})
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("tiny") / "data"
    write_synth(out, SynthConfig(**TINY_SYNTH))
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    import torch

    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("bundles")
    fm = train_tiny(tiny_data, "fm", base / "fm")
    results = {"fm": fm}
    for model in ("dare", "coupled"):
        results[model] = train_tiny(tiny_data, model, base / "root", fm_bundle=Path(fm["bundle"]))
    return TinyModels(tiny_data, base / "root", Path(fm["bundle"]), results)


@dataclass(frozen=True)
class HistoryModel:
    """A tiny ranker trained with an FM history, and its train() result."""

    bundle: Path
    result: dict


@pytest.fixture(scope="session")
def tiny_history_model(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> HistoryModel:
    """`dare` with the cached FM vector and the newest 4 FM-history entries (INT4, all 8 dims)."""
    root = tmp_path_factory.mktemp("history") / "root"
    result = train_tiny(tiny_models.data, "dare", root, fm_bundle=tiny_models.fm, fm_history=4)
    return HistoryModel(Path(result["bundle"]), result)


def read_events(data: Path) -> pd.DataFrame:
    """The events table of a dataset folder, in its file order."""
    return pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id", "timestamp"])


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_models: TinyModels) -> UserEmbeddings:
    """The tiny FM bundle's embedding of every user of the tiny dataset."""
    from exporters.bundle import load_bundle
    from exporters.fm_embed import compute_user_embeddings

    return compute_user_embeddings(load_bundle(tiny_models.fm), read_events(tiny_models.data), progress=False)


@pytest.fixture(scope="session")
def tiny_fm_file(tiny_embeddings: UserEmbeddings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_embeddings` as an FM embeddings file (what `serve --fm-embeddings` loads at start-up)."""
    from exporters.fm_embed import write_embeddings_file

    path = tmp_path_factory.mktemp("tiny-fm") / "fm.parquet"
    write_embeddings_file(tiny_embeddings, path)
    return path


# -- the tiny data in the session Redis ------------------------------------------------------------

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

    def fill_copy(self, redis_url: str, prefix: str) -> str:
        """The same events and FM embeddings in a fresh namespace `prefix-xxxxxxxx`; returns it.

        For tests that append events or break Redis: `namespace` must keep its exact histories.
        """
        namespace = f"{prefix}-{uuid.uuid4().hex[:8]}"
        fill(redis_url, namespace, events=self.events, fm=self.fm_vectors, fm_version=self.fm_version)
        return namespace


@pytest.fixture(scope="session")
def served(tiny_embeddings: UserEmbeddings, tiny_models: TinyModels, redis_url: str) -> ServedData:
    """The tiny dataset's events and FM embeddings (but every NO_FM_EVERY-th user's) in a namespace
    of their own in the session Redis, so these tests never collide with other test folders there."""
    events = read_events(tiny_models.data)
    events = events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    emb = tiny_embeddings
    users = sorted(events["user_id"].unique().tolist())
    no_fm = set(users[::NO_FM_EVERY])
    fm = {u: v for u, v in zip(emb.user_ids, emb.vectors, strict=True) if u not in no_fm}
    namespace = f"svc-{uuid.uuid4().hex[:10]}"
    fill(redis_url, namespace, events=events, fm=fm, fm_version=emb.fm_version)
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
