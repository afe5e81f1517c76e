"""The FM-history branch of the ranker: the exported graph against PyTorch, padding, masking, refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporters.bundle import BundleError, load_bundle
from exporters.export import export_ranker
from exporters.features import time_buckets
from exporters.models import RankerConfig, TwoStageRanker
from service.core.search import knn_plain, search_keys, search_queries

N_ITEMS, N_CATS, K, L, D = 50, 5, 6, 5, 3
NOW = 1_700_000_000


def _ranker(kind: str, fm_dim: int = 0, **options: Any) -> TwoStageRanker:
    torch.manual_seed(0)
    cats = np.r_[0, np.arange(1, N_ITEMS) % (N_CATS - 1) + 1].astype(np.int64)
    cfg = RankerConfig(
        kind, N_ITEMS, N_CATS, 4, 8, K, fm_dim, (16, 8), fm_history=L, fm_history_dim=D, **options
    )
    model = TwoStageRanker(cfg, cats)
    with torch.no_grad():  # spread the untrained weights so that every input moves the scores
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _spec(**changes: Any) -> dict[str, Any]:
    spec = {
        "length": L,
        "dim": D,
        "fm_version": "fm:1",
        "encoder_version": "pca-x",
        "encoding": "int4",
        "lag_s": 0,
    }
    return spec | changes


def _export(model: TwoStageRanker, root: Path) -> Path:
    item_ids = np.r_[-1, 1000 + np.arange(1, N_ITEMS)].astype(np.int64)
    metrics = {"auc": 0.5, "gauc": 0.5, "logloss": 0.7}
    fm_version = "fm:1" if model.cfg.fm_dim else None
    return export_ranker(
        model, root, model.cfg.kind, item_ids, 100, metrics, fm_version, {}, fm_history=_spec()
    )


def _torch_probs(model, cand_rows, hist_rows, hist_ts, entries, fm=None):
    """Both stages in PyTorch for one user, the candidates as the batch (entries repeated per row)."""
    c, n = len(cand_rows), len(hist_rows)
    width = max(n, 1)
    rows = np.zeros((c, width), np.int64)
    buckets = np.zeros((c, width), np.int64)
    mask = np.zeros((c, width), bool)
    rows[:, :n], buckets[:, :n], mask[:, :n] = hist_rows, time_buckets(NOW - hist_ts), True
    h = max(len(entries), 1)
    hist = np.zeros((c, h, D), np.float32)
    hist_mask = np.zeros((c, h), np.float32)
    hist[:, : len(entries)], hist_mask[:, : len(entries)] = entries, 1.0
    fm_args = () if fm is None else (torch.from_numpy(np.repeat(fm[None], c, 0)), torch.ones(c))
    with torch.no_grad():
        logit, _ = model(
            *(torch.from_numpy(a) for a in (cand_rows, rows, buckets, mask)),
            *(fm_args or (None, None)),
            torch.from_numpy(hist),
            torch.from_numpy(hist_mask),
        )
    return torch.sigmoid(logit).numpy()


def _feeds(bundle, cand_rows, hist_rows, hist_ts, entries, width: int, fm=None) -> dict[str, np.ndarray]:
    """One request's graph feeds, its entries padded to `width`."""
    buckets = time_buckets(NOW - hist_ts)
    c = len(cand_rows)
    retrieved = np.zeros((1, c, K), np.int64)
    scores = np.zeros((1, c, K), np.float32)
    mask = np.zeros((1, c, K), np.float32)
    behaviors, beh_buckets = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
    if len(hist_rows):
        res = knn_plain(
            search_queries(bundle.search_table, cand_rows),
            search_keys(bundle.search_table, bundle.time_bias, hist_rows, buckets),
            K,
        )
        k = res.positions.shape[1]
        retrieved[0, :, :k], scores[0, :, :k], mask[0, :, :k] = res.positions, res.scores, 1.0
        behaviors, beh_buckets = hist_rows[None], buckets[None]
    hist = np.zeros((1, width, D), np.float32)
    hist_mask = np.zeros((1, width), np.float32)
    hist[0, : len(entries)], hist_mask[0, : len(entries)] = entries, 1.0
    feeds = {
        "candidates": cand_rows[None],
        "behaviors": behaviors,
        "buckets": beh_buckets,
        "retrieved": retrieved,
        "scores": scores,
        "mask": mask,
        "fm_history": hist,
        "fm_history_mask": hist_mask,
    }
    if fm is not None:
        feeds |= {"fm": fm[None], "fm_present": np.ones(1, np.float32)}
    return feeds


