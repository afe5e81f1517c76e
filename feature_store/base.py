"""The feature store interface, its value types, and the decoding rules both implementations share."""

from __future__ import annotations

import abc
import enum
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from feature_store import codec, fm_history
from feature_store.errors import CorruptFeatureData, InvalidFeatureData
from feature_store.fm_history import HistoryEntries

logger = logging.getLogger("dare.feature_store")

DEFAULT_MAX_LEN = 10_000
# The largest per-user cap a store accepts: 12 MB of records per user, one GET per read. Lifelong
# histories of 100,000 events (1.2 MB) are well inside it.
MAX_LEN_LIMIT = 1_000_000
# FM-history entries kept per user (all versions together): a ranker reads the newest tens of them,
# and a switch of FM version or encoder holds two sets for a while. 256 INT4 entries of 32 dims are
# 9 kB.
DEFAULT_FM_HISTORY_MAX_LEN = 256
FM_HISTORY_MAX_LEN_LIMIT = 65_536


@dataclass(frozen=True, slots=True, eq=False)
class UserSequence:
    """One user's behaviors ordered by timestamp, oldest first (int64 item ids, int64 seconds)."""

    items: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @classmethod
    def empty(cls) -> UserSequence:
        """A sequence without events (an unknown user)."""
        return cls(np.empty(0, np.int64), np.empty(0, np.int64))


class FmStatus(enum.StrEnum):
    """Whether a cached FM embedding can be used as is."""

    HIT = "hit"
    MISS = "miss"
    STALE = "stale"


@dataclass(frozen=True, slots=True, eq=False)
class FmLookup:
    """The FM embedding found for a user; `vector` is still given when stale (the caller decides)."""

    status: FmStatus
    vector: np.ndarray | None
    version: str | None
    written_at: float | None


FM_MISS = FmLookup(FmStatus.MISS, None, None, None)


@dataclass(frozen=True, slots=True, eq=False)
class UserFeatures:
    """Everything the ranker reads about one user; `fm_history` only when the read asked for it."""

    user_id: str
    sequence: UserSequence
    fm: FmLookup
    fm_history: HistoryEntries | None = None


@dataclass(slots=True)
class StoreStats:
    """Counters the service exports as metrics; monotonically increasing."""

    corrupt_reads: int = 0  # users whose stored bytes did not decode
    errors: int = 0  # calls that raised FeatureStoreUnavailable or another store error
    timeouts: int = 0  # of those, calls that ran out of time


