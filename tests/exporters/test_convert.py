"""Converters on hand-written files of every layout, on real MovieLens data, and `dare-serve data convert`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exporters.convert import (
    TAOBAO_WINDOW,
    convert_movielens,
    convert_taobao,
    movielens_categories,
    movielens_layout,
)
from exporters.dataset import DatasetError, read_dataset
from service.cli import app

DATA = Path("/work/shared/data")
T0 = TAOBAO_WINDOW[0]


def _ml_latest(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "movies.csv").write_bytes(
        b"movieId,title,genres\r\n"
        b'1,"Toy Story, The (1995)",Adventure|Animation|Children\r\n'
        b"2,Heat (1995),Action|Crime|Thriller\r\n"
        b"3,Unknown Film (2001),(no genres listed)\r\n"
        b"4,Some Drama (1999),Drama\r\n"
    )
    (root / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\r\n"
        b"2,2,3.5,100\r\n"
        b"10,1,4.0,50\r\n"
        b"2,1,5.0,90\r\n"
        b"2,3,0.5,100\r\n"
        b"10,4,2.0,60\r\n"
        b"10,99,4.5,70\r\n"
    )
    return root


def test_movielens_csv_layout(tmp_path: Path) -> None:
    root = _ml_latest(tmp_path / "ml")
    assert movielens_layout(root) == "ml-latest"
    events, impressions = convert_movielens(root)
    # "u10" < "u2" as strings; inside a user by time, then item
    assert events["user_id"].tolist() == ["u10", "u10", "u10", "u2", "u2", "u2"]
    assert events["item_id"].tolist() == [1, 4, 99, 1, 2, 3]
    assert events["timestamp"].tolist() == [50, 60, 70, 90, 100, 100]
    # first listed genre from the fixed sorted table; no genre and unknown movie -> 0
    assert events["category_id"].tolist() == [2, 8, 0, 2, 1, 0]
    assert impressions["label"].tolist() == [1, 0, 1, 1, 0, 0]
    assert impressions["item_id"].tolist() == events["item_id"].tolist()
    assert impressions["impression_id"].tolist() == list(range(6))
    cats = movielens_categories(root)
    assert cats[0] == "(no genre)" and cats[1] == "Action" and cats[4] == "Children" and len(cats) == 20


def test_movielens_dat_layout(tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café au lait (1993)::Children's|Comedy\n"
        "3::Weird (1990)::Zombie|Horror\n".encode("latin-1")
    )
    (root / "ratings.dat").write_bytes(b"1::2::4::978300760\n1::1::3::978300761\n7::3::5::978300000\n")
    assert movielens_layout(root) == "ml-1m"
    events, impressions = convert_movielens(root)
    assert events["user_id"].tolist() == ["u1", "u1", "u7"]
    assert events["item_id"].tolist() == [2, 1, 3]
    # Children's is the csv layout's Children (4); a genre outside the table comes after it (20)
    assert events["category_id"].tolist() == [4, 3, 20]
    assert impressions["label"].tolist() == [1, 0, 1]
    assert movielens_categories(root)[20] == "Zombie"


def test_movielens_100k_layout(tmp_path: Path) -> None:
    root = tmp_path / "ml-100k"
    root.mkdir()
    genres = [
        "unknown",
        "Action",
        "Adventure",
        "Animation",
        "Children's",
        "Comedy",
        "Crime",
        "Documentary",
        "Drama",
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
    ]
    (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")

    def flags(*on: int) -> str:
        return "|".join("1" if i in on else "0" for i in range(19))

    (root / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags(3, 4, 5)}\n"
            f"2|Señor (1996)|01-Jan-1996||http://y|{flags(5, 1)}\n"
            f"3|Nothing (1997)|01-Jan-1997||http://z|{flags()}\n"
            f"4|Odd (1997)|01-Jan-1997||http://z|{flags(0)}\n"
        ).encode("latin-1")
    )
    (root / "u.data").write_text(
        "5\t1\t4\t881250949\n5\t2\t3\t881250949\n3\t3\t5\t881250000\n3\t4\t1\t881250001\n"
    )
    assert movielens_layout(root) == "ml-100k"
    events, impressions = convert_movielens(root)
    assert events["user_id"].tolist() == ["u3", "u3", "u5", "u5"]
    assert events["item_id"].tolist() == [3, 4, 1, 2]
    # u.genre index + 1; lowest flag set wins; no flag -> 0
    assert events["category_id"].tolist() == [0, 1, 4, 2]
    assert impressions["label"].tolist() == [1, 0, 1, 0]
    assert movielens_categories(root)[2] == "Action"


def test_movielens_max_users_and_bad_folder(tmp_path: Path) -> None:
    events, _ = convert_movielens(_ml_latest(tmp_path / "ml"), max_users=1)
    assert set(events["user_id"]) == {"u2"}  # smallest numeric id
    with pytest.raises(DatasetError, match="not a MovieLens folder"):
        convert_movielens(tmp_path)


def _taobao(path: Path) -> Path:
    rows = [
        # user, item, category, behavior, timestamp (not sorted by user, as a real file need not be)
        (9, 500, 77, "pv", T0 + 5),
        (2, 100, 10, "pv", T0 + 10),
        (2, 101, 10, "pv", T0 + 20),
        (2, 102, 11, "cart", T0 + 25),
        (2, 103, 11, "pv", T0 + 30),
        (2, 100, 10, "pv", T0 + 40),
        (2, 104, 12, "pv", T0 - 100),  # before the collection window: dropped
        (2, 105, 12, "pv", "oops"),  # not a timestamp: a bad line, skipped
        (2, 106, 12, "like", T0 + 50),  # unknown behavior: a bad line, skipped
        (5, 200, 20, "pv", T0 + 1),
        (5, 201, 20, "buy", T0 + 2),
        (5, 202, 21, "pv", T0 + 3),
        (5, 203, 21, "pv", T0 + 4),
        (9, 501, 77, "fav", T0 + 6),
    ]
    path.write_text("".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def test_taobao(tmp_path: Path) -> None:
    src = _taobao(tmp_path / "UserBehavior.csv")
    events, impressions = convert_taobao(tmp_path, min_history=1, seed=3, chunksize=4, skip_bad_lines=True)
    assert len(events) == 11
    assert events["user_id"].tolist()[:5] == ["u2"] * 5
    assert events["timestamp"].tolist()[:5] == [T0 + 10, T0 + 20, T0 + 25, T0 + 30, T0 + 40]
    assert set(events["behavior"]) == {"pv", "cart", "buy", "fav"}
    # dense categories in raw-id order: 10, 11, 20, 21, 77 -> 1..5
    assert dict(zip(events["item_id"], events["category_id"], strict=True))[500] == 5
    pos = impressions[impressions["label"] == 1]
    neg = impressions[impressions["label"] == 0]
    # u2 views 100, 101, 103, 100: all but the first are positives; u5: 202, 203; u9: none (one view)
    assert sorted(zip(pos["user_id"], pos["item_id"], strict=True)) == [
        ("u2", 100),
        ("u2", 101),
        ("u2", 103),
        ("u5", 202),
        ("u5", 203),
    ]
    assert len(neg) == len(pos)
    touched = set(zip(events["user_id"], events["item_id"], strict=True))
    assert not any((u, i) in touched for u, i in zip(neg["user_id"], neg["item_id"], strict=True))
    assert sorted(neg["timestamp"]) == sorted(pos["timestamp"])
    again = convert_taobao(src, min_history=1, seed=3, skip_bad_lines=True)[1]
    assert again.equals(impressions)  # seeded, and chunk size does not matter
    assert impressions["impression_id"].tolist() == list(range(len(impressions)))


def test_taobao_max_users_takes_smallest_ids(tmp_path: Path) -> None:
    events, impressions = convert_taobao(
        _taobao(tmp_path / "ub.csv"), max_users=2, min_history=1, chunksize=3, skip_bad_lines=True
    )
    assert sorted(set(events["user_id"])) == ["u2", "u5"]
    assert set(impressions["user_id"]) == {"u2", "u5"}
    with pytest.raises(DatasetError, match="not found"):
        convert_taobao(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    ("folder", "n_events", "n_users", "rate"),
    [("ml-latest-small", 100_836, 610, 0.482), ("ml-100k", 100_000, 943, 0.554)],
)
def test_real_movielens(folder: str, n_events: int, n_users: int, rate: float) -> None:
    if not (DATA / folder).is_dir():
        pytest.skip(f"shared data {DATA / folder} not present")
    events, impressions = convert_movielens(DATA / folder)
    assert len(events) == len(impressions) == n_events
    assert events["user_id"].nunique() == n_users
    assert impressions["label"].mean() == pytest.approx(rate, abs=5e-4)
    assert events["category_id"].between(0, 19).all()
    if folder == "ml-latest-small":
        assert events.groupby("user_id").size().max() == 2698
        assert (events.drop_duplicates("item_id")["category_id"] == 0).sum() == 34  # '(no genres listed)'
    else:
        assert (events.drop_duplicates("item_id")["category_id"] == 1).sum() == 2  # only 'unknown'


def test_cli_convert(tmp_path: Path) -> None:
    root = _ml_latest(tmp_path / "ml")
    result = CliRunner().invoke(
        app, ["data", "convert", "--format", "movielens", "--path", str(root), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["events"] == 6 and summary["users"] == 2 and summary["positive_rate"] == 0.5
    ds = read_dataset(tmp_path / "out")
    assert ds.meta["layout"] == "ml-latest" and ds.meta["categories"]["1"] == "Action"
    assert ds.impressions["label"].tolist() == [1, 0, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "parquet", "--path", "{tmp}"], "--format must be movielens or taobao"),
        (["--format", "movielens", "--path", "{tmp}/nope"], "not found"),
        (["--format", "movielens", "--path", "{tmp}"], "not a MovieLens folder"),
        (["--format", "taobao", "--path", "{tmp}"], "UserBehavior.csv not found"),
    ],
)
def test_cli_convert_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    argv = ["data", "convert", *(a.format(tmp=tmp_path) for a in args), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_cli_exit_code_in_a_real_process(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("dare-serve")
    proc = subprocess.run(
        [
            str(exe),
            "data",
            "convert",
            "--format",
            "movielens",
            "--path",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "not a MovieLens folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and proc.stdout == ""
