"""Publishing to RabbitMQ: the broker link, the topology, and confirmed, mandatory publishes.

One long-lived connection with heartbeats and one channel in publisher-confirm mode carry every
publish; many publishes are in flight at once and RabbitMQ acknowledges them in batches
(``multiple=true``). Every message is persistent and mandatory: when no queue is bound for its
routing key, the broker returns it and the relay republishes it to the unrouted exchange, with
the intended routing key in a header, before it answers. An event is never dropped.

With the archive on (``archive.*``, docs/replay.md), each event is published twice in the same
write: to its event exchange as above, and, unchanged, to the archive's fanout exchange, bound to
a RabbitMQ stream. The publish succeeds once both are confirmed. Bodies quarantined on
``amqp.rejected_exchange`` are not archived: they were answered 400, not 2xx, the quarantine's
quorum queue already keeps them, and a replay must not put them on a consumer's queue. The
archive's copy is a separate publish rather than an exchange-to-exchange binding so that
``mandatory`` still tells the relay, synchronously, that no consumer queue was bound for an
event (the stream would take every message and no publish would ever be returned), and so that
the event exchanges keep their arguments and bindings (docs/replay.md, "Design").

Publishes go out through a sender of ``relay.amqp.senders``: the fast path, where the frames of
every publish made during one event-loop turn are marshalled by ``relay.amqp.wire`` and written
in one go, with their confirmations registered on aiormq's channel exactly as its own
``basic_publish`` registers them, so acks, nacks, returns and a channel close settle them the
usual way; or, when the fast path fails its checks on a new channel (or ``amqp.fast_publish``
is false), aiormq's public ``basic_publish``. Which one is in use, and why, is on /health.

The link is supervised by ``relay.link`` (which says why not by aio-pika's ``connect_robust``):
the topology is declared on each new channel, and a mismatch at the first connection stops the
start. What stays here is the publisher's own: a publish fails *at once* while the link is down
or blocked (so the caller answers 503 or spools without waiting for a deadline); a link that
answers nothing is suspect, then reset; and the confirms still due on a dead link fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from yarl import URL

from relay.amqp.link import Link, SupervisedLink, broker_address, describe
from relay.amqp.senders import (
    FastSender,
    Properties,
    PublicSender,
    PublishPath,
    Sender,
    internals_problem,
    probe,
)
from relay.errors import BrokerUnavailable, TopologyError
from relay.metrics import Metrics
from relay.routing import Route, Router
from relay.settings import AmqpSettings, ArchiveSettings

# broker_address moved to relay.link; it is still importable from here (relay.tail, .topology)
__all__ = [
    "APP_ID",
    "CONTENT_TYPE",
    "PERSISTENT",
    "QUARANTINE_CONTENT_TYPE",
    "REJECTED_REASON_HEADER",
    "SUSPECT_AFTER",
    "Envelope",
    "Publisher",
    "broker_address",
]

log = structlog.get_logger("relay.publish")

APP_ID = "retm-relay"
CONTENT_TYPE = "application/json"
#: the content type of a quarantined body (not JSON, or not an object: opaque bytes)
QUARANTINE_CONTENT_TYPE = "application/octet-stream"
#: the header that marks a quarantined body and says why it was refused
REJECTED_REASON_HEADER = "x-relay-rejected-reason"
PERSISTENT = 2
#: publishes nacked in a row, none acked, after which the link is reset. A channel that opened
#: while a quorum queue's leader had just died (a node killed) can go on nacking every publish
#: to that queue although the queue has a new leader (RabbitMQ 3.10); a new channel publishes
#: fine. A queue that is full with ``overflow = reject-publish`` also nacks in a row: resetting
#: then costs a reconnect, and the events wait in the spool as they would anyway. The events'
#: publishes and the archive's copies are counted apart: with the archive on, every event's
#: publish is followed by its copy's, and the stream's acks must not hide a queue that nacks
#: every event (nor the reverse).
NACKS_BEFORE_RESET = 32
#: seconds without any answer to an outstanding publish after which the link is suspect:
#: new events go to the spool instead of joining the queue of unanswered publishes. (0.25 s
#: took a busy broker for a dead one: RabbitMQ writing persistent messages on a loaded host is
#: silent for a few hundred milliseconds at times, and once one event is spooled every next
#: one queues behind it, so the relay then ran on the spool for seconds; see
#: docs/performance.md.)
SUSPECT_AFTER = 1.0


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

    @property
    def content_type(self) -> str:
        """``application/json``; ``application/octet-stream`` for a quarantined body (one
        with ``x-relay-rejected-reason``), which is not a JSON object. Derived from the
        headers, so a spooled envelope keeps it."""
        if REJECTED_REASON_HEADER in self.headers:
            return QUARANTINE_CONTENT_TYPE
        return CONTENT_TYPE


class CopyDropped(AMQPError):
    """The broker will not confirm an archive copy: it has confirmed a copy published after it
    on the same channel, and a stream confirms its publishes in order. (RabbitMQ 3.10 leaves
    some copies published on a channel that opened while the stream's leader had just died
    unanswered for good, while it confirms the copies published after them.)"""

    reason = "%s"


@dataclass(slots=True, kw_only=True)
class _Link(Link):
    underlay: aiormq.Channel
    sender: Sender
    #: loop time of the broker's latest answer (confirm, nack, return) to a publish
    last_reply: float = 0.0
    #: confirmations on this link still to come -> loop time their publish was sent
    inflight: dict[asyncio.Future[Any], float] = field(default_factory=dict)
    #: the archive copies among ``inflight`` (not counted by ``Publisher.in_flight``), in the
    #: order they were published -> their number on this link (1, 2 ...)
    copies: dict[asyncio.Future[Any], int] = field(default_factory=dict)
    #: archive copies published on this link
    copies_sent: int = 0
    transport: _RecordingTransport | None = None
    #: event publishes nacked since the last one acked or returned on this link
    nacked_in_a_row: int = 0
    #: archive copies nacked since the last one acked on this link
    copies_nacked_in_a_row: int = 0

    def settled(self, confirmation: asyncio.Future[Any]) -> None:
        """An event's confirmation settled: forget it, and count a nack in a row."""
        self.inflight.pop(confirmation, None)
        answer = self._answer(confirmation)
        if answer == "nack":
            self.nacked_in_a_row += 1
        elif answer == "ack":
            self.nacked_in_a_row = 0

    def copy_settled(self, confirmation: asyncio.Future[Any]) -> None:
        """An archive copy's confirmation settled: forget it, count a nack in a row; an ack
        also settles the copies published before it that are still unanswered: the broker
        dropped them (``CopyDropped``)."""
        self.inflight.pop(confirmation, None)
        number = self.copies.pop(confirmation, None)
        answer = self._answer(confirmation)
        if answer == "nack":
            self.copies_nacked_in_a_row += 1
        elif answer == "ack":
            self.copies_nacked_in_a_row = 0
            if number is not None:
                self._drop_copies_before(number)

    def _drop_copies_before(self, number: int) -> None:
        copies = self.copies
        while copies:
            older, older_number = next(iter(copies.items()))
            if older_number > number:
                break
            del copies[older]  # (its own copy_settled finds nothing left to do)
            if not older.done():
                older.set_exception(
                    CopyDropped(
                        "the broker dropped the archive copy's confirm (it confirmed a copy "
                        "published after it)"
                    )
                )

    def _answer(self, confirmation: asyncio.Future[Any]) -> Literal["ack", "nack"] | None:
        """What the broker answered to a settled publish: ``ack`` (a return too: it is acked
        next), ``nack``, or None when it did not answer (the link closed first, the confirm was
        dropped). Any answer counts as a sign of life for stall detection."""
        if confirmation.cancelled():
            return None
        error = confirmation.exception()
        if error is None or isinstance(error, PublishError):
            answer: Literal["ack", "nack"] = "ack"
        elif isinstance(error, DeliveryError):
            answer = "nack"
        else:
            return None
        self.last_reply = asyncio.get_running_loop().time()
        return answer

    def abort(self) -> None:
        """Reset the socket at once (RST): a dead path must not deliver, once it heals, the
        publishes the relay has already given up on (they are spooled and forwarded)."""
        writer = self.transport.writer if self.transport is not None else None
        if writer is not None:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST and drops the unsent bytes
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    def suspect(self, now: float, after: float) -> bool:
        """True when the oldest unconfirmed publish went out more than ``after`` seconds ago
        and nothing at all has come back from the broker since."""
        oldest = next(iter(self.inflight.values()), None)
        return oldest is not None and now - oldest > after and self.last_reply < oldest


