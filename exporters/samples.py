"""Training arrays from a canonical dataset: the item vocabulary, flat event arrays, per-impression history
ranges (strictly earlier events only) and a time-based train/validation/test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from exporters.dataset import Dataset, DatasetError, count_before, item_categories

TRAIN, VALID, TEST = 0, 1, 2
ITEM_IDS_FILE = "item_ids.npy"
ITEM_CATEGORIES_FILE = "item_categories.npy"
SplitMode = Literal["user", "global"]


@dataclass(frozen=True)
class ItemVocab:
    """Raw item id <-> embedding row. Row 0 is the unknown item; rows 1..n are known items by raw id."""

    raw_ids: np.ndarray  # sorted raw ids of rows 1..n
    row_category: np.ndarray  # category per row, row 0 -> 0
    n_categories: int  # max category id + 1

    @property
    def n_rows(self) -> int:
        """Rows including the reserved row 0."""
        return len(self.raw_ids) + 1

    @property
    def item_ids(self) -> np.ndarray:
        """Raw id per row, -1 for row 0 (the `item_ids.npy` layout)."""
        return np.concatenate([np.array([-1], np.int64), self.raw_ids])

    def rows(self, raw_ids: np.ndarray) -> np.ndarray:
        """Rows of raw item ids; 0 for ids not in the vocabulary."""
        q = np.asarray(raw_ids, dtype=np.int64)
        if len(self.raw_ids) == 0:
            return np.zeros(q.shape, np.int64)
        pos = np.searchsorted(self.raw_ids, q)
        pos_c = np.minimum(pos, len(self.raw_ids) - 1)
        return np.where(self.raw_ids[pos_c] == q, pos_c + 1, 0).astype(np.int64)

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> ItemVocab:
        """Every item seen in events or impressions, with its first-seen category."""
        ids, cats = item_categories(dataset.events, dataset.impressions)
        row_category = np.concatenate([np.zeros(1, np.int64), cats.astype(np.int64)])
        return cls(
            raw_ids=ids.astype(np.int64), row_category=row_category, n_categories=int(row_category.max()) + 1
        )

    @classmethod
    def from_arrays(cls, item_ids: np.ndarray, item_categories: np.ndarray) -> ItemVocab:
        """Rebuilds a vocabulary from the per-row arrays (row 0 = -1 / 0), checking their shape and order."""
        ids = np.asarray(item_ids, dtype=np.int64)
        cats = np.asarray(item_categories, dtype=np.int64)
        if ids.ndim != 1 or cats.shape != ids.shape or len(ids) == 0:
            raise DatasetError(f"item arrays must be 1-D and equal length, got {ids.shape} and {cats.shape}")
        if ids[0] != -1 or cats[0] != 0:
            raise DatasetError("item arrays: row 0 must be the unknown item (id -1, category 0)")
        if np.any(np.diff(ids[1:]) <= 0):
            raise DatasetError("item arrays: raw ids of rows 1..n must be strictly increasing")
        return cls(raw_ids=ids[1:], row_category=cats, n_categories=int(cats.max()) + 1)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids, item_categories), one entry per row."""
        return self.item_ids, self.row_category.astype(np.int64)

    def save(self, out_dir: str | Path) -> None:
        """Writes item_ids.npy and item_categories.npy."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ids, cats = self.to_arrays()
        np.save(out / ITEM_IDS_FILE, ids, allow_pickle=False)
        np.save(out / ITEM_CATEGORIES_FILE, cats, allow_pickle=False)

    @classmethod
    def load(cls, in_dir: str | Path) -> ItemVocab:
        """Reads item_ids.npy and item_categories.npy (never with pickle)."""
        root = Path(in_dir)
        return cls.from_arrays(
            np.load(root / ITEM_IDS_FILE, allow_pickle=False),
            np.load(root / ITEM_CATEGORIES_FILE, allow_pickle=False),
        )


@dataclass(frozen=True)
class Samples:
    """Flat event arrays sorted by (user, timestamp, item) and one entry per impression, in impression order.

    Impression i's history is events [hist_start[i], hist_end[i]): the user's events with a timestamp
    strictly before target_ts[i], the most recent `max_seq_len` of them.
    """

    users: np.ndarray  # sorted unique user ids (object array of str); user_index points here
    event_user: np.ndarray  # int64 user index per event
    event_rows: np.ndarray  # int64 item row per event
    event_ts: np.ndarray  # int64
    user_index: np.ndarray  # int64, per impression
    target_row: np.ndarray  # int64
    target_category: np.ndarray  # int64
    target_ts: np.ndarray  # int64
    label: np.ndarray  # float32
    hist_start: np.ndarray  # int64
    hist_end: np.ndarray  # int64
    impression_id: np.ndarray  # int64
    split: np.ndarray  # int8: 0 train, 1 validation, 2 test
    max_seq_len: int

    def __len__(self) -> int:
        return len(self.label)

    @property
    def user_id(self) -> np.ndarray:
        """User id string per impression."""
        return self.users[self.user_index]

    @property
    def hist_len(self) -> np.ndarray:
        """History length per impression (<= max_seq_len)."""
        return self.hist_end - self.hist_start

    def indices(self, split: int) -> np.ndarray:
        """Impression indices of one split (TRAIN, VALID or TEST)."""
        return np.flatnonzero(self.split == split)


def build_vocab(dataset: Dataset) -> ItemVocab:
    """The item vocabulary of a dataset."""
    return ItemVocab.from_dataset(dataset)


def build_samples(
    dataset: Dataset,
    vocab: ItemVocab | None = None,
    max_seq_len: int = 1000,
    split: SplitMode = "user",
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
) -> Samples:
    """Training arrays of a dataset: vectorized history ranges (strictly earlier events) and a time split."""
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1")
    vocab = vocab if vocab is not None else ItemVocab.from_dataset(dataset)
    ev, im = dataset.events, dataset.impressions
    all_users = pd.concat([ev["user_id"], im["user_id"]], ignore_index=True)
    codes, users = pd.factorize(all_users, sort=True)
    ev_user = codes[: len(ev)].astype(np.int64)
    im_user = codes[len(ev) :].astype(np.int64)
    ev_ts = ev["timestamp"].to_numpy(np.int64)
    ev_item = ev["item_id"].to_numpy(np.int64)
    order = np.lexsort((ev_item, ev_ts, ev_user))
    if not np.array_equal(order, np.arange(len(order))):  # read_dataset sorts already; hand-made ones may not
        ev_user, ev_ts, ev_item = ev_user[order], ev_ts[order], ev_item[order]
    im_ts = im["timestamp"].to_numpy(np.int64)
    user_start = np.searchsorted(ev_user, im_user)
    hist_end = count_before(ev_user, ev_ts, im_user, im_ts)
    hist_start = np.maximum(user_start, hist_end - max_seq_len)
    target_row = vocab.rows(im["item_id"].to_numpy(np.int64))
    if "category_id" in im.columns:
        target_category = im["category_id"].to_numpy(np.int64)
    else:
        target_category = vocab.row_category[target_row]
    impression_id = (
        im["impression_id"].to_numpy(np.int64)
        if "impression_id" in im.columns
        else np.arange(len(im), dtype=np.int64)
    )
    return Samples(
        users=np.asarray(users, dtype=object),
        event_user=ev_user,
        event_rows=vocab.rows(ev_item),
        event_ts=ev_ts,
        user_index=im_user,
        target_row=target_row,
        target_category=target_category,
        target_ts=im_ts,
        label=im["label"].to_numpy().astype(np.float32),
        hist_start=hist_start.astype(np.int64),
        hist_end=hist_end.astype(np.int64),
        impression_id=impression_id,
        split=time_split(im_user, im_ts, mode=split, valid_frac=valid_frac, test_frac=test_frac),
        max_seq_len=max_seq_len,
    )


def time_split(
    user: np.ndarray,
    ts: np.ndarray,
    mode: SplitMode = "user",
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
) -> np.ndarray:
    """Split code per impression: per-user last `test_frac` -> test, the `valid_frac` before -> valid; or a
    global cut at the (1 - valid - test, 1 - test) time quantiles."""
    if not (valid_frac >= 0 and test_frac >= 0 and valid_frac + test_frac < 1):
        raise ValueError("valid_frac and test_frac must be >= 0 and sum to less than 1")
    n = len(ts)
    out = np.zeros(n, np.int8)
    if n == 0:
        return out
    if mode == "global":
        valid_cut, test_cut = np.quantile(ts, [1 - valid_frac - test_frac, 1 - test_frac])
        out[ts >= valid_cut] = VALID
        out[ts >= test_cut] = TEST
        return out
    if mode != "user":
        raise ValueError(f"unknown split mode {mode!r}; use 'user' or 'global'")
    # ties in time keep the impressions' row order, so the split is deterministic
    order = np.lexsort((np.arange(n), ts, user))
    u_sorted = user[order]
    counts = np.bincount(u_sorted)
    size = counts[u_sorted]
    rank = np.arange(n) - (np.cumsum(counts) - counts)[u_sorted]
    n_test = np.floor(size * test_frac).astype(np.int64)
    n_valid = np.floor(size * valid_frac).astype(np.int64)
    # every user with >= 3 impressions is evaluated, even when 10 % rounds to zero
    n_test = np.where((size >= 3) & (test_frac > 0), np.maximum(n_test, 1), n_test)
    n_valid = np.where((size >= 3) & (valid_frac > 0), np.maximum(n_valid, 1), n_valid)
    from_end = size - rank
    code = np.where(from_end <= n_test, TEST, np.where(from_end <= n_test + n_valid, VALID, TRAIN))
    out[order] = code
    return out


def history(samples: Samples, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(item rows, timestamps) of impression i's history, oldest first."""
    s, e = int(samples.hist_start[i]), int(samples.hist_end[i])
    return samples.event_rows[s:e], samples.event_ts[s:e]


