"""The `dare-serve` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import typer

from service.experiment_cli import ab_report, closed_loop, log_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Serve long-sequence recommendation models: data, training, bundles, serving.",
)


@app.callback()
def main() -> None:
    """dare-serve: offline training and export, feature store, online ranking."""


@app.command()
def version() -> None:
    """Print the installed dare-serve version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("dare-serve"))


def _fail(message: str) -> typer.Exit:
    """Print a clear error on stderr and return the exit to raise (code 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def train(
    data: Path = typer.Option(..., help="canonical dataset folder (events.parquet, impressions.parquet)"),
    model: str = typer.Option(..., help="dare | coupled | fm"),
    out: Path = typer.Option(..., help="bundle root; the bundle goes to OUT/<variant>/<version>/"),
    variant: str | None = typer.Option(None, help="variant name (default: the model name)"),
    fm_bundle: Path | None = typer.Option(None, help="an fm bundle whose user embeddings become an input"),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(6, help="maximum epochs (early stopping on validation AUC and logloss)"),
    batch_size: int = typer.Option(256),
    lr: float = typer.Option(2e-3),
    attention_dim: int = typer.Option(16, help="dare: attention embedding size"),
    representation_dim: int = typer.Option(64, help="representation size (coupled: the shared size)"),
    top_k: int = typer.Option(64, help="behaviors retrieved per candidate by stage 1"),
    device: str = typer.Option(
        "auto", help="auto (CUDA when present) | cpu | cuda; per process under torchrun"
    ),
    sparse_tables: bool | None = typer.Option(
        None,
        "--sparse-tables/--dense-tables",
        help="item tables with sparse row gradients and a row-wise Adam (default: from 65,536 items)",
    ),
    recent_k: int = typer.Option(
        0, help="of the top-k, the newest behaviors always kept; stage 1 searches the rest (0: all searched)"
    ),
    short_term: int = typer.Option(
        0, help="a short-term branch attending the newest N of the kept behaviors (N <= --recent-k; 0: none)"
    ),
    max_seq_len: int = typer.Option(
        2000, help="training window: history events per impression (most recent); serving searches deeper"
    ),
    fm_dim: int = typer.Option(32, help="fm: user embedding size"),
    patience: int = typer.Option(
        2, help="epochs without a validation AUC gain, or without a logloss drop, before stopping"
    ),
    item_dropout: float = typer.Option(
        0.5, help="dropout on item-level embeddings (regularizes sparse items)"
    ),
    fm_dropout: float = typer.Option(0.3, help="share of training impressions seen without FM embedding"),
    fm_vector: bool = typer.Option(
        True, help="with --fm-bundle, the cached FM user embedding as an input (--no-fm-vector: history only)"
    ),
    fm_history: int = typer.Option(
        0,
        help="with --fm-bundle: attend over the newest N FM-history entries before each impression (0: off)",
    ),
    fm_history_dim: int | None = typer.Option(
        None, help="the Matryoshka prefix of each entry the ranker reads (default: all the encoder's dims)"
    ),
    fm_history_encoding: str = typer.Option("int4", help="how entries are stored: fp32 | int8 | int4"),
    fm_history_at: str = typer.Option(
        "impressions", help="entries at each past impression time (impressions) or every N-th event (events)"
    ),
    fm_history_stride: int = typer.Option(1, help="with --fm-history-at events: an entry after every N-th"),
    fm_history_lag: int = typer.Option(0, help="seconds after its time before an entry is readable"),
    fm_history_dropout: float = typer.Option(
        0.3, help="share of training impressions seen without their FM-history entries"
    ),
    fm_history_encoder: Path | None = typer.Option(
        None, help="reuse the FM-history encoder of another bundle (or its fm_history_encoder.npz)"
    ),
    max_train_samples: int | None = typer.Option(None, help="subsample the training split"),
    pretrain: bool = typer.Option(
        True, help="initialise the embedding tables from item vectors learned from the event stream"
    ),
    item_vectors: Path | None = typer.Option(
        None, help="reuse item vectors written by `dare-serve pretrain` instead of learning them"
    ),
    aux_weight: float = typer.Option(
        0.1, help="weight of the co-occurrence loss that keeps the attention table arranged (0: off)"
    ),
    weight_decay: float = typer.Option(1e-6, help="L2 on dense weights (never on embedding tables)"),
    calibrate: bool = typer.Option(
        True, help="fold a Platt scaling fitted on the validation split into the exported head"
    ),
    progress: bool = typer.Option(True, help="progress bars and log lines on stderr"),
) -> None:
    """Train a model, evaluate it on the time-based test split, export a bundle; prints one JSON line."""
    import orjson

    from exporters.bundle import BundleError
    from exporters.dataset import DatasetError
    from exporters.train import TrainConfig, nan_to_none
    from exporters.train import train as run_training

    kinds: dict[str, Literal["dare", "coupled", "fm"]] = {"dare": "dare", "coupled": "coupled", "fm": "fm"}
    kind = kinds.get(model)
    if kind is None:
        raise _fail(f"--model must be dare, coupled or fm, not {model!r}")
    if kind == "fm" and fm_bundle is not None:
        raise _fail("--fm-bundle is an input of dare/coupled, not of fm")
    if fm_history and fm_bundle is None:
        raise _fail("--fm-history needs --fm-bundle: the entries are that FM's representations")
    encodings: dict[str, Literal["fp32", "int8", "int4"]] = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
    places: dict[str, Literal["impressions", "events"]] = {"impressions": "impressions", "events": "events"}
    if fm_history_encoding not in encodings or fm_history_at not in places:
        raise _fail(
            "--fm-history-encoding must be fp32, int8 or int4 and --fm-history-at impressions or events"
        )
    torch_threads()
    cfg = TrainConfig(
        data=data,
        model=kind,
        out=out,
        variant=variant,
        fm_bundle=fm_bundle,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        attention_dim=attention_dim,
        representation_dim=representation_dim,
        top_k=top_k,
        recent_k=recent_k,
        short_term=short_term,
        device=device,
        sparse_tables=sparse_tables,
        max_seq_len=max_seq_len,
        fm_dim=fm_dim,
        patience=patience,
        item_dropout=item_dropout,
        fm_dropout=fm_dropout,
        fm_vector=fm_vector,
        fm_history=fm_history,
        fm_history_dim=fm_history_dim,
        fm_history_encoding=encodings[fm_history_encoding],
        fm_history_at=places[fm_history_at],
        fm_history_stride=fm_history_stride,
        fm_history_lag_s=fm_history_lag,
        fm_history_dropout=fm_history_dropout,
        fm_history_encoder=fm_history_encoder,
        max_train_samples=max_train_samples,
        pretrain=pretrain,
        item_vectors=item_vectors,
        aux_weight=aux_weight,
        weight_decay=weight_decay,
        calibrate=calibrate,
        progress=progress,
    )
    try:
        result = run_training(cfg)
    except (DatasetError, BundleError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    if "rank" not in result:  # under torchrun only rank 0 reports
        typer.echo(orjson.dumps(nan_to_none(result)).decode())


@app.command()
def pretrain(
    data: Path = typer.Option(..., help="canonical dataset folder"),
    out: Path = typer.Option(..., help="the item-vectors file to write (.npz)"),
    dim: int = typer.Option(64, help="vector size: the largest embedding table it will initialise"),
    window: int = typer.Option(20, help="behaviors at most this many positions apart co-occur"),
    seed: int = typer.Option(0),
) -> None:
    """Learn item vectors from the event stream alone (no labels), for `train --item-vectors`.

    Uses, per user, only the events before the user's first validation or test impression, as
    `train` does when it learns them itself. Prints one JSON line.
    """
    import time

    import orjson

    from exporters.dataset import DatasetError
    from exporters.train import learn_dataset_vectors

    if dim < 1 or window < 1:
        raise _fail("--dim and --window must be >= 1")
    t0 = time.time()
    try:
        vectors = learn_dataset_vectors(data, dim, window, seed)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    path = vectors.save(out)
    summary = {
        "out": str(path),
        "items": len(vectors.item_ids),
        "dim": vectors.dim,
        "window": window,
        "events": vectors.n_events,
        "seconds": round(time.time() - t0, 1),
    }
    typer.echo(orjson.dumps(summary).decode())


def torch_threads() -> None:
    """Deterministic CPU training: a fixed intra-op thread count (results depend on it). Under
    torchrun the cores are shared among the processes: more threads than cores made a step up to
    ten times slower, the threads of each process spinning while the others held the cores."""
    import os

    import torch

    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(int(os.environ.get("DARE_TRAIN_THREADS", str(min(4, cores)))))


@app.command("fm-embed")
def fm_embed(
    fm_bundle: Path = typer.Option(..., help="the fm bundle folder"),
    data: Path = typer.Option(..., help="dataset folder whose events.parquet gives the histories"),
    redis_url: str | None = typer.Option(None, envvar="DARE_REDIS_URL", help="write to this Redis"),
    cluster: bool = typer.Option(False, help="the Redis URL points at a Redis Cluster"),
    namespace: str = typer.Option("dare", envvar="DARE_REDIS_NAMESPACE", help="key prefix"),
    out: Path | None = typer.Option(None, help="write a parquet file instead of Redis"),
    activate: bool = typer.Option(True, help="switch the feature store's active FM version to this one"),
    history_encoder: Path | None = typer.Option(
        None,
        help="also write FM-history entries (Redis only), packed by this encoder: a ranker bundle trained "
        "with --fm-history, or an fm_history_encoder.npz",
    ),
    history_at: str | None = typer.Option(
        None,
        help="entries at each past impression (impressions) or after every N-th event (events); "
        "default: as the bundle was trained, else impressions",
    ),
    history_stride: int | None = typer.Option(None, help="with --history-at events: N (default 1)"),
    history_max_len: int = typer.Option(256, help="FM-history entries the store keeps per user"),
    progress: bool = typer.Option(True),
) -> None:
    """Compute FM user embeddings for every user and store them, tagged with the FM version; with
    --history-encoder, each user's FM-history entries too (docs/feature-store.md)."""
    import asyncio
    import time

    import orjson
    import pandas as pd

    from exporters.bundle import BundleError, load_bundle
    from exporters.dataset import DatasetError
    from exporters.fm_embed import compute_user_embeddings, write_embeddings_file
    from exporters.fm_history import DatasetHistory, dataset_history, history_options, load_encoder
    from feature_store.keys import NAMESPACE_PATTERN, is_namespace

    if (redis_url is None) == (out is None):
        raise _fail("give exactly one of --redis-url and --out")
    if not is_namespace(namespace):
        raise _fail(f"--namespace must match {NAMESPACE_PATTERN.pattern}, not {namespace!r}")
    if history_encoder is not None and out is not None:
        raise _fail("FM-history entries are written to a feature store: give --redis-url")
    if history_at not in (None, "impressions", "events"):
        raise _fail(f"--history-at must be impressions or events, not {history_at!r}")
    t0 = time.time()
    history: DatasetHistory | None = None
    try:
        bundle = load_bundle(fm_bundle)
        events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
        emb = compute_user_embeddings(bundle, events, progress=progress)
        if history_encoder is not None:
            encoder = load_encoder(history_encoder)
            at, stride = history_options(history_encoder) or ("impressions", 1)
            history = dataset_history(
                bundle,
                data,
                encoder,
                "events" if (history_at or at) == "events" else "impressions",
                history_stride if history_stride is not None else stride,
            )
    except (BundleError, DatasetError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    if out is not None:
        write_embeddings_file(emb, out)
        target = str(out)
    else:
        from feature_store.errors import FeatureStoreError
        from feature_store.factory import open_feature_store

        async def write() -> None:
            store = open_feature_store(
                redis_url,
                cluster=cluster,
                timeout_s=10.0,
                namespace=namespace,
                fm_history_max_len=history_max_len,
            )
            try:
                await store.write_fm_embeddings(
                    emb.fm_version, emb.user_ids, emb.vectors, written_at=emb.written_at
                )
                if history is not None:
                    # before the switch, as the vectors: the entries of the FM in use until now stay
                    await store.write_fm_history(emb.fm_version, encoder.version, history.by_user)
                if activate:
                    await store.set_active_fm_version(emb.fm_version)
            finally:
                await store.aclose()

        try:
            asyncio.run(write())
        except (FeatureStoreError, ValueError) as e:
            raise _fail(f"feature store: {e}") from None
        target = "redis"
    summary: dict[str, Any] = {
        "fm_version": emb.fm_version,
        "users": len(emb.user_ids),
        "dim": int(emb.vectors.shape[1]),
        "target": target,
        "seconds": round(time.time() - t0, 2),
    }
    if history is not None:
        summary["history"] = {
            "encoder_version": encoder.version,
            "encoding": encoder.encoding,
            "users": len(history.by_user),
            "entries": history.n_entries,
            "bytes": history.n_bytes,
        }
    typer.echo(orjson.dumps(summary).decode())


data_app = typer.Typer(no_args_is_help=True, help="Datasets in the canonical form: synthetic or converted.")
app.add_typer(data_app, name="data")


def _data_summary(meta: dict[str, Any], out: Path, t0: float) -> str:
    import json
    import time

    summary = {
        "out": str(out),
        "source": meta.get("source"),
        **meta.get("signal", {}),
        **meta.get("counts", {}),
        "seconds": round(time.time() - t0, 2),
    }
    return json.dumps(summary)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="output dataset folder"),
    users: int | None = typer.Option(None, help="users (default 2000)"),
    items: int | None = typer.Option(None, help="items (default 20000)"),
    categories: int | None = typer.Option(None, help="categories (default 100)"),
    max_seq_len: int | None = typer.Option(None, help="longest user sequence (default 2000)"),
    min_seq_len: int | None = typer.Option(None, help="shortest user sequence (default 20)"),
    impressions_per_user: float | None = typer.Option(None, help="mean impressions per user (default 24)"),
    seed: int | None = typer.Option(None, help="random seed (default 0)"),
    theme_layout: str | None = typer.Option(
        None, help="nested (themes inside categories, the default) | independent (themes across categories)"
    ),
    dormant_share: float | None = typer.Option(
        None,
        help="share of users with a dormant lifelong interest: in their events only early in their "
        "timeline, in their impression targets to the end (default 0)",
    ),
    dormant_until: float | None = typer.Option(
        None, help="where on the timeline (0..1) a dormant interest falls silent (default 0.3)"
    ),
) -> None:
    """Write a synthetic dataset with hidden item themes and related.parquet (truth); prints one JSON line."""
    import time

    from exporters.synth import SynthConfig, write_synth

    # checked by SynthConfig.validate
    given: dict[str, Any] = {
        "users": users,
        "items": items,
        "categories": categories,
        "max_seq_len": max_seq_len,
        "min_seq_len": min_seq_len,
        "impressions_per_user": impressions_per_user,
        "seed": seed,
        "theme_layout": theme_layout,
        "dormant_share": dormant_share,
        "dormant_until": dormant_until,
    }
    t0 = time.time()
    try:
        cfg = SynthConfig(**{k: v for k, v in given.items() if v is not None})
        cfg.validate()
        typer.echo(f"generating {cfg.users} users, {cfg.items} items into {out}", err=True)
        meta = write_synth(out, cfg)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(_data_summary(meta, out, t0))


