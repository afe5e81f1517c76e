"""`POST /admin/reload`: load new bundle versions now (bearer admin token)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import AdminDep, StateDep
from service.errors import BundleRejected
from service.schemas import RefusedBundle, ReloadResponse, problem_responses

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses=problem_responses(401, 403, 404, 409),
    summary="Reload bundles",
)
async def reload_bundles(state: StateDep, _: AdminDep) -> ReloadResponse:
    """Load the newest valid version of each variant and swap atomically.

    409 when a version newer than the serving one was refused (the previous one keeps serving).
    """
    report = await state.registry.reload()
    body = ReloadResponse(
        changed=report.changed,
        loaded=[{"variant": v, "version": ver} for v, ver in report.loaded],
        refused=[
            RefusedBundle(variant=r.variant, version=r.version, reason=r.reason) for r in report.refused
        ],
        serving=report.serving,
    )
    if report.refused:
        raise BundleRejected(
            "; ".join(f"{r.variant}/{r.version}: {r.reason}" for r in report.refused),
            extensions=body.model_dump(),
        )
    return body
