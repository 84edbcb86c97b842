"""Limits at the HTTP edge: slow and idle clients, open connections, body bytes in memory.

``ConnectionGuard`` follows every connection through three states, as Go's ``http.Server``
does: *idle* (no byte of a request yet), *reading* (the first byte of a request arrived, its
handler has not started), *handling* (the handler runs). It enforces:

- ``http.read_timeout``: a request's headers and body must arrive within this many seconds of
  its first byte. Headers still incomplete: the connection is closed. A body still incomplete:
  the handler is cancelled while it waits for the body (nothing was published yet) and the
  answer is ``408 request_timeout`` with ``Connection: close``.
- ``http.keepalive_timeout``: aiohttp's own knob (``RequestHandler(keepalive_timeout=)``) closes
  a connection idle that long, also one that never sends a byte; the guard counts those closes.
- ``http.max_connections``: at the cap, a new connection makes the guard close the
  longest-idle connection (idle or reading, never one being handled); with none to close, the
  new one is answered ``503`` and closed.

``BodyBudget`` bounds the request body bytes held at once (``http.max_inflight_bytes``): a
request whose body does not fit is answered ``503`` with ``Retry-After`` before any of the
body is read. A body's size is its ``Content-Length``; a body whose final size is not known up
front (chunked, or compressed) counts as ``http.max_body_bytes``, the most it may grow to.

Each limit is counted (``relay_http_connections_closed_total{reason}``,
``relay_unavailable_total{reason="memory_budget"}``) and logged by ``OncePerInterval``: the
first occurrence at once, then at most one line a minute with the number since the last line.
Never a traceback.

``raise_nofile_limit`` raises the soft ``RLIMIT_NOFILE`` to the hard limit at start-up.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, cast

import orjson
import structlog
from aiohttp import hdrs, web

from relay.ingest import RETRY_AFTER_SECONDS, error_response
from relay.metrics import Metrics
from relay.settings import HttpSettings

log = structlog.get_logger("relay.http.limits")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
State = Literal["idle", "reading", "handling"]

#: seconds between two log lines of the same limit (the first is logged at once)
LOG_INTERVAL = 60.0
#: bodies up to this size (bytes) may use the whole budget; larger ones leave the last
#: SMALL_RESERVE_FRACTION of it free, so that a flood of large bodies never starves RETM's
#: ordinary few-kilobyte webhooks
SMALL_BODY = 65_536
SMALL_RESERVE_FRACTION = 16
#: slack (seconds) when telling aiohttp's keep-alive close from a client's own close
_KEEPALIVE_SLACK = 0.05

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: " + RETRY_AFTER_SECONDS.encode() + b"\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n"
)
_REFUSED_BODY = orjson.dumps(
    {"error": "too_many_connections", "detail": "the relay is at http.max_connections"}
)


class OncePerInterval:
    """A log line per event name, at most once per ``interval`` seconds: the first at once,
    later ones carry ``since_last`` (occurrences since the previous line, this one included).
    clock: monotonic seconds (injectable for tests)."""

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        """Count one ``event``; log it at WARNING when its interval has passed."""
        self._log(log.warning, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Count one ``event``; log it at INFO when its interval has passed."""
        self._log(log.info, event, fields)

    def _log(self, emit: Callable[..., Any], event: str, fields: dict[str, Any]) -> None:
        self._count[event] = self._count.get(event, 0) + 1
        now = self._clock()
        last = self._last.get(event)
        if last is not None and now - last < self.interval:
            return
        self._last[event] = now
        emit(event, since_last=self._count.pop(event), **fields)


