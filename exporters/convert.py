"""Converters from public datasets (MovieLens in three layouts, Taobao UserBehavior) to the canonical form."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from exporters.dataset import DatasetError, DatasetWriter, lookup, sorted_distinct, write_dataset

# Fixed category table for the csv / dat layouts: id = position + 1, 0 = no genre. Genres outside it
# (none in the published files) get ids after it, in sorted order.
MOVIELENS_GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# ml-100k's u.genre order, used when the folder has no u.genre
ML100K_GENRES = (
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
)
NO_GENRE = "(no genres listed)"
POSITIVE_RATING = 4.0
LAYOUTS = {
    "ml-latest": ("ratings.csv", "movies.csv"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-100k": ("u.data", "u.item"),
}
TAOBAO_FILE = "UserBehavior.csv"
TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")
# [2017-11-25 00:00, 2017-12-04 00:00) China time: the dataset's documented collection period
TAOBAO_WINDOW = (1_511_539_200, 1_512_316_800)
TaobaoProtocol = Literal["pageviews", "dare"]
TAOBAO_PROTOCOLS: tuple[TaobaoProtocol, ...] = ("pageviews", "dare")
# The DARE paper's protocol (github.com/thuml/DARE, preprocess/taobao_v4.py and scripts/taobao.sh). Only page
# views count; a user needs this many to take part.
DARE_MIN_PAGEVIEWS = 210
DARE_NEGATIVES = 2
# Targets as offsets from the end of a user's page views (1 = the last). The reference tests on 1, validates
# on 2 and trains on 19 targets 5 apart from 3 on (3, 8, ..., 93). The trainer's per-user split holds out the
# newest 10 % twice instead; with 23 targets of 3 impressions (69) that is 6 impressions each: offsets 1 and 2
# test, 3 and 8 validate, and the 19 targets from 13 to 103 train, so the training part keeps the reference's
# size (57 impressions per user).
DARE_TARGET_OFFSETS = (1, 2, *range(3, 104, 5))
# the reference's history: the newest 200 page views before a target (`dare-serve train --max-seq-len 200`)
DARE_HISTORY = 200
DARE_TRAIN_COMMAND = "dare-serve train --max-seq-len 200 --top-k 20 --batch-size 2048 --epochs 2"
TAOBAO_LABEL_RULES: dict[TaobaoProtocol, str] = {
    "pageviews": "next page view (1) + one popularity-sampled untouched item (0)",
    "dare": f"page view at each target offset (1) + {DARE_NEGATIVES} frequency-sampled unviewed items (0)",
}


def movielens_layout(path: str | Path) -> str:
    """Which MovieLens layout a folder holds: 'ml-latest', 'ml-1m' or 'ml-100k'."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: MovieLens folder not found")
    for layout, files in LAYOUTS.items():
        if all((root / f).is_file() for f in files):
            return layout
    expected = " or ".join(" + ".join(files) for files in LAYOUTS.values())
    raise DatasetError(f"{root}: not a MovieLens folder; expected {expected}")


def movielens_categories(path: str | Path) -> dict[int, str]:
    """The category id table a MovieLens folder converts with (id -> genre; 0 is 'no genre')."""
    return {i: name for i, name in enumerate(_genre_table(Path(path), movielens_layout(path)))}


def _genre_table(root: Path, layout: str) -> list[str]:
    if layout == "ml-100k":
        genre_file = root / "u.genre"
        if not genre_file.is_file():
            return ["(no genre)", *ML100K_GENRES]
        table = pd.read_csv(
            genre_file,
            sep="|",
            header=None,
            names=["name", "index"],
            encoding="latin-1",
            dtype={"name": "str", "index": "Int64"},
        ).dropna()
        return ["(no genre)", *table.sort_values("index")["name"].tolist()]
    genres = _first_genres_raw(root, layout)[1]
    tokens = {g for gs in genres.str.split("|") for g in gs} - {NO_GENRE, ""}
    extra = sorted(tokens - set(MOVIELENS_GENRES) - {"Children's"})
    return ["(no genre)", *MOVIELENS_GENRES, *extra]


def _first_genres_raw(root: Path, layout: str) -> tuple[np.ndarray, pd.Series]:
    """(movie ids, genre strings) from movies.csv / movies.dat."""
    if layout == "ml-latest":
        movies = pd.read_csv(root / "movies.csv", dtype={"movieId": np.int64, "title": str, "genres": str})
        return movies["movieId"].to_numpy(np.int64), movies["genres"].fillna(NO_GENRE)
    lines = pd.Series((root / "movies.dat").read_bytes().decode("latin-1").splitlines())
    lines = lines[lines.str.strip() != ""]
    ids = pd.to_numeric(lines.str.split("::", n=1).str[0], errors="coerce")
    genres = lines.str.rsplit("::", n=1).str[1].fillna(NO_GENRE)
    ok = ids.notna()
    return ids[ok].to_numpy(np.int64), genres[ok].reset_index(drop=True)


