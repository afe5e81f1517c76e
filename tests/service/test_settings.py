"""Settings: DARE_* environment, weight parsing, fail-fast validation, the generated table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from exporters.bundle import BundleError, check_name, is_variant_name
from feature_store.keys import KeySpace, is_namespace
from service.cli import app
from service.settings import (
    SETTINGS_TABLE_MARKERS,
    Settings,
    parse_depths,
    parse_weights,
    settings_table_markdown,
)

TOKEN = "x" * 20
ROOT = Path(__file__).resolve().parents[2]
# Documents holding a copy of the generated table between the settings-table markers.
TABLE_DOCS = ("README.md", "docs/service.md")
REGENERATE = ".venv/bin/dare-serve settings-table README.md docs/service.md"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARE_BUNDLES", "/srv/bundles")
    monkeypatch.setenv("DARE_REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("DARE_VARIANT_WEIGHTS", "dare=0.7, coupled=0.3")
    monkeypatch.setenv("DARE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("DARE_BATCH_ENABLED", "false")
    monkeypatch.setenv("DARE_TRAIN_THREADS", "3")  # another command's variable is not an error
    s = Settings()
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


def test_search_depth_defaults_to_the_store_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(bundles=Path("/b"))
    assert s.store_max_events == 10_000 and s.search_depth is None
    assert s.search_depth_of("dare") == 10_000  # everything the store keeps, not a training window
    monkeypatch.setenv("DARE_STORE_MAX_EVENTS", "100000")
    monkeypatch.setenv("DARE_SEARCH_DEPTH", "20000")
    monkeypatch.setenv("DARE_VARIANT_SEARCH_DEPTH", "dare=100000, coupled=2000")
    s = Settings(bundles=Path("/b"))
    assert s.variant_search_depth == {"dare": 100_000, "coupled": 2_000}
    assert [s.search_depth_of(v) for v in ("dare", "coupled", "other")] == [100_000, 2_000, 20_000]
    assert Settings(bundles=Path("/b"), store_max_events=100_000).search_depth_of("dare") == 100_000


def test_parse_depths() -> None:
    assert parse_depths("a=1, b=5000,") == {"a": 1, "b": 5000}
    for bad in ("a", "a=1.5", "a=1,a=2", "bad name=1"):
        with pytest.raises(ValueError):
            parse_depths(bad)


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
        ({"store_max_events": 0}, "store_max_events"),
        ({"store_max_events": 1_000_001}, "store_max_events"),
        ({"search_depth": 0}, "search_depth"),
        ({"search_depth": 20_000}, "DARE_SEARCH_DEPTH=20000 exceeds DARE_STORE_MAX_EVENTS=10000"),
        ({"variant_search_depth": "dare=0"}, ">= 1"),
        ({"variant_search_depth": "dare=x"}, "not an integer"),
        ({"variant_search_depth": "dare=50000", "store_max_events": 20_000}, "dare=50000 exceeds"),
        ({"unknown_setting": 1}, "unknown_setting"),
    ],
)
def test_impossible_settings_fail_fast(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(bundles=Path("/b"), **overrides)


def test_thread_defaults_follow_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    s = Settings(bundles=Path("/b"))
    assert (s.compute_threads, s.search_threads, s.batch_max_concurrency) == (8, 8, 8)
    # one core: still a second batch in flight, so a feature read overlaps a computing batch
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    s = Settings(bundles=Path("/b"))
    assert (s.compute_threads, s.search_threads, s.batch_max_concurrency) == (1, 1, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)), raising=False)
    assert Settings(bundles=Path("/b")).batch_max_concurrency == 64


def test_settings_table_lists_every_field() -> None:
    table = settings_table_markdown()
    for name, field in Settings.model_fields.items():
        assert f"`DARE_{name.upper()}`" in table
        assert field.description, f"{name} has no docstring"
    assert "| `DARE_MAX_CANDIDATES` | `int` | `1000` |" in table
    assert table.count("\n") == len(Settings.model_fields) + 2


@pytest.mark.parametrize("name", TABLE_DOCS)
def test_docs_show_the_current_table(name: str) -> None:
    blocks = [m[2] for m in SETTINGS_TABLE_MARKERS.finditer((ROOT / name).read_text())]
    assert blocks == [settings_table_markdown()], f"regenerate the table: {REGENERATE}"


def test_settings_table_command_prints_and_rewrites(tmp_path: Path) -> None:
    printed = CliRunner().invoke(app, ["settings-table"])
    assert printed.exit_code == 0 and printed.stdout == settings_table_markdown()
    doc = tmp_path / "doc.md"
    stale = "# Settings\n\n<!-- settings-table:start -->\n\n| old |\n\n<!-- settings-table:end -->\n\nafter\n"
    doc.write_text(stale)
    assert CliRunner().invoke(app, ["settings-table", str(doc)]).exit_code == 0
    assert doc.read_text() == stale.replace("| old |\n", settings_table_markdown())
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    result = CliRunner().invoke(app, ["settings-table", str(plain)])
    assert result.exit_code == 2 and "markers" in result.output
    assert plain.read_text() == "no markers here\n"


def test_names_are_checked_whole_everywhere() -> None:
    # `re.match` with `$` also accepts a trailing newline; every check uses fullmatch instead.
    bad = "dare\n"
    with pytest.raises(ValidationError, match="namespace"):
        Settings(bundles=Path("/b"), redis_namespace=bad)
    with pytest.raises(ValueError, match="namespace"):
        KeySpace(bad)
    with pytest.raises(ValidationError, match="variant name"):
        Settings(bundles=Path("/b"), variant_weights={bad: 1.0})
    with pytest.raises(ValidationError, match="variant name"):
        Settings(bundles=Path("/b"), variant_search_depth={bad: 5})
    with pytest.raises(BundleError, match="invalid variant name"):
        check_name("variant", bad)
    assert not is_namespace(bad) and not is_variant_name(bad)
    assert is_namespace("svc-1:a.b_c") and is_variant_name("dare.v2_b-1")
    assert Settings(bundles=Path("/b"), redis_namespace="svc-1:a.b_c").redis_namespace == "svc-1:a.b_c"
