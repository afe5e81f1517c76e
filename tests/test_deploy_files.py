"""Dockerfile, compose file and Kubernetes manifests name only things that exist in the project.

No Docker engine runs in CI, so these files are checked by parsing: every copied path exists, every
pip extra is declared, the entry point and its subcommand exist, every DARE_* variable is a setting,
and the probes hit real routes.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> list[str]:
    """Logical Dockerfile lines (continuations joined, comments dropped)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _args(lines: list[str]) -> dict[str, str]:
    return dict(m.groups() for ln in lines if (m := re.match(r"ARG (\w+)=(\S+)", ln)))


def _settings_env() -> set[str]:
    return {f"DARE_{name.upper()}" for name in Settings.model_fields} | {"DARE_HOST", "DARE_PORT"}


def test_dockerfile_copies_existing_paths_and_declared_extras() -> None:
    lines = _dockerfile()
    args = _args(lines)
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    stages = {m.group(1) for ln in lines if (m := re.match(r"FROM \S+ AS (\S+)", ln))}
    assert {"cpu", "gpu", "build-cpu", "build-gpu"} <= stages
    assert lines[[i for i, ln in enumerate(lines) if ln.startswith("FROM")][-1]].endswith("AS gpu"), (
        "gpu must be the last stage: the default target"
    )
    copies = 0
    for ln in lines:
        if not ln.startswith("COPY") or "--from=" in ln:
            continue
        parts = [p for p in shlex.split(ln)[1:] if not p.startswith("--")]
        for src in parts[:-1]:
            src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the project"
            copies += 1
    assert copies >= 8
    # Each build stage installs its extra's lock file (hash-checked), then the project without deps.
    used = set(re.findall(r"-r requirements/serve-(\w+)\.txt", "\n".join(lines)))
    assert used == {"cpu", "gpu"} and used <= extras
    installs = [ln for ln in lines if "pip install" in ln]
    assert all("--require-hashes" in ln and "--no-deps" in ln for ln in installs)


def test_dockerfile_runs_the_service_as_non_root_with_a_health_check() -> None:
    lines = _dockerfile()
    for stage in ("cpu", "gpu"):
        start = next(i for i, ln in enumerate(lines) if ln.endswith(f"AS {stage}"))
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("FROM")), len(lines))
        body = lines[start:end]
        assert any(ln == "USER dare" for ln in body), f"{stage}: runs as root"
        assert any(ln.startswith("HEALTHCHECK") and "/healthz" in ln for ln in body)
        assert 'ENTRYPOINT ["dare-serve", "serve"]' in body
        for env in (ln for ln in body if ln.startswith("ENV")):
            for name in re.findall(r"(DARE_\w+)=", env):
                assert name in _settings_env(), f"{stage}: {name} is not a setting"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dare-serve"] == "service.cli:app"
    from service.cli import app

    assert "serve" in {c.name or c.callback.__name__ for c in app.registered_commands}


def test_compose_file_refers_to_real_things() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "ranker", "locust"} <= set(services)
    build = services["ranker"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert any(ln.endswith(f"AS {build['target']}") for ln in _dockerfile())
    for name in services["ranker"]["environment"]:
        assert name in _settings_env()
    Settings(bundles=Path("."), variant_weights=services["ranker"]["environment"]["DARE_VARIANT_WEIGHTS"])
    cmd = services["locust"]["command"]
    assert (ROOT / cmd[cmd.index("-f") + 1]).is_file()


def test_compose_monitoring_scrapes_the_ranker_and_provisions_grafana() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {"prometheus", "grafana"} <= set(services)
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            host, _, inside = volume.partition(":")
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name} mounts {host}, which is not in the project"
                mounts[inside.removesuffix(":ro")] = ROOT / host
    # Prometheus reads its config and the rules beside it, and scrapes the ranker's published port.
    config = yaml.safe_load((mounts["/etc/prometheus"] / "prometheus.yml").read_text())
    assert all((mounts["/etc/prometheus"] / rules).is_file() for rules in config["rule_files"])
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == "ranker:" + services["ranker"]["ports"][0].split(":")[-1]
    assert job.get("metrics_path", "/metrics") in set(
        create_app(Settings(bundles=Path("."))).openapi()["paths"]
    )
    # Grafana's datasource is that Prometheus; the dashboard folder holds the dashboard its panels use.
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:" + services["prometheus"]["ports"][0].split(":")[-1]
    (provider,) = yaml.safe_load((provisioning / "dashboards/dare-serve.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (mounts["/var/lib/grafana/dashboards"] / "dare-serve.json").is_file()


def test_kubernetes_manifests_probe_real_routes() -> None:
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "deploy" / "k8s").glob("*.yaml")}
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml"}
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    routes = set(create_app(Settings(bundles=Path("."))).openapi()["paths"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for env in container["env"]:
        assert env["name"] in _settings_env()
    assert docs["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]
    assert docs["deployment.yaml"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
