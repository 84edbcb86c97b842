"""``retm-relay tail``: live events through a temporary exclusive queue, against real RabbitMQ."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelNotFoundEntity

from relay.http.auth import token_digest
from tests.cli import CliProcess, closed_port, names_environ, run_cli
from tests.conftest import (
    AMQP_URL,
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    fixture_bytes,
    read_archive,
    wait_for,
)

PRINCIPAL = f"token-{token_digest(TOKEN).hex()[:8]}"

ORDER_LINE = (
    "order.created        nakheelember   e10270cd-1273-419e-8545-89ce060e6539 "
    "invoice 4817, total 120.000, 4 products, closed"
)
REFUND_LINE = (
    "order.refunded       nakheelember   4bdaf820-a800-4e19-9fec-721d5cdbb2b9 "
    "invoice 4817, total 120.000, 4 products, refunded"
)


@pytest.fixture
def env(tmp_path: Path, names: Names) -> dict[str, str]:
    config = tmp_path / "empty.toml"
    config.write_text("")
    return names_environ(config, names)


async def test_tail_prints_matching_events_one_line_each(
    relay: RunningRelay, env: dict[str, str]
) -> None:
    """``tail 'order.#'`` prints each order event as routing key, business, reference and a
    summary with the order total; other events are not shown; Ctrl-C exits 0 with the count,
    and the temporary queue is gone."""
    tail = await CliProcess.start("tail", "order.#", env=env)
    try:
        listening = await tail.stderr_line("listening on")
        queue_name = listening.split("listening on ", 1)[1].split(",", 1)[0]
        assert queue_name.startswith("amq.gen-")

        for fixture in ("order.created.json", "customer.created.json", "order.refunded.json"):
            assert (await relay.event(fixture_bytes(fixture))).status == 200

        assert await tail.stdout_line() == ORDER_LINE
        assert await tail.stdout_line() == REFUND_LINE
        result = await tail.finish(signal.SIGINT)
    finally:
        await tail.kill()

    assert result.code == 0, result
    assert result.stdout == ""
    assert result.stderr.endswith("retm-relay tail: 2 events\n")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(ChannelNotFoundEntity):
            await channel.declare_queue(queue_name, passive=True)


async def test_tail_json_prints_the_whole_message_and_stops_after_count(
    relay: RunningRelay, env: dict[str, str], names: Names
) -> None:
    """``tail --json --count 1 'customer.*'``: one JSON line with the exchange, routing key,
    properties, headers and body; then it exits 0 by itself."""
    tail = await CliProcess.start("tail", "--json", "--count", "1", "customer.*", env=env)
    try:
        await tail.stderr_line("listening on")
        raw = fixture_bytes("customer.updated.json")
        assert (await relay.event(raw)).status == 200
        result = await tail.finish(sig=None)
    finally:
        await tail.kill()

    assert result.code == 0, result
    (line,) = result.stdout.splitlines()
    message = json.loads(line)
    body = json.loads(raw)
    key = f"{PRINCIPAL}:customer.updated:{body['reference']}"
    assert message["body"] == body
    assert message["exchange"] == names.exchange
    assert message["routing_key"] == "customer.updated"
    assert message["redelivered"] is False
    properties = message["properties"]
    assert properties["message_id"] == key
    assert properties["type"] == "customer.updated"
    assert properties["content_type"] == "application/json"
    assert properties["delivery_mode"] == 2
    assert properties["app_id"] == "retm-relay"
    headers = message["headers"]
    assert headers["x-retm-event"] == "customer.updated"
    assert headers["x-retm-business"] == "nakheelember"
    assert headers["x-retm-reference"] == body["reference"]
    assert result.stderr.endswith("retm-relay tail: 1 event\n")


async def test_tail_unrouted_exchange_shows_the_intended_routing_key(
    relay: RunningRelay, env: dict[str, str], names: Names, broker: Broker
) -> None:
    """On the unrouted exchange, a line shows the routing key the event was meant for."""
    broker.forget_later(queues=(names.unrouted,))
    tail = await CliProcess.start("tail", "--exchange", names.unrouted, "--count", "1", env=env)
    try:
        await tail.stderr_line("listening on")
        assert (await relay.event(fixture_bytes("order.created.json"))).status == 200
        result = await tail.finish(sig=None)
    finally:
        await tail.kill()

    assert result.code == 0, result
    assert (
        result.stdout
        == ORDER_LINE.replace("order.created        ", "order.created (unrouted) ") + "\n"
    )


async def test_tail_rejected_watches_the_quarantine(
    relay: RunningRelay, env: dict[str, str], names: Names
) -> None:
    """``tail --rejected`` binds to the quarantine: a refused body is one line with the reason
    it was refused; ``--json`` would show its bytes and headers."""
    tail = await CliProcess.start("tail", "--rejected", "--count", "1", env=env)
    try:
        await tail.stderr_line("listening on")
        assert (await relay.event(b"[1,2,3]")).status == 400
        result = await tail.finish(sig=None)
    finally:
        await tail.kill()

    assert result.code == 0, result
    assert result.stdout == f"{'not_object (rejected)':<20} {'-':<14} {'-':<36} 7 bytes\n"
    assert f"bound to {names.rejected} (Ctrl-C stops)" in result.stderr
    assert "reaches only this tail" not in result.stderr  # a fanout: nothing is diverted


async def test_tail_fails_when_the_broker_does_not_answer(env: dict[str, str]) -> None:
    """No broker at amqp.url: exit 1 with one line naming the address (no credentials)."""
    port = closed_port()
    env["RELAY_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{port}/"

    result = await run_cli("tail", env=env)

    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"retm-relay tail: cannot connect to the broker at 127.0.0.1:{port}:"
    )
    assert result.stderr.count("\n") == 1
    assert "guest:guest" not in result.stderr


async def test_tail_fails_when_the_exchange_does_not_exist(env: dict[str, str]) -> None:
    """The exchange was never declared (no relay ran): exit 1 saying so."""
    result = await run_cli("tail", env=env)

    assert result.code == 1
    exchange = env["RELAY_AMQP_EXCHANGE"]
    assert result.stderr.startswith(f"retm-relay tail: exchange '{exchange}' does not exist")


async def test_tail_rejects_a_pattern_that_cannot_match(env: dict[str, str]) -> None:
    """Upper case or spaces can never match a routing key: a usage error, exit 2."""
    result = await run_cli("tail", "Order.#", env=env)

    assert result.code == 2
    assert "is not a binding pattern" in result.stderr


async def queue_depth(name: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(name, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def test_tail_queue_reads_what_waits_and_leaves_it(
    relay: RunningRelay, env: dict[str, str], names: Names, broker: Broker
) -> None:
    """``tail --queue`` prints the messages already waiting on the unrouted queue, oldest
    first, and exits; they are all still there afterwards. ``--ack --count 1`` prints and
    removes the oldest only."""
    broker.forget_later(queues=(names.unrouted,))
    for fixture in ("order.created.json", "order.refunded.json"):
        assert (await relay.event(fixture_bytes(fixture))).status == 200
    await wait_for_depth(names.unrouted, 2)
    unrouted = [
        line.replace(key.ljust(20), f"{key} (unrouted)".ljust(20), 1)
        for line, key in ((ORDER_LINE, "order.created"), (REFUND_LINE, "order.refunded"))
    ]

    browsed = await run_cli("tail", "--queue", names.unrouted, env=env)
    depth_after_browse = await queue_depth(names.unrouted)
    acked = await run_cli("tail", "--queue", names.unrouted, "--ack", "--count", "1", env=env)
    left = await run_cli("tail", "--queue", names.unrouted, "--json", env=env)

    assert browsed.code == 0, browsed
    assert browsed.stdout.splitlines() == unrouted
    assert browsed.stderr.endswith("retm-relay tail: 2 messages (left on the queue)\n")
    assert depth_after_browse == 2
    assert acked.code == 0, acked
    assert acked.stdout.splitlines() == unrouted[:1]
    assert acked.stderr.endswith("retm-relay tail: 1 message (removed)\n")
    (line,) = left.stdout.splitlines()
    message = json.loads(line)
    assert message["body"] == json.loads(fixture_bytes("order.refunded.json"))
    assert message["headers"]["x-relay-routing-key"] == "order.refunded"
    assert message["redelivered"] is True  # given back twice already
    assert await queue_depth(names.unrouted) == 1


async def wait_for_depth(name: str, depth: int) -> None:
    async def reached() -> bool:
        return await queue_depth(name) == depth

    await wait_for(reached, what=f"{depth} messages on {name}")


async def test_tail_queue_on_a_replay_target_shows_each_event_and_its_summary(
    relay: RunningRelay, env: dict[str, str], names: Names, broker: Broker
) -> None:
    """Events that ``replay --to-queue`` republished through the default exchange (their
    routing key is the queue's name) are printed as the exchange tail prints them: the event
    (from ``x-retm-event``) and the order summary, not the queue's name."""
    bodies = [
        fixture_bytes(name)
        for name in ("order.created.json", "customer.created.json", "order.refunded.json")
    ]
    for body in bodies:
        assert (await relay.event(body)).status == 200
    await read_archive(broker, names.archive, bodies[-1])
    target = names("erp.orders")
    assert broker.channel is not None
    await broker.channel.declare_queue(target, durable=True)
    broker.forget_later(queues=(target,))
    replay = await run_cli(
        "replay", "--since", "10m", "--pattern", "order.#", "--to-queue", target, env=env
    )
    assert replay.stdout == f"read 3, matched 2, published 2 to queue {target}\n", replay

    read = await run_cli("tail", "--queue", target, "--ack", env=env)

    assert read.code == 0, read
    assert read.stdout == f"{ORDER_LINE}\n{REFUND_LINE}\n"
    assert read.stderr == (
        f"retm-relay tail: reading queue {target} (acknowledging (removing) each)\n"
        "retm-relay tail: 2 messages (removed)\n"
    )
    assert await queue_depth(target) == 0


async def test_tail_queue_on_a_dead_letter_queue_shows_each_event(
    relay: RunningRelay, env: dict[str, str], names: Names, broker: Broker
) -> None:
    """A message a consumer rejected, dead-lettered with its queue's name as routing key (as
    ``retm-relay declare`` sets up consumer queues), is printed with its event and summary."""
    assert broker.channel is not None
    channel = broker.channel
    dlx = await channel.declare_exchange(names("dlx"), aio_pika.ExchangeType.DIRECT)
    dead = await channel.declare_queue(names("erp.dead"), durable=True)
    await dead.bind(dlx, names("erp"))
    queue = await channel.declare_queue(
        names("erp"),
        durable=True,
        arguments={"x-dead-letter-exchange": dlx.name, "x-dead-letter-routing-key": names("erp")},
    )
    await queue.bind(names.exchange, "order.#")
    broker.forget_later(exchanges=(dlx.name,), queues=(queue.name, dead.name))
    assert (await relay.event(fixture_bytes("order.created.json"))).status == 200
    await wait_for_depth(queue.name, 1)
    message = await queue.get()
    await message.reject(requeue=False)
    await wait_for_depth(dead.name, 1)

    read = await run_cli("tail", "--queue", dead.name, env=env)

    assert read.code == 0, read
    assert read.stdout == ORDER_LINE + "\n"


async def test_tail_queue_fails_when_the_queue_does_not_exist(env: dict[str, str]) -> None:
    """A queue that does not exist: exit 1 naming it; a pattern beside --queue is a usage
    error, as is --ack without --queue."""
    missing = await run_cli("tail", "--queue", "no.such.queue.here", env=env)
    with_pattern = await run_cli("tail", "--queue", "x", "order.#", env=env)
    ack_alone = await run_cli("tail", "--ack", env=env)

    assert missing.code == 1
    assert missing.stderr.startswith("retm-relay tail: queue 'no.such.queue.here' does not exist")
    assert (with_pattern.code, ack_alone.code) == (2, 2)
    assert "--queue reads one queue" in with_pattern.stderr
    assert "--ack needs --queue" in ack_alone.stderr
