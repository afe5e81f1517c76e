"""Full attention over every behavior: the matrix form equals the ranker's own stage 2 over all L."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.models import RankerConfig, TwoStageRanker
from exporters.offline import full_attention_logits

N_ITEMS, N_CATS, K = 80, 7, 8


def _ranker(kind: str, fm_dim: int) -> TwoStageRanker:
    torch.manual_seed(3)
    cats = np.r_[0, np.arange(1, N_ITEMS) % (N_CATS - 1) + 1].astype(np.int64)
    model = TwoStageRanker(
        RankerConfig(kind, N_ITEMS, N_CATS, 4, 8, K, fm_dim, (16, 8), item_dropout=0.5), cats
    )
    with torch.no_grad():  # spread untrained weights so attention and scores vary
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _user(length: int, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cand = torch.randint(0, N_ITEMS, (c,), generator=g)
    return (
        cand,
        torch.randint(0, N_ITEMS, (length,), generator=g),
        torch.randint(0, 64, (length,), generator=g),
    )


@pytest.mark.parametrize(("kind", "fm_dim"), [("dare", 0), ("dare", 6), ("coupled", 6)])
@pytest.mark.parametrize("fm_present", [True, False])
def test_matches_stage2_over_every_behavior(kind: str, fm_dim: int, fm_present: bool) -> None:
    model = _ranker(kind, fm_dim)
    cand, beh, buckets = _user(40)
    c, length = len(cand), len(beh)
    fm = torch.randn(fm_dim) if fm_dim and fm_present else None
    fm_b = present = None
    if fm_dim:
        fm_b = (fm if fm is not None else torch.zeros(fm_dim)).expand(c, -1)
        present = torch.full((c,), 1.0 if fm is not None else 0.0)
    with torch.no_grad():
        want, _ = model.stage2(
            cand, beh.expand(c, length), buckets.expand(c, length), torch.ones(c, length, dtype=torch.bool),
            fm_b, present,
        )  # fmt: skip
        got = full_attention_logits(model, cand, beh, buckets, fm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_equals_two_stage_when_the_history_fits_in_top_k() -> None:
    model = _ranker("dare", 0)
    cand, beh, buckets = _user(K)  # stage 1 keeps all K behaviors: both models see the same set
    c = len(cand)
    with torch.no_grad():
        two_stage, _ = model(cand, beh.expand(c, K), buckets.expand(c, K), torch.ones(c, K, dtype=torch.bool))
        full = full_attention_logits(model, cand, beh, buckets)
    torch.testing.assert_close(full, two_stage, rtol=1e-5, atol=1e-5)


def test_differs_from_two_stage_on_a_long_history() -> None:
    model = _ranker("dare", 0)
    cand, beh, buckets = _user(10 * K)
    c, length = len(cand), len(beh)
    with torch.no_grad():
        two_stage, _ = model(
            cand, beh.expand(c, length), buckets.expand(c, length), torch.ones(c, length, dtype=torch.bool)
        )
        full = full_attention_logits(model, cand, beh, buckets)
    assert not torch.allclose(full, two_stage, atol=1e-4)


def test_empty_history_scores_like_an_all_masked_stage2() -> None:
    model = _ranker("dare", 6)
    cand, _, _ = _user(0)
    c = len(cand)
    pad = torch.zeros(c, 1, dtype=torch.long)
    with torch.no_grad():
        want, _ = model.stage2(
            cand, pad, pad, torch.zeros(c, 1, dtype=torch.bool), torch.zeros(c, 6), torch.zeros(c)
        )
        got = full_attention_logits(
            model, cand, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
