"""The contract as FastAPI publishes it, and the documented examples, run against the app."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from service.cli import app
from tests.conftest import ServedData
from tests.service.conftest import TestClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"
# The published contract, checked in; any change to the live schema shows up as a diff against it.
SNAPSHOT = Path(__file__).with_name("openapi.json")
REGENERATE = ".venv/bin/dare-serve openapi --out tests/service/openapi.json"


def differences(live: object, pinned: object, at: str = "") -> list[str]:
    """Where two JSON values differ, one line per place (keys joined with ' > ')."""
    if isinstance(live, dict) and isinstance(pinned, dict):
        found = []
        for key in sorted(set(live) | set(pinned)):
            where = f"{at} > {key}" if at else key
            if key not in live:
                found.append(f"{where}: only in the snapshot")
            elif key not in pinned:
                found.append(f"{where}: only in the live schema")
            else:
                found += differences(live[key], pinned[key], where)
        return found
    return [] if live == pinned else [f"{at}: snapshot {pinned!r}, live {live!r}"]


def test_openapi_is_the_checked_in_contract(client: TestClient) -> None:
    found = differences(client.get("/openapi.json").json(), json.loads(SNAPSHOT.read_text()))
    listed = "\n  ".join(found[:20])
    assert not found, f"the API contract changed:\n  {listed}\nif deliberate, regenerate: {REGENERATE}"


def test_openapi_command_prints_the_served_schema(client: TestClient) -> None:
    result = CliRunner().invoke(app, ["openapi"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == client.get("/openapi.json").json()


def test_openapi_lists_the_contract(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/v1/score", "/v1/events", "/v1/users/{user_id}/sequence", "/v1/models",
        "/healthz", "/readyz", "/metrics", "/admin/reload", "/admin/log/{stream}",
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
