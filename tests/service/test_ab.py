"""A/B: the X-Experiment header, a stable hash split, configured weights, per-variant metrics."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from service.app import create_app
from service.core.ab import assign_variant, effective_weights, hash_unit
from tests.conftest import ServedData
from tests.service.conftest import SettingsFactory, TestClient, score


def test_header_picks_the_variant(client: TestClient, served: ServedData) -> None:
    for variant in ("dare", "coupled", "dare"):
        r = score(client, served.users[0], served.items[:3], variant)
        assert r.headers["x-model-variant"] == variant == r.json()["variant"]


def test_hash_split_is_stable_and_uses_both_arms(client: TestClient, served: ServedData) -> None:
    arms: dict[str, set[str]] = {}
    users = [*served.users[:40], *(f"anon-{i}" for i in range(40))]
    for _ in range(2):
        for user in users:
            arms.setdefault(user, set()).add(score(client, user, served.items[:2]).headers["x-model-variant"])
    assert all(len(a) == 1 for a in arms.values()), "a user moved between arms"
    split = Counter(a.pop() for a in arms.values())
    assert set(split) == {"dare", "coupled"} and min(split.values()) >= 20  # 80 users, 50/50
    # the assignment is the documented pure function of (user, salt, weights)
    assert all(
        assign_variant(u, "dare-ab", {"dare": 0.5, "coupled": 0.5}) == score(client, u, [1]).json()["variant"]
        for u in users[:5]
    )


def test_metrics_are_labelled_by_variant(client: TestClient, served: ServedData) -> None:
    for variant in ("dare", "coupled"):
        score(client, served.fm_users[0], served.items[:2], variant)
    text = client.get("/metrics").text
    for variant in ("dare", "coupled"):
        assert re.search(rf'dare_score_requests_total\{{outcome="ok",variant="{variant}"\}} [1-9]', text)
        assert f'dare_score_duration_seconds_count{{variant="{variant}"}}' in text
    assert 'dare_variant_weight{variant="dare"} 0.5' in text


@pytest.fixture(scope="module")
def weighted_client(make_settings: SettingsFactory) -> TestClient:
    settings = make_settings(variant_weights="dare=1,coupled=0", ab_salt="another-salt")
    with TestClient(create_app(settings)) as c:
        yield c


def test_weights_steer_the_hash_split(weighted_client: TestClient, served: ServedData) -> None:
    arms = {score(weighted_client, u, served.items[:2]).headers["x-model-variant"] for u in served.users[:30]}
    assert arms == {"dare"}
    # a variant with weight 0 is still served on request
    assert score(weighted_client, served.users[0], served.items[:2], "coupled").json()["variant"] == "coupled"
    assert weighted_client.get("/v1/models").json()["weights"] == {"coupled": 0.0, "dare": 1.0}


def test_assignment_follows_the_weights() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    weights = {"a": 0.8, "b": 0.2}
    counts = Counter(assign_variant(u, "s", weights) for u in users)
    assert abs(counts["a"] / len(users) - 0.8) < 0.015
    # the order the weights are written in does not matter, the salt does
    assert all(
        assign_variant(u, "s", {"b": 0.2, "a": 0.8}) == assign_variant(u, "s", weights) for u in users[:500]
    )
    moved = sum(assign_variant(u, "s2", weights) != assign_variant(u, "s", weights) for u in users[:2000])
    assert 400 < moved < 1000  # independent reshuffle: 2 * 0.8 * 0.2 = 32% move
    with pytest.raises(ValueError):
        assign_variant("u", "s", {"a": 0.0})


def test_hash_is_uniform_and_fixed() -> None:
    values = [hash_unit(f"u{i}", "salt") for i in range(10_000)]
    assert min(values) >= 0.0 and max(values) < 1.0 and abs(sum(values) / len(values) - 0.5) < 0.01
    # pinned: the same user lands in the same arm across processes, hosts and releases
    assert hash_unit("u42", "dare-ab") == 0.697048281522752


def test_effective_weights() -> None:
    assert effective_weights(None, ["b", "a"]) == {"a": 0.5, "b": 0.5}
    assert effective_weights({"a": 3, "b": 1, "c": 4}, ["a", "b"]) == {"a": 0.75, "b": 0.25}
    assert effective_weights({"a": 1}, ["a", "z"]) == {"a": 1.0, "z": 0.0}
    assert effective_weights({"c": 1}, ["a"]) == {}
