"""The fast publish path's coupling to aiormq: checked on each new channel, with aiormq's public
``basic_publish`` taking over (logged once, shown on /health) when the check fails or when
``amqp.fast_publish = false`` forces it. (The whole publish contract runs through both paths in
test_publish_contract.py and test_spool_faults.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

import aio_pika
import aiormq
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from structlog.testing import capture_logs

from relay.amqp.senders import FastSender, internals_problem, probe
from relay.http.app import PUBLISHER
from tests.conftest import (
    AMQP_URL,
    ROOT,
    Broker,
    Names,
    StartRelay,
    fixture_bytes,
    proxy_url,
    wait_for,
)
from tests.proxy import FaultProxy


@pytest.fixture
async def channel() -> AsyncIterator[aiormq.Channel]:
    """A fresh aiormq channel as the relay opens it: publisher confirms, returns raising."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        ch = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await ch.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        yield underlay
    finally:
        await connection.close()


def test_installed_versions_are_the_pinned_ones() -> None:
    """aiormq, aio-pika and pamqp are pinned in pyproject.toml, and what is installed (what
    every test here runs against) is inside the pins."""
    text = (ROOT / "pyproject.toml").read_text()
    for name in ("aiormq", "aio-pika", "pamqp"):
        line = next(
            ln.strip().strip('",') for ln in text.splitlines() if ln.strip().startswith(f'"{name}')
        )
        spec = SpecifierSet(line[len(name) :].split(";")[0].split("#")[0].strip())
        assert "<" in str(spec), f"{name} has no upper bound in pyproject.toml: {line}"
        assert Version(metadata.version(name)) in spec


async def test_fresh_channel_passes_the_check_and_the_probe(channel: aiormq.Channel) -> None:
    """On the pinned aiormq, a fresh channel has the internals the fast path expects, and the
    probe publish is returned by the broker, settled through them, and forgotten."""
    assert internals_problem(channel) is None
    before = channel.delivery_tag

    assert await probe(FastSender(channel)) is None
    assert channel.delivery_tag == before + 1
    assert channel.message_id_delivery_tag == {}


DELETE = object()


@pytest.mark.parametrize(
    ("attribute", "value", "problem"),
    [
        (
            "message_id_delivery_tag",
            DELETE,
            "aiormq.Channel has no attribute 'message_id_delivery_tag'",
        ),
        ("confirmations", [], "aiormq.Channel.confirmations is list, expected dict"),
        ("delivery_tag", 0.0, "aiormq.Channel.delivery_tag is float, expected int"),
        ("delivery_tag", True, "aiormq.Channel.delivery_tag is bool, expected int"),
        ("write_queue", None, "aiormq.Channel.write_queue has no put_nowait"),
        (
            "on_return_raises",
            False,
            "the channel is not in publisher-confirm mode with returns raising",
        ),
        ("confirmations", {1: None}, "a fresh channel already has confirmations registered"),
    ],
)
async def test_check_names_what_differs(
    channel: aiormq.Channel, attribute: str, value: object, problem: str
) -> None:
    """Each internal the fast path relies on, when missing or of another kind, is named."""
    saved = dict(vars(channel))
    if value is DELETE:
        delattr(channel, attribute)
    else:
        setattr(channel, attribute, value)
    try:
        assert internals_problem(channel) == problem
    finally:
        vars(channel).clear()
        vars(channel).update(saved)


async def test_changed_internals_fall_back_to_basic_publish(
    start_relay: StartRelay,
    broker: Broker,
    names: Names,
    fault_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An aiormq whose channel keeps its publish counter as a float (a change its own
    ``basic_publish`` survives): the relay publishes through ``basic_publish`` instead, routed
    and unrouted events arrive byte for byte, /health says which path and why, and the fallback
    is logged once, also across a reconnect."""
    original = aiormq.Channel.__init__

    def float_tags(self: aiormq.Channel, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.delivery_tag = 0.0  # type: ignore[assignment]

    monkeypatch.setattr(aiormq.Channel, "__init__", float_tags)
    tap = await broker.tap(names.exchange, "order.#")
    with capture_logs() as logs:
        relay = await start_relay(
            RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_AMQP_FAST_PUBLISH="true"
        )
        unrouted = await broker.tap_queue(names.unrouted)
        publisher = relay.relay.app[PUBLISHER]
        order, customer = (
            fixture_bytes("order.created.json"),
            fixture_bytes("customer.created.json"),
        )
        first = await relay.event(order)
        fault_proxy.cut()
        await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
        fault_proxy.restore()
        await wait_for(publisher.connected.is_set, what="the link to come back")
        second = await relay.event(customer)
        health = await relay.get("/health")

    assert (first.status, second.status) == (200, 200)
    assert (await tap.get()).body == order
    returned = await unrouted.get()
    assert returned.body == customer
    assert returned.headers["x-relay-routing-key"] == "customer.created"
    assert health.body["broker"]["publish_path"] == "public"
    assert health.body["broker"]["publish_path_reason"] == (
        "fast path failed its check: aiormq.Channel.delivery_tag is float, expected int"
    )
    fallbacks = [entry for entry in logs if entry["event"] == "publish.fallback"]
    assert fallbacks == [
        {
            "event": "publish.fallback",
            "log_level": "warning",
            "reason": "aiormq.Channel.delivery_tag is float, expected int",
        }
    ]


async def test_fast_publish_false_forces_basic_publish(start_relay: StartRelay) -> None:
    """``amqp.fast_publish = false`` publishes through ``basic_publish`` from the start, and
    /health says so; the default is the checked fast path."""
    forced = await start_relay(RELAY_AMQP_FAST_PUBLISH="false")
    default = await start_relay(RELAY_AMQP_FAST_PUBLISH="true")

    forced_broker = (await forced.get("/health")).body["broker"]
    default_broker = (await default.get("/health")).body["broker"]

    assert (forced_broker["publish_path"], forced_broker["publish_path_reason"]) == (
        "public",
        "amqp.fast_publish = false",
    )
    assert (default_broker["publish_path"], default_broker["publish_path_reason"]) == (
        "fast",
        None,
    )
