"""`GET /v1/models`: what serves, where, with which traffic weights."""

from __future__ import annotations

from fastapi import APIRouter

from service.core.pipeline import model_summary
from service.deps import StateDep
from service.schemas import ModelInfo, ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse, summary="Serving models")
async def list_models(state: StateDep) -> ModelsResponse:
    """Variants, versions, dims, weights, execution providers and the FAISS device."""
    current = state.registry.current
    s = state.settings
    return ModelsResponse(
        variants=[
            ModelInfo(
                **model_summary(model),
                search_depth=s.search_depth_of(variant),
                weight=current.weights.get(variant, 0.0),
            )
            for variant, model in sorted(current.models.items())
        ],
        weights=dict(current.weights),
        device=state.device,
        batching={
            "enabled": s.batch_enabled,
            "max_size": s.batch_max_size,
            "max_wait_ms": s.batch_max_wait_ms,
            "max_concurrency": s.batch_max_concurrency,
        },
        store_max_events=s.store_max_events,
    )
