"""Health: liveness, readiness with reasons, and the details page for humans and monitors.

Stages register readiness checks (a name and a function returning ``None`` when fine, else a
short reason) and detail providers (a name and a function returning JSON-able data); this module
only asks them. ``/healthz`` is 200 while the process serves; ``/readyz`` is 200 when every check
passes, else 503 with the failing checks and their reasons; ``/health`` is the JSON details.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relay import __version__
from relay.ingest import json_response
from relay.metrics import CHART_OUTCOMES, CONTENT_TYPE, Metrics

Check = Callable[[], str | None]


class Health:
    """Readiness checks and details, and the HTTP handlers that show them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.started_at = time.time()
        self._checks: dict[str, Check] = {}
        self._degrading: set[str] = set()
        self._details: dict[str, Callable[[], Any]] = {}

    def add_check(self, name: str, check: Check, *, degrades: bool = False) -> None:
        """Register readiness check ``name``: returns None when ready, else the reason.
        ``degrades``: a failure of this check alone leaves the relay working in a degraded
        mode (events are still made durable, in the spool): readiness answers 503
        ``degraded`` instead of ``unready``."""
        self._checks[name] = check
        if degrades:
            self._degrading.add(name)

    def add_detail(self, name: str, provider: Callable[[], Any]) -> None:
        """Register a section of ``/health``."""
        self._details[name] = provider

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" or reason})."""
        results = {name: check() or "ok" for name, check in self._checks.items()}
        return all(r == "ok" for r in results.values()), results

    async def healthz(self, _: web.Request) -> web.Response:
        """Liveness: 200 while the process serves requests."""
        return json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        """Readiness: 200 ``ready``, or 503 ``unready`` with the failing checks' reasons."""
        ready, checks = self.readiness()
        if ready:
            return json_response({"status": "ready", "checks": checks})
        reasons = {name: reason for name, reason in checks.items() if reason != "ok"}
        return json_response(
            {"status": self._status(ready, checks), "reasons": reasons, "checks": checks}, 503
        )

    def _status(self, ready: bool, checks: dict[str, str]) -> str:
        """``ready``; ``degraded`` when only degrading checks fail; else ``unready``."""
        if ready:
            return "ready"
        failing = {name for name, reason in checks.items() if reason != "ok"}
        return "degraded" if failing <= self._degrading else "unready"

    def details(self) -> dict[str, Any]:
        """Everything ``/health`` shows. ``events_per_minute``: events published in the last
        60 seconds, by event; ``outcomes_per_minute``: webhook answers in each UTC minute of
        the last hour by outcome (``accepted``, ``duplicate``, ``spooled``, ``rejected``: every
        4xx), oldest first, ``start`` the first minute's Unix time; ``uptime_seconds``: seconds
        since start."""
        ready, checks = self.readiness()
        m = self.metrics
        now = time.time()
        result: dict[str, Any] = {
            "status": self._status(ready, checks),
            "version": __version__,
            "uptime_seconds": round(now - self.started_at, 3),
            "checks": checks,
            "counters": {
                **m.counts,
                "published": sum(m.published_by_event.values()),
                "published_by_event": m.published_by_event,
                "rejected_by_reason": m.rejected_by_reason,
            },
            "last_event_at": {event: _iso(at) for event, at in sorted(m.last_event_at.items())},
            "events_per_minute": m.recent.counts(),
            "outcomes_per_minute": m.per_minute.series(CHART_OUTCOMES),
        }
        for name, provider in self._details.items():
            result[name] = provider()
        return result

    async def health(self, _: web.Request) -> web.Response:
        """``/health``: JSON details (version, uptime, broker, dedup, counters ...)."""
        return json_response(self.details())

    async def metrics_handler(self, _: web.Request) -> web.Response:
        """``/metrics``: Prometheus text format."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
