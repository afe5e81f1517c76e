"""Security: bearer tokens over real HTTP, constant-time comparison, no unsafe deserialization,
bundle paths confined to the bundle root, and error bodies without stack traces.

The admin and write token matrices of the in-process app are in tests/service (test_lifecycle,
test_events), the non-root container in tests/test_deploy_files.py; this module covers the real
server process and the properties that need a look at the code itself.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.process import ServeProcess
from service.registry import ModelRegistry
from tests.conftest import ServedData, TinyModels
from tests.reliability.harness import (
    ADMIN_TOKEN,
    LEAKS,
    ROOT,
    WRITE_TOKEN,
    Call,
    Record,
    problem_issue,
    send,
    server_process,
    statuses,
    write_artifact,
)
from tests.service.conftest import TestClient
from tests.support import add_version

SOURCES = [ROOT / d for d in ("service", "exporters", "feature_store", "loadtest", "benchmarks")]
SENT: list[Record] = []


@pytest.fixture(scope="module")
def server(served: ServedData, redis_url: str, bundle_root: Path, workdir: Path) -> Iterator[ServeProcess]:
    namespace = served.fill_copy(redis_url, "security")
    proc = server_process(
        workdir,
        bundle_root,
        redis_url,
        redis_namespace=namespace,
        admin_token=ADMIN_TOKEN,
        write_token=WRITE_TOKEN,
    )
    with proc:
        yield proc
    log = proc.log_text()
    assert ADMIN_TOKEN not in log and WRITE_TOKEN not in log, "a token reached the log"
    write_artifact(
        "security-tokens",
        category="security",
        fault="bearer tokens of /admin/reload and /v1/events over HTTP: missing, malformed, wrong, right",
        requests=len(SENT),
        statuses=statuses(SENT),
        statuses_by_endpoint={
            p: statuses(r for r in SENT if r.call.path == p) for p in sorted({r.call.path for r in SENT})
        },
        lost=0,
    )


def _variants(token: str) -> list[tuple[str, str | None, int]]:
    """(case, Authorization header, expected status) for one endpoint's token."""
    return [
        ("no header", None, 401),
        ("empty", "", 401),
        ("bare token without scheme", token, 401),
        ("Basic scheme", f"Basic {token}", 401),
        ("Bearer without token", "Bearer", 401),
        ("wrong token, same length", "Bearer " + "x" * len(token), 403),
        ("prefix of the token", f"Bearer {token[:-1]}", 403),
        ("token plus a character", f"Bearer {token}x", 403),
        ("the other endpoint's token", f"Bearer {WRITE_TOKEN if token == ADMIN_TOKEN else ADMIN_TOKEN}", 403),
        ("right token, lower-case scheme", f"bearer {token}", 200),
        ("right token", f"Bearer {token}", 200),
    ]


ENDPOINTS = {
    "/admin/reload": (ADMIN_TOKEN, None),
    "/v1/events": (WRITE_TOKEN, {"user_id": "security-writer", "events": [{"item_id": 1, "timestamp": 1}]}),
}


@pytest.mark.parametrize(
    "path,case,header,status",
    [(path, *v) for path, (token, _) in ENDPOINTS.items() for v in _variants(token)],
    ids=[f"{path}-{v[0]}" for path, (token, _) in ENDPOINTS.items() for v in _variants(token)],
)
def test_bearer_tokens_over_http(
    server: ServeProcess, path: str, case: str, header: str | None, status: int
) -> None:
    headers = {} if header is None else {"Authorization": header}
    with httpx.Client(base_url=server.base, timeout=30) as client:
        r = send(client, Call("POST", path, case, json=ENDPOINTS[path][1], headers=headers))
    SENT.append(r)
    if status == 200:
        assert r.status == 200, r.body[:300]
    else:
        assert problem_issue(r, status) is None, (r.status, r.body[:300])
        assert ADMIN_TOKEN not in r.body.decode() and WRITE_TOKEN not in r.body.decode()
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_tokens_never_appear_in_answers(server: ServeProcess) -> None:
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for path in ("/v1/models", "/metrics", "/openapi.json", "/readyz", "/healthz"):
            text = client.get(path).text
            assert ADMIN_TOKEN not in text and WRITE_TOKEN not in text, path


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    """(dotted name, node) of every call whose function is a plain or dotted name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, fn = [], node.func
            while isinstance(fn, ast.Attribute):
                parts.append(fn.attr)
                fn = fn.value
            if isinstance(fn, ast.Name):
                yield ".".join([fn.id, *reversed(parts)]), node


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "missing"


# yaml.load and friends build arbitrary objects; eval/exec run text as code.
UNSAFE_CALLS = {
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "pd.read_pickle",
    "pandas.read_pickle",
    "eval",
    "exec",
}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def test_no_unsafe_deserialization_anywhere() -> None:
    files = [p for d in SOURCES for p in d.rglob("*.py")]
    assert len(files) > 30
    problems: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [n for n in names if n.split(".")[0] in UNSAFE_MODULES]
                problems += [f"{where}:{node.lineno}: imports {n}" for n in bad]
        for name, call in _calls(tree):
            line = f"{where}:{call.lineno}: {name}"
            # numpy >= 1.16.3 refuses pickles unless allow_pickle=True: absent or False is safe.
            if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (False, "missing"):
                problems.append(f"{line} with allow_pickle other than False")
            elif name == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{line} without weights_only=True")
            elif name in UNSAFE_CALLS:
                problems.append(line)
    assert not problems, problems


def test_tokens_are_compared_in_constant_time() -> None:
    """Every comparison involving a secret goes through hmac.compare_digest, never == or !=."""
    compared_with_digest = 0
    for path in (ROOT / "service").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and "get_secret_value" in ast.unparse(node):
                # the only allowed one: Settings refusing equal admin and write tokens at start-up
                assert path.name == "settings.py", f"{path}:{node.lineno}: {ast.unparse(node)}"
        compared_with_digest += sum(1 for name, _ in _calls(tree) if name == "hmac.compare_digest")
    assert compared_with_digest >= 1


async def test_symlinked_variant_outside_the_root_is_refused(tiny_models: TinyModels, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(tiny_models.root / "coupled", root / "coupled")
    (outside / "evil").mkdir(parents=True)
    add_version(outside, tiny_models.root / "dare" / "1", "evil", 1)
    (root / "evil").symlink_to(outside / "evil", target_is_directory=True)
    registry = ModelRegistry(
        root, providers=["CPUExecutionProvider"], ort_threads=1, configured_weights=None, metrics=Metrics()
    )
    report = await registry.reload()
    assert report.serving == {"coupled": "1"} and set(registry.current.models) == {"coupled"}
    assert [(r.variant, r.version) for r in report.refused] == [("evil", "1")]
    assert "outside the bundle root" in report.refused[0].reason


def test_unexpected_errors_are_answered_without_internals() -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=4096)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail from /srv/dare/internal.py line 42")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "boom-1"})
    record = Record(
        Call("GET", "/boom", "boom"),
        r.status_code,
        0,
        0,
        {k.lower(): v for k, v in r.headers.items()},
        r.content,
    )
    assert problem_issue(record, 500) is None
    assert r.json()["type"].endswith("internal") and r.json()["request_id"] == "boom-1"
    assert "secret detail" not in r.text and "RuntimeError" not in r.text
    assert not any(marker in r.text for marker in LEAKS)
