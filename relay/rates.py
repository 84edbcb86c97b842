"""Recent counts: how many events of each type in the last minute, for ``/health`` and the
status page. Pure logic, no I/O.

Each name keeps at most ``window`` one-second buckets, so memory is bounded by the number of
names (the caller bounds those) times ``window``, whatever the event rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RecentCounts:
    """Counts per name over a sliding window of ``window`` seconds, in one-second buckets.

    clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, window: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._buckets: dict[str, deque[list[int]]] = {}

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``name`` now."""
        second = int(self._clock())
        buckets = self._buckets.get(name)
        if buckets is None:
            buckets = self._buckets[name] = deque()
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += n
        else:
            buckets.append([second, n])
            self._expire(buckets, second)

    def counts(self) -> dict[str, int]:
        """{name: occurrences in the last ``window`` seconds}, every name seen so far (0 once
        its window has passed), sorted by name."""
        now = int(self._clock())
        result = {}
        for name in sorted(self._buckets):
            buckets = self._buckets[name]
            self._expire(buckets, now)
            result[name] = sum(n for _, n in buckets)
        return result

    def _expire(self, buckets: deque[list[int]], now: int) -> None:
        while buckets and buckets[0][0] <= now - self.window:
            buckets.popleft()
