"""Recent counts for ``/health`` and the status page. Pure logic, no I/O.

- ``RecentCounts``: how many events of each type in the last minute (one-second buckets).
- ``PerMinute``: how many of each kind (the webhook outcomes) in each wall-clock minute of the
  last hour, for the status page's chart.

Each name keeps at most ``window`` buckets, so memory is bounded by the number of names (the
caller bounds those) times ``window``, whatever the event rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


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


class PerMinute:
    """Counts per name in each whole UTC minute of the last ``minutes`` minutes.

    Buckets are aligned to wall-clock minutes (Unix time // 60), so that a chart can label
    them with the time of day. clock: wall-clock seconds (``time.time``, injectable).
    """

    def __init__(self, minutes: int = 60, clock: Callable[[], float] = time.time) -> None:
        self.minutes = minutes
        self._clock = clock
        self._buckets: dict[str, deque[list[int]]] = {}

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``name`` in the current minute."""
        minute = int(self._clock() // 60)
        buckets = self._buckets.get(name)
        if buckets is None:
            buckets = self._buckets[name] = deque()
        if buckets and buckets[-1][0] == minute:
            buckets[-1][1] += n
        else:
            buckets.append([minute, n])
            while buckets[0][0] <= minute - self.minutes:
                buckets.popleft()

    def series(self, names: Iterable[str]) -> dict[str, Any]:
        """The last ``minutes`` minutes, oldest first, the current (partial) minute last:
        ``{"start": Unix seconds of the first minute, "minutes": N, name: [N counts], ...}``
        for each of ``names`` (zeros for a name never counted)."""
        last = int(self._clock() // 60)
        first = last - self.minutes + 1
        result: dict[str, Any] = {"start": first * 60, "minutes": self.minutes}
        for name in names:
            counts = [0] * self.minutes
            for minute, n in self._buckets.get(name, ()):
                if first <= minute <= last:
                    counts[minute - first] = n
            result[name] = counts
        return result
