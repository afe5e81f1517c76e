"""Binary layouts: exact bytes, exact round trips, refusal of what the layout cannot hold."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from feature_store import codec
from feature_store.errors import InvalidFeatureData


def test_event_record_is_12_little_endian_bytes() -> None:
    data = codec.encode_events(np.array([-2, 7]), np.array([1, 2**32 - 1]))
    assert data == struct.pack("<qI", -2, 1) + struct.pack("<qI", 7, 2**32 - 1)
    assert codec.EVENT_BYTES == 12


def test_round_trip_is_exact_and_int64() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 1000, dtype=np.int64)
    ts = np.sort(rng.integers(0, 2**32, 1000))
    got_items, got_ts = codec.decode_events(codec.encode_events(items, ts))
    assert got_items.dtype == got_ts.dtype == np.int64
    np.testing.assert_array_equal(got_items, items)
    np.testing.assert_array_equal(got_ts, ts)


def test_decode_orders_late_events_stably() -> None:
    data = codec.encode_events(np.array([1, 2, 3, 4]), np.array([10, 30, 20, 10]))
    items, ts = codec.decode_events(data)
    assert items.tolist() == [1, 4, 3, 2] and ts.tolist() == [10, 10, 20, 30]


@pytest.mark.parametrize(
    ("items", "timestamps"),
    [
        ([1], [-1]),
        ([1], [2**32]),
        ([1, 2], [3]),
        ([1.0], [3]),
        ([1], [3.5]),
        ([[1]], [[3]]),
        (np.array([2**63], dtype=np.uint64), [3]),
        ([True], [3]),
    ],
)
def test_values_the_layout_cannot_hold_are_refused(items: object, timestamps: object) -> None:
    with pytest.raises(InvalidFeatureData):
        codec.encode_events(items, timestamps)


def test_empty_input_encodes_to_nothing() -> None:
    assert codec.encode_events(np.array([], np.int64), np.array([], np.int64)) == b""
    items, ts = codec.decode_events(b"")
    assert items.size == ts.size == 0


def test_misaligned_sequence_is_corrupt() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_events(b"\x00" * 13)
    with pytest.raises(codec.CodecError):
        codec.check_sequence_length(12 * 100 + 1)


def test_fm_blob_round_trip_and_layout() -> None:
    vector = np.array([0.5, -1.25, 3.0], np.float32)
    blob = codec.encode_fm(vector, 1_700_000_000.25)
    assert len(blob) == 16 + 3 * 4 and blob[:4] == b"DF\x01\x01"
    got, written_at = codec.decode_fm(blob)
    assert got.dtype == np.float32 and written_at == 1_700_000_000.25
    np.testing.assert_array_equal(got, vector)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"DF\x01\x01",
        b"XX" + codec.encode_fm(np.ones(2, np.float32), 1.0)[2:],
        codec.encode_fm(np.ones(2, np.float32), 1.0)[:-1],
        codec.encode_fm(np.ones(2, np.float32), 1.0) + b"\x00",
        codec.FM_HEADER.pack(b"DF", 1, 1, 1, float("nan")) + b"\x00" * 4,
        codec.FM_HEADER.pack(b"DF", 2, 1, 1, 1.0) + b"\x00" * 4,
    ],
)
def test_bad_fm_blobs_are_corrupt(blob: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_fm(blob)
