"""Execution providers and ONNX Runtime session options: GPU when present and allowed, else CPU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

logger = logging.getLogger("dare.service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

Device = Literal["auto", "cpu", "cuda"]


class DeviceUnavailable(RuntimeError):
    """`cuda` was required but ONNX Runtime offers no CUDA execution provider."""


def choose_providers(device: Device, available: Sequence[str]) -> list[str]:
    """ORT providers in priority order for a device setting, given ORT's available providers."""
    has_cuda = CUDA in available
    if device == "cuda" and not has_cuda:
        raise DeviceUnavailable(
            f"DARE_DEVICE=cuda but ONNX Runtime offers only {list(available)} "
            "(install onnxruntime-gpu and check the CUDA libraries)"
        )
    if device != "cpu" and has_cuda:
        return [CUDA, CPU]  # CPU stays as the fallback for any op the CUDA EP lacks
    return [CPU]


def preload_cuda_libraries(device: Device, available: Sequence[str]) -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's pip extras installed.

    Those wheels put the libraries under site-packages/nvidia, where the dynamic loader does not
    look; without this a pip-only install (no system CUDA) silently falls back to the CPU.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if device == "cpu" or CUDA not in available or preload is None:
        return
    try:
        preload()
    except Exception as e:  # a system CUDA on the loader's path still works without it
        logger.warning("onnxruntime.preload_dlls() failed (%s); relying on the system CUDA libraries", e)


def session_options(intra_op_threads: int) -> Any:
    """Session options for small, latency-bound batches; built once per bundle load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = intra_op_threads
    # Spinning workers burn the cores the event loop and FAISS need between calls; on a 2-core
    # box that costs more latency than the faster wake-up saves.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def single_threaded_numerics() -> None:
    """Compute-thread initializer: BLAS and OpenMP pools at one thread.

    Parallelism comes from the compute threads and from batching. Inside one request, OpenBLAS and
    FAISS's OpenMP pools would spin waiting for work on the cores ORT and the event loop need: on a
    busy 2-core box that made stage 1 ~8x and stage 2 ~3x slower than single-threaded. The BLAS
    limit is process-wide; OpenMP's is per thread, hence an initializer run in every worker.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    faiss.omp_set_num_threads(1)