class _Connection:
    """One client connection as the guard sees it."""

    __slots__ = ("closing", "idle_since", "reading_since", "state", "timer", "transport")

    def __init__(self, transport: asyncio.Transport, now: float) -> None:
        self.transport = transport
        self.state: State = "idle"
        #: when the connection last became idle (opened, or its last handler returned)
        self.idle_since = now
        #: when the first byte of the request being read arrived (None while idle)
        self.reading_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: the guard closed it (already counted)
        self.closing = False


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped so that the guard sees it open, receive
    bytes and close. Every call is passed on unchanged."""

    __slots__ = ("_conn", "_guard", "_inner")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._conn: _Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn = self._guard.opened(cast(asyncio.Transport, transport))
        if self._conn is not None:
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._conn is None:
            return
        if self._conn.state == "idle":
            self._guard.reading(self._conn)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._conn is not None else None

    def pause_writing(self) -> None:
        if self._conn is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._conn is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._guard.lost(self._conn)
            self._inner.connection_lost(exc)


class ConnectionGuard:
    """Read deadline, keep-alive accounting and the connection cap (see the module docstring).

    read_timeout, keepalive_timeout: seconds (``http.read_timeout``,
    ``http.keepalive_timeout``, the latter enforced by aiohttp: the AppRunner gets
    ``keepalive_timeout``, and ``lingering_time=read_timeout`` for the unread rest of a body
    after an early answer). max_connections: ``http.max_connections``. ``wrap(factory)``
    wraps aiohttp's protocol factory (``runner.server``) for ``loop.create_server``;
    ``middleware`` goes first in the app's middlewares.
    """

    def __init__(
        self,
        *,
        read_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        metrics: Metrics,
        logger: OncePerInterval | None = None,
    ) -> None:
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.metrics = metrics
        self._log = logger or OncePerInterval()
        self._conns: dict[asyncio.BaseTransport, _Connection] = {}
        #: connections not being handled, longest idle first (a dict keeps insertion order)
        self._idle: dict[_Connection, None] = {}
        self.closed: dict[str, int] = {}

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that guards ``factory``'s protocols."""
        return lambda: _GuardedProtocol(self, factory())

    # -- connection events (from _GuardedProtocol) -------------------------------------------

    def opened(self, transport: asyncio.Transport) -> _Connection | None:
        """A new connection; None when it was refused (at the cap with nothing idle)."""
        if len(self._conns) >= self.max_connections and not self._evict():
            self._count("refused")
            self._log.warning(
                "http.connection_refused",
                open=len(self._conns),
                max_connections=self.max_connections,
            )
            transport.write(_REFUSED % len(_REFUSED_BODY) + _REFUSED_BODY)
            transport.close()
            return None
        conn = _Connection(transport, asyncio.get_running_loop().time())
        self._conns[transport] = conn
        self._idle[conn] = None
        return conn

    def reading(self, conn: _Connection) -> None:
        """The first byte of a request arrived on an idle connection: its read deadline runs."""
        loop = asyncio.get_running_loop()
        conn.state = "reading"
        conn.reading_since = now = loop.time()
        conn.timer = loop.call_at(now + self.read_timeout, self._headers_late, conn)

    def lost(self, conn: _Connection) -> None:
        """The connection closed (by either side)."""
        self._conns.pop(conn.transport, None)
        self._idle.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.closing or conn.state == "handling":
            return
        idle_for = asyncio.get_running_loop().time() - conn.idle_since
        if idle_for >= self.keepalive_timeout - _KEEPALIVE_SLACK:  # aiohttp's keep-alive close
            self._count("keepalive")
            self._log.info(  # routine: keep-alive clients go idle
                "http.keepalive_timeout",
                keepalive_timeout=self.keepalive_timeout,
                detail="idle connections closed",
            )

    # -- the middleware ------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Mark the connection as handling; cancel a handler that still waits for its body
        when the read deadline passes (408)."""
        conn = self._conns.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        loop = asyncio.get_running_loop()
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._idle.pop(conn, None)
        conn.state = "handling"
        deadline = (conn.reading_since or loop.time()) + self.read_timeout
        try:
            if request.content.is_eof():  # no body, or all of it is here
                return await handler(request)
            return await self._with_deadline(request, handler, deadline)
        finally:
            conn.state = "idle"
            conn.reading_since = None
            conn.idle_since = loop.time()
            if conn.transport in self._conns:
                self._idle[conn] = None

    async def _with_deadline(
        self, request: web.Request, handler: Handler, deadline: float
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        cm = asyncio.timeout(None)
        try:
            async with cm:

                def expire() -> None:
                    if not request.content.is_eof():  # the handler still waits for the body
                        cm.reschedule(loop.time())

                timer = loop.call_at(deadline, expire)
                try:
                    return await handler(request)
                finally:
                    timer.cancel()
        except TimeoutError:
            if not cm.expired():
                raise
        self._count("read_timeout")
        self._log.warning(
            "http.read_timeout",
            phase="body",
            read_timeout=self.read_timeout,
            remote=request.remote,
            path=request.path,
        )
        # the rest of the body is not waited for: aiohttp closes the connection after the answer
        request.content.set_exception(TimeoutError("http.read_timeout"))
        return error_response(
            408,
            "request_timeout",
            f"the request body did not arrive within {self.read_timeout:g} s",
            {hdrs.CONNECTION: "close"},
        )

    # -- internals ----------------------------------------------------------------------------

    def _headers_late(self, conn: _Connection) -> None:
        conn.timer = None
        if conn.state != "reading" or conn.transport.is_closing():
            return
        self._count("read_timeout")
        self._log.warning(
            "http.read_timeout",
            phase="headers",
            read_timeout=self.read_timeout,
            remote=_remote(conn.transport),
        )
        self._close(conn)

    def _evict(self) -> bool:
        """Close the longest-idle connection; False when every connection is being handled."""
        for conn in self._idle:
            self._count("evicted")
            self._log.warning(
                "http.connection_evicted",
                open=len(self._conns),
                max_connections=self.max_connections,
                detail="the longest-idle connection was closed for a new one",
            )
            self._close(conn)
            return True
        return False

    def _close(self, conn: _Connection) -> None:
        conn.closing = True
        self._idle.pop(conn, None)
        self._conns.pop(conn.transport, None)
        conn.transport.close()

    def _count(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1
        self.metrics.connection_closed(reason)


def _remote(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class BodyBudget:
    """At most ``max_bytes`` of request bodies held at once (``http.max_inflight_bytes``).

    max_body_bytes: ``http.max_body_bytes``, what a body of unknown final size counts as.
    ``middleware`` answers 503 (``memory_budget``, Retry-After) to a request whose body does
    not fit, before reading any of it; ``held`` is the bytes reserved now."""

    def __init__(self, *, max_bytes: int, max_body_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.held = 0
        self.refused = 0
        self._log = OncePerInterval()

    def size_of(self, request: web.BaseRequest) -> int:
        """Bytes ``request``'s body counts against the budget (0 without a body, and for one
        declared over ``max_body_bytes``, which is refused 413 without being read)."""
        if not request.body_exists:
            return 0
        length = request.content_length
        if length is None or hdrs.CONTENT_ENCODING in request.headers:
            return self.max_body_bytes
        return 0 if length > self.max_body_bytes else length

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit now."""
        limit = self.max_bytes
        if size > SMALL_BODY:
            limit -= self.max_bytes // SMALL_RESERVE_FRACTION
        return self.held + size <= limit or (self.held == 0 and size <= self.max_bytes)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Reserve the body's bytes for the handler's run, or answer 503 without reading."""
        size = self.size_of(request)
        if not size:
            return await handler(request)
        if not self.fits(size):
            self.refused += 1
            self.metrics.unavailable("memory_budget")
            self._log.warning(
                "http.memory_budget",
                held=self.held,
                max_inflight_bytes=self.max_bytes,
                body_bytes=size,
                detail="answered 503 before reading the body",
            )
            # None of the body is read: the client reads the 503 and hangs up (or aiohttp's
            # lingering close gives up after http.read_timeout)
            if request.transport is not None:
                request.transport.pause_reading()
            return error_response(
                503,
                "unavailable",
                "the relay holds http.max_inflight_bytes of request bodies; retry later",
                {hdrs.RETRY_AFTER: RETRY_AFTER_SECONDS, hdrs.CONNECTION: "close"},
            )
        self.held += size
        try:
            return await handler(request)
        finally:
            self.held -= size


def edge_limits(http: HttpSettings, metrics: Metrics) -> tuple[ConnectionGuard, BodyBudget]:
    """The guard and the budget of ``http`` (``http.*`` settings), with their gauges
    ``relay_http_connections`` and ``relay_http_inflight_bytes``."""
    guard = ConnectionGuard(
        read_timeout=http.read_timeout,
        keepalive_timeout=http.keepalive_timeout,
        max_connections=http.max_connections,
        metrics=metrics,
    )
    budget = BodyBudget(
        max_bytes=http.max_inflight_bytes, max_body_bytes=http.max_body_bytes, metrics=metrics
    )
    metrics.gauge_callback(
        "relay_http_connections", "Client connections open now.", lambda: guard.open_connections
    )
    metrics.gauge_callback(
        "relay_http_inflight_bytes",
        "Request body bytes reserved now against http.max_inflight_bytes.",
        lambda: budget.held,
    )
    return guard, budget


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite`` with ``ConnectionGuard`` between the socket and aiohttp's
    protocol: a TCP listener on ``host:port`` (``port`` 0: any free port; ``bound`` gives the
    addresses after ``start``). ``reuse_port`` as for ``loop.create_server``."""

    __slots__ = ("_guard", "_host", "_listener", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        host: str,
        port: int,
        *,
        ssl_context: Any = None,
        backlog: int = 1024,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        """``http://host:port`` (``https://`` with TLS) as asked for."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def bound(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket (empty before ``start``)."""
        sockets = self._listener.sockets if self._listener is not None else ()
        return [sock.getsockname()[:2] for sock in sockets]

    async def start(self) -> None:
        """Listen (OSError when the address is in use or cannot be bound). With TLS, a
        handshake must end within ``http.read_timeout`` (the event loop's default is 60 s): a
        connection still shaking hands is not yet the guard's to count or time, so without
        this a stranger's half-sent ClientHellos would each hold a file descriptor a minute."""
        await super().start()
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._guard.read_timeout}
        self._server = self._listener = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
            **tls,
        )


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` (open files, sockets included) to the hard limit and
    log both; returns (soft, hard) in force afterwards. A refusal (a seccomp filter, say) is
    logged as a warning and the limits stay as they were."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("relay.nofile_limit", soft=soft, hard=hard, raised=False)
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("relay.nofile_limit", soft=soft, hard=hard, raised=False, error=str(exc))
        return soft, hard
    log.info("relay.nofile_limit", soft=hard, hard=hard, raised=True, was=soft)
    return hard, hard
