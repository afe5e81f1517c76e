"""Service settings: one pydantic-settings class, environment variables prefixed `DARE_`.

Every field carries a docstring; `settings_table_markdown()` turns them into the configuration
table of the README and docs/service.md, so the table cannot drift from the code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, RedisDsn, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Shorter bearer tokens are guessable by brute force over a network; refuse them at start-up.
MIN_TOKEN_CHARS = 16


def _default_compute_threads() -> int:
    # One worker thread per two cores: the event loop (JSON, Redis replies) needs a core too, and
    # ORT/FAISS calls of a batch already use several threads each on bigger boxes.
    return max(1, (os.cpu_count() or 1) // 2)


def parse_weights(raw: str) -> dict[str, float]:
    """Parse `dare=0.5,coupled=0.5` into a dict; raises ValueError naming the bad part."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not _VARIANT.match(name):
            raise ValueError(f"variant weight {part!r}: expected NAME=WEIGHT, e.g. dare=0.5")
        if name in weights:
            raise ValueError(f"variant {name!r} is weighted twice")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"variant weight {part!r}: {value.strip()!r} is not a number") from None
    return weights


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

    batch_max_concurrency: int = Field(2, ge=1, le=64)
    """Batches in flight at once: one can read features while another computes."""

    compute_threads: int = Field(default_factory=_default_compute_threads, ge=1, le=256)
    """Worker threads running FAISS and ONNX Runtime (the event loop never does)."""

    search_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
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

    @field_validator("variant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_weights(value) or None
        return value

    @field_validator("variant_weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        for name, weight in value.items():
            if not _VARIANT.match(name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '-', '.'")
            if not (weight >= 0 and weight < float("inf")):
                raise ValueError(f"variant {name!r}: weight {weight} must be finite and >= 0")
        if sum(value.values()) <= 0:
            raise ValueError("variant weights must not all be 0")
        return value

    @field_validator("redis_namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {value!r}")
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
        if self.redis_cluster and self.redis_url is None:
            raise ValueError("DARE_REDIS_CLUSTER needs DARE_REDIS_URL (the in-memory store has no cluster)")
        if (
            self.admin_token is not None
            and self.write_token is not None
            and self.admin_token.get_secret_value() == self.write_token.get_secret_value()
        ):
            raise ValueError("DARE_ADMIN_TOKEN and DARE_WRITE_TOKEN must differ (separate privileges)")
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
            default = {"compute_threads": "cores / 2", "search_threads": "cores"}.get(name, "computed")
        elif field.default is None:
            default = "unset"
        else:
            value = field.default
            default = f"`{str(value).lower() if isinstance(value, bool) else value}`"
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `DARE_{name.upper()}` | `{type_name}` | {default} | {description} |")
    return "\n".join(rows) + "\n"
