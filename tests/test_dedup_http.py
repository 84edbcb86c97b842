"""Deduplication through the HTTP interface: retries never create copies and never get lost."""

from __future__ import annotations

import asyncio
import hashlib

from relay.http.app import PUBLISHER, SPOOL
from tests.conftest import (
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    assert_only_sentinel_follows,
    fixture_bytes,
    proxy_url,
    wait_for,
)
from tests.proxy import FaultProxy


async def test_same_body_twice_is_published_once(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """RETM's retry of an accepted event is answered ``duplicate`` and not published again."""
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("order.created.json")

    first = await relay.event(raw)
    second = await relay.event(raw)

    assert first.body["status"] == "accepted"
    assert second.status == 200
    assert second.body == {**first.body, "status": "duplicate"}
    assert (await tap.get()).body == raw
    await assert_only_sentinel_follows(relay, tap)
    assert "relay_duplicates_total 1.0" in (await relay.get("/metrics")).body


async def test_identical_posts_at_once_publish_one_message(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """Ten identical posts at the same moment: one accepted, nine duplicates, one message."""
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("customer.created.json")

    answers = await asyncio.gather(*(relay.event(raw) for _ in range(10)))

    statuses = sorted(a.body["status"] for a in answers)
    assert statuses == ["accepted"] + ["duplicate"] * 9
    assert all(a.status == 200 for a in answers)
    assert (await tap.get()).body == raw
    await assert_only_sentinel_follows(relay, tap)


async def test_same_reference_from_two_tenants_is_not_a_duplicate(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """The principal is part of the key: one tenant cannot suppress another's events."""
    relay = await start_relay(RELAY_AUTH_TOKENS="alpha:token-a,beta:token-b")
    tap = await broker.tap(names.exchange)
    raw = b'{"event":"order.created","reference":"shared-ref"}'

    a = await relay.event(raw, token="token-a")
    b = await relay.event(raw, token="token-b")

    assert (a.body["status"], b.body["status"]) == ("accepted", "accepted")
    assert (a.body["id"], b.body["id"]) == (
        "alpha:order.created:shared-ref",
        "beta:order.created:shared-ref",
    )
    messages = await tap.take(2)
    assert [m.headers["x-retm-business"] for m in messages] == ["alpha", "beta"]


async def test_body_without_reference_is_keyed_by_its_hash(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """No ``reference``: the SHA-256 of the body is the key, so an identical retry is absorbed
    and a different body is not."""
    tap = await broker.tap(names.exchange)
    one = b'{"event":"menu.changed","item":1}'
    two = b'{"event":"menu.changed","item":2}'

    answers = [await relay.event(b) for b in (one, one, two)]

    assert [a.body["status"] for a in answers] == ["accepted", "duplicate", "accepted"]
    assert [m.body for m in await tap.take(2)] == [one, two]


async def test_retry_after_a_503_is_published(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """A first attempt that failed (broker away and the spool full: 503) does not block the
    retry: once the broker is back and the spool drained, the same body is published and
    answered accepted."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_SPOOL_MAX_EVENTS="1")
    tap = await broker.tap(names.exchange)
    filler = b'{"event":"order.created","reference":"filler"}'
    raw = fixture_bytes("order.refunded.json")
    publisher = relay.relay.app[PUBLISHER]
    spool = relay.relay.app[SPOOL]

    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    spooled = await relay.event(filler)
    failed = await relay.event(raw)
    fault_proxy.restore()
    await wait_for(lambda: spool.depth == 0 and not spool.full, what="the spool to drain")
    retried = await relay.event(raw)

    assert spooled.status == 200
    assert failed.status == 503
    assert failed.headers["Retry-After"] == "5"
    assert failed.body["error"] == "unavailable"
    assert retried.status == 200
    assert retried.body["status"] == "accepted"
    assert [m.body for m in await tap.take(2)] == [filler, raw]
    await assert_only_sentinel_follows(relay, tap)


async def test_unusable_event_names_sharing_a_reference_are_distinct_events(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """Events whose ``event`` cannot be a routing key all route as ``unrecognized``, but two
    different such names (or none) about one object are two events, as two valid names are:
    each is published once, and each one's retry is answered ``duplicate``."""
    tap = await broker.tap(names.exchange)
    bodies = [
        b'{"event":"Menu Updated","reference":"menu-7","menu":1}',
        b'{"event":"Menu Deleted","reference":"menu-7","menu":2}',
        b'{"reference":"menu-7","menu":3}',
        '{"event":"menü.updated","reference":"menu-7"}'.encode(),
        b'{"event":["menu"],"reference":"menu-7"}',
    ]

    first = [await relay.event(body) for body in bodies]
    retries = [await relay.event(body) for body in bodies]

    assert [a.body["status"] for a in first] == ["accepted"] * 5
    assert [a.body["status"] for a in retries] == ["duplicate"] * 5
    assert [a.body["id"] for a in retries] == [a.body["id"] for a in first]
    ids = [a.body["id"] for a in first]
    principal = ids[2].split(":")[0]
    assert ids[2] == f"{principal}:unrecognized:menu-7"  # no event at all: the plain key
    assert len(set(ids)) == 5
    for key, raw in zip(
        ids[:2] + ids[3:],
        ['"Menu Updated"', '"Menu Deleted"', '"menü.updated"', '["menu"]'],
        strict=True,
    ):
        digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
        assert key == f"{principal}:unrecognized-{digest}:menu-7"
    messages = await tap.take(5)
    assert [m.body for m in messages] == bodies
    assert [m.routing_key for m in messages] == ["unrecognized"] * 5
    assert [m.message_id for m in messages] == ids
    await assert_only_sentinel_follows(relay, tap)
