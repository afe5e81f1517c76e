"""The training step's parts: the row-wise Adam, the byte-mask dropout, gradient averaging across
processes (two real gloo processes), and `torchrun` end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from exporters.bundle import load_bundle
from exporters.distributed import World, average_gradients
from exporters.models import ByteDropout, RankerConfig, TwoStageRanker
from exporters.row_adam import RowAdam
from tests.conftest import train_tiny


def _lazy_adam_oracle(
    w: np.ndarray, grads: list[tuple[np.ndarray, np.ndarray]], lr: float, b1: float, b2: float, eps: float
) -> np.ndarray:
    """Lazy Adam in plain numpy: duplicate rows summed, untouched rows and moments left alone."""
    w, m, v = w.astype(np.float64), np.zeros_like(w, np.float64), np.zeros_like(w, np.float64)
    for t, (rows, values) in enumerate(grads, start=1):
        g = np.zeros_like(w)
        np.add.at(g, rows, values)
        touched = np.unique(rows)
        m[touched] = b1 * m[touched] + (1 - b1) * g[touched]
        v[touched] = b2 * v[touched] + (1 - b2) * g[touched] ** 2
        m_hat, v_hat = m[touched] / (1 - b1**t), v[touched] / (1 - b2**t)
        w[touched] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


def test_row_adam_matches_the_lazy_adam_oracle_and_sparse_adam() -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(50, 4)).astype(np.float32)
    # repeated rows within a step, and rows untouched for several steps
    grads = [(rng.integers(0, 20, 30), rng.normal(size=(30, 4)).astype(np.float32)) for _ in range(6)]
    ours = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    theirs = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt, ref = RowAdam([ours], lr=0.01), torch.optim.SparseAdam([theirs], lr=0.01)
    for rows, values in grads:
        for p in (ours, theirs):
            p.grad = torch.sparse_coo_tensor(
                torch.from_numpy(rows)[None], torch.from_numpy(values), p.shape, check_invariants=True
            )
        opt.step()
        ref.step()
    want = _lazy_adam_oracle(w0, grads, 0.01, 0.9, 0.999, 1e-8)
    np.testing.assert_allclose(ours.detach().numpy(), want, atol=1e-6)
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), atol=1e-6)
    assert np.array_equal(ours.detach().numpy()[20:], w0[20:])  # never touched: never moved


def test_row_adam_refuses_dense_gradients() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sparse"):
        RowAdam([p]).step()


def test_byte_dropout_rate_scale_and_seeding() -> None:
    torch.manual_seed(0)
    drop = ByteDropout(0.5)
    x = torch.ones(200, 500)
    y = drop(x)
    kept = y != 0
    # 100,000 draws at p = 0.5: the kept share is within 5 standard deviations of one half
    assert abs(kept.float().mean().item() - 0.5) < 5 * 0.5 / np.sqrt(x.numel())
    assert torch.all(y[kept] == 2.0)
    drop.reseed(7)
    a = drop(x)
    drop.reseed(7)
    assert torch.equal(a, drop(x))
    drop.reseed(8)
    assert not torch.equal(a, drop(x))
    drop.eval()
    assert drop(x) is x
    assert ByteDropout(0.3).dropped == round(0.3 * 256)
    with pytest.raises(ValueError):
        ByteDropout(1.0)


def _ranker(sparse: bool) -> TwoStageRanker:
    torch.manual_seed(0)
    cfg = RankerConfig("dare", 40, 5, attention_dim=4, representation_dim=8, top_k=4)
    model = TwoStageRanker(cfg, np.arange(40) % 5)
    model.repr_item.sparse = model.attn_item.sparse = sparse
    return model


def _batch(n: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(1, 40, (n,), generator=g)
    rows = torch.randint(1, 40, (n, 10), generator=g)
    buckets = torch.randint(0, 5, (n, 10), generator=g)
    mask = torch.ones(n, 10, dtype=torch.bool)
    label = (torch.rand(n, generator=g) > 0.5).float()
    return target, rows, buckets, mask, label


def _gradients(model: TwoStageRanker, part: slice) -> dict[str, np.ndarray]:
    target, rows, buckets, mask, label = (t[part] for t in _batch())
    logit, _ = model(target, rows, buckets, mask)
    torch.nn.functional.binary_cross_entropy_with_logits(logit, label).backward()
    return {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy().copy()
        for n, p in model.named_parameters()
    }


def _worker(rank: int, port: int, sparse: bool, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank, 2)
    model = _ranker(sparse)
    idx = world.share(np.arange(8))
    target, rows, buckets, mask, label = (t[torch.from_numpy(idx)] for t in _batch())
    logit, _ = model(target, rows, buckets, mask)
    torch.nn.functional.binary_cross_entropy_with_logits(logit, label).backward()
    average_gradients(model, world)
    grads = {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy() for n, p in model.named_parameters()
    }
    np.savez(f"{out}/rank{rank}.npz", **grads)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-tables", "sparse-tables"])
def test_two_processes_average_to_the_one_process_gradient(sparse: bool, tmp_path: Path) -> None:
    """Each process takes half of a batch; after averaging both hold the whole batch's gradient."""
    mp.spawn(_worker, args=(_free_port(), sparse, str(tmp_path)), nprocs=2, join=True)
    want = _gradients(_ranker(sparse), slice(None))
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert set(got.files) == set(want)
        for name, g in want.items():
            np.testing.assert_allclose(got[name], g, atol=1e-6, err_msg=f"rank {rank}: {name}")


def test_sparse_tables_train_and_export_a_servable_bundle(tiny_data: Path, tmp_path: Path) -> None:
    dense = train_tiny(tiny_data, "dare", tmp_path / "dense", sparse_tables=False)
    sparse = train_tiny(tiny_data, "dare", tmp_path / "sparse", sparse_tables=True)
    bundle = load_bundle(sparse["bundle"])  # checksums, graph inputs, index
    assert bundle.manifest.n_items > 1
    # the lazy update of the tables, on data too small to rank well: about where the dense one is
    assert sparse["auc"] > 0.5 and dense["auc"] > 0.5
    assert abs(sparse["auc"] - dense["auc"]) < 0.03
    assert sparse["metrics"]["auc"] == sparse["auc"]


def test_torchrun_two_processes_train_one_bundle(tiny_data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DARE_TRAIN_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "service.cli",
        "train",
        "--data",
        str(tiny_data),
        "--model",
        "dare",
        "--out",
        str(tmp_path / "out"),
        "--epochs",
        "2",
        "--max-seq-len",
        "300",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    result = json.loads(lines[0])
    assert result["auc"] > 0.5
    bundle = load_bundle(result["bundle"])
    training = bundle.manifest.model_dump()["training"]
    assert training["processes"] == 2 and training["impressions_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "out" / "dare").iterdir()) == ["1"]  # one export
