"""The embedded default store: the same binary layout and rules as Redis, held in process memory."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from feature_store import codec
from feature_store.base import (
    DEFAULT_FM_HISTORY_MAX_LEN,
    DEFAULT_MAX_LEN,
    FeatureStore,
    UserFeatures,
    UserSequence,
    check_version,
)
from feature_store.errors import CorruptFeatureData
from feature_store.fm_history import VERSION_IDS, HistoryEntries, version_id


class InMemoryFeatureStore(FeatureStore):
    """Sequences and FM embeddings in dicts of bytes; every call completes without awaiting.

    Each method runs to completion inside one event-loop step, which is what makes appends atomic
    here; values are kept encoded so that capping, ordering and corruption behave as in Redis.
    """

    def __init__(
        self,
        *,
        max_len: int = DEFAULT_MAX_LEN,
        fm_ttl_s: float | None = None,
        fm_history_max_len: int = DEFAULT_FM_HISTORY_MAX_LEN,
    ) -> None:
        super().__init__(max_len=max_len, fm_ttl_s=fm_ttl_s, fm_history_max_len=fm_history_max_len)
        self._sequences: dict[str, bytearray] = {}
        self._fm: dict[str, dict[bytes, bytes]] = {}
        self._fm_history: dict[str, list[bytes]] = {}
        self._active: str | None = None

    def _tail(self, user_id: str, n_events: int) -> tuple[bytes, int]:
        buf = self._sequences.get(user_id)
        if buf is None or n_events == 0:
            return b"", 0 if buf is None else len(buf)
        # Slicing copies, so no numpy view pins the bytearray (a pinned one cannot be resized).
        return bytes(buf[-n_events * codec.EVENT_BYTES :]), len(buf)

    async def read_users(
        self,
        user_ids: list[str],
        *,
        fm_version: str | None = None,
        max_len: int | None = None,
        fm_history: bool = False,
    ) -> list[UserFeatures]:
        """Sequences and FM embeddings of many users (and their FM-history entries)."""
        n_events = self._read_len(max_len)
        wanted = fm_version if fm_version is not None else self._active
        now = time.time()
        decoded = [
            self._decode_user(
                uid,
                *self._tail(uid, n_events),
                self._fm.get(uid, {}),
                wanted,
                now,
                list(self._fm_history.get(uid, ())) if fm_history else None,
            )
            for uid in user_ids
        ]
        return self._finish_batch(user_ids, decoded)

    async def read_sequence(self, user_id: str, max_len: int | None = None) -> UserSequence:
        """The newest `max_len` events of one user."""
        return self._decode_sequence(user_id, *self._tail(user_id, self._read_len(max_len)))

    async def append_events(self, user_id: str, items: np.ndarray, timestamps: np.ndarray) -> int:
        """Append events in arrival order and keep the newest `max_len`."""
        data = codec.encode_events(items, timestamps)
        buf = self._sequences.get(user_id)
        if buf is not None and len(buf) % codec.EVENT_BYTES:
            message = self._corrupt(user_id, "sequence", f"{len(buf)} bytes stored")
            raise CorruptFeatureData(message, user_ids=[user_id])
        if not data:
            return 0 if buf is None else len(buf) // codec.EVENT_BYTES
        if buf is None:
            buf = self._sequences[user_id] = bytearray()
        buf += data
        cap = self.max_len * codec.EVENT_BYTES
        if len(buf) > cap:
            del buf[: len(buf) - cap]
        return len(buf) // codec.EVENT_BYTES

    async def replace_sequences(self, sequences: Mapping[str, UserSequence]) -> None:
        """Set whole sequences, replacing what was stored."""
        encoded = {uid: self._encode_replacement(seq) for uid, seq in sequences.items()}
        for uid, data in encoded.items():
            if data:
                self._sequences[uid] = bytearray(data)
            else:
                self._sequences.pop(uid, None)

    async def write_fm_embeddings(
        self, version: str, user_ids: list[str], vectors: np.ndarray, *, written_at: float | None = None
    ) -> None:
        """Store one embedding per user under `version`, dropping versions other than it and the active."""
        blobs = self._encode_fm_batch(version, user_ids, vectors, written_at)
        keep = {version.encode(), (self._active or "").encode()}
        for uid, blob in zip(user_ids, blobs, strict=True):
            fields = self._fm.setdefault(uid, {})
            fields[version.encode()] = blob
            for stale in [f for f in fields if f not in keep]:
                del fields[stale]

    async def write_fm_history(
        self, fm_version: str, encoder_version: str, histories: Mapping[str, Sequence[bytes]]
    ) -> None:
        """Replace each user's entries of the two versions, with the rules of the Redis write script."""
        new = self._history_for_write(fm_version, encoder_version, histories)
        pair = version_id(fm_version).to_bytes(4, "little") + version_id(encoder_version).to_bytes(
            4, "little"
        )
        keep_fm = {pair[:4], version_id(self._active).to_bytes(4, "little") if self._active else b""}
        for uid, entries in new.items():
            kept = [
                e
                for e in self._fm_history.get(uid, ())
                if e[VERSION_IDS] != pair and e[VERSION_IDS][:4] in keep_fm
            ]
            merged = (kept + entries)[-self.fm_history_max_len :]
            if merged:
                self._fm_history[uid] = merged
            else:
                self._fm_history.pop(uid, None)

    async def append_fm_history(self, user_id: str, entries: Sequence[bytes]) -> int:
        """Append entries and keep the newest `fm_history_max_len`."""
        checked = self._checked_entries(entries)
        stored = self._fm_history.setdefault(user_id, [])
        stored += checked.blobs
        del stored[: max(0, len(stored) - self.fm_history_max_len)]
        if not stored:
            del self._fm_history[user_id]
        return len(stored)

    async def read_fm_history(self, user_id: str) -> HistoryEntries:
        """Every stored entry of one user."""
        found = self._decode_history(user_id, self._fm_history.get(user_id, []))
        if isinstance(found, str):
            raise CorruptFeatureData(found, user_ids=[user_id])
        return found

    async def set_active_fm_version(self, version: str) -> None:
        """Point readers at `version`."""
        check_version(version)
        self._active = version

    async def active_fm_version(self) -> str | None:
        """The active FM version, if one was set."""
        return self._active

    async def ping(self) -> None:
        """Always answers: the data lives in this process."""

    async def aclose(self) -> None:
        """Nothing to release; the data stays until the process ends."""
