"""`GET /admin/log/{stream}`: pages of the impression or event log (bearer admin token).

The way out of a log kept in process memory (no Redis), and a way to read a Redis one without
Redis access; `dare-serve log export --server URL` pages through it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Response

from feature_store.log_store import MAX_PAGE, parse_id
from service.deps import AdminDep, StateDep
from service.errors import EndpointDisabled, InvalidRequest
from service.schemas import LogPage, problem_responses

router = APIRouter(tags=["admin"])


@router.get(
    "/admin/log/{stream}",
    response_model=LogPage,
    responses=problem_responses(401, 403, 404, 422, 503),
    summary="Read the impression or event log",
)
async def read_log(
    stream: Literal["impressions", "events"],
    state: StateDep,
    _: AdminDep,
    after: Annotated[
        str | None, Query(description="stream id to continue after (the last page's `next`)")
    ] = None,
    since_ms: Annotated[int | None, Query(ge=0, description="first entry time, ms since the epoch")] = None,
    until_ms: Annotated[int | None, Query(ge=0, description="last entry time, ms since the epoch")] = None,
    count: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 10_000,
) -> Response:
    """Up to `count` entries oldest first; `next` is set while more may follow."""
    if state.log is None:
        raise EndpointDisabled("the impression log is off (DARE_IMPRESSION_LOG)")
    if after is not None:
        try:
            parse_id(after)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    entries = await state.log.store.read(
        stream, after=after, since_ms=since_ms, until_ms=until_ms, count=count
    )
    page = {
        "stream": stream,
        # The stored bytes are already JSON: passed through, not decoded and encoded again.
        "entries": [{"id": e.id, "record": orjson.Fragment(e.data)} for e in entries],
        "next": entries[-1].id if len(entries) == count else None,
    }
    return Response(orjson.dumps(page), media_type="application/json")
