"""The feature store's exceptions: one base class, one subclass per condition the caller handles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feature_store.base import UserFeatures


class FeatureStoreError(Exception):
    """Base class of every error the feature store raises; Redis exceptions never leak past it."""


class FeatureStoreUnavailable(FeatureStoreError):
    """The store could not be reached or did not answer within the configured timeout (service: 503)."""


class InvalidFeatureData(FeatureStoreError, ValueError):
    """A write was given values the binary layout cannot hold (service: 422)."""


class CorruptFeatureData(FeatureStoreError):
    """Bytes stored under a user's key do not decode; the affected users are named.

    `user_ids` lists every corrupt user of the call. For a batched read, `partial` holds the
    results aligned with the requested ids, `None` where the user was corrupt, so a batching
    caller can fail those requests alone without a second round trip.
    """

    def __init__(
        self,
        message: str,
        *,
        user_ids: Sequence[str] = (),
        partial: list[UserFeatures | None] | None = None,
    ) -> None:
        super().__init__(message)
        self.user_ids: tuple[str, ...] = tuple(user_ids)
        self.partial = partial