@data_app.command("taobao-synth")
def data_taobao_synth(
    out: Path = typer.Option(
        ..., help="output folder: UserBehavior.csv, item_themes.parquet, user_interests.parquet, meta.json"
    ),
    users: int | None = typer.Option(None, help="users (default 987994, the real file's)"),
    items: int | None = typer.Option(None, help="items (default 4162024)"),
    categories: int | None = typer.Option(None, help="categories (default 9439)"),
    seed: int | None = typer.Option(None, help="random seed (default 0)"),
) -> None:
    """Write a Taobao-shaped UserBehavior.csv with planted item themes and truth; prints one JSON line."""
    import json

    from exporters.convert import TAOBAO_FILE
    from exporters.taobao_synth import TaobaoSynthConfig, write_taobao_csv

    # checked by TaobaoSynthConfig.validate
    given: dict[str, Any] = {"users": users, "items": items, "categories": categories, "seed": seed}
    try:
        cfg = TaobaoSynthConfig(**{k: v for k, v in given.items() if v is not None})
        cfg.validate()
        typer.echo(f"generating {cfg.users} users, {cfg.items} items into {out / TAOBAO_FILE}", err=True)
        summary = write_taobao_csv(out / TAOBAO_FILE, cfg, progress=True)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(json.dumps({"out": str(out), "source": "taobao-synth", **summary}))


