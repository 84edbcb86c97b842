"""The application factory: routes, middlewares, and one cleanup context per resource.

``make_app(settings)`` wires the stages together. Resources are acquired in dependency order in
``cleanup_ctx`` and released in reverse after the HTTP handlers in flight have finished: the
broker link is acquired first and released last.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import hdrs, web

from relay.access import Access
from relay.auth import TokenAuthenticator
from relay.dedup import DedupStore, MemoryDedupStore
from relay.dedup_redis import RedisDedupStore, connect, redis_address
from relay.health import Health
from relay.ingest import Ingest, error_response
from relay.metrics import Metrics
from relay.publish import Envelope, Publisher
from relay.routing import Router
from relay.settings import Settings
from relay.status import StatusPage
from relay.workers import WorkerInfo

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
PUBLISHER = web.AppKey("publisher", Publisher)
DEDUP = web.AppKey("dedup", MemoryDedupStore)
INGEST = web.AppKey("ingest", Ingest)
#: the shared store when ``dedup.backend = "redis"`` (absent otherwise); DEDUP is then its
#: local fallback
REDIS_DEDUP = web.AppKey("redis_dedup", RedisDedupStore)
#: this process's place among ``http.workers`` (None when the relay runs as one process); name
#: local state that must not be shared with ``relay.workers.state_name(worker, "spool", ".db")``
WORKER: web.AppKey[WorkerInfo | None] = web.AppKey("worker")
ACCESS = web.AppKey("access", Access)


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
    worker: WorkerInfo | None = None,
) -> web.Application:
    """Build the relay's aiohttp application from ``settings``.

    clock: wall-clock seconds for the dedup TTL (injectable for tests).
    worker: this process's place among ``http.workers`` (None: the relay is one process).
    The broker link is opened by the app's start-up (``AppRunner.setup``), which raises
    TopologyError when the broker's exchanges disagree with the settings.
    """
    metrics = Metrics()
    health = Health(metrics)
    router = Router(
        settings.amqp.routing_key_template, settings.amqp.exchange, settings.amqp.exchanges
    )
    publisher = Publisher(settings.amqp, router, metrics)
    dedup = MemoryDedupStore(
        settings.dedup.ttl,
        settings.dedup.max_entries,
        clock=clock,
        wait_timeout=settings.amqp.publish_timeout + 1,
    )
    store: DedupStore = dedup
    redis_dedup: RedisDedupStore | None = None
    if settings.dedup.backend == "redis":
        store = redis_dedup = RedisDedupStore(
            connect(settings.dedup.redis_url.value, settings.dedup.redis_timeout),
            dedup,
            ttl=settings.dedup.ttl,
            # outlives the slowest delivery, so a claim lapses only when its owner is gone
            lease=settings.amqp.publish_timeout + 2,
            wait_timeout=settings.amqp.publish_timeout + 1,
            prefix=settings.dedup.redis_prefix,
            on_store_failure=settings.dedup.on_store_failure,
            address=redis_address(settings.dedup.redis_url.value),
        )

    async def deliver(envelope: Envelope) -> str:
        await publisher.publish(envelope)
        return "accepted"

    ingest = Ingest(
        authenticator=TokenAuthenticator(settings.auth.tokens),
        router=router,
        dedup=store,
        deliver=deliver,
        metrics=metrics,
        max_body_bytes=settings.http.max_body_bytes,
        key_fields=settings.dedup.key_fields,
    )

    access = Access(settings.http, metrics)
    middlewares = [access.middleware, json_errors] if access.active else [json_errors]
    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[HEALTH] = health
    app[PUBLISHER] = publisher
    app[DEDUP] = dedup
    app[INGEST] = ingest
    app[WORKER] = worker
    app[ACCESS] = access

    app.router.add_post(
        settings.http.events_path,
        ingest.events,
        expect_handler=access.expect_handler(ingest.authenticator, "events"),
    )
    app.router.add_post(
        settings.http.errors_path,
        ingest.errors,
        expect_handler=access.expect_handler(ingest.authenticator, "errors"),
    )
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics_handler)
    app.router.add_get("/", StatusPage().handler)

    health.add_check(
        "broker",
        lambda: (
            None
            if publisher.connected.is_set()
            else f"broker link down: {publisher.last_error or 'connecting'}"
        ),
    )
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
    if worker is not None:
        health.add_detail("worker", worker.status)
    metrics.gauge_callback(
        "relay_ready",
        "1 when every readiness check passes (as /readyz).",
        lambda: float(health.readiness()[0]),
    )
    metrics.labelled_gauge_callback(
        "relay_ready_check",
        "Readiness checks: 1 passing, 0 failing (the reason is in /readyz).",
        "check",
        lambda: {name: float(reason == "ok") for name, reason in health.readiness()[1].items()},
    )
    metrics.gauge_callback(
        "relay_dedup_entries", "Delivered keys in the dedup cache.", lambda: len(dedup)
    )
    metrics.counter_callback(
        "relay_dedup_evictions",
        "Delivered keys evicted before their TTL (max_entries reached).",
        lambda: dedup.evictions,
    )

    app.cleanup_ctx.append(_broker_link)
    if redis_dedup is not None:
        app[REDIS_DEDUP] = redis_dedup
        _watch_redis(health, metrics, redis_dedup)
        app.cleanup_ctx.append(_redis_link)
    return app


def _watch_redis(health: Health, metrics: Metrics, store: RedisDedupStore) -> None:
    """Readiness, the ``/health`` dedup section and the metrics of the Redis dedup store."""
    health.add_check("dedup", store.readiness)
    health.add_detail("dedup", store.status)
    metrics.gauge_callback(
        "relay_dedup_store_up",
        "1 while the shared dedup store (Redis) answers, else 0.",
        lambda: 1 if store.up else 0,
    )
    metrics.counter_callback(
        "relay_dedup_store_failures",
        "Dedup store commands that failed because Redis could not be reached.",
        lambda: store.failures,
    )
    metrics.counter_callback(
        "relay_dedup_local_fallbacks",
        "Dedup claims answered by this process's memory store while Redis was down "
        "(dedup.on_store_failure = local).",
        lambda: store.local_fallbacks,
    )


async def _broker_link(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.close()


async def _redis_link(app: web.Application) -> AsyncIterator[None]:
    store = app[REDIS_DEDUP]
    await store.start()
    yield
    await store.close()
