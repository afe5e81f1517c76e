"""Synthetic long-sequence data with hidden item themes, a known click model and the related-behavior truth.

The world: zipfian items in uneven categories and hidden *themes* (item clusters that appear in no column):
by default a few themes inside each category ("nested"), or themes drawn independently of the category
("independent"), where the category no longer reveals which behaviors are related. Users follow 2-4
themes whose weights drift over their timeline, plus category browsing and popularity noise. An
impression is clicked with a probability that grows with the recency-weighted number of earlier
behaviors in the target's theme, so a model has to find those few behaviors in a long history
(stage 1) and weigh them (stage 2). docs/datasets.md has the details.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from exporters.dataset import count_before, write_dataset

DAY = 86_400
ThemeLayout = Literal["nested", "independent"]
THEME_LAYOUTS: tuple[ThemeLayout, ...] = ("nested", "independent")


def first_failed(checks: list[tuple[bool, str]], what: str) -> None:
    """Raises ValueError with the message of the first check that is False."""
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid {what}: {message}")


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic world; the defaults are the embedded demo dataset."""

    users: int = 2000
    items: int = 20000
    categories: int = 100
    # themes = categories * themes_per_category, in both layouts
    themes_per_category: int = 4
    # nested: each theme lies inside one category; independent: items get a theme regardless of category
    theme_layout: ThemeLayout = "nested"
    max_seq_len: int = 2000
    min_seq_len: int = 20
    impressions_per_user: float = 24.0
    seed: int = 0
    zipf_exponent: float = 1.1
    # inside a theme users pick items by popularity ** this (flatter than global popularity)
    theme_popularity_power: float = 0.6
    interests_min: int = 2
    interests_max: int = 4
    # event mixture: interest themes, interest categories (any theme), the rest popularity noise
    interest_share: float = 0.3
    category_share: float = 0.15
    # impression targets: interest themes, other themes of interest categories (hard), the rest popular
    target_interest_share: float = 0.4
    target_hard_share: float = 0.35
    start_ts: int = 1_600_000_000
    days: int = 365
    session_break: float = 0.12
    # click model: logit = bias + user + popularity * z(log pop) + related * log1p(recency-weighted count)
    label_bias: float = -2.3
    label_popularity: float = 0.2
    label_related: float = 1.6
    user_bias_std: float = 0.3
    half_life_days: float = 30.0
    # an old related behavior still counts this much (lifelong interest), a fresh one counts 1
    recency_floor: float = 0.2
    # dormant lifelong interests: this share of users has one interest that shows in their events
    # only in the first `dormant_until` of their timeline, yet keeps drawing impression targets to the
    # end; late in a long history its related behaviors lie older than a training window
    dormant_share: float = 0.0
    dormant_until: float = 0.3

    def validate(self) -> None:
        """Raises ValueError naming the first impossible setting."""
        checks = [
            (self.users >= 1, "users must be >= 1"),
            (self.categories >= 1, "categories must be >= 1"),
            (self.themes_per_category >= 2, "themes_per_category must be >= 2"),
            (
                self.theme_layout in THEME_LAYOUTS,
                f"theme_layout must be one of {', '.join(THEME_LAYOUTS)}",
            ),
            (
                self.items >= self.categories * self.themes_per_category,
                "items must be >= categories * themes_per_category",
            ),
            (self.min_seq_len >= 1, "min_seq_len must be >= 1"),
            (self.max_seq_len >= self.min_seq_len, "max_seq_len must be >= min_seq_len"),
            (self.impressions_per_user > 0, "impressions_per_user must be > 0"),
            (1 <= self.interests_min <= self.interests_max, "need 1 <= interests_min <= interests_max"),
            (
                self.interests_max <= self.categories * self.themes_per_category,
                "interests_max must be <= the number of themes",
            ),
            (
                self.interest_share >= 0
                and self.category_share >= 0
                and self.interest_share + self.category_share <= 1,
                "event shares must lie in [0, 1]",
            ),
            (
                self.target_interest_share >= 0
                and self.target_hard_share >= 0
                and self.target_interest_share + self.target_hard_share <= 1,
                "target shares must lie in [0, 1]",
            ),
            (self.days >= 1, "days must be >= 1"),
            (self.half_life_days > 0, "half_life_days must be > 0"),
            (0 <= self.dormant_share <= 1, "dormant_share must lie in [0, 1]"),
            (0 < self.dormant_until < 1, "dormant_until must lie in (0, 1)"),
            (self.seed >= 0, "seed must be >= 0"),
        ]
        first_failed(checks, "synth config")


