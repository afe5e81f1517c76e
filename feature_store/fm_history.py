"""FM-history entries: the binary layout of one compressed FM representation, its quantization, and
the choice of a request's entries. Pure numpy: the stores keep the bytes, the core decodes them.

An entry is the foundation model's representation of one past example of a user (LoopFM), projected
by an encoder whose dimensions are Matryoshka-ordered (every prefix is usable on its own), stored at
`dim` dimensions as float32, INT8 or INT4 values sharing one per-entry scale. Little-endian:

    offset 0   uint8    format = 1
    offset 1   uint8    encoding: 1 fp32, 2 int8, 3 int4
    offset 2   uint16   dim, the stored dimensions
    offset 4   uint32   time: seconds since the epoch of the example the entry represents
    offset 8   uint32   FM version id      (`version_id` of the FM version string)
    offset 12  uint32   encoder version id (`version_id` of the encoder version string)
    offset 16  float32  scale (1 for fp32)
    offset 20  payload  fp32: dim float32; int8: dim int8; int4: ceil(dim / 2) bytes, dimension 2i
                        in the low nibble of byte i and 2i + 1 in the high one, two's complement

A value decodes to `q * scale`. Quantization is symmetric: scale = max |x| / Q over the stored
dims, q = round(x / scale) in [-Q, Q] (Q = 127 for INT8, 7 for INT4), so every decoded value is
within scale / 2 of the original. Decoding a prefix d' reads only the first d' values, so it equals
the first d' values of the full decode (the Matryoshka property the encoder is trained or fitted
for).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from feature_store.codec import MAX_TIMESTAMP, MIN_TIMESTAMP, CodecError
from feature_store.errors import InvalidFeatureData

Encoding = Literal["fp32", "int8", "int4"]
ENCODINGS: dict[str, int] = {"fp32": 1, "int8": 2, "int4": 3}
ENCODING_NAMES = {code: name for name, code in ENCODINGS.items()}
# The largest magnitude of a quantized value (INT4 keeps -8 unused, so the grid is symmetric).
QMAX = {"int8": 127, "int4": 7}
ENTRY_FORMAT = 1
HEADER_DTYPE = np.dtype(
    [
        ("format", "u1"),
        ("encoding", "u1"),
        ("dim", "<u2"),
        ("time", "<u4"),
        ("fm", "<u4"),
        ("encoder", "<u4"),
        ("scale", "<f4"),
    ]
)
HEADER_BYTES = HEADER_DTYPE.itemsize
assert HEADER_BYTES == 20
# Where the two version ids sit: the Redis write script compares these bytes without decoding.
VERSION_IDS = slice(8, 16)
MAX_DIM = 2**16 - 1


def version_id(version: str) -> int:
    """The 32-bit id an entry stores for a version string (the first 4 bytes of its BLAKE2b digest).

    Two versions that collide would read each other's entries as current; at 2^-32 per pair of
    versions that is accepted for the 8 bytes it saves on every entry.
    """
    digest = hashlib.blake2b(version.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def payload_bytes(encoding: str, dim: int) -> int:
    """Bytes of the values of one entry of `dim` dimensions."""
    if encoding == "fp32":
        return 4 * dim
    if encoding == "int8":
        return dim
    if encoding == "int4":
        return (dim + 1) // 2
    raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def entry_bytes(encoding: str, dim: int) -> int:
    """Bytes of one entry, header included."""
    return HEADER_BYTES + payload_bytes(encoding, dim)


def quantize(vectors: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(values [N, dim], scales [N] float32) as stored: float32 values for fp32, else the integer
    grid points (int8) of each row's symmetric per-row scale."""
    x = np.asarray(vectors, dtype=np.float32)
    if encoding == "fp32":
        return x, np.ones(len(x), np.float32)
    q = QMAX[encoding]
    scales = (np.abs(x).max(axis=1, initial=0.0) / np.float32(q)).astype(np.float32)
    # an all-zero row keeps scale 0 and decodes to zeros
    safe = np.where(scales > 0, scales, np.float32(1.0))
    values = np.clip(np.rint(x / safe[:, None]), -q, q).astype(np.int8)
    return values, scales


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """[N, dim] int8 in [-8, 7] -> [N, ceil(dim / 2)] uint8, dimension 2i in the low nibble."""
    n, dim = values.shape
    nibbles = np.zeros((n, dim + dim % 2), np.uint8)
    nibbles[:, :dim] = values.astype(np.uint8) & 0x0F
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def _unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """[N, ceil(dim / 2)] uint8 -> [N, dim] int8, sign-extended from 4 bits."""
    nibbles = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    nibbles[:, 0::2] = packed & 0x0F
    nibbles[:, 1::2] = packed >> 4
    return ((nibbles[:, :dim].astype(np.int16) ^ 8) - 8).astype(np.int8)


