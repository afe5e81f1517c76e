"""The DARE paper's Taobao protocol (`--protocol dare`): who takes part, which targets, which negatives, the
no-leakage rule and the trainer's split on the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from exporters.convert import (
    DARE_MIN_PAGEVIEWS,
    DARE_NEGATIVES,
    DARE_TARGET_OFFSETS,
    DARE_TRAIN_COMMAND,
    TAOBAO_WINDOW,
    convert_taobao,
)
from exporters.dataset import Dataset, read_dataset
from exporters.samples import TEST, TRAIN, VALID, build_samples
from exporters.taobao_synth import TaobaoSynthConfig, write_taobao_csv
from service.cli import app

T0 = TAOBAO_WINDOW[0]
FREQUENT, MEDIUM, RARE = 9001, 9002, 9003
# page views per user of the hand-made file: 3 and 4 fall short of the threshold (4 only counting page views)
PAGEVIEWS = {1: DARE_MIN_PAGEVIEWS, 2: 300, 3: DARE_MIN_PAGEVIEWS - 1, 4: DARE_MIN_PAGEVIEWS - 1}


def _category(item: int) -> int:
    return 500 + item % 7


def _hand_made(path: Path) -> dict[int, list[int]]:
    """A file whose users 1-4 view every item of 1..150, so that every negative is FREQUENT, MEDIUM or RARE.
    Returns each user's page-viewed items in time order."""
    rng = np.random.default_rng(7)
    lines: list[str] = []
    views: dict[int, list[int]] = {}
    for user, n in PAGEVIEWS.items():
        items = [*rng.permutation(np.arange(1, 151)).tolist(), *rng.integers(1, 151, size=n - 150).tolist()]
        views[user] = items
        # rows out of time order: targets count page views in time order, not in the file's
        for k in rng.permutation(n):
            lines.append(f"{user},{items[k]},{_category(items[k])},pv,{T0 + 60 * int(k)}")
    for k in range(80):  # other behaviors never count towards the threshold
        lines.append(f"4,{views[4][0]},{_category(views[4][0])},cart,{T0 + 30 + 60 * k}")
    # users short of the threshold: 1,000 page views of FREQUENT, 250 of MEDIUM (the last 50 later than
    # everything else and under another category), 1 of RARE
    for user in range(100, 125):
        item, late = (FREQUENT, 0) if user < 120 else (MEDIUM, 100_000 * (user == 124))
        cat = _category(item) + (user == 124)
        lines.extend(f"{user},{item},{cat},pv,{T0 + late + 11 + 60 * k}" for k in range(50))
        views[user] = [item] * 50
    lines.append(f"5,{RARE},{_category(RARE)},pv,{T0 + 7}")
    views[5] = [RARE]
    path.write_text("\n".join(lines) + "\n")
    return views


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    path = tmp_path_factory.mktemp("tb") / "UserBehavior.csv"
    return path, _hand_made(path)


def _positives(impressions: pd.DataFrame) -> pd.DataFrame:
    return impressions[impressions["label"] == 1]


def test_only_users_with_enough_page_views_take_part(hand_made: tuple[Path, dict[int, list[int]]]) -> None:
    events, impressions = convert_taobao(hand_made[0], protocol="dare")
    assert sorted(impressions["user_id"].unique()) == ["u1", "u2"]
    # the events are the kept users' page views, nothing else
    assert sorted(events["user_id"].unique()) == ["u1", "u2"]
    assert events.groupby("user_id").size().to_dict() == {"u1": PAGEVIEWS[1], "u2": PAGEVIEWS[2]}
    assert (events["behavior"] == "pv").all()


