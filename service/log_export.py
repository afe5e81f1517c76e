"""Reading the impression and event logs back: from Redis, from a running server (`GET /admin/log`),
or from an exported folder; as Arrow tables in long form, written as Parquet.

`impressions.parquet` has one row per logged candidate of a request; `events.parquet` one row per
behavior. Columns are in docs/ab-testing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.log_store import LogStore
from service.impression_log import RECORD_FORMAT

if TYPE_CHECKING:
    import httpx

IMPRESSIONS_FILE = "impressions.parquet"
EVENTS_FILE = "events.parquet"
PAGE = 10_000

_IMPRESSION_FIELDS: list[pa.Field[Any]] = [
    pa.field("log_id", pa.string()),
    pa.field("request_id", pa.string()),
    pa.field("ts", pa.int64()),
    pa.field("served_at", pa.float64()),
    pa.field("user_id", pa.string()),
    pa.field("variant", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("assigned_by", pa.string()),
    pa.field("fm_embedding", pa.string()),
    pa.field("n_candidates", pa.int32()),
    pa.field("item_id", pa.int64()),
    pa.field("score", pa.float64()),
    pa.field("rank", pa.int32()),
]
IMPRESSION_SCHEMA = pa.schema(_IMPRESSION_FIELDS)
_EVENT_FIELDS: list[pa.Field[Any]] = [
    pa.field("log_id", pa.string()),
    pa.field("user_id", pa.string()),
    pa.field("item_id", pa.int64()),
    pa.field("ts", pa.int64()),
    pa.field("type", pa.string()),
    pa.field("logged_at", pa.float64()),
]
EVENT_SCHEMA = pa.schema(_EVENT_FIELDS)

Records = list[tuple[str, dict[str, Any]]]


class LogFormatError(ValueError):
    """A log record that is not what this version writes."""


class LogSourceError(RuntimeError):
    """The log could not be read from where it was asked for (unreachable, refused, missing files)."""


@dataclass(frozen=True, slots=True)
class LogSource:
    """Where a log is read from: exactly one of a Redis URL, a server's base URL, an exported folder."""

    redis_url: str | None = None
    cluster: bool = False
    namespace: str = "dare"
    server: str | None = None
    admin_token: str | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.redis_url, self.server, self.folder) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one log source: a Redis URL, a server URL or an exported folder")
        if self.server is not None and not self.admin_token:
            raise ValueError("reading the log from a server needs its admin token (DARE_ADMIN_TOKEN)")


