"""Shared fixtures: a real RabbitMQ, real relays started as production starts them, unique names.

Every test gets its own exchange, unrouted exchange/queue and archive stream names
(``test.<hex>...``) and deletes them afterwards, so tests never interfere and never change
global broker settings.
Assertions consume from real queues; waits are on conditions (a message arriving, a state
flag), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from multidict import CIMultiDict

from relay.http.app import PUBLISHER
from relay.service import Relay
from relay.settings import Settings, load_settings
from relay.spool.store import Spool
from tests.proxy import FaultProxy

AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TOKEN = "test-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def fixture_bytes(name: str) -> bytes:
    """The raw bytes of a RETM example body (tests/fixtures, described in docs/retm.md)."""
    return (FIXTURES / name).read_bytes()


def _broker_port() -> int:
    return int(AMQP_URL.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="session", autouse=True)
def _services_answer() -> None:
    """Fail loudly (never skip) when RabbitMQ does not answer: `make test` starts it."""
    try:
        socket.create_connection(("127.0.0.1", _broker_port()), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ does not answer at {AMQP_URL} ({exc}); run `make test`")


@dataclass
class Names:
    """Unique exchange and queue names for one test."""

    prefix: str = field(default_factory=lambda: f"test.{uuid.uuid4().hex[:10]}")

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def unrouted(self) -> str:
        return f"{self.prefix}.unrouted"

    @property
    def rejected(self) -> str:
        """The quarantine exchange and queue (``amqp.rejected_exchange``)."""
        return f"{self.prefix}.rejected"

    @property
    def own(self) -> tuple[str, str]:
        """The relay's own exchange-and-queue names: unrouted, rejected."""
        return (self.unrouted, self.rejected)

    @property
    def archive(self) -> str:
        """The test's archive: a stream and the fanout exchange of the same name."""
        return f"{self.prefix}.archive"

    def __call__(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"


class Tap:
    """A queue bound to an exchange, consumed into an asyncio.Queue for assertions."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def start(self) -> Tap:
        async def on_message(message: AbstractIncomingMessage) -> None:
            await message.ack()
            await self.received.put(message)

        await self.queue.consume(on_message)
        return self

    async def get(self, timeout: float = 10) -> AbstractIncomingMessage:
        """The next message; fails the test after ``timeout`` seconds without one."""
        try:
            async with asyncio.timeout(timeout):
                return await self.received.get()
        except TimeoutError:
            pytest.fail(f"no message on {self.queue.name} within {timeout}s")

    async def take(self, count: int, timeout: float = 10) -> list[AbstractIncomingMessage]:
        return [await self.get(timeout) for _ in range(count)]

    def empty(self) -> bool:
        return self.received.empty()


class Broker:
    """A test's own connection to RabbitMQ, with cleanup of what the test created."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.exchanges: set[str] = set()
        self.queues: set[str] = set()

    async def open(self) -> Broker:
        self.channel = await self.connection.channel()
        return self

    def forget_later(
        self, *, exchanges: tuple[str, ...] = (), queues: tuple[str, ...] = ()
    ) -> None:
        self.exchanges.update(exchanges)
        self.queues.update(queues)

    async def tap(
        self, exchange: str, pattern: str = "#", *, arguments: Mapping[str, Any] | None = None
    ) -> Tap:
        """A fresh queue bound to ``exchange`` with ``pattern`` (declaring the exchange)."""
        assert self.channel is not None
        ex = await self.channel.declare_exchange(
            exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        name = f"{exchange}.q.{uuid.uuid4().hex[:6]}"
        queue = await self.channel.declare_queue(name, arguments=dict(arguments or {}))
        await queue.bind(ex, pattern)
        self.forget_later(exchanges=(exchange,), queues=(name,))
        return await Tap(queue).start()

    async def tap_queue(self, name: str) -> Tap:
        """Consume an existing queue (such as the unrouted queue the relay declares)."""
        assert self.channel is not None
        queue = await self.channel.get_queue(name, ensure=True)
        self.forget_later(queues=(name,))
        return await Tap(queue).start()

    async def cleanup(self) -> None:
        if self.channel is not None:
            await self.channel.close()  # cancels this test's consumers before their queues go
        channel = await self.connection.channel()
        for name in self.queues:
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                channel = await self.connection.channel()
        for name in self.exchanges:
            try:
                await channel.exchange_delete(name)
            except aio_pika.exceptions.AMQPError:
                channel = await self.connection.channel()
        await self.connection.close()


async def read_archive(
    broker: Broker, stream: str, until_body: bytes, timeout: float = 10
) -> list[AbstractIncomingMessage]:
    """Every message in the archive stream ``stream`` from its first, up to and including the
    first whose body is ``until_body`` (post a sentinel event last: the relay archives in
    publish order, so what comes before it is everything archived before it)."""
    channel = await broker.connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await channel.get_queue(stream, ensure=True)
    got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.ack()
        got.put_nowait(message)

    await queue.consume(on_message, arguments={"x-stream-offset": "first"})
    messages: list[AbstractIncomingMessage] = []
    try:
        async with asyncio.timeout(timeout):
            while not messages or messages[-1].body != until_body:
                messages.append(await got.get())
    except TimeoutError:
        pytest.fail(f"{until_body!r} not in the archive {stream} within {timeout}s")
    finally:
        await channel.close()
    return messages


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(AMQP_URL)
    b = await Broker(connection).open()
    yield b
    await b.cleanup()


@pytest.fixture
def names(broker: Broker) -> Names:
    """Unique names for the test; the relay topology under them is deleted afterwards."""
    n = Names()
    broker.forget_later(exchanges=(n.exchange, *n.own, n.archive), queues=(*n.own, n.archive))
    return n


@dataclass
class Answer:
    status: int
    body: Any
    headers: Mapping[str, str]


class RunningRelay:
    """A relay started by the production ``Relay`` class, and an HTTP client for it."""

    def __init__(self, relay: Relay, session: aiohttp.ClientSession) -> None:
        self.relay = relay
        self.session = session

    @property
    def settings(self) -> Settings:
        return self.relay.settings

    @property
    def url(self) -> str:
        return self.relay.url

    async def post(
        self,
        path: str,
        body: bytes,
        *,
        token: str | None = TOKEN,
        content_type: str | None = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """POST raw ``body`` bytes; returns status, parsed JSON body (or text) and headers.
        ``headers`` may repeat a name (a CIMultiDict): every value is sent."""
        all_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        if token is not None:
            all_headers.setdefault("Authorization", f"Bearer {token}")
        if content_type is not None:
            all_headers.setdefault("Content-Type", content_type)
        data: bytes | io.BytesIO = io.BytesIO(body) if len(body) > 512 * 1024 else body
        async with self.session.post(
            self.url + path,
            data=data,
            headers=all_headers,
            allow_redirects=False,
            skip_auto_headers=("Content-Type",),
        ) as response:
            return await _answer(response)

    async def event(self, body: bytes, **kwargs: Any) -> Answer:
        return await self.post(self.settings.http.events_path, body, **kwargs)

    async def get(self, path: str, method: str = "GET") -> Answer:
        async with self.session.request(method, self.url + path, allow_redirects=False) as r:
            return await _answer(r)


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    raw = await response.read()
    try:
        body: Any = orjson.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    return Answer(response.status, body, response.headers)


def relay_environ(names: Names, state_dir: Path, **overrides: str) -> dict[str, str]:
    """The RELAY_* variables of a test relay: port 0, unique topology, a known token."""
    environ = {
        "RELAY_HTTP_PORT": "0",
        "RELAY_AUTH_TOKENS": TOKEN,
        "RELAY_AMQP_URL": AMQP_URL,
        "RELAY_AMQP_EXCHANGE": names.exchange,
        "RELAY_AMQP_UNROUTED_EXCHANGE": names.unrouted,
        "RELAY_AMQP_REJECTED_EXCHANGE": names.rejected,
        "RELAY_ARCHIVE_QUEUE": names.archive,
        "RELAY_STATE_DIR": str(state_dir),
        "RELAY_HTTP_SHUTDOWN_TIMEOUT": "10",
    }
    environ.update(overrides)
    return environ


StartRelay = Callable[..., Awaitable[RunningRelay]]


@pytest.fixture
def publish_path() -> str:
    """How test relays publish (relay/amqp/senders.py): "fast", the default, or "public"
    (aiormq's ``basic_publish``, ``RELAY_AMQP_FAST_PUBLISH=false``). A module runs its tests
    through both with ``pytest.mark.parametrize("publish_path", PUBLISH_PATHS)``."""
    return "fast"


PUBLISH_PATHS = ("fast", "public")


@pytest.fixture
async def start_relay(
    broker: Broker, names: Names, tmp_path: Path, publish_path: str
) -> AsyncIterator[StartRelay]:
    """Start relays with ``RELAY_*`` overrides, as in
    ``await start_relay(RELAY_AMQP_PUBLISH_TIMEOUT="1")``. Each waits until it can make events
    durable unless ``wait_durable=False``, and then publishes on the ``publish_path``."""
    running: list[RunningRelay] = []
    session = aiohttp.ClientSession()

    async def start(*, wait_durable: bool = True, **overrides: str) -> RunningRelay:
        chosen = "RELAY_AMQP_FAST_PUBLISH" in overrides  # a test that sets it checks it
        if publish_path == "public" and not chosen:
            overrides["RELAY_AMQP_FAST_PUBLISH"] = "false"
        environ = relay_environ(names, tmp_path / f"state{len(running)}", **overrides)
        settings = load_settings(None, environ)
        own = (settings.amqp.unrouted_exchange, settings.amqp.rejected_exchange)
        broker.forget_later(
            exchanges=(settings.amqp.exchange, *own, settings.archive.queue),
            queues=(*own, settings.archive.queue),
        )
        relay = Relay(settings)
        await relay.start()
        r = RunningRelay(relay, session)
        running.append(r)
        if wait_durable:
            async with asyncio.timeout(15):
                await relay.wait_durable()
            if not chosen:
                assert relay.app[PUBLISHER].publish_path == publish_path
        return r

    yield start
    for r in reversed(running):
        await r.relay.stop()
    await session.close()


@pytest.fixture
async def relay(start_relay: StartRelay) -> RunningRelay:
    """One relay with the default test settings."""
    return await start_relay()


@pytest.fixture
async def fault_proxy() -> AsyncIterator[FaultProxy]:
    """A TCP proxy in front of RabbitMQ; point ``RELAY_AMQP_URL`` at ``proxy_url(proxy)``."""
    proxy = await FaultProxy(_broker_port()).start()
    yield proxy
    await proxy.close()


def proxy_url(proxy: FaultProxy, heartbeat: int | None = None) -> str:
    base = AMQP_URL.replace(f":{_broker_port()}", f":{proxy.port}")
    return base if heartbeat is None else f"{base}?heartbeat={heartbeat}"


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10, what: str = "condition"
) -> None:
    """Poll ``predicate`` (sync or async) every 20 ms until true; fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def assert_only_sentinel_follows(
    relay: RunningRelay, tap: Tap, event: str = "order.created"
) -> None:
    """Prove that nothing else was published: post a fresh sentinel event and check that it is
    the next message on ``tap`` (the relay publishes on one channel, so anything published
    earlier would arrive first)."""
    sentinel = b'{"event":"%s","reference":"sentinel-%s"}' % (
        event.encode(),
        uuid.uuid4().hex.encode(),
    )
    answer = await relay.event(sentinel)
    assert answer.status == 200, answer
    message = await tap.get()
    assert message.body == sentinel, f"unexpected message before the sentinel: {message.body!r}"


async def spawn_relay(
    *args: str,
    env: Mapping[str, str],
    stdin: Any = asyncio.subprocess.DEVNULL,
    stdout: Any = asyncio.subprocess.PIPE,
    stderr: Any = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start ``python -m relay ARGS`` (the production command line) in the project's root
    with exactly ``env``; stdin, stdout and stderr as for ``create_subprocess_exec``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        env=dict(env),
        cwd=ROOT,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


def spool_at(path: Path, **limits: Any) -> Spool:
    """An unopened Spool at ``path`` with roomy test limits (10 MB, 1,000 events, keys kept an
    hour, 1,000 of them); ``limits`` overrides any of Spool's keyword arguments."""
    options: dict[str, Any] = {
        "max_bytes": 10_000_000,
        "max_events": 1000,
        "dedup_ttl": 3600.0,
        "dedup_max_entries": 1000,
        **limits,
    }
    return Spool(path, **options)


class RelayProcess:
    """``python -m relay serve`` as a real child process (JSON logs on stdout), for signals.

    ``start()`` waits for the ``relay.listening`` log line and learns the bound URL from it;
    ``lines`` keeps every parsed log line; ``wait_log(event)`` waits for a line by event name.
    """

    def __init__(self, environ: Mapping[str, str], args: tuple[str, ...] = ()) -> None:
        self.environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RELAY_LOG_FORMAT": "json",
            **environ,
        }
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.url = ""
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, *, wait_listening: bool = True) -> RelayProcess:
        self.proc = await spawn_relay(
            "serve", *self.args, env=self.environ, stderr=asyncio.subprocess.STDOUT
        )
        self._reader = asyncio.create_task(self._read())
        if wait_listening:
            line = await self.wait_log("relay.listening")
            self.url = line["url"]
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.raw.append(raw)
            try:
                self.lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                self.lines.append({"event": "<non-json>", "text": raw.decode(errors="replace")})
            self._new_line.set()

    async def wait_log(self, event: str, timeout: float = 30) -> dict[str, Any]:
        """The first log line whose ``event`` is ``event`` (waiting for it)."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if line.get("event") == event:
                        return line
                exited = self.proc is not None and self.proc.returncode is not None
                if exited and self._reader is not None and self._reader.done():
                    pytest.fail(f"relay exited before logging {event}: {self.output()}")
                self._new_line.clear()
                await self._new_line.wait()

    def logged(self, event: str) -> list[dict[str, Any]]:
        """Every log line so far whose ``event`` is ``event``."""
        return [line for line in self.lines if line.get("event") == event]

    def output(self) -> str:
        return b"".join(self.raw).decode(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.wait()


# -- Redis (dedup.backend = "redis") ------------------------------------------------------------


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A unique ``dedup.redis_prefix`` on the shared test Redis (DB 15); its keys are deleted
    afterwards. Fails (never skips) when Redis does not answer: `make test` starts it."""
    import redis.asyncio  # noqa: PLC0415 - only the Redis tests need it

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(f"Redis does not answer at {REDIS_URL} ({exc}); run `make test`")
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def free_port() -> int:
    """A TCP port nothing listens on right now (for a private server of a test's own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of a test's own on a spare port, which the test may stop and start again
    (the shared Redis on 6379 is never stopped). No persistence: a restart starts empty."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            stdout=asyncio.subprocess.DEVNULL,
        )
        await wait_for(self._answers, timeout=10, what=f"redis-server on port {self.port}")

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        self.process = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A running private redis-server (see PrivateRedis), stopped after the test."""
    server = PrivateRedis(tmp_path)
    try:
        await server.start()
    except FileNotFoundError:
        pytest.fail("redis-server is not installed; run `make test` (it installs Redis)")
    yield server
    await server.stop()