def _movie_categories(root: Path, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted movie ids, category id per movie)."""
    table = _genre_table(root, layout)
    if layout == "ml-100k":
        items = pd.read_csv(root / "u.item", sep="|", header=None, encoding="latin-1", dtype=str)
        n_genres = len(table) - 1
        if items.shape[1] < 5 + n_genres:
            raise DatasetError(f"{root / 'u.item'}: expected 5 + {n_genres} fields, found {items.shape[1]}")
        ids = pd.to_numeric(items[0], errors="raise").to_numpy(np.int64)
        flags = items.iloc[:, 5 : 5 + n_genres].fillna("0").astype(np.int64).to_numpy() > 0
        # the lowest-index flag set; no flag -> 0
        cats = np.where(flags.any(axis=1), flags.argmax(axis=1) + 1, 0)
    else:
        ids, genres = _first_genres_raw(root, layout)
        first = genres.str.split("|").str[0].replace("Children's", "Children")
        code = {name: i for i, name in enumerate(table) if i > 0}
        cats = first.map(code).fillna(0).to_numpy(np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], cats[order].astype(np.int64)


def _read_ratings(root: Path, layout: str) -> pd.DataFrame:
    """Ratings as columns user, item, rating, timestamp."""
    names = ["user", "item", "rating", "timestamp"]
    dtypes = {"user": np.int64, "item": np.int64, "rating": np.float64, "timestamp": np.int64}
    if layout == "ml-latest":
        df = pd.read_csv(
            root / "ratings.csv",
            dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float64, "timestamp": np.int64},
        )
        df.columns = names + list(df.columns[4:])
        return df[names]
    if layout == "ml-1m":
        # '::' needs pandas' slow python engine; one byte separator keeps the C parser
        raw = (root / "ratings.dat").read_bytes().replace(b"::", b"\t")
        return pd.read_csv(io.BytesIO(raw), sep="\t", header=None, names=names, dtype=dtypes)
    return pd.read_csv(root / "u.data", sep="\t", header=None, names=names, dtype=dtypes)


def _user_strings(user: np.ndarray) -> pd.Series:
    return "u" + pd.Series(user, dtype=np.int64).astype("str")


def convert_movielens(path: str | Path, max_users: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, impressions) of a MovieLens folder: every rating is an event and an impression,
    label 1 when the rating is >= 4."""
    root = Path(path)
    layout = movielens_layout(root)
    try:
        ratings = _read_ratings(root, layout)
        movie_ids, movie_cats = _movie_categories(root, layout)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{root}: cannot parse the {layout} files ({exc})") from exc
    if max_users is not None:
        keep = np.unique(ratings["user"].to_numpy())[:max_users]
        ratings = ratings[ratings["user"].isin(keep)]
    user = ratings["user"].to_numpy(np.int64)
    item = ratings["item"].to_numpy(np.int64)
    ts = ratings["timestamp"].to_numpy(np.int64)
    order = np.lexsort((item, ts, user))
    user, item, ts = user[order], item[order], ts[order]
    rating = ratings["rating"].to_numpy(np.float64)[order]
    user_id = _user_strings(user)
    category = lookup(movie_ids, movie_cats, item)
    events = pd.DataFrame({"user_id": user_id, "item_id": item, "category_id": category, "timestamp": ts})
    impressions = pd.DataFrame(
        {
            "user_id": user_id,
            "item_id": item,
            "category_id": category,
            "timestamp": ts,
            "label": (rating >= POSITIVE_RATING).astype(np.int8),
            "impression_id": np.arange(len(item), dtype=np.int64),
            "rating": rating.astype(np.float32),
        }
    )
    return _string_sorted(events), _string_sorted(impressions, renumber=True)


def _string_sorted(df: pd.DataFrame, renumber: bool = False) -> pd.DataFrame:
    """Rows in (user_id string, timestamp, item_id) order: the canonical order compares ids as strings."""
    codes, _ = pd.factorize(df["user_id"], sort=True)
    order = np.lexsort((df["item_id"].to_numpy(), df["timestamp"].to_numpy(), codes))
    out = df.iloc[order].reset_index(drop=True)
    if renumber and "impression_id" in out.columns:
        out["impression_id"] = np.arange(len(out), dtype=np.int64)
    return out


def _taobao_file(path: Path) -> Path:
    if path.is_dir():
        path = path / TAOBAO_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: Taobao {TAOBAO_FILE} not found")
    return path


@dataclass
class TaobaoRows:
    """What the reader keeps of a Taobao file: one compact entry per clean row (int32 where the values fit),
    the behavior as its index in TAOBAO_BEHAVIORS, and what it dropped."""

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    ts: np.ndarray
    behavior: np.ndarray  # uint8
    # raw categories of the rows a page-views-only read dropped (they still count for the dense category ids)
    other_categories: np.ndarray
    lines: int  # physical lines of the file
    outside_window: int  # well-formed rows outside the collection period (dropped, as data)
    bad_lines: int
    first_bad_lines: list[int] = field(default_factory=list)


class _Sink(Protocol):
    def write_events(
        self, user_ids: pa.Array[Any], columns: dict[str, Any], order: np.ndarray | None
    ) -> None: ...

    def write_impressions(
        self, user_ids: pa.Array[Any], columns: dict[str, Any], order: np.ndarray | None
    ) -> None: ...


