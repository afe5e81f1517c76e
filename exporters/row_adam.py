"""Adam that updates only the embedding rows a step touched (lazy Adam), for large item tables.

A dense Adam step reads and writes every row of every table, and a dense embedding gradient is a
zero-filled table per lookup: both grow with the catalogue, not with the batch. At Taobao's 4.2 M
items the step alone was about 0.4 s. With `nn.Embedding(sparse=True)` the gradient holds only the
rows looked up, and this optimizer moves only those rows' weights and moments, so a step costs the
same at any catalogue size.

It is the lazy variant (TensorFlow's LazyAdam, torch's SparseAdam): a row's moments decay only in
steps that touch it, and bias correction uses the global step count. torch's SparseAdam is the
same update; this one sums duplicate rows with one `index_add_` instead of coalescing the sparse
tensor, which made SparseAdam slower than dense Adam at 40 k items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam over 2-D parameters whose gradients are sparse COO row gradients."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise ValueError("RowAdam needs sparse row gradients: nn.Embedding(sparse=True)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                # an uncoalesced gradient lists a row once per lookup: sum them per distinct row
                rows, inverse = torch.unique(grad._indices()[0], return_inverse=True)
                g = torch.zeros((len(rows), p.shape[1]), dtype=p.dtype, device=p.device)
                g.index_add_(0, inverse, grad._values())
                m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = v.div_(1 - beta2**t).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom), alpha=-group["lr"] / (1 - beta1**t))
