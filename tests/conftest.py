"""Shared fixtures: a real redis-server per test session (override with --redis-url)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.redis_proc import RedisProcess


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url", default=None, help="use this Redis instead of starting a private redis-server"
    )


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a redis-server started for this session on a free loopback port."""
    override = request.config.getoption("--redis-url")
    if override:
        yield override
        return
    proc = RedisProcess().start()
    try:
        yield proc.url
    finally:
        proc.cleanup()


@pytest.fixture()
def redis_process() -> Iterator[RedisProcess]:
    """A private redis-server that a test may stop and restart (fault tests)."""
    proc = RedisProcess().start()
    try:
        yield proc
    finally:
        proc.cleanup()


# -- tiny data and models trained once per session -------------------------------------------------

TINY_SYNTH = {"users": 150, "items": 800, "categories": 12, "max_seq_len": 300, "seed": 1}


@dataclass(frozen=True)
class TinyModels:
    """A tiny synthetic dataset and bundles trained on it in this session."""

    data: Path
    root: Path  # bundle root: ROOT/dare/1, ROOT/coupled/1 (both with FM input)
    fm: Path  # the fm bundle
    results: dict[str, dict]  # train() result per model


def _train(data: Path, model: str, out: Path, **kw) -> dict:
    from exporters.train import TrainConfig, train

    sizes = {
        "epochs": 2,
        "seed": 0,
        "max_seq_len": 300,
        "attention_dim": 8,
        "representation_dim": 16,
        "top_k": 16,
        "fm_dim": 8,
        "fm_hidden": 16,
    }
    cfg = TrainConfig(data=data, model=model, out=out, progress=False, **{**sizes, **kw})
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("tiny") / "data"
    write_synth(out, SynthConfig(**TINY_SYNTH))
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    import torch

    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("bundles")
    fm = _train(tiny_data, "fm", base / "fm")
    results = {"fm": fm}
    for model in ("dare", "coupled"):
        results[model] = _train(tiny_data, model, base / "root", fm_bundle=Path(fm["bundle"]))
    return TinyModels(tiny_data, base / "root", Path(fm["bundle"]), results)
