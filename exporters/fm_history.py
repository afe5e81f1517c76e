"""The FM-history channel offline (LoopFM): when entries are taken, the FM's representation at each,
the encoder that orders and compresses them, and the point-in-time join of entries to impressions.

An entry is the FM's representation of a user at one past moment: here the FM user tower's output
from the user's events strictly before that moment (the paper uses shallow intermediate activations
of the FM for a past example; see docs/models.md for where this departs). Entries are taken

- at each distinct time the user had an impression (`at="impressions"`, the default): one entry per
  past request, as LoopFM keeps one per past example; or
- after every `stride`-th event of the user (`at="events"`), for data whose impressions are too few
  or too regular to describe the user's past (an entry then covers its event: its time is one second
  after it).

An entry with no event before it says nothing about the user and is not taken.

The encoder projects each representation onto Matryoshka-ordered dimensions, so that any prefix d'
is the best d'-dimensional summary the encoder knows, and fixes how entries are packed (fp32, INT8
or INT4, `feature_store.fm_history`). `PcaEncoder` is the implementation here: principal axes fitted
on the training split, ordered by explained variance, which gives the Matryoshka ordering with no
training. An autoencoder trained with a Matryoshka loss (the paper's choice) would be another
`HistoryEncoder` with the same file contract (`load_encoder` dispatches on `kind`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from exporters.bundle import Bundle, item_rows, read_manifest
from exporters.dataset import count_before, read_dataset
from exporters.features import time_buckets
from exporters.samples import ItemVocab, Samples, build_samples, gather_histories
from feature_store import fm_history as codec
from feature_store.fm_history import Encoding

HistoryAt = Literal["impressions", "events"]
ENCODER_FILE = "fm_history_encoder.npz"
# Rows the PCA is fitted on at most (a seeded sample beyond): the covariance of a few hundred
# thousand 32-dim rows is as good as that of all of them.
PCA_MAX_ROWS = 200_000


@dataclass(frozen=True, slots=True, eq=False)
class EntryTable:
    """Entries of many users, sorted by (user, time), at most one per (user, time)."""

    user: np.ndarray  # int64 [N], index into the dataset's sorted user ids (`Samples.users`)
    time: np.ndarray  # int64 [N], seconds; the entry describes the user strictly before it
    vectors: np.ndarray  # float32 [N, d]: the FM representation, or its encoding

    def __len__(self) -> int:
        return len(self.time)


def entry_times(s: Samples, at: HistoryAt = "impressions", stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(user [N], time [N]) of the entries of a dataset, sorted by (user, time), without duplicates,
    each with at least one event strictly before it."""
    if at == "impressions":
        user, time = s.user_index, s.target_ts
    elif at == "events":
        if stride < 1:
            raise ValueError(f"the event stride must be >= 1, got {stride}")
        starts = np.searchsorted(s.event_user, s.event_user)  # each event's user's first event
        rank = np.arange(len(s.event_user)) - starts
        take = rank % stride == stride - 1
        user, time = s.event_user[take], s.event_ts[take] + 1
    else:
        raise ValueError(f"entries are taken at 'impressions' or 'events', not {at!r}")
    order = np.lexsort((time, user))
    user, time = np.asarray(user, np.int64)[order], np.asarray(time, np.int64)[order]
    if len(user):
        first = np.r_[True, (user[1:] != user[:-1]) | (time[1:] != time[:-1])]
        user, time = user[first], time[first]
    has_past = count_before(s.event_user, s.event_ts, user, time) > np.searchsorted(s.event_user, user)
    return user[has_past], time[has_past]


def fm_representations(
    fm_bundle: Bundle,
    s: Samples,
    raw_event_items: np.ndarray,
    user: np.ndarray,
    time: np.ndarray,
    batch_size: int = 512,
) -> np.ndarray:
    """[N, d_fm] float32: the FM user tower at each (user, time), from the user's newest events strictly
    before the time (the FM's own window), ages measured from the time (ONNX Runtime)."""
    dim = fm_bundle.manifest.dims.fm
    out = np.zeros((len(time), dim), np.float32)
    if len(time) == 0:
        return out
    end = count_before(s.event_user, s.event_ts, user, time)
    view = dataclasses.replace(
        s,
        event_rows=item_rows(fm_bundle.item_ids, raw_event_items),
        hist_start=np.searchsorted(s.event_user, user).astype(np.int64),
        hist_end=end.astype(np.int64),
        max_seq_len=fm_bundle.manifest.max_seq_len,
    )
    # entries of similar history length together keep the padding small
    order = np.argsort(np.minimum(view.hist_end - view.hist_start, view.max_seq_len), kind="stable")
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        rows, ts, lengths = gather_histories(view, idx)
        if rows.shape[1] == 0:
            rows, ts = np.zeros((len(idx), 1), np.int64), np.zeros((len(idx), 1), np.int64)
        mask = np.arange(rows.shape[1])[None, :] < lengths[:, None]
        feeds = {
            "behaviors": rows,
            "buckets": np.where(mask, time_buckets(time[idx][:, None] - ts), 0),
            "mask": mask.astype(np.float32),
        }
        out[idx] = fm_bundle.session.run(None, feeds)[0]
    return out


