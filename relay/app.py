"""The application factory: routes, middlewares, and one cleanup context per resource.

``make_app(settings)`` wires the stages together. Resources are acquired in dependency order in
``cleanup_ctx`` and released in reverse after the HTTP handlers in flight have finished: the
broker link is acquired first and released last.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from relay.auth import TokenAuthenticator
from relay.dedup import MemoryDedupStore
from relay.health import Health
from relay.ingest import Deliver, Ingest, error_response
from relay.install import InstallFlow, Outbox
from relay.loyalty import Loyalty, MemoryReplyCache, RedisReplyCache, ReplyCache
from relay.metrics import Metrics
from relay.publish import Envelope, Publisher
from relay.routing import Router
from relay.rpc import RpcLink
from relay.settings import Settings
from relay.tokens import TokenRegistry, open_store

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
PUBLISHER = web.AppKey("publisher", Publisher)
DEDUP = web.AppKey("dedup", MemoryDedupStore)
INGEST = web.AppKey("ingest", Ingest)
TOKENS = web.AppKey("tokens", TokenRegistry)
INSTALL = web.AppKey("install", InstallFlow)
LOYALTY = web.AppKey("loyalty", Loyalty)


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


def make_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    """Build the relay's aiohttp application from ``settings``.

    clock: wall-clock seconds for the dedup TTL (injectable for tests).
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

    async def deliver(envelope: Envelope) -> str:
        await publisher.publish(envelope)
        return "accepted"

    ingest = Ingest(
        authenticator=TokenAuthenticator(settings.auth.tokens, clock=clock),
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

    app.router.add_post(settings.http.events_path, ingest.events)
    app.router.add_post(settings.http.errors_path, ingest.errors)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics_handler)

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
    metrics.gauge_callback(
        "relay_dedup_entries", "Delivered keys in the dedup cache.", lambda: len(dedup)
    )
    metrics.counter_callback(
        "relay_dedup_evictions",
        "Delivered keys evicted before their TTL (max_entries reached).",
        lambda: dedup.evictions,
    )

    app.cleanup_ctx.append(_broker_link)
    _add_flows(app, deliver, clock)
    return app


async def _broker_link(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.close()


def _add_flows(app: web.Application, deliver: Deliver, clock: Callable[[], float]) -> None:
    """RETM's own flows: the token registry (always), the install route (``install.enabled``)
    and the loyalty RPC routes (``loyalty.enabled``), with their resources after the broker's."""
    settings, metrics, health, ingest = app[SETTINGS], app[METRICS], app[HEALTH], app[INGEST]
    registry = TokenRegistry(
        open_store(
            settings.install.store,
            settings.state.dir,
            settings.dedup.redis_url.value,
            settings.install.redis_key,
        ),
        ingest.authenticator,
        clock=clock,
    )
    app[TOKENS] = registry
    health.add_check(
        "tokens",
        lambda: (
            None
            if registry.loaded.is_set()
            else f"token registry not loaded: {registry.last_error or 'loading'}"
        ),
    )
    health.add_detail("tokens", registry.status)
    metrics.gauge_callback(
        "relay_registry_tokens", "Tokens in the per-merchant registry.", lambda: len(registry)
    )
    app.cleanup_ctx.append(_token_registry)

    if settings.loyalty.enabled:
        link = RpcLink(settings.amqp, metrics)
        cache: ReplyCache = (
            RedisReplyCache(
                settings.dedup.redis_url.value, settings.loyalty.redis_key, settings.dedup.ttl
            )
            if settings.dedup.backend == "redis"
            else MemoryReplyCache(settings.dedup.ttl, settings.loyalty.cache_max_entries, clock)
        )
        loyalty = Loyalty(
            settings=settings.loyalty,
            link=link,
            ingest=ingest,
            cache=cache,
            metrics=metrics,
            key_fields=settings.dedup.key_fields,
        )
        app[LOYALTY] = loyalty
        app.router.add_post(settings.loyalty.check_reward_path, loyalty.check_reward)
        app.router.add_post(settings.loyalty.redeem_reward_path, loyalty.redeem_reward)
        # Reported, not a readiness check: while the RPC link is down the loyalty hooks still
        # answer (the fallback, at once), and readiness gates the events too.
        health.add_detail("loyalty_rpc", link.status)
        metrics.gauge_callback(
            "relay_loyalty_rpc_connected",
            "1 while the loyalty RPC link (with its reply consumer) is up.",
            lambda: 1 if link.connected.is_set() else 0,
        )
        app.cleanup_ctx.append(_rpc_link)

    if settings.install.enabled:
        outbox = Outbox(settings.state.dir)
        flow = InstallFlow(
            settings=settings.install,
            registry=registry,
            outbox=outbox,
            deliver=deliver,
            router=ingest.router,
            metrics=metrics,
            key_fields=settings.dedup.key_fields,
            max_body_bytes=settings.http.max_body_bytes,
            clock=clock,
        )
        app[INSTALL] = flow
        app.router.add_post(settings.install.path, flow.handle)
        health.add_detail("install", lambda: {"outbox_pending": outbox.pending})
        metrics.gauge_callback(
            "relay_install_outbox_pending",
            "app.installed events stored but not yet published.",
            lambda: outbox.pending,
        )
        app.cleanup_ctx.append(_install_outbox)


async def _token_registry(app: web.Application) -> AsyncIterator[None]:
    registry = app[TOKENS]
    await registry.start()
    yield
    await registry.close()


async def _rpc_link(app: web.Application) -> AsyncIterator[None]:
    loyalty = app[LOYALTY]
    await loyalty.link.start()
    yield
    await loyalty.link.close()
    await loyalty.cache.close()


async def _install_outbox(app: web.Application) -> AsyncIterator[None]:
    flow = app[INSTALL]
    settings = app[SETTINGS].install
    if settings.path == "/retm/install" and not settings.require_data:
        structlog.get_logger("relay.install").warning(
            "install.unprotected",
            detail="install.enabled with the default path and no require_data: anyone who "
            "reaches the relay can mint a token; set an unguessable install.path",
        )
    await flow.start()
    yield
    await flow.close()
