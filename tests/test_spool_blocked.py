"""A broker alarm (connection.blocked): events go to the spool instead of waiting for the
publish deadline, and are forwarded once the alarm clears. The alarm is raised on a RabbitMQ
node of this test's own (its own name, ports, data directory and Erlang cookie), never on the
shared broker other tests use."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from relay.http.app import PUBLISHER, SPOOL
from tests.conftest import Names, StartRelay, wait_for
from tests.engines import EngineError, RabbitNode, start_rabbit_node


@pytest.fixture
async def private_node(tmp_path: Path) -> AsyncIterator[RabbitNode]:
    """A private RabbitMQ node (tests/engines.py; fails loudly when RabbitMQ is missing)."""
    try:
        node = await start_rabbit_node(tmp_path / "rabbit")
    except EngineError as exc:
        pytest.fail(str(exc))
    yield node
    await node.stop()
    shutil.rmtree(node.home, ignore_errors=True)


@pytest.mark.slow
async def test_blocked_connection_spools_at_once_and_forwards_after_the_alarm(
    start_relay: StartRelay, private_node: RabbitNode, names: Names
) -> None:
    """Under a memory alarm the broker blocks the relay's connection (after its first publish,
    which is spooled at its deadline): later events are spooled without waiting, readiness
    says degraded and why; once the alarm clears, every event reaches the queue once, in
    order (the first one by its late confirm, not a second copy)."""
    relay = await start_relay(RELAY_AMQP_URL=private_node.url, RELAY_AMQP_PUBLISH_TIMEOUT="1")
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    connection = await aio_pika.connect(private_node.url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(names("blocked"))
    await queue.bind(exchange, "#")
    sent = [b'{"event":"order.created","reference":"alarm-%d"}' % i for i in range(4)]

    before = await relay.event(sent[0])
    await private_node.ctl("set_vm_memory_high_watermark", "0")
    first_blocked = await relay.event(sent[1])
    await wait_for(lambda: publisher.blocked, what="connection.blocked")
    during = [await relay.event(b) for b in sent[2:]]
    readiness = await relay.get("/readyz")
    metrics = (await relay.get("/metrics")).body
    await private_node.ctl("set_vm_memory_high_watermark", "0.4")
    await wait_for(lambda: spool.depth == 0, timeout=20, what="the spool to drain")
    received = [await queue.get(timeout=5) for _ in sent]
    extra = await queue.get(fail=False)
    await connection.close()

    assert [a.status for a in (before, first_blocked, *during)] == [200] * 4
    assert readiness.status == 503
    assert readiness.body["status"] == "degraded"
    assert readiness.body["reasons"]["broker"] == (
        "the broker blocked the connection (memory or disk alarm); events are spooled"
    )
    assert 'relay_spooled_total{reason="timeout"} 1.0' in metrics
    assert 'relay_spooled_total{reason="queued"} 2.0' in metrics
    assert [m.body for m in received] == sent
    assert extra is None
    assert spool.late_confirms == 1
