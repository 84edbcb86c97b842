"""The fast publish path's coupling to aiormq: checked on each new channel, with aiormq's public
``basic_publish`` taking over (logged once, shown on /health) when the check fails or when
``amqp.fast_publish = false`` forces it. (The whole publish contract runs through both paths in
test_publish_contract.py and test_spool_faults.py.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from structlog.testing import capture_logs

from relay.amqp.senders import FastSender, internals_problem, probe
from relay.http.app import PUBLISHER
from relay.service import Relay
from relay.settings import load_settings
from tests.conftest import (
    AMQP_URL,
    ROOT,
    TOKEN,
    Broker,
    Names,
    StartRelay,
    fixture_bytes,
    proxy_url,
    relay_environ,
    wait_for,
)
from tests.proxy import FaultProxy
from tests.test_deploy import RELAY_PERMISSIONS, private_vhost, run, tool, vhost_url

__all__ = ["private_vhost"]  # the fixture, shared with test_deploy.py


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


@pytest.mark.slow
async def test_a_user_without_write_on_the_default_exchange_keeps_the_checked_fast_path(
    private_vhost: str, names: Names, tmp_path: Path
) -> None:
    """A broker user with only the permissions the relay needs refuses the probe publish to the
    default exchange: the relay stays on the fast path, checked on the channel state alone,
    says so on /health and in one log line, and publishes (to the unrouted exchange here: no
    queue is bound in the test's vhost)."""
    rabbitmqctl = tool("rabbitmqctl")
    user, password = f"test-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    assert (await asyncio.to_thread(run, rabbitmqctl, "add_user", user, password)).returncode == 0
    try:
        allowed = await asyncio.to_thread(
            run, rabbitmqctl, "set_permissions", "-p", private_vhost, user, *RELAY_PERMISSIONS
        )
        assert allowed.returncode == 0, allowed.stderr
        environ = relay_environ(
            names,
            tmp_path,
            RELAY_AMQP_URL=vhost_url(private_vhost, user, password),
            RELAY_AMQP_EXCHANGE="retm.events",
            RELAY_AMQP_UNROUTED_EXCHANGE="retm.unrouted",
            RELAY_AMQP_REJECTED_EXCHANGE="retm.rejected",
            RELAY_ARCHIVE_QUEUE="retm.archive",
        )
        relay = Relay(load_settings(None, environ))
        with capture_logs() as logs:
            await relay.start()
            try:
                publisher = relay.app[PUBLISHER]
                await wait_for(publisher.connected.is_set, what="the link")
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        relay.url + "/retm/events",
                        data=fixture_bytes("order.created.json"),
                        headers={
                            "Authorization": f"Bearer {TOKEN}",
                            "Content-Type": "application/json",
                        },
                    ) as response:
                        answer = await response.json()
                    async with session.get(relay.url + "/health") as response:
                        health = await response.json()
            finally:
                await relay.stop()
    finally:
        await asyncio.to_thread(run, rabbitmqctl, "delete_user", user)

    assert answer.get("status") == "accepted", answer
    assert health["broker"]["publish_path"] == "fast"
    assert health["broker"]["publish_path_reason"] == (
        "the broker refused the probe publish to the default exchange: the fast path was "
        "checked on aiormq's channel state only"
    )
    checks = ("publish.probe_refused", "publish.fallback")
    assert [entry["event"] for entry in logs if entry["event"] in checks] == [checks[0]]
    assert not [entry for entry in logs if entry["event"] == "webhook.spooled"]
