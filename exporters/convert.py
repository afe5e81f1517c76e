"""Converters from public datasets (MovieLens in three layouts, Taobao UserBehavior) to the canonical form."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from exporters.dataset import DatasetError, lookup, write_dataset

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


def convert_taobao(
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
    `dare`: the DARE paper's protocol, see `dare_impressions`."""
    if protocol not in TAOBAO_PROTOCOLS:
        raise DatasetError(f"unknown Taobao protocol {protocol!r}; use 'pageviews' or 'dare'")
    rows = _read_taobao(_taobao_file(Path(path)), max_users, window, chunksize)
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
        return dare_impressions(user[is_pv], item[is_pv], category[is_pv], ts[is_pv], rng)

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


def dare_impressions(
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
) -> dict[str, Any]:
    """Converts a public dataset and writes the canonical folder; returns its meta. `protocol` is Taobao's
    sampling protocol (default 'pageviews')."""
    meta: dict[str, Any]
    if protocol is not None and fmt != "taobao":
        raise DatasetError(f"a protocol applies to the taobao format only, not to {fmt!r}")
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
        events, impressions = convert_taobao(path, max_users=max_users, seed=seed, protocol=chosen)
        meta = {
            "source": "taobao",
            "protocol": taobao_protocol_meta(chosen),
            "label_rule": TAOBAO_LABEL_RULES[chosen],
        }
    else:
        raise DatasetError(f"unknown format {fmt!r}; use 'movielens' or 'taobao'")
    meta.update({"path": str(Path(path).resolve()), "seed": seed, "config": {"max_users": max_users}})
    return write_dataset(out_dir, events, impressions, meta)
