"""Export trained models to bundles: self-contained ONNX graphs, the FAISS attention index, arrays."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.bundle import write_bundle
from exporters.models import FoundationModel, TwoStageRanker, UserEncoderGraph
from exporters.stage2_graph import FM_INPUTS, INPUTS, OUTPUTS, Stage2Graph

OPSET = 17


def onnx_bytes(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """Trace a module to ONNX (weights embedded, so the file is self-contained) and return its bytes."""
    module.eval()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        # The TorchScript exporter is deprecated upstream but exact and fast for these graphs;
        # the dynamo exporter is used only where the TorchScript one is gone.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        common: dict[str, Any] = {
            "input_names": input_names,
            "output_names": output_names,
            "dynamic_axes": dynamic_axes,
            "opset_version": OPSET,
        }
        try:
            torch.onnx.export(module, args, path, dynamo=False, **common)
        except (TypeError, RuntimeError, NotImplementedError):
            path.unlink(missing_ok=True)
            torch.onnx.export(module, args, path, dynamo=True, external_data=False, **common)
        return path.read_bytes()


def ranker_inputs(ranker: TwoStageRanker) -> list[str]:
    """Input names of a ranker's stage-2 graph, in order."""
    return [*INPUTS, *(FM_INPUTS if ranker.cfg.fm_dim else ())]


def ranker_onnx(ranker: TwoStageRanker, graph: type[Stage2Graph] = Stage2Graph) -> bytes:
    """Stage 2 of a ranker as ONNX (see `Stage2Graph`; benchmarks pass variants): B, C and U dynamic."""
    cfg = ranker.cfg
    b, c, u, k = 2, 3, 5, cfg.top_k
    args: list[torch.Tensor] = [
        torch.randint(0, cfg.n_items, (b, c)),  # candidates
        torch.randint(0, cfg.n_items, (b, u)),  # behaviors
        torch.randint(0, cfg.n_time_buckets, (b, u)),  # buckets
        torch.randint(0, u, (b, c, k)),  # retrieved
        torch.randn(b, c, k),  # scores
        torch.ones(b, c, k),  # mask
    ]
    axes: dict[str, dict[int, str]] = {
        "candidates": {0: "B", 1: "C"},
        "behaviors": {0: "B", 1: "U"},
        "buckets": {0: "B", 1: "U"},
        "retrieved": {0: "B", 1: "C"},
        "scores": {0: "B", 1: "C"},
        "mask": {0: "B", 1: "C"},
        "probability": {0: "B", 1: "C"},
        "attention": {0: "B", 1: "C"},
    }
    if cfg.fm_dim:
        args += [torch.randn(b, cfg.fm_dim), torch.ones(b)]
        axes |= {"fm": {0: "B"}, "fm_present": {0: "B"}}
    return onnx_bytes(graph(ranker), tuple(args), ranker_inputs(ranker), list(OUTPUTS), axes)


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
    return onnx_bytes(UserEncoderGraph(fm), args, ["behaviors", "buckets", "mask"], ["user_embedding"], axes)


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        p.write_bytes(data)

    return write


def _npy_writer(arr: np.ndarray) -> Callable[[Path], None]:
    return lambda p: np.save(p, arr, allow_pickle=False)


def _weights_writer(module: torch.nn.Module) -> Callable[[Path], None]:
    """The PyTorch weights as a plain .npz (no pickle), for offline scoring and fine-tuning."""

    def write(p: Path) -> None:
        state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        with open(p, "wb") as f:
            np.savez(f, **state)

    return write


def _faiss_writer(vectors: np.ndarray) -> Callable[[Path], None]:
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
            "inputs": ranker_inputs(ranker),
            "outputs": list(OUTPUTS),
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
