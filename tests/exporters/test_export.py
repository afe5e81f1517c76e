"""ONNX + FAISS bundles against the PyTorch model they came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporters.bundle import Bundle, BundleError, Manifest, load_bundle, sha256_file
from exporters.export import export_fm, export_ranker
from exporters.features import time_buckets
from exporters.models import FmConfig, FoundationModel, RankerConfig, TwoStageRanker
from exporters.offline import load_torch_model
from service.core.pipeline import ScoringModel, prepare_job, recent_k_of, score_jobs
from service.core.search import knn_plain, search_keys, search_queries

N_ITEMS, N_CATS, K = 60, 6, 8


def _ranker(kind: str, fm_dim: int = 0, seed: int = 0, **options: Any) -> TwoStageRanker:
    torch.manual_seed(seed)
    cats = np.r_[0, np.arange(1, N_ITEMS) % (N_CATS - 1) + 1].astype(np.int64)
    model = TwoStageRanker(RankerConfig(kind, N_ITEMS, N_CATS, 4, 8, K, fm_dim, (16, 8), **options), cats)
    with torch.no_grad():  # untrained weights give near-constant scores; spread them out
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _item_ids() -> np.ndarray:
    return np.r_[-1, 1000 + 7 * np.arange(1, N_ITEMS)].astype(np.int64)


def _export(model: TwoStageRanker, root: Path) -> Path:
    return export_ranker(
        model,
        root,
        model.cfg.kind,
        _item_ids(),
        500,
        {"auc": 0.5, "gauc": 0.5, "logloss": 0.7},
        "fm:1" if model.cfg.fm_dim else None,
        {},
    )


def _torch_scores(model: TwoStageRanker, cand_rows, hist_rows, hist_ts, now, fm=None, present=None):
    """Both stages in PyTorch for one user, candidates as the batch."""
    c, length = len(cand_rows), len(hist_rows)
    width = max(length, 1)
    rows = np.zeros((c, width), np.int64)
    buckets = np.zeros((c, width), np.int64)
    mask = np.zeros((c, width), bool)
    rows[:, :length] = hist_rows
    buckets[:, :length] = time_buckets(now - hist_ts)
    mask[:, :length] = True
    fm_t = present_t = None
    if fm is not None:
        fm_t = torch.from_numpy(np.repeat(fm[None], c, 0))
        present_t = torch.full((c,), float(present))
    with torch.no_grad():
        logit, top = model(
            torch.from_numpy(cand_rows),
            torch.from_numpy(rows),
            torch.from_numpy(buckets),
            torch.from_numpy(mask),
            fm_t,
            present_t,
        )
    return torch.sigmoid(logit).numpy(), top.numpy()


def _stage2_feeds(cand_rows, hist_rows, buckets, positions, scores, fm=None, present=None):
    """The graph's feeds for one request, deduplicated with np.unique (not the service's code)."""
    c, k = positions.shape
    distinct, inverse = np.unique(positions, return_inverse=True)
    retrieved = np.zeros((1, c, K), np.int64)
    sc = np.zeros((1, c, K), np.float32)
    mask = np.zeros((1, c, K), np.float32)
    retrieved[0, :, :k] = inverse.reshape(c, k)
    sc[0, :, :k] = scores
    mask[0, :, :k] = 1.0
    if len(distinct) == 0:  # a cold user: one padding behavior that no slot reaches
        distinct, hist_rows, buckets = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64)
    feeds = {
        "candidates": cand_rows[None],
        "behaviors": hist_rows[distinct][None],
        "buckets": buckets[distinct][None],
        "retrieved": retrieved,
        "scores": sc,
        "mask": mask,
    }
    if fm is not None:
        feeds |= {"fm": fm[None].astype(np.float32), "fm_present": np.array([present], np.float32)}
    return feeds


def _served_scores(bundle, cand_rows, hist_rows, hist_ts, now, fm=None, present=None):
    """Stage 1 with FAISS over the bundle's index, stage 2 with ONNX Runtime on its scores."""
    buckets = time_buckets(now - hist_ts)
    res = knn_plain(
        search_queries(bundle.search_table, cand_rows),
        search_keys(bundle.search_table, bundle.time_bias, hist_rows, buckets),
        K,
    )
    feeds = _stage2_feeds(cand_rows, hist_rows, buckets, res.positions, res.scores, fm, present)
    probs, attention = bundle.session.run(None, feeds)
    return probs[0], attention[0], res


