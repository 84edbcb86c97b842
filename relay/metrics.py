"""Metrics: what the stages report, exported in Prometheus text format by prometheus-client.

Stages call the small methods of ``Metrics`` (``published``, ``rejected`` ...) and never touch the
exporter. Each relay owns its own ``CollectorRegistry``, so several relays in one process (tests)
never share counters. Values that other objects already hold (dedup entries, broker state) are
read at scrape time through ``gauge_callbacks``. ``Metrics`` also keeps plain counters for
``/health`` and the status page.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.rates import PerMinute, RecentCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_EVENT_LABELS = 200  # event names come from RETM; past this many, they count as "other"
#: the webhook outcomes of the status page's chart, counted per minute over the last hour
CHART_OUTCOMES = ("accepted", "duplicate", "spooled", "rejected")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _CallbackCollector(Collector):
    """Values read from other objects at scrape time: name -> (help, kind, callback)."""

    def __init__(self) -> None:
        self.callbacks: dict[str, tuple[str, str, Callable[[], float]]] = {}
        #: name -> (help, label name, callback giving {label value: value})
        self.labelled: dict[str, tuple[str, str, Callable[[], Mapping[str, float]]]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, (doc, kind, callback) in self.callbacks.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=float(callback()))
        for name, (doc, label, values) in self.labelled.items():
            gauge = GaugeMetricFamily(name, doc, labels=[label])
            for label_value, value in values().items():
                gauge.add_metric([label_value], float(value))
            yield gauge


class Metrics:
    """All of the relay's metrics. Names start with ``relay_``.

    route labels are the configured path names (``events``, ``errors`` ...); outcome is one of
    ``accepted``, ``spooled``, ``duplicate``, ``rejected``, ``unavailable``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started_at = time.time()
        self._requests = Counter(
            "relay_requests",
            "Webhook requests by route and outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self._published = Counter(
            "relay_published", "Events confirmed by RabbitMQ, by event.", ["event"], registry=r
        )
        self._duplicates = Counter(
            "relay_duplicates", "Deliveries answered as duplicates by the dedup cache.", registry=r
        )
        self._rejected = Counter(
            "relay_rejected", "Requests answered 4xx, by reason.", ["reason"], registry=r
        )
        self._unavailable = Counter(
            "relay_unavailable",
            "Requests answered 503 because the event could not be made durable, by reason.",
            ["reason"],
            registry=r,
        )
        self._unroutable = Counter(
            "relay_unroutable",
            "Events no queue was bound for, diverted to the unrouted exchange.",
            registry=r,
        )
        self._late_confirms = Counter(
            "relay_late_confirms",
            "Publisher confirms that arrived after the publish deadline.",
            registry=r,
        )
        self._confirm_seconds = Histogram(
            "relay_publish_confirm_seconds",
            "Time from publish to the broker's confirm.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._request_seconds = Histogram(
            "relay_request_seconds",
            "Webhook handling time, from the request's headers to the answer.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._spooled = Counter(
            "relay_spooled",
            "Events written to the spool instead of being confirmed at once, by reason.",
            ["reason"],
            registry=r,
        )
        self._spool_write_seconds = Histogram(
            "relay_spool_write_seconds",
            "Time to make one event durable in the spool (queue, group commit, fsync).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._broker_connected = Gauge(
            "relay_broker_connected", "1 while the broker link and topology are up.", registry=r
        )
        self._business_mismatch = Counter(
            "relay_business_mismatch",
            "Events whose body names another business than the token's merchant (published, "
            "flagged with x-relay-business-mismatch).",
            registry=r,
        )
        self._quarantined = Counter(
            "relay_quarantined",
            "Authenticated bodies refused as not JSON objects (400), by reason, and what became "
            "of their copy on the quarantine exchange: accepted (confirmed), spooled, or "
            "duplicate (a retry of a body already kept).",
            ["reason", "outcome"],
            registry=r,
        )
        self._retm_errors = Counter(
            "relay_retm_error_webhooks",
            "RETM error webhooks published (each arrival; never deduplicated). Exported at 0 "
            "from the start, so that the first one is an increase.",
            registry=r,
        )
        self._installs = Counter(
            "relay_installs",
            "RETM install callbacks by outcome (accepted, rejected, forbidden, unavailable).",
            ["outcome"],
            registry=r,
        )
        self._loyalty = Counter(
            "relay_loyalty_requests",
            "Loyalty hook requests by hook and outcome (answered, cached, fallback_<reason>).",
            ["hook", "outcome"],
            registry=r,
        )
        self._loyalty_seconds = Histogram(
            "relay_loyalty_rpc_seconds",
            "Time from publishing a loyalty request to its responder's reply.",
            ["hook"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._loyalty_late = Counter(
            "relay_loyalty_late_replies",
            "Loyalty replies that arrived after their request's deadline (discarded).",
            registry=r,
        )
        self._connections_closed = Counter(
            "relay_http_connections_closed",
            "Connections the relay closed to protect itself, by reason: read_timeout (headers "
            "or body not received within http.read_timeout), keepalive (idle for "
            "http.keepalive_timeout), evicted (the longest-idle one, for a new connection at "
            "http.max_connections), refused (a new one at the cap, with none idle).",
            ["reason"],
            registry=r,
        )
        info = Gauge("relay_info", "Build information.", ["version"], registry=r)
        info.labels(__version__).set(1)
        Gauge("relay_start_time_seconds", "Start time of the process (Unix time).", registry=r).set(
            self.started_at
        )
        self._callbacks = _CallbackCollector()
        r.register(self._callbacks)
        self.in_flight_now = 0  # a plain int on the hot path, read at scrape time
        self.gauge_callback(
            "relay_in_flight", "Webhook requests being handled now.", lambda: self.in_flight_now
        )

        self._children: dict[tuple[Any, ...], Any] = {}
        self._event_labels: set[str] = set()
        # Plain counters for /health and the status page.
        self.counts: dict[str, int] = {
            "accepted": 0,
            "spooled": 0,
            "duplicate": 0,
            "rejected": 0,
            "unavailable": 0,
            "unroutable": 0,
            "late_confirms": 0,
        }
        self.published_by_event: dict[str, int] = {}
        self.rejected_by_reason: dict[str, int] = {}
        self.last_event_at: dict[str, float] = {}
        #: events published in the last minute, by event (the status page's events per minute)
        self.recent = RecentCounts(window=60)
        #: webhook answers per minute over the last hour, by outcome (CHART_OUTCOMES)
        self.per_minute = PerMinute(minutes=60)

    def gauge_callback(self, name: str, doc: str, callback: Callable[[], float]) -> None:
        """Export ``callback()`` as gauge ``name`` at every scrape."""
        self._callbacks.callbacks[name] = (doc, "gauge", callback)

    def labelled_gauge_callback(
        self, name: str, doc: str, label: str, callback: Callable[[], Mapping[str, float]]
    ) -> None:
        """Export ``callback()`` ({label value: value}) as gauge ``name`` with one ``label``
        at every scrape."""
        self._callbacks.labelled[name] = (doc, label, callback)

    def counter_callback(self, name: str, doc: str, callback: Callable[[], float]) -> None:
        """Export ``callback()`` (a count that only grows) as counter ``name``; ``name`` is
        given without the ``_total`` suffix, which the exposition adds."""
        self._callbacks.callbacks[name] = (doc, "counter", callback)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, outcome: str, seconds: float) -> None:
        """One webhook answered on ``route`` with ``outcome`` after ``seconds``."""
        self._child(self._requests, route, outcome).inc()
        self._child(self._request_seconds, route).observe(seconds)
        if outcome in self.counts:
            self.counts[outcome] += 1
        if outcome in {"accepted", "duplicate", "spooled"}:
            self.per_minute.add(outcome)

    def published(self, event: str, confirm_seconds: float) -> None:
        """An event confirmed by the broker ``confirm_seconds`` after its publish."""
        if event not in self._event_labels:
            if len(self._event_labels) >= MAX_EVENT_LABELS:
                event = "other"
            self._event_labels.add(event)
        self._child(self._published, event).inc()
        self._confirm_seconds.observe(confirm_seconds)
        self.published_by_event[event] = self.published_by_event.get(event, 0) + 1
        self.recent.add(event)
        self.last_event_at[event] = time.time()

    def duplicate(self) -> None:
        """A delivery answered as a duplicate."""
        self._duplicates.inc()

    def rejected(self, reason: str) -> None:
        """A request answered 4xx for ``reason`` (``unauthorized``, ``invalid_json`` ...)."""
        self._child(self._rejected, reason).inc()
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
        self.per_minute.add("rejected")

    def quarantined(self, reason: str, outcome: str) -> None:
        """A refused body (``reason``: ``invalid_json``, ``not_object``, ``too_deep``) kept on
        the quarantine exchange (``outcome`` ``accepted`` or ``spooled``), or recognised as a
        retry of one already kept (``duplicate``)."""
        self._child(self._quarantined, reason, outcome).inc()

    def retm_error(self) -> None:
        """One arrival of RETM's error webhook, published."""
        self._retm_errors.inc()

    def unavailable(self, reason: str) -> None:
        """A request answered 503 because the event could not be made durable."""
        self._child(self._unavailable, reason).inc()

    def unroutable(self) -> None:
        """An event diverted to the unrouted exchange."""
        self._unroutable.inc()
        self.counts["unroutable"] += 1

    def late_confirm(self) -> None:
        """A publisher confirm arrived after its deadline."""
        self._late_confirms.inc()
        self.counts["late_confirms"] += 1

    def spooled(self, reason: str) -> None:
        """An event was spooled because of ``reason`` (``disconnected``, ``timeout``,
        ``nacked``, ``blocked``, ``queued`` behind spooled events ...)."""
        self._child(self._spooled, reason).inc()

    def spool_write(self, seconds: float) -> None:
        """One spooled event became durable ``seconds`` after it was handed to the spool."""
        self._spool_write_seconds.observe(seconds)

    def business_mismatch(self) -> None:
        """An event whose body names another business than its token's merchant."""
        self._business_mismatch.inc()
        self.counts["business_mismatch"] = self.counts.get("business_mismatch", 0) + 1

    def install(self, outcome: str) -> None:
        """An install callback answered with ``outcome``."""
        self._child(self._installs, outcome).inc()

    def loyalty(self, hook: str, outcome: str, rpc_seconds: float | None = None) -> None:
        """A loyalty request on ``hook`` (``check_reward``, ``redeem_reward``) answered with
        ``outcome``; ``rpc_seconds`` from publish to reply when a responder answered."""
        self._child(self._loyalty, hook, outcome).inc()
        if rpc_seconds is not None:
            self._child(self._loyalty_seconds, hook).observe(rpc_seconds)

    def loyalty_late_reply(self) -> None:
        """A loyalty reply that came after its deadline, or for no known request."""
        self._loyalty_late.inc()
        self.counts["loyalty_late_replies"] = self.counts.get("loyalty_late_replies", 0) + 1

    def in_flight(self, delta: int) -> None:
        """Requests being handled changed by ``delta``."""
        self.in_flight_now += delta

    def connection_closed(self, reason: str) -> None:
        """The relay closed a client connection for ``reason`` (``read_timeout``,
        ``keepalive``, ``evicted``, ``refused``)."""
        self._child(self._connections_closed, reason).inc()

    def broker_connected(self, up: bool) -> None:
        """The broker link went up or down."""
        self._broker_connected.set(1 if up else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
