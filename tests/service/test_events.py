"""POST /v1/events appends behaviors that the next score sees; the write token guards it."""

from __future__ import annotations

import uuid

import numpy as np

from service.app import create_app
from tests.conftest import ServedData
from tests.service.conftest import WRITE_TOKEN, SettingsFactory, TestClient, is_problem


def test_appended_events_are_seen_by_the_next_score(client: TestClient, served: ServedData) -> None:
    user = f"events-{uuid.uuid4().hex[:8]}"  # fresh: other tests' users stay untouched
    cands = served.items[:6]
    before = client.post("/v1/score", json={"user_id": user, "candidates": cands, "timestamp": served.now})
    assert before.json()["user"]["sequence_length"] == 0 and before.json()["user"]["cold_start"]
    events = [{"item_id": served.items[i], "timestamp": served.now - 100 + i} for i in range(3)]
    r = client.post("/v1/events", json={"user_id": user, "events": events})
    assert r.status_code == 200 and r.json() == {"user_id": user, "appended": 3, "sequence_length": 3}
    after = client.post(
        "/v1/score", json={"user_id": user, "candidates": cands, "timestamp": served.now, "explain": True}
    ).json()
    assert after["user"]["sequence_length"] == 3 and not after["user"]["cold_start"]
    assert not np.allclose(after["scores"], before.json()["scores"])
    seen = {(b["item_id"], b["timestamp"]) for b in after["explain"][0]["behaviors"]}
    assert seen == {(e["item_id"], e["timestamp"]) for e in events}
    more = client.post("/v1/events", json={"user_id": user, "events": events[:1]})
    assert more.json()["sequence_length"] == 4
    assert "dare_events_appended_total 4.0" in client.get("/metrics").text


def test_write_token(make_settings: SettingsFactory) -> None:
    body = {"user_id": f"events-{uuid.uuid4().hex[:8]}", "events": [{"item_id": 1, "timestamp": 10}]}
    with TestClient(create_app(make_settings(write_token=WRITE_TOKEN))) as c:
        assert is_problem(c.post("/v1/events", json=body), 401)
        wrong = c.post("/v1/events", json=body, headers={"Authorization": "Bearer not-the-write-token"})
        assert is_problem(wrong, 403)
        ok = c.post("/v1/events", json=body, headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
        assert ok.status_code == 200 and ok.json()["sequence_length"] == 1
