"""The canonical dataset folder: `events.parquet`, `impressions.parquet`, `meta.json`, `related.parquet`."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENTS_FILE = "events.parquet"
IMPRESSIONS_FILE = "impressions.parquet"
RELATED_FILE = "related.parquet"
META_FILE = "meta.json"

# Column kinds: "string" (user ids), "int" (any integer dtype, stored as int64), "label" (0/1).
EVENT_COLUMNS = {"user_id": "string", "item_id": "int", "category_id": "int", "timestamp": "int"}
IMPRESSION_COLUMNS = {"user_id": "string", "item_id": "int", "timestamp": "int", "label": "label"}
RELATED_COLUMNS = {"impression_id": "int", "user_id": "string", "item_id": "int", "timestamp": "int"}


class DatasetError(ValueError):
    """A dataset folder, table or column that breaks the canonical contract."""


@dataclass(frozen=True)
class Dataset:
    """A canonical dataset in memory: events sorted by (user_id, timestamp, item_id), impressions by row."""

    events: pd.DataFrame
    impressions: pd.DataFrame
    meta: dict[str, Any]
    related: pd.DataFrame | None = None


def _normalize(df: pd.DataFrame, spec: dict[str, str], name: str) -> pd.DataFrame:
    """Checks required columns and dtypes; returns a copy with canonical dtypes (extra columns kept)."""
    missing = [c for c in spec if c not in df.columns]
    if missing:
        raise DatasetError(f"{name}: missing column(s) {missing}; found {list(df.columns)}")
    out = df.copy(deep=False)  # copy-on-write: column replacements below never touch the caller's frame
    for col, kind in spec.items():
        s = out[col]
        if s.isna().any():
            raise DatasetError(f"{name}: column '{col}' has {int(s.isna().sum())} null value(s)")
        if kind == "string":
            is_cat = isinstance(s.dtype, pd.CategoricalDtype)
            if not (
                pd.api.types.is_string_dtype(s.cat.categories) if is_cat else pd.api.types.is_string_dtype(s)
            ):
                raise DatasetError(f"{name}: column '{col}' must be string, found {s.dtype}")
            out[col] = s.astype("str")
        elif kind == "int":
            if not pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
                raise DatasetError(f"{name}: column '{col}' must be an integer type, found {s.dtype}")
            out[col] = s.astype(np.int64)
        else:  # label
            if not (pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype)):
                raise DatasetError(f"{name}: column '{col}' must be integer 0/1, found {s.dtype}")
            bad = ~s.isin([0, 1])
            if bad.any():
                raise DatasetError(f"{name}: column '{col}' must be 0/1, found {s[bad].iloc[0]}")
            out[col] = s.astype(np.int8)
    return out


def _events_sorted(events: pd.DataFrame) -> bool:
    """True when events are in (user_id, timestamp, item_id) order."""
    if len(events) < 2:
        return True
    codes, _ = pd.factorize(events["user_id"], sort=True)
    order = np.lexsort((events["item_id"].to_numpy(), events["timestamp"].to_numpy(), codes))
    return bool(np.array_equal(order, np.arange(len(events))))


def sort_events(events: pd.DataFrame) -> pd.DataFrame:
    """Events in canonical (user_id, timestamp, item_id) order, index reset; a no-op when already sorted."""
    if _events_sorted(events):
        return events.reset_index(drop=True)
    codes, _ = pd.factorize(events["user_id"], sort=True)
    order = np.lexsort((events["item_id"].to_numpy(), events["timestamp"].to_numpy(), codes))
    return events.iloc[order].reset_index(drop=True)


def item_categories(
    events: pd.DataFrame, impressions: pd.DataFrame | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique item ids and each one's category, first seen in events, then in impressions."""
    items = [events["item_id"].to_numpy(np.int64)]
    cats = [events["category_id"].to_numpy(np.int64)]
    if impressions is not None and "category_id" in impressions.columns:
        items.append(impressions["item_id"].to_numpy(np.int64))
        cats.append(impressions["category_id"].to_numpy(np.int64))
    all_items = np.concatenate(items)
    uniq, first = np.unique(all_items, return_index=True)
    return uniq, np.concatenate(cats)[first]


def lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: int = 0) -> np.ndarray:
    """Vectorized map from sorted `keys` to `values`; `default` where a query is not a key."""
    query = np.asarray(query, dtype=keys.dtype)
    if len(keys) == 0:
        return np.full(len(query), default, dtype=values.dtype)
    pos = np.searchsorted(keys, query)
    pos_c = np.minimum(pos, len(keys) - 1)
    found = keys[pos_c] == query
    return np.where(found, values[pos_c], default).astype(values.dtype)


def count_before(
    ev_group: np.ndarray, ev_ts: np.ndarray, q_group: np.ndarray, q_ts: np.ndarray
) -> np.ndarray:
    """Per query, how many of the (group, ts)-sorted events sort before (q_group, q_ts); same second excluded.

    The result is the end (exclusive) of the query's strictly-earlier history in the event arrays; the start
    of its group is `np.searchsorted(ev_group, q_group)`. Merging instead of packing (group, ts) into one
    int64 key keeps it exact for any id or timestamp range.
    """
    n_e = len(ev_group)
    group = np.concatenate([np.asarray(ev_group, np.int64), np.asarray(q_group, np.int64)])
    ts = np.concatenate([np.asarray(ev_ts, np.int64), np.asarray(q_ts, np.int64)])
    # queries sort before events of the same second: an event at the query's exact second is not history
    kind = np.concatenate([np.ones(n_e, np.int8), np.zeros(len(q_group), np.int8)])
    order = np.lexsort((kind, ts, group))
    is_event = order < n_e
    before = np.cumsum(is_event, dtype=np.int64) - is_event
    out = np.empty(len(q_group), dtype=np.int64)
    out[order[~is_event] - n_e] = before[~is_event]
    return out


def _to_table(df: pd.DataFrame, string_cols: list[str]) -> pa.Table:
    table = pa.Table.from_pandas(df, preserve_index=False)
    # pandas' str dtype may map to large_string; readers and the contract expect plain string
    for col in string_cols:
        i = table.schema.get_field_index(col)
        if i >= 0 and table.schema.field(i).type != pa.string():
            table = table.set_column(i, col, table.column(i).cast(pa.string()))
    return table


def dataset_counts(events: pd.DataFrame, impressions: pd.DataFrame) -> dict[str, Any]:
    """Counts written to meta.json and printed by the CLI."""
    labels = impressions["label"].to_numpy()
    return {
        "users": int(events["user_id"].nunique()),
        "items": int(
            np.unique(np.concatenate([events["item_id"].to_numpy(), impressions["item_id"].to_numpy()])).size
        ),
        "categories": int(events["category_id"].nunique()),
        "events": int(len(events)),
        "impressions": int(len(impressions)),
        "positives": int(labels.sum()),
        "positive_rate": round(float(labels.mean()), 6) if len(labels) else 0.0,
    }


