"""`POST /v1/score`: pick the variant, score through the scorer, report how."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Response

from service.deps import RequestIdDep, StateDep
from service.errors import TooManyCandidates
from service.schemas import (
    ExplainedBehavior,
    ExplainedCandidate,
    ScoreRequest,
    ScoreResponse,
    UserSummary,
    problem_responses,
)
from service.scoring import ScoreJob, ScoreOutcome

router = APIRouter(tags=["scoring"])


def server_timing(outcome: ScoreOutcome, total_s: float) -> str:
    """`Server-Timing` value: the stages of this request in milliseconds."""
    s = outcome.scored
    parts = [
        ("queue", outcome.queue_s),
        ("feature", outcome.feature_s),
        ("search", s.search_s),
        ("rank", s.rank_s),
        ("total", total_s),
    ]
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)


def explain_of(candidates: list[int], outcome: ScoreOutcome) -> list[ExplainedCandidate]:
    """Per candidate, its retrieved behaviors (raw ids and times) with their attention weights."""
    s = outcome.scored
    items = outcome.items[s.positions].tolist()
    times = outcome.timestamps[s.positions].tolist()
    weights = s.attention.tolist()
    return [
        ExplainedCandidate(
            item_id=cand,
            behaviors=[
                ExplainedBehavior(item_id=i, timestamp=t, attention=a)
                for i, t, a in zip(items[c], times[c], weights[c], strict=True)
            ],
        )
        for c, cand in enumerate(candidates)
    ]


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses=problem_responses(400, 413, 422, 500, 503),
    summary="Score candidates for a user",
)
async def score_candidates(
    body: ScoreRequest,
    response: Response,
    state: StateDep,
    request_id: RequestIdDep,
    x_experiment: Annotated[str | None, Header(description="force a variant (A/B arm)")] = None,
) -> ScoreResponse:
    """Click probabilities of `candidates` for `user_id`, in candidate order."""
    started = time.perf_counter()
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
        explain=body.explain,
        submitted=started,
    )
    outcome = await state.scorer.score(model, job)
    response.headers["X-Model-Variant"] = model.variant
    response.headers["X-Model-Version"] = model.version
    response.headers["Server-Timing"] = server_timing(outcome, time.perf_counter() - started)
    return ScoreResponse(
        request_id=request_id,
        variant=model.variant,
        model_version=model.version,
        scores=outcome.scored.probabilities.tolist(),
        user=UserSummary(
            sequence_length=outcome.sequence_length,
            fm_embedding=outcome.fm.value,
            cold_start=outcome.cold_start,
        ),
        unknown_items=outcome.unknown_candidates,
        explain=explain_of(body.candidates, outcome) if body.explain else None,
    )
