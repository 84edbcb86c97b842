"""RETM's synchronous loyalty hooks, answered by a RabbitMQ RPC responder.

Check Reward and Redeem Reward (retm/webhooks.md §3.5, §3.6) come from a cashier's POS, which
waits for the answer: a 2xx with the discount, or a 400 with ``message`` and ``errors``. The
relay cannot simply enqueue them. It publishes each request to the event exchange with routing
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

The RPC link is its own connection, separate from the publisher's: direct reply-to needs a no-ack
consumer on the very channel that publishes the requests. It is supervised like the publisher's
link (fail fast while down, reconnect with backoff, consumer re-created on each new channel); a
request in flight when the link drops gets the fallback at once, since its reply could only come
to the old channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aio_pika
import aiormq
import aiormq.abc
import orjson
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiohttp import web
from aiormq.exceptions import AMQPError, DeliveryError, PublishError
from pamqp import commands as spec

from relay import __version__
from relay.dedup import dedup_key
from relay.ingest import (
    MISMATCH_HEADER,
    Ingest,
    Rejection,
    contract_headers,
    error_response,
    merchant,
)
from relay.metrics import Metrics
from relay.publish import APP_ID, CONTENT_TYPE, broker_address
from relay.routing import LOYALTY_CHECK_REWARD, LOYALTY_REDEEM_REWARD, Route
from relay.settings import AmqpSettings, LoyaltySettings

log = structlog.get_logger("relay.loyalty")

REPLY_TO = "amq.rabbitmq.reply-to"
STATUS_HEADER = "x-http-status"
FALLBACK_HEADER = "x-relay-fallback"
TRANSIENT = 1
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0


class NoAnswer(Exception):
    """No usable reply: ``reason`` is ``no_responder``, ``timeout``, ``disconnected``,
    ``nacked`` or ``bad_reply``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer for RETM: HTTP ``status`` and JSON ``body`` bytes."""

    status: int
    body: bytes


def parse_reply(message: aiormq.abc.DeliveredMessage) -> Reply:
    """The Reply a responder sent: its body (which must be JSON) and the HTTP status in its
    ``x-http-status`` header (an integer or digits, 200-599; 200 when absent).
    Raises NoAnswer("bad_reply")."""
    headers = message.header.properties.headers or {}
    raw_status = headers.get(STATUS_HEADER, 200)
    if isinstance(raw_status, bytes | bytearray):
        raw_status = raw_status.decode("ascii", "replace")
    if isinstance(raw_status, str) and raw_status.strip().isdigit():
        raw_status = int(raw_status)
    if not isinstance(raw_status, int) or isinstance(raw_status, bool):
        raise NoAnswer("bad_reply", f"{STATUS_HEADER} is not a number")
    status = raw_status
    if not 200 <= status <= 599:
        raise NoAnswer("bad_reply", f"{STATUS_HEADER} {status} is not in 200-599")
    body = bytes(message.body)
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NoAnswer("bad_reply", "the reply body is not JSON") from None
    return Reply(status, body)


@dataclass(slots=True)
class _Link:
    connection: aio_pika.abc.AbstractConnection
    underlay: aiormq.abc.AbstractChannel
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""


class RpcLink:
    """The RPC connection: publishes requests (confirmed, mandatory) and receives replies.

    settings: ``amqp.*`` (URL, timeouts, heartbeat). metrics: counts late replies.
    ``connected`` is set while the channel and its reply consumer are up.
    """

    def __init__(self, settings: AmqpSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.connected = asyncio.Event()
        self.address = broker_address(settings.url.value)
        self.last_error = ""
        self.late_replies = 0
        self._url = aio_pika.connection.make_url(settings.url.value)
        if "heartbeat" not in self._url.query:
            self._url = self._url.update_query(heartbeat=str(settings.heartbeat))
        self._link: _Link | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Future[None] | None = None

    def status(self) -> dict[str, Any]:
        """Link state for ``/health``."""
        return {
            "connected": self.connected.is_set(),
            "address": self.address,
            "in_flight": len(self._pending),
            "late_replies": self.late_replies,
            "last_error": self.last_error or None,
        }

    async def start(self) -> None:
        """Start the link; returns after the first connection attempt, successful or not."""
        loop = asyncio.get_running_loop()
        self._first_attempt = loop.create_future()
        self._supervisor = loop.create_task(self._supervise(), name="relay-rpc-link")
        await asyncio.shield(self._first_attempt)

    async def close(self) -> None:
        """Stop reconnecting, fail what waits, close the connection."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        link, self._link = self._link, None
        self.connected.clear()
        self._fail_pending("relay stopping")
        if link is not None:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(self.settings.connect_timeout):
                    await link.connection.close()

    async def _supervise(self) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                link = await self._connect()
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
            else:
                delay = RECONNECT_MIN
                self._link, self.last_error = link, ""
                self.connected.set()
                log.info("rpc.connected", broker=self.address)
                self._settle_first()
                try:
                    await link.closed.wait()
                finally:
                    self._link = None
                    self.connected.clear()
                    self._fail_pending(link.close_reason)
                self.last_error = link.close_reason or "connection closed"
                log.warning("rpc.disconnected", broker=self.address, error=self.last_error)
                with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                    async with asyncio.timeout(1):
                        await link.connection.close()
                continue
            self._settle_first()
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
            delay = min(delay * 2, RECONNECT_MAX)

    def _settle_first(self) -> None:
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(None)

    async def _connect(self) -> _Link:
        connection = aio_pika.Connection(
            self._url,
            client_properties={
                "connection_name": f"retm-relay rpc {socket.gethostname()} pid {os.getpid()}",
                "product": "retm-relay",
                "version": __version__,
            },
        )
        try:
            await connection.connect(timeout=self.settings.connect_timeout)
        except BaseException:
            # Close the failed attempt here: an unclosed Connection closes itself from
            # __del__, which breaks when the garbage collector runs on another thread.
            await connection.close()
            raise
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                underlay = await channel.get_underlay_channel()
                await underlay.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
        except BaseException:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                await connection.close()
            raise
        link = _Link(connection, underlay)

        def on_close(_: object, exc: BaseException | None = None) -> None:
            if not link.closed.is_set():
                link.close_reason = (str(exc) or type(exc).__name__) if exc else "closed"
                link.closed.set()

        connection.close_callbacks.add(on_close)
        channel.close_callbacks.add(on_close)
        return link

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NoAnswer("disconnected", reason))

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id or ""
        future = self._pending.get(correlation_id)
        if future is None or future.done():
            self.late_replies += 1
            self.metrics.loyalty_late_reply()
            log.warning("loyalty.late_reply", correlation_id=correlation_id[:64])
            return
        try:
            future.set_result(parse_reply(message))
        except NoAnswer as exc:
            future.set_exception(exc)

    async def call(
        self,
        body: bytes,
        route: Route,
        *,
        event: str,
        message_id: str | None,
        headers: dict[str, Any],
        received_at: float,
        timeout: float,
    ) -> Reply:
        """Publish one request and wait up to ``timeout`` seconds for its reply.

        message_id: the request's ``message_id`` (a fresh one when ``None``); it must be unique
        among requests in flight (the broker returns an unroutable publish by it).
        Raises NoAnswer.
        """
        link = self._link
        if link is None:
            raise NoAnswer("disconnected", self.last_error)
        correlation_id = secrets.token_hex(16)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        properties = spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=TRANSIENT,
            message_id=message_id or correlation_id,
            correlation_id=correlation_id,
            reply_to=REPLY_TO,
            expiration=str(max(1, int(timeout * 1000))),
            message_type=event,
            timestamp=datetime.fromtimestamp(int(received_at), UTC),
            app_id=APP_ID,
            headers=headers,
        )
        try:
            async with asyncio.timeout(timeout):
                try:
                    await link.underlay.basic_publish(
                        body,
                        exchange=route.exchange,
                        routing_key=route.routing_key,
                        properties=properties,
                        mandatory=True,
                    )
                except PublishError:
                    raise NoAnswer(
                        "no_responder", f"no queue bound for {route.routing_key}"
                    ) from None
                except DeliveryError:
                    raise NoAnswer("nacked", "the broker refused the request") from None
                except (AMQPError, *CONNECTION_EXCEPTIONS) as exc:
                    raise NoAnswer("disconnected", str(exc)) from None
                return await future
        except TimeoutError:
            raise NoAnswer("timeout", f"no reply within {timeout}s") from None
        finally:
            del self._pending[correlation_id]


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
        import redis.asyncio as aioredis  # noqa: PLC0415 - only relays that use Redis need it

        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, retry_on_timeout=False
        )
        self._errors: tuple[type[BaseException], ...] = (
            aioredis.RedisError,
            OSError,
            TimeoutError,
        )

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
