"""Limits at the HTTP edge (relay/http/limits.py): slow and idle clients, the connection cap,
the file-descriptor limit and the budget of body bytes in memory. Real relays, raw sockets
for the misbehaving clients; every wait is on a condition (an EOF, an answer, a metric)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from relay.http.app import BUDGET, GUARD
from relay.http.limits import OncePerInterval
from relay.settings import HttpSettings
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    StartRelay,
    relay_environ,
    wait_for,
)
from tests.test_access import metric

EVENT = b'{"event":"order.created","reference":"limits-%d"}'


class Raw:
    """A raw TCP client of a relay: what it writes is exactly what the relay reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Raw:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=2**20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self, timeout: float = 20) -> bytes:
        """Everything the relay sends until it closes the connection."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def head(length: int, *, token: str | None = TOKEN, path: str = "/retm/events") -> bytes:
    """A webhook request's head declaring a body of ``length`` bytes."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    """The status code and the JSON body of one raw HTTP/1.1 answer."""
    head_part, _, body = raw.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), orjson.loads(body)


@pytest.fixture
async def raws() -> AsyncIterator[list[Raw]]:
    """Raw connections closed after the test."""
    opened: list[Raw] = []
    yield opened
    for raw in opened:
        raw.close()


async def connect(url: str, raws: list[Raw]) -> Raw:
    raw = await Raw.open(url)
    raws.append(raw)
    return raw


# -- slow and idle clients --------------------------------------------------------------------


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered to ``limit`` (children started meanwhile
    inherit it), then restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def trickle(raw: Raw, data: bytes, stop: asyncio.Event) -> None:
    """Send ``data`` a byte at a time, one every 200 ms, until ``stop`` (a slow client)."""
    for i in range(len(data)):
        if stop.is_set():
            return
        with contextlib.suppress(ConnectionError):
            await raw.send(data[i : i + 1])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await stop.wait()


async def test_idle_and_slow_clients_leave_webhooks_and_healthz_answered(
    broker: Broker, names: Names, tmp_path: Path, raws: list[Raw]
) -> None:
    """A relay started with a soft file limit of 1024 raises it to the hard limit (and logs
    it); with 1,500 idle connections and 20 clients trickling a request line or a body held
    open, a new webhook is answered 200 and published, and /healthz answers 200."""
    tap = await broker.tap(names.exchange)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 4096, "the test needs a hard RLIMIT_NOFILE of at least 4096"
    with soft_nofile(1024):
        relay = await RelayProcess(relay_environ(names, tmp_path / "state")).start(
            wait_listening=False
        )
    stop = asyncio.Event()
    slow: list[asyncio.Task[None]] = []
    own = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # room for this side's sockets
    try:
        relay.url = (await relay.wait_log("relay.listening"))["url"]
        for _ in range(1500):
            await connect(relay.url, raws)
        for i in range(20):
            raw = await connect(relay.url, raws)
            data = b"POST /retm/events HTTP/1.1\r\nHost: relay\r\n" if i % 2 else head(900)
            slow.append(asyncio.create_task(trickle(raw, data + b"x" * 900, stop)))
        await wait_for(
            lambda: _at_least(relay.url, "relay_http_connections", 1520),
            timeout=30,
            what="1,520 connections open at the relay",
        )
        async with aiohttp.ClientSession() as session:
            async with session.post(
                relay.url + "/retm/events",
                data=EVENT % 1,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            ) as r:
                webhook = r.status, orjson.loads(await r.read())
            async with session.get(relay.url + "/healthz") as r:
                healthz = r.status
        published = await tap.get()
    finally:
        stop.set()
        await asyncio.gather(*slow)
        await relay.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, own)

    assert webhook[0] == 200
    assert webhook[1]["status"] == "accepted"
    assert healthz == 200
    assert published.body == EVENT % 1
    (line,) = relay.logged("relay.nofile_limit")
    assert (line["raised"], line["was"], line["soft"], line["hard"]) == (True, 1024, hard, hard)


async def _at_least(url: str, sample: str, value: float) -> bool:
    try:
        found = await metric(url, sample)
    except aiohttp.ClientError:
        return False
    return found is not None and found >= value


