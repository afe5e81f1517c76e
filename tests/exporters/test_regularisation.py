"""The row-wise embedding L2: the penalty's value against a numpy oracle, and that it reaches only the
representation rows a batch reads (weight decay on the tables would shrink every row at every step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.models import RankerConfig, TwoStageRanker
from exporters.train import Batch, batch_rows_l2


def _batch() -> Batch:
    target = torch.tensor([3, 7, 3])
    hist = torch.tensor([[1, 2, 0], [7, 9, 9], [4, 0, 0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    return Batch(target, hist, torch.zeros_like(hist), mask, torch.zeros(3))


@pytest.mark.parametrize("kind", ["dare", "coupled"])
def test_penalty_counts_each_read_row_once(kind: str) -> None:
    torch.manual_seed(0)
    model = TwoStageRanker(RankerConfig(kind, 12, 3, 4, 6, 2), np.arange(12) % 3)
    b = _batch()
    read = [1, 2, 3, 4, 7, 9]  # padding positions (row 0 after a masked slot) are not read
    tables = [model.repr_item.weight.detach().numpy()]
    want = float((tables[0][read] ** 2).sum()) / 3
    got = batch_rows_l2(model, b)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)

    got.backward()
    grad = model.repr_item.weight.grad
    assert grad is not None
    touched = grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == read
    # the gradient of |w|^2 / n is 2 w / n on every read row
    np.testing.assert_allclose(grad[read].numpy(), 2 * tables[0][read] / 3, rtol=1e-6)
    if kind == "dare":  # the attention table, which stage 1 searches, is not shrunk
        assert model.attn_item.weight.grad is None
