"""The inspector page (`GET /`) and its starting points (`GET /inspector/examples`).

The page itself calls the public API (`/v1/models`, `/v1/score` once per variant with explain,
`/v1/users/{id}/sequence`); this router only serves the page and offers users and items to try.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import numpy as np
from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.core.pipeline import ScoringModel
from service.deps import StateDep
from service.routes.docs import STATIC_DIR
from service.schemas import ExampleUser, InspectorExamples

router = APIRouter(include_in_schema=False)

EXAMPLE_USERS = 8
EXAMPLE_ITEMS = 24


@router.get("/")
async def inspector_page() -> FileResponse:
    """The single-page inspector (plain HTML, CSS and JS under `service/static/inspector/`)."""
    return FileResponse(STATIC_DIR / "inspector" / "index.html", media_type="text/html")


def spread(values: list[str] | np.ndarray, n: int) -> list[int]:
    """Indices of `n` entries evenly spaced over `values` (all of them when there are fewer)."""
    if len(values) == 0 or n <= 0:
        return []
    return sorted(set(np.linspace(0, len(values) - 1, num=min(n, len(values))).round().astype(int).tolist()))


@functools.lru_cache(maxsize=4)
def dataset_users(path: Path, mtime_ns: int, n: int) -> tuple[str, ...]:
    """`n` users of an events file spread from the longest history to the shortest.

    Cached per (path, modification time): the file is read once, not on every page load.
    """
    import pandas as pd

    counts = pd.read_parquet(path, columns=["user_id"])["user_id"].astype(str).value_counts()
    ranked = sorted(((str(u), int(c)) for u, c in counts.items()), key=lambda kv: (-kv[1], kv[0]))
    return tuple(ranked[i][0] for i in spread([u for u, _ in ranked], n))


def common_items(models: list[ScoringModel], n: int) -> list[int]:
    """`n` item ids spread over those every model knows (row 0, the unknown row, excluded)."""
    known: np.ndarray | None = None
    for model in models:
        ids = np.unique(model.bundle.item_ids[1:])
        known = ids if known is None else np.intersect1d(known, ids, assume_unique=True)
    if known is None:
        return []
    return [int(known[i]) for i in spread(known, n)]


@router.get("/inspector/examples", response_model=InspectorExamples)
async def inspector_examples(state: StateDep) -> InspectorExamples:
    """Users to try (only when a dataset was loaded at start-up: the store cannot list users)."""
    items = await asyncio.to_thread(common_items, list(state.registry.current.models.values()), EXAMPLE_ITEMS)
    folder = state.settings.load_events
    path = None if folder is None else folder / "events.parquet"
    try:
        mtime_ns = None if path is None else path.stat().st_mtime_ns
    except OSError:  # moved away since start-up: nothing to offer, not an error of the page
        mtime_ns = None
    if path is None or mtime_ns is None:
        return InspectorExamples(users=[], users_source=None, items=items)
    ids = await asyncio.to_thread(dataset_users, path, mtime_ns, EXAMPLE_USERS)
    found = await state.store.read_users(list(ids))
    # Lengths as stored now (events appended since start-up included), longest first.
    users = sorted(
        (ExampleUser(user_id=f.user_id, sequence_length=len(f.sequence)) for f in found),
        key=lambda u: (-u.sequence_length, u.user_id),
    )
    return InspectorExamples(
        users=users, users_source="the dataset loaded at start-up (DARE_LOAD_EVENTS)", items=items
    )
