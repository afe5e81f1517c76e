"""The FM history offline: entries from the FM, the encoder, the point-in-time join, the bundle, fm-embed."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from exporters.bundle import Bundle, load_bundle, sha256_file
from exporters.dataset import read_dataset
from exporters.features import time_buckets
from exporters.fm_history import (
    ENCODER_FILE,
    EntryTable,
    PcaEncoder,
    entry_times,
    history_entries,
    join_history,
    load_encoder,
    pack,
    served_vectors,
)
from exporters.samples import ItemVocab, Samples, build_samples
from feature_store import fm_history as fh
from tests.conftest import HistoryModel, TinyModels

LENGTH = 4


@pytest.fixture(scope="module")
def samples(tiny_models: TinyModels) -> tuple[Samples, np.ndarray]:
    """The tiny dataset's samples and each event's raw item id."""
    ds = read_dataset(tiny_models.data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, 300)
    return s, vocab.item_ids[s.event_rows]


@pytest.fixture(scope="module")
def fm_bundle(tiny_models: TinyModels) -> Bundle:
    return load_bundle(tiny_models.fm)


@pytest.fixture(scope="module")
def entries(fm_bundle: Bundle, samples: tuple[Samples, np.ndarray]) -> EntryTable:
    return history_entries(fm_bundle, *samples)


def test_entries_are_the_fm_user_tower_strictly_before_each_time(
    fm_bundle: Bundle, samples: tuple[Samples, np.ndarray], entries: EntryTable
) -> None:
    s, raw = samples
    # one entry per distinct (user, impression time) with some event before it
    pairs = {(int(u), int(t)) for u, t in zip(s.user_index, s.target_ts, strict=True)}
    with_past = {(u, t) for u, t in pairs if np.any((s.event_user == u) & (s.event_ts < t))}
    assert set(zip(entries.user.tolist(), entries.time.tolist(), strict=True)) == with_past
    assert np.all(np.diff(entries.user) >= 0)
    rows = fm_bundle.rows(raw)
    max_len = fm_bundle.manifest.max_seq_len
    for i in np.random.default_rng(0).choice(len(entries), 12, replace=False):
        u, t = entries.user[i], entries.time[i]
        mine = np.flatnonzero((s.event_user == u) & (s.event_ts < t))[-max_len:]
        feeds = {
            "behaviors": rows[mine][None],
            "buckets": time_buckets(t - s.event_ts[mine])[None],
            "mask": np.ones((1, len(mine)), np.float32),
        }
        np.testing.assert_allclose(entries.vectors[i], fm_bundle.session.run(None, feeds)[0][0], atol=1e-5)


def test_entries_after_every_nth_event(samples: tuple[Samples, np.ndarray]) -> None:
    s, _ = samples
    user, time = entry_times(s, "events", 3)
    for u in (0, 7, 42):
        ts = s.event_ts[s.event_user == u]
        want = sorted(set((ts[2::3] + 1).tolist()))
        assert time[user == u].tolist() == want
    with pytest.raises(ValueError, match="stride"):
        entry_times(s, "events", 0)


def test_pca_encoder_orders_dims_and_is_reproducible(entries: EntryTable, tmp_path: Path) -> None:
    x = entries.vectors
    enc = PcaEncoder.fit(x, fm_version="fm:1", encoding="int8")
    np.testing.assert_allclose(enc.components.T @ enc.components, np.eye(enc.dim), atol=1e-5)
    assert np.all(np.diff(enc.explained) <= 1e-12) and 0.99 < enc.explained.sum() <= 1.0 + 1e-9
    y = enc.transform(x)
    # Matryoshka: each longer prefix reconstructs better, the whole one exactly
    errors = [
        float(((y[:, :d] @ enc.components[:, :d].T + enc.mean - x) ** 2).mean())
        for d in range(1, enc.dim + 1)
    ]
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 1e-9
    assert PcaEncoder.fit(x, fm_version="fm:1", encoding="int8").version == enc.version
    assert PcaEncoder.fit(x, fm_version="fm:1", encoding="int4").version != enc.version
    enc.save(tmp_path / "enc.npz")
    again = load_encoder(tmp_path / "enc.npz")
    assert again.version == enc.version and again.encoding == "int8"
    np.testing.assert_array_equal(again.transform(x), y)
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not an FM-history encoder"):
        load_encoder(tmp_path / "bad.npz")


@pytest.mark.parametrize("lag_s", [0, 86_400])
def test_the_join_is_point_in_time_and_chooses_as_the_store_read_does(
    samples: tuple[Samples, np.ndarray], entries: EntryTable, lag_s: int
) -> None:
    s, _ = samples
    enc = PcaEncoder.fit(entries.vectors, fm_version="fm:1", encoding="int4")
    prefix = 5
    join = join_history(entries, served_vectors(enc, entries, prefix), s, LENGTH, lag_s)
    n = join.end - join.start
    assert n.max() == LENGTH and (n == 0).any()
    # no entry at or after the impression time (less the lag) ever reaches an impression
    for i in range(len(s)):
        chosen = np.arange(join.start[i], join.end[i])
        assert np.all(entries.user[chosen] == s.user_index[i])
        assert np.all(entries.time[chosen] + lag_s < s.target_ts[i])
        nxt = join.end[i]
        if n[i] < LENGTH and join.start[i] > 0:  # fewer than asked: nothing older was left out
            assert entries.user[join.start[i] - 1] != s.user_index[i]
        if nxt < len(entries) and entries.user[nxt] == s.user_index[i]:
            assert entries.time[nxt] + lag_s >= s.target_ts[i]
    # the oracle: the service's selection over the user's packed entries, impression by impression
    blobs = pack(enc, entries)
    for i in np.random.default_rng(1).choice(len(s), 150, replace=False):
        mine = np.flatnonzero(entries.user == s.user_index[i])
        stored = fh.parse_entries([blobs[j] for j in mine[::-1]])  # any stored order
        sel = fh.select_history(
            stored,
            now=int(s.target_ts[i]),
            fm_version="fm:1",
            encoder_version=enc.version,
            length=LENGTH,
            prefix=prefix,
            lag_s=lag_s,
        )
        got, mask = join.batch(np.array([i]))
        np.testing.assert_array_equal(got[0][mask[0] > 0], sel.vectors)
        assert sel.stale == 0
    # dropout empties a row
    _, dropped = join.batch(np.array([0, 1]), keep=np.array([False, True]))
    assert not dropped[0].any()


def test_a_trained_bundle_carries_its_history_and_encoder(tiny_history_model: HistoryModel) -> None:
    path, result = tiny_history_model.bundle, tiny_history_model.result
    bundle = load_bundle(path)
    spec = bundle.manifest.fm_history
    assert spec is not None and result["fm_history"] == spec.model_dump()
    assert (spec.length, spec.dim, spec.encoding, spec.fm_version, spec.lag_s) == (
        LENGTH,
        8,
        "int4",
        "fm:1",
        0,
    )
    assert bundle.manifest.files[ENCODER_FILE] == sha256_file(path / ENCODER_FILE)
    assert load_encoder(path).version == spec.encoder_version
    assert [i.name for i in bundle.session.get_inputs()][-2:] == ["fm_history", "fm_history_mask"]
    assert {"auc", "ne"} <= set(result["metrics"]["fm_history_missing"])
    assert 0.5 < (spec.model_extra or {})["coverage"] <= 1.0


def test_training_refuses_a_history_without_its_fm(tiny_models: TinyModels, tmp_path: Path) -> None:
    from tests.conftest import train_tiny

    with pytest.raises(ValueError, match="needs the fm bundle"):
        train_tiny(tiny_models.data, "dare", tmp_path, fm_history=4)
    other = PcaEncoder("fm:9", "int4", np.zeros(8, np.float32), np.eye(8, dtype=np.float32), np.ones(8) / 8)
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="the encoder is for FM fm:9"):
        train_tiny(
            tiny_models.data,
            "dare",
            tmp_path,
            fm_bundle=tiny_models.fm,
            fm_history=4,
            fm_history_encoder=tmp_path / "other.npz",
        )


def test_fm_embed_writes_the_entries_training_joined(
    tiny_models: TinyModels,
    tiny_history_model: HistoryModel,
    fm_bundle: Bundle,
    samples: tuple[Samples, np.ndarray],
    entries: EntryTable,
    redis_url: str,
) -> None:
    from typer.testing import CliRunner

    from feature_store.factory import open_feature_store
    from service.cli import app

    namespace = f"fmh-{uuid.uuid4().hex[:8]}"
    args = ["fm-embed", "--fm-bundle", str(tiny_models.fm), "--data", str(tiny_models.data), "--no-progress"]
    args += [
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        "--history-encoder",
        str(tiny_history_model.bundle),
    ]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    line = json.loads(run.output.strip().splitlines()[-1])
    encoder = load_encoder(tiny_history_model.bundle)
    assert (
        line["history"]["entries"] == len(entries) and line["history"]["encoder_version"] == encoder.version
    )
    s, _ = samples
    want = pack(encoder, entries)

    async def read(users: list[str]) -> list[fh.HistoryEntries]:
        store = open_feature_store(redis_url, namespace=namespace)
        try:
            return [f.fm_history for f in await store.read_users(users, fm_history=True)]
        finally:
            await store.aclose()

    users = [str(u) for u in s.users[:20]]
    for u, found in zip(users, asyncio.run(read(users)), strict=True):
        mine = np.flatnonzero(s.users[entries.user] == u)
        assert list(found.blobs) == [want[i] for i in mine]
    bad = CliRunner().invoke(app, [*args[:-2], "--history-encoder", str(tiny_models.fm)])
    assert bad.exit_code == 2