@data_app.command("convert")
def data_convert(
    fmt: str = typer.Option(..., "--format", help="movielens | taobao"),
    path: Path = typer.Option(..., help="MovieLens folder, or Taobao UserBehavior.csv (or its folder)"),
    out: Path = typer.Option(..., help="output dataset folder"),
    max_users: int | None = typer.Option(None, help="keep only the first N users by id"),
    seed: int = typer.Option(0, help="seed of Taobao's sampled negatives"),
    protocol: str | None = typer.Option(
        None,
        help="taobao only: pageviews (the default: every page view after the first 5, one negative each) | "
        "dare (the DARE paper's: users with >= 210 page views, 23 targets with 2 negatives each)",
    ),
    skip_bad_lines: bool = typer.Option(
        False,
        "--skip-bad-lines",
        help="taobao only: skip malformed lines and count them (meta.json, the JSON line) instead of failing",
    ),
) -> None:
    """Convert a public dataset into the canonical form; prints one JSON line."""
    import time

    from exporters.convert import TAOBAO_PROTOCOLS, convert_to_folder

    if fmt not in ("movielens", "taobao"):
        raise _fail(f"--format must be movielens or taobao, not {fmt!r}")
    if protocol is not None and fmt != "taobao":
        raise _fail(f"--protocol applies to --format taobao only, not to {fmt!r}")
    if skip_bad_lines and fmt != "taobao":
        raise _fail(f"--skip-bad-lines applies to --format taobao only, not to {fmt!r}")
    if protocol is not None and protocol not in TAOBAO_PROTOCOLS:
        raise _fail(f"--protocol must be {' or '.join(TAOBAO_PROTOCOLS)}, not {protocol!r}")
    if not path.exists():
        raise _fail(f"{path}: not found")
    t0 = time.time()
    typer.echo(f"converting {fmt} from {path} into {out}", err=True)
    try:
        meta = convert_to_folder(
            fmt,
            path,
            out,
            max_users=max_users,
            seed=seed,
            protocol=protocol,
            skip_bad_lines=skip_bad_lines,
            progress=True,
        )
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    read = meta.get("read", {})
    if read.get("bad_lines"):
        first = ", ".join(str(n) for n in read["first_bad_lines"])
        typer.echo(f"skipped {read['bad_lines']} bad line(s), the first at line(s) {first}", err=True)
    typer.echo(_data_summary(meta, out, t0))


