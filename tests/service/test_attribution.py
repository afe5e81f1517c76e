"""Outcome attribution on hand-built timelines: window edges, first touch, repeats, events without an
impression, other event types, and the pure array join against a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from service.core.attribution import attribute, attribute_frames

WINDOW = 100


def _imps(*rows: tuple[str, int, int]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])


def _events(*rows: tuple[str, int, int] | tuple[str, int, int, str]) -> pd.DataFrame:
    full = [(*r, "click") if len(r) == 3 else r for r in rows]
    return pd.DataFrame(full, columns=["user_id", "item_id", "ts", "type"])


def test_inside_and_outside_the_window() -> None:
    imps = _imps(("a", 1, 1000), ("b", 1, 1000), ("c", 1, 1000), ("d", 1, 1000))
    events = _events(
        ("a", 1, 1000),  # the impression's own second: inside
        ("b", 1, 1000 + WINDOW),  # the window's last second: inside
        ("c", 1, 1000 + WINDOW + 1),  # one second late: outside
        ("d", 1, 999),  # before the impression: never its outcome
    )
    out, summary = attribute_frames(imps, events, window_s=WINDOW)
    assert out["outcome"].tolist() == [1, 1, 0, 0]
    assert out["outcome_ts"].tolist() == [1000, 1100, -1, -1]
    assert (summary.events, summary.attributed, summary.unattributed) == (4, 2, 2)


def test_first_touch_and_repeats() -> None:
    # a was shown item 1 three times; clicks at 1050 and 1120 (both within reach of the first two)
    imps = _imps(("a", 1, 1000), ("a", 1, 1040), ("a", 1, 1300), ("a", 2, 1000))
    events = _events(("a", 1, 1050), ("a", 1, 1120), ("a", 1, 1050), ("a", 1, 1310))
    out, summary = attribute_frames(imps, events, window_s=WINDOW)
    # 1050 goes to the first impression (first touch), its exact repeat is dropped; 1120 is past the
    # first one's window (1000 + 100), so it is the second's; 1310 is the third's.
    assert out["outcome"].tolist() == [1, 1, 1, 0]
    assert out["outcome_events"].tolist() == [1, 1, 1, 0]
    assert out["outcome_ts"].tolist() == [1050, 1120, 1310, -1]
    assert summary.duplicates == 1 and summary.attributed == 3 and summary.unattributed == 0


def test_several_clicks_on_one_impression_count_once() -> None:
    out, summary = attribute_frames(
        _imps(("a", 1, 1000)), _events(("a", 1, 1001), ("a", 1, 1002), ("a", 1, 1090)), window_s=WINDOW
    )
    assert out["outcome"].tolist() == [1] and out["outcome_events"].tolist() == [3]
    assert out["outcome_ts"].tolist() == [1001]
    assert summary.attributed == 3


def test_events_without_an_impression_are_organic() -> None:
    imps = _imps(("a", 1, 1000))
    events = _events(("a", 2, 1010), ("b", 1, 1010), ("zz", 9, 5))  # other item, other user, nobody
    out, summary = attribute_frames(imps, events, window_s=WINDOW)
    assert out["outcome"].tolist() == [0]
    assert (summary.events, summary.attributed, summary.unattributed) == (3, 0, 3)


def test_only_the_outcome_type_counts() -> None:
    imps = _imps(("a", 1, 1000), ("b", 1, 1000))
    events = _events(("a", 1, 1010, "purchase"), ("b", 1, 1010, "click"))
    clicks, s1 = attribute_frames(imps, events, window_s=WINDOW, outcome_type="click")
    buys, s2 = attribute_frames(imps, events, window_s=WINDOW, outcome_type="purchase")
    anything, _ = attribute_frames(imps, events, window_s=WINDOW, outcome_type=None)
    assert clicks["outcome"].tolist() == [0, 1] and s1.other_types == 1
    assert buys["outcome"].tolist() == [1, 0] and s2.other_types == 1
    assert anything["outcome"].tolist() == [1, 1]


def test_ties_in_time_go_to_the_impression_logged_first() -> None:
    # the same item twice at the same second (two requests): the first row gets the click
    result = attribute(np.array([5, 5]), np.array([1000, 1000]), np.array([5]), np.array([1001]), WINDOW)
    assert result.outcome.tolist() == [1, 0] and result.event_impression.tolist() == [0]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        attribute(np.array([0]), np.array([0]), np.array([0]), np.array([0]), -1)
    with pytest.raises(ValueError, match="times"):
        attribute(np.array([0]), np.array([-5]), np.array([0]), np.array([0]), 10)
    with pytest.raises(ValueError, match="lack the column"):
        attribute_frames(pd.DataFrame({"user_id": []}), _events(), window_s=10)


def test_array_join_matches_a_brute_force_oracle() -> None:
    rng = np.random.default_rng(3)
    imp_key, imp_ts = rng.integers(0, 20, 400), rng.integers(0, 2000, 400)
    ev_key, ev_ts = rng.integers(0, 25, 300), rng.integers(0, 2200, 300)
    got = attribute(imp_key, imp_ts, ev_key, ev_ts, 150)
    for e in range(len(ev_key)):
        inside = np.flatnonzero((imp_key == ev_key[e]) & (imp_ts <= ev_ts[e]) & (imp_ts >= ev_ts[e] - 150))
        if len(inside) == 0:
            assert got.event_impression[e] == -1
            continue
        # earliest time, then the first logged
        first = inside[np.lexsort((inside, imp_ts[inside]))[0]]
        assert got.event_impression[e] == first
    expected = np.bincount(got.event_impression[got.event_impression >= 0], minlength=400)
    np.testing.assert_array_equal(got.n_events, expected)
    np.testing.assert_array_equal(got.outcome, (expected > 0).astype(np.int8))
