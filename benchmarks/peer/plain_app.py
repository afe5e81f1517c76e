"""The plain peer: the same ranker bundle served the way one would write it in an afternoon.

One FastAPI app with a plain `def` endpoint (FastAPI runs it in its worker threads), no batching,
no metrics, no middleware. Per request: one redis-py pipeline reads the newest `--read-depth`
(default: the bundle's `max_seq_len`) behavior records of the user (GETRANGE) and the FM blob of
the bundle's FM version (HGET), from the keys dare-serve's feature store writes; `np.searchsorted`
maps raw ids to rows; `faiss.knn` finds each candidate's top K behaviors (exact inner product, time
bias as an extra dimension); one `InferenceSession.run` scores. It imports nothing from this repository.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python -m benchmarks.peer.plain_app \
        --bundle B --redis-url URL [--namespace bench] [--port 8001]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import redis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

# Stored layouts (docs/feature-store.md): a sequence is 12-byte <int64 item><uint32 ts> records,
# oldest first; an FM blob is a 16-byte header followed by float32 values.
EVENT = np.dtype([("item", "<i8"), ("ts", "<u4")])
FM_HEADER_BYTES = 16
N_BUCKETS = 64
# Bytes escaped in the user id's hash tag: control bytes, space, '%', '{', '}', DEL.
_UNSAFE = re.compile(rb"[\x00-\x20%{}\x7f]")


def user_tag(user_id: str) -> bytes:
    """The user id as dare-serve writes it inside the keys' `{...}` hash tag."""
    raw = user_id.encode("utf-8", "surrogatepass")
    return _UNSAFE.sub(lambda m: b"%%%02X" % m[0][0], raw) if raw else b"%"


@dataclass
class Ranker:
    """The bundle's arrays and ONNX session."""

    item_ids: np.ndarray  # sorted raw ids from row 1 on; row 0 is the unknown item
    attention: np.ndarray  # [n_items, d]
    time_bias: np.ndarray  # [n_buckets]
    session: ort.InferenceSession
    input_names: list[str]
    top_k: int
    fm_dim: int
    fm_version: str | None
    read_depth: int  # newest behaviors read per user: the bundle's `max_seq_len` unless told otherwise

    @classmethod
    def load(cls, path: Path, read_depth: int | None = None) -> Ranker:
        manifest = json.loads((path / "manifest.json").read_text())
        index = faiss.read_index(str(path / "attention.faiss"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path / "ranker.onnx"), opts, providers=["CPUExecutionProvider"])
        names = manifest.get("onnx", {}).get("inputs") or [i.name for i in session.get_inputs()]
        return cls(
            item_ids=np.load(path / "item_ids.npy"),
            attention=index.reconstruct_n(0, index.ntotal).astype(np.float32),
            time_bias=np.load(path / "time_bias.npy").astype(np.float32),
            session=session,
            input_names=list(names),
            top_k=int(manifest["top_k"]),
            fm_dim=int(manifest["dims"]["fm"]),
            fm_version=manifest.get("fm_version"),
            read_depth=read_depth or int(manifest["max_seq_len"]),
        )

    def rows(self, raw: np.ndarray) -> np.ndarray:
        known = self.item_ids[1:]
        pos = np.minimum(np.searchsorted(known, raw), len(known) - 1)
        return np.where(known[pos] == raw, pos + 1, 0)


