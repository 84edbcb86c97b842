"""The archive: every event answered 2xx is also in a RabbitMQ stream, unchanged, whether it
was routed, unroutable, or forwarded later from the spool; unroutable events still reach the
unrouted queue and are counted; the stream has the configured retention; /health shows it."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from structlog.testing import capture_logs

from relay.amqp.publish import NACKS_BEFORE_RESET
from relay.http.app import ARCHIVE, PUBLISHER, SPOOL
from relay.service import StartupError
from tests.conftest import (
    Broker,
    Names,
    StartRelay,
    assert_only_sentinel_follows,
    fixture_bytes,
    proxy_url,
    read_archive,
    wait_for,
)
from tests.proxy import FaultProxy


def event(name: str, reference: str, business: str = "b1") -> bytes:
    return orjson.dumps({"event": name, "reference": reference, "business_id": business})


def contract(message: AbstractIncomingMessage) -> tuple[object, ...]:
    """Everything the message contract promises about a message, for comparing two copies."""
    return (
        message.body,
        message.routing_key,
        message.content_type,
        message.delivery_mode,
        message.message_id,
        message.type,
        message.timestamp,
        message.app_id,
        {k: v for k, v in (message.headers or {}).items() if k != "x-stream-offset"},
    )


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


async def test_every_accepted_event_is_archived_unchanged_and_unroutable_ones_stay_visible(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """A routed event, an unroutable one, RETM's error webhook and a duplicate: the archive
    holds each event once, in answer order, with the body, properties, headers and routing key
    its consumer (or the unrouted queue) got; the unroutable event is also on the unrouted
    queue with its intended routing key in a header, and counted once."""
    relay = await start_relay()
    orders = await broker.tap(names.exchange, "order.#")
    unrouted = await broker.tap_queue(names.unrouted)
    order = fixture_bytes("order.created.json")
    menu = event("menu.changed", "m-1")
    error = b'{"code":500,"endpoint":"https://relay.example/retm/events","message":"boom"}'
    sentinel = event("order.created", "sentinel")

    answers = [
        await relay.event(order),
        await relay.event(menu),
        await relay.post(relay.settings.http.errors_path, error),
        await relay.event(order),  # RETM's retry: a duplicate, answered 200, archived once
        await relay.event(sentinel),
    ]

    assert [a.status for a in answers] == [200] * 5
    assert answers[3].body["status"] == "duplicate"
    archived = await read_archive(broker, names.archive, sentinel)
    assert [m.body for m in archived] == [order, menu, error, sentinel]
    assert [m.routing_key for m in archived] == [
        "order.created",
        "menu.changed",
        "delivery.error",
        "order.created",
    ]
    assert [m.exchange for m in archived] == [names.archive] * 4
    consumed = await orders.take(2)
    assert [contract(m) for m in consumed] == [contract(archived[0]), contract(archived[3])]

    on_unrouted = [await unrouted.get(), await unrouted.get()]
    assert [m.body for m in on_unrouted] == [menu, error]
    assert on_unrouted[0].headers["x-relay-routing-key"] == "menu.changed"
    assert on_unrouted[0].headers["x-relay-exchange"] == names.exchange
    # the unrouted copy adds its two headers; the archive has the event as it was published
    without_extra = {
        k: v
        for k, v in on_unrouted[0].headers.items()
        if k not in {"x-relay-routing-key", "x-relay-exchange"}
    }
    assert contract(archived[1])[:-1] == contract(on_unrouted[0])[:-1]
    assert contract(archived[1])[-1] == without_extra
    health = (await relay.get("/health")).body
    assert health["counters"]["unroutable"] == 2
    assert metric((await relay.get("/metrics")).body, "relay_unroutable_total") == 2
    await assert_only_sentinel_follows(relay, orders)


async def test_the_archive_is_a_stream_with_the_configured_retention(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """The relay declares the archive as a stream with ``archive.max_age`` and
    ``archive.max_bytes``: the same declaration is accepted, any other retention or queue
    type is refused by the broker; a relay configured with other retention does not start."""
    await start_relay(RELAY_ARCHIVE_MAX_AGE="36h", RELAY_ARCHIVE_MAX_BYTES="5000000")
    stream = {"x-queue-type": "stream", "x-max-age": "36h", "x-max-length-bytes": 5_000_000}
    assert broker.channel is not None
    await broker.channel.declare_queue(names.archive, durable=True, arguments=stream)
    for other in (
        {"x-max-age": "7D"},
        {"x-max-length-bytes": 10_000_000_000},
        {"x-queue-type": "classic"},
    ):
        channel = await broker.connection.channel()
        with pytest.raises(ChannelPreconditionFailed):
            await channel.declare_queue(names.archive, durable=True, arguments={**stream, **other})

    with pytest.raises(StartupError) as failed:
        await start_relay(
            RELAY_ARCHIVE_MAX_AGE="7D", RELAY_ARCHIVE_MAX_BYTES="5000000", wait_durable=False
        )
    assert f"archive '{names.archive}' (a stream and its fanout exchange) exists" in str(
        failed.value
    )
    assert "inequivalent arg 'x-max-age'" in str(failed.value)


async def test_events_forwarded_from_the_spool_after_an_outage_are_archived(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """Events answered 200 while the broker link is cut are spooled, then forwarded; each is
    in the archive exactly once, with the receive time of its answer (not of its forward)."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy))
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    before = [event("order.created", f"before-{i}") for i in range(3)]
    during = [event("customer.updated", f"during-{i}") for i in range(4)]
    sentinel = event("order.created", "spool-sentinel")

    answers = [await relay.event(b) for b in before]
    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    answers += [await relay.event(b) for b in during]
    spooled = spool.depth
    fault_proxy.restore()
    await wait_for(lambda: spool.depth == 0, what="the spool to drain")
    answers.append(await relay.event(sentinel))

    assert [a.status for a in answers] == [200] * 8
    assert spooled == 4
    archived = await read_archive(broker, names.archive, sentinel)
    assert [m.body for m in archived] == [*before, *during, sentinel]
    assert [m.message_id for m in archived] == [a.body["id"] for a in answers]
    received = [m.headers["x-relay-received-at"] for m in archived]
    assert received == sorted(received)


