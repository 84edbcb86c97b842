"""Broker faults survived: a cut link, a stalled link, a nack, a full spool and a graceful stop.
Every event answered 2xx ends on the queue; nothing is claimed and then lost."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import orjson
import pytest

from relay.http.app import DEDUP, FORWARDER, PUBLISHER, SPOOL
from relay.service import StartupError
from relay.spool.store import connect, read_stats
from tests.conftest import (
    PUBLISH_PATHS,
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    Tap,
    assert_only_sentinel_follows,
    proxy_url,
    wait_for,
)
from tests.proxy import FaultProxy

# the whole contract through the fast path and through aiormq's public basic_publish
pytestmark = pytest.mark.parametrize("publish_path", PUBLISH_PATHS)


def body(tag: str, n: int) -> bytes:
    return orjson.dumps({"event": "order.created", "reference": f"{tag}-{n}"})


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


async def test_link_cut_spools_in_order_and_forwards_once(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """Events posted before, during and after a cut broker link are all answered 200 and
    reach the queue exactly once, in the order they were answered; readiness is 503
    ``degraded`` while the link is down and 200 again once the spool is drained."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy))
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    tap = await broker.tap(names.exchange)
    sent = [body("cut", i) for i in range(15)]

    before = [await relay.event(b) for b in sent[:5]]
    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    during = [await relay.event(b) for b in sent[5:10]]
    depth_while_cut = spool.depth
    readiness_while_cut = await relay.get("/readyz")
    fault_proxy.restore()
    after = [await relay.event(b) for b in sent[10:]]
    await wait_for(lambda: spool.depth == 0, what="the spool to drain")
    readiness_after = await relay.get("/readyz")

    assert [a.status for a in before + during + after] == [200] * 15
    assert {a.body["status"] for a in before + during + after} == {"accepted"}
    assert depth_while_cut == 5
    assert readiness_while_cut.status == 503
    assert readiness_while_cut.body["status"] == "degraded"
    assert readiness_while_cut.body["reasons"]["broker"].startswith("broker link down: ")
    assert readiness_while_cut.body["reasons"]["broker"].endswith("; events are spooled")
    assert readiness_after.status == 200
    assert [m.body for m in await tap.take(15)] == sent
    await assert_only_sentinel_follows(relay, tap)
    metrics = (await relay.get("/metrics")).body
    # the first event found the link down; the next ones queued behind it (spool order)
    assert 'relay_spooled_total{reason="disconnected"} 1.0' in metrics
    assert metric(metrics, 'relay_spooled_total{reason="queued"}') >= 4
    assert metric(metrics, "relay_spool_forwarded_total") >= 5
    assert metric(metrics, "relay_spool_events") == 0


