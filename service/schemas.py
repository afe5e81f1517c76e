"""API models (pydantic v2): the request and response bodies of the HTTP contract in docs/service.md."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

INT64_MAX = 2**63 - 1
UINT32_MAX = 2**32 - 1  # the feature store keeps timestamps as uint32 seconds (until 2106)

# Strict: "12" and 12.0 are refused rather than coerced, so a client bug shows up as a 422.
ItemId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX, description="item id, non-negative int64")]
Timestamp = Annotated[int, Field(strict=True, ge=0, le=UINT32_MAX, description="seconds since the epoch")]
UserId = Annotated[str, Field(min_length=1, max_length=256, description="user id")]


class ScoreRequest(BaseModel):
    """`POST /v1/score` body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": "u42", "candidates": [101, 202, 303], "explain": False}]},
    )

    user_id: UserId
    candidates: list[ItemId] = Field(
        min_length=1, description="item ids to score (1 to DARE_MAX_CANDIDATES; duplicates allowed)"
    )
    explain: StrictBool = Field(False, description="add the retrieved behaviors and attention per candidate")
    timestamp: Timestamp | None = Field(
        None,
        description="score as of this time: the reference clock of the behaviors' ages "
        "(default: now); behaviors are not filtered by it",
    )


class ExplainedBehavior(BaseModel):
    """One behavior retrieved by stage 1 for a candidate, with its stage-2 attention weight."""

    item_id: int
    timestamp: int
    attention: float
    recent: bool = Field(
        description="kept by recency: one of the user's newest behaviors that a ranker trained with "
        "recent_k > 0 always retrieves; false: chosen by the attention search"
    )


class ExplainedCandidate(BaseModel):
    """The top-K behaviors of one candidate: those kept by recency first (newest first), then the
    searched ones, best first by stage-1 score."""

    item_id: int
    effective_behaviors: float = Field(
        description="exp(entropy) of the attention weights: how many behaviors the candidate "
        "effectively attends to (the list's length for mean pooling, 1 for one behavior, 0 for none)"
    )
    behaviors: list[ExplainedBehavior]


class FmHistorySummary(BaseModel):
    """The user's FM-history entries as a variant trained with an FM history read them."""

    entries: int = Field(
        description="entries fed to the ranker: the newest of its FM and encoder versions before the "
        "request time, up to the length it was trained with"
    )
    stale: int = Field(
        description="entries before the request time left out: of another FM or encoder version"
    )


class UserSummary(BaseModel):
    """What the service found about the user."""

    sequence_length: int = Field(
        description="behaviors read and searched (the newest stored, up to the variant's search depth)"
    )
    fm_embedding: Literal["hit", "miss", "stale"]
    cold_start: bool = Field(
        description="no behaviors, no FM embedding and no FM-history entries fed to the ranker"
    )
    fm_history: FmHistorySummary | None = Field(
        None, description="only for a variant trained with an FM history (absent otherwise)"
    )


class ScoreResponse(BaseModel):
    """`POST /v1/score` 200 body."""

    request_id: str
    variant: str
    model_version: str
    scores: list[float] = Field(description="click probability of candidates[i], same order")
    user: UserSummary
    unknown_items: int = Field(0, description="candidates the model does not know (scored as unknown)")
    explain: list[ExplainedCandidate] | None = None


EventType = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9_.-]{0,31}$",
        description="what the user did (lower-case name, e.g. click, purchase); outcomes of the "
        "impression log are counted by type",
    ),
]


class Event(BaseModel):
    """One behavior."""

    model_config = ConfigDict(extra="forbid")
    item_id: ItemId
    timestamp: Timestamp


class EventsRequest(BaseModel):
    """`POST /v1/events` body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": "u42", "events": [{"item_id": 7, "timestamp": 1700000000}]}]
        },
    )
    user_id: UserId
    events: list[Event] = Field(min_length=1, max_length=10_000)
    type: EventType = "click"


class EventsResponse(BaseModel):
    """`POST /v1/events` 200 body."""

    user_id: str
    appended: int
    sequence_length: int = Field(description="stored behaviors after the append (capped)")


class ModelInfo(BaseModel):
    """One serving model."""

    variant: str
    version: str
    model: str
    dims: dict[str, int]
    top_k: int
    max_seq_len: int = Field(description="the training window (history length the model was trained on)")
    search_depth: int = Field(description="newest stored behaviors read and searched per request")
    n_items: int
    fm_version: str | None
    metrics: dict[str, Any]
    created_at: str
    loaded_at: float
    weight: float = Field(description="share of hash-assigned traffic")
    execution_providers: list[str]


class DeviceInfo(BaseModel):
    """Where stage 1 and stage 2 run."""

    setting: str
    execution_providers: list[str] = Field(description="ONNX Runtime providers in use, by priority")
    available_providers: list[str]
    faiss_gpus: int
    faiss_device: Literal["cpu", "cuda"]


class ModelsResponse(BaseModel):
    """`GET /v1/models` body."""

    variants: list[ModelInfo]
    weights: dict[str, float]
    device: DeviceInfo
    batching: dict[str, Any]
    store_max_events: int = Field(description="behaviors the feature store keeps per user (its cap)")


class RefusedBundle(BaseModel):
    variant: str
    version: str
    reason: str


class ReloadResponse(BaseModel):
    """`POST /admin/reload` 200 body."""

    changed: bool
    loaded: list[dict[str, str]]
    refused: list[RefusedBundle]
    serving: dict[str, str]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    serving: dict[str, str]
    feature_store: str


class Problem(BaseModel):
    """RFC 9457 problem details (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries documenting problem+json answers."""
    return {
        code: {
            "model": Problem,
            "content": {"application/problem+json": {}},
            "description": "problem details",
        }
        for code in codes
    }


class UserSequence(BaseModel):
    """`GET /v1/users/{user_id}/sequence` body: what the feature store holds for a user."""

    user_id: str
    sequence_length: int = Field(description="behaviors stored for the user (the store keeps the newest)")
    events: list[Event] = Field(description="the newest `limit` behaviors, oldest first")


class ExampleUser(BaseModel):
    """A user the inspector page offers, with the length of their stored sequence."""

    user_id: str
    sequence_length: int


class InspectorExamples(BaseModel):
    """`GET /inspector/examples` body: starting points for the inspector page."""

    users: list[ExampleUser] = Field(description="users of the dataset loaded at start-up, longest first")
    users_source: str | None = Field(description="where the users come from; null when none is known")
    items: list[int] = Field(description="a spread of item ids that every serving variant knows")


class LogEntryBody(BaseModel):
    """One log entry: its stream id (`<ms>-<seq>`, when it was written) and the record."""

    id: str
    record: dict[str, Any]


class LogPage(BaseModel):
    """`GET /admin/log/{stream}` body."""

    stream: Literal["impressions", "events"]
    entries: list[LogEntryBody]
    next: str | None = Field(description="pass as `after` for the next page; null: nothing more now")