async def test_with_the_archive_off_nothing_is_declared_and_events_still_flow(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """``archive.enabled = false``: no stream, no archive exchange; events reach their
    consumers as before, and /health says the archive is off."""
    relay = await start_relay(RELAY_ARCHIVE_ENABLED="false")
    tap = await broker.tap(names.exchange)

    assert (await relay.event(event("order.created", "off-1"))).status == 200
    assert (await tap.get()).body == event("order.created", "off-1")
    channel = await broker.connection.channel()
    with pytest.raises(ChannelNotFoundEntity):
        await channel.get_queue(names.archive, ensure=True)
    assert (await relay.get("/health")).body["archive"] == {"enabled": False}


async def test_health_shows_retention_and_the_oldest_and_newest_archived_times(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """/health's archive section: the retention settings, and the receive times of the first
    and the newest archived event as read from the stream, to the millisecond."""
    relay = await start_relay(RELAY_ARCHIVE_MAX_AGE="3D")
    empty = (await relay.get("/health")).body["archive"]
    bodies = [event("order.created", f"h-{i}") for i in range(3)]
    for b in bodies:
        assert (await relay.event(b)).status == 200
    archived = await read_archive(broker, names.archive, bodies[-1])

    await relay.relay.app[ARCHIVE].look()
    archive = (await relay.get("/health")).body["archive"]

    assert empty["oldest_received_at"] is None
    assert archive["enabled"] is True
    assert (archive["queue"], archive["max_age"], archive["max_bytes"]) == (
        names.archive,
        "3D",
        10_000_000_000,
    )
    assert archive["oldest_received_at"] == archived[0].headers["x-relay-received-at"]
    assert archive["newest_received_at"] == archived[-1].headers["x-relay-received-at"]
    assert archive["last_archived_here_at"] == archived[-1].headers["x-relay-received-at"]
    assert archive["error"] is None
    assert "AMQP 0-9-1 does not report" in archive["unknown"]


async def test_a_deleted_archive_stream_shows_on_health(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """When someone deletes the stream under a running relay, /health's archive section says
    that it cannot be read."""
    relay = await start_relay()
    channel = await broker.connection.channel()
    await channel.queue_delete(names.archive)

    await relay.relay.app[ARCHIVE].look()
    archive = (await relay.get("/health")).body["archive"]

    assert archive["error"] is not None
    assert "NOT_FOUND" in archive["error"]


async def test_events_of_every_exchange_of_the_exchange_map_are_archived(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """With ``amqp.exchanges`` sending ``customer.*`` to an exchange of its own, the one
    archive holds the events of both exchanges, each with its routing key; a customer event no
    queue is bound for on its exchange is still returned, counted and put on the unrouted
    queue with that exchange in a header."""
    customers = names("customers")
    broker.forget_later(exchanges=(customers,))
    relay = await start_relay(RELAY_AMQP_EXCHANGES=f"customer={customers}")
    unrouted = await broker.tap_queue(names.unrouted)
    orders = await broker.tap(names.exchange, "order.#")
    customer, order = event("customer.created", "x-1"), event("order.created", "x-2")

    assert (await relay.event(customer)).status == 200
    assert (await relay.event(order)).status == 200

    archived = await read_archive(broker, names.archive, order)
    assert [(m.body, m.routing_key) for m in archived] == [
        (customer, "customer.created"),
        (order, "order.created"),
    ]
    message = await unrouted.get()
    assert (message.body, message.headers["x-relay-exchange"]) == (customer, customers)
    assert (await orders.get()).body == order
    assert (await relay.get("/health")).body["counters"]["unroutable"] == 1


async def test_archive_copies_do_not_count_against_the_direct_publish_limit(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """100 events at once (below the 128 direct publishes allowed in flight) are all published
    directly, none spooled as a backlog: the archive's copies are not counted as events."""
    relay = await start_relay()
    tap = await broker.tap(names.exchange)
    bodies = [event("order.created", f"burst-{i}") for i in range(100)]

    answers = await asyncio.gather(*(relay.event(b) for b in bodies))

    assert [a.body["status"] for a in answers] == ["accepted"] * 100
    assert (await relay.get("/health")).body["counters"]["spooled"] == 0
    assert sorted(m.body for m in await tap.take(100)) == sorted(bodies)
    sentinel = event("order.created", "burst-sentinel")
    assert (await relay.event(sentinel)).status == 200
    archived = await read_archive(broker, names.archive, sentinel)
    assert sorted(m.body for m in archived[:-1]) == sorted(bodies)


@pytest.mark.parametrize("refused", ["events", "archive copies"])
async def test_a_queue_that_nacks_every_publish_resets_the_link_though_the_rest_are_acked(
    start_relay: StartRelay, broker: Broker, names: Names, refused: str
) -> None:
    """A queue that refuses every message (``reject-publish`` at length 0) bound for the
    events, or for the archive's copies: the other half of every publish is acked, yet after
    ``NACKS_BEFORE_RESET`` nacks in a row the link is reset (``broker.nacking``), as with the
    archive off (a channel that nacks every publish to a queue after a node's death); once the
    queue is gone, the spool drains and every event is on its queue."""
    relay = await start_relay()
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    orders = await broker.tap(names.exchange, "order.#")
    assert broker.channel is not None
    refuser = await broker.channel.declare_queue(
        names("refuser"), arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    broker.forget_later(queues=(refuser.name,))
    await refuser.bind(names.exchange if refused == "events" else names.archive, "#")
    sent = [event("order.created", f"nacked-{n}") for n in range(NACKS_BEFORE_RESET + 8)]

    with capture_logs() as logs:
        answers = [await relay.event(body) for body in sent]
        await wait_for(lambda: publisher.reconnects >= 1, timeout=30, what="the link reset")
        await refuser.delete(if_unused=False, if_empty=False)
        await wait_for(lambda: spool.depth == 0, timeout=30, what="the spool to drain")
    received: set[bytes] = set()
    while received != set(sent):  # (a nacked publish may still have reached this queue)
        received.add((await orders.get()).body)

    assert [a.status for a in answers] == [200] * len(sent)
    nacking = [e for e in logs if e["event"] == "broker.nacking"]
    assert nacking, [e["event"] for e in logs]
    assert nacking[0]["nacked"] >= NACKS_BEFORE_RESET
    refusal = "the message's archive copy" if refused == "archive copies" else "the message"
    failed = [e["error"] for e in logs if e["event"] == "spool.forward_failed"]
    assert f"nacked: the broker refused {refusal}" in failed, failed
