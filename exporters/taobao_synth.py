"""A synthetic Taobao UserBehavior.csv of any size, streamed in chunks of users, with planted relatedness.

The file has the real one's shape: no header, `user_id,item_id,category_id,behavior_type,timestamp`, rows
grouped by user and in time order, sparse raw ids, one fixed category per item, pv / buy / cart / fav in
the real file's proportions, 9 days that start at midnight China time, sessions of a few minutes with a
day-night rhythm, zipfian item popularity and heavy-tailed rows per user. Underneath, items belong to
hidden *themes* dealt out independently of the category, and each user follows 2-4 of them: a share of
every user's rows come from their themes, so which behaviors are related is known (`item_themes.parquet`,
`user_interests.parquet`) while no column reveals it. Only the catalogue (a few arrays of one entry per
item) is held whole; rows exist one chunk of users at a time, so memory does not grow with the row count.
docs/datasets.md has the details.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from tqdm import tqdm

from exporters.convert import TAOBAO_BEHAVIORS, TAOBAO_WINDOW
from exporters.synth import first_failed

DAY = 86_400
ITEM_THEMES_FILE = "item_themes.parquet"
USER_INTERESTS_FILE = "user_interests.parquet"
META_FILE = "meta.json"
# Mean gap between consecutive raw ids: the real file's ids are sparse (987,994 users numbered up to about
# 1.02 M, 4.16 M items up to about 5.16 M) and its category ids run into the millions.
USER_ID_GAP = 1.03
ITEM_ID_GAP = 1.24
CATEGORY_ID_SPREAD = 500
# Relative activity per hour of the day, China time (the window opens at midnight there): quiet before
# dawn, a daytime plateau, busiest in the evening. A plausible profile, not one fitted to the real file.
HOURLY = (
    3.5, 2.0, 1.2, 0.8, 0.6, 0.6, 0.9, 1.8, 3.0, 3.8, 4.2, 4.3,
    4.4, 4.4, 4.3, 4.3, 4.3, 4.4, 4.6, 5.2, 6.0, 6.6, 6.4, 5.0,
)  # fmt: skip


@dataclass(frozen=True)
class TaobaoSynthConfig:
    """Knobs of the Taobao-shaped world; the defaults are the real file's scale (about 100 M rows)."""

    users: int = 987_994
    items: int = 4_162_024
    categories: int = 9_439
    seed: int = 0
    days: int = 9
    start_ts: int = TAOBAO_WINDOW[0]
    # the real file's behavior mix; page views take the rest (89.6 %)
    buy_share: float = 0.0201
    cart_share: float = 0.0552
    fav_share: float = 0.0288
    # item popularity ~ rank ** -zipf_exponent over a random order of items
    zipf_exponent: float = 0.9
    # category sizes: lognormal weights with this spread, at least one item each
    category_size_sigma: float = 1.5
    # rows per user: lognormal with this mean (the real file's 101.4) and spread of its log, capped
    mean_seq_len: float = 101.4
    seq_len_sigma: float = 0.9
    max_seq_len: int = 20_000
    mean_session_rows: float = 8.0
    # seconds between rows of one session: lognormal with this median
    median_gap_s: float = 30.0
    # hidden themes: items // items_per_theme of them (at least interests_max), equal-sized
    items_per_theme: int = 200
    interests_min: int = 2
    interests_max: int = 4
    # share of each user's rows drawn from their interest themes; the rest follows global popularity
    interest_share: float = 0.4
    # users generated (and held) at once; part of what the output depends on
    chunk_users: int = 10_000

    @property
    def n_themes(self) -> int:
        return max(self.interests_max, self.items // self.items_per_theme)

    @property
    def behavior_shares(self) -> tuple[float, ...]:
        """Share of each behavior, in TAOBAO_BEHAVIORS order."""
        shares = {"buy": self.buy_share, "cart": self.cart_share, "fav": self.fav_share}
        pv = 1.0 - sum(shares.values())
        return tuple(pv if b == "pv" else shares[b] for b in TAOBAO_BEHAVIORS)

    def validate(self) -> None:
        """Raises ValueError naming the first impossible setting."""
        checks = [
            (self.users >= 1, "users must be >= 1"),
            (self.categories >= 1, "categories must be >= 1"),
            (self.items >= self.categories, "items must be >= categories"),
            (self.items >= self.n_themes, "items must be >= the number of themes (at least interests_max)"),
            (self.items_per_theme >= 1, "items_per_theme must be >= 1"),
            (1 <= self.interests_min <= self.interests_max, "need 1 <= interests_min <= interests_max"),
            (self.days >= 1, "days must be >= 1"),
            (self.start_ts >= 0, "start_ts must be >= 0"),
            (
                min(self.buy_share, self.cart_share, self.fav_share) >= 0
                and self.buy_share + self.cart_share + self.fav_share <= 1,
                "behavior shares must be >= 0 and sum to at most 1",
            ),
            (self.zipf_exponent >= 0, "zipf_exponent must be >= 0"),
            (self.category_size_sigma >= 0, "category_size_sigma must be >= 0"),
            (self.mean_seq_len >= 1, "mean_seq_len must be >= 1"),
            (self.seq_len_sigma >= 0, "seq_len_sigma must be >= 0"),
            (self.max_seq_len >= 1, "max_seq_len must be >= 1"),
            (self.mean_session_rows >= 1, "mean_session_rows must be >= 1"),
            (self.median_gap_s > 0, "median_gap_s must be > 0"),
            (0 <= self.interest_share <= 1, "interest_share must lie in [0, 1]"),
            (self.chunk_users >= 1, "chunk_users must be >= 1"),
            (self.seed >= 0, "seed must be >= 0"),
        ]
        first_failed(checks, "taobao synth config")


@dataclass(frozen=True)
class _Catalog:
    """Items by index; theme t owns the index slice [theme_start[t], theme_start[t + 1]). Raw ids,
    categories and popularity are dealt over the indices independently, so none of them tells the theme."""

    item_ids: np.ndarray  # raw id per item index
    category: np.ndarray  # category index per item index
    category_ids: np.ndarray  # raw id per category index
    pop_cum: np.ndarray  # cumulative popularity over item indices
    theme_start: np.ndarray  # n_themes + 1 bounds

    def sample_popular(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Item indices drawn by global popularity."""
        pos = _locate(self.pop_cum, rng.random(n) * self.pop_cum[-1])
        return np.minimum(pos, len(self.pop_cum) - 1)

    def sample_in_theme(self, themes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item index per requested theme, by popularity within the theme."""
        start, end = self.theme_start[themes], self.theme_start[themes + 1]
        lo = np.where(start > 0, self.pop_cum[np.maximum(start - 1, 0)], 0.0)
        hi = self.pop_cum[end - 1]
        pos = _locate(self.pop_cum, lo + rng.random(len(themes)) * (hi - lo))
        return np.clip(pos, start, end - 1)

    def theme_mass(self) -> np.ndarray:
        """Total popularity per theme."""
        ends = self.pop_cum[self.theme_start[1:] - 1]
        return np.diff(ends, prepend=0.0)

    def themes(self) -> np.ndarray:
        """Theme per item index."""
        return np.repeat(np.arange(len(self.theme_start) - 1, dtype=np.int32), np.diff(self.theme_start))


def _locate(cum: np.ndarray, values: np.ndarray) -> np.ndarray:
    """np.searchsorted(cum, values, side="right"), for many values in a long array."""
    # sorted values walk the array in order and stay in cache: about 9x faster over 4 M items
    order = np.argsort(values)
    pos = np.empty(len(values), np.int64)
    pos[order] = np.searchsorted(cum, values[order], side="right")
    return pos


def _catalog(cfg: TaobaoSynthConfig, rng: np.random.Generator) -> _Catalog:
    n, c, t = cfg.items, cfg.categories, cfg.n_themes
    item_ids = rng.permutation(np.cumsum(rng.geometric(1 / ITEM_ID_GAP, n)))
    pop_cum = np.cumsum((rng.permutation(n) + 1.0) ** -cfg.zipf_exponent)
    weights = rng.lognormal(0.0, cfg.category_size_sigma, c)
    sizes = 1 + rng.multinomial(n - c, weights / weights.sum())
    category = rng.permutation(np.repeat(np.arange(c, dtype=np.int32), sizes))
    category_ids = np.sort(rng.choice(c * CATEGORY_ID_SPREAD, size=c, replace=False)) + 1
    theme_start = (np.arange(t + 1, dtype=np.int64) * n) // t
    return _Catalog(
        item_ids=item_ids,
        category=category,
        category_ids=category_ids,
        pop_cum=pop_cum,
        theme_start=theme_start,
    )


@dataclass(frozen=True)
class _Users:
    ids: np.ndarray  # raw user id
    length: np.ndarray  # rows per user
    interests: np.ndarray  # (n, interests_max) theme ids, -1 past the user's count
    weight: np.ndarray  # (n, interests_max) share of each interest, 0 past the user's count


def _users(
    cfg: TaobaoSynthConfig, n: int, last_id: int, theme_cum: np.ndarray, rng: np.random.Generator
) -> _Users:
    m = cfg.interests_max
    ids = last_id + np.cumsum(rng.geometric(1 / USER_ID_GAP, n))
    # lognormal with the configured mean: mu = log(mean) - sigma^2 / 2
    mu = math.log(cfg.mean_seq_len) - cfg.seq_len_sigma**2 / 2
    length = np.clip(np.rint(rng.lognormal(mu, cfg.seq_len_sigma, n)), 1, cfg.max_seq_len).astype(np.int64)
    n_interests = rng.integers(cfg.interests_min, m + 1, size=n)
    interests = _draw_themes(theme_cum, (n, m), rng)
    for _ in range(100):  # redraw rows with a repeated theme; a few rounds settle it
        srt = np.sort(interests, axis=1)
        dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if len(dup) == 0:
            break
        interests[dup] = _draw_themes(theme_cum, (len(dup), m), rng)
    active = np.arange(m)[None, :] < n_interests[:, None]
    weight = rng.gamma(2.0, 1.0, (n, m)) * active
    weight /= weight.sum(axis=1, keepdims=True)
    return _Users(ids=ids, length=length, interests=np.where(active, interests, -1), weight=weight)


def _draw_themes(theme_cum: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    pos = np.searchsorted(theme_cum, rng.random(shape) * theme_cum[-1], side="right")
    return np.minimum(pos, len(theme_cum) - 1)


@dataclass(frozen=True)
class _Rows:
    user: np.ndarray  # raw user id
    item: np.ndarray  # item index
    behavior: np.ndarray  # int8 code into TAOBAO_BEHAVIORS
    timestamp: np.ndarray


def _rows(cfg: TaobaoSynthConfig, cat: _Catalog, users: _Users, rng: np.random.Generator) -> _Rows:
    """One chunk's rows, grouped by user and in time order."""
    length = users.length
    n_rows = int(length.sum())
    row_user = np.repeat(np.arange(len(length)), length)
    first = np.cumsum(length) - length

    # shoppers browse in visits: rows come in sessions (a new one with probability 1 / mean_session_rows)
    new_session = rng.random(n_rows) < 1.0 / cfg.mean_session_rows
    new_session[first] = True
    session_first = np.flatnonzero(new_session)
    session = np.cumsum(new_session) - 1
    del new_session
    session_user = row_user[session_first]
    n_sessions = len(session_first)

    # a visit starts on any day, at an hour the day-night profile favors
    window = cfg.days * DAY
    hourly = np.cumsum(HOURLY)
    hour = np.minimum(np.searchsorted(hourly, rng.random(n_sessions) * hourly[-1], side="right"), 23)
    start = rng.integers(0, cfg.days, n_sessions) * DAY + hour * 3600 + rng.integers(0, 3600, n_sessions)
    # users ascend and start < window, so one sort of user * window + start orders starts within users
    start = np.sort(session_user * window + start) - session_user * window

    gap = np.floor(rng.lognormal(math.log(cfg.median_gap_s), 1.0, n_rows)).astype(np.int64)
    gap[session_first] = 0
    elapsed = np.cumsum(gap)
    del gap
    offset = np.minimum(start[session] + elapsed - elapsed[session_first][session], window - 1)
    del elapsed
    # a long session may run past the next one's start: a running maximum keeps each user non-decreasing
    key = np.maximum.accumulate(row_user * window + offset)
    timestamp = cfg.start_ts + key - row_user * window
    del key, offset

    # a visit has one purpose: its interest rows all come from one of the user's themes
    cum = np.cumsum(users.weight[session_user], axis=1)
    slot = (cum < rng.random(n_sessions)[:, None] * cum[:, -1:]).sum(axis=1)
    focus = users.interests[session_user, np.minimum(slot, cum.shape[1] - 1)]
    del cum, slot

    from_interest = rng.random(n_rows) < cfg.interest_share
    item = np.empty(n_rows, np.int64)
    item[~from_interest] = cat.sample_popular(n_rows - int(from_interest.sum()), rng)
    item[from_interest] = cat.sample_in_theme(focus[session[from_interest]], rng)
    del from_interest, session

    behavior_cum = np.cumsum(cfg.behavior_shares)
    behavior = np.searchsorted(behavior_cum, rng.random(n_rows) * behavior_cum[-1], side="right")
    behavior = np.minimum(behavior, len(TAOBAO_BEHAVIORS) - 1).astype(np.int8)
    # shoppers buy, cart or fav what they just looked at: the item of the user's latest page view (the row's
    # own draw when there is none); a user's first row is always an anchor, so the running maximum never
    # reaches into another user
    is_anchor = behavior == TAOBAO_BEHAVIORS.index("pv")
    is_anchor[first] = True
    source = np.maximum.accumulate(np.where(is_anchor, np.arange(n_rows), 0))
    item = item[source]
    return _Rows(user=users.ids[row_user], item=item, behavior=behavior, timestamp=timestamp)


def _users_schema(interests: int) -> pa.Schema:
    fields: list[tuple[str, pa.DataType]] = [("user_id", pa.int64()), ("rows", pa.int64())]
    fields += [(f"interest_{k}", pa.int32()) for k in range(interests)]
    fields += [(f"weight_{k}", pa.float32()) for k in range(interests)]
    return pa.schema(fields)


def _users_table(users: _Users) -> pa.Table:
    m = users.interests.shape[1]
    columns = [pa.array(users.ids), pa.array(users.length)]
    columns += [pa.array(users.interests[:, k].astype(np.int32)) for k in range(m)]
    columns += [pa.array(users.weight[:, k].astype(np.float32)) for k in range(m)]
    return pa.table(columns, schema=_users_schema(m))


def write_taobao_csv(path: str | Path, cfg: TaobaoSynthConfig, progress: bool = False) -> dict[str, Any]:
    """Streams a Taobao-shaped UserBehavior CSV to `path` and the planted truth beside it
    (item_themes.parquet, user_interests.parquet, meta.json); returns the summary meta.json holds.
    Byte-identical per config."""
    cfg.validate()
    t0 = time.perf_counter()
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 0])
    cat = _catalog(cfg, rng)
    # popular themes attract more fans, damped so the tail still has followers
    theme_cum = np.cumsum(np.sqrt(cat.theme_mass()))
    used = np.zeros(cfg.items, bool)
    counts = np.zeros(len(TAOBAO_BEHAVIORS), np.int64)
    n_rows = 0
    last_id = 0
    behavior_names = pa.array(TAOBAO_BEHAVIORS, pa.string())
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("category_id", pa.int64()),
            ("behavior_type", pa.dictionary(pa.int8(), pa.string())),
            ("timestamp", pa.int64()),
        ]
    )
    # the real file has no header and no quotes
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    # written under another name and renamed at the end, so a half-written file is never taken for a whole one
    partial = path.with_name(path.name + ".partial")
    interests_file = folder / USER_INTERESTS_FILE
    bar = tqdm(total=cfg.users, unit="user", desc="taobao-synth", disable=None if progress else True)
    with (
        pa_csv.CSVWriter(partial, schema, write_options=options) as csv_writer,
        pq.ParquetWriter(interests_file, _users_schema(cfg.interests_max)) as pq_writer,
    ):
        for index, lo in enumerate(range(0, cfg.users, cfg.chunk_users)):
            chunk_rng = np.random.default_rng([cfg.seed, 1, index])
            users = _users(cfg, min(cfg.chunk_users, cfg.users - lo), last_id, theme_cum, chunk_rng)
            last_id = int(users.ids[-1])
            rows = _rows(cfg, cat, users, chunk_rng)
            used[rows.item] = True
            counts += np.bincount(rows.behavior, minlength=len(TAOBAO_BEHAVIORS))
            n_rows += len(rows.item)
            table = pa.table(
                [
                    pa.array(rows.user),
                    pa.array(cat.item_ids[rows.item]),
                    pa.array(cat.category_ids[cat.category[rows.item]]),
                    pa.DictionaryArray.from_arrays(pa.array(rows.behavior), behavior_names),
                    pa.array(rows.timestamp),
                ],
                schema=schema,
            )
            csv_writer.write_table(table)
            pq_writer.write_table(_users_table(users))
            del rows, table
            bar.update(len(users.ids))
    bar.close()

    order = np.argsort(cat.item_ids)
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(cat.item_ids[order]),
                "category_id": pa.array(cat.category_ids[cat.category[order]]),
                "theme": pa.array(cat.themes()[order]),
            }
        ),
        folder / ITEM_THEMES_FILE,
    )
    del order
    os.replace(partial, path)
    summary: dict[str, Any] = {
        "path": str(path),
        "seed": cfg.seed,
        "rows": n_rows,
        "users": cfg.users,
        "items": cfg.items,
        "items_used": int(used.sum()),
        "categories": cfg.categories,
        "categories_used": len(np.unique(cat.category[used])),
        "themes": cfg.n_themes,
        "behaviors": {b: int(c) for b, c in zip(TAOBAO_BEHAVIORS, counts, strict=True)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    meta = {"source": "taobao-synth", **summary, "config": asdict(cfg)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return summary