@pytest.mark.parametrize(
    ("kind", "fm_dim", "options"),
    [("dare", 0, {}), ("coupled", 3, {}), ("dare", 3, {"recency_prior": 1.0, "stage2_gain": True})],
)
def test_graph_matches_pytorch_with_and_without_entries(
    tmp_path: Path, kind: str, fm_dim: int, options: dict[str, Any]
) -> None:
    model = _ranker(kind, fm_dim, **options)
    bundle = load_bundle(_export(model, tmp_path))
    assert bundle.manifest.fm_history is not None and bundle.manifest.fm_history.dim == D
    names = [i.name for i in bundle.session.get_inputs()]
    assert names[-2:] == ["fm_history", "fm_history_mask"]
    rng = np.random.default_rng(2)
    cand_rows = rng.integers(1, N_ITEMS, 7)
    fm = rng.normal(size=fm_dim).astype(np.float32) if fm_dim else None
    spread = []
    for n_hist in (0, 4, 3 * K):
        hist_rows = rng.integers(1, N_ITEMS, n_hist)
        hist_ts = np.sort(NOW - rng.integers(10, 10**6, n_hist))
        for n_entries in (0, 1, L):
            entries = rng.normal(size=(n_entries, D)).astype(np.float32)
            want = _torch_probs(model, cand_rows, hist_rows, hist_ts, entries, fm)
            for width in (max(n_entries, 1), L + 3):  # padded entries change nothing
                got = bundle.session.run(
                    None, _feeds(bundle, cand_rows, hist_rows, hist_ts, entries, width, fm)
                )[0]
                np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
            spread.append(want)
    # the entries move the scores (else the branch would be dead weight)
    assert np.abs(spread[1] - spread[0]).max() > 1e-3


def test_requests_with_different_entry_counts_batch_as_they_score_alone(tmp_path: Path) -> None:
    model = _ranker("dare")
    bundle = load_bundle(_export(model, tmp_path))
    rng = np.random.default_rng(4)
    cands = rng.integers(1, N_ITEMS, 4)
    hist_rows, hist_ts = rng.integers(1, N_ITEMS, 10), np.sort(NOW - rng.integers(10, 10**5, 10))
    alone, feeds = [], []
    for n in (0, 2, L):
        entries = rng.normal(size=(n, D)).astype(np.float32)
        alone.append(
            bundle.session.run(None, _feeds(bundle, cands, hist_rows, hist_ts, entries, max(n, 1)))[0]
        )
        feeds.append(_feeds(bundle, cands, hist_rows, hist_ts, entries, L))
    batch = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    together = bundle.session.run(None, batch)[0]
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=0, atol=1e-6)
    # a masked entry's values are never read
    noisy = batch | {
        "fm_history": np.where(batch["fm_history_mask"][..., None] > 0, batch["fm_history"], 1e6)
    }
    np.testing.assert_array_equal(bundle.session.run(None, noisy)[0], together)


def test_a_bundle_without_its_history_inputs_is_refused(tmp_path: Path) -> None:
    path = _export(_ranker("dare"), tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fm_history"]["dim"] = D + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ONNX input fm_history"):
        load_bundle(path)
    del manifest["fm_history"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ONNX inputs"):
        load_bundle(path)


def test_config_and_export_refuse_half_a_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fm_history and fm_history_dim"):
        RankerConfig("dare", N_ITEMS, N_CATS, fm_history=4)
    item_ids = np.r_[-1, 1000 + np.arange(1, N_ITEMS)].astype(np.int64)
    with pytest.raises(ValueError, match="fm_history section"):
        export_ranker(_ranker("dare"), tmp_path, "dare", item_ids, 100, {}, None, {})


def test_missing_entries_in_pytorch_read_as_none() -> None:
    model = _ranker("dare")
    rows = torch.randint(1, N_ITEMS, (3,))
    beh = torch.randint(1, N_ITEMS, (3, K))
    buckets = torch.zeros(3, K, dtype=torch.long)
    mask = torch.ones(3, K, dtype=torch.bool)
    with torch.no_grad():
        none, _ = model.stage2(rows, beh, buckets, mask)
        empty, _ = model.stage2(rows, beh, buckets, mask, None, None, torch.ones(3, 2, D), torch.zeros(3, 2))
    torch.testing.assert_close(none, empty, rtol=0, atol=0)
