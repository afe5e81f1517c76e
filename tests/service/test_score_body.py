"""`POST /v1/score` parses its body itself (`ScoreRoute`): it must answer exactly as FastAPI's own
body handling does, for good and bad input alike."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.errors import install_error_handlers
from service.routes.score import parse_score_body
from service.schemas import ScoreRequest


async def _fast(request: Request) -> Response:
    body = parse_score_body(request.headers.get("content-type"), await request.body())
    return Response(body.model_dump_json(), media_type="application/json")


class _FastRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _fast


def _app() -> FastAPI:
    """The same model behind FastAPI's body handling (/reference) and behind ScoreRoute's (/fast)."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/reference")
    async def reference(body: ScoreRequest) -> Response:
        return Response(body.model_dump_json(), media_type="application/json")

    fast = APIRouter(route_class=_FastRoute)

    @fast.post("/fast")
    async def documented(body: ScoreRequest) -> Response:  # pragma: no cover - never called
        raise AssertionError

    app.include_router(fast)
    return app


JSON = "application/json"
OK = {"user_id": "u1", "candidates": [3, 1, 3], "timestamp": 1_700_000_000}
CASES: list[tuple[str, bytes, str | None]] = [
    ("ok", json.dumps(OK).encode(), JSON),
    ("explain", json.dumps({**OK, "explain": True}).encode(), JSON),
    ("charset", json.dumps(OK).encode(), "application/json; charset=utf-8"),
    ("vendor json", json.dumps(OK).encode(), "application/vnd.dare+json"),
    ("upper case type", json.dumps(OK).encode(), "Application/JSON"),
    ("whitespace", b" \n" + json.dumps(OK).encode() + b"\n", JSON),
    ("byte-order mark", b"\xef\xbb\xbf" + json.dumps(OK).encode(), JSON),
    ("duplicate keys", b'{"user_id": "a", "user_id": "b", "candidates": [1]}', JSON),
    ("escaped unicode", b'{"user_id": "\\u00fcser", "candidates": [1]}', JSON),
    ("lone surrogate", b'{"user_id": "\\ud800", "candidates": [1]}', JSON),
    ("NaN candidate", b'{"user_id": "u", "candidates": [NaN]}', JSON),
    ("float candidate", b'{"user_id": "u", "candidates": [1.0]}', JSON),
    ("string candidate", b'{"user_id": "u", "candidates": ["1"]}', JSON),
    ("bool candidate", b'{"user_id": "u", "candidates": [true]}', JSON),
    ("too big candidate", b'{"user_id": "u", "candidates": [18446744073709551616]}', JSON),
    ("negative timestamp", b'{"user_id": "u", "candidates": [1], "timestamp": -1}', JSON),
    ("string explain", b'{"user_id": "u", "candidates": [1], "explain": "true"}', JSON),
    ("extra field", b'{"user_id": "u", "candidates": [1], "x": 1}', JSON),
    ("empty candidates", b'{"user_id": "u", "candidates": []}', JSON),
    ("many errors", json.dumps({"user_id": 1, "candidates": ["a"] * 30, "x": 1}).encode(), JSON),
    ("array", b"[1, 2]", JSON),
    ("null", b"null", JSON),
    ("empty body", b"", JSON),
    ("malformed", b"{not json", JSON),
    ("truncated", b'{"user_id": "u", "candidates": [1', JSON),
    ("not utf-8", b'{"user_id": "\xff", "candidates": [1]}', JSON),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, JSON),
    ("text/plain", json.dumps(OK).encode(), "text/plain"),
    ("no content type", json.dumps(OK).encode(), None),
]


@pytest.mark.parametrize(("name", "raw", "content_type"), CASES, ids=[c[0] for c in CASES])
def test_score_body_is_read_as_fastapi_reads_it(name: str, raw: bytes, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    with TestClient(_app()) as c:
        ref = c.post("/reference", content=raw, headers=headers)
        got = c.post("/fast", content=raw, headers=headers)
    assert got.status_code == ref.status_code, (ref.text[:300], got.text[:300])
    assert got.headers["content-type"] == ref.headers["content-type"]
    want, have = ref.json(), got.json()
    if isinstance(want, dict) and "instance" in want:
        assert want.pop("instance") == "/reference" and have.pop("instance") == "/fast"
    assert have == want


def test_valid_bodies_take_the_one_pass_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(*_: Any, **__: Any) -> Any:
        raise AssertionError("a valid JSON body went through the stdlib path")

    monkeypatch.setattr("service.routes.score.json.loads", no_fallback)
    body = parse_score_body(JSON, json.dumps({**OK, "explain": True}).encode())
    assert body == ScoreRequest(user_id="u1", candidates=[3, 1, 3], timestamp=1_700_000_000, explain=True)
