"""TwoStageRanker's stage 1 in training: the chunked search against one search over the whole history."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import pytest
import torch

from exporters.models import RankerConfig, TwoStageRanker

N_ITEMS, N_CATEGORIES, TOP_K = 400, 12, 16


def ranker(kind: Literal["dare", "coupled"], seed: int = 0) -> TwoStageRanker:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = RankerConfig(kind, N_ITEMS, N_CATEGORIES, attention_dim=8, representation_dim=8, top_k=TOP_K)
    return TwoStageRanker(cfg, rng.integers(0, N_CATEGORIES, N_ITEMS))


def histories(
    seed: int, n: int = 9, length: int = 300, distinct: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded histories with many repeated (item, bucket) pairs, hence equal logits; lengths from 0
    to `length`, some shorter than K."""
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.integers(1, N_ITEMS, n))
    rows = torch.from_numpy(rng.integers(1, 1 + distinct, (n, length)))
    buckets = torch.from_numpy(rng.integers(0, 3, (n, length)))
    lengths = np.r_[0, 5, TOP_K, length, rng.integers(1, length, n - 4)]
    mask = torch.from_numpy(np.arange(length)[None, :] < lengths[:, None])
    return target, rows.masked_fill(~mask, 0), buckets.masked_fill(~mask, 0), mask


