"""How late the event loop runs: a periodic sleep, and how much later than asked it wakes up.

Every callback of the service shares one event loop. When something holds it (a long synchronous
call, a garbage-collection pause, the OS not scheduling the thread, the GIL held by another thread),
nothing else runs: timers fire late and replies sit unread in their sockets. The monitor's lateness
is the metric `dare_event_loop_lag_seconds`; the stalls it saw are kept for a minute, so a
caller whose deadline passed can ask how much of its wait the loop spent stalled
(`stalled_between`) rather than blame whatever it was waiting on.
"""

from __future__ import annotations

import asyncio
import collections
import time

from prometheus_client import Histogram

# Fine enough that a stall is timed within 20 ms of its start; about 50 wake-ups a second cost the
# loop well under a millisecond per second.
INTERVAL_S = 0.02
# Lateness below this is the ordinary cost of a loop iteration, not a stall worth remembering.
STALL_FLOOR_S = 0.005
# Stalls are remembered this long: longer than any deadline that asks about them.
KEEP_S = 60.0


class LoopLagMonitor:
    """A task that sleeps `interval_s` at a time and records how late each wake-up came."""

    def __init__(
        self, histogram: Histogram, *, interval_s: float = INTERVAL_S, keep_s: float = KEEP_S
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._histogram = histogram
        self.interval_s = interval_s
        self.keep_s = keep_s
        # (from, to) in perf_counter() seconds: when a wake-up was due and when it came
        self._stalls: collections.deque[tuple[float, float]] = collections.deque()
        self._due: float | None = None  # when the pending wake-up is due; None while not running
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start measuring on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dare-loop-lag")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._due = None

    async def _run(self) -> None:
        while True:
            due = self._due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            woke = time.perf_counter()
            lag = max(0.0, woke - due)
            self._histogram.observe(lag)
            if lag >= STALL_FLOOR_S:
                self._stalls.append((due, woke))
            while self._stalls and self._stalls[0][1] < woke - self.keep_s:
                self._stalls.popleft()

    def stalled_between(self, start: float, end: float) -> float:
        """Seconds of [start, end] (perf_counter) during which the loop was stalled.

        A stall still under way counts too: when the caller runs in the same loop iteration that
        ends the stall, the monitor has not woken yet, but its wake-up is overdue since it was due.
        """
        total = 0.0
        for since, until in self._stalls:
            total += max(0.0, min(until, end) - max(since, start))
        due = self._due
        if due is not None and end - due >= STALL_FLOOR_S:
            total += max(0.0, end - max(due, start))
        return total
