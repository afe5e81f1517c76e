"""`dare-serve demo`: the whole system on one machine, from nothing to a serving A/B test.

Synthetic data -> train `fm`, then `dare` and `coupled` with FM embeddings as input -> FM embeddings
for every user -> sequences and embeddings into the feature store (in memory, or Redis with
--redis-url) -> serve both variants 50/50. Every step keeps its output in the work folder and is
skipped on the next run when its output is already there, so a re-run starts serving in seconds.
`--smoke` sends real requests to the running server and checks every answer.

The generated data keeps its fixed clock (a year from 2020-09-13), so that a seed names one dataset
and the bundles trained on it. What the server is given is that history moved forward in one block,
its newest behavior at start-up (`replay_now`): requests, the inspector and appended events use
today's clock, and behavior ages (the time buckets of both stages) come out as a live system's would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx

from service.readiness import wait_ready

if TYPE_CHECKING:
    from service.settings import Settings

# keyword arguments of SynthConfig and TrainConfig (tests shrink them)
DEMO_DATA: dict[str, Any] = {"users": 800, "items": 5000, "categories": 40, "max_seq_len": 1000, "seed": 7}
DEMO_TRAIN: dict[str, Any] = {"epochs": 3, "seed": 0, "max_seq_len": 1000, "patience": 1}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _bundle(root: Path, variant: str) -> Path | None:
    from exporters.bundle import BundleError, list_versions, load_bundle

    for path in reversed(list_versions(root / variant)):
        with contextlib.suppress(BundleError):
            load_bundle(path)
            return path
    return None


@dataclass
class DemoBuild:
    """What the demo built (or found) in its work folder."""

    data: Path
    bundles: Path
    fm: Path
    fm_embeddings: Path
    timings: dict[str, float] = field(default_factory=dict)


def build(workdir: Path, progress: bool = True) -> DemoBuild:
    """Create whatever is missing: dataset, fm / dare / coupled bundles, FM embeddings file."""
    import torch

    from exporters.bundle import load_bundle
    from exporters.fm_embed import compute_user_embeddings, write_embeddings_file
    from exporters.synth import SynthConfig, write_synth
    from exporters.train import TrainConfig, train

    torch.set_num_threads(2)
    workdir.mkdir(parents=True, exist_ok=True)
    data, bundles, fm_root = workdir / "data", workdir / "bundles", workdir / "fm"
    timings: dict[str, float] = {}

    meta = data / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("config", {}).get("seed") != DEMO_DATA["seed"]:
        t0 = time.time()
        _log(f"generating synthetic data {DEMO_DATA}")
        write_synth(data, SynthConfig(**DEMO_DATA))
        timings["data"] = time.time() - t0

    def trained(root: Path, variant: Literal["fm", "dare", "coupled"], **kw: Any) -> Path:
        found = _bundle(root, variant)
        if found is not None:
            return found
        t0 = time.time()
        _log(f"training {variant}")
        r = train(TrainConfig(data=data, model=variant, out=root, progress=progress, **DEMO_TRAIN, **kw))
        _log(f"{variant}: test AUC {r['auc']:.4f}, GAUC {r['gauc']:.4f} in {r['train_seconds']:.0f}s")
        timings[f"train_{variant}"] = time.time() - t0
        return Path(r["bundle"])

    fm = trained(fm_root, "fm")
    trained(bundles, "dare", fm_bundle=fm)
    trained(bundles, "coupled", fm_bundle=fm)

    emb_file = workdir / f"fm_embeddings_{fm.parent.name}_{fm.name}.parquet"
    if not emb_file.is_file():
        import pandas as pd

        t0 = time.time()
        events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
        write_embeddings_file(compute_user_embeddings(load_bundle(fm), events, progress=progress), emb_file)
        timings["fm_embed"] = time.time() - t0
    return DemoBuild(data, bundles, fm, emb_file, timings)


def replay_now(data: Path, out: Path, now: int) -> Path:
    """`data`'s events moved forward in one block so that the newest lies at `now`, written as
    `out/events.parquet`; returns `out`, the folder to serve from."""
    import pandas as pd

    events = pd.read_parquet(data / "events.parquet")
    # One shift for every user keeps each gap, so the ages a request sees are those the bundles and
    # the FM embeddings (computed as of the data's end) were built with, not years past all of them.
    events["timestamp"] += now - int(events["timestamp"].max())
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "events.parquet.partial"
    events.to_parquet(partial, index=False)
    partial.replace(out / "events.parquet")
    return out


def fill_redis(b: DemoBuild, settings: Settings) -> None:
    """Sequences and FM embeddings into the Redis of `settings`, under the namespace and cap the
    server reads with (replaces what is there: re-runs stay idempotent)."""
    import asyncio

    from feature_store.factory import open_feature_store
    from service.app import load_data_files

    async def load() -> None:
        store = open_feature_store(
            settings.redis_dsn,
            cluster=settings.redis_cluster,
            timeout_s=30.0,
            max_len=settings.store_max_events,
            namespace=settings.redis_namespace,
        )
        try:
            for line in await load_data_files(store, b.data, b.fm_embeddings):
                _log(f"Redis: {line}")
        finally:
            await store.aclose()

    asyncio.run(load())


# -- the smoke test ---------------------------------------------------------------------------------


@dataclass
class Smoke:
    """Scripted requests against a running server; each check prints what it saw."""

    base: str
    data: Path
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def run(self) -> bool:
        import pandas as pd

        events = pd.read_parquet(self.data / "events.parquet", columns=["user_id", "item_id"])
        users = sorted(events["user_id"].unique())
        items = sorted(events["item_id"].unique())
        cands = [int(i) for i in items[:: max(1, len(items) // 20)][:20]]
        lengths = events["user_id"].value_counts()
        # a user with a long history that is still far below the store's cap (the service reads
        # all it keeps), so appended events show in the sequence length the service reports
        user = str(lengths[lengths < 500].index[0])
        with httpx.Client(base_url=self.base, timeout=30) as c:
            for variant in ("dare", "coupled"):
                r = c.post(
                    "/v1/score",
                    json={"user_id": user, "candidates": cands},
                    headers={"X-Experiment": variant, "X-Request-ID": f"smoke-{variant}"},
                )
                body = r.json() if r.status_code == 200 else {}
                scores = body.get("scores", [])
                self.check(
                    r.status_code == 200
                    and len(scores) == len(cands)
                    and all(0 < s < 1 for s in scores)
                    and r.headers.get("x-model-variant") == variant
                    and r.headers.get("x-request-id") == f"smoke-{variant}"
                    and body.get("user", {}).get("fm_embedding") == "hit"
                    and body.get("user", {}).get("sequence_length", 0) > 0,
                    f"X-Experiment: {variant} -> {r.status_code}, {len(scores)} scores in (0,1), "
                    f"variant header {r.headers.get('x-model-variant')}, FM "
                    f"{body.get('user', {}).get('fm_embedding')}, "
                    f"{body.get('user', {}).get('sequence_length')} behaviors, "
                    f"Server-Timing '{r.headers.get('server-timing')}'",
                )
            arms: dict[str, str] = {}
            stable = True
            for u in users[:60]:
                seen = {
                    c.post("/v1/score", json={"user_id": str(u), "candidates": cands[:3]}).headers.get(
                        "x-model-variant"
                    )
                    for _ in range(2)
                }
                stable &= len(seen) == 1
                arms[str(u)] = seen.pop()
            counts = {v: list(arms.values()).count(v) for v in sorted(set(arms.values()))}
            self.check(
                stable and set(counts) == {"dare", "coupled"},
                f"hash split without header: every user kept one arm, arms used {counts}",
            )
            r = c.post(
                "/v1/score",
                json={"user_id": user, "candidates": cands[:3], "explain": True},
                headers={"X-Experiment": "dare"},
            )
            ex = r.json().get("explain") if r.status_code == 200 else None
            beh = ex[0].get("behaviors", []) if ex else []
            weights = [b.get("attention", 0) for b in beh]
            self.check(
                ex is not None and len(ex) == 3 and len(beh) > 0 and abs(sum(weights) - 1) < 1e-3,
                f"explain: {len(ex or [])} candidates, first has {len(beh)} behaviors, "
                f"attention sums to {sum(weights):.4f}",
            )
            # A new user (fewer behaviors than K): every appended event enters stage 2's attention,
            # so the next score must move. A long history only moves it if the events make top-K.
            target, fresh = cands[0], f"smoke-{time.time_ns()}"
            body = {"user_id": fresh, "candidates": [target], "timestamp": int(time.time()) + 10}
            before = c.post("/v1/score", json=body, headers={"X-Experiment": "dare"}).json()
            now = int(time.time())
            r = c.post(
                "/v1/events",
                json={
                    "user_id": fresh,
                    "events": [{"item_id": target, "timestamp": now + i} for i in range(5)],
                },
            )
            after = c.post("/v1/score", json=body, headers={"X-Experiment": "dare"}).json()
            self.check(
                r.status_code in (200, 201, 202)
                and after["user"]["sequence_length"] == before["user"]["sequence_length"] + 5
                and after["scores"][0] != before["scores"][0],
                f"events: appended 5 views of item {target} for {fresh} -> {r.status_code}; sequence "
                f"{before['user']['sequence_length']} -> {after['user']['sequence_length']}, score "
                f"{before['scores'][0]:.4f} -> {after['scores'][0]:.4f}",
            )
            r = c.post("/v1/score", json={"user_id": user, "candidates": [-5]})
            self.check(
                r.status_code == 422
                and r.headers.get("content-type", "").startswith("application/problem+json"),
                f"bad request (negative item id) -> {r.status_code} {r.headers.get('content-type')}",
            )
            r = c.post(
                "/v1/score", json={"user_id": user, "candidates": cands}, headers={"X-Experiment": "nope"}
            )
            self.check(
                r.status_code == 400 and "dare" in r.text,
                f"unknown variant -> {r.status_code}, lists the valid ones",
            )
            r = c.post("/v1/score", json={"user_id": "someone-new", "candidates": cands[:4]})
            b = r.json() if r.status_code == 200 else {}
            self.check(
                r.status_code == 200
                and b.get("user", {}).get("sequence_length") == 0
                and b.get("user", {}).get("fm_embedding") == "miss",
                f"cold-start user -> {r.status_code}, {b.get('user')}",
            )
        return not self.failures


# -- serving ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _server_in_thread(app: Any, host: str, port: int) -> Iterator[Callable[[], bool]]:
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="on", loop="uvloop", http="httptools"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield thread.is_alive
    finally:
        server.should_exit = True
        thread.join(30)


def banner(base: str, user: str, cands: list[int]) -> str:
    body = json.dumps({"user_id": user, "candidates": cands})
    return "\n".join(
        [
            f"dare-serve is up at {base}  (API docs: {base}/docs, metrics: {base}/metrics)",
            f"Inspector: {base}/?user={quote(user)}&candidates={','.join(map(str, cands))}",
            "Try:",
            f"  curl -s {base}/v1/score -H 'Content-Type: application/json' -d '{body}'",
            f"  curl -s {base}/v1/score -H 'Content-Type: application/json' -H 'X-Experiment: coupled' "
            f"-d '{json.dumps({'user_id': user, 'candidates': cands[:3], 'explain': True})}'",
            f"  curl -s {base}/v1/models",
        ]
    )


def prepare_serving(built: DemoBuild, workdir: Path, redis_url: str | None) -> tuple[DemoBuild, Settings]:
    """The build with its events replayed up to now (`replay_now`), and the server's settings; with
    Redis, the store filled."""
    from pydantic import RedisDsn

    from service.settings import Settings

    b = dataclasses.replace(built, data=replay_now(built.data, workdir / "replay", int(time.time())))
    # Every other setting (namespace, cluster, store cap) from DARE_* variables, as `serve` takes
    # them; the store is filled with the same settings the server reads with.
    settings = Settings(
        bundles=b.bundles,
        redis_url=RedisDsn(redis_url) if redis_url else None,
        variant_weights={"dare": 0.5, "coupled": 0.5},
        load_events=None if redis_url else b.data,
        load_fm_embeddings=None if redis_url else b.fm_embeddings,
    )
    if settings.redis_url is not None:
        fill_redis(b, settings)
    return b, settings


def run_demo(workdir: Path, host: str, port: int, redis_url: str | None, smoke: bool) -> int:
    """Build what is missing, fill the feature store, serve; with smoke, check and exit."""
    import pandas as pd

    from service.app import create_app

    t0 = time.time()
    b, settings = prepare_serving(build(workdir), workdir, redis_url)
    app = create_app(settings)
    base = f"http://{host}:{port}"
    events = pd.read_parquet(b.data / "events.parquet", columns=["user_id", "item_id"])
    user = str(events["user_id"].iloc[0])
    cands = [int(i) for i in events["item_id"].drop_duplicates().head(5)]
    if not smoke:
        import uvicorn

        _log(f"ready to serve after {time.time() - t0:.0f}s")
        print(banner(base, user, cands), flush=True)
        uvicorn.run(
            app,
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            log_level="info",
            timeout_graceful_shutdown=10,
        )
        return 0
    with _server_in_thread(app, host, port) as alive:
        if not wait_ready(base, alive=alive):
            raise RuntimeError(f"server at {base} did not get ready")
        print(banner(base, user, cands), flush=True)
        print(f"smoke test against {base} (built/loaded in {time.time() - t0:.0f}s):", flush=True)
        ok = Smoke(base, b.data).run()
    print(f"smoke {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f}s", flush=True)
    return 0 if ok else 1
