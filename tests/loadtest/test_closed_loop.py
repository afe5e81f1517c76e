"""The closed loop: the rebuilt click model is the generator's, and a run against a real server with
the impression log on reads out in `ab-report` as exactly what was sent and clicked."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from loadtest.closed_loop import ClosedLoopConfig, ClosedLoopError, expected_logit_error, load_world
from service.cli import app as cli
from service.process import ServeProcess
from tests.conftest import TinyModels

ADMIN = "admin-token-0123456789"


def test_the_rebuilt_click_model_is_the_generators(tiny_models: TinyModels) -> None:
    world = load_world(tiny_models.data)
    # float32 rounding of the stored true_logit
    assert expected_logit_error(world, tiny_models.data, sample=400) < 1e-5
    rng = np.random.default_rng(0)
    cands = world.candidates(3, 40, rng)
    assert len(set(cands.tolist())) == 40 and cands.max() < len(world.item_ids)


def test_a_closed_loop_run_reads_out_as_sent(
    tiny_models: TinyModels, tiny_fm_file: Path, tmp_path: Path
) -> None:
    env = {
        "DARE_IMPRESSION_LOG": "true",
        "DARE_ADMIN_TOKEN": ADMIN,
        "DARE_REDIS_NAMESPACE": f"cl-{uuid.uuid4().hex[:8]}",
    }
    args = ["--data", str(tiny_models.data), "--fm-embeddings", str(tiny_fm_file)]
    summary_file, report_file = tmp_path / "loop.json", tmp_path / "report.json"
    with ServeProcess(
        tiny_models.root, env=env, args=args, log=tmp_path / "serve.log", ready_timeout=90
    ) as server:
        loop = CliRunner().invoke(
            cli,
            ["closed-loop", "--host", server.base, "--data", str(tiny_models.data), "--users", "40",
             "--rounds", "3", "--candidates", "20", "--k", "5", "--out", str(summary_file)],
        )  # fmt: skip
        assert loop.exit_code == 0, loop.output
        report = CliRunner().invoke(
            cli,
            ["ab-report", "--server", server.base, "--admin-token", ADMIN, "--k", "5", "--window", "5m",
             "--bootstrap", "50", "--json", str(report_file)],
        )  # fmt: skip
        assert report.exit_code == 0, report.output
    summary = orjson.loads(summary_file.read_bytes())
    result = orjson.loads(report_file.read_bytes())
    assert summary["requests"] == 120 and summary["errors"] == 0
    arms = {a["variant"]: a for a in result["arms"]}
    assert {v: a["requests"] for v, a in arms.items()} == {
        v: a["requests"] for v, a in summary["arms"].items()
    }
    assert {v: a["outcomes"] for v, a in arms.items()} == {v: a["clicks"] for v, a in summary["arms"].items()}
    # every click was on a shown item within 30 s of its impression: all attributed, none organic
    assert result["attribution"]["attributed"] == summary["clicks"] > 0
    assert result["attribution"]["unattributed"] == 0
    assert sum(a["users"] for a in arms.values()) == 40


def test_closed_loop_settings_are_checked(tiny_models: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(ClosedLoopError, match="k <= candidates"):
        ClosedLoopConfig(host="http://127.0.0.1:1", data=tiny_models.data, k=60, candidates=50)
    bad = CliRunner().invoke(
        cli, ["closed-loop", "--host", "http://example.com", "--data", str(tiny_models.data)]
    )
    assert bad.exit_code == 2 and "loopback" in bad.output
    (tmp_path / "meta.json").write_text('{"source": "movielens"}')
    with pytest.raises(ClosedLoopError, match="not a `dare-serve data synth`"):
        load_world(tmp_path)
    with pytest.raises(ClosedLoopError, match="No such file"):
        load_world(tmp_path / "missing")
