"""Export trained models to bundles: ONNX graphs (large ones with external data), the FAISS index, arrays."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from exporters.bundle import write_bundle
from exporters.models import FoundationModel, TwoStageRanker, UserEncoderGraph
from exporters.stage2_graph import FM_HISTORY_INPUTS, FM_INPUTS, INPUTS, OUTPUTS, Stage2Graph

OPSET = 17
# A graph whose initializers take more bytes than this is written as the graph file and one external
# data file beside it (`<graph>.data`). ONNX Runtime cannot parse a graph file over protobuf's 2 GB
# limit at all, and it parses an embedded graph whole before copying its tensors out, so a large
# embedded graph costs about twice its size while it loads; a Taobao-size catalogue (4.2 M items at
# representation d=64: 1.07 GB of tables) is above this.
EXTERNAL_DATA_THRESHOLD = 512 * 2**20
# Tensors smaller than this stay inside the graph file even when it has external data.
_EXTERNAL_MIN_TENSOR = 1024


def _trace(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    folder: Path,
) -> Path:
    """Trace a module to `folder`/model.onnx (the dynamo exporter puts its tensors in a file beside it)."""
    module.eval()
    path = folder / "model.onnx"
    common: dict[str, Any] = {
        "input_names": input_names,
        "output_names": output_names,
        "dynamic_axes": dynamic_axes,
        "opset_version": OPSET,
    }
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but exact and fast for these graphs;
        # the dynamo exporter is used only where the TorchScript one is gone.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, path, dynamo=False, **common)
        except (TypeError, RuntimeError, NotImplementedError):
            for leftover in folder.iterdir():
                leftover.unlink()
            torch.onnx.export(module, args, path, dynamo=True, external_data=True, **common)
    return path


def onnx_bytes(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """Trace a module to ONNX (weights embedded, so the file is self-contained) and return its bytes.

    For graphs under 2 GB (benchmarks compare graphs in memory); bundles are written with
    `onnx_model` and `_onnx_writer`, which handle any size.
    """
    return onnx_model(module, args, input_names, output_names, dynamic_axes).SerializeToString()


def onnx_model(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    """Trace a module to ONNX, every tensor in memory whatever the exporter wrote to disk.

    The TorchScript exporter writes a graph over 2 GB as one file that the onnx package still
    parses (ONNX Runtime does not); `_onnx_writer` then moves its tensors to external data.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = _trace(module, args, input_names, output_names, dynamic_axes, Path(tmp))
        return onnx.load_model(path, load_external_data=True)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a graph's initializers (its weights and tables)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def external_data_name(graph_name: str) -> str:
    """The external data file of a graph file: `ranker.onnx` -> `ranker.onnx.data`."""
    return f"{graph_name}.data"


def uses_external_data(model: onnx.ModelProto, threshold: int) -> bool:
    """Whether a graph is written with its tensors in an external data file (see EXTERNAL_DATA_THRESHOLD)."""
    return initializer_bytes(model) > threshold


def ranker_inputs(ranker: TwoStageRanker) -> list[str]:
    """Input names of a ranker's stage-2 graph, in order."""
    cfg = ranker.cfg
    return [*INPUTS, *(FM_INPUTS if cfg.fm_dim else ()), *(FM_HISTORY_INPUTS if cfg.fm_history else ())]


def _ranker_trace_args(
    ranker: TwoStageRanker, graph: type[Stage2Graph]
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[str], list[str], dict[str, dict[int, str]]]:
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
    if cfg.fm_history:
        h = 4
        args += [torch.randn(b, h, cfg.fm_history_dim), torch.ones(b, h)]
        axes |= {"fm_history": {0: "B", 1: "H"}, "fm_history_mask": {0: "B", 1: "H"}}
    return graph(ranker), tuple(args), ranker_inputs(ranker), list(OUTPUTS), axes


def ranker_onnx(ranker: TwoStageRanker, graph: type[Stage2Graph] = Stage2Graph) -> bytes:
    """Stage 2 of a ranker as ONNX bytes (see `Stage2Graph`; benchmarks pass variants): B, C and U dynamic."""
    return onnx_bytes(*_ranker_trace_args(ranker, graph))


