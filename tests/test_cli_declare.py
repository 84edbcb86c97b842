"""``retm-relay declare``: the relay's topology and the consumer queues, on real RabbitMQ."""

from __future__ import annotations

import re
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelPreconditionFailed

from tests.cli import closed_port, names_environ, run_cli
from tests.conftest import AMQP_URL, Broker, Names, StartRelay, fixture_bytes, wait_for


@pytest.fixture
def env(tmp_path: Path, names: Names, broker: Broker) -> dict[str, str]:
    """Settings with two consumer queues of unique names; everything declare may create is
    deleted afterwards."""
    config = tmp_path / "empty.toml"
    config.write_text("")
    erp, crm = names("erp"), names("crm")
    broker.forget_later(
        exchanges=(names.exchange, *names.own, names.archive, f"{names.exchange}.dlx"),
        queues=(*names.own, names.archive, erp, f"{erp}.dead", crm, f"{crm}.dead"),
    )
    return names_environ(
        config,
        names,
        RELAY_CONSUMERS_QUEUES=f"{erp}=order.#,{erp}=customer.created,{crm}=customer.*",
    )


def table(stdout: str) -> list[list[str]]:
    """The rows of declare's table, each split into its six columns."""
    lines = stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "KIND",
        "NAME",
        "TYPE",
        "MESSAGES",
        "CONSUMERS",
        "DETAIL",
    ]
    return [re.split(r"\s{2,}", line, maxsplit=5) for line in lines[1:]]


async def test_declare_creates_everything_and_prints_what_exists(
    env: dict[str, str], names: Names, start_relay: StartRelay
) -> None:
    """declare creates the relay's exchanges, the dead-letter exchange and each consumer queue
    with its dead-letter queue, prints them, and a second run changes nothing."""
    result = await run_cli("declare", env=env)

    assert result.code == 0, result
    x, dlx, erp, crm = names.exchange, f"{names.exchange}.dlx", names("erp"), names("crm")
    assert table(result.stdout) == [
        ["exchange", x, "topic", "-", "-", "events"],
        ["exchange", names.unrouted, "fanout", "-", "-", "events no queue was bound for"],
        ["queue", names.unrouted, "quorum", "0", "0", f"bound to {names.unrouted}"],
        [
            "exchange",
            names.rejected,
            "fanout",
            "-",
            "-",
            "quarantine: authenticated bodies refused as not JSON objects",
        ],
        ["queue", names.rejected, "quorum", "0", "0", f"bound to {names.rejected}"],
        ["exchange", names.archive, "fanout", "-", "-", "the archive: every event"],
        [
            "queue",
            names.archive,
            "stream",
            "-",
            "0",
            f"bound to {names.archive}; max_age 7D, max_bytes 10000000000",
        ],
        ["exchange", dlx, "direct", "-", "-", "dead letters of the queues below"],
        [
            "queue",
            erp,
            "quorum",
            "0",
            "0",
            f"bound to {x} order.#, {x} customer.created; dead letters to {erp}.dead",
        ],
        ["queue", f"{erp}.dead", "quorum", "0", "0", f"bound to {dlx} {erp}"],
        ["queue", crm, "quorum", "0", "0", f"bound to {x} customer.*; dead letters to {crm}.dead"],
        ["queue", f"{crm}.dead", "quorum", "0", "0", f"bound to {dlx} {crm}"],
    ]
    again = await run_cli("declare", env=env)
    assert again.code == 0, again
    assert again.stdout == result.stdout

    # The queues really are quorum queues: redeclaring one as classic is refused.
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(ChannelPreconditionFailed):
            await channel.declare_queue(erp, durable=True, arguments={"x-queue-type": "classic"})


async def test_declared_queues_receive_their_events_and_dead_letters(
    env: dict[str, str], names: Names, start_relay: StartRelay
) -> None:
    """Through a real relay: each consumer queue receives what its bindings select, and a
    message its consumer rejects lands in ``<queue>.dead``."""
    assert (await run_cli("declare", env=env)).code == 0
    relay = await start_relay()
    erp, crm = names("erp"), names("crm")
    order, customer = fixture_bytes("order.created.json"), fixture_bytes("customer.updated.json")
    assert (await relay.event(order)).status == 200
    assert (await relay.event(customer)).status == 200

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        erp_queue = await channel.get_queue(erp, ensure=True)
        crm_queue = await channel.get_queue(crm, ensure=True)
        first = await erp_queue.get(timeout=5)
        assert (first.routing_key, first.body) == ("order.created", order)
        assert await erp_queue.get(fail=False) is None  # customer.updated is not for erp
        crm_message = await crm_queue.get(timeout=5)
        assert crm_message.body == customer
        await crm_message.ack()

        await first.reject(requeue=False)
        dead_queue = await channel.get_queue(f"{erp}.dead", ensure=True)
        dead_letters: list[AbstractIncomingMessage] = []

        async def dead_lettered() -> bool:  # dead-lettering is asynchronous in the broker
            message = await dead_queue.get(fail=False)
            if message is not None:
                dead_letters.append(message)
            return bool(dead_letters)

        await wait_for(dead_lettered, what="the rejected message in the dead-letter queue")
        (dead,) = dead_letters
        assert dead.body == order
        assert dead.message_id == first.message_id
        await dead.ack()


async def test_declare_fails_on_a_queue_with_other_arguments(
    env: dict[str, str], names: Names, broker: Broker
) -> None:
    """A consumer queue that exists as a classic queue: exit 1 naming it; nothing is changed."""
    erp = names("erp")
    assert broker.channel is not None
    await broker.channel.declare_queue(erp, durable=True)

    result = await run_cli("declare", env=env)

    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"retm-relay declare: queue '{erp}' exists on the broker with other arguments ("
    )
    assert "delete it or rename it in consumers.queues" in result.stderr


