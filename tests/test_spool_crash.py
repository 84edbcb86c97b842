"""Crash safety: a relay killed with SIGKILL right after a 2xx loses nothing. The relay runs as
a real process (``python -m relay serve``), as systemd runs it."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    proxy_url,
    relay_environ,
    wait_for,
)
from tests.proxy import FaultProxy

Spawn = Callable[[dict[str, str]], Awaitable[RelayProcess]]


@pytest.fixture
async def spawn(broker: Broker, names: Names) -> AsyncIterator[Spawn]:
    processes: list[RelayProcess] = []
    broker.forget_later(exchanges=(names.exchange, *names.own), queues=names.own)

    async def start(environ: dict[str, str]) -> RelayProcess:
        p = await RelayProcess(environ).start()
        processes.append(p)
        return p

    yield start
    for p in processes:
        await p.kill()


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
        first.signal(signal.SIGKILL)
        code = await first.wait()
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
