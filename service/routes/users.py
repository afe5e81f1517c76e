"""`GET /v1/users/{user_id}/sequence`: read back what the feature store holds for a user."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.convertors import Convertor, register_url_convertor

from feature_store.base import MAX_LEN_LIMIT
from service.deps import StateDep
from service.schemas import Event, UserSequence, problem_responses


class AnyText(Convertor[str]):
    """Starlette's `path` convertor with newlines too: a stored user id may hold any character."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", AnyText())

router = APIRouter(tags=["users"])


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
    limit: Annotated[int, Query(ge=1, le=MAX_LEN_LIMIT, description="newest behaviors to return")] = 1000,
) -> UserSequence:
    """The user's newest `limit` behaviors, oldest first (an unknown user has none)."""
    # The whole stored sequence (at most the store's cap), so the total length is exact.
    sequence = await state.store.read_sequence(user_id)
    items = sequence.items[-limit:].tolist()
    times = sequence.timestamps[-limit:].tolist()
    return UserSequence(
        user_id=user_id,
        sequence_length=len(sequence),
        events=[Event(item_id=i, timestamp=t) for i, t in zip(items, times, strict=True)],
    )