TIME_OPTIONS = {"recency_prior": 1.0, "stage2_gain": True}


@pytest.mark.parametrize(
    "kind,fm_dim,options",
    [
        ("dare", 0, {}),
        ("coupled", 0, {}),
        ("dare", 3, {}),
        ("coupled", 3, {}),
        # the direct time-bucket bias (served through time_bias.npy) and stage 2's learned gain
        ("dare", 3, TIME_OPTIONS),
        ("coupled", 0, TIME_OPTIONS),
    ],
)
def test_onnx_and_faiss_match_pytorch(
    tmp_path: Path, kind: str, fm_dim: int, options: dict[str, Any]
) -> None:
    model = _ranker(kind, fm_dim, **options)
    if options:
        assert model.bucket_bias.requires_grad and model.log_stage2_gain.requires_grad
    bundle = load_bundle(_export(model, tmp_path))
    rng = np.random.default_rng(1)
    now = 1_700_000_000
    raw_candidates = np.r_[_item_ids()[rng.integers(1, N_ITEMS, 9)], 5, -3]  # 5 and -3 are unknown
    cand_rows = bundle.rows(raw_candidates)
    assert cand_rows[-1] == 0 and cand_rows[-2] == 0 and (cand_rows[:-2] > 0).all()
    for length in (0, 1, K - 3, K, 5 * K):  # empty, shorter than K, exactly K, longer
        hist_rows = rng.integers(0, N_ITEMS, length)  # row 0: unknown behaviors stay in the sequence
        hist_ts = np.sort(now - rng.integers(1, 10**7, length))
        fm = rng.normal(size=fm_dim).astype(np.float32) if fm_dim else None
        for present in (1.0, 0.0) if fm_dim else (None,):
            want, top = _torch_scores(model, cand_rows, hist_rows, hist_ts, now, fm, present)
            got, attention, res = _served_scores(bundle, cand_rows, hist_rows, hist_ts, now, fm, present)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            assert np.ptp(got) > 1e-3, "scores should vary across candidates"
            if length:
                # FAISS top-K is torch.topk: the same (item, time bucket) behaviors; positions may
                # differ only between repeats of one behavior, whose scores tie exactly
                k = min(K, length)
                buckets = time_buckets(now - hist_ts)
                for c in range(len(cand_rows)):
                    chosen = sorted(zip(hist_rows[res.positions[c]], buckets[res.positions[c]], strict=True))
                    oracle = sorted(zip(hist_rows[top[c][:k]], buckets[top[c][:k]], strict=True))
                    assert chosen == oracle
                np.testing.assert_allclose(attention[:, :k].sum(1), 1.0, atol=1e-5)
            assert np.all(attention[:, min(K, length) :] == 0)


def test_search_scores_are_attention_logits(tmp_path: Path) -> None:
    model = _ranker("dare")
    bundle = load_bundle(_export(model, tmp_path))
    rows = np.arange(1, 40)
    buckets = np.arange(39) % 20
    res = knn_plain(
        search_queries(bundle.search_table, np.array([3])),
        search_keys(bundle.search_table, bundle.time_bias, rows, buckets),
        5,
    )
    with torch.no_grad():
        logits = model.attention_logits(
            torch.tensor([3]), torch.from_numpy(rows)[None], torch.from_numpy(buckets)[None]
        )[0].numpy()
    np.testing.assert_allclose(res.scores[0] * model.scale, np.sort(logits)[::-1][:5], rtol=1e-5, atol=1e-6)


