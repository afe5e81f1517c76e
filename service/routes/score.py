"""`POST /v1/score`: pick the variant, score through the scorer, report how.

The route runs on `ScoreRoute`. FastAPI still builds the OpenAPI entry from `score_candidates`'s
signature (body, header, response model), but a request skips FastAPI's per-request dependency
solving, JSON decoding into dicts and response-model pass, which cost the event loop more than
everything else this module does (about 0.2 ms of ~0.35 ms per request): the body is validated in
one pydantic pass from its bytes, and the answer is written with orjson. Bad input gets exactly the
errors FastAPI gives (`parse_score_body`), and every error takes the app's usual handlers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError

from service.core.ranking import effective_behaviors
from service.errors import MalformedJson, TooManyCandidates, request_id_of
from service.impression_log import ServedImpression
from service.schemas import ScoreRequest, ScoreResponse, problem_responses
from service.scoring import ScoreJob, ScoreOutcome
from service.state import STATE_KEY, AppState
from service.tracing import record_score_spans


def server_timing(outcome: ScoreOutcome, total_s: float) -> str:
    """`Server-Timing` value: the stages of this request in milliseconds; `search` says over how many
    behaviors (the user's newest stored, up to the search depth)."""
    s = outcome.scored
    return (
        f"queue;dur={outcome.queue_s * 1000:.3f}, feature;dur={outcome.feature_s * 1000:.3f}, "
        f'search;dur={s.search_s * 1000:.3f};desc="{outcome.sequence_length} behaviors", '
        f"rank;dur={s.rank_s * 1000:.3f}, total;dur={total_s * 1000:.3f}"
    )


def explain_of(candidates: list[int], outcome: ScoreOutcome) -> list[dict[str, Any]]:
    """Per candidate, its retrieved behaviors (raw ids and times) with their attention weights and
    whether recency kept them, and how many of them the weights effectively spread over."""
    s = outcome.scored
    items = outcome.items[s.positions].tolist()
    times = outcome.timestamps[s.positions].tolist()
    weights = s.attention.tolist()
    effective = effective_behaviors(s.attention).tolist()
    return [
        {
            "item_id": cand,
            "effective_behaviors": effective[c],
            "behaviors": [
                {"item_id": i, "timestamp": t, "attention": a, "recent": j < s.kept}
                for j, (i, t, a) in enumerate(zip(items[c], times[c], weights[c], strict=True))
            ],
        }
        for c, cand in enumerate(candidates)
    ]


def _is_json(content_type: str | None) -> bool:
    # FastAPI's test: application/json or application/*+json, parameters ignored
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_score_body(content_type: str | None, raw: bytes) -> ScoreRequest:
    """The request body as a ScoreRequest; raises what FastAPI's body handling raises for bad input.

    Valid JSON bodies are validated straight from the bytes. Anything that fails that goes the way
    FastAPI goes (stdlib JSON, then validation of the decoded value), so every error, and every
    input the stdlib accepts beyond strict JSON (NaN, a byte-order mark), is treated as before.
    """
    if raw and _is_json(content_type):
        try:
            return ScoreRequest.model_validate_json(raw)
        except ValidationError:
            pass
    body: Any = raw
    if not raw:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    if _is_json(content_type):
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise MalformedJson("the request body could not be parsed as JSON") from exc
    try:
        return ScoreRequest.model_validate(body, from_attributes=True)
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        raise RequestValidationError(errors) from None


class ScoreRoute(APIRoute):
    """An APIRoute whose requests go to `handle_score` (the OpenAPI entry is FastAPI's, unchanged)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return handle_score


async def handle_score(request: Request) -> Response:
    body = parse_score_body(request.headers.get("content-type"), await request.body())
    return await score_candidates(body, request, request.headers.get("x-experiment"))


router = APIRouter(tags=["scoring"], route_class=ScoreRoute)


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses=problem_responses(400, 413, 422, 500, 503),
    summary="Score candidates for a user",
)
async def score_candidates(
    body: ScoreRequest,
    request: Request,
    x_experiment: Annotated[str | None, Header(description="force a variant (A/B arm)")] = None,
) -> Response:
    """Click probabilities of `candidates` for `user_id`, in candidate order."""
    started = time.perf_counter()
    state: AppState = getattr(request.state, STATE_KEY)
    settings = state.settings
    if len(body.candidates) > settings.max_candidates:
        raise TooManyCandidates(
            f"{len(body.candidates)} candidates; at most {settings.max_candidates} per request",
            extensions={"max_candidates": settings.max_candidates},
        )
    model = state.registry.current.choose(body.user_id, x_experiment, settings.ab_salt)
    job = ScoreJob(
        user_id=body.user_id,
        candidates=np.asarray(body.candidates, dtype=np.int64),
        now=int(time.time()) if body.timestamp is None else body.timestamp,
        submitted=started,
    )
    outcome = await state.scorer.score(model, job)
    if state.tracer is not None:
        record_score_spans(state.tracer, model.variant, model.version, job, outcome)
    request_id = request_id_of(request) or ""
    if state.log is not None:
        state.log.offer(
            ServedImpression(
                request_id=request_id,
                ts=job.now,
                served_at=time.time(),
                user_id=body.user_id,
                variant=model.variant,
                model_version=model.version,
                assigned_by="hash" if x_experiment is None else "header",
                fm_embedding=outcome.fm.value,
                candidates=job.candidates,
                scores=outcome.scored.probabilities,
            )
        )
    answer = {
        "request_id": request_id,
        "variant": model.variant,
        "model_version": model.version,
        "scores": outcome.scored.probabilities.tolist(),
        "user": {
            "sequence_length": outcome.sequence_length,
            "fm_embedding": outcome.fm.value,
            "cold_start": outcome.cold_start,
            # only where the variant reads a history, so other variants' answers stay as they were
            **(
                {"fm_history": {"entries": outcome.fm_history.used, "stale": outcome.fm_history.stale}}
                if model.fm_history is not None
                else {}
            ),
        },
        "unknown_items": outcome.unknown_candidates,
        "explain": explain_of(body.candidates, outcome) if body.explain else None,
    }
    headers = {
        "X-Model-Variant": model.variant,
        "X-Model-Version": model.version,
        "Server-Timing": server_timing(outcome, time.perf_counter() - started),
    }
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)