async def test_read_timeout_closes_slow_headers_and_answers_408_to_a_slow_body(
    start_relay: StartRelay, raws: list[Raw]
) -> None:
    """With http.read_timeout = 1: a client that sent half a request line is disconnected; an
    authenticated client that sent its headers and part of its body gets 408
    ``request_timeout`` and is disconnected; both are counted as read_timeout, logged once
    (the second within the minute only counted), and nothing was published."""
    relay = await start_relay(RELAY_HTTP_READ_TIMEOUT="1")
    with capture_logs() as logs:
        half = await connect(relay.url, raws)
        await half.send(b"POST /retm/ev")
        body = await connect(relay.url, raws)
        await body.send(head(100) + b'{"event":"order.created"')
        cut = await half.until_closed()
        answered = await body.until_closed()

    assert cut == b""
    status, error = status_and_body(answered)
    assert status == 408
    assert error == {
        "error": "request_timeout",
        "detail": "the request body did not arrive within 1 s",
    }
    assert b"\r\nConnection: close\r\n" in answered
    assert (
        await metric(relay.url, 'relay_http_connections_closed_total{reason="read_timeout"}') == 2
    )
    lines = [line for line in logs if line["event"] == "http.read_timeout"]
    assert [(line["phase"], line["since_last"]) for line in lines] == [("headers", 1)]
    assert (
        await metric(relay.url, 'relay_requests_total{route="events",outcome="accepted"}') is None
    )


