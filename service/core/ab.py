"""A/B assignment: a deterministic hash of (user id, salt) against the variants' traffic weights."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

_SCALE = float(1 << 64)


def hash_unit(user_id: str, salt: str, person: bytes = b"") -> float:
    """A uniform number in [0, 1) fixed by (user_id, salt): blake2b keyed with the salt.

    `person` (at most 16 bytes) separates uses of one salt: each value gives an independent number.
    """
    # Keyed blake2b instead of hash(): stable across processes and Python versions (no
    # PYTHONHASHSEED), and a salt change reshuffles every user independently of the ids.
    digest = hashlib.blake2b(
        user_id.encode("utf-8", "surrogatepass"), key=salt.encode("utf-8")[:64], digest_size=8, person=person
    ).digest()
    return int.from_bytes(digest, "big") / _SCALE


def assign_variant(user_id: str, salt: str, weights: Mapping[str, float]) -> str:
    """The variant of a user: the arm whose cumulative weight interval holds the user's hash."""
    arms = [(name, float(w)) for name, w in sorted(weights.items()) if w > 0]
    if not arms:
        raise ValueError("no variant has a positive weight")
    # Sorted names make the split independent of the order the weights were written in.
    total = sum(w for _, w in arms)
    point = hash_unit(user_id, salt) * total
    acc = 0.0
    for name, weight in arms:
        acc += weight
        if point < acc:
            return name
    return arms[-1][0]  # float rounding at the very top of the range


def effective_weights(configured: Mapping[str, float] | None, loaded: list[str]) -> dict[str, float]:
    """Weights of the hash split over loaded variants: configured ones, else equal over all loaded."""
    if configured is None:
        return {name: 1.0 / len(loaded) for name in sorted(loaded)} if loaded else {}
    total = sum(w for name, w in configured.items() if name in loaded)
    if total <= 0:
        return {}
    return {name: configured.get(name, 0.0) / total for name in sorted(loaded)}


LOG_SAMPLE_PERSON = b"dare-log-sample"


def in_log_sample(user_id: str, salt: str, rate: float) -> bool:
    """Whether the impression log keeps this user: a hash independent of the arm's, below `rate`."""
    # Its own blake2b personalisation: with the arm's hash, sampling 50% could keep one arm only.
    return rate >= 1.0 or hash_unit(user_id, salt, LOG_SAMPLE_PERSON) < rate
