"""Dynamic batching: batched and unbatched scores are identical; the batcher fans out correctly."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.app import create_app
from service.batching import Batcher
from service.errors import ShuttingDown
from tests.conftest import ServedData
from tests.service.conftest import SettingsFactory, TestClient

N_REQUESTS = 24


def _requests(served: ServedData) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(N_REQUESTS):
        user = served.users[i * 5 % len(served.users)] if i % 6 else f"cold-{i}"
        n = int(rng.integers(1, 80))  # different candidate counts: the batch pads to the largest
        cands = rng.choice(served.items, n).tolist()
        out.append({"user_id": user, "candidates": cands, "timestamp": served.now, "explain": i % 4 == 0})
    return out


def _fire(client: TestClient, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def one(i_body: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        i, body = i_body
        variant = "dare" if i % 3 else "coupled"
        r = client.post("/v1/score", json=body, headers={"X-Experiment": variant})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(N_REQUESTS) as pool:
        return list(pool.map(one, enumerate(bodies)))


def _batch_stats(client: TestClient) -> tuple[float, float]:
    text = client.get("/metrics").text
    count = sum(float(v) for v in re.findall(r"^dare_batch_size_count\{[^}]*\} (\S+)$", text, re.M))
    total = sum(float(v) for v in re.findall(r"^dare_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
    return count, total


def test_batched_and_unbatched_scores_are_identical(
    make_settings: SettingsFactory, served: ServedData
) -> None:
    bodies = _requests(served)
    batched_settings = make_settings(batch_enabled=True, batch_max_wait_ms=25.0, batch_max_size=64)
    with TestClient(create_app(batched_settings)) as c:
        on_cuda = c.get("/v1/models").json()["device"]["execution_providers"][0] == "CUDAExecutionProvider"
        batched = _fire(c, bodies)
        batches, requests = _batch_stats(c)
    with TestClient(create_app(make_settings(batch_enabled=False))) as c:
        single = _fire(c, bodies)
        single_batches, _ = _batch_stats(c)
    assert requests == N_REQUESTS and batches < N_REQUESTS, "concurrent requests were coalesced"
    assert single_batches == N_REQUESTS
    for a, b in zip(batched, single, strict=True):
        assert a["user"] == b["user"]
        if not on_cuda:
            # bit-identical, not merely close: padding never leaks into a request's scores
            assert a["scores"] == b["scores"] and a["explain"] == b["explain"]
            continue
        # cuBLAS picks its GEMM kernel by batch shape, so on CUDA only the last bits may differ
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=1e-6)
        for x, y in zip(a["explain"], b["explain"], strict=True):
            assert [e["item_id"] for e in x["behaviors"]] == [e["item_id"] for e in y["behaviors"]]
            att_x, att_y = ([e["attention"] for e in z["behaviors"]] for z in (x, y))
            np.testing.assert_allclose(att_x, att_y, rtol=0, atol=1e-6)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_batcher_groups_by_key_and_fans_out_results() -> None:
    calls: list[tuple[str, list[int]]] = []

    async def process(key: str, items: list[int]) -> list[int | BaseException]:
        calls.append((key, items))
        await asyncio.sleep(0)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def main() -> list[Any]:
        b: Batcher[str, int, int] = Batcher(process, max_size=8, max_wait_s=0.02, max_concurrency=2)
        b.start()
        jobs = [b.submit("a" if i % 2 else "b", i) for i in range(6)] + [b.submit("a", -1)]
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.aclose()
        return out

    out = _run(main())
    assert out[:6] == [0, 10, 20, 30, 40, 50]
    assert isinstance(out[6], ValueError) and str(out[6]) == "bad -1"
    assert sorted(k for k, _ in calls) == ["a", "b"], "one call per key"


def test_batcher_respects_max_size_and_survives_failures() -> None:
    sizes: list[int] = []

    async def process(key: str, items: list[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        if 13 in items:
            raise RuntimeError("the whole batch failed")
        return list(items)

    async def main() -> list[Any]:
        b: Batcher[str, int, int] = Batcher(process, max_size=4, max_wait_s=0.01, max_concurrency=1)
        b.start()
        first = await asyncio.gather(*(b.submit("k", i) for i in range(10, 20)), return_exceptions=True)
        after = await b.submit("k", 99)  # the consumer lives on after a failed batch
        await b.aclose()
        with pytest.raises(ShuttingDown):
            await b.submit("k", 1)
        return [*first, after]

    out = _run(main())
    assert max(sizes) <= 4
    failed = [x for x in out if isinstance(x, RuntimeError)]
    assert 1 <= len(failed) <= 4 and out[-1] == 99
    assert all(x == i + 10 for i, x in enumerate(out[:10]) if not isinstance(x, Exception))


def test_batcher_waits_only_while_busy() -> None:
    sizes: list[int] = []

    async def process(key: str, items: list[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        await asyncio.sleep(0.2 if key == "slow" else 0)
        return list(items)

    async def main() -> tuple[float, float]:
        b: Batcher[str, int, int] = Batcher(process, max_size=100, max_wait_s=0.3, max_concurrency=2)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.submit("k", 1)  # idle: sent at once, not after max_wait
        idle = loop.time() - t0
        slow = asyncio.ensure_future(b.submit("slow", 0))
        await asyncio.sleep(0.01)
        t0 = loop.time()
        # busy: the first waits for company (up to max_wait), the second joins its batch
        await asyncio.gather(b.submit("k", 2), asyncio.sleep(0.05), b.submit("k", 3))
        busy = loop.time() - t0
        await slow
        await b.aclose()
        return idle, busy

    idle, busy = _run(main())
    assert idle < 0.1 and 0.25 < busy < 1.0
    assert sizes[-1] == 2 or sizes[-2] == 2
