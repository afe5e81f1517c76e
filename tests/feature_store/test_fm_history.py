"""FM-history entries against a plain-Python oracle: exact bytes, error bounds, prefixes, selection."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from feature_store import fm_history as fh
from feature_store.codec import CodecError
from feature_store.errors import InvalidFeatureData

FM, ENC = "fm:1", "pca-abc"


def _oracle_entry(time: int, vector: np.ndarray, encoding: str) -> bytes:
    """One entry built value by value with struct, from the layout in the module docstring."""
    ids = [int.from_bytes(hashlib.blake2b(v.encode(), digest_size=4).digest(), "little") for v in (FM, ENC)]
    dim = len(vector)
    if encoding == "fp32":
        scale = 1.0
        payload = b"".join(struct.pack("<f", float(v)) for v in vector.astype(np.float32))
    else:
        qmax = 127 if encoding == "int8" else 7
        scale = float(np.float32(np.abs(vector.astype(np.float32)).max() / np.float32(qmax)))
        q = [
            0 if scale == 0 else max(-qmax, min(qmax, round(float(np.float32(v) / np.float32(scale)))))
            for v in vector
        ]
        if encoding == "int8":
            payload = struct.pack(f"<{dim}b", *q)
        else:
            q = q + [0] * (dim % 2)
            payload = bytes((q[2 * i] & 0xF) | ((q[2 * i + 1] & 0xF) << 4) for i in range(len(q) // 2))
    code = {"fp32": 1, "int8": 2, "int4": 3}[encoding]
    return struct.pack("<BBHIIIf", 1, code, dim, time, ids[0], ids[1], scale) + payload


def _oracle_decode(blob: bytes, prefix: int) -> np.ndarray:
    """The first `prefix` values of an entry, decoded value by value."""
    _, code, _, _, _, _, scale = struct.unpack_from("<BBHIIIf", blob)
    body = blob[20:]
    if code == 1:
        return np.array(struct.unpack_from(f"<{prefix}f", body), np.float32)
    if code == 2:
        return np.array([v * scale for v in struct.unpack_from(f"<{prefix}b", body)], np.float32)
    nibbles = [(body[i // 2] >> (4 * (i % 2))) & 0xF for i in range(prefix)]
    return np.array([(n - 16 if n >= 8 else n) * scale for n in nibbles], np.float32)


@pytest.mark.parametrize("encoding", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("dim", [1, 7, 32])
def test_entries_are_the_oracles_bytes_and_decode_as_it_does(encoding: str, dim: int) -> None:
    rng = np.random.default_rng(dim)
    vectors = (rng.normal(size=(6, dim)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    vectors[2] = 0.0  # an all-zero entry: scale 0, decodes to zeros
    times = np.arange(6) + 1_700_000_000
    blobs = fh.encode_entries(times, vectors, fm_version=FM, encoder_version=ENC, encoding=encoding)
    assert blobs == [_oracle_entry(int(t), v, encoding) for t, v in zip(times, vectors, strict=True)]
    assert all(len(b) == fh.entry_bytes(encoding, dim) for b in blobs)
    entries = fh.parse_entries(blobs)
    for prefix in sorted({1, (dim + 1) // 2, dim}):
        got = fh.decode_vectors(entries, np.arange(6), prefix)
        want = np.stack([_oracle_decode(b, prefix) for b in blobs])
        np.testing.assert_array_equal(got, want)
        # the prefix property: the first d' of a full decode
        np.testing.assert_array_equal(got, fh.decode_vectors(entries, np.arange(6), dim)[:, :prefix])
    assert not fh.decode_vectors(entries, np.array([2]), dim).any()


@pytest.mark.parametrize(("encoding", "qmax"), [("int8", 127), ("int4", 7)])
def test_quantized_values_are_within_half_a_step(encoding: str, qmax: int) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_t(3, size=(500, 24)).astype(np.float32)
    blobs = fh.encode_entries(
        np.zeros(500, np.int64), vectors, fm_version=FM, encoder_version=ENC, encoding=encoding
    )
    got = fh.decode_vectors(fh.parse_entries(blobs), np.arange(500), 24)
    step = np.abs(vectors).max(axis=1, keepdims=True) / qmax
    # half a step, and float32 rounding of the scale times a value of at most qmax
    assert np.all(np.abs(got - vectors) <= step / 2 * (1 + 1e-5) + 1e-7)
    # the largest value of each entry is on the grid: it decodes to itself within float rounding
    top = np.abs(vectors).argmax(axis=1)
    rows = np.arange(500)
    np.testing.assert_allclose(got[rows, top], vectors[rows, top], rtol=1e-6)
    # fp32 is exact
    exact = fh.encode_entries(
        np.zeros(500, np.int64), vectors, fm_version=FM, encoder_version=ENC, encoding="fp32"
    )
    np.testing.assert_array_equal(fh.decode_vectors(fh.parse_entries(exact), rows, 24), vectors)


def test_int4_bit_layout() -> None:
    # dims 0..4 = 1, -1, 7, -7, 3 at scale 1: bytes (0x1 | 0xF << 4), (0x7 | 0x9 << 4), (0x3)
    blob = fh.encode_entries(
        np.array([9]), np.array([[1, -1, 7, -7, 3]], np.float32), fm_version=FM, encoder_version=ENC
    )[0]
    assert blob[20:] == bytes([0xF1, 0x97, 0x03])
    assert struct.unpack_from("<f", blob, 16)[0] == 1.0
    assert blob[:8] == struct.pack("<BBHI", 1, 3, 5, 9)
    assert blob[fh.VERSION_IDS] == struct.pack("<II", fh.version_id(FM), fh.version_id(ENC))
    # a stored -8 (never written, but valid bits) decodes as -8
    planted = blob[:20] + bytes([0x08])
    planted = planted[:2] + struct.pack("<H", 1) + planted[4:]
    assert fh.decode_vectors(fh.parse_entries([planted]), np.array([0]), 1).tolist() == [[-8.0]]


def test_sizes_of_a_32_dim_entry() -> None:
    assert [fh.entry_bytes(e, 32) for e in ("fp32", "int8", "int4")] == [148, 52, 36]


@pytest.mark.parametrize(
    ("times", "vectors", "encoding"),
    [
        ([1], [[np.nan]], "int4"),
        ([1], [[np.inf, 0.0]], "int8"),
        ([-1], [[0.5]], "int4"),
        ([2**32], [[0.5]], "int4"),
        ([1.5], [[0.5]], "int4"),
        ([1, 2], [[0.5]], "int4"),
        ([1], [[0.5]], "int2"),
        ([1], np.zeros((1, 0)), "int4"),
        ([1], np.zeros((1, 2**16)), "int4"),
    ],
)
def test_what_the_layout_cannot_hold_is_refused(times: object, vectors: object, encoding: str) -> None:
    with pytest.raises(InvalidFeatureData):
        fh.encode_entries(
            np.asarray(times), np.asarray(vectors), fm_version=FM, encoder_version=ENC, encoding=encoding
        )


def test_bad_stored_entries_are_corrupt() -> None:
    good = fh.encode_entries(np.array([5]), np.ones((1, 4)), fm_version=FM, encoder_version=ENC)[0]
    for bad in (good[:10], good[:-1], good + b"\0", b"\x02" + good[1:], good[:1] + b"\x09" + good[2:]):
        with pytest.raises(CodecError):
            fh.parse_entries([good, bad])
    nan_scale = good[:16] + struct.pack("<f", float("nan")) + good[20:]
    with pytest.raises(CodecError, match="entry 0"):
        fh.parse_entries([nan_scale])


def _entries(times: list[int], fm: str = FM, enc: str = ENC, dim: int = 4, value: float = 0.0) -> list[bytes]:
    vectors = np.full((len(times), dim), value, np.float32) + np.arange(len(times))[:, None]
    return fh.encode_entries(np.array(times), vectors, fm_version=fm, encoder_version=enc, encoding="fp32")


def test_selection_takes_the_newest_entries_strictly_before_now_of_the_wanted_versions() -> None:
    blobs = [
        *_entries([100, 300, 200]),  # stored out of time order (values 0, 1, 2)
        *_entries([250], fm="fm:0"),  # another FM
        *_entries([260], enc="pca-old"),  # another encoder
        *_entries([270], dim=2),  # too few dims for a prefix of 3
        *_entries([400, 500]),  # at and after now: never chosen
    ]
    entries = fh.parse_entries(blobs)
    sel = fh.select_history(entries, now=400, fm_version=FM, encoder_version=ENC, length=2, prefix=3)
    assert sel.times.tolist() == [200, 300]
    np.testing.assert_array_equal(sel.vectors, [[2.0] * 3, [1.0] * 3])
    assert sel.stale == 3
    # with a write lag an entry counts only once written: 300 + 150 is not before 400
    lagged = fh.select_history(
        entries, now=400, fm_version=FM, encoder_version=ENC, length=5, prefix=3, lag_s=150
    )
    assert lagged.times.tolist() == [100, 200]
    empty = fh.select_history(
        fh.HistoryEntries.empty(), now=400, fm_version=FM, encoder_version=ENC, length=4, prefix=3
    )
    assert empty.vectors.shape == (0, 3) and empty.stale == 0


def test_equal_times_keep_their_stored_order() -> None:
    entries = fh.parse_entries(_entries([50, 50, 50, 40]))
    sel = fh.select_history(entries, now=60, fm_version=FM, encoder_version=ENC, length=2, prefix=4)
    assert sel.times.tolist() == [50, 50]
    np.testing.assert_array_equal(sel.vectors[:, 0], [1.0, 2.0])


def test_version_ids_are_stable() -> None:
    # stored in Redis: a change would turn every stored entry stale
    assert fh.version_id("fm:1") == int.from_bytes(hashlib.blake2b(b"fm:1", digest_size=4).digest(), "little")
    assert fh.version_id("fm:1") != fh.version_id("fm:2")