@app.command()
def ingest(
    data: Path = typer.Option(..., help="dataset folder holding events.parquet"),
    redis_url: str | None = typer.Option(None, envvar="DARE_REDIS_URL", help="load into this Redis"),
    cluster: bool = typer.Option(False, help="the Redis URL points at a Redis Cluster"),
    namespace: str = typer.Option("dare", envvar="DARE_REDIS_NAMESPACE", help="key prefix"),
    batch_users: int = typer.Option(1000, help="users per pipeline"),
    max_events: int = typer.Option(
        10_000,
        envvar="DARE_STORE_MAX_EVENTS",
        help="newest behaviors kept per user (the store's cap; serve with the same DARE_STORE_MAX_EVENTS)",
    ),
    progress: bool = typer.Option(True, help="progress bar on stderr"),
) -> None:
    """Load behavior sequences into Redis (replacing, so reruns are idempotent); prints one JSON line."""
    import asyncio
    import dataclasses

    import orjson
    import pandas as pd

    from feature_store.base import MAX_LEN_LIMIT
    from feature_store.errors import FeatureStoreError
    from feature_store.factory import open_feature_store
    from feature_store.ingest import ingest_events

    if not redis_url:
        raise _fail(
            "no Redis to load into: pass --redis-url or set DARE_REDIS_URL "
            "(the in-memory store lives inside the serving process; `dare-serve serve` fills it)"
        )
    if not 1 <= max_events <= MAX_LEN_LIMIT:
        raise _fail(f"--max-events must lie in [1, {MAX_LEN_LIMIT:,}], not {max_events}")
    path = data / "events.parquet"
    try:
        events = pd.read_parquet(path, columns=["user_id", "item_id", "timestamp"])
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        raise _fail(f"cannot read {path}: {e}") from None

    async def load() -> dict[str, float]:
        # A batch job: a generous per-pipeline timeout instead of the serving default.
        store = open_feature_store(
            redis_url, cluster=cluster, timeout_s=30.0, namespace=namespace, max_len=max_events
        )
        try:
            return dataclasses.asdict(
                await ingest_events(store, events, batch_users=batch_users, progress=progress)
            )
        finally:
            await store.aclose()

    try:
        stats = asyncio.run(load())
    except ValueError as e:  # includes InvalidFeatureData: values the store cannot hold
        raise _fail(f"{path}: {e}") from None
    except FeatureStoreError as e:
        typer.echo(f"error: feature store: {e}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(orjson.dumps(stats).decode())


@app.command()
def serve(
    bundles: Path = typer.Option(..., envvar="DARE_BUNDLES", help="bundle root: ROOT/<variant>/<version>/"),
    redis_url: str | None = typer.Option(
        None, envvar="DARE_REDIS_URL", help="feature store in Redis (default: in-memory)"
    ),
    host: str = typer.Option("127.0.0.1", envvar="DARE_HOST", help="interface to listen on"),
    port: int = typer.Option(8000, envvar="DARE_PORT", help="TCP port"),
    data: Path | None = typer.Option(
        None, help="load DATA/events.parquet into the feature store at start-up (for the in-memory store)"
    ),
    fm_embeddings: Path | None = typer.Option(
        None, help="load an FM embeddings parquet (fm-embed --out) and make its version active"
    ),
    log_level: str = typer.Option("info", envvar="DARE_LOG_LEVEL", help="debug | info | warning | error"),
    access_log: bool = typer.Option(False, help="log every request (uvicorn access log)"),
) -> None:
    """Run the ranker service (uvicorn, one worker, uvloop + httptools). Other settings: DARE_* env."""
    import logging

    from pydantic import ValidationError

    from service.settings import Settings

    # checked by Settings' validators
    given: dict[str, Any] = {
        "bundles": bundles,
        "redis_url": redis_url,
        "load_events": data,
        "load_fm_embeddings": fm_embeddings,
    }
    try:
        # Only what was given on the command line; the rest still comes from DARE_* variables.
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise _fail(f"invalid settings: {problems}") from None
    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise _fail(f"--log-level must be debug, info, warning, error or critical, not {log_level!r}")
    if not settings.bundles.is_dir():
        raise _fail(f"--bundles {settings.bundles}: not a directory")
    if data is not None and not (data / "events.parquet").is_file():
        raise _fail(f"--data {data}: no events.parquet there")
    if fm_embeddings is not None and not fm_embeddings.is_file():
        raise _fail(f"--fm-embeddings {fm_embeddings}: no such file")
    import uvicorn

    from service.app import create_app
    from service.tracing import TracingConfigError

    try:
        ranker = create_app(settings)
    except TracingConfigError as e:
        raise _fail(f"invalid tracing settings: {e}") from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        ranker,
        host=host,
        port=port,
        workers=1,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=log_level.lower(),
        access_log=access_log,
        # Let in-flight requests finish on SIGTERM, but never hang a rolling restart.
        timeout_graceful_shutdown=10,
    )


