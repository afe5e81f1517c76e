"""The synthetic generator: determinism, planted structure, the related truth, the `data synth` command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from exporters.dataset import read_dataset
from exporters.synth import SynthConfig, generate, roc_auc, signal_report, write_synth
from service.cli import app

SMALL = SynthConfig(users=150, items=2000, categories=20, max_seq_len=300, seed=5)
# big enough for stable rates and AUCs, small enough for a second of work
MEDIUM = SynthConfig(users=800, items=8000, categories=50, max_seq_len=800, seed=1)


@pytest.fixture(scope="module")
def medium() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return generate(MEDIUM)


@pytest.fixture(scope="module")
def medium_independent() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return generate(replace(MEDIUM, theme_layout="independent"))


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    write_synth(tmp_path / "a", SMALL)
    write_synth(tmp_path / "b", SMALL)
    write_synth(tmp_path / "c", replace(SMALL, seed=6))
    for name in ("events", "impressions", "related"):
        a = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        assert a.equals(pq.read_table(tmp_path / "b" / f"{name}.parquet")), name
        assert not a.equals(pq.read_table(tmp_path / "c" / f"{name}.parquet")), name
    assert (tmp_path / "a" / "meta.json").read_text() == (tmp_path / "b" / "meta.json").read_text()


def test_sequences_and_timestamps(medium: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    events, impressions, _ = medium
    lengths = events.groupby("user_id").size()
    assert len(lengths) == MEDIUM.users
    assert lengths.min() >= MEDIUM.min_seq_len and lengths.max() <= MEDIUM.max_seq_len
    assert lengths.quantile(0.99) > 4 * lengths.median()  # heavy tail
    user_change = events["user_id"].to_numpy()[1:] != events["user_id"].to_numpy()[:-1]
    assert np.all((np.diff(events["timestamp"].to_numpy()) > 0) | user_change)  # strictly increasing per user
    window_end = MEDIUM.start_ts + MEDIUM.days * 86_400
    assert events["timestamp"].min() >= MEDIUM.start_ts and events["timestamp"].max() < window_end
    # a common window: a global time cut leaves most users on both sides
    cut = events["timestamp"].quantile(0.8)
    assert events.loc[events["timestamp"] >= cut, "user_id"].nunique() > 0.5 * MEDIUM.users
    per_user = impressions.groupby("user_id").size()
    assert per_user.min() >= 3 and 20 < per_user.mean() < 28


def test_popularity_is_zipfian(medium: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    counts = medium[0]["item_id"].value_counts().to_numpy()
    ranks = np.arange(1, len(counts) + 1)
    slope = np.polyfit(np.log(ranks[:300]), np.log(counts[:300]), 1)[0]
    assert -1.4 < slope < -0.7
    sizes = medium[0].groupby("category_id")["item_id"].nunique()
    assert sizes.max() > 3 * sizes.median()  # uneven categories


def test_labels_need_the_related_behaviors(medium: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    events, impressions, _ = medium
    report = signal_report(events, impressions)
    assert 0.25 <= report["positive_rate"] <= 0.5
    assert report["auc_true_logit"] > 0.78
    assert report["auc_popularity"] < 0.62
    assert report["auc_true_logit"] - report["auc_popularity"] > 0.2
    # the category alone is not enough: the hidden theme carries signal beyond it
    assert report["auc_true_logit"] - report["auc_same_category_count"] > 0.04
    # related behaviors are a small part of the history
    assert report["related_share_median"] < 0.08
    assert report["related_share_positives_median"] < 0.2


def test_related_truth_is_strictly_earlier_history(
    medium: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
) -> None:
    events, impressions, related = medium
    assert impressions["impression_id"].tolist() == list(range(len(impressions)))
    imp = impressions.set_index("impression_id").loc[related["impression_id"]]
    assert (related["user_id"].to_numpy() == imp["user_id"].to_numpy()).all()
    assert (related["timestamp"].to_numpy() < imp["timestamp"].to_numpy()).all()
    # every related row is a real event of that user
    merged = related.merge(events, on=["user_id", "item_id", "timestamp"], how="left", indicator=True)
    assert (merged["_merge"] == "both").all()
    assert (
        related.groupby("impression_id").size().reindex(impressions["impression_id"], fill_value=0).to_numpy()
        == impressions["n_related"].to_numpy()
    ).all()
    assert (impressions["n_related"] <= impressions["n_history"]).all()
    # same hidden theme implies same category
    cat_of = events.drop_duplicates("item_id").set_index("item_id")["category_id"]
    assert (cat_of.loc[related["item_id"]].to_numpy() == imp["category_id"].to_numpy()).all()


def test_nested_is_the_default() -> None:
    assert SynthConfig().theme_layout == "nested"


def test_independent_themes_cross_categories(
    medium: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    medium_independent: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
) -> None:
    events, impressions, related = medium_independent
    imp = impressions.set_index("impression_id").loc[related["impression_id"]]
    cat_of = events.drop_duplicates("item_id").set_index("item_id")["category_id"]
    same_cat = cat_of.loc[related["item_id"]].to_numpy() == imp["category_id"].to_numpy()
    same_item = related["item_id"].to_numpy() == imp["item_id"].to_numpy()
    # nested: every related behavior shares the target's category; independent: apart from repeats of
    # the target item itself, few do
    assert (same_cat & ~same_item).mean() < 0.1
    assert (related["timestamp"].to_numpy() < imp["timestamp"].to_numpy()).all()
    assert (impressions["n_related"] <= impressions["n_history"]).all()
    # categories keep their uneven sizes; only the themes moved
    sizes = events.groupby("category_id")["item_id"].nunique()
    assert sizes.max() > 3 * sizes.median()
    assert events["category_id"].nunique() == medium[0]["category_id"].nunique()


def test_independent_layout_hides_relatedness_from_the_category(
    medium: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    medium_independent: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
) -> None:
    nested = signal_report(medium[0], medium[1])
    report = signal_report(medium_independent[0], medium_independent[1])
    assert 0.2 <= report["positive_rate"] <= 0.5
    assert report["auc_true_logit"] > 0.78
    # the category count falls well behind the related count, and further behind than in nested data
    assert report["auc_related_count"] - report["auc_same_category_count"] > 0.12
    assert nested["auc_same_category_count"] - report["auc_same_category_count"] > 0.04
    assert report["related_share_median"] < 0.08
    assert report["related_share_positives_median"] < 0.2


def test_independent_layout_is_deterministic() -> None:
    cfg = replace(SMALL, theme_layout="independent")
    a, b = generate(cfg), generate(cfg)
    assert all(x.equals(y) for x, y in zip(a, b, strict=True))
    assert not a[0].equals(generate(SMALL)[0])


def test_long_sequences_stay_fast() -> None:
    events, _, _ = generate(SynthConfig(users=60, items=3000, categories=20, max_seq_len=12000, seed=2))
    lengths = events.groupby("user_id").size()
    assert lengths.max() <= 12000 and lengths.max() > 2000


def test_invalid_config() -> None:
    with pytest.raises(ValueError, match="items must be >= categories"):
        generate(SynthConfig(items=10, categories=5))
    with pytest.raises(ValueError, match="theme_layout must be one of nested, independent"):
        generate(SynthConfig(theme_layout="mixed"))  # type: ignore[arg-type]


def test_roc_auc_counts_ties_half() -> None:
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.5, 0.5])) == pytest.approx(0.875)


def test_cli_synth(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(
        app,
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--users",
            "50",
            "--items",
            "600",
            "--categories",
            "10",
            "--max-seq-len",
            "200",
            "--seed",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    ds = read_dataset(out)
    assert summary["users"] == 50 and summary["events"] == len(ds.events)
    assert summary["impressions"] == len(ds.impressions)
    assert summary["positive_rate"] == pytest.approx(ds.impressions["label"].mean(), abs=1e-6)
    assert ds.meta["config"]["seed"] == 4 and ds.related is not None
    assert "generating" in result.stderr


def test_cli_synth_theme_layout(tmp_path: Path) -> None:
    out = tmp_path / "data"
    args = ["data", "synth", "--out", str(out), "--users", "40", "--items", "600", "--categories", "10"]
    result = CliRunner().invoke(app, [*args, "--max-seq-len", "100", "--theme-layout", "independent"])
    assert result.exit_code == 0, result.output
    assert read_dataset(out).meta["config"]["theme_layout"] == "independent"
    result = CliRunner().invoke(app, [*args, "--theme-layout", "mixed"])
    assert result.exit_code == 2
    assert "theme_layout must be one of nested, independent" in result.stderr


def test_cli_synth_rejects_bad_sizes(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--users", "0"])
    assert result.exit_code == 2
    assert "users must be >= 1" in result.stderr and "Traceback" not in result.output


def _old_related_share(cfg: SynthConfig, window: int) -> pd.Series:
    """Per impression with more than 2 x `window` behaviors of history: the share of its related
    behaviors older than the newest `window`."""
    events, impressions, related = generate(cfg)
    position = pd.Series(
        events.groupby("user_id", sort=False).cumcount().to_numpy(),
        index=pd.MultiIndex.from_frame(events[["user_id", "item_id", "timestamp"]]),
    )
    rel_pos = position.reindex(pd.MultiIndex.from_frame(related[["user_id", "item_id", "timestamp"]]))
    n_history = impressions.set_index("impression_id")["n_history"]
    age = n_history.reindex(related["impression_id"]).to_numpy() - rel_pos.to_numpy()
    old = pd.Series(age > window).groupby(related["impression_id"].to_numpy()).mean()
    return old.reindex(impressions.loc[impressions["n_history"] > 2 * window, "impression_id"]).dropna()


def test_dormant_interests_put_related_behaviors_past_a_window() -> None:
    cfg = SynthConfig(users=60, items=3000, categories=20, min_seq_len=5000, max_seq_len=8000, seed=4)
    plain, dormant = _old_related_share(cfg, 2000), _old_related_share(replace(cfg, dormant_share=1.0), 2000)
    assert len(plain) > 300 and len(dormant) > 300
    # without dormant interests every long impression has related behaviors in the newest 2,000; with
    # them a fifth have almost all of theirs further back
    assert (plain > 0.9).mean() < 0.01 and (dormant > 0.9).mean() > 0.1
    assert dormant.mean() > plain.mean() + 0.03


def test_dormant_share_off_by_default_and_validated(tmp_path: Path) -> None:
    assert SynthConfig().dormant_share == 0.0
    for bad in ({"dormant_share": 1.5}, {"dormant_share": -0.1}, {"dormant_until": 0.0}):
        with pytest.raises(ValueError, match="dormant"):
            generate(replace(SMALL, **bad))  # type: ignore[arg-type]
    out = tmp_path / "data"
    args = ["data", "synth", "--out", str(out), "--users", "40", "--items", "600", "--categories", "10"]
    result = CliRunner().invoke(app, [*args, "--dormant-share", "0.5", "--dormant-until", "0.4"])
    assert result.exit_code == 0, result.output
    config = read_dataset(out).meta["config"]
    assert config["dormant_share"] == 0.5 and config["dormant_until"] == 0.4
