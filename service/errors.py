"""Typed service errors and the one mapping that renders every error as RFC 9457 problem+json.

Handlers and the scoring path raise `DareServeError` subclasses named for the condition; FastAPI's
own validation errors, Starlette's HTTP errors (404, 405) and anything unexpected are rendered by
the same functions, so a client sees one error format and never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from feature_store.errors import (
    CorruptFeatureData,
    FeatureStoreError,
    FeatureStoreUnavailable,
    InvalidFeatureData,
)

logger = logging.getLogger("dare.service")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:dare-serve:problem:"
_MAX_REPORTED_ERRORS = 20


class DareServeError(Exception):
    """Base of the service's errors: an HTTP status, a problem type slug and a fixed title."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


class InvalidRequest(DareServeError):
    status, slug, title = 422, "invalid-request", "The request is not valid"


class MalformedJson(DareServeError):
    status, slug, title = 400, "malformed-json", "The body is not valid JSON"


class TooManyCandidates(DareServeError):
    status, slug, title = 413, "too-many-candidates", "Too many candidates"


class BodyTooLarge(DareServeError):
    status, slug, title = 413, "body-too-large", "Request body too large"


class UnknownVariant(DareServeError):
    status, slug, title = 400, "unknown-variant", "Unknown model variant"


class Unauthorized(DareServeError):
    status, slug, title = 401, "unauthorized", "Missing or malformed bearer token"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="dare-serve"'})


class Forbidden(DareServeError):
    status, slug, title = 403, "forbidden", "Wrong token"


class EndpointDisabled(DareServeError):
    # 404 rather than 403: with no admin token configured the admin surface does not exist.
    status, slug, title = 404, "not-found", "Not found"


# The two answers a feature-store failure becomes. Named for what the client is told, unlike the
# store's own exceptions (`feature_store.errors`) that they are made from.
class StoreDownAnswer(DareServeError):
    status, slug, title = 503, "feature-store-unavailable", "Feature store unavailable"


class UndecodableUserAnswer(DareServeError):
    # Not the client's fault and not transient: a 500 that names the condition, so it alerts.
    status, slug, title = 500, "corrupt-user-data", "Stored user data is corrupt"


class NoModelLoaded(DareServeError):
    status, slug, title = 503, "no-model", "No model loaded"


class NotReady(DareServeError):
    status, slug, title = 503, "not-ready", "Not ready"


class ShuttingDown(DareServeError):
    status, slug, title = 503, "shutting-down", "Shutting down"


class BundleRejected(DareServeError):
    status, slug, title = 409, "bundle-rejected", "A new bundle was refused; the previous version serves"


def store_error(exc: FeatureStoreError, retry_after_s: int) -> DareServeError:
    """The answer to a feature-store error (Redis details stay in the log)."""
    if isinstance(exc, InvalidFeatureData):
        return InvalidRequest(f"the feature store cannot hold these values: {exc}")
    if isinstance(exc, CorruptFeatureData):
        return UndecodableUserAnswer("the stored data of this user does not decode; it was logged")
    # Unavailable, and any other store failure: the request may succeed once Redis is back.
    logger.warning("feature store: %s", exc)
    return StoreDownAnswer(
        "the feature store did not answer in time; retry later",
        headers={"Retry-After": str(retry_after_s)},
    )


def store_error_kind(exc: FeatureStoreError) -> str:
    """The `kind` label of `dare_feature_store_errors_total` for a store error."""
    if isinstance(exc, FeatureStoreUnavailable):
        return "unavailable"
    if isinstance(exc, CorruptFeatureData):
        return "corrupt"
    return "error"


def problem_response(
    status: int,
    type_: str,
    title: str,
    detail: str | None,
    request: Request | None = None,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> Response:
    """An RFC 9457 problem+json response; the request id (if any) is echoed in body and header."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    out_headers = dict(headers or {})
    if request is not None:
        body["instance"] = request.url.path
        request_id = request_id_of(request)
        if request_id:
            body["request_id"] = request_id
            out_headers.setdefault("X-Request-ID", request_id)
    body.update(extensions or {})
    return Response(orjson.dumps(body), status_code=status, headers=out_headers, media_type=PROBLEM_JSON)


def request_id_of(request: Request) -> str | None:
    """The id the request middleware gave this request (None outside the middleware)."""
    state = request.scope.get("state") or {}
    value = state.get("request_id") if isinstance(state, Mapping) else None
    return value if isinstance(value, str) else None


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # The offending input is not echoed: it may be huge (100k ids) or sensitive.
    out = []
    for err in list(errors)[:_MAX_REPORTED_ERRORS]:
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


async def render_dare_error(request: Request, exc: Exception) -> Response:
    """The problem+json answer to a `DareServeError` (5xx ones are logged)."""
    assert isinstance(exc, DareServeError)
    if exc.status >= 500:
        logger.warning("%s %s: %s", exc.status, exc.slug, exc.detail)
    return problem_response(exc.status, exc.type, exc.title, exc.detail, request, exc.headers, exc.extensions)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        malformed = MalformedJson("the request body could not be parsed as JSON")
        return problem_response(malformed.status, malformed.type, malformed.title, malformed.detail, request)
    err = InvalidRequest(
        f"{len(errors)} problem(s) in the request",
        extensions={"errors": _validation_errors(errors)},
    )
    return problem_response(err.status, err.type, err.title, err.detail, request, extensions=err.extensions)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    from http import HTTPStatus

    # FastAPI turns body-parsing failures other than JSONDecodeError (bytes that are not UTF-8,
    # nesting deeper than the parser's recursion limit) into a bare 400; they are malformed JSON too.
    if exc.status_code == 400 and isinstance(exc.__cause__, (UnicodeDecodeError, RecursionError)):
        err = MalformedJson("the request body could not be parsed as JSON")
        return problem_response(err.status, err.type, err.title, err.detail, request)

    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    return problem_response(exc.status_code, "about:blank", title, detail, request, exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Logged with its traceback here; the client only learns that something failed and its id.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    err = DareServeError("an unexpected error occurred; it has been logged")
    return problem_response(err.status, err.type, err.title, err.detail, request)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error class through the problem+json renderer."""
    app.add_exception_handler(DareServeError, render_dare_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