def test_targets_are_the_page_views_at_the_offsets(hand_made: tuple[Path, dict[int, list[int]]]) -> None:
    path, views = hand_made
    impressions = convert_taobao(path, protocol="dare")[1]
    assert len(DARE_TARGET_OFFSETS) == 23
    for user in (1, 2):
        mine = impressions[impressions["user_id"] == f"u{user}"]
        pos = _positives(mine).sort_values("timestamp")
        assert pos["target_offset"].tolist() == sorted(DARE_TARGET_OFFSETS, reverse=True)
        n = PAGEVIEWS[user]
        assert pos["item_id"].tolist() == [views[user][n - o] for o in pos["target_offset"]]
        assert pos["timestamp"].tolist() == [T0 + 60 * (n - o) for o in pos["target_offset"]]
        assert pos["category_id"].nunique() <= 7  # their own page views' categories, densely renumbered
        # each target has exactly two negatives, at its timestamp and with its offset
        neg = mine[mine["label"] == 0]
        per_target = neg.groupby(["timestamp", "target_offset"]).size()
        assert len(per_target) == len(DARE_TARGET_OFFSETS) and (per_target == DARE_NEGATIVES).all()
        assert set(per_target.index.get_level_values("timestamp")) == set(pos["timestamp"])


def test_negatives_are_unviewed_and_drawn_by_frequency(hand_made: tuple[Path, dict[int, list[int]]]) -> None:
    path, views = hand_made
    impressions = convert_taobao(path, protocol="dare")[1]
    neg = impressions[impressions["label"] == 0]
    for user in (1, 2):
        assert not set(neg.loc[neg["user_id"] == f"u{user}", "item_id"]) & set(views[user])
    assert set(neg["item_id"]) <= {FREQUENT, MEDIUM, RARE}
    assert len(neg) == 2 * len(DARE_TARGET_OFFSETS) * DARE_NEGATIVES
    # drawn by page-view frequency, 1,000 : 250 : 1, over 5 seeds (460 draws): FREQUENT about 4 times as often
    # as MEDIUM, RARE about once in 1,250
    drawn = pd.concat([convert_taobao(path, protocol="dare", seed=seed)[1] for seed in range(5)])
    counts = drawn.loc[drawn["label"] == 0, "item_id"].value_counts()
    assert 2.5 < counts[FREQUENT] / counts[MEDIUM] < 6
    assert counts.get(RARE, 0) <= 3
    # an item seen under two categories takes its latest one
    raw = pd.read_csv(path, header=None)[2]
    dense = {c: i + 1 for i, c in enumerate(sorted(raw.unique()))}
    medium = drawn[drawn["item_id"] == MEDIUM]
    assert (medium["category_id"] == dense[_category(MEDIUM) + 1]).all()
    assert (drawn.loc[drawn["item_id"] == FREQUENT, "category_id"] == dense[_category(FREQUENT)]).all()


def test_history_strictly_before_and_the_trainer_split(hand_made: tuple[Path, dict[int, list[int]]]) -> None:
    path, views = hand_made
    events, impressions = convert_taobao(path, protocol="dare")
    ds = Dataset(events=events, impressions=impressions, meta={})
    s = build_samples(ds, max_seq_len=200)
    n_hist = s.hist_end - s.hist_start
    for i in range(len(impressions)):
        ts = s.event_ts[s.hist_start[i] : s.hist_end[i]]
        assert (ts < s.target_ts[i]).all()
        user_ts = s.event_ts[s.event_user == s.user_index[i]]
        # the newest 200 page views before the target: the reference's history
        assert n_hist[i] == min(200, int((user_ts < s.target_ts[i]).sum()))
    offset = impressions["target_offset"].to_numpy()
    assert (
        n_hist == np.minimum(200, np.array([PAGEVIEWS[int(u[1:])] for u in impressions["user_id"]]) - offset)
    ).all()
    event_item = events["item_id"].to_numpy()
    for j in np.flatnonzero(impressions["user_id"].to_numpy() == "u2"):
        seen = views[2][: PAGEVIEWS[2] - int(offset[j])]
        assert event_item[s.hist_start[j] : s.hist_end[j]].tolist() == seen[-200:]
    # per user: 19 targets train, offsets 3 and 8 validate, 1 and 2 test
    assert set(offset[s.split == TEST]) == {1, 2} and set(offset[s.split == VALID]) == {3, 8}
    train = s.split == TRAIN
    assert set(offset[train]) == set(range(13, 104, 5))
    for user in ("u1", "u2"):
        mine = train & (impressions["user_id"] == user).to_numpy()
        assert int(s.label[mine].sum()) == 19 and int(mine.sum()) == 19 * (1 + DARE_NEGATIVES)


