"""The lock files under requirements/ agree with pyproject.toml, and the lock check catches drift.

A dependency added to pyproject.toml without re-locking, a range the lock no longer satisfies, or a
cpu/gpu package in the wrong lock fails here, on any machine, before an install can go wrong.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKS = {
    "cpu.txt": ["cpu", "train", "dev", "loadtest"],
    "gpu.txt": ["gpu", "train", "dev", "loadtest"],
    "serve-cpu.txt": ["cpu"],
    "serve-gpu.txt": ["gpu"],
}
sys.path.insert(0, str(ROOT / "scripts"))
import lockfile  # noqa: E402


def _direct(extras: list[str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_lock_pins_every_direct_dependency_within_its_range(name: str) -> None:
    lock_path = ROOT / "requirements" / name
    pins = lockfile.read_lock(lock_path)
    header = lock_path.read_text().splitlines()[:4]
    assert any(f"extras: {','.join(LOCKS[name])}" in ln for ln in header), header
    for req in _direct(LOCKS[name]):
        key = canonicalize_name(req.name)
        assert key in pins, f"{name} lacks {req.name}: rerun scripts/upgrade-deps"
        # A local label (torch's +cpu) is a build of the same release.
        assert req.specifier.contains(Version(pins[key]), prereleases=True), (
            f"{name}: {req.name}=={pins[key]} is outside pyproject's {req.specifier}"
        )
    # Every pin carries a hash, so --require-hashes can install the file.
    text = lock_path.read_text()
    assert text.count("--hash=sha256:") == len(pins)


def test_cpu_and_gpu_locks_never_mix_runtimes() -> None:
    for name, extras in LOCKS.items():
        pins = lockfile.read_lock(ROOT / "requirements" / name)
        other = "gpu" if "cpu" in extras else "cpu"
        wrong = {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"][other]}
        assert not wrong & set(pins), f"{name} holds {wrong & set(pins)}"
        if "train" in extras:
            torch = Version(pins["torch"])
            assert torch.base_version == "2.13.0"
            # The cpu lock takes PyTorch's CPU build; the gpu lock the CUDA build.
            assert (torch.local == "cpu") == (other == "gpu")


def test_check_reports_each_kind_of_drift(tmp_path: Path) -> None:
    """`lockfile.py check` (run by scripts/test on every run) fails on any difference from the lock."""
    script = str(ROOT / "scripts" / "lockfile.py")
    here = lockfile.installed()
    assert here, "no distributions seen"
    pinned = dict(list(here.items())[1:])  # one installed package left out: "unlocked"
    first = next(iter(pinned))
    pinned[first] = pinned[first] + ".post999"  # one at another version: "differs"
    pinned["not-a-real-package"] = "1.0"  # one missing
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(f"{n}=={v} \\\n    --hash=sha256:{'0' * 64}\n" for n, v in pinned.items()))
    out = subprocess.run([sys.executable, script, "check", str(lock)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"unlocked  {next(iter(here))}==" in out.stderr
    assert f"differs   {first}: lock {pinned[first]}, installed {here[first]}" in out.stderr
    assert "missing   not-a-real-package==1.0" in out.stderr

    exact = tmp_path / "exact.txt"
    exact.write_text("".join(f"{n}=={v}\n" for n, v in here.items()))
    out = subprocess.run([sys.executable, script, "check", str(exact)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
