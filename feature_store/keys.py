"""Every Redis key of the feature store is built here; the layout is specified in docs/feature-store.md.

Per-user keys carry the user id as a Redis Cluster hash tag, `{<escaped user id>}`, so all keys of
one user hash to the same slot. The escaping keeps the tag well formed for any unicode id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Bytes that would end or start a hash tag, the escape byte itself, and whitespace/control bytes
# (escaped so keys stay printable in redis-cli and MONITOR).
_UNSAFE = re.compile(rb"[\x00-\x20%{}\x7f]")
_ESCAPED = re.compile(rb"%([0-9A-F]{2})")
# The tag of the empty user id. A lone '%' never comes out of the escaping (which always writes
# '%XX'), so it cannot collide; an empty tag '{}' would make Redis hash the whole key instead.
_EMPTY_TAG = b"%"
# The first part of every key: no brace (it would open the hash tag), no blank or control byte.
# Always applied with fullmatch, which (unlike `$`) also refuses a trailing newline.
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
LOG_STREAMS = ("impressions", "events")
"""The log streams: what each arm served (impressions), and the behaviors that followed (events)."""


def is_namespace(name: str) -> bool:
    """Whether `name` may prefix the feature store's keys (the whole of it matches `NAMESPACE_PATTERN`)."""
    return NAMESPACE_PATTERN.fullmatch(name) is not None


def encode_user_id(user_id: str) -> bytes:
    """Escape a user id into a non-empty hash-tag body that never contains '{' or '}'."""
    # surrogatepass: JSON can carry lone surrogates ("\ud800") and they must still map to one key.
    raw = user_id.encode("utf-8", "surrogatepass")
    if not raw:
        return _EMPTY_TAG
    return _UNSAFE.sub(lambda m: b"%%%02X" % m[0][0], raw)


def decode_user_id(tag: bytes) -> str:
    """Invert `encode_user_id` (for operators reading keys back)."""
    if tag == _EMPTY_TAG:
        return ""
    return _ESCAPED.sub(lambda m: bytes([int(m[1], 16)]), tag).decode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds the keys of one namespace: `<ns>:seq:{<uid>}`, `<ns>:fm:{<uid>}`, `<ns>:fmh:{<uid>}`,
    `<ns>:fm:active`, and the log streams `<ns>:log:impressions`, `<ns>:log:events`."""

    namespace: str = "dare"
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Braces in the namespace would become the hash tag and put every user in one slot.
        if not is_namespace(self.namespace):
            raise ValueError(f"namespace must match {NAMESPACE_PATTERN.pattern}, got {self.namespace!r}")
        object.__setattr__(self, "_prefix", self.namespace.encode("ascii"))

    def sequence(self, user_id: str) -> bytes:
        """Key of the user's behavior sequence (a string of fixed-size binary records)."""
        return b"%s:seq:{%s}" % (self._prefix, encode_user_id(user_id))

    def fm(self, user_id: str) -> bytes:
        """Key of the user's FM embeddings (a hash: FM version -> encoded vector)."""
        return b"%s:fm:{%s}" % (self._prefix, encode_user_id(user_id))

    def fm_history(self, user_id: str) -> bytes:
        """Key of the user's FM-history entries (a list of packed entries, `feature_store.fm_history`)."""
        return b"%s:fmh:{%s}" % (self._prefix, encode_user_id(user_id))

    def fm_active(self) -> bytes:
        """Key of the active FM version pointer (a string)."""
        return b"%s:fm:active" % self._prefix

    def log(self, stream: str) -> bytes:
        """Key of a log stream (`impressions` or `events`): a Redis Stream, one entry per record."""
        if stream not in LOG_STREAMS:
            raise ValueError(f"no log stream {stream!r}; the streams are {', '.join(LOG_STREAMS)}")
        return b"%s:log:%s" % (self._prefix, stream.encode("ascii"))
