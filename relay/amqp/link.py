"""Supervised broker links: one AMQP connection and its channel, kept up by the relay itself.

The publisher (``relay.publish``) and the loyalty RPC link (``relay.rpc``) each hold one
connection with heartbeats and one channel in publisher-confirm mode, where a mandatory publish
the broker returns raises. ``SupervisedLink`` does the supervision for both: it connects, opens
the channel, lets its owner set the channel up (the publisher declares its topology, the RPC
link starts its direct reply-to consumer), watches the connection and the channel close, and
reconnects with jittered exponential backoff (0.2 s doubling to 5 s). It logs each change of
state once (``<role>.connected``, ``<role>.disconnected``, ``<role>.unreachable``) and shows
the state as ``connected``, ``last_error`` and ``address`` for /health and readiness.

Several nodes (``amqp.url`` as a list: the nodes of a RabbitMQ cluster). aio-pika and aiormq
connect to one URL only, so the link itself fails over: it starts with the first node of the
list, and every failed attempt and every lost link moves it to the next node (round robin, the
same jittered backoff between failed attempts; a lost link tries the next node at once). The
configured order is kept rather than shuffled so that an operator decides where the links go
first (the node nearest to the relay, or the one that leads the quorum queues); a link stays on
the node it reached until that node fails, and then goes on to the *next* node rather than back
to the first, because the one it lost is the one most likely still down. ``address`` is the
node of the current link (the node being tried while there is none); ``failovers`` counts links
that came up on another node than the link before them.

The links are supervised here rather than by aio-pika's ``connect_robust``, because the relay's
contract needs what a robust connection does not do:

- a topology mismatch at start-up must stop the start with one clear error instead of being
  retried forever (later mismatches are logged, shown by readiness and retried);
- a publish or an RPC request must fail *at once* while the link is down, so that the caller
  answers 503, spools, or gives the loyalty fallback without waiting for a deadline;
- the first connection attempt must not hold up the start while the broker does not answer;
- what was in flight on a link that died gets its answer at once (its confirm or reply could
  only come on the old channel), and a new link needs no state restored: the publisher has no
  consumers, and the RPC link's reply consumer belongs to the new channel. Reconnecting is
  simply "connect, set the channel up, swap the link in".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aio_pika
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import InvalidFrameError, ProbableAuthenticationError
from yarl import URL

from relay import __version__
from relay.errors import TopologyError
from relay.settings import AmqpSettings

log = structlog.get_logger("relay.link")

#: reconnection backoff, seconds: the first delay, doubled after each failed attempt up to the
#: last; each delay is jittered to 0.5-1.5 times its value
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0
#: what a link logs, each as ``<role>.<event>`` (``broker.connected``, ``rpc.disconnected``)
EVENTS = (
    "connected",
    "disconnected",
    "unreachable",
    "auth_failed",
    "topology_mismatch",
    "slow_start",
)


@dataclass(slots=True)
class Link:
    """One established connection and its channel. ``closed`` is set, once, with
    ``close_reason``, when either of them closes or when the owner gives up on them."""

    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""

    def mark_closed(self, reason: str) -> None:
        """Mark the link dead (the first reason stays); its supervisor then reconnects."""
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()


L = TypeVar("L", bound=Link)


class SupervisedLink(ABC, Generic[L]):
    """Keeps one broker link (a ``Link`` subclass ``L``) up, reconnecting in the background.

    settings: ``amqp.*`` (URL, ``connect_timeout`` and ``heartbeat`` in seconds). role: the
    first word of the log events (``EVENTS``: ``broker.connected``, ``rpc.disconnected`` ...)
    and of the supervisor task's name (``relay-broker-link``).
    client_name: how the connection introduces itself to the broker (its ``connection_name``
    is this, the host name and the process id).

    A subclass sets up each new channel in ``_open`` (which builds its ``L``) and releases what
    waited on a dead link in ``_link_down``; ``_link`` is the current link, ``None`` while
    there is none. ``connected`` is set while a link is up; ``last_error`` says why there is
    none (empty while connected); ``address`` is the ``host:port[/vhost]`` of the node it is
    on (or trying); ``nodes`` every configured node's, in order; ``failovers`` how many links
    came up on another node than the link before.
    """

    def __init__(self, settings: AmqpSettings, *, role: str, client_name: str) -> None:
        self.settings = settings
        self.connected = asyncio.Event()
        self._urls = [_url_with_heartbeat(url, settings.heartbeat) for url in settings.urls()]
        self.nodes = [broker_address(url) for url in settings.urls()]
        self._node = 0
        self._last_node: int | None = None
        self.failovers = 0
        self.last_error = ""
        self._role = role
        self._events = {event: f"{role}.{event}" for event in EVENTS}
        self._client_name = client_name
        self._link: L | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def address(self) -> str:
        """``host:port[/vhost]`` of the node the link is on, or trying (no credentials)."""
        return self.nodes[self._node]

    @property
    def _url(self) -> URL:
        """The URL of the node the link is on, or trying (with ``heartbeat``)."""
        return self._urls[self._node]

    def _next_node(self) -> None:
        """Move on to the next node of the list (round robin; nothing with one node)."""
        self._node = (self._node + 1) % len(self._urls)

    # -- for the owner ---------------------------------------------------------------------

    @abstractmethod
    async def _open(
        self, connection: aio_pika.Connection, channel: aio_pika.abc.AbstractChannel
    ) -> L:
        """Set up a newly opened channel (publisher confirms, returns raise) and build the link
        on it. Raise TopologyError when the broker's entities disagree with the settings; a
        connection error or a timeout (``amqp.connect_timeout`` bounds this) is retried."""

    def _link_up(self) -> None:
        """Called when ``_link`` has just come up (``connected`` is set)."""

    @abstractmethod
    def _link_down(self, link: L) -> None:
        """Called when ``link`` is gone (``_link`` is None, ``connected`` is clear), also when
        ``close()`` stops it: fail at once whatever still waits for an answer on it."""

    def _new_connection(self) -> aio_pika.Connection:
        """A new, not yet connected connection to the broker, named for the broker's
        management UI (``connection_name``, ``product``, ``version``)."""
        return aio_pika.Connection(
            self._url,
            client_properties={
                "connection_name": f"{self._client_name} {socket.gethostname()} pid {os.getpid()}",
                "product": "retm-relay",
                "version": __version__,
            },
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, wait: float | None = None) -> None:
        """Connect (or start trying to). Returns after the first attempt (with several nodes:
        the first that succeeds, or one failed try of each), successful or not;
        raises TopologyError when ``_open`` found a mismatch at the first successful
        connection (the link then stops trying).

        wait: at most this many seconds for that first attempt (None: as long as it takes,
        up to ``amqp.connect_timeout``). A broker that has not answered by then (a stalled
        path) no longer holds up the start; a mismatch found later is logged, shown in
        ``last_error``, and retried like any other link failure.
        """
        loop = asyncio.get_running_loop()
        first = self._first_attempt = loop.create_future()
        self._supervisor = loop.create_task(self._supervise(), name=f"relay-{self._role}-link")
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(first)
        except TimeoutError:
            first.cancel()
            log.warning(self._events["slow_start"], broker=self.address, seconds=wait)

    async def close(self) -> None:
        """Stop reconnecting and close the connection (waits at most ``amqp.connect_timeout``
        seconds for the broker to answer the close)."""
        self._closing = True
        link = self._link  # the supervisor forgets it when cancelled: close it here
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._link = None
        self.connected.clear()
        if link is not None:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(self.settings.connect_timeout):
                    await link.connection.close()

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = RECONNECT_MIN
        ever_connected = False
        down_logged: set[int] = set()  # nodes whose unreachability this outage has logged
        failed = 0  # attempts failed in a row
        while not self._closing:
            try:
                link = await self._connect()
            except TopologyError as exc:
                self.last_error = str(exc)
                first = self._first_attempt
                if not ever_connected and first is not None and not first.done():
                    self._settle_first_attempt(exc)  # start() is waiting: stop the start
                    return
                log.error(self._events["topology_mismatch"], error=str(exc))
            except ProbableAuthenticationError as exc:
                self.last_error = f"authentication failed: {exc}"
                log.error(self._events["auth_failed"], broker=self.address)
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                self.last_error = describe(exc)
                if self._node not in down_logged:
                    log.warning(
                        self._events["unreachable"], broker=self.address, error=self.last_error
                    )
                    down_logged.add(self._node)
            else:
                ever_connected, delay, failed = True, RECONNECT_MIN, 0
                down_logged.clear()
                await self._run(link)
                self._next_node()  # the node just lost is the one most likely still down
                continue
            self._next_node()
            failed += 1
            if failed >= len(self._urls):  # start() waits for one try of every node
                self._settle_first_attempt(None)
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
            delay = min(delay * 2, RECONNECT_MAX)

    async def _run(self, link: L) -> None:
        """Hold ``link`` as the current link until it closes."""
        failover = self._last_node is not None and self._last_node != self._node
        if failover:
            self.failovers += 1
        self._last_node = self._node
        self._link = link
        self.connected.set()
        self.last_error = ""
        self._link_up()
        log.info(self._events["connected"], broker=self.address, failover=failover)
        self._settle_first_attempt(None)
        try:
            await link.closed.wait()
        finally:
            self._link = None
            self.connected.clear()
            self._link_down(link)
        self.last_error = link.close_reason or "connection closed"
        if not self._closing:
            log.warning(self._events["disconnected"], broker=self.address, error=self.last_error)
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

    async def _connect(self) -> L:
        # aio_pika.connect() would leave a failed Connection for the garbage collector, whose
        # __del__ schedules a close() that may never run; build it here and close it instead.
        connection = self._new_connection()
        try:
            await connection.connect(timeout=self.settings.connect_timeout)
            async with asyncio.timeout(self.settings.connect_timeout):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                link = await self._open(connection, channel)
        except BaseException:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                await connection.close()
            raise

        def on_close(_: object, exc: BaseException | None = None) -> None:
            link.mark_closed(describe(exc) if exc else "closed")

        connection.close_callbacks.add(on_close)
        channel.close_callbacks.add(on_close)
        return link


async def connect_first(
    settings: AmqpSettings, connection_name: str
) -> tuple[aio_pika.abc.AbstractConnection, str]:
    """A connection to the first node of ``amqp.url`` that answers, trying them in order (for
    the one-shot commands ``declare`` and ``tail``), and that node's address.

    Raises ProbableAuthenticationError when a node refused the credentials and none accepted
    them, else the last node's connection error (or TimeoutError, after ``connect_timeout``
    per node)."""
    error: BaseException | None = None
    for url in settings.urls():
        try:
            connection = await aio_pika.connect(
                url,
                timeout=settings.connect_timeout,
                client_properties={"connection_name": connection_name},
            )
        except ProbableAuthenticationError as exc:
            error = exc
        except (*CONNECTION_EXCEPTIONS, TimeoutError, OSError) as exc:
            if not isinstance(error, ProbableAuthenticationError):
                error = exc
        else:
            return connection, broker_address(url)
    assert error is not None  # settings name at least one node
    raise error


def nodes_text(settings: AmqpSettings) -> str:
    """The nodes of ``amqp.url`` for a message: ``h1:5672`` or ``h1:5672, h2:5672 (each)``."""
    nodes = [broker_address(url) for url in settings.urls()]
    return nodes[0] if len(nodes) == 1 else ", ".join(nodes) + " (each)"


def broker_address(url: str) -> str:
    """``host:port`` of an AMQP URL, with ``/vhost`` unless it is the default vhost ``/``;
    without credentials (safe to log)."""
    parsed = URL(url)
    vhost = parsed.path[1:] if len(parsed.path) > 1 else "/"
    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    return f"{parsed.host}:{port}" if vhost == "/" else f"{parsed.host}:{port}/{vhost}"


def describe(exc: BaseException | None) -> str:
    """A short text for a link error (its message, else its type; at most 300 characters);
    empty for None. aiormq's words for a broker that closes the connection while it is being
    opened (a vhost that does not exist, or that the user may not use: ``Expected one of
    ['Connection.OpenOk'], got <Connection.Close object at 0x...>``) and for a handshake cut
    short (``StopAsyncIteration``) become what they mean for an operator."""
    if exc is None:
        return ""
    if isinstance(exc, InvalidFrameError) and "got <Connection.Close" in str(exc):
        return (
            "the broker closed the connection while it was being opened: the vhost of "
            "amqp.url does not exist, or its user may not use it"
        )
    if isinstance(exc, StopAsyncIteration):
        return "the connection was closed during the AMQP handshake"
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _url_with_heartbeat(url: str, heartbeat: int) -> URL:
    parsed = URL(url)
    if "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=str(heartbeat))
    return parsed
