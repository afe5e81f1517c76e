"""`dare-serve fm-embed`: the FM's user embedding for every user, tagged with the FM version.

The FM runs here, offline, through its exported user encoder (ONNX Runtime); the online ranker
only reads the cached vectors (LoopFM). Each user's embedding is computed from their most recent
`max_seq_len` events, with time gaps measured from `as_of` (default: one second after the
newest event in the data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from exporters.bundle import Bundle, item_rows
from exporters.features import time_buckets


@dataclass(frozen=True, slots=True)
class UserEmbeddings:
    """FM vectors of many users, with the FM version they came from."""

    user_ids: list[str]
    vectors: np.ndarray  # [n_users, fm_dim] float32
    fm_version: str
    written_at: float


def compute_user_embeddings(
    bundle: Bundle,
    events: pd.DataFrame,
    as_of: int | None = None,
    batch_users: int = 256,
    progress: bool = True,
) -> UserEmbeddings:
    """Run the FM user encoder over every user's most recent events."""
    if bundle.manifest.model != "fm":
        raise ValueError(f"{bundle.path} is a {bundle.manifest.model} bundle, not an fm bundle")
    ev = events.sort_values(["user_id", "timestamp", "item_id"], kind="mergesort")
    users = ev["user_id"].to_numpy()
    rows = item_rows(bundle.item_ids, ev["item_id"].to_numpy(np.int64))
    ts = ev["timestamp"].to_numpy(np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(users)].astype(np.int64)
    as_of = int(ts.max()) + 1 if as_of is None and len(ts) else int(as_of or time.time())
    max_len = bundle.manifest.max_seq_len
    dim = bundle.manifest.dims.fm
    vectors = np.zeros((len(starts), dim), dtype=np.float32)
    # users of similar length together keep the padding small
    order = np.argsort(np.minimum(ends - starts, max_len), kind="stable")
    for a in tqdm(range(0, len(order), batch_users), desc="fm-embed", disable=not progress, leave=False):
        sel = order[a : a + batch_users]
        first = np.maximum(starts[sel], ends[sel] - max_len)
        lengths = ends[sel] - first
        width = max(int(lengths.max()), 1)
        offs = np.arange(width)
        mask = offs[None, :] < lengths[:, None]
        pos = np.where(mask, first[:, None] + offs, 0)
        feeds = {
            "behaviors": np.where(mask, rows[pos], 0),
            "buckets": np.where(mask, time_buckets(as_of - ts[pos]), 0),
            "mask": mask.astype(np.float32),
        }
        vectors[sel] = bundle.session.run(None, feeds)[0]
    return UserEmbeddings([str(u) for u in users[starts]], vectors, bundle.manifest.tag, time.time())


def write_embeddings_file(emb: UserEmbeddings, path: Path) -> None:
    """Parquet: user_id, embedding (fixed-size list of float32); FM version in the schema metadata."""
    dim = emb.vectors.shape[1]
    flat = pa.array(emb.vectors.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "user_id": pa.array(emb.user_ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    table = table.replace_schema_metadata(
        {"fm_version": emb.fm_version, "written_at": str(emb.written_at), "dim": str(dim)}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_embeddings_file(path: Path) -> UserEmbeddings:
    """Inverse of write_embeddings_file."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if "fm_version" not in meta or "dim" not in meta:
        raise ValueError(f"{path}: not an FM embeddings file (no fm_version/dim metadata)")
    dim = int(meta["dim"])
    flat = pc.list_flatten(table.column("embedding")).to_numpy()
    raw_ids = table.column("user_id").to_pylist()
    user_ids = [u for u in raw_ids if isinstance(u, str)]
    if len(user_ids) != len(raw_ids):
        raise ValueError(f"{path}: user_id must be a string on every row")
    return UserEmbeddings(
        user_ids,
        flat.astype(np.float32).reshape(-1, dim),
        meta["fm_version"],
        float(meta.get("written_at", 0)),
    )
