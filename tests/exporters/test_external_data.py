"""Bundles whose graph keeps its tensors in an ONNX external data file (large catalogues)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from exporters.bundle import BundleError, load_bundle, sha256_file
from exporters.export import EXTERNAL_DATA_THRESHOLD, export_fm, export_ranker
from exporters.models import FmConfig, FoundationModel, TwoStageRanker
from exporters.offline import load_torch_model, score_offline
from tests.exporters.test_export import N_CATS, N_ITEMS, _item_ids, _ranker, _served_scores, _torch_scores
from tests.support import truncate

METRICS = {"auc": 0.5, "gauc": 0.5, "logloss": 0.7}
DATA = "ranker.onnx.data"


def _export(model: TwoStageRanker, root: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    fm_version = "fm:1" if model.cfg.fm_dim else None
    return export_ranker(model, root, model.cfg.kind, _item_ids(), 500, METRICS, fm_version, {}, threshold)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture()
def external_bundle(tmp_path: Path) -> Path:
    # a threshold of 0: any graph with weights goes to external data
    return _export(_ranker("dare"), tmp_path, threshold=0)


def test_tables_go_to_the_external_file_and_score_the_same(tmp_path: Path) -> None:
    model = _ranker("dare", fm_dim=3)
    embedded = _export(model, tmp_path / "embedded")
    external = _export(model, tmp_path / "external", threshold=1024)

    assert _manifest(embedded)["onnx"]["external_data"] == []
    assert not (embedded / DATA).exists() and DATA not in _manifest(embedded)["files"]
    m = _manifest(external)
    assert m["onnx"]["external_data"] == [DATA]
    assert m["files"][DATA] == sha256_file(external / DATA)
    assert (external / DATA).stat().st_mode == (external / "ranker.onnx").stat().st_mode
    assert m["files"]["ranker.onnx"] == sha256_file(external / "ranker.onnx")
    assert sorted(m["files"]) == sorted(p.name for p in external.iterdir() if p.name != "manifest.json")

    # the folded item table [n_items, d_r] is stored in the data file, at a path relative to the graph
    graph = onnx.load_model(external / "ranker.onnx", load_external_data=False)
    tables = [t for t in graph.graph.initializer if list(t.dims) == [N_ITEMS, 8]]
    assert len(tables) == 1 and tables[0].data_location == onnx.TensorProto.EXTERNAL
    assert {e.key: e.value for e in tables[0].external_data}["location"] == DATA
    table_bytes = N_ITEMS * 8 * 4
    assert (external / DATA).stat().st_size >= table_bytes
    graph_size, embedded_size = (
        (external / "ranker.onnx").stat().st_size,
        (embedded / "ranker.onnx").stat().st_size,
    )
    assert graph_size <= embedded_size - table_bytes
    assert m["onnx"]["initializer_bytes"] == _manifest(embedded)["onnx"]["initializer_bytes"] > table_bytes

    a, b = load_bundle(embedded), load_bundle(external)
    rng = np.random.default_rng(3)
    now = 1_700_000_000
    cand_rows = a.rows(_item_ids()[rng.integers(1, N_ITEMS, 9)])
    for length in (0, 5, 40):
        hist_rows = rng.integers(0, N_ITEMS, length)
        hist_ts = np.sort(now - rng.integers(1, 10**7, length))
        fm = rng.normal(size=3).astype(np.float32)
        want, _ = _torch_scores(model, cand_rows, hist_rows, hist_ts, now, fm, 1.0)
        got_a, attention_a, _ = _served_scores(a, cand_rows, hist_rows, hist_ts, now, fm, 1.0)
        got_b, attention_b, _ = _served_scores(b, cand_rows, hist_rows, hist_ts, now, fm, 1.0)
        np.testing.assert_array_equal(got_b, got_a)
        np.testing.assert_array_equal(attention_b, attention_a)
        np.testing.assert_allclose(got_b, want, rtol=0, atol=1e-5)
        assert np.ptp(got_b) > 1e-3


def test_threshold_is_a_strict_bound_on_initializer_bytes(tmp_path: Path) -> None:
    model = _ranker("coupled")
    size = _manifest(_export(model, tmp_path / "probe"))["onnx"]["initializer_bytes"]
    at = _export(model, tmp_path / "at", threshold=size)
    below = _export(model, tmp_path / "below", threshold=size - 1)
    assert _manifest(at)["onnx"]["external_data"] == [] and not (at / DATA).exists()
    assert _manifest(below)["onnx"]["external_data"] == [DATA] and (below / DATA).is_file()
    assert 100 * size < EXTERNAL_DATA_THRESHOLD, "tiny graphs stay self-contained by default"


def test_fm_encoder_with_external_data_matches_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cats = np.r_[0, np.arange(1, N_ITEMS) % (N_CATS - 1) + 1]
    fm = FoundationModel(FmConfig(N_ITEMS, N_CATS, dim=8, heads=2, fm_dim=5), cats).eval()
    path = export_fm(fm, tmp_path, "fm", _item_ids(), 300, METRICS, {}, external_data_threshold=0)
    assert _manifest(path)["onnx"]["external_data"] == ["user_encoder.onnx.data"]
    assert (path / "user_encoder.onnx.data").stat().st_size >= N_ITEMS * 8 * 4
    bundle = load_bundle(path)
    rng = np.random.default_rng(0)
    rows, buckets = rng.integers(0, N_ITEMS, (3, 20)), rng.integers(0, 64, (3, 20))
    mask = np.ones((3, 20), bool)
    mask[1, 7:] = False
    feeds = {"behaviors": rows, "buckets": buckets, "mask": mask.astype(np.float32)}
    got = bundle.session.run(None, feeds)[0]
    with torch.no_grad():
        want = fm.user_embedding(torch.from_numpy(rows), torch.from_numpy(buckets), torch.from_numpy(mask))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


# -- refusing a bad external data file ------------------------------------------------------------


def test_flipped_byte_in_external_data_is_refused(external_bundle: Path) -> None:
    f = external_bundle / DATA
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # still a valid float: only the checksum can tell
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"/ranker\.onnx\.data: sha256 .* \(corrupt or truncated\)"):
        load_bundle(external_bundle)


def test_truncated_external_data_is_refused(external_bundle: Path) -> None:
    truncate(external_bundle / DATA)
    with pytest.raises(BundleError, match=r"/ranker\.onnx\.data: sha256 .* \(corrupt or truncated\)"):
        load_bundle(external_bundle)
    # with a matching checksum the graph's tensors reach past the file's end: ONNX Runtime refuses it
    m = _manifest(external_bundle)
    m["files"][DATA] = sha256_file(external_bundle / DATA)
    (external_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"ranker\.onnx: ONNX Runtime cannot load it"):
        load_bundle(external_bundle)


def test_missing_external_data_is_refused(external_bundle: Path) -> None:
    (external_bundle / DATA).unlink()
    with pytest.raises(BundleError, match=r"missing file ranker\.onnx\.data"):
        load_bundle(external_bundle)


def test_external_data_unlisted_in_files_is_refused(external_bundle: Path) -> None:
    m = _manifest(external_bundle)
    del m["files"][DATA]
    (external_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"does not list required file ranker\.onnx\.data"):
        load_bundle(external_bundle)


def test_malformed_external_data_entry_is_refused(external_bundle: Path) -> None:
    m = _manifest(external_bundle)
    m["onnx"]["external_data"] = DATA  # a string, not a list of names
    (external_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"onnx\.external_data must be a list of file names"):
        load_bundle(external_bundle)


# -- served ---------------------------------------------------------------------------------------


def test_service_scores_an_external_data_bundle_as_the_offline_model(tmp_path: Path) -> None:
    """The app (in-memory feature store) on a bundle with external data gives the PyTorch scores."""
    from service.app import create_app
    from service.settings import Settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    path = _export(_ranker("dare"), tmp_path / "bundles", threshold=0)
    rng = np.random.default_rng(7)
    ids = _item_ids()
    history = ids[rng.integers(1, N_ITEMS, 30)]
    times = 1_700_000_000 + np.cumsum(rng.integers(60, 3_600, 30))
    (tmp_path / "data").mkdir()
    events = pd.DataFrame({"user_id": "u1", "item_id": history, "timestamp": times})
    events.to_parquet(tmp_path / "data" / "events.parquet")
    candidates = [int(x) for x in ids[rng.integers(1, N_ITEMS, 12)]]
    now = int(times[-1]) + 600

    settings = Settings(bundles=tmp_path / "bundles", load_events=tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/score", json={"user_id": "u1", "candidates": candidates, "timestamp": now})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["variant"] == "dare" and body["user"]["sequence_length"] == 30
    want = score_offline(load_torch_model(path), ids, history, times, np.array(candidates), now)  # type: ignore[arg-type]
    np.testing.assert_allclose(body["scores"], want, rtol=0, atol=1e-5)