_NAMES = ["user", "item", "category", "behavior", "timestamp"]
_INT_FIELDS = ("user", "item", "category", "timestamp")
# one well-formed line, as the typed CSV read accepts it (it trims blanks around integers); the line's newline
# stays in the binary array, hence the optional \r?\n at the end
_LINE_RE = (
    r"^[ \t]*-?[0-9]{1,19}[ \t]*,[ \t]*-?[0-9]{1,19}[ \t]*,[ \t]*-?[0-9]{1,19}[ \t]*,"
    + "("
    + "|".join(TAOBAO_BEHAVIORS)
    + ")"
    + r",[ \t]*-?[0-9]{1,19}[ \t]*\r?\n?$"
)
_INT_RE = re.compile(r"[ \t]*-?[0-9]+[ \t]*")
_SHOWN_BAD_LINES = 10
_PV = TAOBAO_BEHAVIORS.index("pv")


class _BadLine(DatasetError):
    pass


def _read_block(data: bytes | memoryview) -> pa.Table:
    """Whole lines through pyarrow's CSV reader, typed; raises pa.ArrowInvalid on a malformed line."""
    return pacsv.read_csv(
        cast(Any, pa.BufferReader(data)),
        read_options=pacsv.ReadOptions(column_names=_NAMES, block_size=1 << 24),
        # no quoting in this format: a quote is a bad line, in this read and in the line-by-line check alike
        parse_options=pacsv.ParseOptions(quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={
                **{name: pa.int64() for name in _INT_FIELDS},
                "behavior": pa.dictionary(pa.int32(), pa.string()),
            },
            null_values=[],
            strings_can_be_null=False,
        ),
    )


def _behavior_codes(column: pa.ChunkedArray[Any]) -> np.ndarray:
    """Index in TAOBAO_BEHAVIORS per row; 255 for any other value."""
    known = pa.array(TAOBAO_BEHAVIORS, pa.string())
    parts = []
    for chunk in cast(list[Any], column.chunks):
        lut = pc.index_in(chunk.dictionary, value_set=known).to_numpy(zero_copy_only=False)
        lut = np.nan_to_num(lut.astype(np.float64), nan=255).astype(np.uint8)  # nulls (not found) -> 255
        parts.append(lut[chunk.indices.to_numpy(zero_copy_only=False)])
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _line_problem(line: bytes) -> str:
    """Why a line is malformed, in words."""
    fields = line.rstrip(b"\r\n").decode("utf-8", "replace").split(",")
    if len(fields) != len(_NAMES):
        return f"expected {len(_NAMES)} fields, found {len(fields)}"
    for name, value in zip(_NAMES, fields, strict=True):
        if name == "behavior":
            if value not in TAOBAO_BEHAVIORS:
                return f"unknown behavior {value!r} (expected {', '.join(TAOBAO_BEHAVIORS)})"
        elif not _INT_RE.fullmatch(value) or not -(2**63) <= int(value) < 2**63:
            return f"{name} is not a 64-bit integer: {value!r}"
    return "not readable as CSV"


def _bad_line_error(path: Path, line_no: int, line: bytes, last: bool) -> _BadLine:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    shown = text if len(text) <= 200 else text[:200] + "..."
    truncated = " (the last line, without a newline: the file looks truncated)" if last else ""
    return _BadLine(
        f"{path}: line {line_no}: {_line_problem(line)}{truncated}: {shown!r}; "
        "--skip-bad-lines skips and counts such lines"
    )


def _split_lines(block: bytes) -> tuple[pa.Array[Any], np.ndarray]:
    """The block's lines (each with its newline) as one binary array without copying, and their starts."""
    newline = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
    ends = newline + 1 if block.endswith(b"\n") else np.r_[newline + 1, len(block)]
    offsets = np.r_[0, ends].astype(np.int32)
    lines = pa.BinaryArray.from_buffers(
        pa.binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(block)]
    )
    return lines, offsets[:-1]


def _clean_block(
    block: bytes, first_line: int, path: Path, at_end: bool, skip: bool, bad: list[int]
) -> tuple[pa.Table, int]:
    """The block's well-formed lines read as a table, and how many bad lines it had (their numbers appended
    to `bad`); raises _BadLine at the first bad line unless `skip`. Only blocks that failed the fast read
    come here: every line is checked on its own, so a bad line is found by its number."""
    lines, starts = _split_lines(block)
    blank = pc.match_substring_regex(lines, r"^\r?\n?$").to_numpy(zero_copy_only=False)
    good = pc.match_substring_regex(lines, _LINE_RE).to_numpy(zero_copy_only=False) | blank
    wrong = np.flatnonzero(~good)
    for k in wrong:
        if not skip:
            last = at_end and k == len(starts) - 1 and not block.endswith(b"\n")
            raise _bad_line_error(path, first_line + int(k), lines[int(k)].as_py(), last)
        bad.append(first_line + int(k))
    kept = lines.filter(pa.array(good & ~blank))
    if len(kept) == 0:
        return _read_block(b"0,0,0,pv,0\n").slice(0, 0), len(wrong)
    data = b"".join(cast(list[bytes], kept.to_pylist())) if len(wrong) else block
    if not data.endswith(b"\n"):
        data += b"\n"
    try:
        table = _read_block(data)
    except pa.ArrowInvalid as exc:
        # a line the pattern lets through but the reader does not (an integer beyond 64 bits): name the first
        for k in np.flatnonzero(good & ~blank):
            line = lines[int(k)].as_py()
            try:
                _read_block(line if line.endswith(b"\n") else line + b"\n")
            except pa.ArrowInvalid:
                if not skip:
                    raise _bad_line_error(path, first_line + int(k), line, False) from exc
                bad.append(first_line + int(k))
                good[k] = False
        kept = lines.filter(pa.array(good & ~blank))
        table = _read_block(
            b"".join(
                line if line.endswith(b"\n") else line + b"\n" for line in cast(list[bytes], kept.to_pylist())
            )
        )
    return table, int((~good).sum())