class _RecordingTransport(TransportFactory):
    """aiormq's own TCP or TLS transport factory, keeping the stream writer so that a dead
    link can be reset (aiormq's public ``transport_factory`` hook)."""

    def __init__(self, tls: bool) -> None:
        self._inner: TransportFactory = TLSTransportFactory() if tls else TCPTransportFactory()
        self.writer: asyncio.StreamWriter | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, self.writer = await self._inner.create(url, **kwargs)
        return reader, self.writer


def _is_blocked(connection: aiormq.abc.AbstractConnection) -> bool:
    """Whether the broker has blocked ``connection`` (``connection.blocked``: a memory or disk
    alarm; RabbitMQ then stops reading the socket, so no publish would be confirmed).

    aiormq keeps that state in a private Event and exposes it only through the public
    coroutine ``ready()``, which returns at once unless the connection is blocked (or not yet
    open). Rather than reach into the private attribute, step that coroutine once: it either
    finishes (not blocked) or suspends on the Event (blocked); closing it at once removes its
    waiter again, so nothing is left behind.
    """
    waiter = connection.ready()
    try:
        waiter.send(None)
    except StopIteration:
        return False
    finally:
        waiter.close()
    return True


#: the arguments of every queue the relay itself declares (``retm.unrouted``, and any other of
#: its own queues): a quorum queue, replicated to a majority of a cluster's nodes, so that it
#: stays usable when one node dies; on a single node it works the same
RELAY_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}
#: what a relay queue mismatch says besides the broker's reply (a classic queue of an older
#: version: the migration is in docs/several-machines.md)
MIGRATE_HINT = (
    "a classic queue of an earlier relay version must be migrated to a quorum queue "
    "(docs/several-machines.md, 'Migrating retm.unrouted to a quorum queue')"
)


