"""Several relays act as one through the Redis dedup store: tested through the HTTP interface,
with real relays, a real RabbitMQ and a real Redis (the shared one with a unique key prefix, or
a private redis-server that a test stops and starts)."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from relay.errors import ConfigError
from relay.http.app import PUBLISHER
from relay.settings import load_settings
from tests.conftest import (
    REDIS_URL,
    Broker,
    Names,
    PrivateRedis,
    RunningRelay,
    StartRelay,
    assert_only_sentinel_follows,
    fixture_bytes,
    proxy_url,
    wait_for,
)
from tests.proxy import FaultProxy


async def _shared(start_relay: StartRelay, prefix: str, **overrides: str) -> RunningRelay:
    """A relay using the shared Redis dedup store under ``prefix``."""
    settings = {
        "RELAY_DEDUP_BACKEND": "redis",
        "RELAY_DEDUP_REDIS_URL": REDIS_URL,
        "RELAY_DEDUP_REDIS_PREFIX": prefix,
        **overrides,
    }
    return await start_relay(**settings)


async def _metric(relay: RunningRelay, name: str) -> str:
    """The value of an unlabelled metric, as text (``1.0``)."""
    for line in (await relay.get("/metrics")).body.splitlines():
        if line.startswith(f"{name} "):
            return str(line.split(" ", 1)[1])
    pytest.fail(f"{name} not in /metrics")


async def test_same_event_posted_to_two_instances_at_once_is_published_once(
    start_relay: StartRelay, broker: Broker, names: Names, redis_prefix: str
) -> None:
    """Copies of one event posted to two relays (different ports) at the same moment: one is
    accepted, the others are duplicates, one message is published."""
    a = await _shared(start_relay, redis_prefix)
    b = await _shared(start_relay, redis_prefix)
    assert a.url != b.url
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("order.created.json")

    answers = await asyncio.gather(*(r.event(raw) for r in (a, b) * 4))

    assert [x.status for x in answers] == [200] * 8
    assert sorted(x.body["status"] for x in answers) == ["accepted"] + ["duplicate"] * 7
    assert len({x.body["id"] for x in answers}) == 1
    assert (await tap.get()).body == raw
    await assert_only_sentinel_follows(a, tap)
    await assert_only_sentinel_follows(b, tap)


async def test_retry_to_another_instance_after_success_is_a_duplicate(
    start_relay: StartRelay, broker: Broker, names: Names, redis_prefix: str
) -> None:
    """RETM's retry of an accepted event, landing on another instance, is answered duplicate."""
    a = await _shared(start_relay, redis_prefix)
    b = await _shared(start_relay, redis_prefix)
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("order.refunded.json")

    first = await a.event(raw)
    retry = await b.event(raw)

    assert (first.status, first.body["status"]) == (200, "accepted")
    assert retry.status == 200
    assert retry.body == {**first.body, "status": "duplicate"}
    assert (await tap.get()).body == raw
    await assert_only_sentinel_follows(b, tap)
    assert await _metric(b, "relay_duplicates_total") == "1.0"


async def test_retry_to_another_instance_after_failure_is_published(
    start_relay: StartRelay,
    broker: Broker,
    names: Names,
    redis_prefix: str,
    fault_proxy: FaultProxy,
) -> None:
    """A first attempt that failed on one instance (its broker link cut and its one-event spool
    full: 503) does not block the retry on another instance: that one publishes the event."""
    a = await _shared(
        start_relay, redis_prefix, RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_SPOOL_MAX_EVENTS="1"
    )
    b = await _shared(start_relay, redis_prefix)
    tap = await broker.tap(names.exchange)
    filler = b'{"event":"order.created","reference":"filler"}'
    raw = fixture_bytes("customer.created.json")
    fault_proxy.cut()
    await wait_for(lambda: not a.relay.app[PUBLISHER].connected.is_set(), what="a's link to drop")

    spooled = await a.event(filler)
    failed = await a.event(raw)
    retry = await b.event(raw)

    assert spooled.status == 200
    assert failed.status == 503
    assert failed.headers["Retry-After"] == "5"
    assert (retry.status, retry.body["status"]) == (200, "accepted")
    assert (await tap.get()).body == raw
    await assert_only_sentinel_follows(b, tap)
    fault_proxy.restore()
    assert (await tap.get()).body == filler  # a's spool forwards its event once the link heals


