"""The inspector's data: `GET /v1/users/{id}/sequence`, `GET /inspector/examples` and the page itself."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import numpy as np
import pandas as pd

from exporters.bundle import load_bundle
from feature_store.base import MAX_LEN_LIMIT
from service.app import create_app
from service.routes.inspector import EXAMPLE_ITEMS, EXAMPLE_USERS
from service.routes.users import INLINE_EVENTS
from service.schemas import Event, UserSequence
from tests.conftest import ServedData, TinyModels
from tests.redis_proc import RedisProcess
from tests.service.conftest import SettingsFactory, TestClient, is_problem


def _events(history: tuple[np.ndarray, np.ndarray]) -> list[dict[str, int]]:
    items, times = history
    return [{"item_id": int(i), "timestamp": int(t)} for i, t in zip(items, times, strict=True)]


def test_sequence_returns_the_newest_events_oldest_first(client: TestClient, served: ServedData) -> None:
    user = served.users[3]
    history = served.history(user)
    stored = len(history[0])
    assert stored > 5
    r = client.get(f"/v1/users/{user}/sequence", params={"limit": 5})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": user, "sequence_length": stored, "events": _events(history)[-5:]}
    whole = client.get(f"/v1/users/{user}/sequence").json()  # default limit 1000 > the tiny histories
    assert whole["sequence_length"] == stored and whole["events"] == _events(history)


def test_sequence_of_unknown_user_is_empty(client: TestClient) -> None:
    r = client.get("/v1/users/nobody-here/sequence")
    assert r.status_code == 200
    assert r.json() == {"user_id": "nobody-here", "sequence_length": 0, "events": []}


def test_sequence_sees_appended_events_and_odd_user_ids(client: TestClient) -> None:
    user = f"team/{uuid.uuid4().hex[:8]} é\n?#%"  # every one of these is sent percent-encoded
    events = [{"item_id": 7, "timestamp": 1_700_000_000}, {"item_id": 9, "timestamp": 1_700_000_060}]
    assert client.post("/v1/events", json={"user_id": user, "events": events}).status_code == 200
    r = client.get(f"/v1/users/{quote(user, safe='')}/sequence")
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": user, "sequence_length": 2, "events": events}


def test_long_sequence_values_and_bytes(make_settings: SettingsFactory) -> None:
    # Past the store's cap and past what is serialised on the event loop, so both ways of writing
    # the answer are checked against what a pydantic response model writes.
    cap, sent = 25_000, 30_000
    assert cap > INLINE_EVENTS
    user = f"long-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(3)
    items = rng.integers(0, 2**62, sent, dtype=np.int64)
    times = 1_700_000_000 + np.arange(sent, dtype=np.int64) * 7
    with TestClient(create_app(make_settings(store_max_events=cap))) as c:
        for lo in range(0, sent, 10_000):
            events = _events((items[lo : lo + 10_000], times[lo : lo + 10_000]))
            assert c.post("/v1/events", json={"user_id": user, "events": events}).status_code == 200
        for limit, expected in (
            (MAX_LEN_LIMIT, cap),
            (cap - 1, cap - 1),
            (INLINE_EVENTS, INLINE_EVENTS),
            (3, 3),
        ):
            r = c.get(f"/v1/users/{user}/sequence", params={"limit": limit})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            body = r.json()
            assert body["user_id"] == user and body["sequence_length"] == cap
            assert len(body["events"]) == expected
            assert [e["item_id"] for e in body["events"]] == items[-expected:].tolist()
            assert [e["timestamp"] for e in body["events"]] == times[-expected:].tolist()
            model = UserSequence(
                user_id=user,
                sequence_length=cap,
                events=[Event(item_id=e["item_id"], timestamp=e["timestamp"]) for e in body["events"]],
            )
            assert r.content == model.model_dump_json().encode()


def test_sequence_rejects_bad_parameters(client: TestClient, served: ServedData) -> None:
    user = served.users[0]
    for limit in ("0", str(MAX_LEN_LIMIT + 1), "ten"):
        r = client.get(f"/v1/users/{user}/sequence", params={"limit": limit})
        assert is_problem(r, 422), (limit, r.text)
        assert r.json()["errors"][0]["loc"] == ["query", "limit"]
    assert is_problem(client.get("/v1/users//sequence"), 422)
    assert is_problem(client.get(f"/v1/users/{'x' * 257}/sequence"), 422)


def test_sequence_gives_503_when_the_store_is_down(
    redis_process: RedisProcess, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        redis_url=redis_process.url, redis_namespace="inspector", feature_timeout_ms=200.0, retry_after_s=4
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert c.get("/v1/users/u1/sequence").json()["sequence_length"] == 0
        redis_process.stop()
        r = c.get("/v1/users/u1/sequence")
        assert is_problem(r, 503) and r.headers["retry-after"] == "4"
        assert 'dare_feature_store_errors_total{kind="unavailable"}' in c.get("/metrics").text


def test_examples_without_a_loaded_dataset(client: TestClient, tiny_models: TinyModels) -> None:
    body = client.get("/inspector/examples").json()
    assert body["users"] == [] and body["users_source"] is None
    known = np.intersect1d(
        load_bundle(tiny_models.root / "dare" / "1").item_ids[1:],
        load_bundle(tiny_models.root / "coupled" / "1").item_ids[1:],
    )
    items = body["items"]
    assert len(items) == EXAMPLE_ITEMS and items == sorted(set(items))
    assert set(items) <= set(known.tolist())
    assert items[0] == known.min() and items[-1] == known.max()  # spread over the whole range


def test_examples_from_the_dataset_loaded_at_start_up(
    make_settings: SettingsFactory, tiny_models: TinyModels
) -> None:
    counts = pd.read_parquet(tiny_models.data / "events.parquet", columns=["user_id"])[
        "user_id"
    ].value_counts()
    settings = make_settings(redis_url=None, load_events=tiny_models.data)  # the in-memory store
    with TestClient(create_app(settings)) as c:
        body = c.get("/inspector/examples").json()
    users = body["users"]
    assert len(users) == EXAMPLE_USERS and "DARE_LOAD_EVENTS" in body["users_source"]
    assert all(u["sequence_length"] == counts[u["user_id"]] for u in users)
    lengths = [u["sequence_length"] for u in users]
    assert lengths == sorted(lengths, reverse=True)
    assert lengths[0] == counts.max() and lengths[-1] == counts.min()


def test_root_serves_the_inspector_page(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>dare-serve inspector</title>" in r.text
    assert "/" not in client.get("/openapi.json").json()["paths"], "the page is not part of the API"
