"""The one-command demo, at tiny sizes: builds, serves, passes its own smoke test, reuses its work."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from exporters.features import time_buckets
from service import demo
from service.app import create_app
from service.process import free_port
from tests.service.conftest import TestClient


@pytest.fixture()
def tiny_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        demo, "DEMO_DATA", {"users": 120, "items": 600, "categories": 10, "max_seq_len": 200, "seed": 7}
    )
    monkeypatch.setattr(
        demo,
        "DEMO_TRAIN",
        {
            "epochs": 1,
            "seed": 0,
            "max_seq_len": 200,
            "patience": 1,
            "attention_dim": 8,
            "representation_dim": 16,
            "top_k": 16,
            "fm_dim": 8,
            "fm_hidden": 16,
        },
    )


def test_demo_smoke_passes_and_rerun_reuses(
    tiny_demo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "demo"
    t0 = time.time()
    assert demo.run_demo(work, "127.0.0.1", free_port(), None, smoke=True) == 0
    first = time.time() - t0
    out = capsys.readouterr().out
    assert "smoke passed" in out and "FAIL" not in out
    assert "curl -s http://127.0.0.1:" in out and "/docs" in out
    bundles = sorted(p.relative_to(work) for p in work.glob("*/*/*/manifest.json"))
    assert [str(p) for p in bundles] == [
        "bundles/coupled/1/manifest.json",
        "bundles/dare/1/manifest.json",
        "fm/fm/1/manifest.json",
    ]
    t1 = time.time()
    assert demo.run_demo(work, "127.0.0.1", free_port(), None, smoke=True) == 0
    assert time.time() - t1 < first, "the second run reuses data, bundles and embeddings"
    assert sorted(p.relative_to(work) for p in work.glob("*/*/*/manifest.json")) == bundles


def test_demo_on_redis(
    tiny_demo: None,
    tmp_path: Path,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server reads DARE_REDIS_NAMESPACE: the demo must fill the store under the same one.
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DARE_REDIS_NAMESPACE", namespace)
    assert demo.run_demo(tmp_path / "demo", "127.0.0.1", free_port(), redis_url, smoke=True) == 0
    assert "smoke passed" in capsys.readouterr().out
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.get(f"{namespace}:fm:active") == b"fm:1"
        assert len(list(raw.scan_iter(match=f"{namespace}:seq:{{*", count=1000))) >= 120


def test_demo_serves_the_ages_a_live_system_shows(tiny_demo: None, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    built = demo.build(work, progress=False)
    generated = pd.read_parquet(built.data / "events.parquet")
    span = int(generated["timestamp"].max() - generated["timestamp"].min())
    latest = str(generated.loc[generated["timestamp"].idxmax(), "user_id"])
    history = generated[generated["user_id"] == latest]
    started = int(time.time())
    served, settings = demo.prepare_serving(built, work, None)
    # the generated dataset keeps its clock (same seed, same files): only what is served moves
    assert pd.read_parquet(built.data / "events.parquet").equals(generated)
    with TestClient(create_app(settings)) as c:
        events = c.get(f"/v1/users/{latest}/sequence").json()["events"]
        body = {"user_id": latest, "candidates": history["item_id"].tail(3).tolist(), "explain": True}
        r = c.post("/v1/score", json=body, headers={"X-Experiment": "dare"})
        scored_by = int(time.time()) + 1
    gaps = np.diff(history["timestamp"].to_numpy())
    assert len(events) == len(history) and np.diff([e["timestamp"] for e in events]).tolist() == gaps.tolist()
    assert started <= events[-1]["timestamp"] <= scored_by, "the newest behavior lies at start-up"
    assert r.status_code == 200, r.text
    ages = np.array([scored_by - b["timestamp"] for cand in r.json()["explain"] for b in cand["behaviors"]])
    assert len(ages) > 0 and ages.min() >= 0 and ages.max() <= span + (scored_by - started)
    # Training saw gaps up to the data's span; at the generator's own clock, today, every behavior
    # was years old, in buckets no impression of the training data had.
    buckets = time_buckets(ages)
    assert buckets.max() <= time_buckets(np.array([span + 60]))[0]
    stale = started - generated["timestamp"].to_numpy()
    assert time_buckets(stale).min() > buckets.max()
