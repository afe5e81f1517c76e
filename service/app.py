"""The FastAPI app: `create_app(settings)` and the lifespan that builds the one frozen AppState.

Everything heavy (bundles with their ORT sessions and FAISS indexes, the feature store, the
compute threads, the batcher, the directory watch) is built in the lifespan and torn down through
one AsyncExitStack in reverse order; nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from opentelemetry.sdk.trace import TracerProvider
from starlette.responses import Response

from feature_store.base import FeatureStore
from feature_store.errors import FeatureStoreError
from feature_store.factory import open_feature_store, open_log_store
from service.batching import Batcher
from service.core.runtime import (
    DeviceUnavailable,
    choose_providers,
    faiss_gpus,
    preload_cuda_libraries,
    single_threaded_numerics,
)
from service.core.search import Stage1Engine, gpu_available
from service.errors import install_error_handlers, render_dare_error, store_error, store_error_kind
from service.impression_log import LogWriter
from service.loop_lag import LoopLagMonitor
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.registry import ModelRegistry, require_models
from service.routes import admin, docs, events, health, inspector, log, models, score, users
from service.schemas import DeviceInfo
from service.scoring import BatchScorer, ScoreBatcher, Scorer
from service.settings import Settings
from service.state import STATE_KEY, AppState
from service.tracing import TraceparentMiddleware, Tracing, telemetry_off

logger = logging.getLogger("dare.service")

# Bulk loads at start-up get their own generous timeout, not the per-request budget.
_LOAD_TIMEOUT_S = 60.0


async def load_data_files(store: FeatureStore, data: Path | None, fm_embeddings: Path | None) -> list[str]:
    """`data/events.parquet` (the sequences of its users replaced) and an FM embeddings file (written,
    its version made the active one) into `store` (`serve --data`, the demo); what was loaded."""
    done = []
    if data is not None:
        import pandas as pd

        from feature_store.ingest import ingest_events

        path = Path(data) / "events.parquet"
        frame = await asyncio.to_thread(pd.read_parquet, path, columns=["user_id", "item_id", "timestamp"])
        stats = await ingest_events(store, frame, progress=False)
        done.append(f"loaded {stats.events} events of {stats.users} users from {path}")
    if fm_embeddings is not None:
        from exporters.fm_embed import read_embeddings_file

        emb = await asyncio.to_thread(read_embeddings_file, Path(fm_embeddings))
        await store.write_fm_embeddings(emb.fm_version, emb.user_ids, emb.vectors, written_at=emb.written_at)
        await store.set_active_fm_version(emb.fm_version)
        done.append(f"loaded {len(emb.user_ids)} FM embeddings, active FM version {emb.fm_version}")
    return done


async def load_startup_data(settings: Settings, store: FeatureStore) -> None:
    """`serve --data` / `--fm-embeddings`: fill the feature store before serving."""
    if settings.load_events is None and settings.load_fm_embeddings is None:
        return
    loader = store
    if settings.redis_dsn is not None:
        loader = open_feature_store(
            settings.redis_dsn,
            cluster=settings.redis_cluster,
            timeout_s=_LOAD_TIMEOUT_S,
            namespace=settings.redis_namespace,
            max_len=store.max_len,
        )
    try:
        for line in await load_data_files(loader, settings.load_events, settings.load_fm_embeddings):
            logger.info("%s", line)
    finally:
        if loader is not store:
            await loader.aclose()


def device_info(
    settings: Settings, providers: list[str], available: list[str], engine: Stage1Engine
) -> DeviceInfo:
    return DeviceInfo(
        setting=settings.device,
        execution_providers=providers,
        available_providers=available,
        faiss_gpus=faiss_gpus(),
        faiss_device=engine.faiss_device,
    )


def stage1_engine(settings: Settings) -> Stage1Engine:
    """GPU FAISS when one is there and allowed, else the CPU engine on `search_threads` threads."""
    if settings.device != "cpu" and gpu_available():
        return Stage1Engine(device="cuda")
    if settings.device == "cuda":
        raise DeviceUnavailable("DARE_DEVICE=cuda but FAISS sees no GPU (install the gpu extra: faiss-gpu)")
    return Stage1Engine(threads=settings.search_threads)


async def start_impression_log(
    settings: Settings, metrics: Metrics, stack: contextlib.AsyncExitStack
) -> LogWriter | None:
    """The impression log's store and writer task (when `DARE_IMPRESSION_LOG` is on), closed by `stack`."""
    if not settings.impression_log:
        return None
    timeout_s = settings.impression_log_timeout_ms / 1000.0
    log_store = open_log_store(
        settings.log_dsn,
        cluster=settings.log_cluster,
        timeout_s=timeout_s,
        maxlen=settings.impression_log_maxlen,
        retention_s=settings.impression_log_retention_s,
        namespace=settings.redis_namespace,
    )
    stack.push_async_callback(log_store.aclose)
    writer = LogWriter(
        log_store,
        metrics,
        salt=settings.ab_salt,
        sample=settings.impression_log_sample,
        top_n=settings.impression_log_top_n,
        queue_size=settings.impression_log_queue,
        batch_size=settings.impression_log_batch,
    )
    writer.start()
    # Unwound before the store closes: what is queued at shutdown is written if the log answers in time.
    stack.push_async_callback(writer.aclose, max(2.0, 2 * timeout_s))
    where = "in-memory" if settings.log_dsn is None else f"redis (namespace {settings.redis_namespace})"
    logger.info("impression log: %s, sampling %g of users", where, settings.impression_log_sample)
    return writer


