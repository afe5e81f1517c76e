"""The Grafana dashboard and the Prometheus rules of deploy/: valid, and true to what the service exports.

The dashboard is checked by its structure (panels, datasource, targets) and by the metric names it
queries. With Debian's `prometheus` package installed, a real Prometheus scrapes a running server on
a loopback port, and every query of the dashboard and the rules is run against what it scraped;
`promtool` checks the rules file and fires each alert on made-up series (alerts.test.yml).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.core import Metric

from feature_store.base import StoreStats
from service.metrics import Metrics
from service.process import LOOPBACK, ServeProcess, free_port, stop_process
from tests.conftest import ServedData, TinyModels

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dare-serve.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS = "needs Debian's prometheus package (apt-get install prometheus; .ci/run installs it)"

# Panels whose series exist only after a failure (the test's server has none): valid, maybe empty.
MAY_BE_EMPTY = {
    ("Feature-store failures", "A"),
    ("Failed score requests", "A"),
    ("Log records dropped", "A"),
}
# What the dashboard must show (issue 22): traffic and latency per variant and stage, FM status,
# batch sizes, errors, impression-log drops.
REQUIRED = {
    "dare_score_requests_total",
    "dare_score_duration_seconds_bucket",
    "dare_stage_duration_seconds_bucket",
    "dare_fm_embeddings_total",
    "dare_batch_size_bucket",
    "dare_http_requests_total",
    "dare_feature_store_errors_total",
    "dare_impression_log_dropped_total",
    "dare_event_loop_lag_seconds_bucket",
}
METRIC_NAME = re.compile(r"\bdare_[a-z0-9_]+")


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _datasource_uid() -> str:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target, Grafana's variables as they are on `All`."""
    return [
        (p["title"], t["refId"], t["expr"].replace("$__rate_interval", "15s").replace("$variant", ".*"))
        for p in _panels()
        for t in p["targets"]
    ]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _exported_names() -> set[str]:
    """Every sample name the service's /metrics can carry (series appear on first use)."""
    metrics = Metrics()
    metrics.watch_store(StoreStats())
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    families: list[Metric] = list(metrics.registry.collect())
    return {f.name + s for f in families for s in suffixes[f.type]}


def test_dashboard_structure() -> None:
    board = _dashboard()
    uid = _datasource_uid()
    assert board["uid"] == "dare-serve" and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = _panels()
    assert len(panels) >= 15
    for p in panels:
        assert p["type"] in {"timeseries", "table", "stat"}, p["title"]
        assert p["title"] and p.get("description"), p["id"]
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        grid = p["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["targets"], f"{p['title']}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), (p["title"], t["refId"])
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid
    assert {v["name"] for v in board["templating"]["list"]} == {"variant"}


def test_dashboard_and_rules_query_metrics_the_service_exports() -> None:
    exported = _exported_names()
    queried = {name for _, _, expr in _dashboard_queries() for name in METRIC_NAME.findall(expr)}
    ruled = {name for rule in _rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert queried | ruled <= exported, f"not exported: {sorted((queried | ruled) - exported)}"
    assert queried >= REQUIRED, f"not on the dashboard: {sorted(REQUIRED - queried)}"
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert {
        "DareServeHigh5xxRate",
        "DareServeP99Latency",
        "DareServe503Burst",
        "DareServeImpressionLogDrops",
    } <= alerts


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_promtool_accepts_the_rules_and_fires_each_alert() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yml"], cwd=RULES.parent, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = subprocess.run(
        [PROMTOOL, "check", "config", str(RULES.parent / "prometheus.yml")], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr


@contextlib.contextmanager
def _prometheus(folder: Path, target: str) -> Iterator[str]:
    """A Prometheus on a free loopback port with deploy/prometheus/prometheus.yml pointed at `target`,
    scraping and evaluating the rules every second; its URL once ready."""
    assert PROMETHEUS is not None
    conf = yaml.safe_load((RULES.parent / "prometheus.yml").read_text())
    conf["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    conf["rule_files"] = [str(RULES)]
    (job,) = conf["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(conf))
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _query(url: str, expr: str) -> list[Any]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def _traffic(base: str, served: ServedData) -> None:
    """Requests that bring every series of the dashboard to life: both arms, FM hit and miss, a cold
    user, unknown items, an event, refused input."""
    with httpx.Client(base_url=base, timeout=10) as c:
        for i, user in enumerate([*served.fm_users[:4], *served.no_fm_users[:2], "nobody-at-all"]):
            for variant in ("dare", "coupled"):
                body = {"user_id": user, "candidates": [*served.items[i : i + 8], 10**12]}
                assert c.post("/v1/score", json=body, headers={"X-Experiment": variant}).status_code == 200
        event = {
            "user_id": served.users[0],
            "events": [{"item_id": served.items[0], "timestamp": served.now}],
        }
        assert c.post("/v1/events", json=event).status_code == 200
        assert c.post("/v1/score", json={"user_id": "u"}).status_code == 422
        assert c.post("/v1/score", json=body, headers={"X-Experiment": "nope"}).status_code == 400


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_every_query_of_the_dashboard_and_the_rules_runs_on_a_real_prometheus(
    tiny_models: TinyModels, served: ServedData, tmp_path: Path
) -> None:
    namespace = served.fill_copy(served.redis_url, "prom")
    env = {"DARE_REDIS_NAMESPACE": namespace, "DARE_IMPRESSION_LOG": "true"}
    with (
        ServeProcess(tiny_models.root, redis_url=served.redis_url, env=env) as server,
        _prometheus(tmp_path, f"{server.host}:{server.port}") as url,
    ):
        queries = _dashboard_queries()
        records = [(rule["record"], rule["expr"]) for rule in _rules() if "record" in rule]
        alerts = [(rule["alert"], rule["expr"]) for rule in _rules() if "alert" in rule]
        empty: set[tuple[str, str]] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            # traffic between scrapes, so every rate has two samples that differ
            _traffic(server.base, served)
            time.sleep(1.5)
            if not _query(url, 'up{job="dare-serve"} == 1'):
                continue
            empty = {(title, ref) for title, ref, expr in queries if not _query(url, expr)}
            empty |= {(name, "record") for name, expr in records if not _query(url, expr)}
            empty |= {(name, "recorded") for name, _ in records if not _query(url, name)}
            # and until a rate has seen the traffic (all zero, the quantiles are NaN: data, but no test)
            if empty <= MAY_BE_EMPTY and _query(url, "sum(rate(dare_score_requests_total[15s])) > 0"):
                break
        assert empty <= MAY_BE_EMPTY, f"no data: {sorted(empty - MAY_BE_EMPTY)}"
        # Alerts compare against thresholds the test's traffic never crosses: valid queries, no data.
        for _, expr in alerts:
            assert _query(url, expr) == []
        # The numbers are the service's: the 5xx share is 0 (the 4xx answers are not 5xx).
        (ratio,) = _query(url, dict(records)["dare:http_5xx_ratio:rate5m"])
        assert float(ratio["value"][1]) == 0.0
        variants = {
            r["metric"]["variant"] for r in _query(url, "sum by (variant) (dare_score_requests_total)")
        }
        assert variants == {"dare", "coupled"}