@app.command()
def loadtest(
    host: str = typer.Option(..., help="base URL of the server, e.g. http://127.0.0.1:8000 (loopback)"),
    users: int = typer.Option(16, help="concurrent locust users"),
    spawn_rate: float = typer.Option(8.0, help="users started per second"),
    duration: str = typer.Option("60s", help="run time, e.g. 30s, 2m (at most 1h)"),
    out: Path = typer.Option(Path("runs/loadtest"), help="folder for CSV, HTML, summary.json and the plot"),
    data: Path | None = typer.Option(
        None,
        envvar="DARE_LT_DATA",
        help="dataset whose users and items make the traffic (default: .dare/demo/data if present, "
        "else cold-start users and item ids 1..n_items)",
    ),
    candidates: int = typer.Option(100, help="candidates per score request"),
    experiment_share: float = typer.Option(0.2, help="share of score requests with X-Experiment"),
    events_share: float = typer.Option(0.05, help="share of requests that are /v1/events appends"),
    zipf: float = typer.Option(1.1, help="exponent of the zipfian user popularity"),
    wait_ms: float = typer.Option(0.0, help="think time of a user between requests, uniform 0..W ms"),
    seed: int = typer.Option(0),
    write_token: str | None = typer.Option(
        None, envvar="DARE_WRITE_TOKEN", help="bearer token of /v1/events, when the server needs one"
    ),
    allow_remote: bool = typer.Option(False, help="allow a host that is not a loopback address"),
) -> None:
    """Headless locust run with content checks; writes reports and prints one JSON line last."""
    from loadtest.run import LoadTest, LoadTestError, check_host, default_data, one_line, parse_duration
    from loadtest.workload import TrafficConfig, WorkloadError

    try:
        lt = LoadTest(
            host=check_host(host, allow_remote),
            users=users,
            spawn_rate=spawn_rate,
            duration_s=parse_duration(duration),
            out=out.resolve(),
            traffic=TrafficConfig(
                data=default_data(data),
                candidates=candidates,
                experiment_share=experiment_share,
                events_share=events_share,
                zipf=zipf,
                seed=seed,
                wait_ms=wait_ms,
                write_token=write_token,
                out=out.resolve(),
            ),
        )
    except WorkloadError as e:
        raise _fail(str(e)) from None
    from loadtest.run import run_loadtest

    source = lt.traffic.data or "none: cold-start users, item ids from /v1/models"
    typer.echo(f"dataset: {source}", err=True)
    try:
        summary = run_loadtest(lt)
    except LoadTestError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    if summary["exceptions"]:
        typer.echo(f"error: the load test's own code raised: {summary['exceptions'][:3]}", err=True)
        raise typer.Exit(code=1)
    typer.echo(one_line(summary, lt.out))