@dataclass(frozen=True)
class _Groups:
    """Item indices grouped by a label (theme or category), each group sampled by within-group weight."""

    members: np.ndarray  # item indices grouped by label
    cum: np.ndarray  # cumulative within-group weights along members
    start: np.ndarray  # per label, its slice of members
    end: np.ndarray

    @classmethod
    def build(cls, label: np.ndarray, n_labels: int, weight: np.ndarray) -> _Groups:
        members = np.argsort(label, kind="stable")
        counts = np.bincount(label, minlength=n_labels)
        end = np.cumsum(counts)
        return cls(members=members, cum=np.cumsum(weight[members]), start=end - counts, end=end)

    def sample(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item index per requested label, by within-group weight (labels must have members)."""
        start, end = self.start[labels], self.end[labels]
        lo = np.where(start > 0, self.cum[np.maximum(start - 1, 0)], 0.0)
        hi = self.cum[end - 1]
        pos = np.searchsorted(self.cum, lo + rng.random(len(labels)) * (hi - lo), side="right")
        return self.members[np.clip(pos, start, end - 1)]


@dataclass(frozen=True)
class _Catalog:
    item_ids: np.ndarray  # raw id per item index
    category: np.ndarray  # 1..C per item index
    theme: np.ndarray  # hidden theme per item index, 0..T-1; nested layout: theme // K + 1 == category
    popularity: np.ndarray  # zipf weight per item index
    themes: _Groups  # by theme, weighted by popularity ** theme_popularity_power
    categories: _Groups  # by category - 1, same weights
    pop_cum: np.ndarray  # cumulative popularity over item indices

    @property
    def n_themes(self) -> int:
        return len(self.themes.start)

    def sample_in_theme(self, themes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item index per requested theme, by within-theme popularity."""
        return self.themes.sample(themes, rng)

    def sample_in_category(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item index per requested category (1..C), by within-category popularity."""
        return self.categories.sample(categories - 1, rng)

    def sample_popular(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Item indices drawn by global popularity."""
        pos = np.searchsorted(self.pop_cum, rng.random(n) * self.pop_cum[-1], side="right")
        return np.minimum(pos, len(self.pop_cum) - 1)


@dataclass(frozen=True)
class _Users:
    length: np.ndarray  # events per user
    interests: np.ndarray  # (U, M) theme ids; slots past a user's count hold weight 0
    weight: np.ndarray  # (U, M) base weight of each interest
    center: np.ndarray  # (U, M) where on the timeline (0..1) each interest peaks
    width: np.ndarray  # (U, M)
    bias: np.ndarray  # (U,) click propensity
    dormant: np.ndarray  # (U,) bool: interest slot 0 is dormant after `dormant_until`
    dormant_until: float

    def pick(
        self, user: np.ndarray, pos: np.ndarray, rng: np.random.Generator, target: bool = False
    ) -> np.ndarray:
        """An interest theme per (user, relative position), by the drifting interest weights; for an
        impression `target`, a dormant interest keeps a constant weight instead of falling silent."""
        z = (pos[:, None] - self.center[user]) / self.width[user]
        w = self.weight[user] * (0.25 + np.exp(-0.5 * z * z))
        if self.dormant.any():
            dormant = self.dormant[user]
            if target:
                w[dormant, 0] = 1.25 * self.weight[user[dormant], 0]
            else:
                w[dormant & (pos >= self.dormant_until), 0] = 0.0
        cum = np.cumsum(w, axis=1)
        slot = (cum < rng.random(len(user))[:, None] * cum[:, -1:]).sum(axis=1)
        return self.interests[user, np.minimum(slot, w.shape[1] - 1)]


def _catalog(cfg: SynthConfig, rng: np.random.Generator) -> _Catalog:
    n, c, k = cfg.items, cfg.categories, cfg.themes_per_category
    # sparse raw ids so nothing downstream can confuse a raw id with a row
    item_ids = np.sort(rng.choice(np.arange(1, 10 * n + 1, dtype=np.int64), size=n, replace=False))
    popularity = (rng.permutation(n) + 1.0) ** -cfg.zipf_exponent
    sizes = k + rng.multinomial(n - c * k, _normalized(rng.lognormal(0.0, 1.0, c)))
    slot_cat = np.repeat(np.arange(c), sizes)
    slot_in_cat = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    order = rng.permutation(n)
    category = np.empty(n, np.int64)
    theme = np.empty(n, np.int64)
    category[order] = slot_cat + 1
    if cfg.theme_layout == "nested":
        theme[order] = slot_cat * k + slot_in_cat % k
    else:
        # equal-sized themes over a fresh shuffle: a theme's items fall into categories in proportion to
        # their sizes, so most themes span many categories and the category says little about the theme
        theme[rng.permutation(n)] = np.arange(n) % (c * k)
    weight = popularity**cfg.theme_popularity_power
    return _Catalog(
        item_ids=item_ids,
        category=category,
        theme=theme,
        popularity=popularity,
        themes=_Groups.build(theme, c * k, weight),
        categories=_Groups.build(category - 1, c, weight),
        pop_cum=np.cumsum(popularity),
    )


def _normalized(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def _users(cfg: SynthConfig, cat: _Catalog, rng: np.random.Generator) -> _Users:
    u, m = cfg.users, cfg.interests_max
    lo, hi = cfg.min_seq_len, cfg.max_seq_len
    ratio = hi / lo
    # heavy tail: lognormal with its median at a fixed geometric fraction of [min, max], capped at max
    median = lo * ratio**0.4
    sigma = max(0.6, math.log(ratio) / 3.5)
    length = np.clip(np.rint(rng.lognormal(math.log(median), sigma, u)), lo, hi).astype(np.int64)
    n_interests = rng.integers(cfg.interests_min, cfg.interests_max + 1, size=u)
    # popular themes attract more fans, damped so the tail still has followers
    theme_mass = np.bincount(cat.theme, weights=cat.popularity, minlength=cat.n_themes)
    theme_cum = np.cumsum(np.sqrt(theme_mass))
    interests = np.searchsorted(theme_cum, rng.random((u, m)) * theme_cum[-1], side="right")
    interests = np.minimum(interests, len(theme_cum) - 1)
    for _ in range(100):  # redraw duplicate interests; a few rounds settle it
        srt = np.sort(interests, axis=1)
        dup_rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if len(dup_rows) == 0:
            break
        redraw = np.searchsorted(theme_cum, rng.random((len(dup_rows), m)) * theme_cum[-1], side="right")
        interests[dup_rows] = np.minimum(redraw, len(theme_cum) - 1)
    active = np.arange(m)[None, :] < n_interests[:, None]
    weight = rng.gamma(2.0, 1.0, (u, m)) * active
    weight /= weight.sum(axis=1, keepdims=True)
    center = rng.uniform(-0.2, 1.2, (u, m))
    width = rng.uniform(0.25, 1.0, (u, m))
    bias = rng.normal(0.0, cfg.user_bias_std, u)
    # drawn only when asked for, so the default world stays bit-for-bit what it was
    dormant = rng.random(u) < cfg.dormant_share if cfg.dormant_share > 0 else np.zeros(u, bool)
    # a dormant interest peaks inside its active early part
    center[dormant, 0] = cfg.dormant_until / 2
    width[dormant, 0] = cfg.dormant_until / 2
    return _Users(
        length=length,
        interests=interests,
        weight=weight,
        center=center,
        width=width,
        bias=bias,
        dormant=dormant,
        dormant_until=cfg.dormant_until,
    )


def _timestamps(cfg: SynthConfig, users: _Users, rng: np.random.Generator) -> np.ndarray:
    """Strictly increasing seconds per user: bursts of minutes, sessions days apart, in one common window."""
    length = users.length
    n_events = int(length.sum())
    user = np.repeat(np.arange(len(length)), length)
    first = np.cumsum(length) - length
    window = cfg.days * DAY
    is_break = rng.random(n_events) < cfg.session_break
    is_break[first] = False
    within = 1 + np.floor(rng.lognormal(math.log(60.0), 1.0, n_events))
    between = rng.lognormal(math.log(DAY), 1.0, n_events)
    within_sum = np.bincount(user, weights=np.where(is_break, 0.0, within), minlength=len(length))
    between_sum = np.bincount(user, weights=np.where(is_break, between, 0.0), minlength=len(length))
    # each user is active over half to all of the window; session gaps stretch to fill that span
    span = window * rng.uniform(0.5, 1.0, len(length))
    scale = np.where(between_sum > 0, np.maximum(span - within_sum, 0.0) / np.maximum(between_sum, 1e-9), 0.0)
    gap = np.where(is_break, np.maximum(1.0, np.floor(between * scale[user])), within).astype(np.int64)
    gap[first] = 0
    total = np.cumsum(gap)
    rel = total - np.repeat(total[first], length)
    used = rel[first + length - 1]
    start = cfg.start_ts + np.floor(rng.random(len(length)) * np.maximum(window - used, 0)).astype(np.int64)
    return np.repeat(start, length) + rel


@dataclass(frozen=True)
class _Impressions:
    user: np.ndarray
    item: np.ndarray  # item index
    ts: np.ndarray
    noise: np.ndarray  # uniform draw that the click probability is compared with


def _events(
    cfg: SynthConfig, cat: _Catalog, users: _Users, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item index, timestamp) per event, grouped by user and in time order."""
    k = cfg.themes_per_category
    length = users.length
    n_events = int(length.sum())
    ev_user = np.repeat(np.arange(cfg.users), length)
    first = np.cumsum(length) - length
    ev_pos = (np.arange(n_events) - np.repeat(first, length)) / np.maximum(np.repeat(length, length) - 1, 1)
    source = rng.random(n_events)
    from_interest = source < cfg.interest_share
    from_category = ~from_interest & (source < cfg.interest_share + cfg.category_share)
    ev_item = cat.sample_popular(n_events, rng)
    guided = np.flatnonzero(from_interest | from_category)
    themes = users.pick(ev_user[guided], ev_pos[guided], rng)
    browse = from_category[guided]
    if cfg.theme_layout == "nested":
        # category browsing: same category as the interest, any of its themes
        themes[browse] = (themes[browse] // k) * k + rng.integers(0, k, int(browse.sum()))
        ev_item[guided] = cat.sample_in_theme(themes, rng)
    else:
        # category browsing: the category of one of the interest's items, any theme
        items = cat.sample_in_theme(themes, rng)
        items[browse] = cat.sample_in_category(cat.category[items[browse]], rng)
        ev_item[guided] = items
    return ev_user, ev_item, _timestamps(cfg, users, rng)


def _impressions(
    cfg: SynthConfig, cat: _Catalog, users: _Users, ev_ts: np.ndarray, rng: np.random.Generator
) -> _Impressions:
    """Impressions at random points of each timeline (later ones see longer histories), sorted by
    (user, timestamp, item)."""
    k = cfg.themes_per_category
    length = users.length
    first = np.cumsum(length) - length
    n_imp = np.maximum(3, rng.poisson(cfg.impressions_per_user, cfg.users))
    user = np.repeat(np.arange(cfg.users), n_imp)
    n_hist = rng.integers(1, length[user] + 1)  # events strictly before the impression
    last = first[user] + n_hist - 1
    gap_to_next = np.where(
        n_hist < length[user], ev_ts[np.minimum(last + 1, len(ev_ts) - 1)] - ev_ts[last], DAY
    )
    # in (t[k-1], t[k]]: at t[k] the event shares the impression's second and is not history
    ts = ev_ts[last] + 1 + np.floor(rng.random(len(user)) * gap_to_next).astype(np.int64)
    kind = rng.random(len(user))
    item = cat.sample_popular(len(user), rng)
    guided = np.flatnonzero(kind < cfg.target_interest_share + cfg.target_hard_share)
    themes = users.pick(user[guided], n_hist[guided] / length[user[guided]], rng, target=True)
    hard = kind[guided] >= cfg.target_interest_share
    if cfg.theme_layout == "nested":
        # hard negatives: another theme of the same category, so the category alone cannot tell them apart
        offset = rng.integers(1, k, int(hard.sum()))
        themes[hard] = (themes[hard] // k) * k + (themes[hard] % k + offset) % k
        item[guided] = cat.sample_in_theme(themes, rng)
    else:
        item[guided] = _hard_negatives(cat, themes, hard, rng)
    noise = rng.random(len(user))
    order = np.lexsort((cat.item_ids[item], ts, user))
    return _Impressions(user=user[order], item=item[order], ts=ts[order], noise=noise[order])


def _hard_negatives(
    cat: _Catalog, themes: np.ndarray, hard: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Independent layout: an item of each interest theme, except that for `hard` rows it is replaced by
    an item of the same category in another theme (the category of the interest's items, not its theme)."""
    items = cat.sample_in_theme(themes, rng)
    rows = np.flatnonzero(hard)
    for _ in range(
        8
    ):  # redraw the few that land in the interest theme again; a category of one theme keeps it
        if len(rows) == 0:
            break
        items[rows] = cat.sample_in_category(cat.category[items[rows]], rng)
        rows = rows[cat.theme[items[rows]] == themes[rows]]
    return items


def _related(
    cfg: SynthConfig,
    cat: _Catalog,
    ev_user: np.ndarray,
    ev_item: np.ndarray,
    ev_ts: np.ndarray,
    im: _Impressions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truly related events (strictly earlier, the target's hidden theme): (impression, event) index pairs
    and the recency-weighted count per impression."""
    n_themes = cat.n_themes
    ev_group = ev_user * n_themes + cat.theme[ev_item]
    by_group = np.argsort(ev_group, kind="stable")  # within a user events are already in time order
    g_sorted = ev_group[by_group]
    im_group = im.user * n_themes + cat.theme[im.item]
    lo = np.searchsorted(g_sorted, im_group)
    n_related = count_before(g_sorted, ev_ts[by_group], im_group, im.ts) - lo
    rel_imp = np.repeat(np.arange(len(im.user)), n_related)
    rel_ev = by_group[np.repeat(lo, n_related) + _ragged_arange(n_related)]
    age = (im.ts[rel_imp] - ev_ts[rel_ev]) / (cfg.half_life_days * DAY)
    recency = cfg.recency_floor + (1.0 - cfg.recency_floor) * np.exp2(-age)
    return rel_imp, rel_ev, np.bincount(rel_imp, weights=recency, minlength=len(im.user))


def generate(cfg: SynthConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(events, impressions, related) of a seeded synthetic world; bit-for-bit deterministic per config."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    cat = _catalog(cfg, rng)
    users = _users(cfg, cat, rng)
    ev_user, ev_item, ev_ts = _events(cfg, cat, users, rng)
    im = _impressions(cfg, cat, users, ev_ts, rng)
    rel_imp, rel_ev, weighted = _related(cfg, cat, ev_user, ev_item, ev_ts, im)
    n_related = np.bincount(rel_imp, minlength=len(im.user))
    first = np.cumsum(users.length) - users.length
    n_history = count_before(ev_user, ev_ts, im.user, im.ts) - first[im.user]

    log_pop = np.log(cat.popularity[im.item])
    pop_z = (log_pop - log_pop.mean()) / max(float(log_pop.std()), 1e-9)
    logit = (
        cfg.label_bias
        + users.bias[im.user]
        + cfg.label_popularity * pop_z
        + cfg.label_related * np.log1p(weighted)
    )
    label = (im.noise < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    im_user, im_item, im_ts = im.user, im.item, im.ts

    width = len(str(cfg.users))
    names = np.array([f"u{i + 1:0{width}d}" for i in range(cfg.users)], dtype=object)
    events = pd.DataFrame(
        {
            "user_id": pd.Series(names[ev_user], dtype="str"),
            "item_id": cat.item_ids[ev_item],
            "category_id": cat.category[ev_item],
            "timestamp": ev_ts,
        }
    )
    impressions = pd.DataFrame(
        {
            "user_id": pd.Series(names[im_user], dtype="str"),
            "item_id": cat.item_ids[im_item],
            "category_id": cat.category[im_item],
            "timestamp": im_ts,
            "label": label,
            "impression_id": np.arange(len(im_user), dtype=np.int64),
            # ground truth, for evaluation only; never a model feature
            "n_history": n_history.astype(np.int64),
            "n_related": n_related.astype(np.int64),
            "true_logit": logit.astype(np.float32),
        }
    )
    related = pd.DataFrame(
        {
            "impression_id": rel_imp.astype(np.int64),
            "user_id": pd.Series(names[ev_user[rel_ev]], dtype="str"),
            "item_id": cat.item_ids[ev_item[rel_ev]],
            "timestamp": ev_ts[rel_ev],
        }
    )
    return events, impressions, related


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0), [0..c1), ... concatenated."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve with tied scores counted half (Mann-Whitney)."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def signal_report(events: pd.DataFrame, impressions: pd.DataFrame) -> dict[str, float]:
    """How learnable the labels are: AUC of the true logit against baselines, and the related share."""
    label = impressions["label"].to_numpy()
    item_pop = events["item_id"].value_counts()
    pop = impressions["item_id"].map(item_pop).fillna(0).to_numpy(np.float64)
    # a category-matching baseline: earlier events of the user in the target's category
    users, ev_user = np.unique(events["user_id"].to_numpy(dtype=object), return_inverse=True)
    im_user = np.searchsorted(users, impressions["user_id"].to_numpy(dtype=object))
    n_cat = int(max(events["category_id"].max(), impressions["category_id"].max())) + 1
    ev_group = ev_user * n_cat + events["category_id"].to_numpy()
    by_group = np.argsort(ev_group, kind="stable")
    im_group = im_user * n_cat + impressions["category_id"].to_numpy()
    g_sorted = ev_group[by_group]
    same_cat = count_before(
        g_sorted, events["timestamp"].to_numpy()[by_group], im_group, impressions["timestamp"].to_numpy()
    ) - np.searchsorted(g_sorted, im_group)
    report = {
        "positive_rate": float(label.mean()),
        "auc_popularity": roc_auc(label, pop),
        "auc_same_category_count": roc_auc(label, same_cat),
    }
    if "true_logit" in impressions.columns:
        report["auc_true_logit"] = roc_auc(label, impressions["true_logit"].to_numpy())
    if "n_related" in impressions.columns:
        n_hist = impressions["n_history"].to_numpy()
        share = impressions["n_related"].to_numpy() / np.maximum(n_hist, 1)
        report["auc_related_count"] = roc_auc(label, impressions["n_related"].to_numpy())
        report["related_share_median"] = float(np.median(share))
        report["related_share_mean"] = float(share.mean())
        report["related_share_p90"] = float(np.quantile(share, 0.9))
        report["related_share_positives_median"] = float(np.median(share[label == 1]))
    return {k: round(v, 4) for k, v in report.items()}


def write_synth(out_dir: str | Path, cfg: SynthConfig) -> dict[str, Any]:
    """Generates a dataset, writes the canonical folder plus related.parquet; returns meta.json's content."""
    events, impressions, related = generate(cfg)
    meta = {
        "source": "synth",
        "seed": cfg.seed,
        "config": asdict(cfg),
        "signal": signal_report(events, impressions),
    }
    return write_dataset(out_dir, events, impressions, meta, related=related)
