"""Service settings: one pydantic-settings class, environment variables prefixed `DARE_`.

Every field carries a docstring; `settings_table_markdown()` turns them into the configuration
table of the README and docs/service.md, so the table cannot drift from the code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, RedisDsn, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from exporters.bundle import is_variant_name
from feature_store.base import DEFAULT_MAX_LEN, MAX_LEN_LIMIT
from feature_store.keys import NAMESPACE_PATTERN, is_namespace

# Shorter bearer tokens are guessable by brute force over a network; refuse them at start-up.
MIN_TOKEN_CHARS = 16


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask (a container's cpuset), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this OS
        return max(1, os.cpu_count() or 1)


def _default_compute_threads() -> int:
    # One per core. A batch's compute holds its thread for stage 1 (its searches spread over the
    # search threads) and for one single-threaded ORT call; with fewer threads than cores, batches
    # ready to compute queue for a thread while a core idles (on 2 cores, 32 clients kept one batch
    # computing at a time). The event loop's share per request is a fraction of the compute's.
    return available_cores()


def _default_batch_concurrency() -> int:
    # As many batches computing as there are compute threads, and at least one more than one,
    # so that a batch reads its features while another computes.
    return min(64, max(2, available_cores()))


T = TypeVar("T")


def _parse_variant_map(
    raw: str, what: str, example: str, convert: Callable[[str], T], noun: str
) -> dict[str, T]:
    """Parse `NAME=VALUE,...` per variant; raises ValueError naming the bad part."""
    out: dict[str, T] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not is_variant_name(name):
            raise ValueError(f"variant {what} {part!r}: expected {example}")
        if name in out:
            raise ValueError(f"variant {name!r} has two {what}s")
        try:
            out[name] = convert(value)
        except ValueError:
            raise ValueError(f"variant {what} {part!r}: {value.strip()!r} is not {noun}") from None
    return out


def parse_weights(raw: str) -> dict[str, float]:
    """Parse `dare=0.5,coupled=0.5` into a dict; raises ValueError naming the bad part."""
    return _parse_variant_map(raw, "weight", "NAME=WEIGHT, e.g. dare=0.5", float, "a number")


def parse_depths(raw: str) -> dict[str, int]:
    """Parse `dare=5000,coupled=2000` into a dict; raises ValueError naming the bad part."""
    return _parse_variant_map(raw, "search depth", "NAME=BEHAVIORS, e.g. dare=5000", int, "an integer")


class Settings(BaseSettings):
    """Configuration of `dare-serve serve`; every field is also the env variable DARE_<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="DARE_",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )

    bundles: Path
    """Bundle root: `<bundles>/<variant>/<version>/`; the newest valid version of each variant serves."""

    redis_url: RedisDsn | None = None
    """Redis holding sequences and FM embeddings; unset: the in-memory store inside this process."""

    redis_cluster: bool = False
    """`DARE_REDIS_URL` points at one node of a Redis Cluster (the rest is discovered)."""

    redis_namespace: str = "dare"
    """Prefix of every Redis key, so several deployments (or test runs) can share one Redis."""

    redis_pool_size: int = Field(64, ge=1, le=10_000)
    """Most Redis connections (and feature-store calls in flight) at once."""

    feature_timeout_ms: float = Field(250.0, gt=0, le=60_000)
    """Budget of one feature-store call (connect, queue, read); past it the request gets 503."""

    retry_after_s: int = Field(1, ge=1, le=3600)
    """`Retry-After` seconds sent with 503 answers (feature store down, no model loaded)."""

    fm_ttl_s: float | None = Field(None, gt=0)
    """FM embeddings older than this many seconds are reported `stale`; unset: no age limit."""

    fm_use_expired: bool = True
    """Feed an FM embedding of the bundle's own FM version to the ranker even when older than
    `DARE_FM_TTL_S` (it stays in the model's input space; reported `stale`). Embeddings of another
    FM version are never fed."""

    store_max_events: int = Field(DEFAULT_MAX_LEN, ge=1, le=MAX_LEN_LIMIT)
    """Behaviors the feature store keeps per user (the newest; appends drop the oldest beyond it).
    `dare-serve ingest --max-events` writes with the same cap."""

    search_depth: int | None = Field(None, ge=1, le=MAX_LEN_LIMIT)
    """Newest stored behaviors read and searched per request; unset: all the store keeps
    (`DARE_STORE_MAX_EVENTS`). Independent of a bundle's `max_seq_len`, its training window."""

    variant_search_depth: Annotated[dict[str, int] | None, NoDecode] = None
    """Per-variant search depth, `dare=5000,coupled=2000`, over `DARE_SEARCH_DEPTH` for the variants
    it names."""

    variant_weights: Annotated[dict[str, float] | None, NoDecode] = None
    """Traffic split of the hash-based A/B assignment, `dare=0.5,coupled=0.5`; unset: equal weights
    over every loaded variant. Variants weighted 0 are reachable only with `X-Experiment`."""

    ab_salt: str = Field("dare-ab", min_length=1, max_length=64)
    """Salt of the A/B hash; change it to reshuffle users between arms."""

    admin_token: SecretStr | None = None
    """Bearer token of `/admin/*` (at least 16 characters); unset: the admin endpoints answer 404."""

    write_token: SecretStr | None = None
    """Bearer token of `POST /v1/events` (at least 16 characters); unset: open (demo)."""

    max_candidates: int = Field(1000, ge=1, le=100_000)
    """Most candidates in one score request; more gives 413."""

    warm_candidates: int = Field(200, ge=1, le=100_000)
    """Candidates per request of the batch each model runs at load (`DARE_BATCH_MAX_SIZE` requests,
    one without batching; at most `DARE_MAX_CANDIDATES`): batches up to that size never pay ONNX
    Runtime's arena growth, larger ones grow it once. Memory grows with it: a d=64 ranker peaked at
    0.44 GiB warmed at 32 x 200 and 0.93 GiB at 32 x 1,000."""

    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    """Largest request body accepted, in bytes; larger gives 413 before any parsing."""

    batch_enabled: bool = True
    """Coalesce concurrent score requests of one model into one feature read, search pass and
    ONNX call."""

    batch_max_size: int = Field(32, ge=1, le=4096)
    """Most requests in one batch."""

    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    """How long the first request of a batch waits for company while another batch is running (an
    idle service sends a lone request at once); 0: only what is already queued."""

    batch_max_concurrency: int = Field(default_factory=_default_batch_concurrency, ge=1, le=64)
    """Batches in flight at once: one per core, at least 2 (one can read features while another
    computes)."""

    compute_threads: int = Field(default_factory=_default_compute_threads, ge=1, le=256)
    """Worker threads running FAISS and ONNX Runtime (the event loop never does)."""

    search_threads: int = Field(default_factory=available_cores, ge=1, le=256)
    """Threads of the stage-1 engine: one large search is split by candidate rows across them, a
    batch's searches run side by side (CPU only; the GPU path uses FAISS's brute-force kernel)."""

    ort_threads: int = Field(1, ge=0, le=256)
    """ONNX Runtime intra-op threads per session (0: ORT's default, one per core). 1 suits small
    batches on a 2-core box, where thread hand-offs cost more than they save."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA execution provider when onnxruntime-gpu sees a GPU, else CPU; `cuda`: refuse to
    start without it; `cpu`: never use the GPU."""

    watch_bundles: bool = False
    """Poll the bundle root and load new versions without `/admin/reload`."""

    watch_interval_s: float = Field(5.0, gt=0, le=3600)
    """Seconds between two polls of the bundle root when `DARE_WATCH_BUNDLES` is on."""

    load_events: Path | None = None
    """Dataset folder whose `events.parquet` is loaded into the feature store at start-up (meant
    for the in-memory store; `serve --data`)."""

    load_fm_embeddings: Path | None = None
    """FM embeddings parquet (`dare-serve fm-embed --out`) loaded at start-up and made the active
    FM version (`serve --fm-embeddings`)."""

    impression_log: bool = False
    """Log the score requests of sampled users (arm, model version, candidates with scores and ranks,
    FM status) and their `POST /v1/events`, for `dare-serve ab-report`. Written off the request path:
    a log that is down or behind drops records (counted), never a request."""

    impression_log_url: RedisDsn | None = None
    """Redis (single node) holding the log streams; unset: `DARE_REDIS_URL`, and with neither, a
    bounded log inside this process (read through `GET /admin/log/{stream}`)."""

    impression_log_sample: float = Field(1.0, gt=0, le=1)
    """Share of users logged, chosen by a hash of the user id independent of the A/B split; a sampled
    user is logged whole (every request and event)."""

    impression_log_top_n: int | None = Field(None, ge=1, le=100_000)
    """Candidates logged per request, the best-ranked; unset: all of them."""

    impression_log_maxlen: int = Field(1_000_000, ge=1_000, le=1_000_000_000)
    """Entries each log stream keeps, the newest (`XADD MAXLEN ~`; Redis trims in whole nodes, so a
    stream may hold slightly more)."""

    impression_log_retention_s: float | None = Field(None, gt=0)
    """Also drop log entries older than this many seconds (`XTRIM MINID ~` with each write); unset:
    bounded by count only."""

    impression_log_queue: int = Field(10_000, ge=1, le=10_000_000)
    """Records waiting to be written; past it new records are dropped and counted."""

    impression_log_batch: int = Field(256, ge=1, le=10_000)
    """Most records per log write (one pipeline)."""

    impression_log_timeout_ms: float = Field(1000.0, gt=0, le=60_000)
    """Budget of one log write; a write that fails or runs past it drops its records (counted)."""

    @field_validator("variant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_weights(value) or None
        return value

    @field_validator("variant_search_depth", mode="before")
    @classmethod
    def _parse_depths(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_depths(value) or None
        return value

    @field_validator("variant_search_depth")
    @classmethod
    def _check_depths(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for name, depth in (value or {}).items():
            if not is_variant_name(name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '-', '.'")
            if depth < 1:
                raise ValueError(f"variant {name!r}: search depth {depth} must be >= 1")
        return value

    @field_validator("variant_weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        for name, weight in value.items():
            if not is_variant_name(name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '-', '.'")
            if not (weight >= 0 and weight < float("inf")):
                raise ValueError(f"variant {name!r}: weight {weight} must be finite and >= 0")
        if sum(value.values()) <= 0:
            raise ValueError("variant weights must not all be 0")
        return value

    @field_validator("redis_namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not is_namespace(value):
            raise ValueError(f"namespace must match {NAMESPACE_PATTERN.pattern}, got {value!r}")
        return value

    @field_validator("admin_token", "write_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if len(secret) < MIN_TOKEN_CHARS:
            raise ValueError(f"tokens need at least {MIN_TOKEN_CHARS} characters")
        if not secret.isprintable() or secret != secret.strip():
            raise ValueError("tokens must be printable without surrounding blanks")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.impression_log_url is not None and not self.impression_log:
            raise ValueError("DARE_IMPRESSION_LOG_URL is set but DARE_IMPRESSION_LOG is off")
        if self.redis_cluster and self.redis_url is None:
            raise ValueError("DARE_REDIS_CLUSTER needs DARE_REDIS_URL (the in-memory store has no cluster)")
        if (
            self.admin_token is not None
            and self.write_token is not None
            and self.admin_token.get_secret_value() == self.write_token.get_secret_value()
        ):
            raise ValueError("DARE_ADMIN_TOKEN and DARE_WRITE_TOKEN must differ (separate privileges)")
        depths = [("DARE_SEARCH_DEPTH", self.search_depth), *(self.variant_search_depth or {}).items()]
        deeper = [f"{name}={d}" for name, d in depths if d is not None and d > self.store_max_events]
        if deeper:
            raise ValueError(
                f"search depth {', '.join(deeper)} exceeds DARE_STORE_MAX_EVENTS={self.store_max_events}: "
                "the store keeps no more than that"
            )
        if self.batch_max_wait_ms > self.feature_timeout_ms:
            raise ValueError(
                "DARE_BATCH_MAX_WAIT_MS above DARE_FEATURE_TIMEOUT_MS would queue past the budget"
            )
        # A body of max_candidates ids needs at least two bytes per id ("1,"); a smaller limit would
        # turn valid requests into 413s.
        if self.max_body_bytes < 2 * self.max_candidates + 64:
            raise ValueError(
                f"DARE_MAX_BODY_BYTES={self.max_body_bytes} cannot hold DARE_MAX_CANDIDATES="
                f"{self.max_candidates} candidates"
            )
        return self

    @property
    def feature_timeout_s(self) -> float:
        return self.feature_timeout_ms / 1000.0

    def search_depth_of(self, variant: str) -> int:
        """Newest stored behaviors a request of `variant` reads and searches."""
        depths = self.variant_search_depth or {}
        depth = depths.get(variant, self.search_depth)
        return self.store_max_events if depth is None else depth

    @property
    def log_dsn(self) -> str | None:
        """Where the impression log goes: its own URL, else the feature store's; None for in-memory."""
        return str(self.impression_log_url) if self.impression_log_url is not None else self.redis_dsn

    @property
    def log_cluster(self) -> bool:
        """The log shares the feature store's Redis Cluster (a log URL of its own is one node)."""
        return self.impression_log_url is None and self.redis_cluster

    @property
    def redis_dsn(self) -> str | None:
        """The Redis URL as a plain string (what redis-py takes), or None for in-memory."""
        return None if self.redis_url is None else str(self.redis_url)


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = str(annotation) if "[" in str(annotation) or "|" in str(annotation) else text
    for noise in (
        "typing.",
        "pydantic.types.",
        "pydantic.networks.",
        "pathlib.",
        "Annotated[",
        ", NoDecode]",
    ):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None")


def settings_table_markdown() -> str:
    """The configuration table (env variable, type, default, meaning) generated from `Settings`."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = {
                "compute_threads": "cores",
                "search_threads": "cores",
                "batch_max_concurrency": "cores, at least 2",
            }.get(name, "computed")
        elif field.default is None:
            default = "unset"
        else:
            value = field.default
            default = f"`{str(value).lower() if isinstance(value, bool) else value}`"
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `DARE_{name.upper()}` | `{type_name}` | {default} | {description} |")
    return "\n".join(rows) + "\n"


# Where a document holds a copy of the table (README.md, docs/service.md).
SETTINGS_TABLE_MARKERS = re.compile(
    r"(<!-- settings-table:start -->\n\n)(.*?)(\n<!-- settings-table:end -->)", re.S
)


def with_settings_table(text: str) -> str:
    """`text` with the current table between each pair of settings-table markers."""
    return SETTINGS_TABLE_MARKERS.sub(lambda m: m[1] + settings_table_markdown() + m[3], text)