async def test_keepalive_timeout_closes_idle_connections_and_counts_them(
    start_relay: StartRelay, raws: list[Raw]
) -> None:
    """With http.keepalive_timeout = 1, a connection that never sends a byte and one idle
    after an answered request are both closed by the relay and counted as keepalive."""
    relay = await start_relay(RELAY_HTTP_KEEPALIVE_TIMEOUT="1")
    silent = await connect(relay.url, raws)
    used = await connect(relay.url, raws)
    await used.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    answer = await used.reader.readuntil(b"\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert await silent.until_closed() == b""
    await used.until_closed()  # the rest of the answer, then the relay's close
    await wait_for(
        lambda: _at_least(relay.url, 'relay_http_connections_closed_total{reason="keepalive"}', 2),
        what="two keep-alive closes counted",
    )
    assert await metric(relay.url, 'relay_http_connections_closed_total{reason="keepalive"}') == 2


async def test_max_connections_evicts_the_longest_idle_then_refuses(
    start_relay: StartRelay, broker: Broker, names: Names, raws: list[Raw]
) -> None:
    """At http.max_connections (16) a new connection makes the relay close the longest-idle
    one (counted as evicted), so a webhook is still answered and published; when all 16 are
    busy in a handler, a new connection gets a short 503 and is closed (counted as refused)."""
    tap = await broker.tap(names.exchange)
    relay = await start_relay(RELAY_HTTP_MAX_CONNECTIONS="16")
    idle = [await connect(relay.url, raws) for _ in range(16)]
    await wait_for(lambda: _at_least(relay.url, "relay_http_connections", 16), what="16 open")
    answer = await relay.event(EVENT % 2)
    published = await tap.get()
    first_closed = await idle[0].until_closed()

    assert answer.status == 200
    assert published.body == EVENT % 2
    assert first_closed == b""
    evicted = await metric(relay.url, 'relay_http_connections_closed_total{reason="evicted"}')
    assert evicted is not None and evicted >= 2  # the webhook's and the /metrics connection

    for raw in idle:
        raw.close()
    guard = relay.relay.app[GUARD]
    busy = []
    for _ in range(16):  # each waits in the handler for a body that does not come
        raw = await connect(relay.url, raws)
        await raw.send(head(100))
        busy.append(raw)
    await wait_for(
        lambda: (
            guard.open_connections == 16
            and all(c.state == "handling" for c in guard._conns.values())
        ),
        what="16 connections in their handlers",
    )
    refused = await connect(relay.url, raws)
    status, error = status_and_body(await refused.until_closed())

    assert status == 503
    assert error == {
        "error": "too_many_connections",
        "detail": "the relay is at http.max_connections",
    }
    assert guard.closed["refused"] == 1


def test_once_per_interval_logs_the_first_then_one_line_a_minute() -> None:
    """The first occurrence is logged at once; later ones within the interval are only
    counted, and the next line after it says how many there were."""
    now = [100.0]
    limited = OncePerInterval(60, clock=lambda: now[0])
    with capture_logs() as logs:
        limited.warning("http.read_timeout", phase="headers")
        for _ in range(5):
            now[0] += 10
            limited.warning("http.read_timeout", phase="headers")
        now[0] += 15
        limited.warning("http.read_timeout", phase="body")

    assert [(line["since_last"], line["phase"]) for line in logs] == [
        (1, "headers"),
        (6, "body"),
    ]


# -- the budget of body bytes in memory ---------------------------------------------------------


async def test_bodies_beyond_max_inflight_bytes_get_503_before_being_read(
    start_relay: StartRelay, broker: Broker, names: Names, raws: list[Raw]
) -> None:
    """With http.max_inflight_bytes = 128 KiB, two 60 KiB bodies being received hold their
    share; a third 60 KiB webhook is answered 503 with Retry-After at once, although none of
    its body was sent; a chunked one (counted as http.max_body_bytes) too; a small webhook
    still passes; the two slow ones finish with 200; every 200 is on the queue."""
    tap = await broker.tap(names.exchange)
    relay = await start_relay(
        RELAY_HTTP_MAX_BODY_BYTES="65536", RELAY_HTTP_MAX_INFLIGHT_BYTES="131072"
    )
    bodies = [_padded(10 + i, 61_440) for i in range(3)]
    holders = []
    for body in bodies[:2]:
        raw = await connect(relay.url, raws)
        await raw.send(head(len(body)) + body[:1000])
        holders.append(raw)
    budget = relay.relay.app[BUDGET]
    await wait_for(lambda: budget.held == 2 * 61_440, what="two bodies reserved")

    third = await connect(relay.url, raws)
    await third.send(head(len(bodies[2])))
    refused = await third.reader.readuntil(b"}")  # answered with none of the body sent
    chunked = await connect(relay.url, raws)
    await chunked.send(
        b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    refused_chunked = await chunked.reader.readuntil(b"}")
    small = await relay.event(EVENT % 3)
    for raw, body in zip(holders, bodies[:2], strict=True):
        await raw.send(body[1000:])
    finished = [status_and_body(await raw.reader.readuntil(b"}")) for raw in holders]
    received = {m.body for m in await tap.take(3)}

    status, error = status_and_body(refused)
    assert status == 503
    assert error["error"] == "unavailable"
    assert b"\r\nRetry-After: 5\r\n" in refused
    assert status_and_body(refused_chunked)[0] == 503
    assert small.status == 200
    assert [f[0] for f in finished] == [200, 200]
    assert received == {bodies[0], bodies[1], EVENT % 3}
    assert await metric(relay.url, 'relay_unavailable_total{reason="memory_budget"}') == 2
    assert budget.held == 0


def _padded(n: int, size: int) -> bytes:
    prefix = b'{"event":"order.created","reference":"big-%d","pad":"' % n
    return prefix + b"x" * (size - len(prefix) - 2) + b'"}'


def test_unit_sets_the_open_file_and_memory_limits() -> None:
    """systemd/retm-relay.service sets LimitNOFILE=65536 (far above http.max_connections'
    default), and MemoryHigh below MemoryMax, both above the bench's 400 MB target."""
    unit = (Path(__file__).resolve().parent.parent / "systemd/retm-relay.service").read_text()
    values = dict(line.split("=", 1) for line in unit.splitlines() if line and line[0].isupper())
    megabytes = {key: int(values[key].removesuffix("M")) for key in ("MemoryHigh", "MemoryMax")}

    assert values["LimitNOFILE"] == "65536"
    assert int(values["LimitNOFILE"]) > 4 * HttpSettings().max_connections
    assert 400 < megabytes["MemoryHigh"] < megabytes["MemoryMax"]