def history_entries(
    fm_bundle: Bundle,
    s: Samples,
    raw_event_items: np.ndarray,
    at: HistoryAt = "impressions",
    stride: int = 1,
) -> EntryTable:
    """Every entry of a dataset with its FM representation: what `train` joins and `fm-embed` writes."""
    user, time = entry_times(s, at, stride)
    return EntryTable(user, time, fm_representations(fm_bundle, s, raw_event_items, user, time))


class HistoryEncoder(Protocol):
    """Maps FM representations to Matryoshka-ordered vectors and names how they are packed."""

    @property
    def kind(self) -> str:
        """What the file holds (`load_encoder` dispatches on it)."""
        ...

    @property
    def fm_version(self) -> str:
        """The FM whose representations it encodes."""
        ...

    @property
    def encoding(self) -> Encoding:
        """How an entry's values are stored."""
        ...

    @property
    def version(self) -> str:
        """The encoder version entries are stored under; changes with any parameter."""
        ...

    @property
    def dim(self) -> int:
        """Dimensions of an encoded vector (what an entry stores)."""
        ...

    def transform(self, x: np.ndarray) -> np.ndarray:
        """[N, d_fm] -> [N, dim] float32, most informative dimensions first."""
        ...

    def save(self, path: Path) -> None:
        """Write the encoder as a plain .npz (no pickle)."""
        ...


@dataclass(frozen=True, eq=False)
class PcaEncoder:
    """Principal axes of the FM representations: y = (x - mean) @ components, columns by explained
    variance, so every prefix of y is the best linear summary of x of its size."""

    fm_version: str
    encoding: Encoding
    mean: np.ndarray  # float32 [d_fm]
    components: np.ndarray  # float32 [d_fm, dim]
    explained: np.ndarray  # float64 [dim]: share of the variance of each component
    kind: str = "pca"

    @property
    def version(self) -> str:
        h = hashlib.sha256(f"{self.kind}|{self.fm_version}|{self.encoding}|".encode())
        h.update(np.ascontiguousarray(self.mean, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.components, "<f4").tobytes())
        return f"{self.kind}-{h.hexdigest()[:12]}"

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(
        cls, x: np.ndarray, *, fm_version: str, encoding: Encoding, dim: int | None = None, seed: int = 0
    ) -> PcaEncoder:
        """Fit on representations [N, d_fm] (at most PCA_MAX_ROWS of them, a seeded sample)."""
        if encoding not in codec.ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(codec.ENCODINGS)}")
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(
                f"fitting the FM-history encoder needs at least two representations, got {x.shape}"
            )
        dim = x.shape[1] if dim is None else dim
        if not 1 <= dim <= x.shape[1]:
            raise ValueError(f"the encoder keeps 1 to {x.shape[1]} dims, not {dim}")
        if len(x) > PCA_MAX_ROWS:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), PCA_MAX_ROWS, replace=False))]
        mean = x.mean(axis=0)
        centred = x - mean
        values, vectors = np.linalg.eigh(centred.T @ centred / len(x))
        order = np.argsort(values)[::-1][:dim]
        components = vectors[:, order]
        # eigh's signs are arbitrary: fix them so a refit on the same data gives the same encoder
        flip = np.sign(components[np.abs(components).argmax(axis=0), np.arange(dim)])
        components = components * np.where(flip == 0, 1.0, flip)
        total = float(values.clip(min=0).sum())
        explained = values[order].clip(min=0) / total if total > 0 else np.zeros(dim)
        return cls(fm_version, encoding, mean.astype(np.float32), components.astype(np.float32), explained)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) @ self.components).astype(np.float32)

    def save(self, path: Path) -> None:
        meta = {"kind": self.kind, "fm_version": self.fm_version, "encoding": self.encoding}
        with open(path, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta, sort_keys=True)),
                mean=self.mean,
                components=self.components,
                explained=self.explained,
            )


def load_encoder(path: Path | str) -> HistoryEncoder:
    """Read an encoder file, or the one in a ranker bundle folder (`fm_history_encoder.npz`)."""
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            meta: dict[str, Any] = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in z.files if name != "meta"}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an FM-history encoder file ({e})") from e
    if meta.get("kind") != "pca":
        raise ValueError(f"{path}: unknown FM-history encoder kind {meta.get('kind')!r}")
    encoder = PcaEncoder(
        str(meta["fm_version"]),
        meta["encoding"],
        arrays["mean"].astype(np.float32),
        arrays["components"].astype(np.float32),
        arrays["explained"].astype(np.float64),
    )
    if encoder.encoding not in codec.ENCODINGS or encoder.mean.shape != (encoder.components.shape[0],):
        raise ValueError(f"{path}: inconsistent FM-history encoder ({meta}, mean {encoder.mean.shape})")
    return encoder


def pack(encoder: HistoryEncoder, entries: EntryTable) -> list[bytes]:
    """Each entry encoded and packed as the store keeps it (times from the table)."""
    return codec.encode_entries(
        entries.time,
        encoder.transform(entries.vectors),
        fm_version=encoder.fm_version,
        encoder_version=encoder.version,
        encoding=encoder.encoding,
    )


