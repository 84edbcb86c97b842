"""Publishing to RabbitMQ: the broker link, the topology, and confirmed, mandatory publishes.

One long-lived connection with heartbeats and one channel in publisher-confirm mode carry every
publish; many publishes are in flight at once and RabbitMQ acknowledges them in batches
(``multiple=true``). Every message is persistent and mandatory: when no queue is bound for its
routing key, the broker returns it and the relay republishes it to the unrouted exchange, with
the intended routing key in a header, before it answers. An event is never dropped.

The link is supervised here rather than by aio-pika's ``connect_robust``, for three reasons the
relay's contract needs: a topology mismatch at start-up must stop the start instead of being
retried forever; a publish must fail *at once* while the link is down (so the caller answers 503
or spools without waiting for a deadline); and a publisher has no consumers to restore, so
reconnecting is simply "connect, declare, swap the link in".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import (
    AMQPError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from pamqp import commands as spec
from yarl import URL

from relay import __version__
from relay.errors import BrokerUnavailable, TopologyError
from relay.metrics import Metrics
from relay.routing import Route, Router
from relay.settings import AmqpSettings

log = structlog.get_logger("relay.publish")

APP_ID = "retm-relay"
CONTENT_TYPE = "application/json"
PERSISTENT = 2
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event ready to publish, as the message contract describes it.

    body: the request body exactly as received (after decompression, without a leading BOM).
    route: exchange and routing key. message_id: the dedup key. event: the event name, which
    becomes the AMQP ``type``. received_at: Unix time of receipt (the AMQP ``timestamp``).
    headers: ``x-retm-*`` and ``x-relay-received-at`` string headers.
    """

    body: bytes
    route: Route
    message_id: str
    event: str
    received_at: float
    headers: dict[str, Any] = field(default_factory=dict)

    def properties(self, extra_headers: dict[str, Any] | None = None) -> spec.Basic.Properties:
        """The AMQP basic properties of the message contract."""
        headers = {**self.headers, **extra_headers} if extra_headers else self.headers
        return spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=self.message_id,
            message_type=self.event,
            timestamp=datetime.fromtimestamp(int(self.received_at), UTC),
            app_id=APP_ID,
            headers=headers,
        )


@dataclass(slots=True)
class _Link:
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    underlay: aiormq.abc.AbstractChannel
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""


def _url_with_heartbeat(url: str, heartbeat: int) -> URL:
    parsed = URL(url)
    if "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=str(heartbeat))
    return parsed


def broker_address(url: str) -> str:
    """``host:port/vhost`` of an AMQP URL, without credentials (safe to log)."""
    parsed = URL(url)
    vhost = parsed.path[1:] if len(parsed.path) > 1 else "/"
    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    return f"{parsed.host}:{port}/{vhost}"