def _file_blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, int, bytes, bool]]:
    """(number of its first line, its number of lines, whole lines, whether it is the end of the file) per
    block of about block_bytes; a last line without a newline comes as it is."""
    line = 1
    rest = b""
    with path.open("rb") as f:
        while True:
            data = f.read(block_bytes)
            if not data:
                if rest:
                    yield line, 1, rest, True
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: read on
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            n_lines = block.count(b"\n")
            yield line, n_lines, block, False
            line += n_lines


def _int32_if_fits(values: np.ndarray) -> np.ndarray:
    if len(values) and int(values.min()) >= -(2**31) and int(values.max()) < 2**31:
        return values.astype(np.int32)
    return values


def read_taobao(
    path: str | Path,
    max_users: int | None = None,
    window: tuple[int, int] | None = TAOBAO_WINDOW,
    pageviews_only: bool = False,
    skip_bad_lines: bool = False,
    block_bytes: int = 64 << 20,
    progress: bool = False,
) -> TaobaoRows:
    """The clean rows of a Taobao UserBehavior.csv, streamed block by block: the first `max_users` users by
    id, rows inside `window`, page views only with `pageviews_only`.

    A malformed line (a field count other than 5, a field that is not a 64-bit integer, a behavior other
    than pv/buy/cart/fav; blank lines are ignored) raises a DatasetError with the file, its 1-based line
    number and its text; with `skip_bad_lines` such lines are skipped and counted instead. A timestamp
    outside the window is data: the row is dropped and counted as `outside_window`."""
    path = _taobao_file(Path(path))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("user", "item", "category", "ts", "behavior")}
    # per block, each category of the dropped non-page-view rows and the smallest user id that had it: the
    # categories of the users kept in the end still count for the dense category ids
    others: list[tuple[np.ndarray, np.ndarray]] = []
    keep: np.ndarray | None = None  # the smallest max_users user ids so far
    last_cut: int | None = None
    lines = outside = n_bad = 0
    bad: list[int] = []
    bar = tqdm(
        unit=" rows", unit_scale=True, desc="reading", file=sys.stderr, disable=None if progress else True
    )
    try:
        for first_line, n_lines, block, at_end in _file_blocks(path, block_bytes):
            try:
                table = _read_block(block)
                behavior = _behavior_codes(table.column("behavior"))
                clean = not (behavior == 255).any()
            except pa.ArrowInvalid:
                clean = False
            if not clean:
                table, n_block_bad = _clean_block(block, first_line, path, at_end, skip_bad_lines, bad)
                n_bad += n_block_bad
                del bad[_SHOWN_BAD_LINES:]
                behavior = _behavior_codes(table.column("behavior"))
            lines += n_lines
            bar.update(n_lines)
            cols = {name: table.column(name).to_numpy() for name in _INT_FIELDS}
            del table
            ok = np.ones(len(behavior), bool)
            if window is not None:
                ok = (cols["timestamp"] >= window[0]) & (cols["timestamp"] < window[1])
                outside += int(len(ok) - ok.sum())
            user = cols["user"][ok]
            if max_users is not None:
                # the smallest max_users ids so far; rows above the running cut can never come back
                seen = sorted_distinct(user if keep is None else np.concatenate([keep, user]))
                keep = seen[:max_users]
                if len(keep) == max_users:
                    cut = int(keep[-1])
                    ok &= cols["user"] <= cut
                    if cut != last_cut:
                        masks = [u <= cut for u in parts["user"]]
                        for name, stored in parts.items():
                            parts[name] = [a[m] for a, m in zip(stored, masks, strict=True)]
                        last_cut = cut
            if pageviews_only:
                other = ok & (behavior != _PV)
                if other.any():
                    other_user, other_cat = cols["user"][other], cols["category"][other]
                    by_cat = np.lexsort((other_user, other_cat))
                    other_user, other_cat = other_user[by_cat], other_cat[by_cat]
                    first = np.r_[True, other_cat[1:] != other_cat[:-1]]
                    others.append((other_cat[first], other_user[first]))
                ok &= behavior == _PV
            parts["user"].append(_int32_if_fits(cols["user"][ok]))
            parts["item"].append(_int32_if_fits(cols["item"][ok]))
            parts["category"].append(_int32_if_fits(cols["category"][ok]))
            parts["ts"].append(_int32_if_fits(cols["timestamp"][ok]))
            parts["behavior"].append(behavior[ok])
            del cols, behavior, ok
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    finally:
        bar.close()
    if lines == 0:
        raise DatasetError(f"{path}: no rows")
    arrays = {name: _concat(parts.pop(name)) for name in list(parts)}
    other_cat = np.concatenate([c for c, _ in others]) if others else np.zeros(0, np.int64)
    if last_cut is not None and others:
        other_cat = other_cat[np.concatenate([u for _, u in others]) <= last_cut]
    other_categories = sorted_distinct(other_cat)
    return TaobaoRows(
        user=arrays["user"],
        item=arrays["item"],
        category=arrays["category"],
        ts=arrays["ts"],
        behavior=arrays["behavior"].astype(np.uint8),
        other_categories=other_categories.astype(np.int64),
        lines=lines,
        outside_window=outside,
        bad_lines=n_bad,
        first_bad_lines=bad,
    )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    parts.clear()
    return out


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, int32 code of each value): a lookup table over the value range when it is
    moderate (raw Taobao ids run to a few million), a sort otherwise (not np.unique: see sorted_distinct)."""
    if len(values) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < max(4 * len(values), 1 << 24):
        offset = values - lo
        present = np.zeros(hi - lo + 1, bool)
        present[offset] = True
        table = np.cumsum(present, dtype=np.int32) - 1
        return np.flatnonzero(present) + lo, table[offset]
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.r_[True, ordered[1:] != ordered[:-1]]
    codes = np.empty(len(values), np.int32)
    codes[order] = np.cumsum(new) - 1
    return ordered[new].astype(np.int64), codes


def _sort_key_bits(n_users: int, ts_span: int, n_items: int) -> tuple[int, int, int] | None:
    """Bits of (user code, timestamp offset, item code) in one int64 sort key; None when they do not fit."""
    bits = ((n_users - 1).bit_length(), ts_span.bit_length(), (n_items - 1).bit_length())
    return bits if sum(bits) <= 63 else None


def _order(
    user: np.ndarray, ts: np.ndarray, item: np.ndarray, ts_min: int, bits: tuple[int, int, int] | None
) -> np.ndarray:
    """Stable order by (user, ts, item): one int64 key when the three fit in 63 bits (fast on files grouped
    by user), lexsort otherwise."""
    if bits is None:
        return np.lexsort((item, ts, user))
    key = user.astype(np.int64) << (bits[1] + bits[2])
    key |= (ts.astype(np.int64) - ts_min) << bits[2]
    key |= item
    return np.argsort(key, kind="stable")


def _order_in_runs(
    user: np.ndarray,
    ts: np.ndarray,
    item: np.ndarray,
    runs: list[tuple[int, int]],
    ts_min: int,
    bits: tuple[int, int, int] | None,
    slice_rows: int = 1 << 22,
) -> np.ndarray:
    """The stable order by (user, ts, item) of rows made of runs that are each sorted by user, a slice of
    users at a time, so that sorting 10^8 impressions needs no full-size key."""
    n = len(user)
    order = np.empty(n, np.int32 if n < 2**31 else np.int64)
    if n == 0:
        return order
    cum = np.cumsum(np.bincount(user))
    cuts = np.unique(np.r_[0, np.searchsorted(cum, np.arange(slice_rows, n, slice_rows)) + 1, len(cum)])
    done = 0
    for u0, u1 in zip(cuts[:-1], cuts[1:], strict=True):
        # bounds in the user column's own dtype: a mixed-dtype searchsorted would copy the column each time
        lo, hi = user.dtype.type(u0), user.dtype.type(u1)
        idx = np.concatenate(
            [
                np.arange(s + np.searchsorted(user[s:e], lo), s + np.searchsorted(user[s:e], hi))
                for s, e in runs
            ]
        )
        order[done : done + len(idx)] = idx[_order(user[idx], ts[idx], item[idx], ts_min, bits)]
        done += len(idx)
    return order


def _user_names(users: np.ndarray) -> pa.Array[Any]:
    """'u<id>' per user id (one per user, not per row)."""
    return pa.array(np.char.add("u", users.astype(np.str_)), pa.string())


def _string_order(user: np.ndarray, names: pa.Array[Any]) -> np.ndarray:
    """Row order that puts rows grouped by user code (ascending) into the order of the users' names as
    strings, each user's rows keeping their order: the canonical order compares user ids as strings."""
    n = len(user)
    counts = np.bincount(user, minlength=len(names))
    starts = np.cumsum(counts) - counts
    by_name = pc.sort_indices(names).to_numpy()
    new_counts = counts[by_name]
    dtype = np.int32 if n < 2**31 else np.int64
    order = np.repeat((starts[by_name] - (np.cumsum(new_counts) - new_counts)).astype(dtype), new_counts)
    order += np.arange(n, dtype=dtype)
    return order


