"""Fixtures of the reliability tests: the service tests' data, loaded into namespaces of their own.

These tests append events, so they never write into the namespace that `served` keeps exact for
the service tests; each module loads the same tiny dataset into a fresh namespace (or a private
redis-server) instead.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import TinyModels
from tests.service.conftest import (  # noqa: F401  (fixtures shared with the service tests)
    ServedData,
    _no_dare_env,
    copy_root,
    load_into,
    served,
)


def fill(data: ServedData, redis_url: str, prefix: str) -> str:
    """Load the tiny dataset's events and FM embeddings into a fresh namespace; returns it."""
    namespace = f"{prefix}-{uuid.uuid4().hex[:8]}"
    load_into(redis_url, namespace, data.events, data.fm_vectors, data.fm_version)
    return namespace


@pytest.fixture(scope="module")
def bundle_root(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny bundle root that a module may add versions to."""
    return copy_root(tiny_models, tmp_path_factory.mktemp("reliability") / "root")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability-run")
