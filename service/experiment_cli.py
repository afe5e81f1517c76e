"""The experiment commands of `dare-serve`: `log export` and `ab-report` (registered in service/cli.py).

Heavy modules are imported inside each command, as in the rest of the command line.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from service.log_export import LogSource

log_app = typer.Typer(no_args_is_help=True, help="The impression and event logs: export to Parquet.")

_SPAN = re.compile(r"(\d+)([smhdw]?)")
_SPAN_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_time(text: str) -> int:
    """Seconds since the epoch from `1700000000` or an ISO 8601 date/time (UTC when no zone is given)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither epoch seconds nor an ISO 8601 time (2026-12-01T12:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def parse_span(text: str) -> int:
    """Seconds in `3600`, `90s`, `30m`, `1h`, `14d` or `2w`."""
    m = _SPAN.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration: use e.g. 3600, 30m, 1h, 14d")
    return int(m[1]) * _SPAN_UNITS[m[2]]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _source(
    folder: Path | None,
    server: str | None,
    admin_token: str | None,
    redis_url: str | None,
    cluster: bool,
    namespace: str,
) -> LogSource:
    from feature_store.keys import NAMESPACE_PATTERN, is_namespace
    from service.log_export import LogSource

    if not is_namespace(namespace):
        raise _fail(f"--namespace must match {NAMESPACE_PATTERN.pattern}, not {namespace!r}")
    # A folder or a server named on the command line wins over a Redis URL from the environment.
    if folder is not None:
        server = redis_url = None
    elif server is not None:
        redis_url = None
    try:
        return LogSource(
            redis_url=redis_url,
            cluster=cluster,
            namespace=namespace,
            server=server,
            admin_token=admin_token,
            folder=folder,
        )
    except ValueError as e:
        raise _fail(f"{e} (--log DIR, --server URL or --redis-url URL)") from None


_REDIS_HELP = "read the log from this Redis (DARE_IMPRESSION_LOG_URL, else DARE_REDIS_URL)"
_SERVER_HELP = "read the log from a running server's GET /admin/log (needs --admin-token)"


@log_app.command("export")
def log_export(
    out: Path = typer.Option(..., help="folder for impressions.parquet and events.parquet"),
    redis_url: str | None = typer.Option(
        None, envvar=["DARE_IMPRESSION_LOG_URL", "DARE_REDIS_URL"], help=_REDIS_HELP
    ),
    cluster: bool = typer.Option(False, help="the Redis URL points at a Redis Cluster"),
    namespace: str = typer.Option("dare", envvar="DARE_REDIS_NAMESPACE", help="key prefix"),
    server: str | None = typer.Option(None, help=_SERVER_HELP),
    admin_token: str | None = typer.Option(None, envvar="DARE_ADMIN_TOKEN", help="the server's admin token"),
    since: str | None = typer.Option(None, help="entries written at or after (epoch seconds or ISO 8601)"),
    until: str | None = typer.Option(None, help="entries written at or before (epoch seconds or ISO 8601)"),
) -> None:
    """Export the impression and event logs to Parquet (one row per logged candidate / behavior)."""
    import orjson

    from service.log_export import LogFormatError, LogSourceError, load_log, write_folder

    source = _source(None, server, admin_token, redis_url, cluster, namespace)
    try:
        since_ms = None if since is None else parse_time(since) * 1000
        until_ms = None if until is None else parse_time(until) * 1000 + 999
    except ValueError as e:
        raise _fail(str(e)) from None
    try:
        tables = load_log(source, since_ms=since_ms, until_ms=until_ms)
    except LogSourceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except LogFormatError as e:
        raise _fail(str(e)) from None
    paths = write_folder(tables, out)
    summary = {
        "impressions": {
            "path": str(paths["impressions"]),
            "requests": len(set(tables.impressions.column("log_id").to_pylist())),
            "rows": tables.impressions.num_rows,
        },
        "events": {"path": str(paths["events"]), "rows": tables.events.num_rows},
    }
    typer.echo(orjson.dumps(summary).decode())


def ab_report(
    log: Path | None = typer.Option(None, help="an exported log folder (`dare-serve log export`)"),
    redis_url: str | None = typer.Option(
        None, envvar=["DARE_IMPRESSION_LOG_URL", "DARE_REDIS_URL"], help=_REDIS_HELP
    ),
    cluster: bool = typer.Option(False, help="the Redis URL points at a Redis Cluster"),
    namespace: str = typer.Option("dare", envvar="DARE_REDIS_NAMESPACE", help="key prefix"),
    server: str | None = typer.Option(None, help=_SERVER_HELP),
    admin_token: str | None = typer.Option(None, envvar="DARE_ADMIN_TOKEN", help="the server's admin token"),
    since: str | None = typer.Option(
        None,
        help="the test's start: impressions at or after (epoch seconds, ISO 8601); the pre-period ends here",
    ),
    until: str | None = typer.Option(None, help="impressions before this time (default: all)"),
    pre_period: str = typer.Option(
        "14d", help="how far before --since each user's pre-period rate reaches (CUPED)"
    ),
    covariates: Path | None = typer.Option(
        None,
        help="per-user pre-period rates from a parquet of user_id + label (a dataset's impressions) or rate",
    ),
    window: str = typer.Option("1h", help="an event within this time after an impression is its outcome"),
    outcome: str = typer.Option("click", help="the event type that counts as an outcome ('any': every type)"),
    k: int = typer.Option(10, help="ranks per request counted as shown"),
    control: str | None = typer.Option(
        None, help="the control arm (default: coupled, else the first by name)"
    ),
    weights: str | None = typer.Option(
        None,
        envvar="DARE_VARIANT_WEIGHTS",
        help="the configured split for SRM, dare=0.5,coupled=0.5 (default: equal)",
    ),
    alpha: float = typer.Option(0.05, help="intervals are 1 - alpha"),
    bootstrap: int = typer.Option(1000, help="bootstrap replicates (users resampled within each arm)"),
    tau: float = typer.Option(0.02, help="the effect size the always-valid interval is tuned to"),
    srm_alpha: float = typer.Option(0.001, help="SRM fails below this p-value"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    json_out: Path | None = typer.Option(None, "--json", help="write the JSON report here"),
    png: Path | None = typer.Option(None, help="write a PNG of the cumulative difference over time here"),
    fmt: str = typer.Option("table", "--format", help="stdout: table (rich) | json"),
) -> None:
    """Read out an A/B test from the impression log and the events that followed, per arm, with intervals."""
    from service.ab_report import (
        ReportPlan,
        build_report,
        covariate_file_rates,
        plot_series,
        render_tables,
        report_json,
    )
    from service.core.experiment import ReadoutConfig
    from service.log_export import LogFormatError, LogSourceError, load_log, to_frames
    from service.settings import parse_weights

    if fmt not in ("table", "json"):
        raise _fail(f"--format must be table or json, not {fmt!r}")
    source = _source(log, server, admin_token, redis_url, cluster, namespace)
    try:
        plan = ReportPlan(
            start=None if since is None else parse_time(since),
            end=None if until is None else parse_time(until),
            pre_period_s=parse_span(pre_period),
            window_s=parse_span(window),
            outcome_type=None if outcome == "any" else outcome,
            weights=parse_weights(weights) or None if weights else None,
            config=ReadoutConfig(
                k=k, control=control, alpha=alpha, n_boot=bootstrap, seed=seed, tau=tau, srm_alpha=srm_alpha
            ),
        )
    except ValueError as e:
        raise _fail(str(e)) from None
    try:
        impressions, events = to_frames(load_log(source))
    except LogSourceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except LogFormatError as e:
        raise _fail(str(e)) from None
    try:
        covariate = None
        if covariates is not None:
            import pandas as pd

            covariate = covariate_file_rates(pd.read_parquet(covariates))
        report = build_report(impressions, events, plan, covariate)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    text = report_json(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_bytes(text + b"\n")
    if png is not None:
        try:
            plot_series(report, png)
        except ImportError:
            typer.echo("note: no PNG: matplotlib is not installed (the loadtest extra has it)", err=True)
    if fmt == "json":
        typer.echo(text.decode())
    else:
        from rich.console import Console

        console = Console(width=200)
        for part in render_tables(report):
            console.print(part)


def closed_loop(
    host: str = typer.Option(..., help="base URL of the server, e.g. http://127.0.0.1:8000 (loopback)"),
    data: Path = typer.Option(..., help="the `dare-serve data synth` dataset the server was filled from"),
    users: int = typer.Option(400, help="simulated users, drawn from the dataset's"),
    rounds: int = typer.Option(
        8, help="requests per user, one per round; a round's clicks are history by the next"
    ),
    candidates: int = typer.Option(
        50, help="candidates per request, drawn as the generator drew impressions"
    ),
    k: int = typer.Option(10, help="items a user is shown: the top k by the served score"),
    position_bias: bool = typer.Option(
        True, help="a user looks at rank r with probability 1/log2(r+1) before the click model decides"
    ),
    step: str = typer.Option("1h", help="simulated time between rounds"),
    start: str | None = typer.Option(
        None, help="the first round's time (default: a day after the last event)"
    ),
    concurrency: int = typer.Option(16, help="requests in flight"),
    seed: int = typer.Option(0),
    write_token: str | None = typer.Option(
        None, envvar="DARE_WRITE_TOKEN", help="bearer token of /v1/events, when the server needs one"
    ),
    out: Path | None = typer.Option(None, help="also write the summary JSON here"),
    allow_remote: bool = typer.Option(False, help="allow a host that is not a loopback address"),
) -> None:
    """Simulated users click by the synthetic generator's click model and send their clicks back as events."""
    import asyncio

    import orjson

    from loadtest.closed_loop import ClosedLoopConfig, ClosedLoopError, run_closed_loop
    from loadtest.run import check_host
    from loadtest.workload import WorkloadError

    try:
        cfg = ClosedLoopConfig(
            host=check_host(host, allow_remote),
            data=data,
            users=users,
            rounds=rounds,
            candidates=candidates,
            k=k,
            position_bias=position_bias,
            step_s=parse_span(step),
            start_ts=None if start is None else parse_time(start),
            concurrency=concurrency,
            seed=seed,
            write_token=write_token,
        )
        summary = asyncio.run(run_closed_loop(cfg))
    except (ClosedLoopError, WorkloadError, ValueError, OSError) as e:
        raise _fail(str(e)) from None
    text = orjson.dumps(summary).decode()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)
    if summary["errors"]:
        typer.echo(f"error: {summary['errors']} requests failed, e.g. {summary['first_errors'][0]}", err=True)
        raise typer.Exit(code=1)
