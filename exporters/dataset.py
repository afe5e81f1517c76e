"""The canonical dataset folder: `events.parquet`, `impressions.parquet`, `meta.json`, `related.parquet`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
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
