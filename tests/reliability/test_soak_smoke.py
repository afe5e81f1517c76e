"""A short soak run (`python -m benchmarks.soak`) end to end (slow: selected with `-m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.process import clean_env
from tests.conftest import TinyModels
from tests.reliability.harness import ROOT

pytestmark = [
    pytest.mark.slow,
    # Decided at collection, before the session's tiny models would be trained for nothing.
    pytest.mark.skipif(
        "'slow' not in config.getoption('markexpr')", reason="a slow check: run it with -m slow"
    ),
]


def test_soak_script_runs_and_reports(tiny_models: TinyModels, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "benchmarks.soak", "--duration", "15s", "--interval", "1",
           "--users", "2", "--bundles", str(tiny_models.root), "--data", str(tiny_models.data),
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((out / "soak.json").read_text())
    verdict = result["verdict"]
    assert verdict["ok"] and verdict["failures"] == 0 and verdict["requests"] > 0
    phases = [s["phase"] for s in result["samples"]]
    assert phases[:2] == ["idle-before"] * 2 and phases[-2:] == ["idle-after"] * 2 and "load" in phases
    assert "RSS MiB: before load" in p.stdout and "verdict: ok" in p.stdout