def test_synthetic_world_is_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "UserBehavior.csv"
    write_taobao_csv(path, TaobaoSynthConfig(users=60, items=5_000, categories=50, mean_seq_len=250, seed=1))
    rows = pd.read_csv(path, header=None, names=["user", "item", "category", "behavior", "ts"])
    pv = rows[rows["behavior"] == "pv"]
    counts = pv.groupby("user").size()
    kept = {f"u{u}" for u in counts[counts >= DARE_MIN_PAGEVIEWS].index}
    assert 5 <= len(kept) < len(counts)  # the threshold keeps some users and drops others
    events, impressions = convert_taobao(path, protocol="dare", seed=4)
    assert set(impressions["user_id"]) == set(events["user_id"]) == kept
    per_user = impressions.groupby("user_id")["label"].agg(["sum", "size"])
    assert (per_user["sum"] == len(DARE_TARGET_OFFSETS)).all()
    assert (per_user["size"] == len(DARE_TARGET_OFFSETS) * (1 + DARE_NEGATIVES)).all()
    seen = set(zip(pv["user"].map(lambda u: f"u{u}"), pv["item"], strict=True))
    neg = impressions[impressions["label"] == 0]
    assert not any(pair in seen for pair in zip(neg["user_id"], neg["item_id"], strict=True))
    again = convert_taobao(path, protocol="dare", seed=4)
    pd.testing.assert_frame_equal(again[0], events)
    pd.testing.assert_frame_equal(again[1], impressions)
    other = convert_taobao(path, protocol="dare", seed=5)[1]
    assert not other["item_id"].equals(impressions["item_id"])
    keys = ["user_id", "timestamp", "item_id", "category_id", "target_offset"]
    pd.testing.assert_frame_equal(
        _positives(other)[keys].reset_index(drop=True), _positives(impressions)[keys].reset_index(drop=True)
    )


def test_cli_protocol(tmp_path: Path, hand_made: tuple[Path, dict[int, list[int]]]) -> None:
    out = tmp_path / "out"
    argv = ["data", "convert", "--format", "taobao", "--path", str(hand_made[0]), "--out", str(out)]
    result = CliRunner().invoke(app, [*argv, "--protocol", "dare", "--seed", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["users"] == 2 and summary["impressions"] == 2 * 23 * 3
    ds = read_dataset(out)
    protocol = ds.meta["protocol"]
    assert protocol["name"] == "dare" and protocol["min_pageviews"] == 210 and protocol["negatives"] == 2
    assert protocol["target_offsets"] == list(DARE_TARGET_OFFSETS) and protocol["train"] == DARE_TRAIN_COMMAND
    assert ds.meta["seed"] == 2 and ds.impressions["target_offset"].max() == 103

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert read_dataset(out).meta["protocol"]["name"] == "pageviews"


@pytest.mark.parametrize(
    ("fmt", "protocol", "message"),
    [
        ("movielens", "dare", "--protocol applies to --format taobao only"),
        ("movielens", "pageviews", "--protocol applies to --format taobao only"),
        ("taobao", "paper", "--protocol must be pageviews or dare"),
    ],
)
def test_cli_protocol_rejected(tmp_path: Path, fmt: str, protocol: str, message: str) -> None:
    argv = ["data", "convert", "--format", fmt, "--path", str(tmp_path), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*argv, "--protocol", protocol])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
