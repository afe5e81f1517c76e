"""Self-supervised item vectors, the embedding init, the optimizer's L2 groups and the auxiliary loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.item_vectors import (
    ItemVectors,
    category_table,
    cooccurrence,
    learn_item_vectors,
    visible_events,
)
from exporters.models import RankerConfig, TwoStageRanker
from exporters.train import Batch, TrainConfig, cooccurrence_loss, optimizers


def _two_worlds(n_users: int = 120, length: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Users who each browse only one of two disjoint item groups (ids 100..119 or 200..219)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), length)
    group = np.repeat(np.arange(n_users) % 2, length)
    items = np.where(group == 0, 100, 200) + rng.integers(0, 20, len(users))
    return users, items.astype(np.int64)


def test_cooccurrence_counts_pairs_within_the_window_of_one_user() -> None:
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([0, 1, 2, 2, 0])
    c = cooccurrence(users, items, 3, window=1).toarray()
    # user 0: (0,1), (1,2) at gap 1; user 1: (2,0); the user boundary (2 -> 2) is not a pair
    expected = np.zeros((3, 3))
    for a, b in ((0, 1), (1, 2), (2, 0)):
        expected[a, b] += 1
        expected[b, a] += 1
    np.testing.assert_array_equal(c, expected)
    wide = cooccurrence(users, items, 3, window=2).toarray()
    # gap 2 counts half: (0, 2) of user 0
    assert wide[0, 2] == pytest.approx(1 + 0.5) and wide[1, 1] == 0


def test_vectors_separate_items_that_never_share_a_user() -> None:
    users, items = _two_worlds()
    vec = learn_item_vectors(users, items, dim=4, window=5, seed=0)
    assert vec.dim == 4 and list(vec.item_ids) == sorted(set(items.tolist()))
    unit = vec.table(vec.item_ids, 4, 1.0)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    sim = unit @ unit.T
    group = vec.item_ids >= 200
    same = sim[group[:, None] == group[None, :]]
    other = sim[group[:, None] != group[None, :]]
    assert same.mean() > 0.5 and other.mean() < 0.1 and same.min() > other.max()


def test_learning_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    users, items = _two_worlds()
    a = learn_item_vectors(users, items, dim=8, window=3, seed=1)
    b = learn_item_vectors(users, items, dim=8, window=3, seed=1)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    back = ItemVectors.load(a.save(tmp_path / "v.npz"))
    np.testing.assert_array_equal(back.vectors, a.vectors)
    np.testing.assert_array_equal(back.item_ids, a.item_ids)
    assert back.window == 3 and back.n_events == len(items)
    other = tmp_path / "other.npz"
    np.savez(other, vectors=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not an item-vectors file"):
        ItemVectors.load(other)


def test_table_rows_unknown_ids_stay_zero_and_dims_are_checked() -> None:
    users, items = _two_worlds()
    vec = learn_item_vectors(users, items, dim=4, window=2)
    t = vec.table(np.array([-1, 100, 999]), 2, 0.5)
    assert t.shape == (3, 2)
    assert not t[0].any() and not t[2].any()
    assert np.linalg.norm(t[1]) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="asked for 8-d"):
        vec.table(np.array([100]), 8, 1.0)


def test_visible_events_stop_at_each_users_first_evaluation_impression() -> None:
    ev_user = np.array([0, 0, 0, 1, 1, 2])
    ev_ts = np.array([1, 5, 9, 1, 7, 3])
    imp_user = np.array([0, 0, 1, 1])
    imp_ts = np.array([4, 8, 6, 10])
    imp_eval = np.array([False, True, False, False])
    # user 0: evaluation from t=8 on; user 1: none; user 2: no impressions at all
    np.testing.assert_array_equal(
        visible_events(ev_user, ev_ts, imp_user, imp_ts, imp_eval), [True, True, False, True, True, True]
    )


def test_category_table_is_the_mean_of_its_items() -> None:
    table = np.array([[0, 0], [1, 0], [0, 1], [2, 2]], np.float32)
    cats = np.array([0, 1, 1, 2])
    out = category_table(table, cats, 4)
    np.testing.assert_allclose(out, [[0, 0], [0.5, 0.5], [2, 2], [0, 0]])


def _ranker() -> TwoStageRanker:
    torch.manual_seed(0)
    return TwoStageRanker(RankerConfig("dare", 30, 4, 8, 16, 4), np.arange(30) % 4)


def test_embeddings_are_excluded_from_weight_decay() -> None:
    cfg = TrainConfig(data=Path("."), model="dare", out=Path("."), weight_decay=0.5)
    for decay_embeddings, should_shrink in ((False, False), (True, True)):
        model = _ranker()
        cfg.decay_embeddings = decay_embeddings
        opts = optimizers(model, cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(20):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # L2 is then the only force
            for opt in opts:
                opt.step()
        for name, p in model.named_parameters():
            is_embedding = name.endswith(".weight") and name.split(".")[0] in {
                "repr_item",
                "repr_cat",
                "repr_time",
                "attn_item",
                "attn_cat",
                "attn_time",
            }
            shrank = p.norm() < before[name].norm() * 0.999
            if is_embedding:
                assert bool(shrank) == should_shrink, name
            elif name.startswith("head") and name.endswith("weight"):
                assert shrank, f"{name}: dense weights must still be decayed"


def test_cooccurrence_loss_prefers_vectors_that_match_neighbours() -> None:
    model = _ranker()
    rows = torch.tensor([[1, 2, 1, 2, 1, 2], [5, 6, 5, 6, 5, 6], [9, 10, 9, 10, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    batch = Batch(rows[:, 0], rows, torch.zeros_like(rows), mask, torch.zeros(3))
    loss_before = cooccurrence_loss(model, batch, 2, 2, np.random.default_rng(0))
    assert torch.isfinite(loss_before) and loss_before > 0
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for i in range(60):
        opt.zero_grad()
        cooccurrence_loss(model, batch, 2, 2, np.random.default_rng(i)).backward()
        opt.step()
    a = model.attention_vectors(torch.arange(30)).detach()
    # items that follow each other in a history come closer than items of different histories
    assert (a[1] @ a[2]) > (a[1] @ a[6]) and (a[5] @ a[6]) > (a[5] @ a[10])
    empty = Batch(rows[:1, 0], rows[:1], torch.zeros_like(rows[:1]), mask[:1] & False, torch.zeros(1))
    assert cooccurrence_loss(model, empty, 2, 2, np.random.default_rng(0)) == 0


def test_pretrain_command_writes_what_train_would_learn(tiny_data: Path, tmp_path: Path) -> None:
    import orjson
    from typer.testing import CliRunner

    from exporters.dataset import read_dataset
    from exporters.samples import ItemVocab, build_samples
    from exporters.train import item_vectors_for
    from service.cli import app

    out = tmp_path / "vectors.npz"
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.output.strip().splitlines()[-1])
    assert summary["dim"] == 64 and summary["items"] > 0 and Path(summary["out"]) == out

    ds = read_dataset(tiny_data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, 300)
    cfg = TrainConfig(data=tiny_data, model="dare", out=tmp_path)
    learned = item_vectors_for(cfg, s, vocab)
    reused = item_vectors_for(
        TrainConfig(data=tiny_data, model="dare", out=tmp_path, item_vectors=out), s, vocab
    )
    assert learned is not None and reused is not None
    np.testing.assert_array_equal(learned.vectors, reused.vectors)
    # fewer events than the whole stream: evaluation-period events are held out
    assert learned.n_events < len(ds.events)
    assert (
        item_vectors_for(TrainConfig(data=tiny_data, model="dare", out=tmp_path, pretrain=False), s, vocab)
        is None
    )

    bad = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code == 2 and "error:" in bad.output
