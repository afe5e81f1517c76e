"""Waiting for a started server: poll `/readyz` until it answers 200 (demo, tests, benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def wait_ready(base: str, timeout: float = 120.0, alive: Callable[[], bool] | None = None) -> bool:
    """True once `base/readyz` answers 200; False on timeout or as soon as `alive()` says the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False
