"""The application factory: routes, middlewares, and one cleanup context per resource.

``make_app(settings)`` wires the stages together. Resources are acquired in dependency order in
``cleanup_ctx`` and released in reverse after the HTTP handlers in flight have finished: the
broker link is acquired first and released last.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import HttpVersion10, HttpVersion11, hdrs, web

from relay.amqp.archive import ArchiveWatch
from relay.amqp.publish import Envelope, Publisher
from relay.amqp.rpc import RpcLink
from relay.dedup.memory import DedupStore, MemoryDedupStore
from relay.dedup.redis import RedisDedupStore, connect, redis_address
from relay.http.access import Access
from relay.http.auth import TokenAuthenticator
from relay.http.contract import Contract
from relay.http.health import Health
from relay.http.limits import BodyBudget, ConnectionGuard, edge_limits
from relay.http.status import StatusPage
from relay.ingest import Ingest, error_response
from relay.logs import count_bad_requests
from relay.metrics import Metrics
from relay.retm.install import InstallFlow
from relay.retm.loyalty import Loyalty, MemoryReplyCache, RedisReplyCache, ReplyCache
from relay.retm.tokens import TokenRegistry, open_store
from relay.routing import Router
from relay.settings import Settings
from relay.spool.forward import Forwarder, StoreAndForward
from relay.spool.store import Spool
from relay.workers import WorkerInfo, state_name

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
SPOOL = web.AppKey("spool", Spool)
FORWARDER = web.AppKey("forwarder", Forwarder)
#: what /health shows about the archive (absent when ``archive.enabled`` is false)
ARCHIVE = web.AppKey("archive", ArchiveWatch)
#: tokens shorter than this are accepted but logged at start-up (``auth.short_tokens``)
MIN_TOKEN_CHARS = 16
#: seconds the start waits for the broker's first answer (a topology mismatch then stops the
#: start); a broker still silent after that no longer holds it up: events are spooled
BROKER_START_WAIT = 1.0
TOKENS = web.AppKey("tokens", TokenRegistry)
INSTALL = web.AppKey("install", InstallFlow)
LOYALTY = web.AppKey("loyalty", Loyalty)
#: slow and idle clients, the connection cap (relay.http.limits); the service's site uses it
GUARD = web.AppKey("guard", ConnectionGuard)
BUDGET = web.AppKey("budget", BodyBudget)


#: the HTTP versions the relay speaks; any other request line gets 505
HTTP_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


@web.middleware
async def http_version(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer a request line of another version than HTTP/1.0 or 1.1 (``HTTP/2.0``, which
    aiohttp's parser lets through) with 505 and close, before any route sees it. The answer's
    status line says HTTP/1.1, whatever the request claimed."""
    if request.version in HTTP_VERSIONS:
        return await handler(request)
    response = error_response(
        505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are supported"
    )
    response.force_close()
    await response.prepare(cast(web.BaseRequest, _AsHttp11(request)))
    return response