@app.command()
def demo(
    port: int = typer.Option(8000, help="TCP port to serve on"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    redis_url: str | None = typer.Option(
        None, envvar="DARE_REDIS_URL", help="use Redis (default: in-memory)"
    ),
    workdir: Path = typer.Option(Path(".dare/demo"), help="where data, bundles and embeddings are kept"),
    smoke: bool = typer.Option(
        False, help="send real requests to the server, check them, exit 0 if all right"
    ),
) -> None:
    """The main job: synthetic data, train fm/dare/coupled, fill the feature store, serve a 50/50 A/B test."""
    from service.demo import run_demo

    raise typer.Exit(code=run_demo(workdir, host, port, redis_url, smoke))


@app.command("settings-table")
def settings_table(
    files: list[Path] | None = typer.Argument(
        None, metavar="FILE", help="documents whose table between the settings-table markers is rewritten"
    ),
) -> None:
    """Print the DARE_* settings table (markdown), or rewrite its copies in FILES between their markers."""
    from service.settings import SETTINGS_TABLE_MARKERS, settings_table_markdown, with_settings_table

    if not files:
        typer.echo(settings_table_markdown(), nl=False)
        return
    for path in files:
        try:
            text = path.read_text()
        except OSError as e:
            raise _fail(f"{path}: {e.strerror}") from None
        if not SETTINGS_TABLE_MARKERS.search(text):
            raise _fail(f"{path}: no <!-- settings-table:start --> ... <!-- settings-table:end --> markers")
        updated = with_settings_table(text)
        if updated != text:
            path.write_text(updated)
        typer.echo(f"{path}: {'table rewritten' if updated != text else 'already current'}", err=True)


@app.command()
def openapi(
    out: Path | None = typer.Option(None, help="write the schema to this file instead of stdout"),
) -> None:
    """Print the service's OpenAPI schema, as `GET /openapi.json` serves it (no bundles or Redis needed)."""
    import json

    from service.app import create_app
    from service.settings import Settings

    # The schema depends on no setting: build the app from defaults, without reading DARE_* variables.
    schema = create_app(Settings.model_construct(bundles=Path("."))).openapi()
    text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


app.add_typer(log_app, name="log")
app.command("ab-report")(ab_report)
app.command("closed-loop")(closed_loop)


if __name__ == "__main__":
    app()