async def declare_relay_queue(
    channel: aio_pika.abc.AbstractChannel,
    name: str,
    exchange: aio_pika.abc.AbstractExchange | str,
) -> aio_pika.abc.AbstractQueue:
    """Declare one of the relay's own queues, durable with ``RELAY_QUEUE_ARGUMENTS``, and bind
    it to ``exchange`` (a fanout, or its name: no routing key). Raises
    ChannelPreconditionFailed when a queue of that name exists with other arguments (such as a
    classic queue)."""
    queue = await channel.declare_queue(name, durable=True, arguments=RELAY_QUEUE_ARGUMENTS)
    await queue.bind(exchange)
    return queue


class Publisher(SupervisedLink[_Link]):
    """Owns the broker link; publishes envelopes with confirms.

    ``start(wait=None)`` makes the first connection attempt and raises TopologyError when the
    exchanges disagree with the settings; when the broker does not answer, it keeps trying in
    the background and ``publish`` raises BrokerUnavailable("disconnected") until it does.
    ``connected`` is set while a link with its topology is up. ``close()`` (after the caller's
    publishes finished) stops the link. The supervision (these, ``last_error``, ``address``)
    is ``relay.link.SupervisedLink``'s.
    """

    def __init__(
        self,
        settings: AmqpSettings,
        router: Router,
        metrics: Metrics,
        archive: ArchiveSettings | None = None,
    ) -> None:
        super().__init__(settings, role="broker", client_name="retm-relay")
        self.router = router
        self.metrics = metrics
        #: the archive (``archive.*``) every publish also goes to; None when off
        self.archive = archive if archive is not None and archive.enabled else None
        #: Unix time of the receipt of the latest event this relay archived (None: none yet)
        self.last_archived_at: float | None = None
        self.connected_since: float | None = None
        self.reconnects = 0
        #: how publishes reach the broker (``relay.amqp.senders``): "fast" until the fast path
        #: fails a check on a new channel or ``amqp.fast_publish`` is false; then "public" for
        #: the rest of the process, with the reason in ``publish_path_reason``
        self.publish_path: PublishPath = "fast" if settings.fast_publish else "public"
        self.publish_path_reason = "" if settings.fast_publish else "amqp.fast_publish = false"
        #: whether the probe publish has run (once per process: it checks aiormq's code, and
        #: the state of each new channel is checked anyway)
        self._probed = False

    def status(self) -> dict[str, Any]:
        """Link state for /health and readiness."""
        return {
            "connected": self.connected.is_set(),
            "address": self.address,
            "nodes": self.nodes,
            "failovers": self.failovers,
            "connected_since": self.connected_since,
            "reconnects": self.reconnects,
            "last_error": self.last_error or None,
            "publish_path": self.publish_path,
            "publish_path_reason": self.publish_path_reason or None,
        }

    # -- the link --------------------------------------------------------------------------

    def _new_connection(self) -> aio_pika.Connection:
        connection = super()._new_connection()
        # passed on to aiormq.connect: keeps the socket, so that a stalled link can be reset
        connection.kwargs["transport_factory"] = _RecordingTransport(self._url.scheme == "amqps")
        return connection

    async def _open(
        self, connection: aio_pika.Connection, channel: aio_pika.abc.AbstractChannel
    ) -> _Link:
        await self.declare(channel)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # for the senders (relay.amqp.senders)
        transport = connection.kwargs["transport_factory"]
        assert isinstance(transport, _RecordingTransport)
        sender = await self._sender(connection, underlay)
        return _Link(connection, channel, underlay=underlay, sender=sender, transport=transport)

    async def _sender(self, connection: aio_pika.Connection, channel: aiormq.Channel) -> Sender:
        """The fast path on ``channel`` when it passes its checks (``relay.amqp.senders``),
        else aiormq's public ``basic_publish`` from now on (logged once, shown on /health).

        The state of every new channel is checked; the probe publish runs once per process,
        on a channel of its own (a broker user without write permission on the default
        exchange closes only that one; the fast path is then checked on the state alone).
        Raises an AMQPError when the link died during the probe.
        """
        if self.publish_path == "public":
            return PublicSender(channel)
        problem = internals_problem(channel)
        if problem is None and not self._probed:
            problem = await self._probe(connection)
        if problem is None:
            return FastSender(channel)
        self._fall_back(problem)
        return PublicSender(channel)

    async def _probe(self, connection: aio_pika.Connection) -> str | None:
        """Run ``senders.probe`` on a channel of its own; what went wrong, or None."""
        probing = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            underlay = await probing.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)
            problem = internals_problem(underlay) or await probe(FastSender(underlay))
        except ChannelAccessRefused:
            problem = None
            self.publish_path_reason = (
                "the broker refused the probe publish to the default exchange: the fast "
                "path was checked on aiormq's channel state only"
            )
            log.warning("publish.probe_refused", broker=self.address)
        except AMQPError as exc:
            if connection.is_closed:
                raise  # the link died during the probe: no verdict, reconnect
            problem = f"the probe publish closed its channel: {describe(exc)}"
        finally:
            if not probing.is_closed:
                with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                    await probing.close()
        self._probed = True
        return problem

    def _fall_back(self, reason: str) -> None:
        """Publish with aiormq's ``basic_publish`` for the rest of the process."""
        self.publish_path = "public"
        self.publish_path_reason = f"fast path failed its check: {reason}"
        log.warning("publish.fallback", reason=reason)

    def _link_up(self) -> None:
        self.connected_since = time.time()
        self.metrics.broker_connected(True)

    def _link_down(self, link: _Link) -> None:
        self.connected_since = None
        self.metrics.broker_connected(False)
        # A dead link's confirms will never come: fail its publishes now rather than leave
        # their waiters to aiormq's close, which a stalled socket can hold up.
        for future in list(link.inflight):
            if not future.done():
                future.set_exception(ChannelInvalidStateError("the broker link closed"))
        if not self._closing:
            self.reconnects += 1

    async def declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Declare (or, with ``amqp.passive``, only check) the event exchanges, durable topic;
        and the relay's own exchanges, the unrouted one and the quarantine
        (``amqp.rejected_exchange``), each fanout with its quorum queue of the same name (one
        code path for both, ``_declare_own`` and ``declare_relay_queue``); and, with the archive
        on, the archive's fanout exchange bound to its stream (``declare_archive``).

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
            for name in (s.unrouted_exchange, s.rejected_exchange):
                for part in ("exchange", "queue"):
                    entity = f"{part} {name!r}"
                    await _declare_own(channel, part, name, passive=s.passive)
            if self.archive is not None:
                entity = f"archive {self.archive.queue!r} (a stream and its fanout exchange)"
                await declare_archive(channel, self.archive, passive=s.passive)
        except ChannelPreconditionFailed as exc:
            hint = f"; {MIGRATE_HINT}" if entity.startswith("queue") else ""
            raise TopologyError(
                f"{entity} exists on the broker with another type or arguments: "
                f"{_reply_text(exc)}. Delete it, or point the relay at another name{hint}."
            ) from None
        except ChannelNotFoundEntity as exc:
            raise TopologyError(
                f"{entity} does not exist and amqp.passive is set: {_reply_text(exc)}"
            ) from None

    async def open_channel(self) -> aio_pika.abc.AbstractChannel:
        """A new channel on the current link, for reading (the archive's ``/health``
        section); the caller closes it. Raises BrokerUnavailable("disconnected") while there
        is no link."""
        link = self._link
        if link is None:
            raise BrokerUnavailable("disconnected", self.last_error)
        return await link.connection.channel()

    # -- publishing ------------------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        """True while the broker blocks the link (``connection.blocked``: memory or disk
        alarm); publishes then fail at once with BrokerUnavailable("blocked")."""
        link = self._link
        return link is not None and _is_blocked(link.underlay.connection)

    async def wait_unblocked(self) -> None:
        """Return once the link is unblocked, or gone (check ``connected`` afterwards)."""
        link = self._link
        if link is None:
            return
        ready = asyncio.ensure_future(link.underlay.connection.ready())
        closed = asyncio.ensure_future(link.closed.wait())
        try:
            await asyncio.wait((ready, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closed.cancel()

    @property
    def suspect(self) -> bool:
        """True while the link looks stalled: a publish has waited over ``SUSPECT_AFTER``
        seconds with nothing at all back from the broker since it went out."""
        link = self._link
        return link is not None and link.suspect(asyncio.get_running_loop().time(), SUSPECT_AFTER)

    def in_flight(self) -> int:
        """Publishes on the current link still waiting for their confirm, not counting the
        archive's copies (so that this counts events, archive on or off)."""
        link = self._link
        return len(link.inflight) - len(link.copies) if link is not None else 0

    async def publish(self, envelope: Envelope, timeout: float | None = None) -> bool:
        """Publish ``envelope`` and wait for the broker's confirm; True when routed to a queue,
        False when it was unroutable and confirmed on the unrouted exchange instead. With the
        archive on, the same message also goes to the archive's exchange, and the publish
        succeeds only once that is confirmed too.

        timeout: seconds (default ``amqp.publish_timeout``). Raises BrokerUnavailable with
        reason ``disconnected`` at once while there is no link, or ``timeout``, ``nacked``,
        ``returned`` (even the unrouted exchange had no queue) or ``channel_closed``. After a
        ``timeout`` the publish goes on; ``exc.pending`` is the task that completes when the
        broker finally answers.
        """
        link = self._link
        if link is None:
            raise BrokerUnavailable("disconnected", self.last_error)
        if _is_blocked(link.underlay.connection):
            raise BrokerUnavailable("blocked", "the broker blocked the connection (an alarm)")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        seconds = timeout or self.settings.publish_timeout
        deadline = loop.time() + seconds
        route = envelope.route
        refused = "the message"  # what a nack refused
        try:
            # The archive's copy goes out first, in the same write as the event; its confirm
            # mostly comes in a Basic.Ack of its own (the stream and the event's queue confirm
            # at different moments: docs/replay.md, "Design"). It is not mandatory: aiormq
            # matches a Basic.Return to its publish by message_id, which both copies share, so
            # only the event's own publish may be returned (its registration, made last, wins).
            archive = (
                self.archive.queue
                if self.archive is not None and route.exchange != self.settings.rejected_exchange
                else ""
            )
            archived = (
                self._send(link, envelope, archive, None, archive_copy=True) if archive else None
            )
            confirmation = self._send(link, envelope, route.exchange, None)
            if not await _settled(confirmation, deadline):
                raise self._timed_out(link, confirmation, seconds, _both(confirmation, archived))
            try:
                confirmation.result()
            except PublishError:
                routed = False
            else:
                routed = True
            if not routed:
                self.metrics.unroutable()
                log.info(
                    "publish.unroutable",
                    routing_key=route.routing_key,
                    exchange=route.exchange,
                    key=envelope.message_id,
                )
                extra = {
                    "x-relay-routing-key": route.routing_key,
                    "x-relay-exchange": route.exchange,
                }
                confirmation = self._send(link, envelope, self.settings.unrouted_exchange, extra)
                if not await _settled(confirmation, deadline):
                    raise self._timed_out(link, confirmation, seconds)
                try:
                    confirmation.result()
                except PublishError:
                    raise BrokerUnavailable(
                        "returned", f"no queue bound to {self.settings.unrouted_exchange!r}"
                    ) from None
            if archived is not None:
                if not await _settled(archived, deadline):
                    raise self._copy_timed_out(link, archived, seconds)
                refused = "the message's archive copy"
                archived.result()  # a nack raises DeliveryError
                self.last_archived_at = envelope.received_at
        except DeliveryError:
            raise self._nacked(link, refused) from None
        except (AMQPError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailable("channel_closed", describe(exc)) from None
        self.metrics.published(envelope.event, time.perf_counter() - started)
        return routed

    def _send(
        self,
        link: _Link,
        envelope: Envelope,
        exchange: str,
        extra_headers: dict[str, str] | None,
        *,
        archive_copy: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue one publish of ``envelope`` to ``exchange`` on the link's sender; its
        confirmation. An ``archive_copy`` is not mandatory and not counted by ``in_flight``."""
        headers = {**envelope.headers, **extra_headers} if extra_headers else envelope.headers
        props = Properties(
            envelope.content_type,
            headers,
            PERSISTENT,
            envelope.message_id,
            int(envelope.received_at),
            envelope.event,
            APP_ID,
        )
        confirmation = link.sender.send(
            exchange, envelope.route.routing_key, envelope.body, props, mandatory=not archive_copy
        )
        link.inflight[confirmation] = asyncio.get_running_loop().time()
        if archive_copy:
            link.copies_sent += 1
            link.copies[confirmation] = link.copies_sent
            confirmation.add_done_callback(link.copy_settled)
        else:
            confirmation.add_done_callback(link.settled)
        return confirmation

    def _timed_out(
        self,
        link: _Link,
        confirmation: asyncio.Future[Any],
        seconds: float,
        pending: asyncio.Future[Any] | None = None,
    ) -> BrokerUnavailable:
        """The error for a publish whose confirm missed its deadline (it may still come:
        ``pending``, by default ``confirmation`` itself); resets a link that has answered
        nothing since the publish went out, or, checked again once a whole deadline has
        passed since its last answer, nothing since then while publishes wait."""
        pending = confirmation if pending is None else pending
        pending.add_done_callback(self._on_late_result)
        sent_at = link.inflight.get(confirmation, 0.0)
        if link.last_reply < sent_at:
            # Nothing at all came back since this publish went out: the path is dead
            self._check_stalled(link, seconds, force=True)
        else:
            # The broker's last acks came after this publish went out: a stall that began
            # while they were on their way (the publishes of one window all time out together,
            # each a little after the last ack). Look again a whole deadline after that ack.
            loop = asyncio.get_running_loop()
            # (a little later than that: the loop may run a timer up to its clock's resolution
            # early, and the check must then still see a whole deadline of silence)
            loop.call_at(link.last_reply + seconds + 0.05, self._check_stalled, link, seconds)
        return BrokerUnavailable("timeout", "no publisher confirm before the deadline", pending)

    def _check_stalled(self, link: _Link, seconds: float, *, force: bool = False) -> None:
        """Reset ``link`` when it is stalled: ``force`` (nothing came back since a publish
        that missed its deadline went out), or publishes still wait and nothing at all came
        back for ``seconds``; unless the broker said it blocked us (an alarm). The path is
        then dead (a stall without FIN or RST); the supervisor reconnects."""
        if link.closed.is_set() or _is_blocked(link.underlay.connection):
            return
        now = asyncio.get_running_loop().time()
        if not force and not (link.inflight and now - link.last_reply >= seconds):
            return
        log.warning("broker.stalled", broker=self.address, seconds=seconds)
        link.mark_closed(f"no answer from the broker within {seconds:g}s (stalled)")
        link.abort()

    def _nacked(self, link: _Link, refused: str) -> BrokerUnavailable:
        """The error for a nacked publish (``refused``: what the broker refused); resets a
        link on which ``NACKS_BEFORE_RESET`` event publishes, or archive copies, were nacked
        in a row."""
        nacked = max(link.nacked_in_a_row, link.copies_nacked_in_a_row)
        if nacked >= NACKS_BEFORE_RESET and not link.closed.is_set():
            log.warning("broker.nacking", broker=self.address, nacked=nacked)
            link.mark_closed(f"{nacked} publishes nacked in a row")
        return BrokerUnavailable("nacked", f"the broker refused {refused}")

    def _copy_timed_out(
        self, link: _Link, archived: asyncio.Future[Any], seconds: float
    ) -> BrokerUnavailable:
        """The error for a publish whose event was confirmed but whose archive copy missed
        the deadline. A copy the broker dropped is settled as soon as a later copy is
        confirmed (``_Link.copy_settled``); when none was published after this one, nothing
        ever will settle it, and its spooled row would be held, and the spool with it, for
        as long as the link lives: the link is reset instead (its unanswered publishes fail,
        and their rows are forwarded on a new channel)."""
        error = self._timed_out(link, archived, seconds)
        if link.copies.get(archived) == link.copies_sent and not link.closed.is_set():
            log.warning("broker.unconfirmed", broker=self.address, seconds=seconds)
            link.mark_closed(f"an archive copy unconfirmed for {seconds:g}s, its event confirmed")
        return error

    def _on_late_result(self, confirmation: asyncio.Future[Any]) -> None:
        if not confirmation.cancelled() and confirmation.exception() is None:
            self.metrics.late_confirm()


async def _declare_own(
    channel: aio_pika.abc.AbstractChannel,
    part: Literal["exchange", "queue"],
    name: str,
    *,
    passive: bool,
) -> None:
    """Declare one part of one of the relay's own destinations (the unrouted exchange, the
    quarantine): the fanout ``exchange`` called ``name``, or its durable ``queue`` of the same
    name, bound to it (a quorum queue: ``declare_relay_queue``). Both use this one path.
    ``passive`` only checks that it exists. aiormq raises ChannelPreconditionFailed or
    ChannelNotFoundEntity as for any declare."""
    if part == "exchange":
        if passive:
            await channel.get_exchange(name, ensure=True)
        else:
            await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    elif passive:
        await channel.get_queue(name, ensure=True)
    else:
        await declare_relay_queue(channel, name, name)


def _both(
    confirmation: asyncio.Future[Any], archived: asyncio.Future[Any] | None
) -> asyncio.Future[Any]:
    """A future settled once the event's publish and its archive copy both are: confirmed
    only when both were confirmed (a timed-out publish's ``pending``)."""
    if archived is None:
        return confirmation
    return asyncio.gather(confirmation, archived)


async def declare_archive(
    channel: aio_pika.abc.AbstractChannel, archive: ArchiveSettings, *, passive: bool
) -> None:
    """Declare the archive: a stream ``archive.queue`` (``x-queue-type: stream``,
    ``x-max-age``, ``x-max-length-bytes``) and a durable fanout exchange of the same name bound
    to it; with ``passive`` only check that both exist. Raises what aio-pika raises:
    ChannelPreconditionFailed when the stream exists with other arguments,
    ChannelNotFoundEntity when missing in passive mode.
    """
    name = archive.queue
    if passive:
        await channel.get_exchange(name, ensure=True)
        await channel.get_queue(name, ensure=True)
        return
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    queue = await channel.declare_queue(name, durable=True, arguments=archive_arguments(archive))
    await queue.bind(exchange)


def archive_arguments(archive: ArchiveSettings) -> dict[str, Any]:
    """The stream's queue arguments, as declared and as in deploy/rabbitmq/definitions.json."""
    return {
        "x-queue-type": "stream",
        "x-max-age": archive.max_age,
        "x-max-length-bytes": archive.max_bytes,
    }


async def _settled(future: asyncio.Future[Any], deadline: float) -> bool:
    """Wait until ``future`` is done or the loop time reaches ``deadline``, without cancelling
    it; whether it is done. (Lighter than ``asyncio.wait`` for the one future of a publish.)"""
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_at(deadline, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


def _reply_text(exc: BaseException) -> str:
    args = [a for a in exc.args if isinstance(a, str)]
    return args[-1] if args else str(exc)