def _decode(entry_id: str, data: bytes) -> tuple[str, dict[str, Any]]:
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise LogFormatError(f"log entry {entry_id} is not JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("v") != RECORD_FORMAT:
        raise LogFormatError(f"log entry {entry_id} is not a format-{RECORD_FORMAT} record")
    return entry_id, record


async def read_store(
    store: LogStore,
    stream: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    page: int = PAGE,
) -> Records:
    """Every entry of a stream in the time range, paged."""
    out: Records = []
    after: str | None = None
    while True:
        entries = await store.read(stream, after=after, since_ms=since_ms, until_ms=until_ms, count=page)
        out.extend(_decode(e.id, e.data) for e in entries)
        if len(entries) < page:
            return out
        after = entries[-1].id


def read_server(
    base_url: str,
    admin_token: str,
    stream: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    page: int = PAGE,
    timeout_s: float = 30.0,
    client: httpx.Client | None = None,
) -> Records:
    """Every entry of a stream in the time range from a server's `GET /admin/log/{stream}` (through
    `client` when given: an ASGI test client, for instance)."""
    import httpx

    params: dict[str, Any] = {"count": page}
    if since_ms is not None:
        params["since_ms"] = since_ms
    if until_ms is not None:
        params["until_ms"] = until_ms
    out: Records = []
    url = f"{base_url.rstrip('/')}/admin/log/{stream}"
    auth = {"Authorization": f"Bearer {admin_token}"}
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(httpx.Client(timeout=timeout_s))
        while True:
            try:
                response = client.get(url, params=params, headers=auth)
            except httpx.HTTPError as exc:
                raise LogSourceError(f"{url}: {exc}") from None
            if response.status_code != 200:
                try:
                    detail = str(response.json().get("detail") or "")
                except ValueError:
                    detail = ""
                raise LogSourceError(f"{url}: HTTP {response.status_code} {detail}".rstrip())
            body = response.json()
            for entry in body["entries"]:
                record = entry["record"]
                if not isinstance(record, dict) or record.get("v") != RECORD_FORMAT:
                    raise LogFormatError(f"log entry {entry['id']} is not a format-{RECORD_FORMAT} record")
                out.append((entry["id"], record))
            if body["next"] is None:
                return out
            params["after"] = body["next"]


def _field(entry_id: str, record: dict[str, Any], name: str) -> Any:
    try:
        return record[name]
    except KeyError:
        raise LogFormatError(f"log entry {entry_id} lacks {name!r}") from None


def impressions_table(records: Iterable[tuple[str, dict[str, Any]]]) -> pa.Table:
    """Impression records in long form: one row per logged candidate."""
    scalars: dict[str, list[Any]] = {
        name: [] for name in ("log_id", "request_id", "ts", "served_at", "user_id", "variant",
                              "model_version", "assigned_by", "fm_embedding", "n_candidates")
    }  # fmt: skip
    lengths: list[int] = []
    items: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    for entry_id, rec in records:
        cands = np.asarray(_field(entry_id, rec, "candidates"), dtype=np.int64)
        sc = np.asarray(_field(entry_id, rec, "scores"), dtype=np.float64)
        rk = np.asarray(_field(entry_id, rec, "ranks"), dtype=np.int32)
        if not cands.shape == sc.shape == rk.shape or cands.ndim != 1:
            raise LogFormatError(f"log entry {entry_id}: candidates, scores and ranks differ in length")
        scalars["log_id"].append(entry_id)
        for name in list(scalars)[1:]:
            scalars[name].append(_field(entry_id, rec, name))
        lengths.append(len(cands))
        items.append(cands)
        scores.append(sc)
        ranks.append(rk)
    reps = np.asarray(lengths, dtype=np.int64)
    numeric: dict[str, type] = {"ts": np.int64, "served_at": np.float64, "n_candidates": np.int64}
    try:
        columns: dict[str, Any] = {
            name: np.repeat(np.asarray(values, dtype=numeric.get(name, object)), reps)
            for name, values in scalars.items()
        }
    except (TypeError, ValueError) as exc:
        raise LogFormatError(f"an impression record holds a value of the wrong type: {exc}") from None
    columns["item_id"] = np.concatenate(items) if items else np.empty(0, np.int64)
    columns["score"] = np.concatenate(scores) if scores else np.empty(0, np.float64)
    columns["rank"] = np.concatenate(ranks) if ranks else np.empty(0, np.int32)
    return _table(columns, IMPRESSION_SCHEMA)


def events_table(records: Iterable[tuple[str, dict[str, Any]]]) -> pa.Table:
    """Event records in long form: one row per behavior."""
    ids: list[str] = []
    users: list[str] = []
    types: list[str] = []
    logged: list[float] = []
    lengths: list[int] = []
    items: list[np.ndarray] = []
    times: list[np.ndarray] = []
    for entry_id, rec in records:
        it = np.asarray(_field(entry_id, rec, "items"), dtype=np.int64)
        ts = np.asarray(_field(entry_id, rec, "timestamps"), dtype=np.int64)
        if it.shape != ts.shape or it.ndim != 1:
            raise LogFormatError(f"log entry {entry_id}: items and timestamps differ in length")
        ids.append(entry_id)
        users.append(_field(entry_id, rec, "user_id"))
        types.append(_field(entry_id, rec, "type"))
        logged.append(_field(entry_id, rec, "logged_at"))
        lengths.append(len(it))
        items.append(it)
        times.append(ts)
    reps = np.asarray(lengths, dtype=np.int64)
    columns = {
        "log_id": np.repeat(np.asarray(ids, dtype=object), reps),
        "user_id": np.repeat(np.asarray(users, dtype=object), reps),
        "item_id": np.concatenate(items) if items else np.empty(0, np.int64),
        "ts": np.concatenate(times) if times else np.empty(0, np.int64),
        "type": np.repeat(np.asarray(types, dtype=object), reps),
        "logged_at": np.repeat(np.asarray(logged, dtype=np.float64), reps),
    }
    return _table(columns, EVENT_SCHEMA)


def _table(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    try:
        return pa.Table.from_pydict(
            {f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise LogFormatError(f"a log record holds a value of the wrong type: {exc}") from None


@dataclass(frozen=True, slots=True)
class LogTables:
    """Both logs as Arrow tables."""

    impressions: pa.Table
    events: pa.Table


def load_log(source: LogSource, *, since_ms: int | None = None, until_ms: int | None = None) -> LogTables:
    """Both logs from `source`; the range is the entries' write time (an exported folder is read whole)."""
    if source.folder is not None:
        return read_folder(source.folder)
    if source.server is not None:
        assert source.admin_token is not None
        got = {
            s: read_server(source.server, source.admin_token, s, since_ms=since_ms, until_ms=until_ms)
            for s in ("impressions", "events")
        }
    else:
        got = asyncio.run(_read_redis(source, since_ms, until_ms))
    return LogTables(impressions_table(got["impressions"]), events_table(got["events"]))


async def _read_redis(source: LogSource, since_ms: int | None, until_ms: int | None) -> dict[str, Records]:
    from feature_store.errors import FeatureStoreError
    from feature_store.factory import open_log_store

    assert source.redis_url is not None
    store = open_log_store(
        source.redis_url, cluster=source.cluster, timeout_s=30.0, namespace=source.namespace
    )
    try:
        return {
            s: await read_store(store, s, since_ms=since_ms, until_ms=until_ms)
            for s in ("impressions", "events")
        }
    except FeatureStoreError as exc:
        raise LogSourceError(f"redis: {exc}") from None
    finally:
        await store.aclose()


def write_folder(tables: LogTables, out: Path) -> dict[str, Path]:
    """`impressions.parquet` and `events.parquet` under `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"impressions": out / IMPRESSIONS_FILE, "events": out / EVENTS_FILE}
    pq.write_table(tables.impressions, paths["impressions"])
    pq.write_table(tables.events, paths["events"])
    return paths


def read_folder(folder: Path) -> LogTables:
    """An exported folder back as tables (checked against the schemas)."""
    tables = []
    for name, schema in ((IMPRESSIONS_FILE, IMPRESSION_SCHEMA), (EVENTS_FILE, EVENT_SCHEMA)):
        path = folder / name
        if not path.is_file():
            raise LogSourceError(f"{path}: no such file (export one with `dare-serve log export`)")
        table = pq.read_table(path)
        missing = [f.name for f in schema if f.name not in table.column_names]
        if missing:
            raise LogFormatError(f"{path} lacks the column(s) {', '.join(missing)}")
        tables.append(table.select(schema.names).cast(schema))
    return LogTables(*tables)


def to_frames(tables: LogTables) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables as pandas frames (strings as Python objects)."""
    return tables.impressions.to_pandas(), tables.events.to_pandas()
