"""Fixtures of the load-test tests: a real `dare-serve serve` process over the tiny bundles and Redis.

The server gets a Redis namespace of its own, filled at start-up from the tiny dataset (`--data`)
and an FM embeddings file, because the load test appends events: the service tests' namespace
(`served`) must keep its exact histories.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from service import readiness
from tests.conftest import TinyModels
from tests.redis_proc import free_port
from tests.service.test_serve_process import _cli, _env


@dataclass(frozen=True)
class Server:
    """A running `dare-serve serve` and the dataset it serves."""

    base: str
    data: Path
    log: Path


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    """Poll /readyz until 200; fail with the server's log when it exits or never gets ready."""
    assert readiness.wait_ready(base, timeout, alive=lambda: proc.poll() is None), (
        f"server not ready (exit code {proc.poll()}): {log.read_text()[-2000:]}"
    )


@pytest.fixture(scope="module")
def server(
    tiny_models: TinyModels, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    from exporters.bundle import load_bundle
    from exporters.fm_embed import compute_user_embeddings, write_embeddings_file

    tmp = tmp_path_factory.mktemp("loadtest-server")
    events = pd.read_parquet(tiny_models.data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
    fm_file = tmp / "fm.parquet"
    emb = compute_user_embeddings(load_bundle(tiny_models.fm), events, progress=False)
    write_embeddings_file(emb, fm_file)
    port, log = free_port(), tmp / "serve.log"
    cmd = [*_cli(), "serve", "--bundles", str(tiny_models.root), "--redis-url", redis_url,
           "--data", str(tiny_models.data), "--fm-embeddings", str(fm_file), "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        namespace = f"lt-{uuid.uuid4().hex[:10]}"
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(DARE_REDIS_NAMESPACE=namespace)
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        yield Server(base, tiny_models.data, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
