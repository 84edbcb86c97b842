"""The loyalty RPC link: requests over RabbitMQ with direct reply-to, replies by correlation id.

RabbitMQ's direct reply-to needs a no-ack consumer on ``amq.rabbitmq.reply-to`` on the very
channel that publishes the requests, so the link is its own connection, separate from the
publisher's. It is supervised like the publisher's, by ``relay.link`` (which says why not by
aio-pika's ``connect_robust``): a request fails at once while the link is down (the cashier gets
the fallback instead of waiting), the first connection attempt does not block the start when the
broker is down, and a request in flight when the link drops gets its answer at once (its reply
could only come to the old channel). The consumer is created anew on each channel.

Requests are published with publisher confirms and ``mandatory``: when no queue is bound for the
routing key, the broker returns the request and the caller learns at once that no responder
exists. A reply whose correlation id is not waited for (it came after its deadline) is counted
and dropped, so it can never answer another request.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
import orjson
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import AMQPError, DeliveryError, PublishError
from pamqp import commands as spec

from relay.amqp.link import Link, SupervisedLink
from relay.amqp.publish import APP_ID, CONTENT_TYPE
from relay.metrics import Metrics
from relay.routing import Route
from relay.settings import AmqpSettings

log = structlog.get_logger("relay.rpc")

REPLY_TO = "amq.rabbitmq.reply-to"
STATUS_HEADER = "x-http-status"
TRANSIENT = 1


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


@dataclass(slots=True, kw_only=True)
class _Link(Link):
    underlay: aiormq.abc.AbstractChannel


class RpcLink(SupervisedLink[_Link]):
    """The RPC connection: publishes requests (confirmed, mandatory) and receives replies.

    settings: ``amqp.*`` (URL, timeouts, heartbeat). metrics: counts late replies.
    ``connected`` is set while the channel and its reply consumer are up. ``start()`` returns
    after the first connection attempt, successful or not; the supervision (``connected``,
    ``last_error``, ``address``, ``close()``) is ``relay.link.SupervisedLink``'s.
    """

    def __init__(self, settings: AmqpSettings, metrics: Metrics) -> None:
        super().__init__(settings, role="rpc", client_name="retm-relay rpc")
        self.metrics = metrics
        self.late_replies = 0
        self._pending: dict[str, asyncio.Future[Reply]] = {}

    def status(self) -> dict[str, Any]:
        """Link state for ``/health``."""
        return {
            "connected": self.connected.is_set(),
            "address": self.address,
            "nodes": self.nodes,
            "failovers": self.failovers,
            "in_flight": len(self._pending),
            "late_replies": self.late_replies,
            "last_error": self.last_error or None,
        }

    async def close(self) -> None:
        """Stop reconnecting, fail what waits, close the connection."""
        await super().close()
        self._fail_pending("relay stopping")

    async def _open(
        self, connection: aio_pika.Connection, channel: aio_pika.abc.AbstractChannel
    ) -> _Link:
        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
        return _Link(connection, channel, underlay=underlay)

    def _link_down(self, link: _Link) -> None:
        self._fail_pending(link.close_reason)

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
