"""Pure ASGI middleware: request id, body-size limit, HTTP metrics.

Pure ASGI (not BaseHTTPMiddleware) so responses are not re-buffered and exceptions keep their
normal path. The body is read up to the limit before the app sees it: a body over the limit is
answered 413 without being parsed, whether or not the client declared its length.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PROBLEM_JSON, BodyTooLarge, problem_response
from service.state import STATE_KEY

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def request_id_for(given: str | None) -> str:
    """Echo a client's X-Request-ID when it is a sane token, else a new random id."""
    if given is not None and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Gives every HTTP request an id, enforces the body limit and records HTTP metrics."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_for(_header(scope, b"x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if scope["method"] in _BODY_METHODS:
                body = await self._read_body(scope, receive)
                if body is None:
                    await self._too_large(scope, send_with_id)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self._observe(scope, status, time.perf_counter() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed the limit."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        from starlette.requests import Request

        err = BodyTooLarge(f"the request body exceeds {self.max_body_bytes} bytes (DARE_MAX_BODY_BYTES)")
        response = problem_response(err.status, err.type, err.title, err.detail, Request(scope))
        # The unread rest of the body is not drained: close the connection instead.
        response.headers["Connection"] = "close"
        assert response.media_type == PROBLEM_JSON

        async def no_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        await response(scope, no_body, send)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        state = scope.get("state")
        app_state: Any = state.get(STATE_KEY) if isinstance(state, Mapping) else None
        if app_state is None:
            return
        route = scope.get("route")
        # Unmatched paths share one label, so scanners cannot blow up the series count.
        endpoint = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        m = app_state.metrics
        m.child(m.http_requests, endpoint, method, str(status)).inc()
        m.child(m.http_latency, endpoint, method).observe(seconds)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then defers to the server (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
