"""Bad bundles under load: every broken version is refused and logged, the old one keeps serving.

A real server scores both variants with eight clients while `/admin/reload` is offered one broken
`dare` version after another: truncated ONNX (with and without a matching checksum), a wrong
checksum, dimensions that do not match the manifest, a missing file or manifest, a manifest that is
not JSON, an FM bundle in a ranker's place, and three ways of pointing outside the bundle root.
Each reload answers 409 naming the reason, the server log says `refused bundle`, and not one score
request fails or changes its answer; a good version afterwards loads and serves.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from exporters.bundle import sha256_file
from service.process import ServeProcess
from tests.conftest import ServedData, TinyModels
from tests.reliability.harness import (
    ADMIN_TOKEN,
    Call,
    Load,
    Record,
    bad_answers,
    latency_ms,
    problem_issue,
    server_process,
    statuses,
    write_artifact,
)
from tests.support import add_version, truncate

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Env:
    server: ServeProcess
    root: Path
    outside: Path  # a folder next to the bundle root, never inside it
    models: TinyModels
    served: ServedData


@pytest.fixture(scope="module")
def env(
    served: ServedData, redis_url: str, tiny_models: TinyModels, bundle_root: Path, workdir: Path
) -> Iterator[Env]:
    namespace = served.fill_copy(redis_url, "bundles")
    outside = workdir / "outside"
    outside.mkdir()
    server = server_process(
        workdir, bundle_root, redis_url, redis_namespace=namespace, admin_token=ADMIN_TOKEN
    ).start()
    try:
        yield Env(server, bundle_root, outside, tiny_models, served)
    finally:
        server.stop()


def rewrite_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def rehash(bundle: Path, name: str) -> None:
    """Make the manifest's checksum match the file again, so a later check has to catch it."""
    rewrite_manifest(bundle, lambda m: m["files"].__setitem__(name, sha256_file(bundle / name)))


def dare_copy(env: Env, version: int) -> Path:
    return add_version(env.root, env.models.root / "dare" / "1", "dare", version)


def truncated_onnx(env: Env, v: int) -> None:
    truncate(dare_copy(env, v) / "ranker.onnx")


def truncated_onnx_rehashed(env: Env, v: int) -> None:
    bundle = dare_copy(env, v)
    truncate(bundle / "ranker.onnx")
    rehash(bundle, "ranker.onnx")


def wrong_checksum(env: Env, v: int) -> None:
    rewrite_manifest(dare_copy(env, v), lambda m: m["files"].__setitem__("attention.faiss", "0" * 64))


def attention_dim_mismatch(env: Env, v: int) -> None:
    # the coupled bundle's index (16-d) in a dare bundle whose manifest says 8-d
    bundle = dare_copy(env, v)
    shutil.copy(env.models.root / "coupled" / "1" / "attention.faiss", bundle / "attention.faiss")
    rehash(bundle, "attention.faiss")