def ranker_model(ranker: TwoStageRanker, graph: type[Stage2Graph] = Stage2Graph) -> onnx.ModelProto:
    """Stage 2 of a ranker as an in-memory ONNX model, of any size."""
    return onnx_model(*_ranker_trace_args(ranker, graph))


def _encoder_trace_args(
    fm: FoundationModel,
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[str], list[str], dict[str, dict[int, str]]]:
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
    return UserEncoderGraph(fm), args, ["behaviors", "buckets", "mask"], ["user_embedding"], axes


def encoder_onnx(fm: FoundationModel) -> bytes:
    """The FM user tower as ONNX bytes: [B, L] histories to [B, fm_dim] embeddings."""
    return onnx_bytes(*_encoder_trace_args(fm))


def encoder_model(fm: FoundationModel) -> onnx.ModelProto:
    """The FM user tower as an in-memory ONNX model, of any size."""
    return onnx_model(*_encoder_trace_args(fm))


def _onnx_writer(model: onnx.ModelProto, external: bool) -> Callable[[Path], None]:
    """Write a graph; with `external`, its tensors go to one file beside it (`external_data_name`)."""

    def write(p: Path) -> None:
        if external:
            onnx.save_model(
                model,
                p,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                # relative to the graph file, so the bundle folder can move
                location=external_data_name(p.name),
                size_threshold=_EXTERNAL_MIN_TENSOR,
            )
            # onnx creates the data file owner-only; a server running as another user must read it
            # as it reads the graph
            (p.parent / external_data_name(p.name)).chmod(p.stat().st_mode & 0o777)
        else:
            onnx.save_model(model, p)

    return write


def _onnx_manifest(
    model: onnx.ModelProto, graph_name: str, inputs: list[str], outputs: list[str], threshold: int
) -> tuple[dict[str, Any], Callable[[Path], None]]:
    """The manifest's `onnx` entry of a graph and the writer of its file(s)."""
    external = uses_external_data(model, threshold)
    info = {
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "initializer_bytes": initializer_bytes(model),
        "external_data": [external_data_name(graph_name)] if external else [],
    }
    return info, _onnx_writer(model, external)


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
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    fm_history: dict[str, Any] | None = None,
    files: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a `dare`/`coupled` bundle: ranker.onnx, attention.faiss, time_bias.npy, item arrays.

    A graph with more than `external_data_threshold` bytes of initializers is written as
    ranker.onnx and ranker.onnx.data (its tensors), both listed with their checksums. A ranker with an
    FM history needs its manifest section (`fm_history`: which entries it reads, `bundle.FmHistorySpec`);
    `files` adds files of the caller's (the FM-history encoder).
    """
    if bool(ranker.cfg.fm_history) != (fm_history is not None):
        raise ValueError("a ranker with an FM history is exported with its fm_history section, and only then")
    cfg = ranker.cfg
    ranker.eval()
    with torch.no_grad():
        time_bias = ranker.time_bias().float().numpy().astype(np.float32)
    onnx_info, onnx_writer = _onnx_manifest(
        ranker_model(ranker), "ranker.onnx", ranker_inputs(ranker), list(OUTPUTS), external_data_threshold
    )
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
        "onnx": onnx_info,
        "config": cfg.to_dict(),
        **({"fm_history": fm_history} if fm_history is not None else {}),
        **extra,
    }
    writers = {
        **(files or {}),
        "ranker.onnx": onnx_writer,
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
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write an `fm` bundle: user_encoder.onnx and the item arrays (external data as `export_ranker`)."""
    cfg = fm.cfg
    inputs = ["behaviors", "buckets", "mask"]
    onnx_info, onnx_writer = _onnx_manifest(
        encoder_model(fm), "user_encoder.onnx", inputs, ["user_embedding"], external_data_threshold
    )
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
        "onnx": onnx_info,
        "config": cfg.to_dict(),
        **extra,
    }
    writers = {
        "user_encoder.onnx": onnx_writer,
        "item_ids.npy": _npy_writer(np.asarray(item_ids, dtype=np.int64)),
        "item_categories.npy": _npy_writer(fm.row_category.numpy().astype(np.int64)),
        "weights.npz": _weights_writer(fm),
    }
    return write_bundle(root, variant, manifest, writers)
