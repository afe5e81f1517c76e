"""The application state the lifespan builds once and every handler reads."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.trace import Tracer

from feature_store.base import FeatureStore
from service.impression_log import LogWriter
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.schemas import DeviceInfo
from service.scoring import Scorer
from service.settings import Settings


@dataclass(frozen=True, slots=True)
class AppState:
    """Everything a request needs; frozen (the registry swaps its own snapshot atomically)."""

    settings: Settings
    store: FeatureStore
    registry: ModelRegistry
    scorer: Scorer
    metrics: Metrics
    device: DeviceInfo
    started_at: float
    log: LogWriter | None = None  # the impression log, when DARE_IMPRESSION_LOG is on
    tracer: Tracer | None = None  # OpenTelemetry spans of the stages, when tracing is on


STATE_KEY = "dare"
"""Key of the AppState in the lifespan state (`request.state.dare`)."""