def fm_dim_mismatch(env: Env, v: int) -> None:
    rewrite_manifest(dare_copy(env, v), lambda m: m["dims"].__setitem__("fm", m["dims"]["fm"] // 2))


def missing_file(env: Env, v: int) -> None:
    (dare_copy(env, v) / "time_bias.npy").unlink()


def missing_manifest(env: Env, v: int) -> None:
    (dare_copy(env, v) / "manifest.json").unlink()


def manifest_not_json(env: Env, v: int) -> None:
    (dare_copy(env, v) / "manifest.json").write_text('{"format_version": 1, ')


def fm_bundle_as_ranker(env: Env, v: int) -> None:
    add_version(env.root, env.models.fm, "dare", v)


def manifest_path_escape(env: Env, v: int) -> None:
    bundle = dare_copy(env, v)
    target = env.outside / f"escape-{v}.npy"
    shutil.copy(bundle / "time_bias.npy", target)
    name = os.path.relpath(target, bundle)  # ../../../../<run>/outside/escape-<v>.npy
    rewrite_manifest(bundle, lambda m: m["files"].__setitem__(name, sha256_file(target)))


def symlinked_file_outside(env: Env, v: int) -> None:
    # a byte-identical file, so only the location is wrong
    bundle = dare_copy(env, v)
    target = env.outside / f"item_ids-{v}.npy"
    shutil.move(bundle / "item_ids.npy", target)
    (bundle / "item_ids.npy").symlink_to(target)


def symlinked_version_outside(env: Env, v: int) -> None:
    # a complete, valid bundle, but it lives outside the root and is linked in
    staging = env.outside / "root"
    (staging / "dare").mkdir(parents=True, exist_ok=True)
    real = add_version(staging, env.models.root / "dare" / "1", "dare", v)
    (env.root / "dare" / str(v)).symlink_to(real, target_is_directory=True)


BAD_BUNDLES: list[tuple[str, Callable[[Env, int], None], str]] = [
    ("truncated-onnx", truncated_onnx, "sha256"),
    ("truncated-onnx-matching-checksum", truncated_onnx_rehashed, "ONNX Runtime cannot load"),
    ("wrong-checksum", wrong_checksum, "does not match the manifest"),
    ("attention-dim-mismatch", attention_dim_mismatch, "attention.faiss: expected an inner-product index"),
    ("fm-dim-mismatch", fm_dim_mismatch, "ONNX input fm"),
    ("missing-file", missing_file, "missing file time_bias.npy"),
    ("missing-manifest", missing_manifest, "no manifest.json"),
    ("manifest-not-json", manifest_not_json, "invalid manifest"),
    ("fm-bundle-as-ranker", fm_bundle_as_ranker, "not a ranker"),
    ("manifest-path-escape", manifest_path_escape, "escapes the bundle folder"),
    ("symlinked-file-outside-root", symlinked_file_outside, "escapes the bundle folder"),
    ("symlinked-version-outside-root", symlinked_version_outside, "outside the bundle root"),
]


def test_bad_bundles_are_refused_under_load(env: Env) -> None:
    served = env.served
    body = {"user_id": served.fm_users[0], "candidates": served.items[:30], "timestamp": served.now}

    def calls(worker: int, i: int) -> Call:
        variant = ("dare", "coupled")[worker % 2]
        return Call("POST", "/v1/score", variant, json=body, headers={"X-Experiment": variant})

    with httpx.Client(base_url=env.server.base, timeout=30) as admin:
        reference = {
            v: admin.post("/v1/score", json=body, headers={"X-Experiment": v}).json()["scores"]
            for v in ("dare", "coupled")
        }
        attempts: list[dict] = []
        with Load(env.server.base, calls, workers=8, max_per_worker=3000, pause_s=0.005) as load:
            load.wait_for(40)
            for version, (name, make, reason) in enumerate(BAD_BUNDLES, start=2):
                make(env, version)
                before = load.count()
                r = admin.post("/admin/reload", headers=AUTH)
                rec = Record(Call("POST", "/admin/reload", "reload"), r.status_code, 0, 0,
                             {k.lower(): v for k, v in r.headers.items()}, r.content)  # fmt: skip
                assert problem_issue(rec, 409) is None, (name, r.status_code, r.text[:500])
                refused = r.json()["refused"]
                assert [(x["variant"], x["version"]) for x in refused] == [("dare", str(version))], refused
                assert reason in refused[0]["reason"], (name, refused[0]["reason"])
                assert r.json()["serving"] == {"dare": "1", "coupled": "1"}
                load.wait_for(10)  # traffic kept flowing across the attempt
                attempts.append({"bundle": name, "status": r.status_code, "reason": refused[0]["reason"],
                                 "score_requests_during": load.count() - before})  # fmt: skip
                remove_version(env.root / "dare" / str(version))
            good = len(BAD_BUNDLES) + 2
            add_version(env.root, env.models.root / "dare" / "1", "dare", good)
            r = admin.post("/admin/reload", headers=AUTH)
            assert r.status_code == 200 and r.json()["serving"] == {"dare": str(good), "coupled": "1"}, r.text
            t_swapped = time.monotonic()
            load.wait_for(40, lambda rec: rec.started > t_swapped)
        models = {m["variant"]: m["version"] for m in admin.get("/v1/models").json()["variants"]}
        assert models == {"dare": str(good), "coupled": "1"}

    records = load.snapshot()
    assert not bad_answers(records, {200}), bad_answers(records, {200})[:5]
    for rec in records:
        # the good version is a copy of version 1: same answers, so any mix-up would show
        assert rec.json()["scores"] == reference[rec.call.tag]
    dare_versions = {rec.headers["x-model-version"] for rec in records if rec.call.tag == "dare"}
    assert dare_versions == {"1", str(good)}
    log = env.server.log_text()
    for version, (name, _, _) in enumerate(BAD_BUNDLES, start=2):
        assert f"refused bundle dare/{version}:" in log, f"{name} was not logged"
    assert "Traceback" not in log

    write_artifact(
        "bad-bundles",
        category="bad bundle",
        fault="; ".join(name for name, _, _ in BAD_BUNDLES),
        attempts=attempts,
        requests=len(records) + len(BAD_BUNDLES) + 1,
        statuses=statuses(records),
        statuses_by_endpoint={
            "score": statuses(records),
            "admin/reload": {"409": len(BAD_BUNDLES), "200": 1},
        },
        latency_ms=latency_ms(records),
        lost=0,
    )


def remove_version(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)
