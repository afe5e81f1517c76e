"""The canonical dataset folder: round trip, canonical order and dtypes, clear validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporters.dataset import (
    DatasetError,
    count_before,
    item_categories,
    lookup,
    read_dataset,
    write_dataset,
)


def _events() -> pd.DataFrame:
    # deliberately out of canonical order; "u10" sorts before "u2" as a string
    return pd.DataFrame(
        {
            "user_id": ["u2", "u10", "u2", "u2", "u10"],
            "item_id": [7, 5, 3, 9, 5],
            "category_id": [1, 2, 3, 1, 2],
            "timestamp": [30, 5, 10, 10, 6],
        }
    )


def _impressions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["u2", "u10", "u2"],
            "item_id": [9, 11, 3],
            "category_id": [1, 4, 3],
            "timestamp": [20, 7, 40],
            "label": np.array([1, 0, 0], np.int8),
        }
    )


def test_round_trip_sorts_events_and_keeps_impression_rows(tmp_path: Path) -> None:
    meta = write_dataset(tmp_path, _events(), _impressions(), {"source": "test", "seed": 3})
    ds = read_dataset(tmp_path)
    assert ds.events["user_id"].tolist() == ["u10", "u10", "u2", "u2", "u2"]
    assert ds.events["timestamp"].tolist() == [5, 6, 10, 10, 30]
    assert ds.events["item_id"].tolist() == [5, 5, 3, 9, 7]  # same second: by item id
    assert ds.impressions["item_id"].tolist() == [9, 11, 3]
    assert ds.impressions["impression_id"].tolist() == [0, 1, 2]
    assert ds.impressions["label"].dtype == np.int8
    for col in ("item_id", "category_id", "timestamp"):
        assert ds.events[col].dtype == np.int64
    assert ds.related is None
    assert ds.meta["source"] == "test" and ds.meta["seed"] == 3
    assert meta["counts"] == {
        "users": 2,
        "items": 5,
        "categories": 3,
        "events": 5,
        "impressions": 3,
        "positives": 1,
        "positive_rate": round(1 / 3, 6),
    }
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    schema = pq.read_schema(tmp_path / "events.parquet")
    assert schema.field("user_id").type == pa.string()
    assert schema.field("timestamp").type == pa.int64()


def test_missing_impression_category_is_filled_from_events(tmp_path: Path) -> None:
    imp = _impressions().drop(columns=["category_id"])
    write_dataset(tmp_path, _events(), imp, {})
    assert read_dataset(tmp_path).impressions["category_id"].tolist() == [1, 0, 3]  # item 11 unknown -> 0


def test_related_is_written_and_read(tmp_path: Path) -> None:
    related = pd.DataFrame({"impression_id": [0], "user_id": ["u2"], "item_id": [3], "timestamp": [10]})
    meta = write_dataset(tmp_path, _events(), _impressions(), {}, related=related)
    ds = read_dataset(tmp_path)
    assert ds.related is not None and ds.related.to_dict("list") == related.to_dict("list")
    assert meta["counts"]["related"] == 1
    write_dataset(tmp_path, _events(), _impressions(), {})  # a rewrite without truth drops the old file
    assert read_dataset(tmp_path).related is None


@pytest.mark.parametrize(
    ("table", "column", "value", "message"),
    [
        ("events", "item_id", [1.5, 2, 3, 4, 5], "events.parquet: column 'item_id' must be an integer"),
        ("events", "user_id", [1, 2, 3, 4, 5], "events.parquet: column 'user_id' must be string"),
        ("impressions", "label", [0, 2, 1], "impressions.parquet: column 'label' must be 0/1, found 2"),
        (
            "impressions",
            "timestamp",
            [1.0, 2.0, 3.0],
            "impressions.parquet: column 'timestamp' must be an integer",
        ),
    ],
)
def test_bad_column_is_named(tmp_path: Path, table: str, column: str, value: list, message: str) -> None:
    write_dataset(tmp_path, _events(), _impressions(), {})
    df = _events() if table == "events" else _impressions()
    df[column] = value
    df.to_parquet(tmp_path / f"{table}.parquet", index=False)
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


def test_missing_column_and_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="impressions.parquet: missing column.*'label'"):
        write_dataset(tmp_path, _events(), _impressions().drop(columns=["label"]), {})
    write_dataset(tmp_path, _events(), _impressions(), {})
    (tmp_path / "impressions.parquet").unlink()
    with pytest.raises(DatasetError, match="impressions.parquet: file not found"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        read_dataset(tmp_path / "nope")


def test_impression_id_must_be_the_row_index(tmp_path: Path) -> None:
    imp = _impressions().assign(impression_id=[0, 2, 1])
    with pytest.raises(DatasetError, match="impression_id"):
        write_dataset(tmp_path, _events(), imp, {})


def test_item_categories_first_seen_and_lookup() -> None:
    ev = pd.DataFrame(
        {"user_id": ["a"] * 3, "item_id": [5, 3, 5], "category_id": [2, 1, 9], "timestamp": [1, 2, 3]}
    )
    imp = pd.DataFrame({"item_id": [3, 8], "category_id": [7, 4]})
    keys, cats = item_categories(ev, imp)
    assert keys.tolist() == [3, 5, 8] and cats.tolist() == [1, 2, 4]
    assert lookup(keys, cats, np.array([8, 4, 3, 100])).tolist() == [4, 0, 1, 0]


def test_count_before_excludes_the_same_second() -> None:
    group = np.array([0, 0, 0, 1, 1])
    ts = np.array([10, 20, 20, 5, 30])
    got = count_before(group, ts, np.array([0, 0, 0, 1, 1, 2]), np.array([20, 21, 5, 30, 31, 0]))
    assert got.tolist() == [1, 3, 0, 4, 5, 5]