def test_stage2_graph_is_the_pytorch_stage2(tmp_path: Path) -> None:
    """Given the same retrieved behaviors, the graph's probabilities and weights are stage2's."""
    model = _ranker("dare", fm_dim=3)
    bundle = load_bundle(_export(model, tmp_path))
    rng = np.random.default_rng(5)
    c, length = 7, 40
    cand_rows = rng.integers(0, N_ITEMS, c)
    hist_rows, buckets = rng.integers(0, N_ITEMS, length), rng.integers(0, 64, length)
    positions = np.stack([rng.choice(length, K, replace=False) for _ in range(c)])
    positions[:, :3] = positions[0, :3]  # behaviors shared across candidates
    fm = rng.normal(size=3).astype(np.float32)
    with torch.no_grad():
        scores = (
            model.attention_logits(
                torch.from_numpy(cand_rows),
                torch.from_numpy(hist_rows[positions]),
                torch.from_numpy(buckets[positions]),
            ).numpy()
            / model.scale
        )
        logit, weights = model.stage2(
            torch.from_numpy(cand_rows),
            torch.from_numpy(hist_rows[positions]),
            torch.from_numpy(buckets[positions]),
            torch.ones(c, K, dtype=torch.bool),
            torch.from_numpy(np.repeat(fm[None], c, 0)),
            torch.ones(c),
        )
    feeds = _stage2_feeds(cand_rows, hist_rows, buckets, positions, scores, fm, 1.0)
    assert feeds["behaviors"].shape[1] < c * K
    probs, attention = bundle.session.run(None, feeds)
    np.testing.assert_allclose(probs[0], torch.sigmoid(logit).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(attention[0], weights.numpy(), rtol=0, atol=1e-6)
    # the same slots through a list that repeats behaviors (no deduplication) score the same
    repeated = feeds | {
        "behaviors": hist_rows[positions].reshape(1, -1),
        "buckets": buckets[positions].reshape(1, -1),
        "retrieved": np.arange(c * K).reshape(1, c, K),
    }
    again, attention_again = bundle.session.run(None, repeated)
    np.testing.assert_array_equal(again, probs)
    np.testing.assert_array_equal(attention_again, attention)


def test_dynamic_batch_candidate_and_behavior_axes(tmp_path: Path) -> None:
    bundle = load_bundle(_export(_ranker("dare"), tmp_path))
    assert [i.name for i in bundle.session.get_inputs()] == bundle.manifest.model_extra["onnx"]["inputs"]
    for b, c, u in ((1, 1, 1), (3, 17, 5), (8, 200, 900)):
        feeds = {
            "candidates": np.ones((b, c), np.int64),
            "behaviors": np.ones((b, u), np.int64),
            "buckets": np.zeros((b, u), np.int64),
            "retrieved": np.full((b, c, K), u - 1, np.int64),
            "scores": np.zeros((b, c, K), np.float32),
            "mask": np.ones((b, c, K), np.float32),
        }
        probs, attention = bundle.session.run(None, feeds)
        assert probs.shape == (b, c) and attention.shape == (b, c, K)
        assert ((probs > 0) & (probs < 1)).all()
        np.testing.assert_allclose(attention, 1.0 / K, rtol=1e-6)


def test_fm_encoder_matches_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cats = np.r_[0, np.arange(1, N_ITEMS) % (N_CATS - 1) + 1]
    fm = FoundationModel(FmConfig(N_ITEMS, N_CATS, dim=8, heads=2, fm_dim=5), cats).eval()
    path = export_fm(fm, tmp_path, "fm", _item_ids(), 300, {"auc": 0.5, "gauc": 0.5, "logloss": 0.7}, {})
    bundle = load_bundle(path)
    assert bundle.manifest.model == "fm" and bundle.manifest.tag == "fm:1"
    rng = np.random.default_rng(0)
    rows = rng.integers(0, N_ITEMS, (4, 30))
    buckets = rng.integers(0, 64, (4, 30))
    mask = np.ones((4, 30), bool)
    mask[1, 10:] = False
    mask[2, :] = False  # a user with no history
    got = bundle.session.run(None, {"behaviors": rows, "buckets": buckets, "mask": mask.astype(np.float32)})[
        0
    ]
    with torch.no_grad():
        want = fm.user_embedding(
            torch.from_numpy(rows), torch.from_numpy(buckets), torch.from_numpy(mask)
        ).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- refusing bad bundles -------------------------------------------------------------------------


@pytest.fixture()
def good_bundle(tmp_path: Path) -> Path:
    return _export(_ranker("dare"), tmp_path)


def _rewrite_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        target = m
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    (path / "manifest.json").write_text(json.dumps(m))


def test_loads_and_verifies(good_bundle: Path) -> None:
    b = load_bundle(good_bundle)
    assert b.attention.shape == (N_ITEMS, 4) and b.time_bias.shape == (64,)
    assert not hasattr(b, "index"), "the FAISS index is read once; its rows are the attention table"
    assert b.version == "1" and b.variant == "dare"
    np.testing.assert_array_equal(b.rows(np.array([1007, 1008, -1, 1000 + 7 * 59])), [1, 0, 0, 59])


def test_truncated_onnx_is_refused(good_bundle: Path) -> None:
    onnx = good_bundle / "ranker.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    with pytest.raises(BundleError, match="ranker.onnx.*sha256"):
        load_bundle(good_bundle)
    # even with a matching checksum, a truncated graph is refused by ONNX Runtime, not served
    m = json.loads((good_bundle / "manifest.json").read_text())
    m["files"]["ranker.onnx"] = sha256_file(onnx)
    (good_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        load_bundle(good_bundle)


def test_flipped_byte_in_index_is_refused(good_bundle: Path) -> None:
    f = good_bundle / "attention.faiss"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="attention.faiss.*sha256"):
        load_bundle(good_bundle)


def test_missing_file_is_refused(good_bundle: Path) -> None:
    (good_bundle / "time_bias.npy").unlink()
    with pytest.raises(BundleError, match="missing file time_bias.npy"):
        load_bundle(good_bundle)


def test_mismatched_dims_are_refused(good_bundle: Path) -> None:
    _rewrite_manifest(good_bundle, **{"dims.attention": 8})
    with pytest.raises(BundleError, match="attention.faiss: expected an inner-product index of 60 x 8"):
        load_bundle(good_bundle)


def test_wrong_top_k_is_refused(good_bundle: Path) -> None:
    _rewrite_manifest(good_bundle, top_k=16)
    with pytest.raises(BundleError, match="ONNX input retrieved"):
        load_bundle(good_bundle)


def test_format_1_ranker_is_refused_with_the_reason(good_bundle: Path, tmp_path: Path) -> None:
    _rewrite_manifest(good_bundle, format_version=1)
    with pytest.raises(BundleError, match="dare bundle of format_version 1.*per-pair stage-2 inputs"):
        load_bundle(good_bundle)
    # FM bundles did not change: format 1 still loads
    torch.manual_seed(0)
    fm = FoundationModel(FmConfig(N_ITEMS, N_CATS, dim=8, heads=2, fm_dim=5), np.zeros(N_ITEMS, np.int64))
    path = export_fm(
        fm, tmp_path / "fm", "fm", _item_ids(), 300, {"auc": 0.5, "gauc": 0.5, "logloss": 0.7}, {}
    )
    _rewrite_manifest(path, format_version=1)
    assert load_bundle(path).manifest.format_version == 1


def test_pickled_array_is_refused(good_bundle: Path) -> None:
    arr = np.array([{"x": 1}] * N_ITEMS, dtype=object)
    np.save(good_bundle / "item_categories.npy", arr, allow_pickle=True)
    m = json.loads((good_bundle / "manifest.json").read_text())
    m["files"]["item_categories.npy"] = sha256_file(good_bundle / "item_categories.npy")
    (good_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="item_categories.npy: not a readable .npy"):
        load_bundle(good_bundle)


def test_path_escape_is_refused(good_bundle: Path) -> None:
    m = json.loads((good_bundle / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    (good_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="escapes the bundle folder"):
        load_bundle(good_bundle)


def test_invalid_manifest_is_refused(good_bundle: Path) -> None:
    (good_bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid manifest"):
        load_bundle(good_bundle)


def test_fewer_time_buckets_than_serving_uses_are_refused(tmp_path: Path) -> None:
    # consistent in itself (time_bias.npy has 8 rows), but a behavior a day old falls in bucket 32
    torch.manual_seed(0)
    cats = np.r_[0, np.arange(1, N_ITEMS) % (N_CATS - 1) + 1].astype(np.int64)
    cfg = RankerConfig("dare", N_ITEMS, N_CATS, 4, 8, K, 0, (16, 8), n_time_buckets=8)
    path = _export(TwoStageRanker(cfg, cats).eval(), tmp_path)
    assert int(time_buckets(np.array([86_400]))[0]) == 32
    with pytest.raises(BundleError, match=r"n_time_buckets=8, .* buckets 0\.\.63: the model needs 64"):
        load_bundle(path)


def test_versions_increase(tmp_path: Path) -> None:
    model = _ranker("dare")
    paths = [_export(model, tmp_path) for _ in range(3)]
    assert [p.name for p in paths] == ["1", "2", "3"]
    assert not list((tmp_path / "dare").glob(".incoming-*"))


@pytest.mark.parametrize(
    "ids,dense",
    [([5, 7, 100], True), ([0, 3, 4], True), ([2**40, 2**40 + 9], False), ([10**6, 3 * 10**7], False)],
)
def test_row_lookup_matches_the_binary_search(ids: list[int], dense: bool) -> None:
    """A dense id table where the ids are compact, the binary search where not: the same rows."""
    from exporters.bundle import dense_row_table, item_rows

    item_ids = np.array([-1, *ids], np.int64)
    table = dense_row_table(item_ids)
    assert (table is not None) == dense, "a dense table only when it stays small"
    unknown = [x for x in (-5, -1, 0, 1, 6, ids[-1] + 1, ids[-1] * 3, 2**62, -(2**62)) if x not in ids]
    probe = np.array([*ids, *unknown], np.int64)
    want = item_rows(item_ids, probe)
    assert want[: len(ids)].tolist() == list(range(1, len(ids) + 1)) and not want[len(ids) :].any()
    bundle = Bundle(Path("."), None, item_ids, np.zeros(len(item_ids), np.int64), None)  # type: ignore[arg-type]
    got = bundle.rows(probe)
    assert got.dtype == np.int64 and got.tolist() == want.tolist()


@pytest.mark.parametrize(
    "kind,fm_dim,recent_k,short_term",
    [
        ("dare", 0, 3, 0),
        ("dare", 3, 1, 0),
        ("coupled", 0, 5, 0),
        ("dare", 3, K, 0),
        # with the short-term branch over the newest of the kept behaviors
        ("dare", 0, 3, 3),
        ("dare", 3, 5, 2),
        ("coupled", 3, K, K),
    ],
)
def test_served_stages_keeping_the_newest_match_pytorch(
    tmp_path: Path, kind: str, fm_dim: int, recent_k: int, short_term: int
) -> None:
    """The service's stage 1 and stage 2 (`prepare_job`, `score_jobs`) against the PyTorch model of
    a ranker that always keeps its newest behaviors (and attends some of them in a branch of their own)."""
    model = _ranker(kind, fm_dim, recent_k=recent_k, short_term=short_term)
    path = _export(model, tmp_path)
    served = ScoringModel.from_bundle(load_bundle(path))
    assert served.recent_k == recent_k and load_torch_model(path).cfg.recent_k == recent_k
    assert load_torch_model(path).cfg.short_term == short_term
    rng = np.random.default_rng(2)
    now = 1_700_000_000
    raw_candidates = np.r_[_item_ids()[rng.integers(1, N_ITEMS, 9)], 5]
    cand_rows = served.bundle.rows(raw_candidates)
    for length in (0, 1, recent_k, K - 1, K, 5 * K):
        hist_rows = rng.integers(0, N_ITEMS, length)
        hist_ts = np.sort(now - rng.integers(1, 10**7, length))
        fm = rng.normal(size=fm_dim).astype(np.float32) if fm_dim else None
        job = prepare_job(served, raw_candidates, _item_ids()[hist_rows], hist_ts, now, fm)
        out = score_jobs(served, [job])[0]
        want, top = _torch_scores(model, cand_rows, hist_rows, hist_ts, now, fm, 1.0 if fm_dim else None)
        np.testing.assert_allclose(out.probabilities, want, rtol=0, atol=1e-5)
        n_kept = min(recent_k, length)
        assert out.kept == n_kept and out.positions.shape == (len(cand_rows), min(K, length))
        if length:
            # the kept block is exactly the offline one: the newest, newest first
            newest = np.arange(length - 1, length - 1 - n_kept, -1)
            np.testing.assert_array_equal(
                out.positions[:, :n_kept], np.broadcast_to(newest, (len(cand_rows), n_kept))
            )
            np.testing.assert_array_equal(top[:, :n_kept], out.positions[:, :n_kept])
            # the searched block: the same (item, time bucket) behaviors, in the same order of score
            buckets = time_buckets(now - hist_ts)
            k = min(K, length)
            for c in range(len(cand_rows)):
                got = list(zip(hist_rows[out.positions[c]], buckets[out.positions[c]], strict=True))
                oracle = list(zip(hist_rows[top[c][:k]], buckets[top[c][:k]], strict=True))
                assert sorted(got[n_kept:]) == sorted(oracle[n_kept:])
            np.testing.assert_allclose(out.attention.sum(1), 1.0, atol=1e-5)


def test_a_bundle_without_recent_k_keeps_none(tmp_path: Path) -> None:
    bundle = load_bundle(_export(_ranker("dare", recent_k=2), tmp_path))
    assert recent_k_of(bundle.manifest) == 2
    older = bundle.manifest.model_dump()
    del older["config"]["recent_k"]
    assert recent_k_of(Manifest.model_validate(older)) == 0
    assert RankerConfig(**{k: v for k, v in older["config"].items() if k != "mlp"}).recent_k == 0
