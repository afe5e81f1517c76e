"""Documents that the code cites exist in the repository (a reader must be able to open them)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "feature_store", "exporters", "loadtest")
# A Markdown file name as code cites it: `docs/service.md`, `README.md`.
CITED = re.compile(r"[A-Za-z0-9_./-]+\.md\b")


def test_cited_documents_exist() -> None:
    cited = {
        (str(path.relative_to(ROOT)), name)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in CITED.findall(path.read_text())
    }
    assert cited, "no citations found: the pattern is wrong"
    missing = sorted(f"{source}: {name}" for source, name in cited if not (ROOT / name).is_file())
    assert not missing, f"cited documents not in the repository: {missing}"
