"""The pure scoring core without HTTP: FM choice, stage-2 assembly, both stages, providers."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.bundle import load_bundle
from feature_store.base import FmLookup, FmStatus
from service.core.pipeline import ScoringModel, fm_input, prepare_job, score_jobs
from service.core.ranking import (
    FeedPool,
    RankInput,
    distinct_positions,
    effective_behaviors,
    rank_batch,
    rank_input,
)
from service.core.runtime import CPU, CUDA, DeviceUnavailable, choose_providers, session_options
from service.core.search import Stage1Engine
from tests.conftest import TinyModels

VEC = np.arange(4, dtype=np.float32)


@pytest.mark.parametrize(
    "status,version,wanted,use_expired,fed,reported",
    [
        ("hit", "fm:1", "fm:1", True, True, FmStatus.HIT),
        ("miss", None, "fm:1", True, False, FmStatus.MISS),
        ("stale", "fm:0", "fm:1", True, False, FmStatus.STALE),  # another FM version: never fed
        ("stale", "fm:1", "fm:1", True, True, FmStatus.STALE),  # past the TTL only
        ("stale", "fm:1", "fm:1", False, False, FmStatus.STALE),
    ],
)
def test_fm_input(status: str, version, wanted, use_expired: bool, fed: bool, reported: FmStatus) -> None:
    vector = None if status == "miss" else VEC
    got, rep = fm_input(FmLookup(FmStatus(status), vector, version, 0.0), wanted, 4, use_expired)
    assert rep is reported and (got is not None) == fed
    if fed:
        np.testing.assert_array_equal(got, VEC)


def test_fm_input_refuses_wrong_dimension_and_fm_less_models() -> None:
    wrong = FmLookup(FmStatus.HIT, np.zeros(3, np.float32), "fm:1", 0.0)
    assert fm_input(wrong, "fm:1", 4, True) == (None, FmStatus.MISS)
    assert fm_input(FmLookup(FmStatus.HIT, VEC, "fm:1", 0.0), None, 0, True)[0] is None


@pytest.fixture(scope="module")
def model(tiny_models: TinyModels) -> ScoringModel:
    return ScoringModel.from_bundle(
        load_bundle(tiny_models.root / "dare" / "1", session_options=session_options(1))
    )


def _random_inputs(
    rng: np.random.Generator, n_items: int, k: int, fm_dim: int, n: int, max_c: int = 30
) -> list[RankInput]:
    """Requests as stage 1 leaves them: per candidate kk <= k distinct positions into a sequence of L."""
    out = []
    for _ in range(n):
        c, length = int(rng.integers(1, max_c)), int(rng.integers(0, 3 * k))
        kk = int(rng.integers(0, min(k, length) + 1))
        positions = np.stack([rng.choice(length, kk, replace=False) for _ in range(c)])
        scores = rng.normal(0, 3, (c, kk)).astype(np.float32)
        fm = rng.normal(size=fm_dim).astype(np.float32) if rng.random() < 0.5 else None
        rows, buckets = rng.integers(0, n_items, length), rng.integers(0, 64, length)
        out.append(rank_input(rng.integers(0, n_items, c), rows, buckets, positions, scores, fm))
    return out


def test_batch_padding_never_changes_a_request(model: ScoringModel) -> None:
    rng = np.random.default_rng(0)
    m = model.bundle.manifest
    inputs = _random_inputs(rng, m.n_items, m.top_k, m.dims.fm, 48, max_c=80)
    assert len({len(x.beh_rows) for x in inputs}) > 3, "requests should differ in distinct behaviors"
    assert len({len(x.cand_rows) for x in inputs}) > 20, "requests should differ in candidates"
    alone = [rank_batch(model.bundle.session, model.feeds, [x])[0] for x in inputs]
    # Bit-identical in a batch with others and after copies of itself: a request's scores then sit
    # at other offsets of the padded tensors (without candidate padding some land in SIMD tails).
    batches = [inputs[i : i + 8] for i in range(0, len(inputs), 8)]
    batches += [[x] * n for x in inputs for n in (2, 3)]
    for batch in batches:
        together = rank_batch(model.bundle.session, model.feeds, batch)
        for x, out in zip(batch, together, strict=True):
            want = alone[next(i for i, y in enumerate(inputs) if y is x)]
            assert np.array_equal(want.probabilities, out.probabilities)
            assert np.array_equal(want.attention, out.attention)
            assert out.attention.shape == x.retrieved.shape


@pytest.mark.parametrize("length,c,k", [(0, 3, 0), (1, 2, 1), (50, 7, 16), (5000, 40, 16)])
def test_distinct_positions_match_np_unique(length: int, c: int, k: int) -> None:
    rng = np.random.default_rng(length)
    positions = np.stack([rng.choice(length, k, replace=False) for _ in range(c)]).reshape(c, k)
    distinct, index = distinct_positions(positions, length)
    want, inverse = np.unique(positions, return_inverse=True)
    np.testing.assert_array_equal(distinct, want)
    np.testing.assert_array_equal(index, inverse.reshape(c, k))
    assert index.dtype == np.int64 and distinct[index].tolist() == positions.tolist()


def test_rank_input_keeps_each_distinct_behavior_once() -> None:
    rows, buckets = np.array([10, 11, 12, 13, 10]), np.array([0, 1, 2, 3, 4])
    positions = np.array([[4, 1], [1, 3]])
    x = rank_input(np.array([7, 8]), rows, buckets, positions, np.ones((2, 2)), None)
    assert x.beh_rows.tolist() == [11, 13, 10] and x.beh_buckets.tolist() == [1, 3, 4]
    assert x.retrieved.tolist() == [[2, 0], [0, 1]] and x.scores.dtype == np.float32


def test_feed_pool_grows_and_reuses() -> None:
    pool = FeedPool(top_k=4, fm_dim=2, rows=2, batch=1, distinct=2)
    x = rank_input(np.ones(3, np.int64), np.arange(5), np.zeros(5, np.int64),
                   np.array([[0, 4], [4, 1], [2, 0]]), np.ones((3, 2)), None)  # fmt: skip
    cold = rank_input(np.ones(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                      np.zeros((1, 0), np.int64), np.zeros((1, 0)), None)  # fmt: skip
    feeds, buf = pool.feeds([x, cold])
    # candidates padded to CANDIDATE_ALIGN (16), the padding masked
    assert feeds["retrieved"].shape == (2, 16, 4) and feeds["retrieved"].flags.c_contiguous
    assert feeds["behaviors"].shape == (2, 4) and feeds["behaviors"].flags.c_contiguous
    assert feeds["behaviors"][0].tolist() == [0, 1, 2, 4] and feeds["behaviors"][1].tolist() == [0, 0, 0, 0]
    assert feeds["retrieved"][0, :3].tolist() == [[0, 3, 0, 0], [3, 1, 0, 0], [2, 0, 0, 0]]
    assert feeds["mask"][0, :, 2:].sum() == 0 and feeds["mask"][0, :3, :2].all()
    assert feeds["mask"][0, 3:].sum() == 0 and feeds["retrieved"][0, 3:].sum() == 0
    assert feeds["mask"][1].sum() == 0 and feeds["candidates"][1].tolist() == [1] + [0] * 15
    assert buf.rows >= 32 and buf.distinct >= 8 and feeds["fm_present"].tolist() == [0.0, 0.0]
    pool.give_back(buf)
    small, again = pool.feeds([x])
    assert again is buf and small["candidates"].shape == (1, 16) and small["behaviors"].shape == (1, 4)
    pool.give_back(again)
    only_cold, _ = pool.feeds([cold])
    assert only_cold["behaviors"].shape == (1, 1), "the graph always gets a behavior to gather"


def test_rank_batch_checks_shapes(model: ScoringModel) -> None:
    k = model.top_k
    rows = np.arange(k + 1)
    wide = RankInput(
        np.ones(2, np.int64), rows, rows, np.ones((2, k + 1), np.int64), np.ones((2, k + 1)), None
    )
    with pytest.raises(ValueError, match="behaviors per candidate"):
        rank_batch(model.bundle.session, model.feeds, [wide])
    outside = RankInput(np.ones(1, np.int64), rows[:2], rows[:2], np.array([[0, 2]]), np.ones((1, 2)), None)
    with pytest.raises(ValueError, match=r"retrieved indices outside \[0, 2\)"):
        rank_batch(model.bundle.session, model.feeds, [outside])


def test_both_stages_for_cold_and_long_users(model: ScoringModel) -> None:
    rng = np.random.default_rng(1)
    ids = model.bundle.item_ids[1:]
    cands = np.r_[rng.choice(ids, 9), 10**12]
    cold = prepare_job(model, cands, np.zeros(0, np.int64), np.zeros(0, np.int64), 1000, None)
    items = rng.choice(ids, 200)
    long = prepare_job(model, cands, items, np.sort(rng.integers(0, 900, 200)), 1000, None)
    assert cold.unknown_candidates == long.unknown_candidates == 1
    out = score_jobs(model, [cold, long])
    assert out[0].positions.shape == (10, 0)
    assert out[1].positions.shape == (10, model.top_k) and out[1].positions.min() >= 0
    assert all(((o.probabilities > 0) & (o.probabilities < 1)).all() for o in out)
    assert out[0].attention.shape == (10, 0) and np.allclose(out[1].attention.sum(1), 1.0, atol=1e-5)
    # the threaded engine gives the same scores as the serial one
    engine = Stage1Engine(threads=2)
    try:
        threaded = score_jobs(model, [cold, long, long], engine)
    finally:
        engine.close()
    np.testing.assert_array_equal(threaded[1].probabilities, out[1].probabilities)
    np.testing.assert_array_equal(threaded[2].positions, out[1].positions)


def test_choose_providers() -> None:
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(DeviceUnavailable, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])


def test_a_model_is_warmed_at_its_largest_batch(tiny_models: TinyModels) -> None:
    """The warm-up run leaves feed buffers (and ORT's arena) sized for the largest batch."""
    path = tiny_models.root / "dare" / "1"
    warmed = ScoringModel.from_bundle(load_bundle(path, session_options=session_options(1)), 4, 50)
    buf = warmed.feeds._free.get_nowait()
    # 50 candidates pad to 64; the warm requests' behaviors are as many as 50 x K can retrieve
    assert buf.batch >= 4 and buf.rows >= 4 * 64 and buf.distinct >= 4 * min(50 * warmed.top_k, 4096)
    warmed.feeds.give_back(buf)
    rng = np.random.default_rng(0)
    ids = warmed.bundle.item_ids[1:]
    jobs = [
        prepare_job(warmed, rng.choice(ids, 50), rng.choice(ids, 300), np.arange(300), 1000, None)
        for _ in range(4)
    ]
    score_jobs(warmed, jobs)
    assert warmed.feeds._free.get_nowait() is buf, "a batch up to the warmed size reuses the buffers"


def test_effective_behaviors_against_hand_values() -> None:
    w = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],  # mean pooling over 4: exactly 4
            [1.0, 0.0, 0.0, 0.0],  # one behavior takes everything: 1
            [0.5, 0.5, 0.0, 0.0],  # two of four slots: 2, padding ignored
            [0.0, 0.0, 0.0, 0.0],  # no behaviors: 0
            [0.7, 0.2, 0.1, 0.0],
        ],
        dtype=np.float32,
    )
    got = effective_behaviors(w)
    ent = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
    np.testing.assert_allclose(got, [4.0, 1.0, 2.0, 0.0, np.exp(ent)], rtol=1e-6)
