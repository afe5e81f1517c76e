"""Training end to end on tiny synthetic data: metrics, bundles, determinism, FM embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from exporters.bundle import load_bundle
from exporters.fm_embed import compute_user_embeddings, read_embeddings_file, write_embeddings_file
from tests.conftest import TinyModels, train_tiny


def test_results_line_and_bundles(tiny_models: TinyModels) -> None:
    for model in ("dare", "coupled"):
        r = tiny_models.results[model]
        assert r["model"] == model and r["variant"] == model and r["version"] == "1"
        for key in ("auc", "gauc", "logloss"):
            assert 0.0 < r[key] < 1.5
        assert r["fm_version"] == "fm:1"
        m = r["metrics"]
        assert {"popularity", "retrieval", "fm_missing", "valid_auc"} <= set(m)
        planted, mi = m["retrieval"]["planted"], m["retrieval"]["mi_ndcg"]
        assert 0.0 <= planted["base_rate"] <= 1.0 and 0.0 <= planted["precision_at_k"] <= 1.0
        assert planted["k"] == mi["k"] == 16 and mi["n_impressions"] > 0
        att = m["attention"]
        assert 1.0 <= att["effective_behaviors"] <= att["retrieved_behaviors"] <= 16
        assert 0.0 <= att["related_retrieved"] <= 1.0 and 0.0 <= att["related_attention"] <= 1.0
        b = load_bundle(r["bundle"])
        assert b.manifest.model == model and b.manifest.fm_version == "fm:1"
        assert b.manifest.dims.attention == (8 if model == "dare" else 16)
        assert b.manifest.dims.fm == 8 and b.manifest.top_k == 16
        assert b.manifest.metrics["auc"] == pytest.approx(r["auc"])
    fm = load_bundle(tiny_models.fm)
    assert fm.manifest.model == "fm" and fm.manifest.dims.fm == 8


def test_training_is_deterministic(tiny_data: Path, tmp_path: Path) -> None:
    a = train_tiny(tiny_data, "dare", tmp_path / "a")
    b = train_tiny(tiny_data, "dare", tmp_path / "b")
    assert a["metrics"] == b["metrics"]
    ba, bb = load_bundle(a["bundle"]), load_bundle(b["bundle"])
    np.testing.assert_array_equal(ba.attention, bb.attention)
    c = train_tiny(tiny_data, "dare", tmp_path / "c", seed=5)
    assert not np.array_equal(load_bundle(c["bundle"]).attention, ba.attention)


def test_fm_embeddings_file_round_trip(tiny_models: TinyModels, tmp_path: Path) -> None:
    import pandas as pd

    events = pd.read_parquet(tiny_models.data / "events.parquet")
    emb = compute_user_embeddings(load_bundle(tiny_models.fm), events, progress=False)
    assert len(emb.user_ids) == events["user_id"].nunique() == 150
    assert emb.vectors.shape == (150, 8) and np.isfinite(emb.vectors).all()
    assert emb.fm_version == "fm:1"
    assert np.ptp(emb.vectors, axis=0).max() > 1e-3, "users should get different embeddings"
    write_embeddings_file(emb, tmp_path / "fm.parquet")
    back = read_embeddings_file(tmp_path / "fm.parquet")
    assert back.user_ids == emb.user_ids and back.fm_version == "fm:1"
    np.testing.assert_array_equal(back.vectors, emb.vectors)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "dare-serve"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_train_cli_prints_one_json_line(tiny_data: Path, tmp_path: Path) -> None:
    p = _cli(
        "train",
        "--data",
        str(tiny_data),
        "--model",
        "coupled",
        "--out",
        str(tmp_path),
        "--variant",
        "control",
        "--epochs",
        "1",
        "--representation-dim",
        "8",
        "--top-k",
        "8",
        "--recent-k",
        "3",
        "--max-seq-len",
        "100",
        "--no-progress",
    )
    assert p.returncode == 0, p.stderr
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line["variant"] == "control" and line["bundle"] == str(tmp_path / "control" / "1")
    assert 0 < line["auc"] <= 1 and "gauc" in line and "logloss" in line and line["train_seconds"] > 0
    manifest = load_bundle(line["bundle"]).manifest
    assert manifest.max_seq_len == 100 and (manifest.model_extra or {})["config"]["recent_k"] == 3


def test_train_cli_bad_input(tmp_path: Path) -> None:
    p = _cli("train", "--data", str(tmp_path / "nope"), "--model", "dare", "--out", str(tmp_path))
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
    p = _cli("train", "--data", str(tmp_path), "--model", "bert", "--out", str(tmp_path))
    assert p.returncode == 2 and "dare, coupled or fm" in p.stderr


def test_fm_embed_cli_to_file(tiny_models: TinyModels, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    p = _cli(
        "fm-embed",
        "--fm-bundle",
        str(tiny_models.fm),
        "--data",
        str(tiny_models.data),
        "--out",
        str(out),
        "--no-progress",
    )
    assert p.returncode == 0, p.stderr
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line == {**line, "fm_version": "fm:1", "users": 150, "dim": 8}
    assert read_embeddings_file(out).vectors.shape == (150, 8)


def test_fm_embed_cli_writes_under_the_serving_namespace(tiny_models: TinyModels, redis_url: str) -> None:
    import redis
    from typer.testing import CliRunner

    from service.cli import app

    args = ["fm-embed", "--fm-bundle", str(tiny_models.fm), "--data", str(tiny_models.data)]
    args += ["--redis-url", redis_url, "--no-progress"]
    by_option, by_env = f"fm-opt-{uuid.uuid4().hex[:8]}", f"fm-env-{uuid.uuid4().hex[:8]}"
    runs = {
        by_option: CliRunner().invoke(app, [*args, "--namespace", by_option]),
        # the variable `ingest` and `serve` read
        by_env: CliRunner().invoke(app, args, env={"DARE_REDIS_NAMESPACE": by_env}),
    }
    with redis.Redis.from_url(redis_url) as raw:
        for namespace, result in runs.items():
            assert result.exit_code == 0, result.output
            assert raw.get(f"{namespace}:fm:active") == b"fm:1"
            assert len(list(raw.scan_iter(match=f"{namespace}:fm:{{*", count=1000))) == 150
    bad = CliRunner().invoke(app, [*args, "--namespace", "a{b}"])
    assert bad.exit_code == 2 and "--namespace must match" in bad.output


def test_offline_model_matches_bundle_graph(tiny_models: TinyModels) -> None:
    from exporters.features import time_buckets
    from exporters.offline import load_torch_model, score_offline
    from service.core.search import knn_plain, search_keys, search_queries

    bundle = load_bundle(tiny_models.root / "dare" / "1")
    model = load_torch_model(bundle.path)
    rng = np.random.default_rng(3)
    hist_items = bundle.item_ids[rng.integers(1, len(bundle.item_ids), 50)]
    hist_ts = np.sort(1_650_000_000 - rng.integers(10, 10**7, 50))
    cands = bundle.item_ids[rng.integers(1, len(bundle.item_ids), 7)]
    now = 1_650_000_000
    fm = rng.normal(size=8).astype(np.float32)
    want = score_offline(model, bundle.item_ids, hist_items, hist_ts, cands, now, fm)
    rows, buckets = bundle.rows(hist_items), time_buckets(now - hist_ts)
    res = knn_plain(
        search_queries(bundle.search_table, bundle.rows(cands)),
        search_keys(bundle.search_table, bundle.time_bias, rows, buckets),
        16,
    )
    distinct, index = np.unique(res.positions, return_inverse=True)
    feeds = {
        "candidates": bundle.rows(cands)[None],
        "behaviors": rows[distinct][None],
        "buckets": buckets[distinct][None],
        "retrieved": index.reshape(1, 7, 16),
        "scores": res.scores[None],
        "mask": np.ones((1, 7, 16), np.float32),
        "fm": fm[None],
        "fm_present": np.ones(1, np.float32),
    }
    got = bundle.session.run(None, feeds)[0][0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_slot_is_related_against_a_loop() -> None:
    from exporters.train import slot_is_related

    rng = np.random.default_rng(0)
    n_imp, k = 7, 5
    sets = [sorted(set(rng.integers(0, 40, rng.integers(0, 6)).tolist())) for _ in range(n_imp)]
    indptr = np.r_[0, np.cumsum([len(x) for x in sets])].astype(np.int64)
    positions = np.array([p for x in sets for p in x], np.int64)
    idx = np.array([6, 0, 3, 3], np.int64)
    events = rng.integers(0, 40, (len(idx), k))
    events[1, :2] = sets[0][:2] if len(sets[0]) >= 2 else events[1, :2]
    want = np.array([[e in sets[i] for e in row] for i, row in zip(idx, events, strict=True)])
    np.testing.assert_array_equal(slot_is_related((indptr, positions), idx, events), want)


def test_short_term_branch_trains_and_is_served(tiny_data: Path, tmp_path: Path) -> None:
    r = train_tiny(tiny_data, "dare", tmp_path, recent_k=6, short_term=4, fm_bundle=None, fm_dim=0)
    bundle = load_bundle(r["bundle"])
    assert bundle.manifest.config["recent_k"] == 6 and bundle.manifest.config["short_term"] == 4
    assert 0.5 < r["auc"] < 1.0