async def test_the_unrouted_queue_is_a_quorum_queue(
    env: dict[str, str], names: Names, broker: Broker
) -> None:
    """declare makes the unrouted queue a quorum queue: declaring it again as one changes
    nothing, declaring it as a classic queue is refused by the broker."""
    result = await run_cli("declare", env=env)
    assert broker.channel is not None
    again = await broker.channel.declare_queue(
        names.unrouted, durable=True, arguments={"x-queue-type": "quorum"}
    )

    assert result.code == 0, result
    assert again.declaration_result.message_count == 0
    with pytest.raises(ChannelPreconditionFailed):
        await broker.channel.declare_queue(
            names.unrouted, durable=True, arguments={"x-queue-type": "classic"}
        )
    broker.channel = await broker.connection.channel()


async def test_a_classic_unrouted_queue_stops_the_start_with_the_migration_hint(
    env: dict[str, str], names: Names, broker: Broker
) -> None:
    """An unrouted queue left classic by an earlier version: declare (as the relay's start)
    exits 1 naming the queue and where its migration to a quorum queue is described."""
    assert broker.channel is not None
    await broker.channel.declare_queue(names.unrouted, durable=True)

    result = await run_cli("declare", env=env)

    assert result.code == 1
    assert result.stderr.startswith(
        f"retm-relay declare: queue '{names.unrouted}' exists on the broker with another type "
        "or arguments: "
    )
    assert (
        "a classic queue of an earlier relay version must be migrated to a quorum queue "
        "(docs/several-machines.md, 'Migrating retm.unrouted to a quorum queue')."
    ) in result.stderr


async def test_declare_passive_fails_when_queues_are_missing(
    env: dict[str, str], names: Names
) -> None:
    """``--passive`` only checks: with nothing declared, exit 1 naming what is missing."""
    result = await run_cli("declare", "--passive", env=env)

    assert result.code == 1
    assert result.stderr.startswith("retm-relay declare: exchange ")
    assert "does not exist and amqp.passive is set" in result.stderr


async def test_declare_fails_when_the_broker_does_not_answer(env: dict[str, str]) -> None:
    """No broker at amqp.url: exit 1 with the address and no credentials."""
    port = closed_port()
    env["RELAY_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{port}/"

    result = await run_cli("declare", env=env)

    assert result.code == 1
    assert result.stderr.startswith(
        f"retm-relay declare: cannot connect to the broker at 127.0.0.1:{port}:"
    )
    assert result.stderr.count("\n") == 1
    assert "guest:guest" not in result.stderr


async def test_declare_with_a_bad_binding_is_a_configuration_error(env: dict[str, str]) -> None:
    """A binding that can never match (upper case): exit 2 naming the key, before connecting."""
    env["RELAY_CONSUMERS_QUEUES"] = "erp=Order.#"

    result = await run_cli("declare", env=env)

    assert result.code == 2
    assert result.stderr.startswith(
        "retm-relay: configuration error: consumers.queues: binding 'Order.#' of 'erp'"
    )


async def test_declare_makes_the_archive_a_stream_with_the_configured_retention(
    env: dict[str, str], names: Names, broker: Broker
) -> None:
    """The archive is a stream with ``archive.max_age`` and ``archive.max_bytes``: redeclaring
    it with exactly those arguments is accepted, with other retention it is refused; declare
    with other archive settings than the stream has exits 1 naming the archive."""
    env.update(RELAY_ARCHIVE_MAX_AGE="36h", RELAY_ARCHIVE_MAX_BYTES="2000000")
    assert (await run_cli("declare", env=env)).code == 0

    stream = {"x-queue-type": "stream", "x-max-age": "36h", "x-max-length-bytes": 2_000_000}
    assert broker.channel is not None
    await broker.channel.declare_queue(names.archive, durable=True, arguments=stream)
    for other in (
        {"x-max-age": "7D"},
        {"x-max-length-bytes": 3_000_000},
        {"x-queue-type": "quorum"},
    ):
        channel = await broker.connection.channel()
        with pytest.raises(ChannelPreconditionFailed):
            await channel.declare_queue(names.archive, durable=True, arguments={**stream, **other})

    env["RELAY_ARCHIVE_MAX_AGE"] = "7D"
    result = await run_cli("declare", env=env)
    assert result.code == 1
    assert result.stderr == (
        f"retm-relay declare: archive '{names.archive}' (a stream and its fanout exchange) "
        "exists on the broker with another type or arguments: PRECONDITION_FAILED - "
        f"inequivalent arg 'x-max-age' for queue '{names.archive}' in vhost '/': received '7D' "
        "but current is '36h'. Delete it, or point the relay at another name.\n"
    )


async def test_declare_passive_checks_the_archive_and_skips_it_when_off(
    env: dict[str, str], names: Names
) -> None:
    """With the relay's exchanges present but no archive stream, ``--passive`` exits 1 naming
    the archive; with ``archive.enabled = false`` the same check passes and lists no archive."""
    env["RELAY_ARCHIVE_ENABLED"] = "false"
    assert (await run_cli("declare", env=env)).code == 0

    env["RELAY_ARCHIVE_ENABLED"] = "true"
    missing = await run_cli("declare", "--passive", env=env)
    assert missing.code == 1
    assert missing.stderr.startswith(
        f"retm-relay declare: archive '{names.archive}' (a stream and its fanout exchange) "
        "does not exist and amqp.passive is set"
    ), missing.stderr

    env["RELAY_ARCHIVE_ENABLED"] = "false"
    off = await run_cli("declare", "--passive", env=env)
    assert off.code == 0, off
    assert names.archive not in off.stdout