def encode_entries(
    times: np.ndarray,
    vectors: np.ndarray,
    *,
    fm_version: str,
    encoder_version: str,
    encoding: str = "int4",
) -> list[bytes]:
    """Pack one entry per row of `vectors` [N, dim] (Matryoshka-ordered), with its time in seconds."""
    if encoding not in ENCODINGS:
        raise InvalidFeatureData(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    x = np.asarray(vectors)
    t = np.asarray(times)
    if x.ndim != 2 or t.shape != (x.shape[0],):
        raise InvalidFeatureData(f"vectors must be [N, dim] and times [N], got {x.shape} and {t.shape}")
    if x.shape[0] == 0:
        return []
    if not 1 <= x.shape[1] <= MAX_DIM:
        raise InvalidFeatureData(f"an entry holds 1 to {MAX_DIM} dims, got {x.shape[1]}")
    if x.dtype.kind not in "fiu" or not bool(np.isfinite(x).all()):
        raise InvalidFeatureData("FM-history vectors must be finite numbers")
    if t.dtype.kind not in "iu" or int(t.min()) < MIN_TIMESTAMP or int(t.max()) > MAX_TIMESTAMP:
        raise InvalidFeatureData(f"entry times must be integer seconds in [{MIN_TIMESTAMP}, {MAX_TIMESTAMP}]")
    n, dim = x.shape
    values, scales = quantize(x, encoding)
    if encoding == "int4":
        payload = _pack_int4(values)
    elif encoding == "int8":
        payload = values.view(np.uint8)
    else:
        payload = values.astype("<f4").view(np.uint8).reshape(n, 4 * dim)
    header = np.zeros(n, HEADER_DTYPE)
    header["format"] = ENTRY_FORMAT
    header["encoding"] = ENCODINGS[encoding]
    header["dim"] = dim
    header["time"] = t
    header["fm"] = version_id(fm_version)
    header["encoder"] = version_id(encoder_version)
    header["scale"] = scales
    size = HEADER_BYTES + payload.shape[1]
    rows = np.empty((n, size), np.uint8)
    rows[:, :HEADER_BYTES] = header.view(np.uint8).reshape(n, HEADER_BYTES)
    rows[:, HEADER_BYTES:] = payload
    buf = rows.tobytes()
    return [buf[i * size : (i + 1) * size] for i in range(n)]


@dataclass(frozen=True, slots=True, eq=False)
class HistoryEntries:
    """A user's stored entries with their headers parsed (payloads still packed), in stored order."""

    blobs: tuple[bytes, ...]
    times: np.ndarray  # int64 [N]
    fm_ids: np.ndarray  # uint32 [N]
    encoder_ids: np.ndarray  # uint32 [N]
    encodings: np.ndarray  # uint8 [N], ENCODINGS codes
    dims: np.ndarray  # int64 [N]
    scales: np.ndarray  # float32 [N]

    def __len__(self) -> int:
        return len(self.blobs)

    @classmethod
    def empty(cls) -> HistoryEntries:
        """No entries (a user the FM never wrote a history for)."""
        return parse_entries([])


def parse_entries(blobs: Sequence[bytes]) -> HistoryEntries:
    """Parse and check the headers of stored entries; CodecError names the first bad one."""
    raw = tuple(bytes(b) for b in blobs)
    lengths = np.fromiter(map(len, raw), np.int64, len(raw))
    if len(raw) and int(lengths.min()) < HEADER_BYTES:
        i = int(np.argmin(lengths))
        raise CodecError(f"FM-history entry {i} of {lengths[i]} bytes is shorter than its header")
    heads = np.frombuffer(b"".join(b[:HEADER_BYTES] for b in raw), HEADER_DTYPE)
    codes = heads["encoding"]
    dims = heads["dim"].astype(np.int64)
    payload = np.select(
        [codes == ENCODINGS["fp32"], codes == ENCODINGS["int8"], codes == ENCODINGS["int4"]],
        [4 * dims, dims, (dims + 1) // 2],
        default=-1,
    )
    expected = np.where(payload >= 0, HEADER_BYTES + payload, -1)
    bad = (heads["format"] != ENTRY_FORMAT) | (expected != lengths) | (dims == 0)
    bad |= ~np.isfinite(heads["scale"]) | (heads["scale"] < 0)
    if bool(bad.any()):
        i = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"FM-history entry {i} (format {heads['format'][i]}, encoding {codes[i]}, dim {dims[i]}, "
            f"{lengths[i]} bytes, scale {heads['scale'][i]}) does not follow format {ENTRY_FORMAT}"
        )
    return HistoryEntries(
        raw,
        heads["time"].astype(np.int64),
        heads["fm"].copy(),
        heads["encoder"].copy(),
        codes.copy(),
        dims,
        heads["scale"].copy(),
    )


def decode_vectors(entries: HistoryEntries, idx: np.ndarray, prefix: int) -> np.ndarray:
    """[len(idx), prefix] float32: the first `prefix` dims of entries idx (each must hold that many)."""
    idx = np.asarray(idx, dtype=np.int64)
    out = np.zeros((len(idx), prefix), np.float32)
    if len(idx) == 0:
        return out
    if prefix < 1 or int(entries.dims[idx].min()) < prefix:
        raise ValueError(f"prefix {prefix} is outside what entries {idx.tolist()} hold")
    for name, code in ENCODINGS.items():
        rows = np.flatnonzero(entries.encodings[idx] == code)
        if len(rows) == 0:
            continue
        chosen = idx[rows]
        # only the prefix's bytes of each entry: entries of other dims line up too
        width = payload_bytes(name, prefix)
        data = b"".join(entries.blobs[i][HEADER_BYTES : HEADER_BYTES + width] for i in chosen)
        packed = np.frombuffer(data, np.uint8).reshape(len(chosen), width)
        if name == "fp32":
            out[rows] = packed.view("<f4")
            continue
        values = _unpack_int4(packed, prefix) if name == "int4" else packed.view(np.int8)
        out[rows] = values.astype(np.float32) * entries.scales[chosen][:, None]
    return out


@dataclass(frozen=True, slots=True, eq=False)
class HistorySelection:
    """The entries a request (or a training impression) gets, decoded, oldest first."""

    vectors: np.ndarray  # [n, prefix] float32, n <= the length asked for
    times: np.ndarray  # [n] int64
    stale: int  # entries before the cut that were left out: another FM or encoder, or too few dims

    def __len__(self) -> int:
        return len(self.times)


def usable(
    entries: HistoryEntries, *, before: int, fm_id: int, encoder_id: int, prefix: int
) -> tuple[np.ndarray, np.ndarray]:
    """(usable [N], eligible [N]) bool: entries strictly before `before`, and of those the ones of the
    wanted versions holding at least `prefix` dims."""
    eligible = entries.times < before
    ok = eligible & (entries.fm_ids == fm_id) & (entries.encoder_ids == encoder_id) & (entries.dims >= prefix)
    return ok, eligible


def select_history(
    entries: HistoryEntries,
    *,
    now: int,
    fm_version: str,
    encoder_version: str,
    length: int,
    prefix: int,
    lag_s: int = 0,
) -> HistorySelection:
    """The newest `length` entries of the wanted versions whose time + `lag_s` is before `now`,
    decoded to their first `prefix` dims, oldest first; equal times keep their stored order.

    An entry at or after the request (or impression) time is never chosen: it would describe what
    happened after it. `lag_s` models the delay before an entry written by a batch job is readable
    (training uses it; a served request sees what the store holds, lag 0).
    """
    if length < 0 or prefix < 1:
        raise ValueError(f"length must be >= 0 and prefix >= 1, got {length} and {prefix}")
    before = math.floor(now) - int(lag_s)
    ok, eligible = usable(
        entries,
        before=before,
        fm_id=version_id(fm_version),
        encoder_id=version_id(encoder_version),
        prefix=prefix,
    )
    chosen = np.flatnonzero(ok)
    chosen = chosen[np.argsort(entries.times[chosen], kind="stable")]
    chosen = chosen[len(chosen) - min(length, len(chosen)) :]
    return HistorySelection(
        decode_vectors(entries, chosen, prefix),
        entries.times[chosen],
        int(eligible.sum() - ok.sum()),
    )
