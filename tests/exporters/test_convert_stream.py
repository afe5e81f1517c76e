"""The streaming Taobao converter (`data convert --format taobao`): the same dataset as the pandas
implementation it replaced (kept below as the oracle), bad lines named by their line number with nothing
written, `--skip-bad-lines`, and the writer's checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from exporters.convert import (
    DARE_MIN_PAGEVIEWS,
    DARE_NEGATIVES,
    DARE_TARGET_OFFSETS,
    TAOBAO_BEHAVIORS,
    TAOBAO_PROTOCOLS,
    TAOBAO_WINDOW,
    TaobaoProtocol,
    _string_sorted,
    _user_strings,
    convert_taobao,
    convert_to_folder,
    read_taobao,
)
from exporters.dataset import DatasetError, DatasetWriter, read_dataset, write_dataset
from exporters.taobao_synth import TaobaoSynthConfig, write_taobao_csv
from service.cli import app

T0 = TAOBAO_WINDOW[0]

# -- the oracle: the pandas implementation as it was before the streaming reader -----------------------


def _read_taobao(
    path: Path, max_users: int | None, window: tuple[int, int] | None, chunksize: int
) -> pd.DataFrame:
    """Clean rows (user, item, category, behavior, timestamp) read in chunks; the first max_users users."""
    parts: list[pd.DataFrame] = []
    keep: np.ndarray | None = None
    names = ["user", "item", "category", "behavior", "timestamp"]
    try:
        reader = pd.read_csv(path, header=None, names=names, chunksize=chunksize, dtype=str)
        for chunk in reader:
            num = {
                c: pd.to_numeric(chunk[c], errors="coerce") for c in ("user", "item", "category", "timestamp")
            }
            ok = (
                num["user"].notna()
                & num["item"].notna()
                & num["category"].notna()
                & num["timestamp"].notna()
                & chunk["behavior"].isin(TAOBAO_BEHAVIORS)
            )
            if window is not None:
                ok &= (num["timestamp"] >= window[0]) & (num["timestamp"] < window[1])
            part = pd.DataFrame({c: num[c][ok].to_numpy(np.int64) for c in ("user", "item", "category")})
            part["behavior"] = pd.Categorical(chunk["behavior"][ok].to_numpy(), categories=TAOBAO_BEHAVIORS)
            part["timestamp"] = num["timestamp"][ok].to_numpy(np.int64)
            if max_users is not None:
                # the smallest max_users ids seen so far; rows above the running cut can never return
                seen = np.unique(part["user"].to_numpy())
                keep = seen[:max_users] if keep is None else np.union1d(keep, seen)[:max_users]
                if len(keep) == max_users:
                    cut = keep[-1]
                    part = part[part["user"] <= cut]
                    parts = [p[p["user"] <= cut] for p in parts]
            parts.append(part)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot parse ({exc})") from exc
    if not parts:
        raise DatasetError(f"{path}: no rows")
    rows = pd.concat(parts, ignore_index=True)
    if keep is not None:
        rows = rows[rows["user"].isin(keep)]
    return rows


def oracle_convert_taobao(
    path: str | Path,
    max_users: int | None = None,
    min_history: int = 5,
    seed: int = 0,
    window: tuple[int, int] | None = TAOBAO_WINDOW,
    chunksize: int = 2_000_000,
    protocol: TaobaoProtocol = "pageviews",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, impressions) of Taobao UserBehavior.csv under a sampling protocol.

    `pageviews`: every behavior is an event; each user's page views after the first `min_history` are
    positives, each with one popularity-sampled negative the user never touched, at the same timestamp.
    `dare`: the DARE paper's protocol."""
    if protocol not in TAOBAO_PROTOCOLS:
        raise DatasetError(f"unknown Taobao protocol {protocol!r}; use 'pageviews' or 'dare'")
    rows = _read_taobao(Path(path), max_users, window, chunksize)
    if len(rows) == 0:
        raise DatasetError(f"{path}: no rows left after dropping bad timestamps and behaviors")
    user = rows["user"].to_numpy(np.int64)
    item = rows["item"].to_numpy(np.int64)
    ts = rows["timestamp"].to_numpy(np.int64)
    behavior = rows["behavior"].cat.codes.to_numpy()
    order = np.lexsort((item, ts, user))
    user, item, ts, behavior = user[order], item[order], ts[order], behavior[order]
    # raw category ids reach millions; dense ids (raw order, from 1) keep category tables small
    raw_cat = rows["category"].to_numpy(np.int64)[order]
    cat_keys, category = np.unique(raw_cat, return_inverse=True)
    category = category.astype(np.int64) + 1
    del rows, raw_cat
    rng = np.random.default_rng(seed)
    if protocol == "dare":
        is_pv = behavior == TAOBAO_BEHAVIORS.index("pv")
        if not is_pv.any():
            raise DatasetError(f"{path}: no page views")
        return _oracle_dare(user[is_pv], item[is_pv], category[is_pv], ts[is_pv], rng)

    items, item_code = np.unique(item, return_inverse=True)
    users, user_code = np.unique(user, return_inverse=True)
    # each item's category, first seen
    _, first_at = np.unique(item_code, return_index=True)
    item_category = category[first_at]

    is_pv = behavior == TAOBAO_BEHAVIORS.index("pv")
    pv_at = np.flatnonzero(is_pv)
    pv_user = user_code[pv_at]
    pv_count = np.bincount(pv_user, minlength=len(users))
    pv_rank = np.arange(len(pv_at)) - (np.cumsum(pv_count) - pv_count)[pv_user]
    positives = pv_at[pv_rank >= min_history]

    neg_code, ok = _sample_negatives(user_code, item_code, user_code[positives], rng)
    pos_user = user_code[positives]
    im_user = np.concatenate([pos_user, pos_user[ok]])
    im_item_code = np.concatenate([item_code[positives], neg_code[ok]])
    im_ts = np.concatenate([ts[positives], ts[positives][ok]])
    im_label = np.concatenate([np.ones(len(positives), np.int8), np.zeros(int(ok.sum()), np.int8)])

    user_names = _user_strings(users).to_numpy(dtype=object)
    events = pd.DataFrame(
        {
            "user_id": pd.Series(user_names[user_code], dtype="str"),
            "item_id": item,
            "category_id": category,
            "timestamp": ts,
            "behavior": pd.Categorical.from_codes(behavior, categories=pd.Index(TAOBAO_BEHAVIORS)),
        }
    )
    impressions = pd.DataFrame(
        {
            "user_id": pd.Series(user_names[im_user], dtype="str"),
            "item_id": items[im_item_code],
            "category_id": item_category[im_item_code],
            "timestamp": im_ts,
            "label": im_label,
            "impression_id": np.arange(len(im_user), dtype=np.int64),
        }
    )
    return _string_sorted(events), _string_sorted(impressions, renumber=True)


