"""FM embeddings that are stale (other version / past the TTL), and the in-memory store filled at start-up."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from exporters.fm_embed import UserEmbeddings, write_embeddings_file
from exporters.offline import load_torch_model, score_offline
from feature_store.base import UserSequence
from feature_store.factory import open_feature_store
from service.app import create_app
from tests.conftest import ServedData, TinyModels
from tests.service.conftest import SettingsFactory, TestClient

ATOL = 1e-5


async def _write(url: str, ns: str, user: str, items, ts, version: str, vec, written_at: float) -> None:
    store = open_feature_store(url, timeout_s=5.0, namespace=ns)
    try:
        await store.replace_sequences({user: UserSequence(items, ts)})
        await store.write_fm_embeddings(version, [user], vec[None], written_at=written_at)
        await store.set_active_fm_version("fm:1")
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "version,age_s,use_expired,fed",
    [
        ("fm:0", 0, True, False),  # another FM's vector: another embedding space, never fed
        ("fm:1", 10_000, True, True),  # the bundle's FM, only old: fed (the default)
        ("fm:1", 10_000, False, False),  # ... unless DARE_FM_USE_EXPIRED=false
    ],
)
def test_stale_fm_embeddings(
    make_settings: SettingsFactory,
    served: ServedData,
    tiny_models: TinyModels,
    version: str,
    age_s: float,
    use_expired: bool,
    fed: bool,
) -> None:
    source = served.fm_users[3]
    items, ts = served.history(source)
    vec = served.fm_vectors[source]
    ns, user = f"fm-{uuid.uuid4().hex[:8]}", "stale-user"
    asyncio.run(_write(served.redis_url, ns, user, items, ts, version, vec, time.time() - age_s))
    settings = make_settings(redis_namespace=ns, fm_ttl_s=3600.0, fm_use_expired=use_expired)
    cands = served.items[10:30]
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/score",
            json={"user_id": user, "candidates": cands, "timestamp": served.now},
            headers={"X-Experiment": "dare"},
        )
    body = r.json()
    assert body["user"]["fm_embedding"] == "stale"
    path = tiny_models.root / "dare" / "1"
    model, item_ids = load_torch_model(path), np.load(path / "item_ids.npy")
    want = score_offline(model, item_ids, items, ts, np.array(cands), served.now, vec if fed else None)
    np.testing.assert_allclose(body["scores"], want, rtol=0, atol=ATOL)


def test_in_memory_store_filled_at_startup(
    make_settings: SettingsFactory, served: ServedData, tiny_models: TinyModels, tmp_path: Path
) -> None:
    users = served.fm_users
    emb = UserEmbeddings(
        users, np.stack([served.fm_vectors[u] for u in users]), served.fm_version, time.time()
    )
    write_embeddings_file(emb, tmp_path / "fm.parquet")
    settings = make_settings(
        redis_url=None, load_events=tiny_models.data, load_fm_embeddings=tmp_path / "fm.parquet"
    )
    user = users[0]
    cands = served.items[:25]
    with TestClient(create_app(settings)) as c:
        body = c.post(
            "/v1/score",
            json={"user_id": user, "candidates": cands, "timestamp": served.now},
            headers={"X-Experiment": "coupled"},
        ).json()
        assert c.get("/readyz").status_code == 200
    assert body["user"]["fm_embedding"] == "hit"
    assert body["user"]["sequence_length"] == len(served.history(user)[0])
    path = tiny_models.root / "coupled" / "1"
    items, ts = served.history(user)
    want = score_offline(
        load_torch_model(path), np.load(path / "item_ids.npy"), items[-300:], ts[-300:], np.array(cands),
        served.now, served.fm_vectors[user],
    )  # fmt: skip
    np.testing.assert_allclose(body["scores"], want, rtol=0, atol=ATOL)
