"""Data-parallel training across processes: `torchrun --nproc-per-node N dare-serve train ...`.

Every process builds the same samples and the same initial model (same seed), walks the same
shuffled list of batches, and takes its share of each batch (rows rank, rank + N, ...): one step of
N processes sees exactly the impressions of one step of one process. After the backward pass the
gradients are averaged across processes (one all-reduce of all dense gradients flattened together;
the sparse row gradients of large item tables are gathered, since each process touched other rows),
so every process applies the same update and the replicas never drift. Gloo on CPU, NCCL on GPU.

Replicated tables fit while one process holds the model and Adam's two moments (about 3x the
tables): at 4.2 M items and d = 64 + 16 that is ~4 GB per process. Past a GPU's memory the tables
must be sharded across devices (TorchRec's sharded embedding bags), which this module does not do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that evaluates, exports and reports."""
        return self.rank == 0

    def share(self, idx: np.ndarray) -> np.ndarray:
        """This process's part of a batch."""
        return idx[self.rank :: self.size]


def init_world(device: torch.device) -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR/PORT); the
    process group is started when there is more than one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(model: torch.nn.Module, world: World) -> None:
    """Replaces every gradient by its mean over the processes."""
    if world.size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    # a parameter without a gradient in this process (an FM input no batch used) still has to take
    # part, or the processes would reduce buffers of different lengths
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    dense = [g for g in grads if not g.is_sparse]
    if dense:
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat)
        flat /= world.size
        offset = 0
        for g in dense:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g in zip(params, grads, strict=True):
        p.grad = _gathered_sparse(g, world) if g.is_sparse else g


def _gathered_sparse(grad: torch.Tensor, world: World) -> torch.Tensor:
    """The mean over processes of a sparse row gradient: every process's rows, values divided by N."""
    rows, values = grad._indices()[0], grad._values()
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    longest = int(max(int(c.item()) for c in counts))
    padded_rows = torch.zeros(longest, dtype=rows.dtype, device=rows.device)
    padded_values = torch.zeros((longest, values.shape[1]), dtype=values.dtype, device=values.device)
    padded_rows[: len(rows)], padded_values[: len(rows)] = rows, values
    all_rows = [torch.empty_like(padded_rows) for _ in range(world.size)]
    all_values = [torch.empty_like(padded_values) for _ in range(world.size)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    n = [int(c.item()) for c in counts]
    rows = torch.cat([r[:k] for r, k in zip(all_rows, n, strict=True)])
    values = torch.cat([v[:k] for v, k in zip(all_values, n, strict=True)]) / world.size
    # rows come from the processes' own embedding lookups: in range by construction
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape, check_invariants=False)


def gather_parts(part: np.ndarray, world: World) -> list[np.ndarray]:
    """Every process's array, in rank order (for evaluation split across processes)."""
    if world.size == 1:
        return [part]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, part)
    return out