def _behavior_column(codes: np.ndarray) -> pa.Array[Any]:
    return pa.DictionaryArray.from_arrays(codes.astype(np.int8), pa.array(TAOBAO_BEHAVIORS, pa.string()))


class _FrameSink:
    """Collects the tables as pandas frames (convert_taobao's return value)."""

    def __init__(self) -> None:
        self.events = pd.DataFrame()
        self.impressions = pd.DataFrame()

    def write_events(
        self, user_ids: pa.Array[Any], columns: dict[str, Any], order: np.ndarray | None
    ) -> None:
        self.events = _frame(user_ids, columns, order)

    def write_impressions(
        self, user_ids: pa.Array[Any], columns: dict[str, Any], order: np.ndarray | None
    ) -> None:
        frame = _frame(user_ids, columns, order)
        frame.insert(
            list(frame.columns).index("label") + 1, "impression_id", np.arange(len(frame), dtype=np.int64)
        )
        self.impressions = frame


def _frame(user_ids: pa.Array[Any], columns: dict[str, Any], order: np.ndarray | None) -> pd.DataFrame:
    rows = slice(None) if order is None else order
    names = np.asarray(user_ids.to_pylist(), dtype=object)
    data: dict[str, Any] = {}
    for col, values in columns.items():
        if col == "user_id":
            data[col] = pd.Series(names[values[rows]], dtype="str")
        elif isinstance(values, pa.DictionaryArray):
            taken = values if order is None else values.take(pa.array(order))
            data[col] = pd.Categorical.from_codes(
                taken.indices.to_numpy(), categories=pd.Index(values.dictionary.to_pylist())
            )
        elif col in ("item_id", "category_id", "timestamp"):
            data[col] = values[rows].astype(np.int64)
        else:
            data[col] = values[rows]
    return pd.DataFrame(data)


