"""Outcome attribution: which logged impression each later event is the outcome of. Pure numpy/pandas.

The rules (docs/ab-testing.md):
- an event of the outcome type is an outcome of an impression of the same user and item shown at
  most `window_s` seconds before it (the impression's second counts: `ts <= event <= ts + window`);
- first touch: when several impressions of that pair are inside the window, the earliest gets it
  (ties in time: the one logged first);
- each event goes to at most one impression, and an impression's outcome is 0/1 however many
  events it got; exact duplicate events (user, item, time, type) are dropped first;
- events with no impression in their window are organic: counted, never attributed.
Which impressions a readout uses (header overrides, users seen in both arms) is decided after the
join, so an event after a header-forced impression is never credited to another one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Keys and times share one int64: the pair code above bit 33, the time (seconds, < 2^33) below.
_TIME_BITS = 33
_MAX_TIME = (1 << _TIME_BITS) - 1


@dataclass(frozen=True, slots=True, eq=False)
class Attribution:
    """The join of events to impressions; impression arrays align with the impressions given."""

    outcome: np.ndarray  # int8 [N]: 1 when at least one event was attributed
    outcome_ts: np.ndarray  # int64 [N]: time of the first attributed event, -1 without one
    n_events: np.ndarray  # int64 [N]: events attributed
    event_impression: np.ndarray  # int64 [E]: the impression each event went to, -1 for none


def attribute(
    imp_key: np.ndarray, imp_ts: np.ndarray, ev_key: np.ndarray, ev_ts: np.ndarray, window_s: int
) -> Attribution:
    """First-touch join of events to impressions of the same (user, item) key within `window_s`.

    Keys are non-negative integer codes of the (user, item) pair (`pair_codes`); times are
    seconds. Impressions that tie in key and time are taken in the order given.
    """
    imp_key, imp_ts = np.asarray(imp_key, np.int64), np.asarray(imp_ts, np.int64)
    ev_key, ev_ts = np.asarray(ev_key, np.int64), np.asarray(ev_ts, np.int64)
    if imp_key.shape != imp_ts.shape or ev_key.shape != ev_ts.shape or imp_key.ndim != 1 or ev_key.ndim != 1:
        raise ValueError("keys and times must be 1-D arrays of equal length per table")
    if window_s < 0:
        raise ValueError(f"the window must be >= 0 seconds, got {window_s}")
    for name, values in (("impression", imp_ts), ("event", ev_ts)):
        if values.size and (values.min() < 0 or values.max() > _MAX_TIME):
            raise ValueError(f"{name} times must lie in [0, 2^33) seconds")
    if (imp_key.size and imp_key.min() < 0) or (ev_key.size and ev_key.min() < 0):
        raise ValueError("pair keys must be non-negative")
    n = len(imp_key)
    order = np.lexsort((np.arange(n), imp_ts, imp_key))
    packed = (imp_key[order] << _TIME_BITS) | imp_ts[order]
    # The first impression of the pair at or after (event time - window): the earliest in the window,
    # if it is not after the event.
    low = np.maximum(ev_ts - window_s, 0)
    pos = np.searchsorted(packed, (ev_key << _TIME_BITS) | low, side="left")
    inside = pos < n
    hit = np.zeros(len(ev_key), dtype=bool)
    hit[inside] = (imp_key[order[pos[inside]]] == ev_key[inside]) & (
        imp_ts[order[pos[inside]]] <= ev_ts[inside]
    )
    event_impression = np.full(len(ev_key), -1, dtype=np.int64)
    event_impression[hit] = order[pos[hit]]
    n_events = np.bincount(event_impression[hit], minlength=n).astype(np.int64)
    outcome_ts = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(outcome_ts, event_impression[hit], ev_ts[hit])
    outcome_ts[n_events == 0] = -1
    return Attribution((n_events > 0).astype(np.int8), outcome_ts, n_events, event_impression)


def pair_codes(
    imp_users: np.ndarray, imp_items: np.ndarray, ev_users: np.ndarray, ev_items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the (user, item) pairs of both tables, equal where the pairs are equal."""
    users = pd.concat(
        [pd.Series(imp_users, dtype=object), pd.Series(ev_users, dtype=object)], ignore_index=True
    )
    items = np.concatenate([np.asarray(imp_items, np.int64), np.asarray(ev_items, np.int64)])
    codes = pd.MultiIndex.from_arrays([users, items]).factorize()[0] if len(items) else np.empty(0, np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    return codes[: len(imp_items)], codes[len(imp_items) :]


@dataclass(frozen=True, slots=True)
class AttributionSummary:
    """What happened to the events of the period."""

    events: int  # events of the outcome type, duplicates included
    duplicates: int  # exact repeats dropped
    attributed: int  # events that became an impression's outcome
    unattributed: int  # events with no impression of their pair in the window (organic)
    other_types: int  # events of other types, not outcomes


def attribute_frames(
    impressions: pd.DataFrame, events: pd.DataFrame, *, window_s: int, outcome_type: str | None = "click"
) -> tuple[pd.DataFrame, AttributionSummary]:
    """`impressions` (one row per shown item: `user_id`, `item_id`, `ts`) with `outcome`,
    `outcome_ts` and `outcome_events` added; `events` has `user_id`, `item_id`, `ts`, `type`
    (`outcome_type` None: every type is an outcome)."""
    for frame, name, cols in (
        (impressions, "impressions", ("user_id", "item_id", "ts")),
        (events, "events", ("user_id", "item_id", "ts", "type")),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} lack the column(s) {', '.join(missing)}")
    typed = events if outcome_type is None else events[events["type"] == outcome_type]
    unique = typed.drop_duplicates(subset=["user_id", "item_id", "ts", "type"])
    imp_key, ev_key = pair_codes(
        impressions["user_id"].to_numpy(), impressions["item_id"].to_numpy(),
        unique["user_id"].to_numpy(), unique["item_id"].to_numpy(),
    )  # fmt: skip
    result = attribute(imp_key, impressions["ts"].to_numpy(), ev_key, unique["ts"].to_numpy(), window_s)
    out = impressions.assign(
        outcome=result.outcome, outcome_ts=result.outcome_ts, outcome_events=result.n_events
    )
    attributed = int((result.event_impression >= 0).sum())
    summary = AttributionSummary(
        events=len(typed),
        duplicates=len(typed) - len(unique),
        attributed=attributed,
        unattributed=len(unique) - attributed,
        other_types=len(events) - len(typed),
    )
    return out, summary