def _oracle_dare(
    user: np.ndarray, item: np.ndarray, category: np.ndarray, ts: np.ndarray, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, impressions) of the DARE paper's protocol from page views sorted by (user, time, item).

    Users with at least DARE_MIN_PAGEVIEWS page views take part; their page views are the events. Each one
    gets a positive at every offset of DARE_TARGET_OFFSETS from the end of their page views, and per positive
    DARE_NEGATIVES items drawn with replacement by page-view frequency (every user's) among items the user
    never viewed, at the positive's timestamp. `target_offset` records each impression's offset."""
    items, item_code = np.unique(item, return_inverse=True)
    users, user_code = np.unique(user, return_inverse=True)
    count = np.bincount(user_code, minlength=len(users))
    end = np.cumsum(count)
    kept = np.flatnonzero(count >= DARE_MIN_PAGEVIEWS)
    if len(kept) == 0:
        raise DatasetError(f"no user has {DARE_MIN_PAGEVIEWS} or more page views")
    # an item seen under several categories takes its latest one, as in the reference
    last_at = len(item_code) - 1 - np.unique(item_code[::-1], return_index=True)[1]
    item_category = category[last_at]

    offsets = np.asarray(DARE_TARGET_OFFSETS, np.int64)
    target_at = (end[kept][:, None] - offsets[None, :]).ravel()
    target_offset = np.tile(offsets, len(kept))
    pos_user = user_code[target_at]
    neg_target = np.repeat(target_at, DARE_NEGATIVES)
    neg_code, ok = _sample_negatives(user_code, item_code, user_code[neg_target], rng)
    neg_target, neg_code = neg_target[ok], neg_code[ok]

    user_names = _user_strings(users).to_numpy(dtype=object)
    in_kept = count[user_code] >= DARE_MIN_PAGEVIEWS
    events = pd.DataFrame(
        {
            "user_id": pd.Series(user_names[user_code[in_kept]], dtype="str"),
            "item_id": item[in_kept],
            "category_id": category[in_kept],
            "timestamp": ts[in_kept],
            "behavior": pd.Categorical.from_codes(
                np.full(int(in_kept.sum()), TAOBAO_BEHAVIORS.index("pv"), np.int8),
                categories=pd.Index(TAOBAO_BEHAVIORS),
            ),
        }
    )
    impressions = pd.DataFrame(
        {
            "user_id": pd.Series(user_names[np.concatenate([pos_user, user_code[neg_target]])], dtype="str"),
            "item_id": np.concatenate([item[target_at], items[neg_code]]),
            # the positive keeps the category of its own page view
            "category_id": np.concatenate([category[target_at], item_category[neg_code]]),
            "timestamp": np.concatenate([ts[target_at], ts[neg_target]]),
            "label": np.concatenate([np.ones(len(target_at), np.int8), np.zeros(len(neg_target), np.int8)]),
            "impression_id": np.arange(len(target_at) + len(neg_target), dtype=np.int64),
            "target_offset": np.concatenate(
                [target_offset, np.repeat(target_offset, DARE_NEGATIVES)[ok]]
            ).astype(np.int16),
        }
    )
    return _string_sorted(events), _string_sorted(impressions, renumber=True)


def _sample_negatives(
    user_code: np.ndarray,
    item_code: np.ndarray,
    for_user: np.ndarray,
    rng: np.random.Generator,
    rounds: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query user, an item code drawn by popularity among items that user never touched; `ok` is False
    where none was found (a user who touched nearly everything)."""
    n_items = int(item_code.max()) + 1
    touched = np.unique(user_code * n_items + item_code)
    cdf = np.cumsum(np.bincount(item_code, minlength=n_items)).astype(np.float64)
    neg = np.zeros(len(for_user), np.int64)
    todo = np.arange(len(for_user))
    for _ in range(rounds):  # rejection rounds over all pending draws at once
        if len(todo) == 0:
            break
        neg[todo] = np.minimum(
            np.searchsorted(cdf, rng.random(len(todo)) * cdf[-1], side="right"), n_items - 1
        )
        key = for_user[todo] * n_items + neg[todo]
        pos = np.minimum(np.searchsorted(touched, key), len(touched) - 1)
        todo = todo[touched[pos] == key]
    ok = np.ones(len(for_user), bool)
    ok[todo] = False
    return neg, ok


# -- the same output ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A taobao-synth file with enough page views per user for the dare protocol, plus rows the reader must
    drop as data (outside the collection period) and exact duplicates of rows with another behavior (ties
    that only the file order breaks)."""
    path = tmp_path_factory.mktemp("tb") / "UserBehavior.csv"
    write_taobao_csv(path, TaobaoSynthConfig(users=60, items=5_000, categories=50, mean_seq_len=250, seed=1))
    lines = path.read_text().splitlines()
    rng = np.random.default_rng(0)
    extra = []
    for k in rng.choice(len(lines), 40, replace=False):
        user, item, cat, _, ts = lines[k].split(",")
        extra.append(f"{user},{item},{cat},cart,{ts}")
    extra += [
        f"{1_000_000 + k},7,3,pv,{ts}" for k, ts in enumerate([-5, 0, T0 - 1, TAOBAO_WINDOW[1], 10**15])
    ]
    # users out of id order and a late user with a small id: the reader must not rely on the file's order
    path.write_text("\n".join([*extra[:20], *lines, *extra[20:]]) + "\n")
    return path


def _frames_equal(new: tuple[pd.DataFrame, pd.DataFrame], old: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    pd.testing.assert_frame_equal(new[0], old[0])
    pd.testing.assert_frame_equal(new[1], old[1])


@pytest.mark.parametrize("protocol", ["pageviews", "dare"])
@pytest.mark.parametrize("max_users", [None, 37])
def test_same_frames_as_the_oracle(synth_file: Path, protocol: TaobaoProtocol, max_users: int | None) -> None:
    old = oracle_convert_taobao(synth_file, max_users=max_users, seed=3, protocol=protocol)
    # tiny blocks: many block boundaries, the running user cut moving often
    new = convert_taobao(synth_file, max_users=max_users, seed=3, protocol=protocol, chunksize=500)
    _frames_equal(new, old)
    assert len(old[1]) > 100 and old[1]["label"].sum() > 50


@pytest.mark.parametrize("protocol", ["pageviews", "dare"])
def test_same_folder_as_the_oracle(synth_file: Path, tmp_path: Path, protocol: TaobaoProtocol) -> None:
    meta = convert_to_folder("taobao", synth_file, tmp_path / "new", seed=5, protocol=protocol)
    events, impressions = oracle_convert_taobao(synth_file, seed=5, protocol=protocol)
    write_dataset(tmp_path / "old", events, impressions, {})
    new, old = read_dataset(tmp_path / "new"), read_dataset(tmp_path / "old")
    pd.testing.assert_frame_equal(new.events, old.events)
    pd.testing.assert_frame_equal(new.impressions, old.impressions)
    assert {k: v for k, v in new.meta["counts"].items() if k != "bad_lines"} == old.meta["counts"]
    assert meta["counts"] == new.meta["counts"] and new.meta["counts"]["bad_lines"] == 0
    assert new.meta["read"]["outside_window"] == 5
    assert new.meta["read"]["lines"] == len(synth_file.read_text().splitlines())
    assert new.meta["protocol"]["name"] == protocol
    if protocol == "dare":
        per_user = new.impressions.groupby("user_id")["label"].agg(["sum", "size"])
        assert (per_user["sum"] == len(DARE_TARGET_OFFSETS)).all()
        assert (per_user["size"] == len(DARE_TARGET_OFFSETS) * (1 + DARE_NEGATIVES)).all()
        assert new.events.groupby("user_id").size().min() >= DARE_MIN_PAGEVIEWS


def test_string_order_of_user_ids(tmp_path: Path) -> None:
    """'u10' sorts before 'u9': the canonical order compares user ids as strings, the protocols count per
    user in numeric order; both agree with the oracle."""
    rows = [f"{u},{100 + k % 7},{k % 3},pv,{T0 + 60 * k}" for u in (9, 10, 100, 2) for k in range(12)]
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(rows) + "\n")
    new = convert_taobao(path, min_history=2)
    _frames_equal(new, oracle_convert_taobao(path, min_history=2))
    assert new[0]["user_id"].drop_duplicates().tolist() == ["u10", "u100", "u2", "u9"]


def test_blank_lines_and_crlf_are_fine(tmp_path: Path) -> None:
    rows = [f"1,{10 + k},5,pv,{T0 + k}" for k in range(8)]
    clean, messy = tmp_path / "a.csv", tmp_path / "b.csv"
    clean.write_text("\n".join(rows) + "\n")
    messy.write_bytes(
        b"\r\n".join(r.encode() for r in rows[:4]) + b"\r\n\r\n\n" + "\n".join(rows[4:]).encode()
    )
    _frames_equal(convert_taobao(messy, min_history=1), convert_taobao(clean, min_history=1))


# -- bad lines ---------------------------------------------------------------------------------------


GOOD = [f"{1 + k // 10},{100 + k},{7 + k % 3},{TAOBAO_BEHAVIORS[k % 4]},{T0 + 60 * k}" for k in range(40)]
BAD_LINES = {
    "too few fields": ("3,4,5,pv", "expected 5 fields, found 4"),
    "too many fields": (f"3,4,5,pv,{T0},9", "expected 5 fields, found 6"),
    "user not an integer": (f"u3,4,5,pv,{T0}", "user is not a 64-bit integer: 'u3'"),
    "item a float": (f"3,4.5,5,pv,{T0}", "item is not a 64-bit integer: '4.5'"),
    "empty category": (f"3,4,,pv,{T0}", "category is not a 64-bit integer: ''"),
    "timestamp not a number": ("3,4,5,pv,oops", "timestamp is not a 64-bit integer: 'oops'"),
    "timestamp beyond 64 bits": ("3,4,5,pv,99999999999999999999", "timestamp is not a 64-bit integer"),
    "unknown behavior": (f"3,4,5,like,{T0}", "unknown behavior 'like' (expected pv, buy, cart, fav)"),
    "quoted field": (f'"3",4,5,pv,{T0}', "user is not a 64-bit integer: '\"3\"'"),
}


def _write(path: Path, lines: list[str], newline_at_end: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.parametrize("at", [0, 23, 40])
def test_bad_line_is_named_and_nothing_written(tmp_path: Path, case: str, at: int) -> None:
    line, problem = BAD_LINES[case]
    path = _write(tmp_path / "UserBehavior.csv", [*GOOD[:at], line, *GOOD[at:]])
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as err:
        convert_to_folder("taobao", path, out)
    message = str(err.value)
    assert f"{path}: line {at + 1}: {problem}" in message and repr(line) in message
    assert "--skip-bad-lines" in message
    assert not out.exists() and os.listdir(tmp_path) == ["UserBehavior.csv"]
    # the same line number from many small blocks (the bad line in a later block than the first)
    with pytest.raises(DatasetError, match=f"line {at + 1}: "):
        convert_taobao(path, chunksize=2)


def test_truncated_last_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "UserBehavior.csv", [*GOOD, "9,10,1"], newline_at_end=False)
    with pytest.raises(DatasetError) as err:
        convert_to_folder("taobao", path, tmp_path / "out")
    assert f"line {len(GOOD) + 1}: expected 5 fields, found 3 (the last line, without a newline" in str(
        err.value
    )
    # a whole last line without a newline is fine
    path = _write(tmp_path / "UserBehavior.csv", GOOD, newline_at_end=False)
    assert convert_to_folder("taobao", path, tmp_path / "out")["counts"]["events"] == len(GOOD)


def test_existing_folder_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = _write(tmp_path / "UserBehavior.csv", GOOD)
    convert_to_folder("taobao", path, out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _write(path, [*GOOD, "1,2,3,pv"])
    with pytest.raises(DatasetError, match="line 41"):
        convert_to_folder("taobao", path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["UserBehavior.csv", "out"]  # no temporary folder left
    # a later success replaces the dataset's files and keeps the others
    _write(path, GOOD[:30])
    convert_to_folder("taobao", path, out)
    assert read_dataset(out).meta["counts"]["events"] == 30 and (out / "notes.txt").read_text() == "mine"


def test_skip_bad_lines_counts_and_skips(tmp_path: Path) -> None:
    bad = [line for line, _ in BAD_LINES.values()]
    lines = list(GOOD)
    for k, line in enumerate(bad):
        lines.insert(3 * k + 2, line)  # at lines 3, 6, 9, ...
    path = _write(tmp_path / "UserBehavior.csv", [*lines, "1,2"], newline_at_end=False)
    meta = convert_to_folder("taobao", path, tmp_path / "out", skip_bad_lines=True)
    numbers = [*(3 * k + 3 for k in range(len(bad))), len(lines) + 1]
    assert meta["read"]["bad_lines"] == meta["counts"]["bad_lines"] == len(numbers) == 10
    assert meta["read"]["first_bad_lines"] == numbers
    assert read_dataset(tmp_path / "out").meta["read"]["bad_lines"] == 10
    clean = _write(tmp_path / "clean.csv", GOOD)
    _frames_equal(
        convert_taobao(path, skip_bad_lines=True, chunksize=3), convert_taobao(clean, skip_bad_lines=True)
    )
    assert read_taobao(path, skip_bad_lines=True, block_bytes=100).first_bad_lines == numbers


def test_rows_outside_the_window_are_data(tmp_path: Path) -> None:
    path = _write(tmp_path / "UserBehavior.csv", [*GOOD, "5,6,7,pv,-3", f"5,6,7,pv,{10**15}", "5,6,7,pv,0"])
    meta = convert_to_folder("taobao", path, tmp_path / "out")
    assert meta["read"] == {
        "lines": len(GOOD) + 3,
        "outside_window": 3,
        "bad_lines": 0,
        "first_bad_lines": [],
        "skip_bad_lines": False,
    }
    assert meta["counts"]["events"] == len(GOOD)


def test_cli_skip_bad_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "UserBehavior.csv", [*GOOD[:5], "x,1,2,pv,3", *GOOD[5:]])
    argv = ["data", "convert", "--format", "taobao", "--path", str(path), "--out", str(tmp_path / "out")]
    failed = CliRunner().invoke(app, argv)
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    assert f"{path}: line 6: user is not a 64-bit integer: 'x'" in failed.stderr
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, [*argv, "--skip-bad-lines"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bad_lines"] == 1 and summary["events"] == len(GOOD)
    assert "skipped 1 bad line(s), the first at line(s) 6" in result.stderr
    assert read_dataset(tmp_path / "out").meta["read"]["first_bad_lines"] == [6]
    wrong = CliRunner().invoke(
        app,
        [
            "data",
            "convert",
            "--format",
            "movielens",
            "--path",
            str(tmp_path),
            "--out",
            "x",
            "--skip-bad-lines",
        ],
    )
    assert wrong.exit_code == 2 and "--skip-bad-lines applies to --format taobao only" in wrong.stderr


# -- the writer --------------------------------------------------------------------------------------


def test_writer_checks_and_leaves_nothing(tmp_path: Path) -> None:
    import pyarrow as pa

    names = pa.array(["u1", "u2"])
    events = {
        "user_id": np.array([0, 1, 0], np.int32),
        "item_id": np.array([5, 6, 7]),
        "category_id": np.array([1, 1, 2]),
        "timestamp": np.array([10, 11, 12]),
    }
    impressions = {**events, "label": np.array([1, 0, 1], np.int8)}
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="rows must be sorted by"), DatasetWriter(out) as writer:
        writer.write_events(names, events, None)
    with pytest.raises(DatasetError, match="must be 0/1, found 2"), DatasetWriter(out) as writer:
        order = np.array([0, 2, 1])
        writer.write_events(names, events, order)
        writer.write_impressions(names, {**impressions, "label": np.array([1, 2, 0], np.int8)}, None)
    with pytest.raises(DatasetError, match="missing column"), DatasetWriter(out) as writer:
        writer.write_events(names, {k: v for k, v in events.items() if k != "timestamp"}, None)
    assert os.listdir(tmp_path) == []
    with DatasetWriter(out, batch_rows=2) as writer:
        writer.write_events(names, events, np.array([0, 2, 1]))
        writer.write_impressions(names, impressions, np.array([1, 0, 2]))
        meta = writer.commit({"source": "test"})
    ds = read_dataset(out)
    assert ds.events["user_id"].tolist() == ["u1", "u1", "u2"] and ds.events["item_id"].tolist() == [5, 7, 6]
    assert ds.impressions["impression_id"].tolist() == [0, 1, 2] and ds.impressions["label"].tolist() == [
        0,
        1,
        1,
    ]
    assert meta["counts"] == {
        "users": 2,
        "items": 3,
        "categories": 2,
        "events": 3,
        "impressions": 3,
        "positives": 2,
        "positive_rate": round(2 / 3, 6),
    }
