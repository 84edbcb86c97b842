"""Loyalty hooks over RabbitMQ RPC: the example responder's answers reach RETM, one per request;
no responder, a timeout or a lost link give the fallback; redeem retries get the first answer."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from relay.http.app import LOYALTY, METRICS
from relay.settings import LoyaltySettings
from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    fixture_bytes,
    proxy_url,
    wait_for,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "loyalty_responder.py"
CHECK = "/retm/loyalty/check-reward"
REDEEM = "/retm/loyalty/redeem-reward"
FALLBACK = orjson.loads(LoyaltySettings().fallback_body)


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("loyalty_responder", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("loyalty_responder", module)
    spec.loader.exec_module(module)
    return module


example = _load_example()

StartResponder = Callable[..., Awaitable[Any]]


@pytest.fixture
async def start_responder(names: Names) -> AsyncIterator[StartResponder]:
    """Start copies of the shipped example responder on the test's exchange."""
    started: list[Any] = []

    async def start(handlers: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        responder = example.Responder(
            AMQP_URL, names.exchange, names("loyalty"), handlers=handlers, **kwargs
        )
        await responder.start()
        started.append(responder)
        return responder

    yield start
    for responder in started:
        await responder.close()


def counting(calls: list[dict[str, Any]], handler: Any) -> Any:
    async def wrapped(request: dict[str, Any]) -> Any:
        calls.append(request)
        return await handler(request)

    return wrapped


def metric(relay: RunningRelay, name: str, **labels: str) -> float:
    value = relay.relay.app[METRICS].registry.get_sample_value(name, labels)
    return value or 0.0


async def test_check_reward_round_trip_with_the_example_responder(
    start_relay: StartRelay, start_responder: StartResponder, broker: Broker, names: Names
) -> None:
    """A known coupon gets the responder's 200 body byte for byte; the request the responder
    saw is RETM's body as sent, with the contract's properties and routing key."""
    relay = await start_relay()
    await start_responder()
    tap = await broker.tap(names.exchange, "loyalty.#")  # sees each request as sent
    body = fixture_bytes("loyalty.check_reward.json")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with relay.session.post(relay.url + CHECK, data=body, headers=headers) as response:
        raw = await response.read()
        assert response.status == 200
        assert response.content_type == "application/json"
        assert "x-relay-fallback" not in response.headers
    sent = {"data": example.REWARDS["NKH-4821"], "errors": []}
    assert raw == json.dumps(sent, ensure_ascii=False).encode()  # the responder's bytes
    assert orjson.loads(raw) == orjson.loads(
        fixture_bytes("loyalty.check_reward.response.200.json")
    )
    request = await tap.get()
    assert request.body == body
    assert request.routing_key == "loyalty.check_reward"
    assert request.type == "loyalty.check_reward"
    assert request.reply_to is not None
    assert request.reply_to.startswith("amq.rabbitmq.reply-to")
    assert request.correlation_id
    assert request.message_id == request.correlation_id
    assert request.expiration is not None
    assert 0 < request.expiration <= 5
    assert request.app_id == "retm-relay"
    assert request.content_type == "application/json"
    assert request.headers["x-retm-event"] == "loyalty.check_reward"
    assert request.headers["x-retm-business"] == "nakheelember"
    assert (
        metric(relay, "relay_loyalty_requests_total", hook="check_reward", outcome="answered") == 1
    )


async def test_unknown_code_gets_the_responders_400(
    start_relay: StartRelay, start_responder: StartResponder
) -> None:
    """The reply's x-http-status header becomes the HTTP status RETM sees."""
    relay = await start_relay()
    await start_responder()
    answer = await relay.post(CHECK, b'{"reward_code":"NOPE-1","business_refrence":""}')
    assert answer.status == 400
    assert answer.body == {
        "data": [],
        "message": "Reward NOPE-1 does not exist",
        "errors": ["unknown reward code NOPE-1"],
    }


async def test_hundred_concurrent_requests_each_get_their_own_answer(
    start_relay: StartRelay, start_responder: StartResponder
) -> None:
    """100 check-reward requests in flight at once, with different codes, answered in the
    reverse order: every answer names its own request's code (replies are matched by
    correlation id, not by order)."""
    relay = await start_relay()
    arrived: list[asyncio.Event] = []

    async def reversed_rules(request: dict[str, Any]) -> Any:
        gate = asyncio.Event()
        arrived.append(gate)
        if len(arrived) == 100:  # all in flight: answer the newest first
            for waiting in reversed(arrived):
                waiting.set()
        await gate.wait()
        return await example.check_reward(request)

    await start_responder({"loyalty.check_reward": reversed_rules}, prefetch=100)
    codes = [f"C-{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(100)]
    answers = await asyncio.gather(
        *(
            relay.post(CHECK, orjson.dumps({"reward_code": c, "business_refrence": ""}))
            for c in codes
        )
    )
    for code, answer in zip(codes, answers, strict=True):
        assert answer.status == 400, answer
        assert answer.body["message"] == f"Reward {code} does not exist"
    assert (
        metric(relay, "relay_loyalty_requests_total", hook="check_reward", outcome="answered")
        == 100
    )


async def test_no_responder_gives_the_fallback_at_once(start_relay: StartRelay) -> None:
    """With no queue bound for the request, the broker returns it and the POS gets the
    documented "invalid reward" fallback, flagged no_responder (not a timeout)."""
    relay = await start_relay(RELAY_LOYALTY_TIMEOUT="9")
    answer = await relay.post(CHECK, fixture_bytes("loyalty.check_reward.json"))
    assert answer.status == 400
    assert answer.body == FALLBACK
    assert answer.headers["x-relay-fallback"] == "no_responder"
    assert (
        metric(
            relay,
            "relay_loyalty_requests_total",
            hook="check_reward",
            outcome="fallback_no_responder",
        )
        == 1
    )


async def test_timeout_gives_the_configured_fallback(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """A queue is bound but nobody consumes it: after loyalty.timeout the POS gets the
    configured fallback answer, and the request expires in the queue."""
    fallback = '{"data":[],"message":"Try later","errors":["offline"]}'
    relay = await start_relay(
        RELAY_LOYALTY_TIMEOUT="0.3",
        RELAY_LOYALTY_FALLBACK_STATUS="422",
        RELAY_LOYALTY_FALLBACK_BODY=fallback,
    )
    assert broker.channel is not None
    exchange = await broker.channel.get_exchange(names.exchange)
    queue = await broker.channel.declare_queue(names("idle"), auto_delete=False)
    broker.forget_later(queues=(names("idle"),))
    await queue.bind(exchange, "loyalty.#")
    answer = await relay.post(REDEEM, fixture_bytes("loyalty.redeem_reward.json"))
    assert answer.status == 422
    assert answer.body == orjson.loads(fallback)
    assert answer.headers["x-relay-fallback"] == "timeout"
    # The request carried the deadline as its expiration: it leaves the queue by itself.
    await wait_for(lambda: _queue_empty(broker, names("idle")), timeout=5, what="expired request")


async def _queue_empty(broker: Broker, name: str) -> bool:
    assert broker.channel is not None
    queue = await broker.channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count == 0


async def test_late_reply_is_discarded_and_never_answers_another_request(
    start_relay: StartRelay, start_responder: StartResponder
) -> None:
    """A slow responder's reply arrives after its request's deadline, while another request
    is waiting: it is counted and dropped, and the waiting request gets its own answer."""
    relay = await start_relay(RELAY_LOYALTY_TIMEOUT="2")
    release_slow, release_fast, fast_arrived = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def rules(request: dict[str, Any]) -> Any:
        if request["reward_code"] == "SLOW":
            await release_slow.wait()
        if request["reward_code"] == "FAST":
            fast_arrived.set()
            await release_fast.wait()
        return 200, {"data": {"code": request["reward_code"]}, "errors": []}

    await start_responder({"loyalty.check_reward": rules})
    slow = await relay.post(CHECK, b'{"reward_code":"SLOW"}')
    assert slow.status == 400
    assert slow.headers["x-relay-fallback"] == "timeout"
    fast = asyncio.ensure_future(relay.post(CHECK, b'{"reward_code":"FAST"}'))
    async with asyncio.timeout(10):
        await fast_arrived.wait()  # FAST is in flight at the relay ...
    release_slow.set()  # ... when SLOW's late reply arrives
    link = relay.relay.app[LOYALTY].link
    await wait_for(lambda: link.late_replies == 1, what="the late reply")
    release_fast.set()
    answer = await fast
    assert answer.status == 200
    assert answer.body == {"data": {"code": "FAST"}, "errors": []}
    assert metric(relay, "relay_loyalty_late_replies_total") == 1


async def test_redeem_retried_gets_the_first_answer_and_one_request(
    start_relay: StartRelay, start_responder: StartResponder
) -> None:
    """RETM's retries of one redeem (the same body) are answered from the cache, also while
    the first is in flight; the responder sees one request. Check-reward is not cached."""
    relay = await start_relay()
    redeems: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def redeem(request: dict[str, Any]) -> Any:
        await gate.wait()
        return await example.redeem_reward(request)

    await start_responder(
        {
            "loyalty.redeem_reward": counting(redeems, redeem),
            "loyalty.check_reward": counting(checks, example.check_reward),
        }
    )
    body = fixture_bytes("loyalty.redeem_reward.json")
    first = asyncio.ensure_future(relay.post(REDEEM, body))
    await wait_for(lambda: len(redeems) == 1, what="the first redeem at the responder")
    concurrent = asyncio.ensure_future(relay.post(REDEEM, body))
    loyalty = relay.relay.app[LOYALTY]
    await wait_for(lambda: loyalty.waiting == 1, what="the copy to wait for the first")
    gate.set()
    answers = [await first, await concurrent, await relay.post(REDEEM, body)]
    expected = {"data": {"reward_code": "NKH-4821", "redeemed": True}, "errors": []}
    assert [(a.status, a.body) for a in answers] == [(200, expected)] * 3
    assert len(redeems) == 1
    assert (
        metric(relay, "relay_loyalty_requests_total", hook="redeem_reward", outcome="cached") == 2
    )

    check = fixture_bytes("loyalty.check_reward.json")
    assert (await relay.post(CHECK, check)).status == 200
    assert (await relay.post(CHECK, check)).status == 200
    assert len(checks) == 2


async def test_loyalty_needs_the_bearer_token(start_relay: StartRelay) -> None:
    """The loyalty routes authenticate like every webhook route."""
    relay = await start_relay()
    answer = await relay.post(CHECK, fixture_bytes("loyalty.check_reward.json"), token="wrong")
    assert answer.status == 401
    assert answer.body["error"] == "unauthorized"


async def test_broker_link_lost_gives_fallback_and_health_says_so(
    start_relay: StartRelay, start_responder: StartResponder, fault_proxy: Any
) -> None:
    """While the RPC link is down the hooks answer the fallback at once, /health and the
    relay_loyalty_rpc_connected gauge say so; the link heals by itself."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy, heartbeat=1))
    await start_responder()
    link = relay.relay.app[LOYALTY].link
    assert metric(relay, "relay_loyalty_rpc_connected") == 1
    fault_proxy.cut()
    await wait_for(lambda: not link.connected.is_set(), what="the RPC link to drop")
    answer = await relay.post(CHECK, fixture_bytes("loyalty.check_reward.json"))
    assert answer.status == 400
    assert answer.headers["x-relay-fallback"] == "disconnected"
    health = (await relay.get("/health")).body["loyalty_rpc"]
    assert health["connected"] is False
    assert health["last_error"]
    assert metric(relay, "relay_loyalty_rpc_connected") == 0
    fault_proxy.restore()
    await wait_for(link.connected.is_set, timeout=15, what="the RPC link to heal")
    answer = await relay.post(CHECK, fixture_bytes("loyalty.check_reward.json"))
    assert answer.status == 200
    assert (await relay.get("/health")).body["loyalty_rpc"]["connected"] is True


async def test_redeem_retry_at_another_relay_gets_the_first_answer_through_redis(
    start_relay: StartRelay, start_responder: StartResponder
) -> None:
    """With dedup.backend = redis the redeem answers are shared: RETM's retry that reaches a
    second relay gets the first relay's answer, and the responder sees one request."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:loyalty"
    shared = {
        "RELAY_DEDUP_BACKEND": "redis",
        "RELAY_DEDUP_REDIS_URL": REDIS_URL,
        "RELAY_LOYALTY_REDIS_KEY": prefix,
    }
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        a = await start_relay(**shared)
        b = await start_relay(**shared)
        redeems: list[dict[str, Any]] = []
        await start_responder({"loyalty.redeem_reward": counting(redeems, example.redeem_reward)})
        body = fixture_bytes("loyalty.redeem_reward.json")
        first = await a.post(REDEEM, body)
        retry = await b.post(REDEEM, body)
        assert first.status == retry.status == 200
        assert (
            retry.body
            == first.body
            == {
                "data": {"reward_code": "NKH-4821", "redeemed": True},
                "errors": [],
            }
        )
        assert len(redeems) == 1
        assert (
            metric(b, "relay_loyalty_requests_total", hook="redeem_reward", outcome="cached") == 1
        )
        keys = await client.keys(f"{prefix}:*")
        assert len(keys) == 1
        assert 0 < await client.pttl(keys[0]) <= 86_400_000
    finally:
        keys = await client.keys(f"{prefix}:*")
        if keys:
            await client.delete(*keys)
        await client.aclose()
