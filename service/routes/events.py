"""`POST /v1/events`: append behaviors to a user's sequence in the feature store (and to the event
log, where outcomes of the impression log come from)."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter

from service.deps import StateDep, WriterDep
from service.impression_log import LoggedEvents
from service.schemas import EventsRequest, EventsResponse, problem_responses

router = APIRouter(tags=["events"])


@router.post(
    "/v1/events",
    response_model=EventsResponse,
    responses=problem_responses(400, 401, 403, 413, 422, 500, 503),
    summary="Append behaviors",
)
async def append_events(body: EventsRequest, state: StateDep, _: WriterDep) -> EventsResponse:
    """Append behaviors atomically; the next score for this user sees them."""
    items = np.fromiter((e.item_id for e in body.events), dtype=np.int64, count=len(body.events))
    times = np.fromiter((e.timestamp for e in body.events), dtype=np.int64, count=len(body.events))
    # A store error becomes a 503 (`app.feature_store_failed`): a timed-out append has an unknown
    # outcome (applied once or not at all), and the 503 says retry.
    length = await state.store.append_events(body.user_id, items, times)
    state.metrics.events_appended.inc(len(body.events))
    if state.log is not None:  # only acknowledged appends: a 503 above may not have been applied
        state.log.offer(LoggedEvents(body.user_id, items, times, body.type, time.time()))
    return EventsResponse(user_id=body.user_id, appended=len(body.events), sequence_length=length)
