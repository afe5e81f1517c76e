"""A ranker trained with an FM history, served end to end from Redis: the entries fm-embed writes are
read in the batch's round trip, chosen before the request time, stale versions left out and counted,
and the scores are the offline PyTorch model's on the same entries."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from exporters.bundle import load_bundle
from exporters.fm_history import dataset_history, load_encoder
from exporters.offline import load_torch_model, score_offline
from feature_store import fm_history as fh
from feature_store.factory import open_feature_store
from feature_store.fill import fill
from service.app import create_app
from service.core.pipeline import NO_HISTORY, fm_history_input
from tests.conftest import HistoryModel, ServedData, TinyModels
from tests.service.conftest import SettingsFactory, TestClient, score

ATOL = 1e-5


@pytest.fixture(scope="module")
def history_root(tiny_history_model: HistoryModel, tiny_models: TinyModels, tmp_path_factory) -> Path:
    """A bundle root serving the history ranker as `dare` beside the plain `coupled`."""
    root = tmp_path_factory.mktemp("history-root")
    shutil.copytree(tiny_history_model.bundle, root / "dare" / "1")
    shutil.copytree(tiny_models.root / "coupled" / "1", root / "coupled" / "1")
    return root


def test_no_entries_or_no_history_input_feed_nothing(tiny_history_model: HistoryModel) -> None:
    spec = load_bundle(tiny_history_model.bundle).manifest.fm_history
    assert fm_history_input(spec, fh.HistoryEntries.empty(), 10) is NO_HISTORY
    assert fm_history_input(spec, None, 10) is NO_HISTORY
    entries = fh.parse_entries(
        fh.encode_entries(np.array([5]), np.ones((1, 8)), fm_version="fm:1", encoder_version="pca-x")
    )
    assert fm_history_input(None, entries, 10) is NO_HISTORY
    other = fm_history_input(spec, entries, 10)  # another encoder: left out, counted
    assert other.vectors is None and other.stale == 1


def test_served_entries_and_scores(
    history_root: Path,
    tiny_history_model: HistoryModel,
    tiny_models: TinyModels,
    served: ServedData,
    make_settings: SettingsFactory,
) -> None:
    path = tiny_history_model.bundle
    spec = load_bundle(path).manifest.fm_history
    assert spec is not None
    encoder = load_encoder(path)
    history = dataset_history(load_bundle(tiny_models.fm), tiny_models.data, encoder)
    with_entries = [u for u in served.fm_users if len(history.by_user.get(u, [])) > spec.length]
    fresh, mixed, only_stale = with_entries[:3]
    ns = f"fmh-{uuid.uuid4().hex[:8]}"
    fill(served.redis_url, ns, events=served.events, fm=served.fm_vectors, fm_version=served.fm_version)
    old = fh.encode_entries(
        np.array([served.now - 100, served.now - 50, served.now - 10]),
        np.ones((3, encoder.dim), np.float32),
        fm_version=spec.fm_version,
        encoder_version="pca-retired",
        encoding="int4",
    )

    async def write() -> None:
        store = open_feature_store(served.redis_url, timeout_s=10.0, namespace=ns)
        try:
            await store.write_fm_history(spec.fm_version, encoder.version, history.by_user)
            # another encoder of the same FM: kept in the store, never fed to this ranker
            await store.write_fm_history(spec.fm_version, "pca-retired", {mixed: old, only_stale: old})
            await store.write_fm_history(spec.fm_version, encoder.version, {only_stale: []})
        finally:
            await store.aclose()

    asyncio.run(write())
    model, item_ids = load_torch_model(path), np.load(path / "item_ids.npy")
    cands = served.items[5:25]

    def expected(user: str, now: int) -> np.ndarray | None:
        """The oracle: the user's entries before `now`, the newest `length`, decoded (no store code)."""
        entries = fh.parse_entries(history.by_user[user])
        before = np.flatnonzero(entries.times < now)[-spec.length :]
        return fh.decode_vectors(entries, before, spec.dim) if len(before) else None

    first_times = fh.parse_entries(history.by_user[fresh]).times
    past = int(first_times[len(first_times) // 2])  # a request back in time sees only older entries
    cases = [(fresh, served.now, 0), (fresh, past, 0), (mixed, served.now, 3), (only_stale, served.now, 3)]
    with TestClient(create_app(make_settings(bundles=history_root, redis_namespace=ns))) as c:
        for user, now, stale in cases:
            body = score(c, user, cands, "dare", timestamp=now).json()
            vectors = None if user == only_stale else expected(user, now)
            n = 0 if vectors is None else len(vectors)
            assert body["user"]["fm_history"] == {"entries": n, "stale": stale}
            items, ts = served.history(user)
            want = score_offline(
                model, item_ids, items, ts, np.array(cands), now, served.fm_vectors[user], vectors
            )
            np.testing.assert_allclose(body["scores"], want, rtol=0, atol=ATOL)
        assert not np.array_equal(expected(fresh, past), expected(fresh, served.now))
        # the only-stale user scores as one without entries, and the entries do move scores
        no_history = score_offline(
            model, item_ids, *served.history(fresh), np.array(cands), served.now, served.fm_vectors[fresh]
        )
        assert (
            np.abs(no_history - score(c, fresh, cands, "dare", timestamp=served.now).json()["scores"]).max()
            > 1e-6
        )
        # a variant without an FM history answers as before
        plain = score(c, fresh, cands, "coupled", timestamp=served.now).json()
        assert "fm_history" not in plain["user"]


def test_feeds_pad_each_requests_entries_and_grow_the_pool() -> None:
    from service.core.ranking import FeedPool, RankInput, check_input, rank_input

    pool = FeedPool(top_k=2, fm_dim=0, rows=2, batch=1, distinct=2, fm_history_dim=3)
    rng = np.random.default_rng(0)

    def request(n: int | None) -> RankInput:
        entries = None if n is None else rng.normal(size=(n, 3)).astype(np.float32)
        return rank_input(np.ones(2, np.int64), np.arange(3), np.zeros(3, np.int64),
                          np.array([[0, 1], [2, 0]]), np.ones((2, 2)), None, entries)  # fmt: skip

    inputs = [request(70), request(None), request(2)]  # 70 entries: past the pool's first buffers
    feeds, buf = pool.feeds(inputs)
    assert feeds["fm_history"].shape == (3, 70, 3) and feeds["fm_history_mask"].shape == (3, 70)
    assert feeds["fm_history_mask"].sum(axis=1).tolist() == [70, 0, 2]
    np.testing.assert_array_equal(feeds["fm_history"][2, :2], inputs[2].fm_history)
    assert not feeds["fm_history"][1].any() and not feeds["fm_history"][2, 2:].any()
    pool.give_back(buf)
    small, _ = pool.feeds([request(1)])
    assert small["fm_history"].shape == (1, 1, 3) and small["fm_history_mask"].tolist() == [[1.0]]
    with pytest.raises(ValueError, match="FM-history entries of shape"):
        check_input(request(2), top_k=2, fm_dim=0, fm_history_dim=4)
