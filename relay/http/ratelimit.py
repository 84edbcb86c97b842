"""A per-source token bucket: ``rate`` requests per second on average, bursts of ``burst``.

Pure logic (no I/O), with an injectable clock. Memory is bounded: at most ``max_sources``
buckets are kept, the least recently seen source is forgotten first (a forgotten source starts
again with a full bucket, which only ever errs on the side of letting a request through).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_MAX_SOURCES = 65_536


class RateLimiter:
    """Token buckets keyed by source.

    rate: tokens added per second (> 0). burst: bucket size, the most requests a source may
    send at once (>= 1). max_sources: buckets kept. clock: monotonic seconds.
    """

    __slots__ = ("_buckets", "burst", "clock", "evictions", "max_sources", "rate")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be > 0, burst and max_sources >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self.clock = clock
        #: source -> (tokens left, clock reading when counted, refusals in a row)
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, source: str) -> float:
        """Take one token for ``source``: 0.0 when the request may go ahead, else the seconds
        until a token will be there (what ``Retry-After`` should say)."""
        now = self.clock()
        buckets = self._buckets
        entry = buckets.get(source)
        if entry is None:
            tokens, refusals = self.burst, 0
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
                self.evictions += 1
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            refusals = entry[2]
            buckets.move_to_end(source)
        if tokens >= 1.0:
            buckets[source] = (tokens - 1.0, now, 0)
            return 0.0
        buckets[source] = (tokens, now, refusals + 1)
        return (1.0 - tokens) / self.rate

    def refusals(self, source: str) -> int:
        """Requests of ``source`` refused in a row since its last accepted one (1 on the first
        refusal of a streak: the moment to log once)."""
        entry = self._buckets.get(source)
        return 0 if entry is None else entry[2]


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