async def test_link_cut_under_concurrent_load_loses_nothing(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """200 events posted at once while the link is cut in the middle of them: every one is
    answered 200 and is on the queue; a second copy appears only for publishes the dying
    link left unconfirmed, and each such copy is counted."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy))
    spool = relay.relay.app[SPOOL]
    tap = await broker.tap(names.exchange)
    sent = [body("load", i) for i in range(200)]

    async def cut_soon() -> None:
        await wait_for(lambda: fault_proxy.open_connections > 0, what="a link")
        await asyncio.sleep(0.01)
        fault_proxy.cut()

    cutter = asyncio.ensure_future(cut_soon())
    answers = await asyncio.gather(*(relay.event(b) for b in sent))
    await cutter
    fault_proxy.restore()
    await wait_for(lambda: spool.depth == 0, timeout=20, what="the spool to drain")

    assert [a.status for a in answers] == [200] * 200
    metrics = (await relay.get("/metrics")).body
    copies = int(metric(metrics, "relay_spool_redelivered_total"))
    received: list[bytes] = []
    while len(set(received)) < 200:
        received.append((await tap.get()).body)
    assert set(received) == set(sent)
    await assert_only_sentinel_follows_allowing(relay, tap, sent, copies - (len(received) - 200))


async def test_stalled_link_answers_in_time_and_reconnects(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """A link that stops passing bytes without FIN or RST: answers stay well inside 10 s (the
    event is spooled after the publish deadline), the relay drops the dead link itself,
    reconnects once the path is back, forwards the event, and leaves no waiter behind."""
    relay = await start_relay(
        RELAY_AMQP_URL=proxy_url(fault_proxy, heartbeat=2),
        RELAY_AMQP_PUBLISH_TIMEOUT="1",
        RELAY_AMQP_CONNECT_TIMEOUT="1",
    )
    app = relay.relay.app
    publisher, spool, dedup = app[PUBLISHER], app[SPOOL], app[DEDUP]
    tap = await broker.tap(names.exchange)
    reconnects = publisher.reconnects
    sent = [body("stall", i) for i in range(3)]

    fault_proxy.stall()
    started = time.monotonic()
    answers = await asyncio.gather(*(relay.event(b) for b in sent))
    elapsed = time.monotonic() - started
    await wait_for(lambda: not publisher.connected.is_set(), what="the dead link to be dropped")
    readiness = await relay.get("/readyz")
    fault_proxy.restore()
    await wait_for(publisher.connected.is_set, timeout=15, what="the relay to reconnect")
    await wait_for(lambda: spool.depth == 0, what="the spool to drain")

    assert [a.status for a in answers] == [200] * 3
    assert elapsed < 10
    assert readiness.status == 503
    assert publisher.reconnects > reconnects
    metrics = (await relay.get("/metrics")).body
    copies = int(metric(metrics, "relay_spool_redelivered_total"))
    received: list[bytes] = []
    while len(set(received)) < 3:
        received.append((await tap.get()).body)
    assert set(received) == set(sent)
    await assert_only_sentinel_follows_allowing(relay, tap, sent, copies - (len(received) - 3))
    assert (dedup.in_flight, spool.held, publisher.in_flight()) == (0, {}, 0)
    assert app[FORWARDER].forwarded >= 3


async def assert_only_sentinel_follows_allowing(
    relay: RunningRelay, tap: Tap, allowed: list[bytes], copies: int
) -> None:
    """Like ``assert_only_sentinel_follows``, but up to ``copies`` second copies of ``allowed``
    bodies (counted by the relay as redelivered) may arrive before the sentinel."""
    assert isinstance(tap, Tap)
    assert copies >= 0, "more second copies arrived than the relay counted"
    sentinel = body("sentinel", uuid.uuid4().int)
    assert (await relay.event(sentinel)).status == 200
    extra = []
    while (message := await tap.get()).body != sentinel:
        extra.append(message.body)
    assert set(extra) <= set(allowed)
    assert len(extra) <= copies


async def test_nacked_event_is_spooled_and_delivered_once_there_is_room(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """A queue with x-max-length=1 and x-overflow=reject-publish nacks the second event: it
    is answered 200 only because it was spooled, and reaches the queue once the first was
    consumed; it is never claimed as delivered and then lost."""
    relay = await start_relay()
    assert broker.channel is not None
    exchange = await broker.channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await broker.channel.declare_queue(
        names("full"), arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    broker.forget_later(queues=(queue.name,))
    await queue.bind(exchange, "order.#")
    spool = relay.relay.app[SPOOL]
    first, second = body("nack", 1), body("nack", 2)

    a = await relay.event(first)
    b = await relay.event(second)
    depth_while_full = spool.depth
    metrics = (await relay.get("/metrics")).body
    head = await queue.get(timeout=5)
    await head.ack()
    await wait_for(lambda: spool.depth == 0, timeout=15, what="the nacked event to be forwarded")
    tail = await queue.get(timeout=5)
    await tail.ack()

    assert (a.status, b.status) == (200, 200)
    assert depth_while_full == 1
    assert 'relay_spooled_total{reason="nacked"} 1.0' in metrics
    assert (head.body, tail.body) == (first, second)
    assert await queue.get(fail=False) is None


async def test_full_spool_answers_503_until_drained(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """With the broker away and spool.max_events reached, webhooks answer 503 with
    Retry-After and readiness is 503 ``unready`` naming the spool; once the broker is back and
    the spool drained, both are 200 again and every accepted event is on the queue."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_SPOOL_MAX_EVENTS="3")
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    tap = await broker.tap(names.exchange)
    sent = [body("full", i) for i in range(5)]

    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    spooled = [await relay.event(b) for b in sent[:3]]
    refused = await relay.event(sent[3])
    readiness_full = await relay.get("/readyz")
    metrics_full = (await relay.get("/metrics")).body
    fault_proxy.restore()
    await wait_for(lambda: spool.depth == 0, what="the spool to drain")
    readiness_drained = await relay.get("/readyz")
    later = [await relay.event(b) for b in sent[3:]]

    assert [a.status for a in spooled] == [200] * 3
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    assert refused.body == {
        "error": "unavailable",
        "detail": "the event could not be made durable (spool_full); retry later",
    }
    assert readiness_full.status == 503
    assert readiness_full.body["status"] == "unready"
    assert readiness_full.body["reasons"]["spool"].startswith("spool full: 3 events, ")
    assert metric(metrics_full, "relay_spool_full") == 1
    assert 'relay_unavailable_total{reason="spool_full"} 1.0' in metrics_full
    assert readiness_drained.status == 200
    assert [a.status for a in later] == [200, 200]
    assert [m.body for m in await tap.take(5)] == sent
    await assert_only_sentinel_follows(relay, tap)


async def test_graceful_stop_keeps_spooled_events_for_the_next_start(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy, tmp_path
) -> None:
    """A relay stopped while its spool holds events leaves them, whole, in the file; the next
    relay on the same state.dir forwards them in order."""
    state = str(tmp_path / "shared-state")
    first = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_STATE_DIR=state)
    publisher = first.relay.app[PUBLISHER]
    tap = await broker.tap(names.exchange)
    sent = [body("stop", i) for i in range(3)]

    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    answers = [await first.event(b) for b in sent]
    spool_path = first.relay.app[SPOOL].path
    await first.relay.stop()
    conn = connect(spool_path)
    left = read_stats(conn).events
    conn.close()
    fault_proxy.restore()
    second = await start_relay(RELAY_STATE_DIR=state)
    await wait_for(lambda: second.relay.app[SPOOL].depth == 0, what="the spool to drain")

    assert [a.status for a in answers] == [200] * 3
    assert left == 3
    assert [m.body for m in await tap.take(3)] == sent
    assert (await second.event(sent[0])).body["status"] == "duplicate"
    await assert_only_sentinel_follows(second, tap)


