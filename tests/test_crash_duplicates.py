"""Crash duplicates: a relay killed with SIGKILL right after a burst forwards again only what
it could not know was confirmed. The relay runs as a real process (``python -m relay serve``),
as systemd runs it, against the real broker."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import orjson

from relay.spool.forward import FORWARD_WINDOW
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
from tests.test_access import metric

BURST = 500


async def health(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as r:
        body: dict[str, object] = orjson.loads(await r.read())
        return body


async def test_kill_9_right_after_a_burst_duplicates_at_most_1_percent(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """500 webhooks posted at once (many spooled: too many publishes in flight, then queued
    behind the spool); right after the last answer the relay is killed with SIGKILL and
    restarted on the same state. Every 2xx event is on the queue, at most 1 % of them twice
    (by message_id), and ``relay_spool_redelivered_total`` counts at least every copy."""
    tap = await broker.tap(names.exchange)
    environ = relay_environ(names, tmp_path / "state")
    first = await RelayProcess(environ).start()
    bodies = [
        b'{"event":"order.created","reference":"burst-%d","pad":"%s"}' % (i, b"y" * 2000)
        for i in range(BURST)
    ]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(body: bytes) -> tuple[int, str]:
            async with session.post(first.url + "/retm/events", data=body, headers=headers) as r:
                answer = orjson.loads(await r.read())
                return r.status, answer.get("id", "")

        answers = await asyncio.gather(*(post(b) for b in bodies))
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL

    second = await RelayProcess(environ).start()
    try:
        spooled_at_start = (await second.wait_log("spool.opened"))["events"]
        await wait_for(
            lambda: _drained(second.url), timeout=60, what="the spool drained after the restart"
        )
        ok = {key for status, key in answers if status == 200}
        copies: dict[str, int] = {}
        while set(copies) != ok:
            message = await tap.get(timeout=30)
            assert message.message_id is not None
            copies[message.message_id] = copies.get(message.message_id, 0) + 1
        sentinel = b'{"event":"order.created","reference":"burst-sentinel"}'
        async with (
            aiohttp.ClientSession() as session,
            session.post(second.url + "/retm/events", data=sentinel, headers=headers) as r,
        ):
            assert r.status == 200
        while (message := await tap.get(timeout=30)).body != sentinel:
            assert message.message_id is not None
            copies[message.message_id] = copies.get(message.message_id, 0) + 1
        redelivered = await metric(second.url, "relay_spool_redelivered_total")
    finally:
        await second.kill()

    twice = sum(count - 1 for count in copies.values())
    assert len(ok) == BURST
    assert set(copies) == ok
    assert twice <= BURST // 100, f"{twice} of {BURST} events came twice"
    assert redelivered is not None and redelivered >= twice
    assert redelivered <= spooled_at_start


async def _drained(url: str) -> bool:
    try:
        spool = (await health(url))["spool"]
    except (aiohttp.ClientError, KeyError):
        return False
    assert isinstance(spool, dict)
    return spool["events"] == 0


async def test_rows_forwarded_again_after_a_crash_are_counted_as_redelivered(
    broker: Broker, names: Names, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """1,000 events spooled while the broker link is cut; once it is back and the forwarder
    drains them, the link stalls (its publishes stay unconfirmed) and the relay is killed
    with SIGKILL. After the restart, the rows it had published without a committed delete
    are reported at the spool's opening (``sent_unconfirmed``, at most the forwarder's
    window), forwarded again, and counted exactly so in ``relay_spool_redelivered_total``;
    every event is on the queue, none twice but those."""
    tap = await broker.tap(names.exchange)
    environ = relay_environ(
        names,
        tmp_path / "state",
        RELAY_AMQP_URL=proxy_url(fault_proxy),
        RELAY_AMQP_PUBLISH_TIMEOUT="1",
    )
    first = await RelayProcess(environ).start()
    bodies = [b'{"event":"order.created","reference":"drain-%d"}' % i for i in range(1000)]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    fault_proxy.cut()
    await first.wait_log("broker.disconnected")
    async with aiohttp.ClientSession() as session:

        async def post(body: bytes) -> int:
            async with session.post(first.url + "/retm/events", data=body, headers=headers) as r:
                await r.read()
                return r.status

        statuses = []
        for start in range(0, len(bodies), 100):
            statuses += await asyncio.gather(*(post(b) for b in bodies[start : start + 100]))
        # Stall as soon as the forwarder has logged its first rows as sent (before it publishes
        # them): a local file polled every 20 ms, where /health was too slow a probe to catch a
        # drain that can end in under half a second (the drain then finished before the stall)
        sent_log = tmp_path / "state" / "spool.db.sent"
        fault_proxy.restore()
        await wait_for(
            lambda: sent_log.exists() and sent_log.stat().st_size > 0,
            timeout=30,
            what="the drain to start",
        )
        fault_proxy.stall()
        # forwarded publishes went unconfirmed: the link stalled (``broker.stalled``), or an
        # event was confirmed just before the stall and its archive copy not
        # (``broker.unconfirmed``); either way the relay resets the link
        await wait_for(
            lambda: any(
                line.get("event") in ("broker.stalled", "broker.unconfirmed")
                for line in first.lines
            ),
            timeout=30,
            what="the forwarded publishes to go unconfirmed",
        )
    first.signal(signal.SIGKILL)
    await first.wait()
    fault_proxy.restore()

    second = await RelayProcess(environ).start()
    try:
        opened = await second.wait_log("spool.opened")
        await wait_for(lambda: _drained(second.url), timeout=60, what="the spool drained")
        copies: dict[bytes, int] = {}
        while set(copies) != set(bodies):
            message = await tap.get(timeout=30)
            copies[message.body] = copies.get(message.body, 0) + 1
        redelivered = await metric(second.url, "relay_spool_redelivered_total")
    finally:
        await second.kill()

    assert statuses == [200] * 1000
    assert 1 <= opened["sent_unconfirmed"] <= FORWARD_WINDOW
    assert redelivered == opened["sent_unconfirmed"]
    assert sum(count - 1 for count in copies.values()) <= opened["sent_unconfirmed"]
