"""The contract as FastAPI publishes it, and the documented examples, run against the app."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.service.conftest import ServedData, TestClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def test_openapi_lists_the_contract(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/v1/score", "/v1/events", "/v1/users/{user_id}/sequence", "/v1/models",
        "/healthz", "/readyz", "/metrics", "/admin/reload",
    }  # fmt: skip
    score = spec["paths"]["/v1/score"]["post"]
    assert {"400", "413", "422", "503"} <= set(score["responses"])
    assert "application/problem+json" in score["responses"]["413"]["content"]
    request = spec["components"]["schemas"]["ScoreRequest"]
    assert set(request["properties"]) == {"user_id", "candidates", "explain", "timestamp"}
    assert request["required"] == ["user_id", "candidates"]
    assert any(p["name"] == "x-experiment" for p in score["parameters"])


def test_documented_requests_work(client: TestClient, served: ServedData) -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
    score_example = json.loads(next(b for b in blocks if '"candidates"' in b and "scores" not in b))
    events_example = json.loads(next(b for b in blocks if '"events"' in b))
    r = client.post("/v1/score", json=score_example)
    assert r.status_code == 200 and len(r.json()["scores"]) == len(score_example["candidates"])
    documented = json.loads(next(b for b in blocks if '"scores"' in b))
    assert set(documented) == set(r.json()) and set(documented["user"]) == set(r.json()["user"])
    events_example["user_id"] = "doc-example-user"
    assert client.post("/v1/events", json=events_example).status_code == 200
