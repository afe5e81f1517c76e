"""Typed dependency aliases: the state, the request id and bearer-token guards."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import SecretStr

from service.errors import EndpointDisabled, Forbidden, Unauthorized, request_id_of
from service.state import STATE_KEY, AppState

# Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in
# a worker thread, a hand-off per request that costs more than the attribute read itself.


async def get_state(request: Request) -> AppState:
    """The AppState built by the lifespan."""
    return getattr(request.state, STATE_KEY)


async def get_request_id(request: Request) -> str:
    """The id the middleware gave this request (echoed X-Request-ID or a new one)."""
    return request_id_of(request) or ""


StateDep = Annotated[AppState, Depends(get_state)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
AuthorizationHeader = Annotated[str | None, Header(include_in_schema=False)]


def check_bearer(authorization: str | None, token: SecretStr, realm: str) -> None:
    """401 without a well-formed `Bearer <token>` header, 403 for the wrong token."""
    if not authorization:
        raise Unauthorized(f"{realm} needs an 'Authorization: Bearer <token>' header")
    scheme, _, presented = authorization.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    # Constant-time comparison of bytes, so response timing does not leak the token's prefix.
    if not hmac.compare_digest(presented.encode("utf-8"), token.get_secret_value().encode("utf-8")):
        raise Forbidden(f"the token is not valid for {realm}")


async def require_admin(state: StateDep, authorization: AuthorizationHeader = None) -> None:
    """Admin endpoints: 404 when no admin token is configured, else a bearer token check."""
    token = state.settings.admin_token
    if token is None:
        raise EndpointDisabled("admin endpoints are disabled (DARE_ADMIN_TOKEN is not set)")
    check_bearer(authorization, token, "admin endpoints")


async def require_writer(state: StateDep, authorization: AuthorizationHeader = None) -> None:
    """`POST /v1/events`: open when no write token is configured, else a bearer token check."""
    token = state.settings.write_token
    if token is not None:
        check_bearer(authorization, token, "event writes")


AdminDep = Annotated[None, Depends(require_admin)]
WriterDep = Annotated[None, Depends(require_writer)]
