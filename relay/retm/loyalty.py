"""RETM's synchronous loyalty hooks, answered by a RabbitMQ RPC responder.

Check Reward and Redeem Reward (docs/retm.md, "Check Reward", "Redeem Reward") come from a cashier's
POS, which waits for the answer: a 2xx with the discount, or a 400 with ``message`` and ``errors``.
The relay cannot simply enqueue them. It publishes each request to the event exchange with routing
key ``loyalty.check_reward`` or ``loyalty.redeem_reward`` (through the key template, so
``{business}`` works here too), ``reply_to`` = RabbitMQ's direct reply-to pseudo-queue, a fresh
``correlation_id`` and an ``expiration`` equal to the deadline, and answers RETM with the reply's
body and the HTTP status in its ``x-http-status`` header (default 200).

Without an answer, the POS gets ``loyalty.fallback_status``/``fallback_body`` (by default RETM's
"invalid reward" shape) and the response header ``x-relay-fallback`` says why: ``no_responder``
(the publish was returned: no queue is bound, detected at once through ``mandatory``),
``timeout`` (no reply within ``loyalty.timeout``), ``disconnected`` (no broker link) or
``bad_reply`` (a reply that is not JSON, or a status outside 200-599). A reply that arrives after
its deadline is discarded and counted; it can never answer another request, since replies are
matched by correlation id only.

Redeem Reward changes state in the loyalty system, so RETM's retries of one redeem (same dedup
key) get the first reply again from a cache kept for ``dedup.ttl``, and concurrent copies wait
for the first; the responder sees one request. Check Reward is a query and is never cached.

The RPC link itself (direct reply-to, correlation ids, reconnection) is ``relay.rpc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web

from relay.amqp.rpc import NoAnswer, Reply, RpcLink
from relay.dedup.memory import dedup_key
from relay.dedup.redis import STORE_ERRORS, connect
from relay.ingest import (
    MISMATCH_HEADER,
    Ingest,
    Rejection,
    contract_headers,
    error_response,
    merchant,
)
from relay.metrics import Metrics
from relay.routing import LOYALTY_CHECK_REWARD, LOYALTY_REDEEM_REWARD, Route
from relay.settings import LoyaltySettings

REDIS_TIMEOUT = 0.5  # seconds: the cashier is waiting

log = structlog.get_logger("relay.loyalty")

FALLBACK_HEADER = "x-relay-fallback"


class ReplyCache(Protocol):
    """Where redeem answers are kept by dedup key for the TTL: memory, or Redis (shared by
    every relay instance, so a retry that reaches another instance gets the same answer)."""

    async def get(self, key: str) -> Reply | None:
        """The cached reply for ``key``, if any and not expired."""
        ...

    async def put(self, key: str, reply: Reply) -> None:
        """Remember ``reply`` for ``key``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryReplyCache:
    """Redeem answers in memory for ``ttl`` seconds, at most ``max_entries`` (the oldest go
    first). clock: wall-clock seconds."""

    def __init__(
        self, ttl: float, max_entries: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Reply]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Reply | None:
        """The cached reply for ``key``, if any and not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    async def put(self, key: str, reply: Reply) -> None:
        """Remember ``reply`` for ``key``."""
        self._entries[key] = (self._clock() + self.ttl, reply)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        """Nothing to release."""


class RedisReplyCache:
    """Redeem answers in Redis under ``<prefix>:<dedup key>`` with a TTL (``PX``); the value
    is the status, a newline, and the body. A Redis failure is logged and treated as a miss
    (the responder, which gets the dedup key as message_id, is the last line of defence)."""

    def __init__(self, url: str, prefix: str, ttl: float) -> None:
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self._redis = connect(url, REDIS_TIMEOUT)
        self._errors = STORE_ERRORS

    async def get(self, key: str) -> Reply | None:
        """The cached reply for ``key``, or None (also when Redis fails)."""
        try:
            value = await self._redis.get(f"{self.prefix}:{key}")
        except self._errors as exc:
            log.warning("loyalty.cache_unavailable", error=str(exc))
            return None
        if not value:
            return None
        raw = value.encode() if isinstance(value, str) else value
        status, _, body = raw.partition(b"\n")
        return Reply(int(status), body)

    async def put(self, key: str, reply: Reply) -> None:
        """Remember ``reply`` for ``key`` for the TTL (a Redis failure is logged)."""
        value = b"%d\n%b" % (reply.status, reply.body)
        try:
            await self._redis.set(f"{self.prefix}:{key}", value, px=self.ttl_ms)
        except self._errors as exc:
            log.warning("loyalty.cache_unavailable", error=str(exc))

    async def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()


class Loyalty:
    """The two loyalty routes.

    settings: ``loyalty.*``. link: the RPC link. ingest: authenticates and reads requests like
    any webhook. cache: redeem answers. key_fields: ``dedup.key_fields``.
    """

    def __init__(
        self,
        *,
        settings: LoyaltySettings,
        link: RpcLink,
        ingest: Ingest,
        cache: ReplyCache,
        metrics: Metrics,
        key_fields: tuple[str, ...],
    ) -> None:
        self.settings = settings
        self.link = link
        self.ingest = ingest
        self.cache = cache
        self.metrics = metrics
        self.key_fields = key_fields
        self.fallback = Reply(settings.fallback_status, settings.fallback_body.encode())
        self._in_flight: dict[str, asyncio.Future[tuple[Reply, str]]] = {}
        self.waiting = 0  # redeem copies waiting for their first request's answer

    async def check_reward(self, request: web.Request) -> web.StreamResponse:
        """``POST /retm/loyalty/check-reward``: the responder's answer (never cached)."""
        return await self._handle(request, LOYALTY_CHECK_REWARD, dedup=False)

    async def redeem_reward(self, request: web.Request) -> web.StreamResponse:
        """``POST /retm/loyalty/redeem-reward``: the responder's answer; RETM's retries get the
        first answer again."""
        return await self._handle(request, LOYALTY_REDEEM_REWARD, dedup=True)

    async def _handle(self, request: web.Request, event: str, *, dedup: bool) -> web.Response:
        hook_name = event.partition(".")[2]
        try:
            hook = await self.ingest.read_webhook(request)
        except Rejection as rej:
            self.metrics.loyalty(hook_name, "rejected")
            self.metrics.rejected(rej.code)
            log.warning(
                "loyalty.rejected",
                hook=hook_name,
                status=rej.status,
                reason=rej.code,
                detail=rej.detail,
                remote=request.remote,
            )
            return error_response(rej.status, rej.code, rej.detail, rej.headers)
        body = hook.body
        business, mismatch = merchant(hook.principal, body)
        route = self.ingest.router.route(event, business, body.get("branch_id"))
        headers = contract_headers(event, business, body, hook.received_at)
        if mismatch is not None:
            headers[MISMATCH_HEADER] = mismatch
            self.metrics.business_mismatch()
            log.warning("webhook.business_mismatch", business=business, body_business=mismatch)
        request_ = _Request(
            hook_name,
            event,
            hook.raw,
            route,
            headers,
            hook.received_at,
            dedup_key(hook.principal.id, event, body, hook.raw, self.key_fields),
        )
        if not dedup:
            return _response(*await self._ask(request_, message_id=None))
        return await self._redeem(request_)

    async def _redeem(self, req: _Request) -> web.Response:
        """Answer from the cache, or as a concurrent copy's first request is answered, or ask."""
        cached = await self.cache.get(req.key)
        if cached is not None:
            self.metrics.loyalty(req.hook_name, "cached")
            log.info("loyalty.duplicate", hook=req.hook_name, key=req.key, status=cached.status)
            return _response(cached, "")
        first = self._in_flight.get(req.key)
        if first is not None:
            self.waiting += 1
            try:
                reply, reason = await asyncio.shield(first)
            finally:
                self.waiting -= 1
            self.metrics.loyalty(req.hook_name, "cached")
            return _response(reply, reason)
        future: asyncio.Future[tuple[Reply, str]] = asyncio.get_running_loop().create_future()
        self._in_flight[req.key] = future
        try:
            reply, reason = await self._ask(req, message_id=req.key)
            if not reason:  # a responder's answer; after a fallback the retry asks again
                await self.cache.put(req.key, reply)
            future.set_result((reply, reason))
        finally:
            del self._in_flight[req.key]
            if not future.done():
                future.set_result((self.fallback, "cancelled"))
        return _response(reply, reason)

    async def _ask(self, req: _Request, *, message_id: str | None) -> tuple[Reply, str]:
        """The responder's reply and ``""``, or the fallback and the reason."""
        started = time.perf_counter()
        try:
            reply = await self.link.call(
                req.raw,
                req.route,
                event=req.event,
                message_id=message_id,
                headers=req.headers,
                received_at=req.received_at,
                timeout=self.settings.timeout,
            )
        except NoAnswer as exc:
            self.metrics.loyalty(req.hook_name, f"fallback_{exc.reason}")
            log.warning(
                "loyalty.fallback",
                hook=req.hook_name,
                reason=exc.reason,
                detail=str(exc),
                key=req.key,
                routing_key=req.route.routing_key,
            )
            return self.fallback, exc.reason
        elapsed = time.perf_counter() - started
        self.metrics.loyalty(req.hook_name, "answered", elapsed)
        log.info(
            "loyalty.answered",
            hook=req.hook_name,
            status=reply.status,
            key=req.key,
            routing_key=req.route.routing_key,
            latency_ms=round(elapsed * 1000, 2),
        )
        return reply, ""


@dataclass(frozen=True, slots=True)
class _Request:
    hook_name: str
    event: str
    raw: bytes
    route: Route
    headers: dict[str, Any]
    received_at: float
    key: str


def _response(reply: Reply, fallback_reason: str) -> web.Response:
    headers = {FALLBACK_HEADER: fallback_reason} if fallback_reason else None
    return web.Response(
        status=reply.status, body=reply.body, content_type="application/json", headers=headers
    )
