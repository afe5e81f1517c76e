"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feature_store.errors import FeatureStoreError
from service.deps import StateDep
from service.errors import NotReady
from service.schemas import Health, Readiness, problem_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """200 while the process serves HTTP at all."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503), summary="Readiness")
async def readyz(state: StateDep) -> Readiness:
    """200 when the bundles are loaded and the feature store answers in time, else 503."""
    missing = state.registry.missing_variants()
    store = "ok"
    try:
        # ping is bounded by the store's own timeout; the outer one guards a misbehaving store
        async with asyncio.timeout(2 * state.settings.feature_timeout_s + 0.1):
            await state.store.ping()
    except (FeatureStoreError, TimeoutError) as exc:
        store = f"unavailable: {type(exc).__name__}"
    serving = {v: m.version for v, m in state.registry.current.models.items()}
    if missing or store != "ok":
        problems = ([f"variants not loaded: {', '.join(missing)}"] if missing else []) + (
            [f"feature store {store}"] if store != "ok" else []
        )
        raise NotReady(
            "; ".join(problems),
            headers={"Retry-After": str(state.settings.retry_after_s)},
            extensions={"serving": serving, "feature_store": store},
        )
    return Readiness(status="ready", serving=serving, feature_store=store)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