class _AsHttp11:
    """``request`` as seen by ``StreamResponse.prepare``, claiming HTTP/1.1: the status line
    of an answer takes the request's version, and ``BaseRequest.clone`` cannot change it."""

    version = HttpVersion11

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _middlewares(
    access: Access, guard: ConnectionGuard, budget: BodyBudget
) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The middlewares, outermost first: the HTTP version, the connection guard (slow and idle
    clients), access control (when configured), the body budget, then JSON error answers."""
    middlewares = [http_version, guard.middleware]
    if access.active:
        middlewares.append(access.middleware)
    return [*middlewares, budget.middleware, json_errors]


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer the router's own errors (404, 405 ...) with the contract's JSON error body,
    which never repeats the request's path or method (a token can hide in a path)."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(404, "not_found", "no such route")  # never the path: no echo
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            "method_not_allowed",
            f"this method is not allowed here; use {allowed}",
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
    worker: this process's place among ``http.workers`` (None: the relay is one process); each
    worker has a spool of its own in ``state.dir`` (``spool-<index>.db``).
    The broker link is opened by the app's start-up (``AppRunner.setup``), which raises
    TopologyError when the broker's exchanges disagree with the settings; the spool is opened
    next (SpoolError when another process holds it).
    """
    metrics = Metrics()
    count_bad_requests(lambda: metrics.rejected("bad_http"))
    health = Health(metrics)
    router = Router(
        settings.amqp.routing_key_template, settings.amqp.exchange, settings.amqp.exchanges
    )
    publisher = Publisher(settings.amqp, router, metrics, settings.archive)
    spool_path = Path(settings.spool.file)
    spool = Spool(
        settings.state.dir / state_name(worker, spool_path.stem, spool_path.suffix),
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
    redis_dedup = _redis_store(settings, dedup)
    store: DedupStore = dedup if redis_dedup is None else redis_dedup  # (a store has __len__)

    forwarder = Forwarder(spool, publisher, grace=settings.amqp.publish_timeout + 1)
    deliver: Callable[[Envelope], Awaitable[str]] = StoreAndForward(
        publisher, spool, metrics
    ).deliver

    ingest = Ingest(
        authenticator=TokenAuthenticator(settings.auth.tokens, clock=clock),
        router=router,
        dedup=store,
        deliver=deliver,
        metrics=metrics,
        max_body_bytes=settings.http.max_body_bytes,
        key_fields=settings.dedup.key_fields,
        hash_ttl=min(settings.dedup.hash_ttl, settings.dedup.ttl),
        rejected_exchange=settings.amqp.rejected_exchange,
    )

    short = sum(len(spec.token.value) < MIN_TOKEN_CHARS for spec in settings.auth.tokens)
    if short:  # the token is the only protection of a webhook (RETM signs nothing)
        structlog.get_logger("relay.auth").warning(
            "auth.short_tokens", count=short, minimum=MIN_TOKEN_CHARS
        )
    access = Access(settings.http, metrics)
    guard, budget = edge_limits(settings.http, metrics)
    app = web.Application(
        client_max_size=settings.http.max_body_bytes,
        middlewares=_middlewares(access, guard, budget),
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[HEALTH] = health
    app[PUBLISHER] = publisher
    app[DEDUP] = dedup
    app[INGEST] = ingest
    app[WORKER] = worker
    app[ACCESS] = access
    app[SPOOL] = spool
    app[FORWARDER] = forwarder
    app[GUARD] = guard
    app[BUDGET] = budget

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
    app.router.add_get("/", StatusPage(health.details).handler)
    app.router.add_get("/asyncapi.yaml", Contract().handler)

    _watch_core(app)
    _spool_metrics(metrics, spool, forwarder)
    app.cleanup_ctx.append(_broker_link)
    _watch_archive(app)
    app.cleanup_ctx.append(_spool)
    if redis_dedup is not None:
        app[REDIS_DEDUP] = redis_dedup
        _watch_redis(health, metrics, redis_dedup)
        app.cleanup_ctx.append(_redis_link)
    _add_flows(app, clock)
    return app


def _redis_store(settings: Settings, local: MemoryDedupStore) -> RedisDedupStore | None:
    """The shared Redis dedup store when ``dedup.backend = "redis"``, with ``local`` as its
    fallback; None for the memory backend."""
    if settings.dedup.backend != "redis":
        return None
    return RedisDedupStore(
        connect(settings.dedup.redis_url.value, settings.dedup.redis_timeout),
        local,
        ttl=settings.dedup.ttl,
        # outlives the slowest delivery, so a claim lapses only when its owner is gone
        lease=settings.amqp.publish_timeout + 2,
        wait_timeout=settings.amqp.publish_timeout + 1,
        prefix=settings.dedup.redis_prefix,
        on_store_failure=settings.dedup.on_store_failure,
        address=redis_address(settings.dedup.redis_url.value),
    )


def _watch_core(app: web.Application) -> None:
    """Readiness checks, ``/health`` sections and scrape-time metrics of the broker link, the
    spool and the memory dedup store."""
    health, metrics = app[HEALTH], app[METRICS]
    publisher, spool, dedup, ingest = app[PUBLISHER], app[SPOOL], app[DEDUP], app[INGEST]

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
    metrics.counter_callback(
        "relay_broker_failovers",
        "Broker links that came up on another node of amqp.url than the link before them.",
        lambda: publisher.failovers,
    )
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
    health.add_detail("quarantine", ingest.quarantine_status)
    worker = app[WORKER]
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
        "Forwarded events whose earlier publish had been left unconfirmed, by a lost link or "
        "by a stop or crash of the relay (forwarded again after the restart): each may reach "
        "consumers twice, with the same message_id.",
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


def _watch_archive(app: web.Application) -> None:
    """The ``archive`` section of ``/health``: retention, and the oldest and newest archived
    receive times, looked up on the broker link every 30 s (relay/amqp/archive.py)."""
    settings, publisher = app[SETTINGS].archive, app[PUBLISHER]
    if not settings.enabled:
        app[HEALTH].add_detail("archive", lambda: {"enabled": False})
        return
    watch = app[ARCHIVE] = ArchiveWatch(
        settings,
        publisher.open_channel,
        lambda: publisher.last_archived_at,
        publisher.connected,
    )
    app[HEALTH].add_detail("archive", watch.status)

    async def run(_: web.Application) -> AsyncIterator[None]:
        watch.start()
        yield
        await watch.stop()

    app.cleanup_ctx.append(run)


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


async def _redis_link(app: web.Application) -> AsyncIterator[None]:
    store = app[REDIS_DEDUP]
    await store.start()
    yield
    await store.close()


def _add_flows(app: web.Application, clock: Callable[[], float]) -> None:
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
        configured=len(settings.auth.tokens),
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
        metrics.counter_callback(
            "relay_loyalty_rpc_failovers",
            "Loyalty RPC links that came up on another node of amqp.url than the one before.",
            lambda: link.failovers,
        )
        app.cleanup_ctx.append(_rpc_link)

    if settings.install.enabled:
        flow = InstallFlow(
            settings=settings.install,
            registry=registry,
            spool=app[SPOOL],
            router=ingest.router,
            metrics=metrics,
            key_fields=settings.dedup.key_fields,
            max_body_bytes=settings.http.max_body_bytes,
            clock=clock,
        )
        app[INSTALL] = flow
        app.router.add_post(settings.install.path, flow.handle)


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
