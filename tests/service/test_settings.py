"""Settings: DARE_* environment, weight parsing, fail-fast validation, the generated table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, parse_weights, settings_table_markdown

TOKEN = "x" * 20
ROOT = Path(__file__).resolve().parents[2]
# Documents holding a copy of the generated table between these markers.
TABLE_DOCS = ("README.md", "docs/service.md")
TABLE = re.compile(r"(<!-- settings-table:start -->\n\n)(.*?)(\n<!-- settings-table:end -->)", re.S)
REGENERATE = ".venv/bin/python -m tests.service.test_settings"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARE_BUNDLES", "/srv/bundles")
    monkeypatch.setenv("DARE_REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("DARE_VARIANT_WEIGHTS", "dare=0.7, coupled=0.3")
    monkeypatch.setenv("DARE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("DARE_BATCH_ENABLED", "false")
    monkeypatch.setenv("DARE_TRAIN_THREADS", "3")  # another command's variable is not an error
    s = Settings()  # type: ignore[call-arg]
    assert s.bundles == Path("/srv/bundles") and s.redis_dsn == "redis://cache:6380/2"
    assert s.variant_weights == {"dare": 0.7, "coupled": 0.3}
    assert s.admin_token is not None and s.admin_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(s), "secrets stay out of logs"
    assert s.batch_enabled is False and s.max_candidates == 1000


def test_parse_weights() -> None:
    assert parse_weights("a=1,b=0.5,") == {"a": 1.0, "b": 0.5}
    for bad in ("a", "a=x", "a=1,a=2", "bad name=1"):
        with pytest.raises(ValueError):
            parse_weights(bad)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"variant_weights": "dare=0,coupled=0"}, "must not all be 0"),
        ({"variant_weights": "dare=-1"}, ">= 0"),
        ({"variant_weights": "dare=nan"}, "finite"),
        ({"admin_token": "short"}, "at least 16"),
        ({"admin_token": TOKEN, "write_token": TOKEN}, "must differ"),
        ({"redis_cluster": True}, "DARE_REDIS_URL"),
        ({"redis_url": "http://not-redis"}, "redis_url"),
        ({"redis_namespace": "a{b}"}, "namespace"),
        ({"max_candidates": 0}, "max_candidates"),
        ({"max_candidates": 10_000, "max_body_bytes": 4096}, "cannot hold"),
        ({"batch_max_wait_ms": 500, "feature_timeout_ms": 100}, "BATCH_MAX_WAIT_MS"),
        ({"device": "tpu"}, "device"),
        ({"watch_interval_s": 0}, "watch_interval_s"),
        ({"unknown_setting": 1}, "unknown_setting"),
    ],
)
def test_impossible_settings_fail_fast(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(bundles=Path("/b"), **overrides)


def test_settings_table_lists_every_field() -> None:
    table = settings_table_markdown()
    for name, field in Settings.model_fields.items():
        assert f"`DARE_{name.upper()}`" in table
        assert field.description, f"{name} has no docstring"
    assert "| `DARE_MAX_CANDIDATES` | `int` | `1000` |" in table
    assert table.count("\n") == len(Settings.model_fields) + 2


@pytest.mark.parametrize("name", TABLE_DOCS)
def test_docs_show_the_current_table(name: str) -> None:
    blocks = [m[2] for m in TABLE.finditer((ROOT / name).read_text())]
    assert blocks == [settings_table_markdown()], f"regenerate the table: {REGENERATE}"


def write_settings_tables() -> None:
    """Rewrite the table between the markers of every copy (`python -m tests.service.test_settings`)."""
    for name in TABLE_DOCS:
        path = ROOT / name
        path.write_text(TABLE.sub(lambda m: m[1] + settings_table_markdown() + m[3], path.read_text()))


if __name__ == "__main__":
    write_settings_tables()
