"""The application factory: routes, middlewares, and one cleanup context per resource.

``make_app(settings)`` wires the stages together. Resources are acquired in dependency order in
``cleanup_ctx`` and released in reverse after the HTTP handlers in flight have finished: the
broker link is acquired first and released last.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import hdrs, web

from relay.auth import TokenAuthenticator
from relay.dedup import MemoryDedupStore
from relay.forward import Forwarder, StoreAndForward
from relay.health import Health
from relay.ingest import Ingest, error_response
from relay.metrics import Metrics
from relay.publish import Envelope, Publisher
from relay.routing import Router
from relay.settings import Settings
from relay.spool import Spool

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
PUBLISHER = web.AppKey("publisher", Publisher)
DEDUP = web.AppKey("dedup", MemoryDedupStore)
INGEST = web.AppKey("ingest", Ingest)
SPOOL = web.AppKey("spool", Spool)
#: seconds the start waits for the broker's first answer (a topology mismatch then stops the
#: start); a broker still silent after that no longer holds it up: events are spooled
BROKER_START_WAIT = 1.0
FORWARDER = web.AppKey("forwarder", Forwarder)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer the router's own errors (404, 405 ...) with the contract's JSON error body."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(404, "not_found", f"no route for {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here; use {allowed}",
            {hdrs.ALLOW: allowed},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.reason, exc.headers)


def make_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    spool_file: str | None = None,
) -> web.Application:
    """Build the relay's aiohttp application from ``settings``.

    clock: wall-clock seconds for the dedup TTL (injectable for tests).
    spool_file: the spool's file name in ``state.dir`` (default ``spool.file``), so that
    several worker processes can each have their own (``spool-<worker>.db``).
    The broker link is opened by the app's start-up (``AppRunner.setup``), which raises
    TopologyError when the broker's exchanges disagree with the settings; the spool is opened
    next (SpoolError when another process holds it).
    """
    metrics = Metrics()
    health = Health(metrics)
    router = Router(
        settings.amqp.routing_key_template, settings.amqp.exchange, settings.amqp.exchanges
    )
    publisher = Publisher(settings.amqp, router, metrics)
    spool = Spool(
        settings.state.dir / (spool_file or settings.spool.file),
        max_bytes=settings.spool.max_bytes,
        max_events=settings.spool.max_events,
        dedup_ttl=settings.dedup.ttl,
        dedup_max_entries=settings.dedup.max_entries,
        on_write=metrics.spool_write,
        clock=clock,
    )
    dedup = MemoryDedupStore(
        settings.dedup.ttl,
        settings.dedup.max_entries,
        clock=clock,
        wait_timeout=settings.amqp.publish_timeout + 1,
        on_commit=spool.remember_key,
    )
    forwarder = Forwarder(spool, publisher, grace=settings.amqp.publish_timeout + 1)
    deliver: Callable[[Envelope], Awaitable[str]] = StoreAndForward(
        publisher, spool, metrics
    ).deliver

    ingest = Ingest(
        authenticator=TokenAuthenticator(settings.auth.tokens),
        router=router,
        dedup=dedup,
        deliver=deliver,
        metrics=metrics,
        max_body_bytes=settings.http.max_body_bytes,
        key_fields=settings.dedup.key_fields,
    )

    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[HEALTH] = health
    app[PUBLISHER] = publisher
    app[DEDUP] = dedup
    app[INGEST] = ingest
    app[SPOOL] = spool
    app[FORWARDER] = forwarder

    app.router.add_post(settings.http.events_path, ingest.events)
    app.router.add_post(settings.http.errors_path, ingest.errors)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics_handler)

    def broker_check() -> str | None:
        if not publisher.connected.is_set():
            reason = f"broker link down: {publisher.last_error or 'connecting'}"
        elif publisher.blocked:
            reason = "the broker blocked the connection (memory or disk alarm)"
        else:
            return None
        return f"{reason}; events are spooled" if spool.opened.is_set() else reason

    health.add_check("broker", broker_check, degrades=True)
    health.add_check("spool", spool.readiness)
    health.add_detail("spool", spool.status)
    health.add_detail("broker", publisher.status)
    health.add_detail(
        "dedup",
        lambda: {
            "backend": "memory",
            "entries": len(dedup),
            "in_flight": dedup.in_flight,
            "evictions": dedup.evictions,
            "ttl_seconds": dedup.ttl,
            "max_entries": dedup.max_entries,
        },
    )
    health.add_detail("last_retm_error", lambda: ingest.last_retm_error)
    metrics.gauge_callback(
        "relay_dedup_entries", "Delivered keys in the dedup cache.", lambda: len(dedup)
    )
    metrics.counter_callback(
        "relay_dedup_evictions",
        "Delivered keys evicted before their TTL (max_entries reached).",
        lambda: dedup.evictions,
    )

    _spool_metrics(metrics, spool, forwarder)
    app.cleanup_ctx.append(_broker_link)
    app.cleanup_ctx.append(_spool)
    return app


def _spool_metrics(metrics: Metrics, spool: Spool, forwarder: Forwarder) -> None:
    metrics.gauge_callback("relay_spool_events", "Events in the spool.", lambda: spool.depth)
    metrics.gauge_callback(
        "relay_spool_bytes",
        "Bytes in the spool (counted as spool.max_bytes counts).",
        lambda: spool.bytes,
    )
    metrics.gauge_callback(
        "relay_spool_oldest_age_seconds",
        "Age of the oldest spooled event (0 when the spool is empty).",
        spool.oldest_age,
    )
    metrics.gauge_callback(
        "relay_spool_full",
        "1 while the spool is full and webhooks answer 503.",
        lambda: 1 if spool.full else 0,
    )
    metrics.counter_callback(
        "relay_spool_forwarded",
        "Spooled events published and confirmed by the forwarder.",
        lambda: forwarder.forwarded,
    )
    metrics.counter_callback(
        "relay_spool_redelivered",
        "Forwarded events whose earlier publish had been left unconfirmed by a lost link: "
        "each may reach consumers twice, with the same message_id.",
        lambda: forwarder.redelivered,
    )
    metrics.counter_callback(
        "relay_spool_late_confirms",
        "Spooled events deleted unforwarded because their timed-out publish was confirmed.",
        lambda: spool.late_confirms,
    )


async def _broker_link(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start(wait=BROKER_START_WAIT)
    yield
    await publisher.close()


async def _spool(app: web.Application) -> AsyncIterator[None]:
    """Open the spool (restoring persisted dedup keys) and forward from it; on the way out,
    let the forwarder finish its round, then close the file. Spooled events stay for the next
    start."""
    spool, forwarder = app[SPOOL], app[FORWARDER]
    keys = await spool.open()
    app[DEDUP].restore(keys)
    forwarder.start()
    try:
        yield
    finally:
        await forwarder.stop()
        await spool.close()
