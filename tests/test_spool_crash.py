"""Crash safety: a relay killed with SIGKILL right after a 2xx loses nothing. The relay runs as
a real process (``python -m relay serve``), as systemd runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import TOKEN, Broker, Names, proxy_url, relay_environ, wait_for
from tests.proxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent


class RelayProcess:
    """``python -m relay serve`` in a child process; ``url`` once it listens."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.lines: list[dict[str, object]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> RelayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(self.environ, RELAY_LOG_FORMAT="json")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        await wait_for(lambda: bool(self.url), timeout=15, what="the relay to listen")
        return self

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            self.lines.append(line)
            if line.get("event") == "relay.listening":
                self.url = str(line["url"])

    def logged(self, event: str) -> list[dict[str, object]]:
        return [line for line in self.lines if line.get("event") == event]

    async def kill(self, signum: int = signal.SIGKILL) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        code = await self.process.wait()
        if self._reader is not None:
            await self._reader
        return code


Spawn = Callable[[dict[str, str]], Awaitable[RelayProcess]]


@pytest.fixture
async def spawn(broker: Broker, names: Names) -> AsyncIterator[Spawn]:
    processes: list[RelayProcess] = []
    broker.forget_later(exchanges=(names.exchange, names.unrouted), queues=(names.unrouted,))

    async def start(environ: dict[str, str]) -> RelayProcess:
        p = await RelayProcess(environ).start()
        processes.append(p)
        return p

    yield start
    for p in processes:
        await p.kill(signal.SIGKILL)


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    async with session.post(
        url + "/retm/events",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    ) as response:
        return response.status, orjson.loads(await response.read())


async def test_kill_9_after_2xx_loses_nothing_and_retries_stay_duplicates(
    spawn: Spawn,
    broker: Broker,
    names: Names,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    """An event confirmed by the broker and one spooled while the link was cut are both
    answered 200; the relay is then killed with SIGKILL. After a restart on the same state
    directory the spooled event is forwarded, and RETM's retries of both are answered
    ``duplicate`` (the dedup keys were persisted), so each is on the queue exactly once."""
    environ = relay_environ(names, tmp_path / "state", RELAY_AMQP_URL=proxy_url(fault_proxy))
    tap = await broker.tap(names.exchange)
    confirmed = b'{"event":"order.created","reference":"kill-confirmed"}'
    spooled = b'{"event":"order.created","reference":"kill-spooled"}'

    async with aiohttp.ClientSession() as session:
        first = await spawn(environ)
        a = await post(session, first.url, confirmed)
        assert (await tap.get()).body == confirmed
        fault_proxy.cut()
        await wait_for(lambda: bool(first.logged("broker.disconnected")), what="the cut")
        b = await post(session, first.url, spooled)
        code = await first.kill(signal.SIGKILL)
        fault_proxy.restore()
        second = await spawn(environ)
        forwarded = await tap.get()
        retries = [await post(session, second.url, body) for body in (confirmed, spooled)]

    assert a[0] == 200
    assert a[1]["status"] == "accepted"
    assert b[0] == 200
    assert code == -signal.SIGKILL
    assert forwarded.body == spooled
    assert forwarded.message_id == b[1]["id"]
    assert [r[1]["status"] for r in retries] == ["duplicate", "duplicate"]
    opened = second.logged("spool.opened")
    assert opened
    assert opened[0]["events"] == 1
    assert tap.empty()


async def test_starts_and_spools_with_no_broker_then_forwards(
    spawn: Spawn,
    broker: Broker,
    names: Names,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    """With no broker answering at start-up the relay still starts, tells systemd READY=1
    (it can make events durable: the spool is open), reports readiness 503 ``degraded`` with
    the reason, accepts events into the spool, and forwards them once the broker appears."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    environ = relay_environ(names, tmp_path / "state", RELAY_AMQP_URL=proxy_url(fault_proxy))
    environ["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    tap = await broker.tap(names.exchange)
    sent = [b'{"event":"order.created","reference":"cold-%d"}' % i for i in range(3)]
    fault_proxy.cut()

    async with aiohttp.ClientSession() as session:
        relay = await spawn(environ)
        async with asyncio.timeout(10):
            notified = await asyncio.get_running_loop().sock_recv(notify, 4096)
        async with session.get(relay.url + "/readyz") as r:
            readiness = (r.status, orjson.loads(await r.read()))
        answers = [await post(session, relay.url, body) for body in sent]
        fault_proxy.restore()
        received = [m.body for m in await tap.take(3, timeout=15)]
        await wait_for(lambda: bool(relay.logged("spool.forwarded")), what="forwarding")
        async with session.get(relay.url + "/readyz") as r:
            ready_after = r.status

    notify.close()
    assert notified.startswith(b"READY=1\nSTATUS=serving on ")
    assert readiness[0] == 503
    assert readiness[1]["status"] == "degraded"
    assert "broker" in readiness[1]["reasons"]
    assert [a[0] for a in answers] == [200] * 3
    assert received == sent
    assert ready_after == 200
