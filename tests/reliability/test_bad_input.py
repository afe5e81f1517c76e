"""Hand-written bad input against the real server process (uvicorn + httptools parse these bytes).

Huge bodies (declared and chunked), 100,000 candidates, negative and overflowing ids, NaN and
infinities, wrong types, broken and deeply nested JSON: each gets its 4xx problem+json, small and
without a trace of the input or of internals. Inputs that are odd but valid (unicode and control
characters in user ids, duplicated candidates) are served correctly. Stored data that is bad (an
FM vector of NaNs) fails only that user's request, with a named 500 instead of null scores.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from feature_store import codec
from feature_store.keys import KeySpace
from service.process import ServeProcess
from tests.conftest import ServedData
from tests.reliability.harness import (
    WRITE_TOKEN,
    Call,
    Record,
    problem_issue,
    send,
    server_process,
    statuses,
    write_artifact,
)

MAX_BODY = 1 << 20  # the default DARE_MAX_BODY_BYTES
WRITE = {"Authorization": f"Bearer {WRITE_TOKEN}"}
SENT: list[Record] = []


@pytest.fixture(scope="module")
def server(served: ServedData, redis_url: str, bundle_root: Path, workdir: Path) -> Iterator[ServeProcess]:
    namespace = served.fill_copy(redis_url, "input")
    proc = server_process(workdir, bundle_root, redis_url, redis_namespace=namespace, write_token=WRITE_TOKEN)
    with proc:
        yield proc
    log = proc.log_text()
    assert "Traceback" not in log, log[-3000:]
    write_artifact(
        "bad-input-handwritten",
        category="bad input",
        fault="hand-written bad and odd inputs over real HTTP (see test_bad_input.py)",
        cases=sorted({r.call.meta for r in SENT}),
        requests=len(SENT),
        statuses=statuses(SENT),
        statuses_by_endpoint={
            path: statuses(r for r in SENT if r.call.path == path)
            for path in sorted({r.call.path for r in SENT})
        },
        notes="the one 500 is the user whose stored FM vector is NaN: corrupt-user-data, by design",
        lost=0,
    )


def post(server: ServeProcess, path: str, case: str, **kw: Any) -> Record:
    headers = {**kw.pop("headers", {}), **(WRITE if path == "/v1/events" else {})}
    with httpx.Client(base_url=server.base, timeout=60) as client:
        record = send(client, Call("POST", path, "bad-input", headers=headers, meta=case, **kw))
    SENT.append(record)
    return record


SCORE, EVENTS = "/v1/score", "/v1/events"
INVALID, MALFORMED = (422, "invalid-request"), (400, "malformed-json")


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def cands(raw: str, extra: str = "") -> dict[str, Any]:
    """A score body whose candidate list (and extra members) are written as raw JSON text."""
    return raw_json('{"user_id": "u", "candidates": [' + raw + "]" + extra + "}")


def body(**fields: Any) -> dict[str, Any]:
    return {"json": {"user_id": "u", "candidates": [1]} | fields}


def events(*items: dict[str, Any]) -> dict[str, Any]:
    return {"json": {"user_id": "u", "events": list(items)}}


EVENT = {"item_id": 5, "timestamp": 1}

# (case, path, request keywords, status, problem type suffix)
BAD: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("body over the limit, declared", SCORE, cands("1, " * (MAX_BODY // 3) + "1"), 413, "body-too-large"),
    ("100,000 candidates", SCORE, cands(", ".join(["7"] * 100_000)), 413, "too-many-candidates"),
    (
        "100,000 large ids: over the body limit",
        SCORE,
        cands(", ".join(["9" * 12] * 100_000)),
        413,
        "body-too-large",
    ),
    ("empty candidate list", SCORE, body(candidates=[]), *INVALID),
    ("negative id", SCORE, body(candidates=[-1]), *INVALID),
    ("id 2**63 (int64 overflow)", SCORE, body(candidates=[2**63]), *INVALID),
    ("id 2**64", SCORE, body(candidates=[2**64]), *INVALID),
    ("id -2**63-1", SCORE, body(candidates=[-(2**63) - 1]), *INVALID),
    ("id 10**400", SCORE, cands("1" + "0" * 400), *INVALID),
    ("id 1e400 (an infinite float)", SCORE, cands("1e400"), *INVALID),
    ("id NaN", SCORE, cands("NaN"), *INVALID),
    ("id Infinity", SCORE, cands("Infinity"), *INVALID),
    ("id -Infinity", SCORE, cands("-Infinity"), *INVALID),
    ("timestamp NaN", SCORE, cands("1", ', "timestamp": NaN'), *INVALID),
    ("timestamp 2**32", SCORE, body(timestamp=2**32), *INVALID),
    ("timestamp negative", SCORE, body(timestamp=-1), *INVALID),
    ("explain NaN", SCORE, cands("1", ', "explain": NaN'), *INVALID),
    ("id as string", SCORE, body(candidates=["12"]), *INVALID),
    ("id as float", SCORE, body(candidates=[12.0]), *INVALID),
    ("id as bool", SCORE, body(candidates=[True]), *INVALID),
    ("id null", SCORE, body(candidates=[None]), *INVALID),
    ("candidates as object", SCORE, body(candidates={"1": 2}), *INVALID),
    ("user id as number", SCORE, body(user_id=7), *INVALID),
    ("user id null", SCORE, body(user_id=None), *INVALID),
    ("user id empty", SCORE, body(user_id=""), *INVALID),
    ("user id of 257 characters", SCORE, body(user_id="é" * 257), *INVALID),
    (
        "user id with a lone surrogate",
        SCORE,
        raw_json('{"user_id": "a\\ud800b", "candidates": [1]}'),
        *INVALID,
    ),
    ("explain as string", SCORE, body(explain="true"), *INVALID),
    ("unknown field", SCORE, body(limit=3), *INVALID),
    ("top-level array", SCORE, {"json": [{"user_id": "u", "candidates": [1]}]}, *INVALID),
    ("no body", SCORE, {"headers": {"Content-Type": "application/json"}}, *INVALID),
    ("text/plain body", SCORE, {**cands("1"), "headers": {"Content-Type": "text/plain"}}, *INVALID),
    ("truncated JSON", SCORE, cands("1,"), *MALFORMED),
    (
        "invalid UTF-8",
        SCORE,
        {**raw_json(""), "content": b'{"user_id": "\xff\xfe", "candidates": [1]}'},
        *MALFORMED,
    ),
    ("JSON nested 200,000 deep", SCORE, raw_json("[" * 200_000 + "]" * 200_000), *MALFORMED),
    ("unknown X-Experiment", SCORE, {**body(), "headers": {"X-Experiment": "nope"}}, 400, "unknown-variant"),
    (
        "X-Experiment of 8 KB",
        SCORE,
        {**body(), "headers": {"X-Experiment": "x" * 8192}},
        400,
        "unknown-variant",
    ),
    ("10,001 events", EVENTS, events(*[EVENT] * 10_001), *INVALID),
    ("no events", EVENTS, events(), *INVALID),
    ("event id negative", EVENTS, events({"item_id": -5, "timestamp": 1}), *INVALID),
    ("event id 2**63", EVENTS, events({"item_id": 2**63, "timestamp": 1}), *INVALID),
    ("event timestamp 2**32", EVENTS, events({"item_id": 5, "timestamp": 2**32}), *INVALID),
    (
        "event timestamp NaN",
        EVENTS,
        raw_json('{"user_id": "u", "events": [{"item_id": 5, "timestamp": NaN}]}'),
        *INVALID,
    ),
    ("event with unknown field", EVENTS, events(EVENT | {"weight": 2}), *INVALID),
    (
        "event user id of 257 characters",
        EVENTS,
        {"json": {"user_id": "x" * 257, "events": [EVENT]}},
        *INVALID,
    ),
]


@pytest.mark.parametrize("case,path,kw,status,kind", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_problem(
    server: ServeProcess, case: str, path: str, kw: dict[str, Any], status: int, kind: str
) -> None:
    r = post(server, path, case, **kw)
    assert problem_issue(r, status) is None, (case, r.status, problem_issue(r, status), r.body[:300])
    body = r.json()
    assert body["type"].endswith(kind), body
    assert len(r.body) < 5000, "the input is not echoed back"
    if status == 422:
        assert body["errors"] and all({"loc", "msg", "type"} <= set(e) for e in body["errors"])
    if kind == "too-many-candidates":
        assert body["max_candidates"] == 1000
    if kind == "body-too-large":
        assert r.headers.get("connection") == "close"


def test_chunked_body_over_the_limit(server: ServeProcess) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"user_id": "u", "candidates": ['
        for _ in range(MAX_BODY // 30_000 + 2):
            yield b"1, " * 10_000
        yield b"1]}"

    r = post(server, "/v1/score", "body over the limit, chunked", content=chunks(),
             headers={"Content-Type": "application/json"})  # fmt: skip
    assert problem_issue(r, 413) is None and r.json()["type"].endswith("body-too-large"), r.body[:300]


UNICODE_USERS = [
    "ユーザー42",
    "👩‍💻 ada",
    "\u202eright-to-left",
    "e\u0301\u0301\u0301",
    "nul\u0000inside",
    "tab\tnewline\n",
    "{braces}%7B",
    "é" * 256,
]


@pytest.mark.parametrize("user", UNICODE_USERS, ids=[ascii(u)[:20] for u in UNICODE_USERS])
def test_unicode_user_ids_are_served_and_kept_apart(
    server: ServeProcess, served: ServedData, user: str
) -> None:
    user = f"{user[:240]}-{uuid.uuid4().hex[:8]}"
    events = [{"item_id": served.items[i], "timestamp": served.now - 10 + i} for i in range(3)]
    r = post(server, "/v1/events", "unicode user id: events", json={"user_id": user, "events": events})
    assert r.status == 200 and r.json() == {"user_id": user, "appended": 3, "sequence_length": 3}, r.body
    body = {"user_id": user, "candidates": served.items[:5], "timestamp": served.now, "explain": True}
    s = post(server, "/v1/score", "unicode user id: score", json=body)
    assert s.status == 200, s.body[:300]
    got = s.json()
    assert got["user"]["sequence_length"] == 3 and len(got["scores"]) == 5
    seen = {(b["item_id"], b["timestamp"]) for b in got["explain"][0]["behaviors"]}
    assert seen == {(e["item_id"], e["timestamp"]) for e in events}


def test_duplicated_candidates_get_equal_scores(server: ServeProcess, served: ServedData) -> None:
    a, b = served.items[3], served.items[9]
    body = {"user_id": served.fm_users[0], "candidates": [a, a, b, a, b, 10**15], "timestamp": served.now}
    r = post(server, "/v1/score", "duplicated candidates", json=body)
    assert r.status == 200, r.body[:300]
    scores = r.json()["scores"]
    assert len(scores) == 6 and scores[0] == scores[1] == scores[3] and scores[2] == scores[4]
    assert r.json()["unknown_items"] == 1 and all(0 < x < 1 for x in scores)


def test_non_finite_stored_fm_vector_fails_that_user_only(
    server: ServeProcess, served: ServedData, redis_url: str
) -> None:
    """Stored bytes no writer would produce: a NaN FM vector is corrupt data, not a NaN score."""
    bad_user = f"nan-fm-{uuid.uuid4().hex[:8]}"
    dim = len(next(iter(served.fm_vectors.values())))
    vector = np.full(dim, np.nan, "<f4")
    blob = codec.FM_HEADER.pack(codec.FM_MAGIC, codec.FM_FORMAT, codec.FM_DTYPE_FLOAT32, dim, 1.7e9)
    keys = KeySpace(server.env["DARE_REDIS_NAMESPACE"])
    with redis.Redis.from_url(redis_url) as r:
        r.hset(keys.fm(bad_user), served.fm_version.encode(), blob + vector.tobytes())
    bad = post(server, "/v1/score", "NaN FM vector stored", json={"user_id": bad_user, "candidates": [1, 2]})
    assert problem_issue(bad, 500) is None and bad.json()["type"].endswith("corrupt-user-data"), bad.body
    assert bad_user not in bad.body.decode()
    good = post(server, "/v1/score", "neighbour of the NaN FM user",
                json={"user_id": served.fm_users[1], "candidates": [1, 2]})  # fmt: skip
    assert good.status == 200 and all(isinstance(x, float) for x in good.json()["scores"])
    assert "corrupt FM embedding" in server.log_text()


def test_service_still_healthy_after_bad_input(server: ServeProcess, served: ServedData) -> None:
    with httpx.Client(base_url=server.base, timeout=10) as c:
        assert c.get("/readyz").status_code == 200
    r = post(server, "/v1/score", "good request after the bad ones",
             json={"user_id": served.fm_users[2], "candidates": served.items[:10]})  # fmt: skip
    assert r.status == 200 and len(r.json()["scores"]) == 10
