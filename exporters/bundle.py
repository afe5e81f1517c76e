"""Model bundles on disk: `ROOT/<variant>/<version>/` with a manifest, ONNX graph, FAISS index, arrays.

Writing goes through a temporary folder renamed into place, so a reader (or a directory watch)
never sees half a bundle. Loading verifies every checksum, shape and dimension before anything is
used, and refuses a bad bundle with a `BundleError` that names the file and what was expected.
Nothing is ever unpickled: arrays load with `allow_pickle=False`, the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exporters.features import N_TIME_BUCKETS

# 2: the ranker graph takes stage-1 scores and each request's distinct retrieved behaviors once
# (`exporters/stage2_graph.py`); format 1 took every (candidate, behavior) pair's rows.
FORMAT_VERSION = 2
# What this build reads, per model kind: FM bundles did not change from format 1 to 2.
READABLE_FORMATS: dict[str, tuple[int, ...]] = {"dare": (2,), "coupled": (2,), "fm": (1, 2)}
# Both are applied with fullmatch, which (unlike `$`) also refuses a trailing newline.
_VERSION_RE = re.compile(r"[0-9]+")
# Variant names: one path component of the bundle root; also the keys of per-variant settings.
VARIANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class BundleError(Exception):
    """A bundle that cannot be served: missing, corrupt, or inconsistent with its manifest."""


class Dims(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attention: int = Field(ge=0)
    representation: int = Field(ge=0)
    fm: int = Field(ge=0)


class FmHistorySpec(BaseModel):
    """Which FM-history entries a ranker reads (manifest `fm_history`, rankers trained with one)."""

    model_config = ConfigDict(extra="allow")
    length: int = Field(ge=1)  # the newest entries fed per request, at most
    dim: int = Field(ge=1)  # the prefix d' of each entry the graph takes
    fm_version: str  # the FM and the encoder whose entries are current; others are stale
    encoder_version: str
    encoding: Literal["fp32", "int8", "int4"]
    lag_s: int = Field(ge=0)  # the write lag training assumed


class Manifest(BaseModel):
    """manifest.json: what the bundle holds and how it was made."""

    model_config = ConfigDict(extra="allow")
    format_version: int
    model: Literal["dare", "coupled", "fm"]
    variant: str
    version: str
    created_at: str
    dims: Dims
    top_k: int = Field(ge=1)
    # The training window. Serving reads as deep as its search-depth setting (stage 1 does not
    # depend on the history length); the FM user tower reads this many newest behaviors.
    max_seq_len: int = Field(ge=1)
    n_items: int = Field(ge=2)
    n_categories: int = Field(ge=1)
    n_time_buckets: int = Field(ge=1)
    fm_version: str | None
    metrics: dict[str, Any]
    files: dict[str, str]
    fm_history: FmHistorySpec | None = None

    @property
    def tag(self) -> str:
        """`variant:version`, the FM version tag a ranker records and the feature store keys on."""
        return f"{self.variant}:{self.version}"


REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "dare": ("ranker.onnx", "attention.faiss", "time_bias.npy", "item_ids.npy", "item_categories.npy"),
    "coupled": ("ranker.onnx", "attention.faiss", "time_bias.npy", "item_ids.npy", "item_categories.npy"),
    "fm": ("user_encoder.onnx", "item_ids.npy", "item_categories.npy"),
}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_variant_name(name: str) -> bool:
    """Whether `name` is a valid variant name (the whole of it matches `VARIANT_PATTERN`)."""
    return VARIANT_PATTERN.fullmatch(name) is not None


def check_name(kind: str, name: str) -> str:
    """A variant or version name that is safe as one path component."""
    if not is_variant_name(name) or name in {".", ".."}:
        raise BundleError(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def list_versions(variant_dir: Path) -> list[Path]:
    """Version folders of one variant, oldest first (versions are integers)."""
    if not variant_dir.is_dir():
        return []
    found = [p for p in variant_dir.iterdir() if p.is_dir() and _VERSION_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name))


def write_bundle(
    root: Path, variant: str, manifest: dict[str, Any], writers: dict[str, Callable[[Path], None]]
) -> Path:
    """Write a new version of `variant` under root atomically; returns its folder.

    `writers` maps a file name to the function that writes it; the manifest lists every file they
    leave in the folder with its sha256 (a graph's external data file included).
    """
    check_name("variant", variant)
    variant_dir = Path(root) / variant
    variant_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=variant_dir))
    try:
        for name, write in writers.items():
            write(tmp / name)
            if not (tmp / name).is_file():
                raise BundleError(f"{variant}: the writer of {name} wrote no file")
        # Every file in the folder, not only the writers' names: a graph writer may put its
        # tensors in an external data file beside the graph, and that file needs a checksum too.
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        while True:
            existing = list_versions(variant_dir)
            version = str(int(existing[-1].name) + 1 if existing else 1)
            body = {
                **manifest,
                "format_version": FORMAT_VERSION,
                "variant": variant,
                "version": version,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            }
            Manifest.model_validate(body)
            (tmp / "manifest.json").write_text(json.dumps(body, indent=2, sort_keys=True))
            try:
                # rename fails if a concurrent writer took this version first; then try the next
                os.rename(tmp, variant_dir / version)
                return variant_dir / version
            except OSError:
                if not (variant_dir / version).exists():
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, element type and shape (ints or axis names) of one ONNX input or output."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Bundle:
    """A verified bundle, ready to serve: arrays in memory and the ONNX session open.

    A ranker's attention table is read from its FAISS index once, at load, into `search_table`:
    stage 1 searches those rows directly (the engine's compiled top-K on CPU, FAISS's brute-force
    kernel on GPU), so the index itself is not kept, and the table is not held twice.
    """

    path: Path
    manifest: Manifest
    item_ids: np.ndarray  # raw item id per row; row 0 (-1) is the reserved unknown row
    item_categories: np.ndarray
    session: Any  # onnxruntime.InferenceSession (its inputs and outputs checked against the manifest)
    # [n_items, d_attention + 1] float32: the FAISS index's rows and a zero column, where stage 1
    # writes a behavior's time bias (its keys) or a 1 (its queries): one gather builds either
    search_table: np.ndarray | None = None
    time_bias: np.ndarray | None = None  # [n_time_buckets] float32
    row_table: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_table", dense_row_table(self.item_ids))

    @property
    def variant(self) -> str:
        return self.manifest.variant

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def attention(self) -> np.ndarray | None:
        """[n_items, d_attention] float32, the FAISS index's rows (a view into `search_table`)."""
        return None if self.search_table is None else self.search_table[:, :-1]

    def rows(self, raw_ids: np.ndarray) -> np.ndarray:
        """Item rows of raw item ids; ids not in the bundle map to the reserved row 0."""
        if self.row_table is None:
            return item_rows(self.item_ids, raw_ids)
        # ids below 0 clip to -1, those past the largest to its end: both read the table's last
        # entry, which is 0 (no raw id maps there)
        table = self.row_table
        return table[np.clip(np.asarray(raw_ids, dtype=np.int64), -1, len(table) - 1)].astype(np.int64)


def search_table_of(attention: np.ndarray) -> np.ndarray:
    """[n, d + 1] float32: the attention rows and a zero column for stage 1's time bias (or 1)."""
    table = np.zeros((attention.shape[0], attention.shape[1] + 1), dtype=np.float32)
    table[:, :-1] = attention
    return table


# A dense id -> row table replaces the binary search when the raw ids are this compact: at most
# this many entries per item, plus a fixed allowance (4 bytes each).
_DENSE_ENTRIES_PER_ITEM = 16
_DENSE_ENTRIES_EXTRA = 1 << 20


def dense_row_table(item_ids: np.ndarray) -> np.ndarray | None:
    """int32 [max id + 2]: the row of each raw id (0: unknown), and a last entry 0; None when the ids
    are negative or too sparse for a table of reasonable size (rows then come from a binary search).

    Mapping 10,000 behaviors by binary search costs about as much as a third of stage 1 at d=16;
    a table lookup, a fortieth of that.
    """
    known = item_ids[1:]
    if len(known) == 0 or known[0] < 0:
        return None
    size = int(known[-1]) + 2
    if size > _DENSE_ENTRIES_PER_ITEM * len(known) + _DENSE_ENTRIES_EXTRA or len(item_ids) >= 2**31:
        return None
    table = np.zeros(size, dtype=np.int32)
    table[known] = np.arange(1, len(item_ids), dtype=np.int32)
    return table


def item_rows(item_ids: np.ndarray, raw_ids: np.ndarray) -> np.ndarray:
    """Rows of raw ids in a vocabulary whose rows 1.. hold sorted raw ids; unknown -> 0."""
    raw = np.asarray(raw_ids, dtype=np.int64)
    known = item_ids[1:]
    pos = np.searchsorted(known, raw)
    pos_c = np.minimum(pos, len(known) - 1)
    hit = known[pos_c] == raw
    return np.where(hit, pos_c + 1, 0).astype(np.int64)


def _load_array(path: Path, dtype: type, shape: Sequence[int]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BundleError(f"{path.name}: not a readable .npy array ({e})") from e
    if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
        raise BundleError(
            f"{path.name}: expected {np.dtype(dtype).name}{tuple(shape)}, "
            f"found {arr.dtype.name}{tuple(arr.shape)}"
        )
    return arr


def read_manifest(path: Path) -> Manifest:
    """Parse and validate `manifest.json` of a bundle folder."""
    mpath = Path(path) / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{path}: no manifest.json")
    try:
        manifest = Manifest.model_validate_json(mpath.read_bytes())
    except ValidationError as e:
        raise BundleError(f"{mpath}: invalid manifest: {e.errors()[:3]}") from e
    readable = READABLE_FORMATS[manifest.model]
    if manifest.format_version not in readable:
        hint = ""
        if manifest.model != "fm" and manifest.format_version < FORMAT_VERSION:
            hint = (
                ": its ranker.onnx takes the per-pair stage-2 inputs of format 1; train and export "
                "it again with this build (`dare-serve train`)"
            )
        raise BundleError(
            f"{mpath}: {manifest.model} bundle of format_version {manifest.format_version}, this build "
            f"reads {', '.join(map(str, readable))}{hint}"
        )
    return manifest


def external_data_files(path: Path, manifest: Manifest) -> list[str]:
    """The files that hold the ONNX graph's tensors outside it (`onnx.external_data`; none: [])."""
    onnx_info = (manifest.model_extra or {}).get("onnx") or {}
    names = onnx_info.get("external_data", []) if isinstance(onnx_info, dict) else []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{path}: manifest onnx.external_data must be a list of file names, not {names!r}")
    return names


def verify_files(path: Path, manifest: Manifest) -> None:
    """Every required file is listed, present, inside the bundle and matches its sha256.

    The graph's external data files are required too, so a missing, truncated or corrupt one is
    refused here, by name, before ONNX Runtime reads anything.
    """
    for name in (*REQUIRED_FILES[manifest.model], *external_data_files(path, manifest)):
        if name not in manifest.files:
            raise BundleError(f"{path}: manifest does not list required file {name}")
    root = Path(path).resolve()
    for name, digest in manifest.files.items():
        fpath = (root / name).resolve()
        if fpath.parent != root:
            raise BundleError(f"{path}: file name {name!r} escapes the bundle folder")
        if not fpath.is_file():
            raise BundleError(f"{path}: missing file {name}")
        actual = sha256_file(fpath)
        if actual != digest:
            raise BundleError(
                f"{path}/{name}: sha256 {actual[:12]}... does not match the manifest's "
                f"{digest[:12]}... (corrupt or truncated)"
            )


# Expected ONNX inputs or outputs: name -> (element type, shape of ints and axis names).
IoSpec = dict[str, tuple[str, tuple[int | str, ...]]]


def _specs(nodes: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n.name, n.type, tuple(n.shape)) for n in nodes)


def _expect_io(path: Path, specs: tuple[TensorSpec, ...], expected: IoSpec, kind: str) -> None:
    got = {s.name: s for s in specs}
    if set(got) != set(expected):
        raise BundleError(f"{path}: ONNX {kind}s {sorted(got)}, expected {sorted(expected)}")
    for name, (typ, shape) in expected.items():
        spec = got[name]
        fixed = tuple(d if isinstance(d, int) else None for d in spec.shape)
        want = tuple(d if isinstance(d, int) else None for d in shape)
        if (
            spec.type != typ
            or len(fixed) != len(want)
            or any(w is not None and f is not None and f != w for f, w in zip(fixed, want, strict=True))
        ):
            raise BundleError(
                f"{path}: ONNX {kind} {name} is {spec.type}{list(spec.shape)}, expected {typ}{list(shape)}"
            )


def ranker_io(m: Manifest) -> tuple[IoSpec, IoSpec]:
    """Expected ONNX inputs and outputs of a ranker bundle's stage-2 graph (`Stage2Graph`)."""
    k = m.top_k
    inputs: IoSpec = {
        "candidates": ("tensor(int64)", ("B", "C")),
        "behaviors": ("tensor(int64)", ("B", "U")),
        "buckets": ("tensor(int64)", ("B", "U")),
        "retrieved": ("tensor(int64)", ("B", "C", k)),
        "scores": ("tensor(float)", ("B", "C", k)),
        "mask": ("tensor(float)", ("B", "C", k)),
    }
    if m.dims.fm:
        inputs |= {"fm": ("tensor(float)", ("B", m.dims.fm)), "fm_present": ("tensor(float)", ("B",))}
    if m.fm_history is not None:
        inputs |= {
            "fm_history": ("tensor(float)", ("B", "H", m.fm_history.dim)),
            "fm_history_mask": ("tensor(float)", ("B", "H")),
        }
    outputs: IoSpec = {
        "probability": ("tensor(float)", ("B", "C")),
        "attention": ("tensor(float)", ("B", "C", k)),
    }
    return inputs, outputs


def encoder_io(m: Manifest) -> tuple[IoSpec, IoSpec]:
    """Expected ONNX inputs and outputs of an FM bundle's user encoder."""
    inputs: IoSpec = {
        "behaviors": ("tensor(int64)", ("B", "L")),
        "buckets": ("tensor(int64)", ("B", "L")),
        "mask": ("tensor(float)", ("B", "L")),
    }
    return inputs, {"user_embedding": ("tensor(float)", ("B", m.dims.fm))}


def _with_options(provider: str) -> str | tuple[str, dict[str, str]]:
    # The CUDA EP runs fp32 matmuls in TF32 by default on Ampere and newer, which moves the
    # probabilities by ~1e-3 from the CPU EP and the offline model; keep full fp32 for parity.
    return (provider, {"use_tf32": "0"}) if provider == "CUDAExecutionProvider" else provider


def load_bundle(
    path: Path | str, providers: Sequence[str] | None = None, session_options: Any = None
) -> Bundle:
    """Verify and open a bundle folder; raises BundleError with a precise reason if it is bad."""
    import onnxruntime as ort

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    if manifest.n_time_buckets < N_TIME_BUCKETS:
        # Accepted as is, it would fail every request that has an old enough behavior (IndexError).
        raise BundleError(
            f"{path}: manifest n_time_buckets={manifest.n_time_buckets}, but serving puts time gaps "
            f"into buckets 0..{N_TIME_BUCKETS - 1}: the model needs {N_TIME_BUCKETS} or more"
        )
    n = manifest.n_items
    item_ids = _load_array(path / "item_ids.npy", np.int64, (n,))
    if item_ids[0] != -1 or (n > 2 and np.any(np.diff(item_ids[1:]) <= 0)):
        raise BundleError(f"{path}/item_ids.npy: row 0 must be -1 and rows 1.. strictly increasing")
    item_categories = _load_array(path / "item_categories.npy", np.int64, (n,))
    if item_categories.min() < 0 or item_categories.max() >= manifest.n_categories:
        raise BundleError(f"{path}/item_categories.npy: categories outside [0, {manifest.n_categories})")

    onnx_name = "user_encoder.onnx" if manifest.model == "fm" else "ranker.onnx"
    try:
        session = ort.InferenceSession(
            str(path / onnx_name),
            sess_options=session_options,
            providers=[_with_options(p) for p in providers or ["CPUExecutionProvider"]],
        )
    except Exception as e:  # ORT raises its own exception types for malformed graphs
        raise BundleError(f"{path}/{onnx_name}: ONNX Runtime cannot load it ({e})") from e
    inputs, outputs = _specs(session.get_inputs()), _specs(session.get_outputs())
    want_in, want_out = encoder_io(manifest) if manifest.model == "fm" else ranker_io(manifest)
    _expect_io(path / onnx_name, inputs, want_in, "input")
    _expect_io(path / onnx_name, outputs, want_out, "output")
    if manifest.model == "fm":
        return Bundle(path, manifest, item_ids, item_categories, session)

    import faiss

    try:
        index = faiss.read_index(str(path / "attention.faiss"))
    except RuntimeError as e:
        raise BundleError(f"{path}/attention.faiss: FAISS cannot read it ({e})") from e
    d = manifest.dims.attention
    if index.d != d or index.ntotal != n or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(
            f"{path}/attention.faiss: expected an inner-product index of {n} x {d}, "
            f"found {index.ntotal} x {index.d} (metric {index.metric_type})"
        )
    table = search_table_of(index.reconstruct_n(0, n))
    if not np.isfinite(table).all():
        raise BundleError(f"{path}/attention.faiss: non-finite attention vectors")
    time_bias = _load_array(path / "time_bias.npy", np.float32, (manifest.n_time_buckets,))
    return Bundle(path, manifest, item_ids, item_categories, session, table, time_bias)
