"""Bad input never gives a 500: every error is an RFC 9457 problem with the right status."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from service.app import create_app
from tests.conftest import ServedData
from tests.service.conftest import SettingsFactory, TestClient, is_problem

OK_USER = "u-errors"


@pytest.mark.parametrize(
    "body,status",
    [
        ({"user_id": OK_USER, "candidates": []}, 422),
        ({"user_id": OK_USER, "candidates": [-1]}, 422),
        ({"user_id": OK_USER, "candidates": [2**63]}, 422),
        ({"user_id": OK_USER, "candidates": "abc"}, 422),
        ({"user_id": OK_USER, "candidates": ["12"]}, 422),
        ({"user_id": OK_USER, "candidates": [1.5]}, 422),
        ({"user_id": OK_USER, "candidates": [True]}, 422),
        ({"user_id": OK_USER, "candidates": None}, 422),
        ({"user_id": OK_USER, "candidates": [[1]]}, 422),
        ({"user_id": 42, "candidates": [1]}, 422),
        ({"user_id": "", "candidates": [1]}, 422),
        ({"candidates": [1]}, 422),
        ({"user_id": OK_USER}, 422),
        ({"user_id": OK_USER, "candidates": [1], "explain": "yes"}, 422),
        ({"user_id": OK_USER, "candidates": [1], "timestamp": -5}, 422),
        ({"user_id": OK_USER, "candidates": [1], "timestamp": "now"}, 422),
        ({"user_id": OK_USER, "candidates": [1], "unexpected": 1}, 422),
        ([1, 2, 3], 422),
        ("just a string", 422),
        ({"user_id": OK_USER, "candidates": list(range(1001))}, 413),
        ({"user_id": OK_USER, "candidates": list(range(100_000))}, 413),
    ],
)
def test_bad_score_bodies(client: TestClient, body: Any, status: int) -> None:
    r = client.post("/v1/score", json=body)
    assert is_problem(r, status), (r.status_code, r.text[:300])
    if status == 422:
        assert r.json()["errors"], "422 lists what is wrong"
        assert len(r.text) < 5000, "the offending input is not echoed back"


def test_too_many_candidates_names_the_limit(client: TestClient) -> None:
    r = client.post("/v1/score", json={"user_id": OK_USER, "candidates": list(range(1001))})
    assert r.json()["max_candidates"] == 1000


@pytest.mark.parametrize(
    "raw,content_type",
    [
        (b"{not json", "application/json"),
        (b'{"user_id": "u", "candidates": [1, 2,', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"", "application/json"),
    ],
)
def test_malformed_json(client: TestClient, raw: bytes, content_type: str) -> None:
    r = client.post("/v1/score", content=raw, headers={"Content-Type": content_type})
    assert 400 <= r.status_code < 500 and is_problem(r, r.status_code), r.text


def test_not_json_content_type(client: TestClient) -> None:
    r = client.post(
        "/v1/score", content=b'{"user_id": "u", "candidates": [1]}', headers={"Content-Type": "text/plain"}
    )
    assert is_problem(r, 422)


def test_unknown_variant_lists_the_valid_ones(client: TestClient) -> None:
    r = client.post(
        "/v1/score", json={"user_id": OK_USER, "candidates": [1]}, headers={"X-Experiment": "nope"}
    )
    assert is_problem(r, 400)
    assert r.json()["valid_variants"] == ["coupled", "dare"]
    assert "coupled" in r.json()["detail"] and "dare" in r.json()["detail"]


def test_not_found_and_method_not_allowed(client: TestClient) -> None:
    assert is_problem(client.get("/no/such/path"), 404)
    r = client.get("/v1/score")
    assert is_problem(r, 405) and r.headers["allow"] == "POST"
    assert is_problem(client.delete("/v1/models"), 405)


def test_errors_carry_the_request_id(client: TestClient) -> None:
    r = client.post(
        "/v1/score", json={"user_id": OK_USER, "candidates": []}, headers={"X-Request-ID": "bad-1"}
    )
    assert r.headers["x-request-id"] == "bad-1" and r.json()["request_id"] == "bad-1"


@pytest.fixture(scope="module")
def small_body_client(make_settings: SettingsFactory) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_body_bytes=4096, max_candidates=100))) as c:
        yield c


def test_body_over_the_limit_is_refused_before_parsing(small_body_client: TestClient) -> None:
    huge = b'{"user_id": "u", "candidates": [' + b"1, " * 5000 + b"1]}"
    r = small_body_client.post("/v1/score", content=huge, headers={"Content-Type": "application/json"})
    assert is_problem(r, 413) and "body" in r.json()["title"].lower()


def test_chunked_body_over_the_limit_is_refused(small_body_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"user_id": "u", "candidates": ['
        for _ in range(100):
            yield b"1, " * 50
        yield b"1]}"

    r = small_body_client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert is_problem(r, 413)


def test_service_keeps_serving_after_bad_requests(small_body_client: TestClient) -> None:
    for _ in range(3):
        small_body_client.post("/v1/score", content=b"[[[", headers={"Content-Type": "application/json"})
    r = small_body_client.post("/v1/score", json={"user_id": "after", "candidates": [1, 2]})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u", "events": []},
        {"user_id": "u", "events": [{"item_id": -1, "timestamp": 1}]},
        {"user_id": "u", "events": [{"item_id": 1, "timestamp": 2**32}]},
        {"user_id": "u", "events": [{"item_id": 1}]},
        {"user_id": "u", "events": "x"},
        {"events": [{"item_id": 1, "timestamp": 1}]},
    ],
)
def test_bad_event_bodies(client: TestClient, body: Any) -> None:
    assert is_problem(client.post("/v1/events", json=body), 422)


def test_corrupt_user_data_fails_that_request_only(client: TestClient, served: ServedData) -> None:
    import redis

    from feature_store.keys import KeySpace

    bad_user = f"corrupt-{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(served.redis_url) as r:
        r.set(KeySpace(served.namespace).sequence(bad_user), b"not 12-byte records")

    def post(user: str) -> Any:
        return client.post(
            "/v1/score", json={"user_id": user, "candidates": [1, 2]}, headers={"X-Experiment": "dare"}
        )

    # concurrent, so the two can share a batch: the corrupt one must not fail its neighbour
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(post, [bad_user, served.users[1], bad_user, served.users[2]]))
    assert [r.status_code for r in results] == [500, 200, 500, 200]
    assert is_problem(results[0], 500) and results[0].json()["type"].endswith("corrupt-user-data")
    assert bad_user not in results[0].text
    assert 'dare_feature_store_errors_total{kind="corrupt"}' in client.get("/metrics").text
