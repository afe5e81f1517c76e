"""Fixtures of the reliability tests: the service tests' data, loaded into namespaces of their own.

These tests append events, so they never write into the namespace that `served` keeps exact for
the service tests; each module loads the same tiny dataset into a fresh namespace
(`served.fill_copy`) or a private redis-server instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TinyModels
from tests.support import copy_root


@pytest.fixture(scope="module")
def bundle_root(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny bundle root that a module may add versions to."""
    return copy_root(tiny_models.root, tmp_path_factory.mktemp("reliability") / "root")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability-run")
