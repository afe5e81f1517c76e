"""Model lifecycle: the newest valid version serves, swaps are atomic under load, bad bundles are refused."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from tests.conftest import ServedData, TinyModels
from tests.service.conftest import ADMIN_TOKEN, SettingsFactory, TestClient, is_problem
from tests.support import add_version, copy_root, truncate

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Load:
    """Background threads scoring one fixed request until stopped; records (version, scores, status)."""

    def __init__(self, client: TestClient, body: dict[str, Any], threads: int = 4) -> None:
        self.client, self.body = client, body
        self.results: list[tuple[int, str | None, list[float] | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = self.client.post("/v1/score", json=self.body, headers={"X-Experiment": "dare"})
            ok = r.status_code == 200
            self.results.append(
                (r.status_code, r.headers.get("x-model-version"), r.json()["scores"] if ok else None)
            )

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.results) + n
        while len(self.results) < target and time.monotonic() < deadline:
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_reload_swaps_atomically_under_load(
    tmp_path: Path, tiny_models: TinyModels, make_settings: SettingsFactory, served: ServedData
) -> None:
    root = copy_root(tiny_models.root, tmp_path / "root")
    body = {"user_id": served.fm_users[0], "candidates": served.items[:40], "timestamp": served.now}
    settings = make_settings(bundles=root, admin_token=ADMIN_TOKEN, batch_max_wait_ms=2.0)
    with TestClient(create_app(settings)) as c:
        reference = {"1": c.post("/v1/score", json=body, headers={"X-Experiment": "dare"}).json()["scores"]}
        with Load(c, body) as load:
            load.wait_for(20)
            # version 2 of "dare" is a different model (the coupled one): mixing would show
            add_version(root, tiny_models.root / "coupled" / "1", "dare", 2)
            r = c.post("/admin/reload", headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["changed"] and r.json()["serving"] == {"dare": "2", "coupled": "1"}
            load.wait_for(20)
            # a truncated version 3 is refused; version 2 keeps serving
            v3 = add_version(root, tiny_models.root / "dare" / "1", "dare", 3)
            truncate(v3 / "ranker.onnx")
            r = c.post("/admin/reload", headers=AUTH)
            assert is_problem(r, 409), r.text
            assert r.json()["serving"]["dare"] == "2"
            assert (
                r.json()["refused"][0]["version"] == "3" and "ranker.onnx" in r.json()["refused"][0]["reason"]
            )
            load.wait_for(20)
        reference["2"] = c.post("/v1/score", json=body, headers={"X-Experiment": "dare"}).json()["scores"]
        assert reference["1"] != reference["2"]
        assert c.get("/readyz").status_code == 200
        models = {m["variant"]: m["version"] for m in c.get("/v1/models").json()["variants"]}
        assert models == {"dare": "2", "coupled": "1"}
    statuses = {status for status, _, _ in load.results}
    assert statuses == {200}, "no request failed during the swaps"
    versions = [v for _, v, _ in load.results]
    assert set(versions) == {"1", "2"} and versions.index("2") < len(versions) - 1
    for _, version, scores in load.results:
        assert scores == reference[version], "a request mixed two versions"


def test_corrupt_index_is_refused_and_previous_keeps_serving(
    tmp_path: Path, tiny_models: TinyModels, make_settings: SettingsFactory, served: ServedData
) -> None:
    root = copy_root(tiny_models.root, tmp_path / "root")
    with TestClient(create_app(make_settings(bundles=root, admin_token=ADMIN_TOKEN))) as c:
        v2 = add_version(root, tiny_models.root / "dare" / "1", "dare", 2)
        data = bytearray((v2 / "attention.faiss").read_bytes())
        data[-7] ^= 0xFF
        (v2 / "attention.faiss").write_bytes(bytes(data))
        r = c.post("/admin/reload", headers=AUTH)
        assert is_problem(r, 409) and "attention.faiss" in r.json()["detail"]
        r = c.post("/v1/score", json={"user_id": "u", "candidates": [1]}, headers={"X-Experiment": "dare"})
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        # repaired in place: the next reload notices the change and loads it
        shutil.rmtree(v2)
        add_version(root, tiny_models.root / "dare" / "1", "dare", 2)
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["serving"]["dare"] == "2"


def test_startup_skips_invalid_newest_versions(
    tmp_path: Path,
    tiny_models: TinyModels,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = copy_root(tiny_models.root, tmp_path / "root")
    truncate(add_version(root, tiny_models.root / "dare" / "1", "dare", 2) / "attention.faiss")
    mislabeled = root / "dare" / "3"
    shutil.copytree(tiny_models.root / "dare" / "1", mislabeled)  # manifest still says version 1
    (root / "not a variant!").mkdir()
    with (
        caplog.at_level(logging.INFO, logger="dare.service"),
        TestClient(create_app(make_settings(bundles=root))) as c,
    ):
        r = c.post("/v1/score", json={"user_id": "u", "candidates": [1]}, headers={"X-Experiment": "dare"})
        assert r.headers["x-model-version"] == "1"
    refused = [rec.getMessage() for rec in caplog.records if "refused bundle" in rec.getMessage()]
    assert any("dare/2" in m and "sha256" in m for m in refused)
    assert any("dare/3" in m and "manifest says dare/1" in m for m in refused)


def test_directory_watch_loads_new_versions(
    tmp_path: Path, tiny_models: TinyModels, make_settings: SettingsFactory
) -> None:
    root = copy_root(tiny_models.root, tmp_path / "root")
    settings = make_settings(bundles=root, watch_bundles=True, watch_interval_s=0.05)
    with TestClient(create_app(settings)) as c:
        add_version(root, tiny_models.root / "coupled" / "1", "coupled", 2)
        deadline, version = time.monotonic() + 15, "1"
        while version != "2" and time.monotonic() < deadline:
            r = c.post(
                "/v1/score", json={"user_id": "u", "candidates": [1]}, headers={"X-Experiment": "coupled"}
            )
            version = r.headers["x-model-version"]
            time.sleep(0.05)
        assert version == "2"
        text = c.get("/metrics").text
        assert 'dare_model_reloads_total{outcome="loaded",variant="coupled"}' in text
        assert 'dare_model_info{model="coupled",variant="coupled",version="2"} 1.0' in text
        assert 'version="1",model="coupled"' not in text and 'variant="coupled",version="1"' not in text


@pytest.fixture(scope="module")
def admin_client(make_settings: SettingsFactory) -> TestClient:
    with TestClient(create_app(make_settings(admin_token=ADMIN_TOKEN))) as c:
        yield c


@pytest.mark.parametrize(
    "headers,status",
    [
        ({}, 401),
        ({"Authorization": ADMIN_TOKEN}, 401),
        ({"Authorization": f"Token {ADMIN_TOKEN}"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Bearer wrong-token-0123456789"}, 403),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 403),
        ({"Authorization": f"bearer {ADMIN_TOKEN}"}, 200),
        (AUTH, 200),
    ],
)
def test_admin_token(admin_client: TestClient, headers: dict[str, str], status: int) -> None:
    r = admin_client.post("/admin/reload", headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert is_problem(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
    if status == 200:
        assert r.json() == {
            "changed": False,
            "loaded": [],
            "refused": [],
            "serving": {"coupled": "1", "dare": "1"},
        }


def test_admin_disabled_without_token(client: TestClient) -> None:
    assert is_problem(client.post("/admin/reload", headers=AUTH), 404)
