"""Fixtures of the load-test tests: a real `dare-serve serve` process over the tiny bundles and Redis.

The server gets a Redis namespace of its own, filled at start-up from the tiny dataset (`--data`)
and an FM embeddings file, because the load test appends events: the service tests' namespace
(`served`) must keep its exact histories.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.process import ServeProcess
from tests.conftest import TinyModels


@pytest.fixture(scope="module")
def server(
    tiny_models: TinyModels, tiny_fm_file: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("loadtest-server") / "serve.log"
    env = {"DARE_REDIS_NAMESPACE": f"lt-{uuid.uuid4().hex[:10]}"}
    args = ["--data", str(tiny_models.data), "--fm-embeddings", str(tiny_fm_file)]
    with ServeProcess(
        tiny_models.root, redis_url=redis_url, env=env, args=args, log=log, ready_timeout=90
    ) as server:
        yield server