class Publisher:
    """Owns the broker link; publishes envelopes with confirms.

    ``start()`` makes the first connection attempt and raises TopologyError when the exchanges
    disagree with the settings; when the broker does not answer, it keeps trying in the
    background and ``publish`` raises BrokerUnavailable("disconnected") until it does.
    ``connected`` is set while a link with its topology is up.
    """

    def __init__(self, settings: AmqpSettings, router: Router, metrics: Metrics) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.connected = asyncio.Event()
        self.address = broker_address(settings.url.value)
        self.last_error = ""
        self.connected_since: float | None = None
        self.reconnects = 0
        self._url = _url_with_heartbeat(settings.url.value, settings.heartbeat)
        self._link: _Link | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Future[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (or start trying to). Raises TopologyError on a mismatch at the first
        successful connection; returns after the first attempt, successful or not."""
        loop = asyncio.get_running_loop()
        self._first_attempt = loop.create_future()
        self._supervisor = loop.create_task(self._supervise(), name="relay-broker-link")
        await asyncio.shield(self._first_attempt)

    async def close(self) -> None:
        """Stop reconnecting and close the link (after the caller's publishes finished)."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        link, self._link = self._link, None
        self.connected.clear()
        if link is not None:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(self.settings.connect_timeout):
                    await link.connection.close()

    def status(self) -> dict[str, Any]:
        """Link state for /health and readiness."""
        return {
            "connected": self.connected.is_set(),
            "address": self.address,
            "connected_since": self.connected_since,
            "reconnects": self.reconnects,
            "last_error": self.last_error or None,
        }

    async def _supervise(self) -> None:
        delay = RECONNECT_MIN
        ever_connected = False
        was_down_logged = False
        while not self._closing:
            try:
                link = await self._connect()
            except TopologyError as exc:
                self.last_error = str(exc)
                if not ever_connected:
                    self._settle_first_attempt(exc)
                    return
                log.error("broker.topology_mismatch", error=str(exc))
            except ProbableAuthenticationError as exc:
                self.last_error = f"authentication failed: {exc}"
                log.error("broker.auth_failed", broker=self.address)
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                self.last_error = _describe(exc)
                if not was_down_logged:
                    log.warning("broker.unreachable", broker=self.address, error=self.last_error)
                    was_down_logged = True
            else:
                ever_connected, was_down_logged, delay = True, False, RECONNECT_MIN
                await self._run_link(link)
                continue
            self._settle_first_attempt(None)
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
            delay = min(delay * 2, RECONNECT_MAX)

    async def _run_link(self, link: _Link) -> None:
        self._link = link
        self.connected_since = time.time()
        self.connected.set()
        self.metrics.broker_connected(True)
        self.last_error = ""
        log.info("broker.connected", broker=self.address)
        self._settle_first_attempt(None)
        try:
            await link.closed.wait()
        finally:
            self._link = None
            self.connected.clear()
            self.connected_since = None
            self.metrics.broker_connected(False)
        self.reconnects += 1
        self.last_error = link.close_reason or "connection closed"
        if not self._closing:
            log.warning("broker.disconnected", broker=self.address, error=self.last_error)
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(1):
                    await link.connection.close()

    def _settle_first_attempt(self, exc: BaseException | None) -> None:
        fut = self._first_attempt
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    async def _connect(self) -> _Link:
        connection = aio_pika.Connection(
            self._url,
            client_properties={
                "connection_name": f"retm-relay {socket.gethostname()} pid {os.getpid()}",
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
                await self.declare(channel)
                underlay = await channel.get_underlay_channel()
        except BaseException:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                await connection.close()
            raise
        link = _Link(connection, channel, underlay)

        def on_close(_: object, exc: BaseException | None = None) -> None:
            if not link.closed.is_set():
                link.close_reason = _describe(exc) if exc else "closed"
                link.closed.set()

        connection.close_callbacks.add(on_close)
        channel.close_callbacks.add(on_close)
        return link

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Declare (or, with ``amqp.passive``, only check) the event exchanges, durable topic;
        and the unrouted exchange (fanout) with its durable queue of the same name.

        Raises TopologyError naming the entity when it exists with another type or arguments,
        or is missing in passive mode. The channel is closed by the broker in that case.
        """
        s = self.settings
        entity = ""
        try:
            for name in self.router.exchanges:
                entity = f"exchange {name!r}"
                if s.passive:
                    await channel.get_exchange(name, ensure=True)
                else:
                    await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            entity = f"exchange {s.unrouted_exchange!r}"
            if s.passive:
                await channel.get_exchange(s.unrouted_exchange, ensure=True)
                entity = f"queue {s.unrouted_exchange!r}"
                await channel.get_queue(s.unrouted_exchange, ensure=True)
            else:
                unrouted = await channel.declare_exchange(
                    s.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
                )
                entity = f"queue {s.unrouted_exchange!r}"
                queue = await channel.declare_queue(s.unrouted_exchange, durable=True)
                await queue.bind(unrouted)
        except ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"{entity} exists on the broker with another type or arguments: "
                f"{_reply_text(exc)}. Delete it, or point the relay at another name."
            ) from None
        except ChannelNotFoundEntity as exc:
            raise TopologyError(
                f"{entity} does not exist and amqp.passive is set: {_reply_text(exc)}"
            ) from None

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, envelope: Envelope, timeout: float | None = None) -> bool:
        """Publish ``envelope`` and wait for the broker's confirm; True when routed to a queue,
        False when it was unroutable and confirmed on the unrouted exchange instead.

        timeout: seconds (default ``amqp.publish_timeout``). Raises BrokerUnavailable with
        reason ``disconnected`` at once while there is no link, or ``timeout``, ``nacked``,
        ``returned`` (even the unrouted exchange had no queue) or ``channel_closed``. After a
        ``timeout`` the publish goes on; ``exc.pending`` is the task that completes when the
        broker finally answers.
        """
        link = self._link
        if link is None:
            raise BrokerUnavailable("disconnected", self.last_error)
        started = time.perf_counter()
        task = asyncio.get_running_loop().create_task(self._publish_confirmed(link, envelope))
        done, _ = await asyncio.wait((task,), timeout=timeout or self.settings.publish_timeout)
        if not done:
            task.add_done_callback(self._on_late_result)
            raise BrokerUnavailable("timeout", "no publisher confirm before the deadline", task)
        routed = task.result()
        self.metrics.published(envelope.event, time.perf_counter() - started)
        return routed

    def _on_late_result(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.metrics.late_confirm()

    async def _publish_confirmed(self, link: _Link, envelope: Envelope) -> bool:
        route = envelope.route
        properties = envelope.properties()
        try:
            try:
                await link.underlay.basic_publish(
                    envelope.body,
                    exchange=route.exchange,
                    routing_key=route.routing_key,
                    properties=properties,
                    mandatory=True,
                )
            except PublishError:
                pass
            else:
                return True
            self.metrics.unroutable()
            log.info(
                "publish.unroutable",
                routing_key=route.routing_key,
                exchange=route.exchange,
                key=envelope.message_id,
            )
            await link.underlay.basic_publish(
                envelope.body,
                exchange=self.settings.unrouted_exchange,
                routing_key=route.routing_key,
                properties=envelope.properties(
                    {"x-relay-routing-key": route.routing_key, "x-relay-exchange": route.exchange}
                ),
                mandatory=True,
            )
        except PublishError:
            raise BrokerUnavailable(
                "returned", f"no queue bound to {self.settings.unrouted_exchange!r}"
            ) from None
        except DeliveryError:
            raise BrokerUnavailable("nacked", "the broker refused the message") from None
        except (AMQPError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailable("channel_closed", _describe(exc)) from None
        return False


def _reply_text(exc: BaseException) -> str:
    args = [a for a in exc.args if isinstance(a, str)]
    return args[-1] if args else str(exc)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."
