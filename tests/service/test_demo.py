"""The one-command demo, at tiny sizes: builds, serves, passes its own smoke test, reuses its work."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis

from service import demo
from service.process import free_port


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