def one_sort(
    model: TwoStageRanker, target: torch.Tensor, rows: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The unchunked search: every logit at once, best first, equal logits in position order."""
    with torch.no_grad():
        logits = model.attention_logits(target, rows, buckets).masked_fill(~mask, float("-inf"))
    k = min(TOP_K, rows.shape[1])
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("kind", ["dare", "coupled"])
def test_chunked_search_equals_one_search_over_the_whole_history(kind: Literal["dare", "coupled"]) -> None:
    model = ranker(kind)
    target, rows, buckets, mask = histories(seed=1)
    want = one_sort(model, target, rows, buckets, mask)
    with torch.no_grad():
        logits = model.attention_logits(target, rows, buckets).masked_fill(~mask, float("-inf"))
    ties = sum(len(r) - len(torch.unique(r)) for r in logits.gather(1, want)[mask.sum(1) >= TOP_K])
    assert ties > 0, "the histories should hold equal logits inside the top K"
    for chunk in (1, 3, TOP_K - 1, TOP_K, 64, 299, 300, 10_000, None):
        got = model.search(target, rows, buckets, mask, chunk=chunk)
        assert torch.equal(got, want), chunk
    # the same top-K logits as torch.topk over the whole history (which orders equal logits freely)
    top = torch.topk(logits, TOP_K, dim=1).values
    assert torch.equal(logits.gather(1, model.search(target, rows, buckets, mask, chunk=7)), top)


def test_search_keeps_no_graph_and_training_gradients_are_unchanged() -> None:
    target, rows, buckets, mask = histories(seed=2, length=120, distinct=N_ITEMS - 1)
    label = torch.from_numpy(np.random.default_rng(2).integers(0, 2, len(target)).astype(np.float32))
    model = ranker("dare", seed=3)
    model.train()
    top = model.search(target, rows, buckets, mask, chunk=10)
    assert not top.requires_grad and top.grad_fn is None
    # gradients of one training step: the chunked forward against stage 2 fed by the one-sort search
    logit, _ = model(target, rows, buckets, mask)
    torch.nn.functional.binary_cross_entropy_with_logits(logit, label).backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = one_sort(model, target, rows, buckets, mask)
    logit_ref, _ = model.stage2(target, rows.gather(1, ref), buckets.gather(1, ref), mask.gather(1, ref))
    torch.nn.functional.binary_cross_entropy_with_logits(logit_ref, label).backward()
    assert torch.equal(logit.detach(), logit_ref.detach())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(chunked[name], p.grad), name
    # only retrieved behaviors get an attention gradient: an item seen only outside the top K gets none
    retrieved = set(rows.gather(1, ref)[mask.gather(1, ref)].tolist()) | set(target.tolist())
    unseen = sorted(set(rows[mask].tolist()) - retrieved)
    grad = chunked["attn_item.weight"]
    assert unseen and bool((grad[unseen] == 0).all()) and bool((grad[sorted(retrieved)] != 0).any())


def test_default_and_invalid_chunks() -> None:
    model = ranker("coupled")
    target, rows, buckets, mask = histories(seed=3, n=4, length=50)
    assert torch.equal(
        model.search(target, rows, buckets, mask), one_sort(model, target, rows, buckets, mask)
    )
    with pytest.raises(ValueError, match="chunk"):
        model.search(target, rows, buckets, mask, chunk=0)


def recent_oracle(logits: np.ndarray, mask: np.ndarray, top_k: int, recent_k: int) -> np.ndarray:
    """numpy: per row the newest min(R, n) valid positions, newest first, then the other valid ones by
    logit (best first, equal logits in position order), then the padding positions in order."""
    out = []
    for row, valid in zip(logits, mask, strict=True):
        positions = np.flatnonzero(valid)
        kept = positions[len(positions) - min(recent_k, len(positions)) :][::-1]
        older = positions[: len(positions) - len(kept)]
        searched = older[np.argsort(-row[older], kind="stable")]
        padding = np.flatnonzero(~valid)
        out.append(np.r_[kept, searched, padding][: min(top_k, len(row))])
    return np.array(out, dtype=np.int64).reshape(len(logits), min(top_k, logits.shape[1]))


@pytest.mark.parametrize(
    "top_k,recent_k", [(TOP_K, 1), (TOP_K, 5), (TOP_K, TOP_K - 1), (TOP_K, TOP_K), (4, 3)]
)
@pytest.mark.parametrize("length", [1, 3, TOP_K, 40, 300])
def test_search_keeping_the_newest_matches_a_numpy_oracle(top_k: int, recent_k: int, length: int) -> None:
    torch.manual_seed(top_k + recent_k)
    rng = np.random.default_rng(length)
    cfg = RankerConfig("dare", N_ITEMS, N_CATEGORIES, 8, 8, top_k, recent_k=recent_k)
    model = TwoStageRanker(cfg, rng.integers(0, N_CATEGORIES, N_ITEMS))
    # few distinct (item, bucket) pairs: equal logits; lengths from 0 to `length`
    target = torch.from_numpy(rng.integers(1, N_ITEMS, 9))
    rows = torch.from_numpy(rng.integers(1, 30, (9, length)))
    buckets = torch.from_numpy(rng.integers(0, 3, (9, length)))
    lengths = np.r_[0, length, min(recent_k, length), rng.integers(0, length + 1, 6)]
    mask = torch.from_numpy(np.arange(length)[None, :] < lengths[:, None])
    with torch.no_grad():
        logits = model.attention_logits(target, rows, buckets).numpy()
    want = recent_oracle(logits, mask.numpy(), top_k, recent_k)
    for chunk in (1, 2, max(top_k - 1, 1), top_k, 37, length, None):
        got = model.search(target, rows, buckets, mask, chunk=chunk)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"chunk {chunk}")
    # the newest-first ranking when every slot is kept; the search alone when none is
    newest = recent_oracle(logits, mask.numpy(), top_k, top_k)
    model.cfg.recent_k = top_k
    np.testing.assert_array_equal(model.search(target, rows, buckets, mask, chunk=5).numpy(), newest)
    model.cfg.recent_k = 0
    np.testing.assert_array_equal(
        model.search(target, rows, buckets, mask, chunk=5).numpy(),
        recent_oracle(logits, mask.numpy(), top_k, 0),
    )


def test_search_keeping_the_newest_with_gaps_in_the_mask() -> None:
    """The newest are the last valid positions of a row, wherever its padding is."""
    cfg = RankerConfig("dare", N_ITEMS, N_CATEGORIES, 8, 8, 6, recent_k=3)
    model = TwoStageRanker(cfg, np.random.default_rng(0).integers(0, N_CATEGORIES, N_ITEMS))
    rng = np.random.default_rng(4)
    target = torch.from_numpy(rng.integers(1, N_ITEMS, 5))
    rows = torch.from_numpy(rng.integers(1, N_ITEMS, (5, 20)))
    buckets = torch.from_numpy(rng.integers(0, 5, (5, 20)))
    mask = torch.from_numpy(rng.random((5, 20)) < 0.5)
    with torch.no_grad():
        logits = model.attention_logits(target, rows, buckets).numpy()
    want = recent_oracle(logits, mask.numpy(), 6, 3)
    for chunk in (1, 4, 20):
        np.testing.assert_array_equal(model.search(target, rows, buckets, mask, chunk=chunk).numpy(), want)


def test_recent_k_must_fit_in_top_k() -> None:
    for bad in (-1, TOP_K + 1):
        with pytest.raises(ValueError, match="recent_k"):
            RankerConfig("dare", N_ITEMS, N_CATEGORIES, top_k=TOP_K, recent_k=bad)


def test_short_term_must_fit_in_recent_k() -> None:
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="short_term"):
            RankerConfig("dare", N_ITEMS, N_CATEGORIES, top_k=TOP_K, recent_k=4, short_term=bad)


def _softmax_oracle(logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the slots where mask is 1 and log of its normaliser (0 with no slot), in float64."""
    z = np.where(mask > 0, logits, -np.inf)
    top = np.max(z, axis=1, keepdims=True, initial=-np.inf)
    has = mask.sum(1, keepdims=True) > 0
    e = np.where(mask > 0, np.exp(z - np.where(has, top, 0.0)), 0.0)
    total = e.sum(1, keepdims=True)
    weights = np.divide(e, total, out=np.zeros_like(e), where=has)
    mass = np.where(has, top + np.log(np.where(has, total, 1.0)), 0.0)
    return weights, mass


@pytest.mark.parametrize("kind", ["dare", "coupled"])
def test_short_term_branch_matches_a_numpy_oracle(kind: Literal["dare", "coupled"]) -> None:
    """Stage 2 with a short-term branch: the head sees [target, long-term interest, its mass, history
    flag, short-term interest, its mass], the short-term softmax over the first n slots only under
    its own gain."""
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    n = 4
    cfg = RankerConfig(kind, N_ITEMS, N_CATEGORIES, 8, 8, TOP_K, recent_k=6, short_term=n, stage2_gain=True)
    model = TwoStageRanker(cfg, rng.integers(0, N_CATEGORIES, N_ITEMS)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    rows = torch.from_numpy(rng.integers(1, N_ITEMS, (6, TOP_K)))
    buckets = torch.from_numpy(rng.integers(0, 5, (6, TOP_K)))
    # full rows, a row with fewer behaviors than n, a cold row, and gaps past the short-term slots
    lengths = np.array([TOP_K, TOP_K, 2, 0, 9, n])
    mask = torch.from_numpy(np.arange(TOP_K)[None, :] < lengths[:, None])
    target = torch.from_numpy(rng.integers(1, N_ITEMS, 6))
    with torch.no_grad():
        logit, weights = model.stage2(target, rows, buckets, mask)
        raw = model.attention_logits(target, rows, buckets).double().numpy() / model.scale
        r_t = (model.repr_item(target) + model.repr_cat(model.row_category[target])).double().numpy()
        r_b = (
            (model.repr_item(rows) + model.repr_cat(model.row_category[rows]) + model.repr_time(buckets))
            .double()
            .numpy()
        )
        gain, short_gain = np.exp(model.log_stage2_gain.item()), np.exp(model.log_short_gain.item())
    m = mask.numpy().astype(np.float64)
    w, mass = _softmax_oracle(raw * model.scale * gain, m)
    ws, short_mass = _softmax_oracle(raw[:, :n] * model.scale * short_gain, m[:, :n])
    features = np.concatenate(
        [
            r_t,
            np.einsum("nk,nkd->nd", w, r_b) * r_t,
            mass,
            (m.sum(1, keepdims=True) > 0).astype(np.float64),
            np.einsum("nk,nkd->nd", ws, r_b[:, :n]) * r_t,
            short_mass,
        ],
        axis=1,
    )
    with torch.no_grad():
        want = copy.deepcopy(model.head).double()(torch.from_numpy(features)).squeeze(-1).numpy()
    np.testing.assert_allclose(weights.numpy(), w, atol=1e-6)
    np.testing.assert_allclose(logit.numpy(), want, rtol=1e-5, atol=1e-5)
    assert model.candidate_features() == 3 * 8 + 3
    # the branch's gain reaches the score of every row with two or more short-term slots, and only theirs
    with torch.no_grad():
        model.log_short_gain += 1.0
        moved = model.stage2(target, rows, buckets, mask)[0].numpy() != logit.numpy()
    assert moved.tolist() == [True, True, True, False, True, True]
