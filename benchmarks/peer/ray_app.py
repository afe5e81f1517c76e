"""The Ray Serve peer: the same exported ranker bundle served the way a Ray Serve user would.

Runs in its own virtualenv (`benchmarks/peer/setup.sh` creates .venv-peer); it imports nothing
from this repository. Per request it does what dare-serve does: read the user's newest
`max_seq_len` behaviors and FM embedding from the same Redis keys, search the behaviors' attention
vectors for each candidate's top K with FAISS (exact inner product, `faiss.knn`), and run the
bundle's ranker.onnx. Requests are coalesced with `@serve.batch`: one Redis pipeline and one ONNX
Runtime call per batch, the compute in one worker thread so the replica's event loop stays free.

    .venv-peer/bin/python -m benchmarks.peer.ray_app --bundle B --redis-url URL --port P [...]

Prints `READY <port>` once it answers, then serves until SIGTERM or SIGINT. With
`--bench-compute FILE` it serves nothing: it times `Ranker.score` alone, in-process, for each request
of FILE (a JSON list of request bodies) and prints the median milliseconds as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The bundle's item records and FM blobs (see docs/feature-store.md): 12-byte <int64 item><uint32 ts>
# records, oldest first; FM blob = 16-byte header <"DF" u8 u8 u32 dim f64 written_at> + float32s.
EVENT = np.dtype([("item", "<i8"), ("ts", "<u4")])
FM_HEADER_BYTES = 16
N_BUCKETS = 64


def time_buckets(gap: np.ndarray) -> np.ndarray:
    """floor(2 * log2(1 + max(gap, 0))), capped at 63: the bundle's time-bucket scheme."""
    g = np.maximum(gap.astype(np.float64), 0.0)
    return np.minimum((2.0 * np.log2(1.0 + g)).astype(np.int64), N_BUCKETS - 1)


def one_thread_numerics() -> None:
    # as dare-serve's compute threads: BLAS and OpenMP at one thread, parallelism from batching
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    faiss.omp_set_num_threads(1)


@dataclass
class Ranker:
    """The bundle's arrays and ONNX session, and the two stages for a batch of requests."""

    item_ids: np.ndarray
    attention: np.ndarray
    time_bias: np.ndarray
    session: Any
    top_k: int
    fm_dim: int
    fm_version: str | None
    max_seq_len: int

    @classmethod
    def load(cls, path: Path, ort_threads: int) -> Ranker:
        import faiss
        import onnxruntime as ort

        manifest = json.loads((path / "manifest.json").read_text())
        index = faiss.read_index(str(path / "attention.faiss"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ort_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path / "ranker.onnx"), opts, providers=["CPUExecutionProvider"])
        return cls(
            item_ids=np.load(path / "item_ids.npy"),
            attention=index.reconstruct_n(0, index.ntotal).astype(np.float32),
            time_bias=np.load(path / "time_bias.npy").astype(np.float32),
            session=session,
            top_k=int(manifest["top_k"]),
            fm_dim=int(manifest["dims"]["fm"]),
            fm_version=manifest.get("fm_version"),
            max_seq_len=int(manifest["max_seq_len"]),
        )

    def rows(self, raw: np.ndarray) -> np.ndarray:
        known = self.item_ids[1:]
        pos = np.minimum(np.searchsorted(known, raw), len(known) - 1)
        return np.where(known[pos] == raw, pos + 1, 0).astype(np.int64)

    def score(self, reqs: list[dict], users: list[tuple[bytes, bytes | None]]) -> list[list[float]]:
        import faiss

        prepared = []
        for req, (seq, fm_blob) in zip(reqs, users, strict=True):
            rec = np.frombuffer(seq, dtype=EVENT)
            items, ts = rec["item"].astype(np.int64), rec["ts"].astype(np.int64)
            if ts.size > 1 and bool((ts[1:] < ts[:-1]).any()):
                order = np.argsort(ts, kind="stable")
                items, ts = items[order], ts[order]
            cand = self.rows(np.asarray(req["candidates"], np.int64))
            beh, buckets = self.rows(items), time_buckets(int(req["timestamp"]) - ts)
            k = min(self.top_k, len(beh))
            if k:
                queries = np.empty((len(cand), self.attention.shape[1] + 1), np.float32)
                queries[:, :-1], queries[:, -1] = self.attention[cand], 1.0
                keys = np.empty((len(beh), self.attention.shape[1] + 1), np.float32)
                keys[:, :-1], keys[:, -1] = self.attention[beh], self.time_bias[buckets]
                scores, pos = faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
            else:
                scores, pos = np.zeros((len(cand), 0), np.float32), np.zeros((len(cand), 0), np.int64)
            fm = None
            if self.fm_dim and fm_blob is not None and len(fm_blob) == FM_HEADER_BYTES + 4 * self.fm_dim:
                fm = np.frombuffer(fm_blob, "<f4", offset=FM_HEADER_BYTES)
            # the graph takes each distinct retrieved behavior once and, per slot, its index and score
            distinct, index = np.unique(pos, return_inverse=True)
            prepared.append((cand, beh[distinct], buckets[distinct], index.reshape(pos.shape), scores, fm))
        b, c = len(prepared), max(len(p[0]) for p in prepared)
        u = max(1, max(len(p[1]) for p in prepared))
        feeds = {
            "candidates": np.zeros((b, c), np.int64),
            "behaviors": np.zeros((b, u), np.int64),
            "buckets": np.zeros((b, u), np.int64),
            "retrieved": np.zeros((b, c, self.top_k), np.int64),
            "scores": np.zeros((b, c, self.top_k), np.float32),
            "mask": np.zeros((b, c, self.top_k), np.float32),
        }
        if self.fm_dim:
            feeds |= {"fm": np.zeros((b, self.fm_dim), np.float32), "fm_present": np.zeros(b, np.float32)}
        for i, (cand, beh, buck, index, scores, fm) in enumerate(prepared):
            ci, ki = index.shape
            feeds["candidates"][i, :ci] = cand
            feeds["behaviors"][i, : len(beh)] = beh
            feeds["buckets"][i, : len(beh)] = buck
            feeds["retrieved"][i, :ci, :ki] = index
            feeds["scores"][i, :ci, :ki] = scores
            feeds["mask"][i, :ci, :ki] = 1.0
            if fm is not None:
                feeds["fm"][i], feeds["fm_present"][i] = fm, 1.0
        probs = self.session.run(["probability"], feeds)[0]
        return [probs[i, : len(p[0])].tolist() for i, p in enumerate(prepared)]


