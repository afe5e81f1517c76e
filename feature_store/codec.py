"""Binary layouts of stored values: behavior records and FM embedding blobs (no JSON, no pickle).

Sequence: a concatenation of 12-byte little-endian records `<item: int64><timestamp: uint32>`,
oldest arrival first. Fixed-size records let Redis APPEND and GETRANGE work on whole events
server-side: appends never read the sequence back, and the newest n events are the last n*12 bytes.

FM blob: a 16-byte header `<magic "DF"><format u8 = 1><dtype u8 = 1 (float32)><dim u32>
<written_at f64>` followed by `dim` little-endian float32 values.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from feature_store.errors import InvalidFeatureData

EVENT_DTYPE = np.dtype([("item", "<i8"), ("ts", "<u4")])
EVENT_BYTES = EVENT_DTYPE.itemsize
assert EVENT_BYTES == 12
# Seconds since the epoch fit uint32 until 2106; earlier or later times are refused at write time.
MIN_TIMESTAMP = 0
MAX_TIMESTAMP = 2**32 - 1

FM_MAGIC = b"DF"
FM_FORMAT = 1
FM_DTYPE_FLOAT32 = 1
FM_HEADER = struct.Struct("<2sBBId")
assert FM_HEADER.size == 16


class CodecError(ValueError):
    """Stored bytes do not follow the layout; the store turns it into CorruptFeatureData."""


def _as_int_array(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidFeatureData(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidFeatureData(f"{name} must be integers, got dtype {arr.dtype}")
    return arr


def encode_events(items: object, timestamps: object) -> bytes:
    """Pack item ids (int64) and timestamps (seconds, uint32 range) into 12-byte records."""
    item_arr = _as_int_array(items, "items")
    ts_arr = _as_int_array(timestamps, "timestamps")
    if item_arr.shape != ts_arr.shape:
        raise InvalidFeatureData(f"items and timestamps differ in length: {item_arr.size} vs {ts_arr.size}")
    if item_arr.size == 0:
        return b""
    if item_arr.dtype == np.uint64 and int(item_arr.max()) > np.iinfo(np.int64).max:
        raise InvalidFeatureData("item ids must fit int64")
    lo, hi = int(ts_arr.min()), int(ts_arr.max())
    if lo < MIN_TIMESTAMP or hi > MAX_TIMESTAMP:
        raise InvalidFeatureData(
            f"timestamps must be seconds in [{MIN_TIMESTAMP}, {MAX_TIMESTAMP}], got [{lo}, {hi}]"
        )
    records = np.empty(item_arr.size, dtype=EVENT_DTYPE)
    records["item"] = item_arr
    records["ts"] = ts_arr
    return records.tobytes()


def check_sequence_length(total_bytes: int) -> None:
    """Raise CodecError unless a stored sequence's byte length is a whole number of records."""
    if total_bytes % EVENT_BYTES:
        raise CodecError(f"sequence length {total_bytes} bytes is not a multiple of {EVENT_BYTES}")


def decode_events(buf: bytes | bytearray | memoryview) -> tuple[np.ndarray, np.ndarray]:
    """Unpack records into (items int64, timestamps int64), ordered by timestamp.

    Records are stored in arrival order; a late event is moved into place here with a stable sort,
    which is skipped (one vectorized comparison) when the records are already in order.
    """
    check_sequence_length(len(buf))
    records = np.frombuffer(buf, dtype=EVENT_DTYPE)
    items = records["item"].astype(np.int64)
    timestamps = records["ts"].astype(np.int64)
    if timestamps.size > 1 and bool((timestamps[1:] < timestamps[:-1]).any()):
        order = np.argsort(timestamps, kind="stable")
        items, timestamps = items[order], timestamps[order]
    return items, timestamps


def encode_fm(vector: np.ndarray, written_at: float) -> bytes:
    """Pack one float32 embedding and its write time into an FM blob."""
    if vector.ndim != 1 or vector.size == 0:
        raise InvalidFeatureData(f"an FM embedding must be a non-empty 1-D vector, got shape {vector.shape}")
    header = FM_HEADER.pack(FM_MAGIC, FM_FORMAT, FM_DTYPE_FLOAT32, vector.size, written_at)
    return header + vector.astype("<f4", copy=False).tobytes()


def decode_fm(blob: bytes) -> tuple[np.ndarray, float]:
    """Unpack an FM blob into (vector float32, written_at seconds)."""
    if len(blob) < FM_HEADER.size:
        raise CodecError(f"FM blob of {len(blob)} bytes is shorter than its {FM_HEADER.size}-byte header")
    magic, fmt, dtype, dim, written_at = FM_HEADER.unpack_from(blob)
    if magic != FM_MAGIC or fmt != FM_FORMAT or dtype != FM_DTYPE_FLOAT32:
        raise CodecError(f"FM blob header {blob[:4]!r} is not format {FM_FORMAT} float32")
    if len(blob) != FM_HEADER.size + 4 * dim:
        raise CodecError(f"FM blob of {len(blob)} bytes does not hold {dim} float32 values")
    if not math.isfinite(written_at):
        raise CodecError("FM blob write time is not finite")
    vector = np.frombuffer(blob, dtype="<f4", offset=FM_HEADER.size).astype(np.float32)
    # Writes refuse NaN and infinities; a stored one would turn every score of the user into NaN.
    if not bool(np.isfinite(vector).all()):
        raise CodecError("FM vector holds non-finite values")
    return vector, written_at