def _taobao_tables(
    rows: TaobaoRows,
    sink: _Sink,
    protocol: TaobaoProtocol,
    min_history: int,
    rng: np.random.Generator,
    path: Path,
) -> None:
    """Builds the protocol's events and impressions from the reader's rows and hands them to `sink`, events
    first (so that a writer can let them go before the impressions are built)."""
    if len(rows.user) == 0:
        if protocol == "dare" and rows.bad_lines + rows.outside_window < rows.lines:
            raise DatasetError(f"{path}: no page views")
        raise DatasetError(f"{path}: no rows left after dropping bad timestamps and behaviors")
    users, user_code = _dense(rows.user)
    items, item_code = _dense(rows.item)
    ts_min = int(rows.ts.min())
    bits = _sort_key_bits(len(users), int(rows.ts.max()) - ts_min, len(items))
    order = _order(user_code, rows.ts, item_code, ts_min, bits)
    # sorted by (user id as a number, time, item, file order); every step below works in this order, as
    # the pandas implementation did, and the writer puts users in string order at the end
    user_code, item_code, ts = user_code[order], item_code[order], rows.ts[order]
    behavior, raw_category = rows.behavior[order], rows.category[order]
    del order
    rows.user = rows.item = rows.ts = rows.behavior = rows.category = np.zeros(0, np.int32)
    # raw category ids reach millions; dense ids (raw order, from 1) keep category tables small
    cat_keys = sorted_distinct(np.concatenate([_dense(raw_category)[0], rows.other_categories]))
    category = (np.searchsorted(cat_keys, raw_category) + 1).astype(np.int32)
    del raw_category
    names = _user_names(users)
    items = _int32_if_fits(items)
    n = len(user_code)
    if protocol == "dare":
        _dare_tables(user_code, item_code, category, ts, items, names, sink, rng, ts_min, bits)
        return

    # each item's category, first seen
    first_at = np.full(len(items), n, np.int64)
    np.minimum.at(first_at, item_code, np.arange(n))
    item_category = category[first_at]
    del first_at
    sink.write_events(
        names,
        {
            "user_id": user_code,
            "item_id": items[item_code],
            "category_id": category,
            "timestamp": ts,
            "behavior": _behavior_column(behavior),
        },
        _string_order(user_code, names),
    )
    del category
    # page views after each user's first min_history ones
    is_pv = behavior == _PV
    del behavior
    pv_before = np.cumsum(is_pv, dtype=np.int64 if n >= 2**31 else np.int32) - is_pv
    counts = np.bincount(user_code, minlength=len(users))
    user_start = np.cumsum(counts) - counts
    pv_rank = pv_before - pv_before[user_start][user_code]
    positives = np.flatnonzero(is_pv & (pv_rank >= min_history))
    del is_pv, pv_before, pv_rank
    pos_user = user_code[positives]
    neg_code, ok = _sample_negatives(user_code, item_code, pos_user, rng)
    pos_item, pos_ts = item_code[positives], ts[positives]
    del positives, user_code, item_code, ts
    n_pos = len(pos_user)
    im_user = np.concatenate([pos_user, pos_user[ok]])
    im_item = np.concatenate([pos_item, neg_code[ok]])
    im_ts = np.concatenate([pos_ts, pos_ts[ok]])
    del pos_user, pos_item, pos_ts, neg_code, ok
    _write_impressions(
        sink, names, items, im_user, im_item, im_ts, item_category[im_item], n_pos, ts_min, bits
    )