def gather_histories(
    samples: Samples, idx: np.ndarray, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch of histories as (rows, ts, lengths): [B, L] arrays, the most recent events, oldest first,
    padded at the end with row 0 / ts 0."""
    idx = np.asarray(idx, dtype=np.int64)
    length = samples.max_seq_len if max_len is None else max_len
    end = samples.hist_end[idx]
    start = np.maximum(samples.hist_start[idx], end - length)
    n = end - start
    width = int(n.max()) if len(n) else 0
    pos = start[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < n[:, None]
    pos = np.where(valid, pos, 0)
    if len(samples.event_rows) == 0:
        return np.zeros(pos.shape, np.int64), np.zeros(pos.shape, np.int64), n
    rows = np.where(valid, samples.event_rows[pos], 0)
    ts = np.where(valid, samples.event_ts[pos], 0)
    return rows, ts, n


def related_positions(
    dataset: Dataset, samples: Samples, vocab: ItemVocab
) -> tuple[np.ndarray, np.ndarray] | None:
    """CSR (indptr over impressions, sorted event positions) of each impression's truly related events, from
    the generator's related.parquet; None when the dataset has no truth file."""
    rel = dataset.related
    if rel is None:
        return None
    user = pd.Index(samples.users).get_indexer(rel["user_id"]).astype(np.int64)
    ts = rel["timestamp"].to_numpy(np.int64)
    row = vocab.rows(rel["item_id"].to_numpy(np.int64))
    n_e = len(samples.event_rows)
    # first event at or after (user, ts, row): queries sort before equal events
    keys = [
        np.concatenate([a, b])
        for a, b in ((samples.event_user, user), (samples.event_ts, ts), (samples.event_rows, row))
    ]
    kind = np.concatenate([np.ones(n_e, np.int8), np.zeros(len(rel), np.int8)])
    order = np.lexsort((kind, keys[2], keys[1], keys[0]))
    is_event = order < n_e
    before = np.cumsum(is_event, dtype=np.int64) - is_event
    pos = np.empty(len(rel), np.int64)
    pos[order[~is_event] - n_e] = before[~is_event]
    pos_c = np.minimum(pos, max(n_e - 1, 0))
    found = (user >= 0) & (pos < n_e)
    if n_e:
        found &= (
            (samples.event_user[pos_c] == user)
            & (samples.event_ts[pos_c] == ts)
            & (samples.event_rows[pos_c] == row)
        )
    sample_of = pd.Index(samples.impression_id).get_indexer(rel["impression_id"].to_numpy(np.int64))
    keep = found & (sample_of >= 0)
    smp, pos = sample_of[keep].astype(np.int64), pos[keep]
    order = np.lexsort((pos, smp))
    smp, pos = smp[order], pos[order]
    return np.searchsorted(smp, np.arange(len(samples) + 1)), pos