class FeatureStore(abc.ABC):
    """Async store of behavior sequences and FM embeddings; Redis and in-memory behave identically."""

    def __init__(
        self,
        *,
        max_len: int = DEFAULT_MAX_LEN,
        fm_ttl_s: float | None = None,
        fm_history_max_len: int = DEFAULT_FM_HISTORY_MAX_LEN,
    ) -> None:
        if not 0 < max_len <= MAX_LEN_LIMIT:
            raise ValueError(f"max_len must lie in [1, {MAX_LEN_LIMIT:,}], got {max_len}")
        if fm_ttl_s is not None and fm_ttl_s <= 0:
            raise ValueError(f"fm_ttl_s must be positive or None, got {fm_ttl_s}")
        if not 0 < fm_history_max_len <= FM_HISTORY_MAX_LEN_LIMIT:
            raise ValueError(
                f"fm_history_max_len must lie in [1, {FM_HISTORY_MAX_LEN_LIMIT:,}], got {fm_history_max_len}"
            )
        self.max_len = max_len
        self.fm_ttl_s = fm_ttl_s
        self.fm_history_max_len = fm_history_max_len
        self.stats = StoreStats()

    @abc.abstractmethod
    async def read_users(
        self,
        user_ids: list[str],
        *,
        fm_version: str | None = None,
        max_len: int | None = None,
        fm_history: bool = False,
    ) -> list[UserFeatures]:
        """Sequences and FM embeddings of many users in one round trip (on corruption: CorruptFeatureData);
        with `fm_history`, every stored FM-history entry of each user too (the core chooses among them)."""

    @abc.abstractmethod
    async def read_sequence(self, user_id: str, max_len: int | None = None) -> UserSequence:
        """The newest `max_len` events of one user (empty for an unknown user)."""

    @abc.abstractmethod
    async def append_events(self, user_id: str, items: np.ndarray, timestamps: np.ndarray) -> int:
        """Atomically append events, keep the newest `max_len`; returns the new length."""

    @abc.abstractmethod
    async def replace_sequences(self, sequences: Mapping[str, UserSequence]) -> None:
        """Set whole sequences (sorted by timestamp, capped), replacing what was stored."""

    @abc.abstractmethod
    async def write_fm_embeddings(
        self, version: str, user_ids: list[str], vectors: np.ndarray, *, written_at: float | None = None
    ) -> None:
        """Store one FM embedding per user under `version`, keeping the active version's vector too."""

    @abc.abstractmethod
    async def write_fm_history(
        self, fm_version: str, encoder_version: str, histories: Mapping[str, Sequence[bytes]]
    ) -> None:
        """Replace each user's FM-history entries of (`fm_version`, `encoder_version`) with the given
        packed entries (`fm_history.encode_entries`), keeping the entries of other encoders of the same
        FM and of the active FM version, and at most `fm_history_max_len` in all, the new ones first."""

    @abc.abstractmethod
    async def append_fm_history(self, user_id: str, entries: Sequence[bytes]) -> int:
        """Append packed entries to a user's FM history, keep the newest `fm_history_max_len`; returns
        the new count."""

    @abc.abstractmethod
    async def read_fm_history(self, user_id: str) -> HistoryEntries:
        """Every stored FM-history entry of one user, in stored order (empty for an unknown user)."""

    @abc.abstractmethod
    async def set_active_fm_version(self, version: str) -> None:
        """Point readers at `version` (one atomic write)."""

    @abc.abstractmethod
    async def active_fm_version(self) -> str | None:
        """The version readers compare against when they name none."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise FeatureStoreUnavailable unless the store answers in time."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections; the store must not be used afterwards."""

    async def __aenter__(self) -> FeatureStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # Shared rules, so both implementations decode, cap and classify in exactly the same way.

    def _read_len(self, max_len: int | None) -> int:
        if max_len is None:
            return self.max_len
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        return min(max_len, self.max_len)

    def _encode_replacement(self, sequence: UserSequence) -> bytes:
        """Records of a whole sequence: stably sorted by timestamp, the newest `max_len` kept."""
        items = np.asarray(sequence.items)
        timestamps = np.asarray(sequence.timestamps)
        if items.shape != timestamps.shape or timestamps.ndim != 1:
            raise InvalidFeatureData(
                f"items {items.shape} and timestamps {timestamps.shape} must be equal 1-D"
            )
        if timestamps.size > 1 and bool((timestamps[1:] < timestamps[:-1]).any()):
            order = np.argsort(timestamps, kind="stable")
            items, timestamps = items[order], timestamps[order]
        return codec.encode_events(items[-self.max_len :], timestamps[-self.max_len :])

    def _encode_fm_batch(
        self, version: str, user_ids: list[str], vectors: np.ndarray, written_at: float | None
    ) -> list[bytes]:
        check_version(version)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(user_ids):
            raise InvalidFeatureData(f"vectors must have shape ({len(user_ids)}, dim), got {vectors.shape}")
        if vectors.dtype.kind not in "fiu" or not bool(np.isfinite(vectors).all()):
            raise InvalidFeatureData("FM embeddings must be finite numbers")
        at = time.time() if written_at is None else float(written_at)
        if not math.isfinite(at):
            raise InvalidFeatureData(f"written_at must be finite, got {written_at}")
        vectors = vectors.astype(np.float32, copy=False)
        return [codec.encode_fm(row, at) for row in vectors]

    def _history_for_write(
        self, fm_version: str, encoder_version: str, histories: Mapping[str, Sequence[bytes]]
    ) -> dict[str, list[bytes]]:
        """Each user's new entries, checked to be of the named versions, stably ordered by time, the
        newest `fm_history_max_len` kept."""
        check_version(fm_version)
        check_version(encoder_version)
        wanted = (fm_history.version_id(fm_version), fm_history.version_id(encoder_version))
        out: dict[str, list[bytes]] = {}
        for uid, blobs in histories.items():
            entries = self._checked_entries(blobs)
            other = (entries.fm_ids != wanted[0]) | (entries.encoder_ids != wanted[1])
            if bool(other.any()):
                raise InvalidFeatureData(
                    f"FM-history entries of user {uid!r} are not of FM {fm_version!r} and encoder "
                    f"{encoder_version!r}"
                )
            order = np.argsort(entries.times, kind="stable")[-self.fm_history_max_len :]
            out[uid] = [entries.blobs[i] for i in order]
        return out

    @staticmethod
    def _checked_entries(blobs: Sequence[bytes]) -> HistoryEntries:
        try:
            return fm_history.parse_entries(blobs)
        except codec.CodecError as exc:
            raise InvalidFeatureData(f"not FM-history entries: {exc}") from exc

    def _decode_history(self, user_id: str, blobs: Sequence[bytes]) -> HistoryEntries | str:
        try:
            return fm_history.parse_entries(blobs)
        except codec.CodecError as exc:
            return self._corrupt(user_id, "FM history", exc)

    def _corrupt(self, user_id: str, what: str, reason: object) -> str:
        """Count and log one corrupt value; returns the message naming the user."""
        self.stats.corrupt_reads += 1
        message = f"corrupt {what} for user {user_id!r}: {reason}"
        logger.warning(message)
        return message

    def _decode_sequence(self, user_id: str, tail: bytes, total_bytes: int) -> UserSequence:
        try:
            codec.check_sequence_length(total_bytes)
            items, timestamps = codec.decode_events(tail)
        except codec.CodecError as exc:
            message = self._corrupt(user_id, "sequence", exc)
            raise CorruptFeatureData(message, user_ids=[user_id]) from exc
        return UserSequence(items, timestamps)

    def _decode_user(
        self,
        user_id: str,
        tail: bytes,
        total_bytes: int,
        fm_fields: Mapping[bytes, bytes],
        wanted_version: str | None,
        now: float,
        history: Sequence[bytes] | None = None,
    ) -> UserFeatures | str:
        """Decode one user's stored values; returns the corruption message instead when they are bad."""
        try:
            codec.check_sequence_length(total_bytes)
            items, timestamps = codec.decode_events(tail)
        except codec.CodecError as exc:
            return self._corrupt(user_id, "sequence", exc)
        try:
            fm = select_fm(fm_fields, wanted_version, self.fm_ttl_s, now)
        except codec.CodecError as exc:
            return self._corrupt(user_id, "FM embedding", exc)
        entries = None if history is None else self._decode_history(user_id, history)
        if isinstance(entries, str):
            return entries
        return UserFeatures(user_id, UserSequence(items, timestamps), fm, entries)

    def _finish_batch(self, user_ids: list[str], decoded: list[UserFeatures | str]) -> list[UserFeatures]:
        """Return the batch, or raise one CorruptFeatureData naming every corrupt user in it."""
        features = [d for d in decoded if not isinstance(d, str)]
        if len(features) == len(decoded):
            return features
        bad = [(uid, d) for uid, d in zip(user_ids, decoded, strict=True) if isinstance(d, str)]
        partial = [None if isinstance(d, str) else d for d in decoded]
        raise CorruptFeatureData(
            "; ".join(message for _, message in bad), user_ids=[uid for uid, _ in bad], partial=partial
        )


