"""`GET /v1/users/{user_id}/sequence`: read back what the feature store holds for a user.

The answer is written with orjson from plain dicts, as `POST /v1/score` writes its own: a sequence
runs up to the store's cap (100,000 behaviors where configured so), and one pydantic `Event` per
behavior plus FastAPI's response-model pass cost several times the serialisation itself.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query, Response
from starlette.convertors import Convertor, register_url_convertor

from feature_store.base import DEFAULT_MAX_LEN, MAX_LEN_LIMIT
from feature_store.base import UserSequence as StoredSequence
from service.deps import StateDep
from service.schemas import UserSequence, problem_responses

# Behaviors serialised on the event loop (about 0.2 ms per 1,000); a longer answer is written in a
# worker thread, so that one long read does not hold up every other request for tens of ms.
INLINE_EVENTS = 2_000


class AnyText(Convertor[str]):
    """Starlette's `path` convertor with newlines too: a stored user id may hold any character."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", AnyText())

router = APIRouter(tags=["users"])


def sequence_json(user_id: str, sequence: StoredSequence, limit: int) -> bytes:
    """The `UserSequence` body of the newest `limit` behaviors of `sequence`, as JSON bytes."""
    items = sequence.items[-limit:].tolist()
    times = sequence.timestamps[-limit:].tolist()
    return orjson.dumps(
        {
            "user_id": user_id,
            "sequence_length": len(sequence),
            "events": [{"item_id": i, "timestamp": t} for i, t in zip(items, times, strict=True)],
        }
    )


@router.get(
    # Any text, so that user ids holding '/' or a newline (sent as %2F, %0A) reach the handler.
    "/v1/users/{user_id:anytext}/sequence",
    response_model=UserSequence,
    responses=problem_responses(422, 500, 503),
    summary="A user's behavior sequence",
)
async def user_sequence(
    user_id: Annotated[str, Path(min_length=1, max_length=256, description="user id")],
    state: StateDep,
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_LEN_LIMIT,
            description="newest behaviors to return; no more come back than the store keeps per "
            f"user (DARE_STORE_MAX_EVENTS, default {DEFAULT_MAX_LEN:,}): a larger limit returns them "
            "all. The maximum is the largest cap a store accepts",
        ),
    ] = 1000,
) -> Response:
    """The user's newest `limit` behaviors, oldest first (an unknown user has none)."""
    # The whole stored sequence (at most the store's cap), so the total length is exact.
    sequence = await state.store.read_sequence(user_id)
    if min(limit, len(sequence)) <= INLINE_EVENTS:
        body = sequence_json(user_id, sequence, limit)
    else:
        body = await asyncio.to_thread(sequence_json, user_id, sequence, limit)
    return Response(body, media_type="application/json")