def user_tag(user_id: str) -> bytes:
    # dare-serve's Redis Cluster hash tag: '%XX' escapes of control bytes, space, '%', '{', '}'
    raw = user_id.encode("utf-8", "surrogatepass")
    out = bytearray()
    for byte in raw:
        out += b"%%%02X" % byte if byte <= 0x20 or byte in b"%{}\x7f" else bytes([byte])
    return bytes(out) or b"%"


def read_users(r: Any, ranker: Ranker, namespace: bytes, reqs: list[dict]) -> Any:
    """A pipeline (to execute) reading each request's newest `max_seq_len` events and FM blob."""
    n_bytes = ranker.max_seq_len * EVENT.itemsize
    pipe = r.pipeline(transaction=False)
    for req in reqs:
        tag = user_tag(req["user_id"])
        pipe.getrange(b"%s:seq:{%s}" % (namespace, tag), -n_bytes, -1)
        if ranker.fm_version is not None:
            pipe.hget(b"%s:fm:{%s}" % (namespace, tag), ranker.fm_version)
    return pipe


def split_replies(ranker: Ranker, replies: list[Any], n: int) -> list[tuple[bytes, bytes | None]]:
    """(sequence bytes, FM blob or None) per request from the pipeline's replies."""
    step = 2 if ranker.fm_version is not None else 1
    seqs, fms = replies[::step], replies[1::step] if step == 2 else [None] * n
    return [(seq or b"", fm) for seq, fm in zip(seqs, fms, strict=True)]


def bench_compute(args: argparse.Namespace) -> None:
    """Median ms of `Ranker.score` for one request at a time, in a thread set up like the replica's."""
    import time

    import redis

    reqs = json.loads(Path(args.bench_compute).read_text())
    ranker = Ranker.load(Path(args.bundle), args.ort_threads)
    client = redis.Redis.from_url(args.redis_url)
    users = split_replies(
        ranker, read_users(client, ranker, args.namespace.encode(), reqs).execute(), len(reqs)
    )

    def run() -> list[float]:
        times = []
        for i in range(len(reqs) + 20):
            j = i % len(reqs)
            t0 = time.perf_counter()
            ranker.score([reqs[j]], [users[j]])
            if i >= 20:
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    with ThreadPoolExecutor(1, initializer=one_thread_numerics) as pool:
        times = pool.submit(run).result()
    print(json.dumps({"p50_ms": float(np.median(times)), "n": len(times)}))


def make_app(args: argparse.Namespace) -> Any:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing,
        ray_actor_options={"num_cpus": 1},
    )
    class PeerRanker:
        def __init__(self) -> None:
            import redis.asyncio as aioredis

            one_thread_numerics()
            self.ranker = Ranker.load(Path(args.bundle), args.ort_threads)
            self.redis = aioredis.Redis.from_url(args.redis_url, max_connections=64)
            self.ns = args.namespace.encode()
            self.pool = ThreadPoolExecutor(1, initializer=one_thread_numerics)

        async def __call__(self, request: Request) -> dict:
            return {"scores": await self.score(await request.json())}

        @serve.batch(
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
            max_concurrent_batches=args.max_concurrent_batches,
        )
        async def score(self, reqs: list[dict]) -> list[list[float]]:
            replies = await read_users(self.redis, self.ranker, self.ns, reqs).execute()
            users = split_replies(self.ranker, replies, len(reqs))
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, self.ranker.score, reqs, users)

    return PeerRanker.bind()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="a dare/coupled bundle folder")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--namespace", default="bench", help="dare-serve's DARE_REDIS_NAMESPACE")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--max-concurrent-batches", type=int, default=2)
    ap.add_argument("--max-ongoing", type=int, default=256, help="requests in flight per replica")
    ap.add_argument("--ort-threads", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--bench-compute", help="time the scoring alone for these requests (JSON list), then exit"
    )
    args = ap.parse_args()
    if args.bench_compute:
        bench_compute(args)
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(
        num_cpus=max(args.num_cpus, args.replicas),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
        configure_logging=True,
    )
    serve.start(
        http_options={"host": "127.0.0.1", "port": args.port},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    serve.run(make_app(args), name="peer", route_prefix="/v1/score")
    print(f"READY {args.port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