def _write_impressions(
    sink: _Sink,
    names: pa.Array[Any],
    items: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    category: np.ndarray,
    n_pos: int,
    ts_min: int,
    bits: tuple[int, int, int] | None,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Impressions whose first `n_pos` rows are the positives and the rest their negatives (user and
    item codes), labelled and written in (user id string, time, item) order, positives and negatives
    each in their own run as the protocols define."""
    order = _order_in_runs(user, ts, item, [(0, n_pos), (n_pos, len(user))], ts_min, bits)
    order = order[_string_order(user[order], names)]
    columns = {
        "user_id": user,
        "item_id": items[item],
        "category_id": category,
        "timestamp": ts,
        "label": np.r_[np.ones(n_pos, np.int8), np.zeros(len(user) - n_pos, np.int8)],
        **(extra or {}),
    }
    sink.write_impressions(names, columns, order)


def _dare_tables(
    user_code: np.ndarray,
    item_code: np.ndarray,
    category: np.ndarray,
    ts: np.ndarray,
    items: np.ndarray,
    names: pa.Array[Any],
    sink: _Sink,
    rng: np.random.Generator,
    ts_min: int,
    bits: tuple[int, int, int] | None,
) -> None:
    """The DARE paper's protocol on page views sorted by (user, time, item).

    Users with at least DARE_MIN_PAGEVIEWS page views take part; their page views are the events. Each one
    gets a positive at every offset of DARE_TARGET_OFFSETS from the end of their page views, and per positive
    DARE_NEGATIVES items drawn with replacement by page-view frequency (every user's) among items the user
    never viewed, at the positive's timestamp. `target_offset` records each impression's offset."""
    n = len(user_code)
    count = np.bincount(user_code, minlength=len(names))
    end = np.cumsum(count)
    kept = np.flatnonzero(count >= DARE_MIN_PAGEVIEWS)
    if len(kept) == 0:
        raise DatasetError(f"no user has {DARE_MIN_PAGEVIEWS} or more page views")
    # an item seen under several categories takes its latest one, as in the reference
    last_at = np.full(len(items), -1, np.int64)
    np.maximum.at(last_at, item_code, np.arange(n))
    item_category = category[last_at]
    del last_at
    in_kept = np.flatnonzero(count[user_code] >= DARE_MIN_PAGEVIEWS)
    sink.write_events(
        names,
        {
            "user_id": user_code[in_kept],
            "item_id": items[item_code[in_kept]],
            "category_id": category[in_kept],
            "timestamp": ts[in_kept],
            "behavior": _behavior_column(np.full(len(in_kept), _PV, np.int8)),
        },
        _string_order(user_code[in_kept], names),
    )
    del in_kept
    offsets = np.asarray(DARE_TARGET_OFFSETS, np.int64)
    target_at = (end[kept][:, None] - offsets[None, :]).ravel()
    target_offset = np.tile(offsets, len(kept))
    pos_user = user_code[target_at]
    neg_target = np.repeat(target_at, DARE_NEGATIVES)
    neg_code, ok = _sample_negatives(user_code, item_code, user_code[neg_target], rng)
    neg_target, neg_code = neg_target[ok], neg_code[ok]
    _write_impressions(
        sink,
        names,
        items,
        np.concatenate([pos_user, user_code[neg_target]]),
        np.concatenate([item_code[target_at], neg_code]),
        np.concatenate([ts[target_at], ts[neg_target]]),
        # the positive keeps the category of its own page view
        np.concatenate([category[target_at], item_category[neg_code]]),
        len(target_at),
        ts_min,
        bits,
        {
            "target_offset": np.concatenate(
                [target_offset, np.repeat(target_offset, DARE_NEGATIVES)[ok]]
            ).astype(np.int16)
        },
    )


def convert_taobao(
    path: str | Path,
    max_users: int | None = None,
    min_history: int = 5,
    seed: int = 0,
    window: tuple[int, int] | None = TAOBAO_WINDOW,
    chunksize: int = 1_000_000,
    protocol: TaobaoProtocol = "pageviews",
    skip_bad_lines: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, impressions) of Taobao UserBehavior.csv under a sampling protocol, as pandas frames (for
    small files; `convert_to_folder` writes large ones without them).

    `pageviews`: every behavior is an event; each user's page views after the first `min_history` are
    positives, each with one popularity-sampled negative the user never touched, at the same timestamp.
    `dare`: the DARE paper's protocol, see `_dare_tables`. `chunksize` is the read block in rows (about
    40 bytes each); the result does not depend on it. Bad lines: see `read_taobao`."""
    sink = _FrameSink()
    _convert_taobao_into(
        sink, path, max_users, min_history, seed, window, 40 * chunksize, protocol, skip_bad_lines, False
    )
    return sink.events, sink.impressions


def _convert_taobao_into(
    sink: _Sink,
    path: str | Path,
    max_users: int | None,
    min_history: int,
    seed: int,
    window: tuple[int, int] | None,
    block_bytes: int,
    protocol: TaobaoProtocol,
    skip_bad_lines: bool,
    progress: bool,
) -> dict[str, Any]:
    """Reads, builds and hands the tables to `sink`; returns what meta.json records of the read."""
    if protocol not in TAOBAO_PROTOCOLS:
        raise DatasetError(f"unknown Taobao protocol {protocol!r}; use 'pageviews' or 'dare'")
    rows = read_taobao(
        path,
        max_users=max_users,
        window=window,
        pageviews_only=protocol == "dare",
        skip_bad_lines=skip_bad_lines,
        block_bytes=block_bytes,
        progress=progress,
    )
    read = {
        "lines": rows.lines,
        "outside_window": rows.outside_window,
        "bad_lines": rows.bad_lines,
        "first_bad_lines": rows.first_bad_lines,
        "skip_bad_lines": skip_bad_lines,
    }
    _taobao_tables(rows, sink, protocol, min_history, np.random.default_rng(seed), Path(path))
    return read


def _sample_negatives(
    user_code: np.ndarray,
    item_code: np.ndarray,
    for_user: np.ndarray,
    rng: np.random.Generator,
    rounds: int = 64,
    slice_size: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query user, an item code drawn by popularity among items that user never touched; `ok` is False
    where none was found (a user who touched nearly everything).

    Each rejection round draws for all pending queries in order, a slice at a time: the random stream is
    the same as one draw per round, and the temporaries stay small."""
    n_items = int(item_code.max()) + 1
    touched = user_code.astype(np.int64) * n_items
    np.add(touched, item_code, out=touched)
    touched.sort()
    touched = touched[np.r_[True, touched[1:] != touched[:-1]]]
    counts = np.bincount(item_code, minlength=n_items)
    total = float(counts.sum())
    # every unit of popularity mass, in item order: the item at floor(u * total) is the one that
    # searchsorted(cumsum(counts), u * total, side="right") finds (the counts are integers), in one lookup
    # instead of a binary search
    mass = np.repeat(np.arange(n_items, dtype=np.int32 if n_items < 2**31 else np.int64), counts)
    del counts
    neg = np.zeros(len(for_user), np.int32 if n_items < 2**31 else np.int64)
    todo = np.arange(len(for_user))
    for _ in range(rounds):
        if len(todo) == 0:
            break
        rejected = []
        for start in range(0, len(todo), slice_size):
            part = todo[start : start + slice_size]
            draw = mass[np.minimum((rng.random(len(part)) * total).astype(np.int64), len(mass) - 1)]
            neg[part] = draw
            key = for_user[part].astype(np.int64) * n_items
            np.add(key, draw, out=key)
            pos = np.minimum(np.searchsorted(touched, key), len(touched) - 1)
            rejected.append(part[touched[pos] == key])
        todo = np.concatenate(rejected)
    ok = np.ones(len(for_user), bool)
    ok[todo] = False
    return neg, ok


def taobao_protocol_meta(protocol: TaobaoProtocol, min_history: int = 5) -> dict[str, Any]:
    """What meta.json records of a Taobao protocol: its name and every parameter it ran with."""
    if protocol == "pageviews":
        return {
            "name": "pageviews",
            "behaviors": list(TAOBAO_BEHAVIORS),
            "min_history": min_history,
            "negatives": 1,
        }
    return {
        "name": "dare",
        "reference": "github.com/thuml/DARE preprocess/taobao_v4.py",
        "behaviors": ["pv"],
        "min_pageviews": DARE_MIN_PAGEVIEWS,
        "target_offsets": list(DARE_TARGET_OFFSETS),
        "negatives": DARE_NEGATIVES,
        "history": DARE_HISTORY,
        "train": DARE_TRAIN_COMMAND,
    }


def convert_to_folder(
    fmt: str,
    path: str | Path,
    out_dir: str | Path,
    max_users: int | None = None,
    seed: int = 0,
    protocol: str | None = None,
    skip_bad_lines: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Converts a public dataset and writes the canonical folder; returns its meta. `protocol` is Taobao's
    sampling protocol (default 'pageviews'); `skip_bad_lines` skips and counts malformed Taobao lines
    instead of failing on the first; `progress` shows the rows read on stderr."""
    meta: dict[str, Any]
    if protocol is not None and fmt != "taobao":
        raise DatasetError(f"a protocol applies to the taobao format only, not to {fmt!r}")
    if skip_bad_lines and fmt != "taobao":
        raise DatasetError(f"skipping bad lines applies to the taobao format only, not to {fmt!r}")
    if fmt == "movielens":
        events, impressions = convert_movielens(path, max_users=max_users)
        meta = {
            "source": "movielens",
            "layout": movielens_layout(path),
            "categories": {str(k): v for k, v in movielens_categories(path).items()},
            "label_rule": f"rating >= {POSITIVE_RATING}",
        }
    elif fmt == "taobao":
        protocols: dict[str | None, TaobaoProtocol] = {None: "pageviews", **{p: p for p in TAOBAO_PROTOCOLS}}
        chosen = protocols.get(protocol)
        if chosen is None:
            raise DatasetError(f"unknown Taobao protocol {protocol!r}; use 'pageviews' or 'dare'")
        meta = {
            "source": "taobao",
            "protocol": taobao_protocol_meta(chosen),
            "label_rule": TAOBAO_LABEL_RULES[chosen],
            "path": str(Path(path).resolve()),
            "seed": seed,
            "config": {"max_users": max_users},
        }
        # the tables go to parquet in row batches, never through pandas: memory follows the numeric columns
        with DatasetWriter(out_dir) as writer:
            meta["read"] = _convert_taobao_into(
                writer, path, max_users, 5, seed, TAOBAO_WINDOW, 64 << 20, chosen, skip_bad_lines, progress
            )
            meta["counts"] = {"bad_lines": meta["read"]["bad_lines"]}
            return writer.commit(meta)
    else:
        raise DatasetError(f"unknown format {fmt!r}; use 'movielens' or 'taobao'")
    meta.update({"path": str(Path(path).resolve()), "seed": seed, "config": {"max_users": max_users}})
    return write_dataset(out_dir, events, impressions, meta)