def stage2_feeds(
    r: Ranker,
    cand: np.ndarray,
    beh: np.ndarray,
    buckets: np.ndarray,
    positions: np.ndarray,
    scores: np.ndarray,
    fm: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The ranker's inputs for one request (a batch of 1), from its candidate rows [C], its
    behaviors' rows and time buckets [L] and the stage-1 result: positions and scores [C, k].

    The graph takes each distinct retrieved behavior once and, per slot, an index into them.
    """
    c, k = positions.shape
    distinct, index = np.unique(positions, return_inverse=True)
    if len(distinct) == 0:  # no history: one padding behavior that no slot reaches
        distinct = np.zeros(1, np.int64)
        beh, buckets = np.zeros(1, np.int64), np.zeros(1, np.int64)
    retrieved = np.zeros((1, c, r.top_k), np.int64)
    retrieved[0, :, :k] = index.reshape(c, k)
    slot_scores = np.zeros((1, c, r.top_k), np.float32)
    slot_scores[0, :, :k] = scores
    mask = np.zeros((1, c, r.top_k), np.float32)
    mask[0, :, :k] = 1.0
    feeds = {
        "candidates": cand[None, :],
        "behaviors": beh[distinct][None, :],
        "buckets": buckets[distinct][None, :],
        "retrieved": retrieved,
        "scores": slot_scores,
        "mask": mask,
    }
    if r.fm_dim:
        feeds["fm"] = (fm if fm is not None else np.zeros(r.fm_dim, np.float32))[None, :]
        feeds["fm_present"] = np.array([1.0 if fm is not None else 0.0], np.float32)
    return {name: feeds[name] for name in r.input_names}


class ScoreRequest(BaseModel):
    user_id: str
    candidates: list[int]
    timestamp: int | None = None


class ScoreResponse(BaseModel):
    scores: list[float]


def read_user(
    client: redis.Redis, namespace: str, ranker: Ranker, user_id: str
) -> tuple[bytes, bytes | None]:
    """One pipeline: the newest `read_depth` behavior records and the FM blob of the bundle's version."""
    tag = user_tag(user_id)
    prefix = namespace.encode()
    pipe = client.pipeline(transaction=False)
    pipe.getrange(b"%s:seq:{%s}" % (prefix, tag), -ranker.read_depth * EVENT.itemsize, -1)
    pipe.hget(b"%s:fm:{%s}" % (prefix, tag), (ranker.fm_version or "").encode())
    seq, fm_blob = pipe.execute()
    return seq, fm_blob


def score_request(
    ranker: Ranker, candidates: list[int], now: int, seq: bytes, fm_blob: bytes | None
) -> list[float]:
    """Both stages for one request, from the user's stored bytes."""
    records = np.frombuffer(seq, EVENT)
    order = np.argsort(records["ts"], kind="stable")  # appends may arrive out of time order
    items = records["item"][order].astype(np.int64)
    ts = records["ts"][order].astype(np.int64)
    fm = None
    if ranker.fm_dim and fm_blob is not None and len(fm_blob) == FM_HEADER_BYTES + 4 * ranker.fm_dim:
        fm = np.frombuffer(fm_blob, "<f4", offset=FM_HEADER_BYTES)

    cand = ranker.rows(np.asarray(candidates, np.int64))
    beh = ranker.rows(items)
    gap = np.maximum(now - ts, 0).astype(np.float64)
    buckets = np.minimum((2.0 * np.log2(1.0 + gap)).astype(np.int64), N_BUCKETS - 1)

    k = min(ranker.top_k, len(beh))
    if k:
        queries = np.hstack([ranker.attention[cand], np.ones((len(cand), 1), np.float32)])
        keys = np.hstack([ranker.attention[beh], ranker.time_bias[buckets][:, None]])
        scores, positions = faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        scores, positions = np.zeros((len(cand), 0), np.float32), np.zeros((len(cand), 0), np.int64)

    feeds = stage2_feeds(ranker, cand, beh, buckets, positions, scores, fm)
    probability = ranker.session.run(["probability"], feeds)[0]
    return probability[0].tolist()


def make_app(ranker: Ranker, client: redis.Redis, namespace: str) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/score")
    def score(req: ScoreRequest) -> ScoreResponse:
        seq, fm_blob = read_user(client, namespace, ranker, req.user_id)
        now = req.timestamp if req.timestamp is not None else int(time.time())
        return ScoreResponse(scores=score_request(ranker, req.candidates, now, seq, fm_blob))

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        client.ping()
        return {"status": "ready"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path, help="a dare/coupled bundle folder")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--namespace", default="bench", help="dare-serve's DARE_REDIS_NAMESPACE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument(
        "--read-depth", type=int, default=None, help="behaviors read per user (default: max_seq_len)"
    )
    args = ap.parse_args()
    faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    client = redis.Redis.from_url(args.redis_url, max_connections=64)
    app = make_app(Ranker.load(args.bundle, args.read_depth), client, args.namespace)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