def served_vectors(encoder: HistoryEncoder, entries: EntryTable, prefix: int) -> np.ndarray:
    """[N, prefix] float32: each entry as the service decodes it from the store (encoded, quantized,
    first `prefix` dims), so training sees the quantization error serving will see."""
    if not 1 <= prefix <= encoder.dim:
        raise ValueError(f"the prefix must be 1 to {encoder.dim} dims, not {prefix}")
    parsed = codec.parse_entries(pack(encoder, entries))
    return codec.decode_vectors(parsed, np.arange(len(parsed)), prefix)


def by_user(user_ids: np.ndarray, entries: EntryTable, blobs: list[bytes]) -> dict[str, list[bytes]]:
    """Packed entries grouped by user id (for `FeatureStore.write_fm_history`)."""
    if not len(entries):
        return {}
    bounds = np.flatnonzero(np.r_[True, entries.user[1:] != entries.user[:-1], True]).tolist()
    return {str(user_ids[entries.user[a]]): blobs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


@dataclass(frozen=True, slots=True, eq=False)
class HistoryJoin:
    """Per impression, its entries: [start, end) into `vectors` (sorted by user, then time)."""

    vectors: np.ndarray  # float32 [N_entries, d'], as served
    start: np.ndarray  # int64 [n_impressions]
    end: np.ndarray  # int64 [n_impressions]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def batch(self, idx: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([B, H, d'] float32, [B, H] float32 mask) of impressions idx, oldest entry first, padded at the
        end (H >= 1); rows where `keep` is False get no entries (FM-history dropout)."""
        start, end = self.start[idx], self.end[idx]
        n = end - start
        if keep is not None:
            n = np.where(keep, n, 0)
        width = max(int(n.max(initial=0)), 1)
        cols = np.arange(width)
        mask = cols[None, :] < n[:, None]
        pos = np.where(mask, start[:, None] + cols[None, :], 0)
        vectors = self.vectors[pos] if len(self.vectors) else np.zeros((*pos.shape, self.dim), np.float32)
        return np.where(mask[..., None], vectors, 0.0).astype(np.float32), mask.astype(np.float32)


def join_history(
    entries: EntryTable, vectors: np.ndarray, s: Samples, length: int, lag_s: int = 0
) -> HistoryJoin:
    """Point-in-time join: impression i gets the newest `length` entries of its user whose time plus
    `lag_s` is strictly before its timestamp, as `feature_store.fm_history.select_history` chooses."""
    if length < 1 or lag_s < 0:
        raise ValueError(f"length must be >= 1 and lag_s >= 0, got {length} and {lag_s}")
    end = count_before(entries.user, entries.time, s.user_index, s.target_ts - lag_s)
    start = np.maximum(np.searchsorted(entries.user, s.user_index), end - length)
    return HistoryJoin(np.asarray(vectors, np.float32), start.astype(np.int64), end.astype(np.int64))


def fit_rows(entries: EntryTable, s: Samples, evaluated: np.ndarray) -> np.ndarray:
    """Mask of the entries an encoder may be fitted on: per user, those strictly before the user's first
    evaluated (validation or test) impression, as the item vectors are learned."""
    n_users = len(s.users)
    cutoff = np.full(n_users, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(cutoff, s.user_index[evaluated], s.target_ts[evaluated])
    return entries.time < cutoff[entries.user]


@dataclass(frozen=True, slots=True, eq=False)
class DatasetHistory:
    """A dataset's entries packed by an encoder, grouped by user id, as `fm-embed` writes them."""

    by_user: dict[str, list[bytes]]
    n_entries: int
    n_bytes: int


def dataset_history(
    fm_bundle: Bundle, data: Path, encoder: HistoryEncoder, at: HistoryAt = "impressions", stride: int = 1
) -> DatasetHistory:
    """Every entry of a dataset folder, computed, encoded and packed (the same entries `train` joins)."""
    if fm_bundle.manifest.tag != encoder.fm_version:
        raise ValueError(
            f"the FM-history encoder is for FM {encoder.fm_version}, "
            f"the fm bundle is {fm_bundle.manifest.tag}"
        )
    ds = read_dataset(data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, 1)
    entries = history_entries(fm_bundle, s, vocab.item_ids[s.event_rows], at, stride)
    blobs = pack(encoder, entries)
    return DatasetHistory(by_user(s.users, entries, blobs), len(blobs), sum(map(len, blobs)))


def history_options(path: Path) -> tuple[HistoryAt, int] | None:
    """(at, stride) a ranker bundle's entries were taken with; None for an encoder file."""
    if not (path.is_dir() and (path / "manifest.json").is_file()):
        return None
    spec = read_manifest(path).fm_history
    if spec is None:
        raise ValueError(f"{path}: the bundle was not trained with an FM history")
    extra = spec.model_extra or {}
    at = extra.get("at", "impressions")
    return ("events" if at == "events" else "impressions"), int(extra.get("stride", 1))
