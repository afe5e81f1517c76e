"""Helpers that test folders share: bundle roots that a test may add versions to or corrupt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_root(root: Path, dest: Path) -> Path:
    """A private copy of the bundle root `root` that a test may add versions to or corrupt."""
    shutil.copytree(root, dest)
    return dest


def add_version(root: Path, source: Path, variant: str, version: int) -> Path:
    """Copy a bundle folder into ROOT/<variant>/<version> with a manifest that says so."""
    dest = root / variant / str(version)
    tmp = root / variant / f".incoming-{version}"
    shutil.copytree(source, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest |= {"variant": variant, "version": str(version)}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(dest)  # appear at once, as write_bundle does
    return dest


def truncate(path: Path) -> None:
    """Cut a file to half its size (a partly written or damaged file)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
