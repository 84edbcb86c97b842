"""The AMQP message contract: what a consumer bound to the exchange receives."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import zlib
from datetime import UTC, datetime

import orjson
import pytest

from relay.http.auth import token_digest
from tests.conftest import (
    PUBLISH_PATHS,
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    assert_only_sentinel_follows,
    fixture_bytes,
)

FINGERPRINT = token_digest(TOKEN).hex()[:8]
PRINCIPAL = f"token-{FINGERPRINT}"

NOTIFICATIONS = [
    ("order.created.json", "order.created"),
    ("order.refunded.json", "order.refunded"),
    ("customer.created.json", "customer.created"),
    ("customer.updated.json", "customer.updated"),
    ("customer.deleted.json", "customer.deleted"),
]

# the whole contract through the fast path and through aiormq's public basic_publish
pytestmark = pytest.mark.parametrize("publish_path", PUBLISH_PATHS)


@pytest.mark.parametrize(("fixture", "routing_key"), NOTIFICATIONS)
async def test_notification_fixture_arrives_byte_identical(
    relay: RunningRelay, broker: Broker, names: Names, fixture: str, routing_key: str
) -> None:
    """Each RETM example body reaches a bound queue with its routing key, every property and
    header of the contract, and the exact bytes that were posted."""
    tap = await broker.tap(names.exchange, "#")
    raw = fixture_bytes(fixture)
    body = json.loads(raw)
    before = datetime.now(UTC).replace(microsecond=0)

    answer = await relay.event(raw)

    key = f"{PRINCIPAL}:{routing_key}:{body['reference']}"
    assert answer.status == 200
    assert answer.body == {"status": "accepted", "id": key, "routing_key": routing_key}
    message = await tap.get()
    assert message.body == raw
    assert message.routing_key == routing_key
    assert message.exchange == names.exchange
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.message_id == key
    assert message.type == routing_key
    assert message.app_id == "retm-relay"
    assert message.timestamp is not None
    assert before <= message.timestamp <= datetime.now(UTC)
    headers = dict(message.headers)
    received_at = headers.pop("x-relay-received-at")
    assert isinstance(received_at, str)
    assert received_at.endswith("Z")
    assert before <= datetime.fromisoformat(received_at) <= datetime.now(UTC)
    expected = {
        "x-retm-event": routing_key,
        "x-retm-business": "nakheelember",
        "x-retm-reference": body["reference"],
    }
    if "branch_id" in body:
        expected["x-retm-branch"] = body["branch_id"]
    assert headers == expected


async def test_error_webhook_is_published_as_delivery_error(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """RETM's error webhook goes to ``delivery.error`` with a message_id of its own arrival
    (never the body's hash: the same alert again is a new alert), and shows up as the last
    RETM error in /health."""
    tap = await broker.tap(names.exchange, "delivery.#")
    raw = fixture_bytes("error.webhook.json")

    answer = await relay.post("/retm/errors", raw)

    assert answer.status == 200
    key = answer.body["id"]
    assert re.fullmatch(rf"{PRINCIPAL}:delivery\.error:arrival-[0-9a-f]{{32}}", key)
    assert answer.body == {"status": "accepted", "id": key, "routing_key": "delivery.error"}
    message = await tap.get()
    assert message.body == raw
    assert message.routing_key == "delivery.error"
    assert message.message_id == key
    assert message.type == "delivery.error"
    health = await relay.get("/health")
    last = health.body["last_retm_error"]
    assert (last["code"], last["endpoint"]) == (504, "https://hooks.example.com/retm/events")


async def test_event_the_docs_do_not_list_routes_by_its_name(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """An event RETM's docs never mention, with Arabic text, routes by its own name."""
    tap = await broker.tap(names.exchange, "order.delivery.*")
    raw = (
        '{"event":"order.delivery.updated","reference":"d-1","business_refrence":"nakheelember",'
        '"note":"التوصيل في الطريق","status":6}'
    ).encode()

    answer = await relay.event(raw)

    assert answer.status == 200
    assert answer.body["routing_key"] == "order.delivery.updated"
    message = await tap.get()
    assert message.body == raw
    assert message.routing_key == "order.delivery.updated"
    assert message.headers["x-retm-event"] == "order.delivery.updated"


async def test_unbound_event_lands_on_unrouted_queue(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """With no queue bound for its key, the event is diverted to the unrouted exchange and
    queue with the intended routing key in a header, counted, and still answered 200."""
    unrouted = await broker.tap_queue(names.unrouted)
    raw = b'{"event":"menu.changed","reference":"m-1"}'

    answer = await relay.event(raw)

    assert answer.status == 200
    message = await unrouted.get()
    assert message.body == raw
    assert message.exchange == names.unrouted
    assert message.routing_key == "menu.changed"
    assert message.headers["x-relay-routing-key"] == "menu.changed"
    assert message.headers["x-relay-exchange"] == names.exchange
    assert message.message_id == f"{PRINCIPAL}:menu.changed:m-1"
    metrics = (await relay.get("/metrics")).body
    assert "relay_unroutable_total 1.0" in metrics


async def test_bom_is_stripped_and_charset_and_case_accepted(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """A leading UTF-8 BOM is dropped from the published body; ``application/json;
    charset=UTF-8`` and ``Application/JSON`` are accepted."""
    tap = await broker.tap(names.exchange)
    bodies = [b'{"event":"order.created","reference":"bom-%d"}' % i for i in range(3)]

    answers = [
        await relay.event(b"\xef\xbb\xbf" + bodies[0]),
        await relay.event(bodies[1], content_type="application/json; charset=UTF-8"),
        await relay.event(bodies[2], content_type="Application/JSON"),
    ]

    assert [a.status for a in answers] == [200, 200, 200]
    assert [m.body for m in await tap.take(3)] == bodies


async def test_gzip_and_deflate_bodies_are_published_decompressed(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """``Content-Encoding: gzip`` and ``deflate`` bodies are published as the decompressed
    bytes."""
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("order.created.json")
    other = raw.replace(b"e10270cd", b"aaaaaaaa")

    a = await relay.event(gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    b = await relay.event(zlib.compress(other), headers={"Content-Encoding": "deflate"})

    assert (a.status, b.status) == (200, 200)
    assert [m.body for m in await tap.take(2)] == [raw, other]


async def test_routing_key_template_adds_business_and_branch(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """With ``{event}.{business}.{branch}`` the routing key carries the sanitised ids, and an
    empty business becomes ``_``."""
    relay = await start_relay(RELAY_AMQP_ROUTING_KEY_TEMPLATE="{event}.{business}.{branch}")
    tap = await broker.tap(names.exchange, "order.created.#")
    raw = fixture_bytes("order.created.json")
    empty_business = (
        b'{"event":"order.created","reference":"x","business_refrence":"","branch_id":"A.B*#"}'
    )

    first = await relay.event(raw)
    second = await relay.event(empty_business)

    assert first.body["routing_key"] == "order.created.nakheelember.01jes4zr1ezma2gyk611h2kz10"
    assert second.body["routing_key"] == "order.created._.a_b__"
    keys = [m.routing_key for m in await tap.take(2)]
    assert keys == [first.body["routing_key"], second.body["routing_key"]]


async def test_exchange_map_sends_a_family_to_its_own_exchange(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """``amqp.exchanges`` sends ``customer.*`` to its own exchange, the rest to the default."""
    customers = names("customers")
    relay = await start_relay(RELAY_AMQP_EXCHANGES=f"customer={customers}")
    customer_tap = await broker.tap(customers)
    default_tap = await broker.tap(names.exchange)

    await relay.event(fixture_bytes("customer.created.json"))
    await relay.event(fixture_bytes("order.created.json"))

    assert (await customer_tap.get()).routing_key == "customer.created"
    assert (await default_tap.get()).routing_key == "order.created"


async def test_many_concurrent_events_are_each_published_once(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """200 distinct events posted at once: 200 answers of 200 and exactly those 200 bodies."""
    tap = await broker.tap(names.exchange)
    bodies = [orjson.dumps({"event": "order.created", "reference": f"c-{i}"}) for i in range(200)]

    answers = await asyncio.gather(*(relay.event(b) for b in bodies))

    assert [a.status for a in answers] == [200] * 200
    received = await tap.take(200)
    assert sorted(m.body for m in received) == sorted(bodies)
    await assert_only_sentinel_follows(relay, tap)