async def test_redis_stopped_in_reject_mode_answers_503_until_it_returns(
    start_relay: StartRelay, broker: Broker, names: Names, private_redis: PrivateRedis
) -> None:
    """dedup.on_store_failure = reject (the default): with Redis stopped, webhooks answer 503
    with Retry-After, readiness is 503 naming the dedup store, and both recover by themselves
    once Redis is back."""
    relay = await start_relay(RELAY_DEDUP_BACKEND="redis", RELAY_DEDUP_REDIS_URL=private_redis.url)
    tap = await broker.tap(names.exchange)
    before = b'{"event":"order.created","reference":"before-outage"}'
    during = b'{"event":"order.created","reference":"during-outage"}'
    assert (await relay.event(before)).body["status"] == "accepted"
    assert (await tap.get()).body == before
    assert (await relay.get("/readyz")).status == 200

    await private_redis.stop()
    answer = await relay.event(during)
    ready = await relay.get("/readyz")
    health = (await relay.get("/health")).body

    assert answer.status == 503
    assert answer.headers["Retry-After"] == "5"
    assert answer.body == {
        "error": "unavailable",
        "detail": "the event could not be made durable (dedup_store); retry later",
    }
    assert ready.status == 503
    assert ready.body["reasons"]["dedup"].startswith(
        f"redis 127.0.0.1:{private_redis.port}/0 unreachable: ConnectionError"
    )
    assert ready.body["checks"]["broker"] == "ok"
    assert (health["dedup"]["backend"], health["dedup"]["state"]) == ("redis", "down")
    assert await _metric(relay, "relay_dedup_store_up") == "0.0"
    assert await _metric(relay, "relay_dedup_store_failures_total") == "1.0"
    assert tap.empty()

    await private_redis.start()
    await wait_for(lambda: _ready(relay), what="readiness to come back")
    retry = await relay.event(during)

    assert (retry.status, retry.body["status"]) == (200, "accepted")
    assert (await tap.get()).body == during
    assert (await relay.event(during)).body["status"] == "duplicate"
    assert await _metric(relay, "relay_dedup_store_up") == "1.0"
    await assert_only_sentinel_follows(relay, tap)


async def test_redis_stopped_in_local_mode_deduplicates_in_memory(
    start_relay: StartRelay, broker: Broker, names: Names, private_redis: PrivateRedis
) -> None:
    """dedup.on_store_failure = local: with Redis stopped, the relay keeps accepting and
    deduplicates in its own memory (counted, logged once), stays ready, and goes back to Redis
    once it returns."""
    relay = await start_relay(
        RELAY_DEDUP_BACKEND="redis",
        RELAY_DEDUP_REDIS_URL=private_redis.url,
        RELAY_DEDUP_ON_STORE_FAILURE="local",
    )
    tap = await broker.tap(names.exchange)
    one = b'{"event":"order.created","reference":"local-1"}'
    two = b'{"event":"order.created","reference":"local-2"}'

    await private_redis.stop()
    with capture_logs() as logs:
        answers = [await relay.event(body) for body in (one, one, two)]
    health = (await relay.get("/health")).body

    assert [(a.status, a.body["status"]) for a in answers] == [
        (200, "accepted"),
        (200, "duplicate"),
        (200, "accepted"),
    ]
    assert [m.body for m in await tap.take(2)] == [one, two]
    assert [e["event"] for e in logs].count("dedup.store_down") == 1
    assert (await relay.get("/readyz")).status == 200
    assert health["dedup"]["state"] == "local_fallback"
    assert health["dedup"]["local_fallbacks"] == 2
    assert await _metric(relay, "relay_dedup_local_fallbacks_total") == "2.0"

    await private_redis.start()
    await wait_for(lambda: _dedup_state(relay, "up"), what="the store to come back")
    three = b'{"event":"order.created","reference":"local-3"}'
    assert (await relay.event(three)).body["status"] == "accepted"
    assert (await relay.event(one)).body["status"] == "duplicate"  # remembered in memory
    assert (await tap.get()).body == three
    await assert_only_sentinel_follows(relay, tap)
    assert await _metric(relay, "relay_dedup_local_fallbacks_total") == "2.0"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"RELAY_DEDUP_ON_STORE_FAILURE": "ignore"}, "dedup.on_store_failure"),
        ({"RELAY_DEDUP_REDIS_TIMEOUT": "30"}, "dedup.redis_timeout"),
        ({"RELAY_DEDUP_REDIS_PREFIX": "a b"}, "dedup.redis_prefix"),
    ],
)
def test_bad_shared_store_settings_name_the_key(environ: dict[str, str], key: str) -> None:
    """Each new setting is validated at start-up with an error naming its key."""
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ)
    assert error.value.key == key


async def _ready(relay: RunningRelay) -> bool:
    return (await relay.get("/readyz")).status == 200


async def _dedup_state(relay: RunningRelay, state: str) -> bool:
    return bool((await relay.get("/health")).body["dedup"]["state"] == state)
