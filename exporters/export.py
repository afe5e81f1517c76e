"""Export trained models to bundles: self-contained ONNX graphs, the FAISS attention index, arrays."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.bundle import write_bundle
from exporters.models import FoundationModel, Stage2Graph, TwoStageRanker, UserEncoderGraph

OPSET = 17


def _onnx_bytes(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """Trace a module to ONNX in memory (weights embedded, so the file is self-contained)."""
    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but exact and fast for these graphs;
        # the dynamo exporter is used only where the TorchScript one is gone.
        warnings.simplefilter("ignore")
        common = {
            "input_names": input_names,
            "output_names": output_names,
            "dynamic_axes": dynamic_axes,
            "opset_version": OPSET,
        }
        try:
            torch.onnx.export(module, args, buf, dynamo=False, **common)
        except (TypeError, RuntimeError, NotImplementedError):
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=True, external_data=False, **common)
    return buf.getvalue()


def ranker_onnx(ranker: TwoStageRanker) -> bytes:
    """Stage 2 of a ranker as ONNX: inputs [B, C] candidates and [B, C, K] behaviors."""
    cfg = ranker.cfg
    b, c, k = 2, 3, cfg.top_k
    args: list[torch.Tensor] = [
        torch.randint(0, cfg.n_items, (b, c)),
        torch.randint(0, cfg.n_items, (b, c, k)),
        torch.randint(0, cfg.n_time_buckets, (b, c, k)),
        torch.ones(b, c, k),
    ]
    names = ["candidates", "behaviors", "buckets", "mask"]
    axes: dict[str, dict[int, str]] = {
        "candidates": {0: "B", 1: "C"},
        "behaviors": {0: "B", 1: "C"},
        "buckets": {0: "B", 1: "C"},
        "mask": {0: "B", 1: "C"},
        "probability": {0: "B", 1: "C"},
        "attention": {0: "B", 1: "C"},
    }
    if cfg.fm_dim:
        args += [torch.randn(b, cfg.fm_dim), torch.ones(b)]
        names += ["fm", "fm_present"]
        axes |= {"fm": {0: "B"}, "fm_present": {0: "B"}}
    return _onnx_bytes(Stage2Graph(ranker), tuple(args), names, ["probability", "attention"], axes)


def encoder_onnx(fm: FoundationModel) -> bytes:
    """The FM user tower as ONNX: [B, L] histories to [B, fm_dim] embeddings."""
    b, length = 2, 5
    args = (
        torch.randint(0, fm.cfg.n_items, (b, length)),
        torch.randint(0, fm.cfg.n_time_buckets, (b, length)),
        torch.ones(b, length),
    )
    axes = {
        "behaviors": {0: "B", 1: "L"},
        "buckets": {0: "B", 1: "L"},
        "mask": {0: "B", 1: "L"},
        "user_embedding": {0: "B"},
    }
    return _onnx_bytes(UserEncoderGraph(fm), args, ["behaviors", "buckets", "mask"], ["user_embedding"], axes)


def _bytes_writer(data: bytes):
    return lambda p: p.write_bytes(data)


def _npy_writer(arr: np.ndarray):
    return lambda p: np.save(p, arr, allow_pickle=False)


def _weights_writer(module: torch.nn.Module):
    """The PyTorch weights as a plain .npz (no pickle), for offline scoring and fine-tuning."""

    def write(p: Path) -> None:
        state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        with open(p, "wb") as f:
            np.savez(f, **state)

    return write


def _faiss_writer(vectors: np.ndarray):
    def write(p: Path) -> None:
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(index, str(p))

    return write


def export_ranker(
    ranker: TwoStageRanker,
    root: Path,
    variant: str,
    item_ids: np.ndarray,
    max_seq_len: int,
    metrics: dict[str, Any],
    fm_version: str | None,
    extra: dict[str, Any],
) -> Path:
    """Write a `dare`/`coupled` bundle: ranker.onnx, attention.faiss, time_bias.npy, item arrays."""
    cfg = ranker.cfg
    ranker.eval()
    with torch.no_grad():
        time_bias = ranker.time_bias().float().numpy().astype(np.float32)
    manifest = {
        "model": cfg.kind,
        "dims": {"attention": cfg.attention_dim, "representation": cfg.representation_dim, "fm": cfg.fm_dim},
        "top_k": cfg.top_k,
        "max_seq_len": max_seq_len,
        "n_items": cfg.n_items,
        "n_categories": cfg.n_categories,
        "n_time_buckets": cfg.n_time_buckets,
        "attention_scale": ranker.scale,
        "fm_version": fm_version,
        "metrics": metrics,
        "onnx": {
            "opset": OPSET,
            "inputs": ["candidates", "behaviors", "buckets", "mask"]
            + (["fm", "fm_present"] if cfg.fm_dim else []),
            "outputs": ["probability", "attention"],
        },
        "config": cfg.to_dict(),
        **extra,
    }
    writers = {
        "ranker.onnx": _bytes_writer(ranker_onnx(ranker)),
        "attention.faiss": _faiss_writer(ranker.item_attention_table()),
        "time_bias.npy": _npy_writer(time_bias),
        "item_ids.npy": _npy_writer(np.asarray(item_ids, dtype=np.int64)),
        "item_categories.npy": _npy_writer(ranker.row_category.numpy().astype(np.int64)),
        "weights.npz": _weights_writer(ranker),
    }
    return write_bundle(root, variant, manifest, writers)


def export_fm(
    fm: FoundationModel,
    root: Path,
    variant: str,
    item_ids: np.ndarray,
    max_seq_len: int,
    metrics: dict[str, Any],
    extra: dict[str, Any],
) -> Path:
    """Write an `fm` bundle: user_encoder.onnx and the item arrays."""
    cfg = fm.cfg
    manifest = {
        "model": "fm",
        "dims": {"attention": 0, "representation": cfg.dim, "fm": cfg.fm_dim},
        "top_k": 1,
        "max_seq_len": max_seq_len,
        "n_items": cfg.n_items,
        "n_categories": cfg.n_categories,
        "n_time_buckets": cfg.n_time_buckets,
        "fm_version": None,
        "metrics": metrics,
        "onnx": {"opset": OPSET, "inputs": ["behaviors", "buckets", "mask"], "outputs": ["user_embedding"]},
        "config": cfg.to_dict(),
        **extra,
    }
    writers = {
        "user_encoder.onnx": _bytes_writer(encoder_onnx(fm)),
        "item_ids.npy": _npy_writer(np.asarray(item_ids, dtype=np.int64)),
        "item_categories.npy": _npy_writer(fm.row_category.numpy().astype(np.int64)),
        "weights.npz": _weights_writer(fm),
    }
    return write_bundle(root, variant, manifest, writers)
