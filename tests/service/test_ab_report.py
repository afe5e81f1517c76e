"""`dare-serve log export` and `dare-serve ab-report` on a log the real app wrote to a real Redis:
the export holds every logged candidate, the report's numbers are the readout of those rows,
and bad input gets a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from service.ab_report import ReportPlan, build_report, report_dict
from service.app import create_app
from service.cli import app as cli
from service.core.ab import assign_variant
from service.core.experiment import ReadoutConfig
from tests.conftest import ServedData
from tests.service.conftest import SettingsFactory, TestClient

START = 2_000_000_000  # the test's start; the pre-period is the hour before
K = 3


@dataclass(frozen=True)
class Experiment:
    redis_url: str
    namespace: str
    answers: list[dict[str, Any]]  # every score response, with its request's timestamp
    clicks: int


@pytest.fixture(scope="module")
def experiment(make_settings: SettingsFactory, served: ServedData) -> Iterator[Experiment]:
    """A small test run through the real app: users are scored before and after START, and click
    the item ranked first with a probability that is their own (so pre- and in-test rates correlate)."""
    namespace = served.fill_copy(served.redis_url, "abreport")
    settings = make_settings(redis_namespace=namespace, impression_log=True)
    rng = np.random.default_rng(9)
    users = served.users[:80]
    propensity = dict(zip(users, rng.uniform(0.05, 0.9, len(users)), strict=True))
    answers, clicks = [], 0
    with TestClient(create_app(settings)) as c:
        for when in (START - 1800, START + 60, START + 600, START + 1200):
            for user in users:
                cands = rng.choice(served.items, 8, replace=False).tolist()
                r = c.post("/v1/score", json={"user_id": user, "candidates": cands, "timestamp": when})
                assert r.status_code == 200
                answers.append(r.json() | {"ts": when, "candidates": cands, "user_id": user})
                if rng.random() < propensity[user]:
                    best = cands[int(np.argmax(r.json()["scores"]))]
                    event = {"item_id": best, "timestamp": when + 30}
                    assert c.post("/v1/events", json={"user_id": user, "events": [event]}).status_code == 200
                    clicks += 1
        # organic behavior (no impression) and another event type: never outcomes
        c.post("/v1/events", json={"user_id": users[0], "events": [{"item_id": 1, "timestamp": START + 5}]})
        c.post(
            "/v1/events",
            json={"user_id": users[1], "type": "view", "events": [{"item_id": 1, "timestamp": 9}]},
        )
    yield Experiment(served.redis_url, namespace, answers, clicks)


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_export_holds_every_logged_candidate(experiment: Experiment, tmp_path: Path) -> None:
    result = _run("log", "export", "--redis-url", experiment.redis_url, "--namespace", experiment.namespace,
                  "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.output.strip().splitlines()[-1])
    imps = pd.read_parquet(tmp_path / "impressions.parquet")
    events = pd.read_parquet(tmp_path / "events.parquet")
    assert summary["impressions"]["requests"] == len(experiment.answers) == imps["log_id"].nunique()
    assert len(imps) == 8 * len(experiment.answers) == summary["impressions"]["rows"]
    assert len(events) == experiment.clicks + 2
    # one request, row by row, against its response
    first = experiment.answers[0]
    rows = imps[imps["request_id"] == first["request_id"]]
    assert rows["item_id"].tolist() == first["candidates"] and rows["score"].tolist() == first["scores"]
    assert (rows["ts"] == first["ts"]).all() and (rows["variant"] == first["variant"]).all()
    assert sorted(rows["rank"].tolist()) == list(range(1, 9))


def test_report_is_the_readout_of_the_exported_rows(experiment: Experiment, tmp_path: Path) -> None:
    folder = tmp_path / "log"
    _run("log", "export", "--redis-url", experiment.redis_url, "--namespace", experiment.namespace,
         "--out", str(folder))  # fmt: skip
    out_json, png = tmp_path / "report.json", tmp_path / "report.png"
    args = ["--since", str(START), "--pre-period", "1h", "--window", "5m", "--k", str(K),
            "--bootstrap", "200", "--weights", "dare=0.5,coupled=0.5"]  # fmt: skip
    result = _run("ab-report", "--log", str(folder), *args, "--json", str(out_json), "--png", str(png))
    assert result.exit_code == 0, result.output
    assert "SRM passed" in result.output and "user rate@3" in result.output
    report = orjson.loads(out_json.read_bytes())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same numbers from the library on the same rows
    imps, events = pd.read_parquet(folder / "impressions.parquet"), pd.read_parquet(folder / "events.parquet")
    plan = ReportPlan(
        start=START, pre_period_s=3600, window_s=300, weights={"dare": 0.5, "coupled": 0.5},
        config=ReadoutConfig(k=K, n_boot=200),
    )  # fmt: skip
    expected = orjson.loads(orjson.dumps(report_dict(build_report(imps, events, plan))))
    assert report == expected

    # and against the raw answers: every user in the arm the hash gives them, clicks only where sent
    in_test = [a for a in experiment.answers if a["ts"] >= START]
    split = {"dare": 0.5, "coupled": 0.5}
    assert all(a["variant"] == assign_variant(a["user_id"], "dare-ab", split) for a in in_test)
    per_arm = {arm["variant"]: arm["users"] for arm in report["arms"]}
    assert per_arm == {v: len({a["user_id"] for a in in_test if a["variant"] == v}) for v in per_arm}
    assert sum(per_arm.values()) == 80
    for arm in report["arms"]:
        assert arm["requests"] == sum(1 for a in in_test if a["variant"] == arm["variant"])
        assert arm["shown"] == K * arm["requests"]
    assert report["attribution"]["unattributed"] == 1 and report["attribution"]["other_types"] == 1
    assert report["attribution"]["attributed"] == experiment.clicks
    (comparison,) = report["comparisons"]
    assert comparison["control"] == "coupled" and comparison["treatment"] == "dare"
    assert report["pre_period_users"] == 80 and comparison["cuped"] is not None
    assert comparison["variance_reduction"] > 0, "pre-period rates predict in-test rates"


def test_report_from_redis_equals_report_from_the_export(experiment: Experiment, tmp_path: Path) -> None:
    _run("log", "export", "--redis-url", experiment.redis_url, "--namespace", experiment.namespace,
         "--out", str(tmp_path))  # fmt: skip
    common = ["--since", str(START), "--k", str(K), "--bootstrap", "50", "--format", "json"]
    from_redis = _run(
        "ab-report", "--redis-url", experiment.redis_url, "--namespace", experiment.namespace, *common
    )
    from_folder = _run("ab-report", "--log", str(tmp_path), *common)
    assert from_redis.exit_code == from_folder.exit_code == 0
    assert orjson.loads(from_redis.output) == orjson.loads(from_folder.output)


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "give exactly one log source"),
        (["--log", "/no/such/folder"], "no such file"),
        (["--log", ".", "--since", "yesterday"], "neither epoch seconds nor an ISO 8601"),
        (["--log", ".", "--window", "soon"], "is not a duration"),
        (["--log", ".", "--since", "2000", "--until", "1000"], "ends"),
        (["--log", ".", "--format", "xml"], "--format must be"),
        (["--log", ".", "--k", "0"], "k must be"),
        (["--server", "http://127.0.0.1:1"], "admin token"),
    ],
)
def test_bad_report_input_is_refused(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["ab-report", *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
