"""Feature transforms shared by training and serving (numpy only, so the service never needs torch)."""

from __future__ import annotations

import numpy as np

N_TIME_BUCKETS = 64
"""Target-relative time-gap buckets: two per doubling of the gap in seconds (covers ~30 years)."""


def time_buckets(gap_seconds: np.ndarray) -> np.ndarray:
    """Bucket of each behavior's age (target time minus behavior time, in seconds).

    floor(2 * log2(1 + max(gap, 0))), capped at N_TIME_BUCKETS - 1.
    """
    gap = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0.0)
    return np.minimum((2.0 * np.log2(1.0 + gap)).astype(np.int64), N_TIME_BUCKETS - 1)
