"""TwoStageRanker's stage 1 in training: the chunked search against one search over the whole history."""

from __future__ import annotations

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