def write_dataset(
    out_dir: str | Path,
    events: pd.DataFrame,
    impressions: pd.DataFrame,
    meta: dict[str, Any],
    related: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Writes a validated canonical folder (events sorted, impressions in row order); returns its meta."""
    out = Path(out_dir)
    events = sort_events(_normalize(events, EVENT_COLUMNS, EVENTS_FILE))
    impressions = _normalize(impressions, IMPRESSION_COLUMNS, IMPRESSIONS_FILE).reset_index(drop=True)
    if "category_id" not in impressions.columns:
        keys, values = item_categories(events)
        impressions["category_id"] = lookup(keys, values, impressions["item_id"].to_numpy())
    _check_impression_ids(impressions, IMPRESSIONS_FILE)
    if related is not None:
        related = _normalize(related, RELATED_COLUMNS, RELATED_FILE)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(_to_table(events, ["user_id"]), out / EVENTS_FILE)
    pq.write_table(_to_table(impressions, ["user_id"]), out / IMPRESSIONS_FILE)
    if related is not None:
        pq.write_table(_to_table(related, ["user_id"]), out / RELATED_FILE)
    elif (out / RELATED_FILE).exists():
        (out / RELATED_FILE).unlink()  # a stale truth file from an earlier run would mislead
    full_meta = {**meta, "counts": {**meta.get("counts", {}), **dataset_counts(events, impressions)}}
    if related is not None:
        full_meta["counts"]["related"] = int(len(related))
    (out / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    return full_meta


def _check_impression_ids(impressions: pd.DataFrame, name: str) -> None:
    if "impression_id" in impressions.columns:
        ids = impressions["impression_id"].to_numpy()
        if not np.array_equal(ids, np.arange(len(impressions))):
            raise DatasetError(
                f"{name}: column 'impression_id' must equal the row index 0..{len(impressions) - 1}"
            )
        impressions["impression_id"] = ids.astype(np.int64)
    else:
        impressions["impression_id"] = np.arange(len(impressions), dtype=np.int64)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc


def read_dataset(path: str | Path) -> Dataset:
    """Reads and validates a canonical dataset folder; `related` is None when the folder has no truth file."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    events = sort_events(_normalize(_read_table(root / EVENTS_FILE), EVENT_COLUMNS, EVENTS_FILE))
    impressions = _normalize(_read_table(root / IMPRESSIONS_FILE), IMPRESSION_COLUMNS, IMPRESSIONS_FILE)
    if "category_id" in impressions.columns:
        if not pd.api.types.is_integer_dtype(impressions["category_id"].dtype):
            raise DatasetError(f"{IMPRESSIONS_FILE}: column 'category_id' must be an integer type")
        impressions["category_id"] = impressions["category_id"].astype(np.int64)
    else:
        keys, values = item_categories(events)
        impressions["category_id"] = lookup(keys, values, impressions["item_id"].to_numpy())
    _check_impression_ids(impressions, IMPRESSIONS_FILE)
    related = None
    if (root / RELATED_FILE).is_file():
        related = _normalize(_read_table(root / RELATED_FILE), RELATED_COLUMNS, RELATED_FILE)
    meta: dict[str, Any] = {}
    if (root / META_FILE).is_file():
        try:
            meta = json.loads((root / META_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{root / META_FILE}: invalid JSON ({exc})") from exc
    return Dataset(events=events, impressions=impressions, meta=meta, related=related)


Column: TypeAlias = "np.ndarray | pa.Array[Any]"


class DatasetWriter:
    """Writes a canonical folder from columns already in canonical order, a batch of rows at a time, so that a
    table of 10^8 rows never becomes a pandas frame or a column of Python strings.

    `user_id` columns hold integer codes into `user_ids` (unique strings, any order); every other column is a
    numpy array or a pyarrow array. `order`, when given, is the row order to write (row `order[i]` at
    position `i`). The checks are `write_dataset`'s, except that events must already be sorted (they are
    checked, not sorted) and impressions must carry `category_id`.

    Files go to a hidden sibling folder first; `commit` moves them into place, so that a failure (an
    exception inside the `with` block) leaves no half-written folder and an existing one as it was."""

    def __init__(self, out_dir: str | Path, batch_rows: int = 1 << 20) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise DatasetError(f"{self.out}: exists and is not a folder")
        self.batch_rows = batch_rows
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.counts: dict[str, Any] = {}
        self._event_items: np.ndarray | None = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def write_events(
        self, user_ids: pa.Array[Any], columns: dict[str, Column], order: np.ndarray | None
    ) -> None:
        n = _check_columns(columns, EVENT_COLUMNS, EVENTS_FILE, user_ids, order)
        # created at the first write, so that a conversion that fails before it leaves nothing behind
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        used = np.zeros(len(user_ids), bool)
        last: pa.Table | None = None
        with pq.ParquetWriter(self.tmp / EVENTS_FILE, _schema(columns, EVENT_COLUMNS)) as writer:
            for start, batch in _batches(n, self.batch_rows, order):
                table = _batch_table(columns, EVENT_COLUMNS, user_ids, batch, start)
                used[np.asarray(_take(columns["user_id"], batch))] = True
                # the batch and the last row before it, so that the order is checked across batches too
                _check_sorted(
                    table if last is None else pa.concat_tables([last, table]), start - (last is not None)
                )
                last = table.slice(table.num_rows - 1) if table.num_rows else last
                writer.write_table(table)
        self._event_items = sorted_distinct(np.asarray(columns["item_id"]))
        self.counts.update(
            users=int(used.sum()),
            categories=int(len(sorted_distinct(np.asarray(columns["category_id"])))),
            events=n,
        )

    def write_impressions(
        self, user_ids: pa.Array[Any], columns: dict[str, Column], order: np.ndarray | None
    ) -> None:
        if self._event_items is None:
            raise DatasetError("write the events before the impressions")
        spec = {**IMPRESSION_COLUMNS, "category_id": "int"}
        n = _check_columns(columns, spec, IMPRESSIONS_FILE, user_ids, order)
        if "impression_id" not in columns:
            # after the required columns and category_id, before the extras: where write_dataset puts it
            names = list(columns)
            at = max(names.index(c) for c in spec) + 1
            columns = {
                **{c: columns[c] for c in names[:at]},
                "impression_id": _ROW_INDEX,
                **{c: columns[c] for c in names[at:]},
            }
        positives = 0
        with pq.ParquetWriter(self.tmp / IMPRESSIONS_FILE, _schema(columns, spec)) as writer:
            for start, batch in _batches(n, self.batch_rows, order):
                table = _batch_table(columns, spec, user_ids, batch, start)
                ids = table.column("impression_id").to_numpy()
                if not np.array_equal(ids, np.arange(start, start + len(ids))):
                    raise DatasetError(
                        f"{IMPRESSIONS_FILE}: column 'impression_id' must equal the row index 0..{n - 1}"
                    )
                positives += int(pc.sum(table.column("label")).as_py() or 0)
                writer.write_table(table)
        # distinct per table first: concatenating the full columns would double them in memory
        items = sorted_distinct(
            np.concatenate([self._event_items, sorted_distinct(np.asarray(columns["item_id"]))])
        )
        self.counts.update(
            items=int(len(items)),
            impressions=n,
            positives=positives,
            positive_rate=round(positives / n, 6) if n else 0.0,
        )

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Writes meta.json with the counts and moves the folder into place; returns the full meta."""
        if not (self.tmp / EVENTS_FILE).is_file() or not (self.tmp / IMPRESSIONS_FILE).is_file():
            raise DatasetError("write the events and the impressions before committing")
        full_meta = {**meta, "counts": {**meta.get("counts", {}), **self.counts}}
        (self.tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        if not self.out.exists():
            self.tmp.rename(self.out)
            return full_meta
        # an existing folder may hold other files: replace ours one by one (each atomically), meta.json last
        for name in (EVENTS_FILE, IMPRESSIONS_FILE):
            os.replace(self.tmp / name, self.out / name)
        if (self.out / RELATED_FILE).exists():
            (self.out / RELATED_FILE).unlink()  # a stale truth file from an earlier run would mislead
        os.replace(self.tmp / META_FILE, self.out / META_FILE)
        self.tmp.rmdir()
        return full_meta


# marks the impression_id column the writer fills with the row index
_ROW_INDEX = np.zeros(0, np.int64)


def _check_columns(
    columns: dict[str, Column],
    spec: dict[str, str],
    name: str,
    user_ids: pa.Array[Any],
    order: np.ndarray | None,
) -> int:
    """The number of rows, after write_dataset's checks: required columns, no nulls, integer types, 0/1
    labels; `user_id` codes index `user_ids`."""
    missing = [c for c in spec if c not in columns]
    if missing:
        raise DatasetError(f"{name}: missing column(s) {missing}; found {list(columns)}")
    lengths = {len(v) for v in columns.values() if v is not _ROW_INDEX}
    if len(lengths) != 1:
        raise DatasetError(f"{name}: columns of different lengths {sorted(lengths)}")
    n = lengths.pop()
    if order is not None and len(order) != n:
        raise DatasetError(f"{name}: the row order has {len(order)} entries for {n} rows")
    if not pa.types.is_string(user_ids.type) or user_ids.null_count:
        raise DatasetError(f"{name}: user ids must be strings without nulls, found {user_ids.type}")
    if pc.count_distinct(user_ids).as_py() != len(user_ids):
        raise DatasetError(f"{name}: user ids must be unique")
    for col, kind in spec.items():
        values = columns[col]
        if values is _ROW_INDEX:
            continue
        if isinstance(values, pa.Array):
            if values.null_count:
                raise DatasetError(f"{name}: column '{col}' has {values.null_count} null value(s)")
            values = values.to_numpy(zero_copy_only=False)
        if kind == "label":
            if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
                raise DatasetError(f"{name}: column '{col}' must be integer 0/1, found {values.dtype}")
            if n and (int(values.min()) < 0 or int(values.max()) > 1):
                bad = values[(values != 0) & (values != 1)][0]
                raise DatasetError(f"{name}: column '{col}' must be 0/1, found {bad}")
        elif not np.issubdtype(values.dtype, np.integer):
            what = "integer codes of the user ids" if kind == "string" else "an integer type"
            raise DatasetError(f"{name}: column '{col}' must be {what}, found {values.dtype}")
        if kind == "string" and n and (int(values.min()) < 0 or int(values.max()) >= len(user_ids)):
            raise DatasetError(f"{name}: column '{col}' has codes outside the {len(user_ids)} user ids")
    return n


def _batches(n: int, size: int, order: np.ndarray | None) -> Iterator[tuple[int, slice | np.ndarray]]:
    """(first row, rows) per batch; at least one batch, so that an empty table still gets its schema."""
    for start in range(0, max(n, 1), size):
        stop = min(start + size, n)
        yield start, (slice(start, stop) if order is None else order[start:stop])


def _take(values: Column, batch: slice | np.ndarray) -> Any:
    if isinstance(values, pa.Array):
        return values[batch] if isinstance(batch, slice) else values.take(pa.array(batch))
    return values[batch]


def _batch_table(
    columns: dict[str, Column],
    spec: dict[str, str],
    user_ids: pa.Array[Any],
    batch: slice | np.ndarray,
    start: int,
) -> pa.Table:
    arrays: dict[str, pa.Array[Any]] = {}
    for col, values in columns.items():
        if values is _ROW_INDEX:
            continue
        part = _take(values, batch)
        kind = spec.get(col)
        if kind == "string":
            arrays[col] = user_ids.take(pa.array(part))
        elif kind == "int":
            arrays[col] = pa.array(np.asarray(part, np.int64))
        elif kind == "label":
            arrays[col] = pa.array(np.asarray(part, np.int8))
        else:
            arrays[col] = part if isinstance(part, pa.Array) else pa.array(part)
    size = len(next(iter(arrays.values())))
    if "impression_id" in columns and columns["impression_id"] is _ROW_INDEX:
        arrays["impression_id"] = pa.array(np.arange(start, start + size, dtype=np.int64))
    return pa.table({col: arrays[col] for col in columns})


def _schema(columns: dict[str, Column], spec: dict[str, str]) -> pa.Schema:
    kinds: dict[str, pa.DataType] = {"string": pa.string(), "int": pa.int64(), "label": pa.int8()}
    fields = []
    for col, values in columns.items():
        kind: pa.DataType
        if col in spec:
            kind = kinds[spec[col]]
        elif values is _ROW_INDEX:
            kind = pa.int64()
        else:
            kind = values.type if isinstance(values, pa.Array) else pa.from_numpy_dtype(values.dtype)
        fields.append(pa.field(col, kind))
    return pa.schema(fields)


def _check_sorted(table: pa.Table, first_row: int) -> None:
    """Raises unless the rows are in (user_id as a string, timestamp, item_id) order."""
    if table.num_rows < 2:
        return
    user = table.column("user_id").combine_chunks()
    ts = table.column("timestamp").to_numpy()
    item = table.column("item_id").to_numpy()
    head, tail = user[:-1], user[1:]
    down = pc.less(tail, head).to_numpy(zero_copy_only=False)
    same = pc.equal(tail, head).to_numpy(zero_copy_only=False)
    dts, ditem = np.diff(ts), np.diff(item)
    bad = down | (same & ((dts < 0) | ((dts == 0) & (ditem < 0))))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{EVENTS_FILE}: rows must be sorted by (user_id, timestamp, item_id); row {first_row + i + 1} "
            f"({user[i + 1]}, {ts[i + 1]}, {item[i + 1]}) follows ({user[i]}, {ts[i]}, {item[i]})"
        )


def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct integers (int64): a presence table over the value range when it is moderate, else a
    sort. Not np.unique: numpy 2.4's hash-based unique takes tens of seconds on 10^7 int64 values."""
    if len(values) == 0:
        return np.zeros(0, np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < max(4 * len(values), 1 << 24):
        present = np.zeros(hi - lo + 1, bool)
        present[values - lo] = True
        return np.flatnonzero(present) + lo
    ordered = np.sort(values.astype(np.int64))
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]]