async def test_a_stalled_broker_does_not_hold_up_the_start(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """With the broker path stalled at start-up the relay still starts (it waits about a
    second for the broker), says ``degraded``, spools what it gets, and forwards it once the
    path is back."""
    tap = await broker.tap(names.exchange)
    fault_proxy.stall()
    relay = await start_relay(
        RELAY_AMQP_URL=proxy_url(fault_proxy),
        RELAY_AMQP_CONNECT_TIMEOUT="3",
        RELAY_AMQP_PUBLISH_TIMEOUT="1",
    )
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    readiness = await relay.get("/readyz")
    answer = await relay.event(body("slow-start", 1))
    fault_proxy.restore()
    await wait_for(publisher.connected.is_set, timeout=15, what="the link")
    await wait_for(lambda: spool.depth == 0, what="the spool to drain")

    assert readiness.status == 503
    assert readiness.body["status"] == "degraded"
    assert answer.status == 200
    assert (await tap.get()).body == body("slow-start", 1)


async def test_a_topology_mismatch_still_stops_the_start(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """An exchange that exists with another type stops the start with one clear error, spool
    or not."""
    assert broker.channel is not None
    await broker.channel.declare_exchange(names.exchange, aio_pika.ExchangeType.FANOUT)
    broker.forget_later(exchanges=(names.exchange,))

    with pytest.raises(StartupError) as info:
        await start_relay()

    assert str(info.value).startswith(f"exchange {names.exchange!r} exists on the broker")
