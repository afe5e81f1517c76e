"""Property-based fuzzing of every endpoint from the service's own OpenAPI schema (schemathesis).

The app runs in-process (ASGI) with the tiny bundles and a real Redis namespace, with admin and
write tokens configured and sent, so every body reaches its handler. Valid and invalid inputs are
generated for every operation; every answer must be below 500 and match the schema (status code,
content type, headers, body). `DARE_FUZZ_EXAMPLES` sets the examples per operation and generation
mode (default 100: about 600 requests; `DARE_FUZZ_EXAMPLES=500` sends about 3,000).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings
from tests.conftest import ServedData, TinyModels
from tests.reliability.harness import ADMIN_TOKEN, LEAKS, WRITE_TOKEN, write_artifact

# Not `positive_data_acceptance`: a schema-valid request may be refused by what only the running
# service knows (an X-Experiment naming no loaded variant: 400; more than DARE_MAX_CANDIDATES: 413).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = int(os.environ.get("DARE_FUZZ_EXAMPLES", "100"))
TOKENS = {"/admin/": ADMIN_TOKEN, "/v1/events": WRITE_TOKEN}
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def api_schema(tiny_models: TinyModels, served: ServedData, redis_url: str) -> Iterator[Any]:
    settings_ = Settings(
        bundles=tiny_models.root,
        redis_url=redis_url,
        redis_namespace=served.fill_copy(redis_url, "fuzz"),
        admin_token=ADMIN_TOKEN,
        write_token=WRITE_TOKEN,
        feature_timeout_ms=2000.0,
    )
    app = create_app(settings_)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES, deterministic=True)
    yield schema
    asgi.shutdown_lifespans()  # the app's lifespan: Redis pool, threads
    total = sum(SEEN.values())
    by_status: Counter[int] = Counter()
    for (_, status), n in SEEN.items():
        by_status[status] += n
    write_artifact(
        "schema-fuzz",
        category="bad input",
        fault="schemathesis: positive and negative cases of every operation in /openapi.json",
        examples_per_operation_and_mode=EXAMPLES,
        requests=total,
        statuses={str(k): by_status[k] for k in sorted(by_status)},
        statuses_by_endpoint=_by_endpoint(),
        server_errors=sum(n for (_, status), n in SEEN.items() if status >= 500),
        lost=0,
    )


def _by_endpoint() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (endpoint, status), n in sorted(SEEN.items()):
        out.setdefault(endpoint, {})[str(status)] = n
    return out


def _integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integers(v) for v in value]
    if isinstance(value, dict):
        return {k: _integers(v) for k, v in value.items()}
    return value


def steer_to_the_handler(case: Any, label: str) -> None:
    """Make more positive cases reach the handler instead of an early, correct 4xx.

    JSON Schema counts 12.0 as an integer, the API refuses it on purpose (an id above 2**53 does
    not survive a float), so integral floats are sent as integers. Most generated X-Experiment
    values name no variant (400 before any scoring): two thirds are pointed at a loaded one.
    """
    if isinstance(case.body, dict | list):
        case.body = _integers(case.body)
    experiment = (case.headers or {}).get("x-experiment")
    if label == "POST /v1/score" and experiment is not None and len(experiment) % 3:
        case.headers["x-experiment"] = ("dare", "coupled")[len(experiment) % 2]


def _cases() -> list[tuple[str, GenerationMode]]:
    """(`METHOD /path`, mode) of every operation the app publishes; negative only where there is
    input to get wrong. The schema is static: building it needs no running app."""
    # Built without validation, so DARE_* variables of the environment cannot break collection.
    spec = create_app(Settings.model_construct(bundles=Path("."))).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            out.append((f"{method.upper()} {path}", GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody"):
                out.append((f"{method.upper()} {path}", GenerationMode.NEGATIVE))
    return out


@pytest.mark.parametrize("label,mode", _cases())
def test_operation_against_its_schema(api_schema: Any, label: str, mode: GenerationMode) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    token = next((t for prefix, t in TOKENS.items() if operation.path.startswith(prefix)), None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if mode is GenerationMode.POSITIVE:
            steer_to_the_handler(case, label)
        response = case.call(headers=headers)
        SEEN[(label, response.status_code)] += 1
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
        assert not any(marker in response.text for marker in LEAKS), response.text[:300]
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()