def check_version(version: str) -> None:
    """Refuse FM versions that cannot name a hash field cleanly."""
    if not isinstance(version, str) or not version or len(version) > 200:
        raise InvalidFeatureData(f"an FM version must be a non-empty string of <= 200 chars, got {version!r}")


def select_fm(fields: Mapping[bytes, bytes], wanted: str | None, ttl_s: float | None, now: float) -> FmLookup:
    """Pick the user's FM embedding and classify it as hit, stale or miss.

    `fields` maps stored version -> blob. The wanted version's vector is a hit unless older than
    the TTL; without it the newest stored vector is returned as stale. With no version to compare
    against (none asked for, no active pointer) the newest vector counts as a hit within the TTL.
    """
    if not fields:
        return FM_MISS
    decoded: list[tuple[float, str, np.ndarray]] = []
    for raw_version, blob in fields.items():
        try:
            version = raw_version.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise codec.CodecError(f"FM version {raw_version!r} is not UTF-8") from exc
        vector, written_at = codec.decode_fm(blob)
        decoded.append((written_at, version, vector))
    match = [d for d in decoded if d[1] == wanted] if wanted is not None else []
    written_at, version, vector = match[0] if match else max(decoded, key=lambda d: (d[0], d[1]))
    expired = ttl_s is not None and now - written_at > ttl_s
    current = version == wanted or wanted is None
    status = FmStatus.HIT if current and not expired else FmStatus.STALE
    return FmLookup(status, vector, version, written_at)
