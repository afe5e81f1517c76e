"""Training arrays: item vocabulary, history ranges without leakage, the time split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporters.convert import convert_movielens
from exporters.dataset import Dataset, DatasetError, read_dataset, write_dataset
from exporters.samples import (
    TEST,
    TRAIN,
    VALID,
    ItemVocab,
    Samples,
    build_samples,
    gather_histories,
    history,
    related_positions,
    time_split,
)
from exporters.synth import SynthConfig, write_synth

ML_SMALL = Path("/work/shared/data/ml-latest-small")
MAX_LEN = 40


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, ItemVocab, Samples]:
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, SynthConfig(users=200, items=3000, categories=20, max_seq_len=400, seed=9))
    ds = read_dataset(out)
    vocab = ItemVocab.from_dataset(ds)
    return ds, vocab, build_samples(ds, vocab, max_seq_len=MAX_LEN)


def _tiny() -> Dataset:
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "a", "b"],
            "item_id": [100, 200, 300, 400, 500, 100],
            "category_id": [1, 2, 3, 1, 2, 1],
            "timestamp": [10, 20, 30, 30, 40, 15],
        }
    )
    impressions = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "c"],
            "item_id": [300, 999, 200, 100],
            "category_id": [3, 5, 2, 1],
            "timestamp": [30, 41, 15, 50],
            "label": [1, 0, 1, 0],
            "impression_id": [0, 1, 2, 3],
        }
    )
    return Dataset(events=events, impressions=impressions, meta={})


def test_vocab_rows_categories_and_arrays(tmp_path: Path) -> None:
    vocab = ItemVocab.from_dataset(_tiny())
    assert vocab.item_ids.tolist() == [-1, 100, 200, 300, 400, 500, 999]
    assert vocab.row_category.tolist() == [0, 1, 2, 3, 1, 2, 5]
    assert vocab.n_rows == 7 and vocab.n_categories == 6
    assert vocab.rows(np.array([500, 7, 100, 999, 10_000])).tolist() == [5, 0, 1, 6, 0]
    vocab.save(tmp_path)
    again = ItemVocab.load(tmp_path)
    assert np.array_equal(again.item_ids, vocab.item_ids) and np.array_equal(
        again.row_category, vocab.row_category
    )
    with pytest.raises(DatasetError, match="row 0"):
        ItemVocab.from_arrays(np.array([100, 200]), np.array([1, 2]))


def test_history_is_strictly_earlier_and_truncated() -> None:
    ds = _tiny()
    s = build_samples(ds, ItemVocab.from_dataset(ds), max_seq_len=10)
    vocab = ItemVocab.from_dataset(ds)
    rows, ts = history(s, 0)
    # the impression at t=30 does not see either event of its own second
    assert vocab.item_ids[rows].tolist() == [100, 200] and ts.tolist() == [10, 20]
    assert vocab.item_ids[history(s, 1)[0]].tolist() == [100, 200, 300, 400, 500]
    assert history(s, 2)[0].tolist() == []  # b's only event shares the impression's second
    assert history(s, 3)[0].tolist() == []  # c has no events at all
    assert s.user_id.tolist() == ["a", "a", "b", "c"]
    assert s.target_row.tolist() == [3, 6, 2, 1] and s.label.dtype == np.float32
    short = build_samples(ds, vocab, max_seq_len=2)
    assert vocab.item_ids[history(short, 1)[0]].tolist() == [400, 500]


def test_no_leakage_against_brute_force(synth: tuple[Dataset, ItemVocab, Samples]) -> None:
    ds, vocab, s = synth
    ev = ds.events
    by_user = {u: g for u, g in ev.groupby("user_id")}
    rng = np.random.default_rng(0)
    for i in rng.choice(len(s), 300, replace=False):
        rows, ts = history(s, i)
        assert (ts < s.target_ts[i]).all()
        assert (s.event_user[s.hist_start[i] : s.hist_end[i]] == s.user_index[i]).all()
        g = by_user[s.user_id[i]]
        earlier = g[g["timestamp"] < s.target_ts[i]].tail(MAX_LEN)
        assert ts.tolist() == earlier["timestamp"].tolist()
        assert vocab.item_ids[rows].tolist() == earlier["item_id"].tolist()
    # the generator places some impressions exactly on an event's second: that event is never history
    exact = np.flatnonzero(s.hist_end < len(s.event_ts))
    exact = exact[
        (s.event_ts[s.hist_end[exact]] == s.target_ts[exact])
        & (s.event_user[s.hist_end[exact]] == s.user_index[exact])
    ]
    assert len(exact) > 10


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(1, 6)), min_size=1, max_size=40),
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 13)), min_size=1, max_size=15),
    st.integers(1, 6),
)
def test_history_property(events: list, queries: list, max_len: int) -> None:
    ev = pd.DataFrame(events, columns=["user", "timestamp", "item_id"])
    ev = ev.assign(user_id="u" + ev["user"].astype(str), category_id=1).drop(columns="user")
    im = pd.DataFrame(queries, columns=["user", "timestamp"])
    im = im.assign(user_id="u" + im["user"].astype(str), item_id=1, category_id=1, label=0).drop(
        columns="user"
    )
    ds = Dataset(events=ev, impressions=im, meta={})
    s = build_samples(ds, None, max_seq_len=max_len)
    for i in range(len(im)):
        want = ev[(ev["user_id"] == im["user_id"][i]) & (ev["timestamp"] < im["timestamp"][i])]
        want = want.sort_values(["timestamp", "item_id"]).tail(max_len)
        _, ts = history(s, i)
        assert ts.tolist() == want["timestamp"].tolist()
        assert (s.users[s.event_user[s.hist_start[i] : s.hist_end[i]]] == im["user_id"][i]).all()


def test_split_is_by_time_per_user(synth: tuple[Dataset, ItemVocab, Samples]) -> None:
    _, _, s = synth
    frame = pd.DataFrame({"user": s.user_index, "ts": s.target_ts, "split": s.split})
    for _, g in frame.groupby("user"):
        train, valid, test = (g.loc[g["split"] == k, "ts"] for k in (TRAIN, VALID, TEST))
        assert len(test) >= 1 and len(valid) >= 1  # every synthetic user has >= 3 impressions
        assert train.max() <= valid.min() <= valid.max() <= test.min()
    share = np.bincount(s.split) / len(s)
    assert 0.07 < share[TEST] < 0.13 and 0.07 < share[VALID] < 0.13
    assert len(s.indices(TEST)) == int((s.split == TEST).sum())


def test_split_counts_and_global_mode() -> None:
    user = np.array([0] * 10 + [1] * 2 + [2] * 3)
    ts = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 5, 6, 1, 1, 1])
    split = time_split(user, ts)
    assert split[:10].tolist() == [TEST, VALID] + [TRAIN] * 8  # 10 % each of 10, latest first in this order
    assert split[10:12].tolist() == [TRAIN, TRAIN]  # fewer than 3: all train
    assert split[12:].tolist() == [TRAIN, VALID, TEST]  # ties keep row order
    glob = time_split(np.zeros(100, np.int64), np.arange(100), mode="global")
    assert (glob[:80] == TRAIN).all() and (glob[80:90] == VALID).all() and (glob[90:] == TEST).all()
    with pytest.raises(ValueError, match="unknown split mode"):
        time_split(user, ts, mode="random")  # type: ignore[arg-type]


def test_gather_histories_matches_history(synth: tuple[Dataset, ItemVocab, Samples]) -> None:
    _, _, s = synth
    idx = np.arange(0, len(s), 37)
    rows, ts, n = gather_histories(s, idx, max_len=16)
    assert rows.shape == (len(idx), int(n.max()))
    for j, i in enumerate(idx):
        h_rows, h_ts = history(s, i)
        assert n[j] == min(16, len(h_rows))
        assert rows[j, : n[j]].tolist() == h_rows[len(h_rows) - n[j] :].tolist()
        assert ts[j, : n[j]].tolist() == h_ts[len(h_ts) - n[j] :].tolist()
        assert (rows[j, n[j] :] == 0).all()


def test_related_positions_point_into_histories(synth: tuple[Dataset, ItemVocab, Samples]) -> None:
    ds, vocab, _ = synth
    s = build_samples(ds, vocab, max_seq_len=100_000)  # untruncated: all related events are in the history
    indptr, pos = related_positions(ds, s, vocab)
    assert np.array_equal(np.diff(indptr), ds.impressions["n_related"].to_numpy())
    owner = np.repeat(np.arange(len(s)), np.diff(indptr))
    assert ((pos >= s.hist_start[owner]) & (pos < s.hist_end[owner])).all()
    assert np.array_equal(vocab.item_ids[s.event_rows[pos]], ds.related["item_id"].to_numpy())


@pytest.mark.skipif(not ML_SMALL.is_dir(), reason="shared MovieLens data not present")
def test_movielens_split_per_user_vs_global(tmp_path: Path) -> None:
    events, impressions = convert_movielens(ML_SMALL)
    write_dataset(tmp_path, events, impressions, {"source": "movielens"})
    ds = read_dataset(tmp_path)
    per_user = build_samples(ds, None, max_seq_len=200)
    assert len(np.unique(per_user.user_index[per_user.split == TEST])) == 610
    glob = build_samples(ds, None, max_seq_len=200, split="global")
    # users' activity spans 22 years: a global cut tests only a minority of them
    assert len(np.unique(glob.user_index[glob.split == TEST])) < 150
    assert per_user.hist_len.max() == 200
