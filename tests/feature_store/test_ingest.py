"""Ingest: grouped, sorted, capped, idempotent; and `dare-serve ingest` end to end against Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
import redis

from feature_store.base import FeatureStore, FmStatus
from feature_store.factory import open_feature_store
from feature_store.ingest import ingest_events
from tests.feature_store.conftest import StoreFactory
from tests.feature_store.helpers import T0

DARE_SERVE = str(Path(sys.executable).with_name("dare-serve"))


def make_events(seed: int, n_users: int = 40, shuffle: bool = True) -> pd.DataFrame:
    """A canonical events table; one heavy user exceeds a 100-event cap."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, n_users)
    counts[0] = 150
    users = np.repeat([f"user-{i}" for i in range(n_users)], counts)
    # Unique timestamps per user, so the expected order does not depend on row order.
    timestamps = np.concatenate([T0 + np.sort(rng.choice(10**6, c, replace=False)) for c in counts])
    df = pd.DataFrame(
        {
            "user_id": users,
            "item_id": rng.integers(1, 10**12, users.size, dtype=np.int64),
            "category_id": rng.integers(0, 20, users.size, dtype=np.int64),
            "timestamp": timestamps.astype(np.int64),
        }
    )
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True) if shuffle else df


def expected_sequences(df: pd.DataFrame, cap: int) -> dict[str, tuple[list[int], list[int]]]:
    ordered = df.sort_values(["user_id", "timestamp"], kind="stable")
    return {
        str(u): (g["item_id"].tolist()[-cap:], g["timestamp"].tolist()[-cap:])
        for u, g in ordered.groupby("user_id", sort=False)
    }


async def read_all(store: FeatureStore, users: list[str]) -> dict[str, tuple[list[int], list[int]]]:
    feats = await store.read_users(users)
    return {f.user_id: (f.sequence.items.tolist(), f.sequence.timestamps.tolist()) for f in feats}


@pytest.mark.asyncio(loop_scope="session")
async def test_ingest_groups_sorts_caps_and_is_idempotent(make_store: StoreFactory) -> None:
    store = make_store(max_len=100)
    df = make_events(seed=1)
    users = sorted(df["user_id"].unique().tolist())
    stats = await ingest_events(store, df, batch_users=7, progress=False)
    assert (stats.events, stats.users) == (len(df), len(users))
    assert stats.seconds > 0 and stats.events_per_s == pytest.approx(stats.events / stats.seconds)
    first = await read_all(store, users)
    assert first == expected_sequences(df, cap=100)
    assert len(first["user-0"][0]) == 100
    # Live appends in between are replaced, not added to, by the second run.
    await store.append_events("user-3", np.array([1, 2]), np.array([T0, T0 + 1]))
    await ingest_events(store, df, batch_users=13, progress=False)
    assert await read_all(store, users) == first
    (feat,) = await store.read_users(["user-3"])
    assert feat.fm.status is FmStatus.MISS


@pytest.mark.asyncio(loop_scope="session")
async def test_ingest_of_nothing_and_of_a_bad_table(store: FeatureStore) -> None:
    empty = make_events(seed=2).iloc[:0]
    stats = await ingest_events(store, empty, progress=False)
    assert (stats.events, stats.users) == (0, 0)
    with pytest.raises(ValueError, match="item_id"):
        await ingest_events(store, pd.DataFrame({"user_id": ["a"], "timestamp": [T0]}), progress=False)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_REDIS")}
    return subprocess.run([DARE_SERVE, "ingest", *args], capture_output=True, text=True, env=env, timeout=120)


def snapshot(url: str, namespace: str) -> dict[bytes, bytes]:
    with redis.Redis.from_url(url) as raw:
        return {key: raw.get(key) for key in raw.scan_iter(match=f"{namespace}:*", count=1000)}


@pytest.mark.asyncio(loop_scope="session")
async def test_cli_ingest_end_to_end_is_idempotent(tmp_path: Path, redis_url: str, namespace: str) -> None:
    df = make_events(seed=3, n_users=60, shuffle=False).sort_values(["user_id", "timestamp"], kind="stable")
    df.to_parquet(tmp_path / "events.parquet", index=False)
    args = ("--data", str(tmp_path), "--redis-url", redis_url, "--namespace", namespace)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    line = orjson.loads(first.stdout.strip().splitlines()[-1])
    assert set(line) == {"events", "users", "seconds", "events_per_s"}
    assert (line["events"], line["users"]) == (len(df), 60) and line["events_per_s"] > 0
    assert "ingest" in first.stderr  # the progress bar
    state = snapshot(redis_url, namespace)
    assert len(state) == 60

    with redis.Redis.from_url(redis_url) as raw:  # drift that a rerun must undo
        raw.append(f"{namespace}:seq:{{user-5}}", b"\x00" * 12)
    second = run_cli(*args, "--no-progress")
    assert second.returncode == 0, second.stderr
    assert snapshot(redis_url, namespace) == state

    store = open_feature_store(redis_url, namespace=namespace)
    try:
        users = [f"user-{i}" for i in range(60)]
        assert await read_all(store, users) == expected_sequences(df, cap=10_000)
    finally:
        await store.aclose()


def test_cli_ingest_without_a_redis_url_exits_2(tmp_path: Path) -> None:
    make_events(seed=4, n_users=3).to_parquet(tmp_path / "events.parquet", index=False)
    result = run_cli("--data", str(tmp_path))
    assert result.returncode == 2
    assert "DARE_REDIS_URL" in result.stderr and result.stdout == ""


def test_cli_ingest_without_events_exits_2(tmp_path: Path, redis_url: str) -> None:
    result = run_cli("--data", str(tmp_path / "nowhere"), "--redis-url", redis_url)
    assert result.returncode == 2
    assert "events.parquet" in result.stderr


def test_cli_ingest_refuses_values_the_layout_cannot_hold(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    df = make_events(seed=5, n_users=3, shuffle=False)
    df.loc[1, "timestamp"] = -5
    df.to_parquet(tmp_path / "events.parquet", index=False)
    result = run_cli("--data", str(tmp_path), "--redis-url", redis_url, "--namespace", namespace)
    assert result.returncode == 2
    assert "timestamps must be seconds" in result.stderr and result.stdout == ""
