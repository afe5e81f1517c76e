"""The Taobao-shaped generator: determinism, the file format the converter reads, the real file's shape,
memory bounded by the chunk, planted relatedness, and `dare-serve data taobao-synth`."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from exporters.convert import TAOBAO_BEHAVIORS, TAOBAO_FILE, TAOBAO_WINDOW, convert_taobao
from exporters.dataset import read_dataset
from exporters.taobao_synth import (
    ITEM_THEMES_FILE,
    META_FILE,
    USER_INTERESTS_FILE,
    TaobaoSynthConfig,
    write_taobao_csv,
)
from service.cli import app

# a few hundred users: about 30 k rows, a fraction of a second to generate
SMALL = TaobaoSynthConfig(users=300, items=20_000, categories=200, seed=3, chunk_users=128)
NAMES = ["user", "item", "category", "behavior", "timestamp"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], pd.DataFrame]:
    """(csv path, summary, rows as read back) of SMALL."""
    path = tmp_path_factory.mktemp("taobao") / TAOBAO_FILE
    summary = write_taobao_csv(path, SMALL)
    rows = pd.read_csv(path, header=None, names=NAMES)
    return path, summary, rows


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    cfg = replace(SMALL, users=120)
    files = (TAOBAO_FILE, ITEM_THEMES_FILE, USER_INTERESTS_FILE)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_taobao_csv(tmp_path / name / TAOBAO_FILE, replace(cfg, seed=seed))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes(), f
    assert not list(tmp_path.glob("*/*.partial"))


def test_file_has_the_real_format(small: tuple[Path, dict[str, object], pd.DataFrame]) -> None:
    path, summary, rows = small
    text = path.read_text()
    lines = text.splitlines()
    assert text.endswith("\n") and '"' not in text
    assert len(lines) == len(rows) == summary["rows"]
    # no header: the first line is a row; five fields, integers except the behavior
    first = lines[0].split(",")
    assert len(first) == 5 and first[3] in TAOBAO_BEHAVIORS
    assert all(f.isdigit() for i, f in enumerate(first) if i != 3)
    assert all(rows[c].dtype == np.int64 for c in ("user", "item", "category", "timestamp"))
    assert set(rows["behavior"]) == set(TAOBAO_BEHAVIORS)
    # grouped by user in ascending id order; raw ids are sparse, as in the real file
    user = rows["user"].to_numpy()
    assert (np.diff(user) >= 0).all() and rows["user"].nunique() == SMALL.users == summary["users"]
    assert rows["item"].max() > rows["item"].nunique() and rows["category"].max() > SMALL.categories
    assert summary["items_used"] == rows["item"].nunique()
    assert summary["categories_used"] == rows["category"].nunique()
    assert summary["behaviors"] == rows["behavior"].value_counts().to_dict()
    meta = json.loads((path.parent / META_FILE).read_text())
    assert meta["source"] == "taobao-synth" and meta["config"]["seed"] == 3 and meta["rows"] == len(rows)


def test_behavior_mix(small: tuple[Path, dict[str, object], pd.DataFrame]) -> None:
    share = small[2]["behavior"].value_counts(normalize=True)
    expected = dict(zip(TAOBAO_BEHAVIORS, SMALL.behavior_shares, strict=True))
    assert expected["pv"] == pytest.approx(0.8959)
    for behavior, value in expected.items():
        # ~30 k independent draws: 4 standard errors at most 0.007 for pv, 0.003 for the rarer ones
        assert share[behavior] == pytest.approx(value, abs=4 * np.sqrt(value * (1 - value) / len(small[2])))


def test_every_item_keeps_one_category(small: tuple[Path, dict[str, object], pd.DataFrame]) -> None:
    path, _, rows = small
    assert (rows.groupby("item")["category"].nunique() == 1).all()
    truth = pq.read_table(path.parent / ITEM_THEMES_FILE).to_pandas()
    assert len(truth) == SMALL.items and truth["item_id"].is_unique
    catalogue = truth.set_index("item_id")["category_id"]
    assert (catalogue.loc[rows["item"]].to_numpy() == rows["category"].to_numpy()).all()


def test_timestamps_in_window_non_decreasing_with_sessions(
    small: tuple[Path, dict[str, object], pd.DataFrame],
) -> None:
    rows = small[2]
    ts = rows["timestamp"].to_numpy()
    assert ts.min() >= TAOBAO_WINDOW[0] and ts.max() < TAOBAO_WINDOW[1]
    same_user = np.diff(rows["user"].to_numpy()) == 0
    gaps = np.diff(ts)[same_user]
    assert (gaps >= 0).all()
    # bursts: most consecutive rows of a user are minutes apart, and sessions are hours apart
    assert np.mean(gaps < 600) > 0.7 and np.mean(gaps > 3600) > 0.05
    # activity spreads over all 9 days and is quiet before dawn (China time: the window opens at midnight)
    day = (ts - TAOBAO_WINDOW[0]) // 86_400
    assert set(np.unique(day)) == set(range(9))
    hour = (ts - TAOBAO_WINDOW[0]) % 86_400 // 3600
    assert np.mean((hour >= 2) & (hour < 6)) < 0.5 * 4 / 24


def test_heavy_tails(small: tuple[Path, dict[str, object], pd.DataFrame]) -> None:
    rows = small[2]
    per_item = rows["item"].value_counts().to_numpy()  # descending
    top = max(1, SMALL.items // 100)
    # the top 1 % of the catalogue holds a large share of rows (an even spread would give about 1 %)
    assert per_item[:top].sum() / len(rows) > 0.25
    per_user = rows.groupby("user").size().to_numpy()
    assert per_user.max() > 5 * np.median(per_user)
    # lognormal with mean 101.4 and sigma 0.9: the mean of 300 users lies within about 4 standard errors
    assert per_user.mean() == pytest.approx(SMALL.mean_seq_len, rel=0.25)


def test_relatedness_is_planted_and_hidden_from_the_category(
    small: tuple[Path, dict[str, object], pd.DataFrame],
) -> None:
    path, _, rows = small
    items = pq.read_table(path.parent / ITEM_THEMES_FILE).to_pandas().set_index("item_id")
    users = pq.read_table(path.parent / USER_INTERESTS_FILE).to_pandas()
    assert users["user_id"].tolist() == sorted(rows["user"].unique())
    assert users["rows"].tolist() == rows.groupby("user").size().tolist()
    theme = items.loc[rows["item"], "theme"].to_numpy()
    interests = users[[f"interest_{k}" for k in range(SMALL.interests_max)]].to_numpy()
    row_interests = interests[np.repeat(np.arange(len(users)), users["rows"].to_numpy())]
    hit = (row_interests == theme[:, None]).any(axis=1)
    # the base rate: how often a user's interest themes come up in everybody's rows
    theme_share = np.bincount(theme, minlength=SMALL.n_themes) / len(theme)
    base = np.where(interests >= 0, theme_share[np.maximum(interests, 0)], 0.0).sum(axis=1)
    base_rate = float(np.average(base, weights=users["rows"].to_numpy()))
    # interest rows (40 %) plus the popular rows that land in an interest by chance
    assert hit.mean() > 0.9 * SMALL.interest_share
    assert hit.mean() > 4 * base_rate
    # themes are dealt independently of the category: a theme of 200 items spans many categories, and its
    # most common category is about as common in the theme as in the whole catalogue
    catalogue_share = items["category_id"].value_counts(normalize=True)
    by_theme = items.groupby("theme")["category_id"]

    def top_lift(categories: pd.Series) -> float:
        share = categories.value_counts(normalize=True)
        return float(share.iloc[0] / catalogue_share[share.index[0]])

    lift = by_theme.agg(top_lift)
    assert by_theme.nunique().median() > SMALL.items_per_theme / 4
    assert lift.median() < 1.5


def test_converter_reads_it(small: tuple[Path, dict[str, object], pd.DataFrame], tmp_path: Path) -> None:
    path, _, rows = small
    events, impressions = convert_taobao(path, chunksize=5_000)
    assert len(events) == len(rows) and events["user_id"].nunique() == SMALL.users
    assert events["category_id"].nunique() == rows["category"].nunique()
    assert events["behavior"].value_counts().to_dict() == rows["behavior"].value_counts().to_dict()
    # positives: each user's page views after the first 5; one sampled negative each
    pv = rows[rows["behavior"] == "pv"].groupby("user").size().to_numpy()
    positives = int(np.maximum(pv - 5, 0).sum())
    assert int(impressions["label"].sum()) == positives
    assert len(impressions) == 2 * positives

    result = CliRunner().invoke(
        app, ["data", "convert", "--format", "taobao", "--path", str(path.parent), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    ds = read_dataset(tmp_path)
    assert summary["events"] == len(ds.events) == len(rows)
    assert summary["impressions"] == len(ds.impressions) == 2 * positives
    assert summary["users"] == SMALL.users and summary["positive_rate"] == 0.5


def _traced_peak(path: Path, cfg: TaobaoSynthConfig) -> tuple[int, int]:
    """(peak bytes traced while generating, rows)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        summary = write_taobao_csv(path, cfg)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return peak, int(summary["rows"])