@contextlib.asynccontextmanager
async def build_state(settings: Settings, tracing: Tracing | None = None) -> AsyncIterator[AppState]:
    """Build the AppState; everything acquired is released in reverse order on exit."""
    import onnxruntime as ort

    async with contextlib.AsyncExitStack() as stack:
        tracer = stack.enter_context(tracing.exporting()) if tracing is not None else None
        available = list(ort.get_available_providers())
        preload_cuda_libraries(settings.device, available)
        providers = choose_providers(settings.device, available)
        engine = stage1_engine(settings)
        stack.callback(engine.close)
        device = device_info(settings, providers, available, engine)
        logger.info(
            "stage 2 on ONNX Runtime %s with %s (device=%s); stage 1 on FAISS %s",
            ort.__version__, ", ".join(providers), settings.device, device.faiss_device,
        )  # fmt: skip
        metrics = Metrics()
        loop_lag = LoopLagMonitor(metrics.loop_lag)
        loop_lag.start()
        stack.push_async_callback(loop_lag.aclose)
        store = open_feature_store(
            settings.redis_dsn,
            cluster=settings.redis_cluster,
            timeout_s=settings.feature_timeout_s,
            fm_ttl_s=settings.fm_ttl_s,
            pool_size=settings.redis_pool_size,
            namespace=settings.redis_namespace,
            max_len=settings.store_max_events,
        )
        stack.push_async_callback(store.aclose)
        metrics.watch_store(store.stats)
        logger.info(
            "feature store: %s",
            "in-memory" if settings.redis_url is None else f"redis (namespace {settings.redis_namespace})",
        )
        await load_startup_data(settings, store)
        log = await start_impression_log(settings, metrics, stack)

        executor = ThreadPoolExecutor(
            settings.compute_threads, thread_name_prefix="dare-compute", initializer=single_threaded_numerics
        )
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)

        registry = ModelRegistry(
            settings.bundles,
            providers=providers,
            ort_threads=settings.ort_threads,
            configured_weights=settings.variant_weights,
            metrics=metrics,
            warm_shape=(
                settings.batch_max_size if settings.batch_enabled else 1,
                min(settings.warm_candidates, settings.max_candidates),
            ),
        )
        await registry.reload()
        require_models(registry)
        if not registry.current.models:
            logger.error("no valid bundle under %s: not ready until one is loaded", settings.bundles)

        batches = BatchScorer(
            store,
            executor,
            metrics,
            retry_after_s=settings.retry_after_s,
            fm_use_expired=settings.fm_use_expired,
            engine=engine,
            feature_timeout_s=settings.feature_timeout_s,
            search_depth=settings.search_depth_of,
            loop_lag=loop_lag,
        )
        batcher: ScoreBatcher | None = None
        if settings.batch_enabled:
            batcher = Batcher(
                batches.run_batch,
                max_size=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000.0,
                max_concurrency=settings.batch_max_concurrency,
            )
            batcher.start()
            stack.push_async_callback(batcher.aclose)
        scorer = Scorer(batches, metrics, batcher)

        if settings.watch_bundles:
            watch = asyncio.create_task(registry.watch(settings.watch_interval_s), name="dare-bundle-watch")

            async def stop_watch() -> None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

            stack.push_async_callback(stop_watch)
        # A full garbage collection walks every tracked object, and what start-up leaves (the dataset
        # loaded, models, every imported library) made one take 0.3-0.6 s in the demo under load:
        # the event loop and every thread wait meanwhile, past the feature budget (docs/reliability.md,
        # "Event-loop stalls"). What lives now lives as long as the app; frozen, the collector leaves
        # it out and walks only what serving allocates.
        gc.freeze()
        stack.callback(gc.unfreeze)
        yield AppState(settings, store, registry, scorer, metrics, device, time.time(), log, tracer)
        logger.info("shutting down")


async def feature_store_failed(request: Request, exc: Exception) -> Response:
    """A store error that reached a route: counted once here, answered 503 / 500 / 400 as it warrants."""
    assert isinstance(exc, FeatureStoreError)
    state: AppState = getattr(request.state, STATE_KEY)
    state.metrics.feature_store_errors.labels(store_error_kind(exc)).inc()
    return await render_dare_error(request, store_error(exc, state.settings.retry_after_s))


def create_app(settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The ranker app; `settings` default to the environment (DARE_*), tracing to the `OTEL_*`
    variables (off unless they ask for it) or to `tracer_provider`, which the caller owns."""
    settings = settings if settings is not None else Settings()
    tracing = Tracing(tracer_provider) if tracer_provider is not None else Tracing.from_env(_version())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with build_state(settings, tracing) as state:
            yield {STATE_KEY: state}

    app = FastAPI(
        title="dare-serve",
        summary="Long-sequence recommendation ranker: FAISS behavior search + ONNX Runtime ranking",
        version=_version(),
        lifespan=lifespan,
        telemetry=tracing.telemetry() if tracing is not None else telemetry_off(),
        # /docs is served from vendored assets by routes.docs (FastAPI's loads them from a CDN).
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_exception_handler(FeatureStoreError, feature_store_failed)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    if tracing is not None:
        app.add_middleware(TraceparentMiddleware)
    for module in (score, events, users, models, health, admin, log, inspector, docs):
        app.include_router(module.router)
    app.mount(docs.STATIC_PATH, docs.static_files(), name="static")
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dare-serve")
    except PackageNotFoundError:
        return "0+unknown"