def test_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    cfg = TaobaoSynthConfig(users=500, items=5_000, categories=50, seed=1, chunk_users=50)
    small_peak, _ = _traced_peak(tmp_path / "a.csv", cfg)
    peak, rows = _traced_peak(tmp_path / "b.csv", replace(cfg, users=4_000))
    assert rows > 300_000
    # the narrowest columns of all rows at once (int64 user and timestamp, int32 item and category, int8
    # behavior) are 25 bytes a row; the generator holds one chunk of about 5 k rows
    assert peak < 0.2 * 25 * rows
    # 8x the users, same chunk: the peak hardly moves (the largest chunk can be somewhat larger)
    assert peak < 1.6 * small_peak + 256 * 1024


def test_invalid_config() -> None:
    with pytest.raises(ValueError, match="users must be >= 1"):
        TaobaoSynthConfig(users=0).validate()
    with pytest.raises(ValueError, match="behavior shares"):
        TaobaoSynthConfig(buy_share=0.6, cart_share=0.6).validate()
    with pytest.raises(ValueError, match="items must be >= categories"):
        TaobaoSynthConfig(items=10, categories=20).validate()


def test_cli_taobao_synth(tmp_path: Path) -> None:
    out = tmp_path / "tb"
    argv = ["data", "taobao-synth", "--out", str(out), "--users", "40", "--items", "3000"]
    result = CliRunner().invoke(app, [*argv, "--categories", "30", "--seed", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    lines = (out / TAOBAO_FILE).read_text().splitlines()
    assert summary["rows"] == len(lines) and summary["users"] == 40 and summary["seed"] == 2
    assert sum(summary["behaviors"].values()) == len(lines)
    assert (out / ITEM_THEMES_FILE).is_file() and (out / USER_INTERESTS_FILE).is_file()
    assert json.loads((out / META_FILE).read_text())["config"]["items"] == 3000
    assert "generating" in result.stderr

    bad = CliRunner().invoke(app, ["data", "taobao-synth", "--out", str(out), "--users", "0"])
    assert bad.exit_code == 2 and "users must be >= 1" in bad.stderr
