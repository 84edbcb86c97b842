"""Several broker nodes (``amqp.url`` as a list): the links start on the first node that
answers and, when theirs is lost, move on to the next one. Here the "nodes" are two fault
proxies in front of the shared broker, so a node can be cut in a second; the real three-node
cluster with a node killed is tests/test_cluster.py (mark ``cluster``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.amqp.rpc import RpcLink
from relay.http.app import PUBLISHER
from relay.metrics import Metrics
from relay.settings import describe, load_settings
from tests.cli import cli_environ, run_cli
from tests.conftest import (
    AMQP_URL,
    Broker,
    Names,
    StartRelay,
    free_port,
    proxy_url,
    relay_environ,
    wait_for,
)
from tests.proxy import FaultProxy


@pytest.fixture
async def two_nodes(fault_proxy: FaultProxy) -> AsyncIterator[tuple[FaultProxy, FaultProxy]]:
    """Two proxies to the shared broker, each standing for one node of a cluster."""
    second = await FaultProxy(fault_proxy.target[1]).start()
    yield fault_proxy, second
    await second.close()


async def test_events_follow_the_link_to_the_next_node(
    start_relay: StartRelay, broker: Broker, names: Names, two_nodes: tuple[FaultProxy, FaultProxy]
) -> None:
    """Cut the node the relay is on: the link comes up on the next node, /health names it,
    the failover is counted, and events published before and after reach the queue once."""
    a, b = two_nodes
    relay = await start_relay(RELAY_AMQP_URL=f"{proxy_url(a)},{proxy_url(b)}")
    publisher = relay.relay.app[PUBLISHER]
    tap = await broker.tap(names.exchange)
    before = b'{"event":"order.created","reference":"failover-1"}'
    after = b'{"event":"order.created","reference":"failover-2"}'
    assert (await relay.event(before)).status == 200
    health = (await relay.get("/health")).body["broker"]

    a.cut()
    await wait_for(lambda: publisher.connected.is_set() and publisher.address == b.url_host_port)
    answer = await relay.event(after)
    moved = (await relay.get("/health")).body["broker"]
    metrics = (await relay.get("/metrics")).body

    assert (health["address"], health["nodes"], health["failovers"]) == (
        a.url_host_port,
        [a.url_host_port, b.url_host_port],
        0,
    )
    assert answer.status == 200
    assert (moved["connected"], moved["address"], moved["failovers"]) == (True, b.url_host_port, 1)
    assert "relay_broker_failovers_total 1.0" in metrics
    assert [m.body for m in await tap.take(2)] == [before, after]
    assert tap.empty()
    assert (a.open_connections, b.open_connections) == (0, 2)  # the publisher's and RPC link's


async def test_a_dead_first_node_is_skipped_at_start(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """Nothing listens on the first node: the relay starts on the second and is ready; the
    start is not a failover (no link came before it)."""
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    relay = await start_relay(RELAY_AMQP_URL=f"{dead},{proxy_url(fault_proxy)}")
    tap = await broker.tap(names.exchange)
    body = b'{"event":"order.created","reference":"second-node"}'

    answer = await relay.event(body)
    ready = await relay.get("/readyz")
    health = (await relay.get("/health")).body["broker"]

    assert (answer.status, ready.status) == (200, 200)
    assert (health["address"], health["failovers"]) == (fault_proxy.url_host_port, 0)
    assert (await tap.get()).body == body


async def test_rpc_link_fails_over_too(
    broker: Broker, names: Names, tmp_path: Path, two_nodes: tuple[FaultProxy, FaultProxy]
) -> None:
    """The loyalty RPC link is supervised the same way: cut its node, it comes up on the next."""
    a, b = two_nodes
    environ = relay_environ(names, tmp_path, RELAY_AMQP_URL=f"{proxy_url(a)},{proxy_url(b)}")
    link = RpcLink(load_settings(None, environ).amqp, Metrics())
    await link.start()
    try:
        assert (link.connected.is_set(), link.address) == (True, a.url_host_port)
        a.cut()
        await wait_for(lambda: link.connected.is_set() and link.address == b.url_host_port)
        assert (link.failovers, a.open_connections, b.open_connections) == (1, 0, 1)
    finally:
        await link.close()


def test_a_toml_list_and_a_comma_separated_variable_give_the_same_nodes(tmp_path: Path) -> None:
    """``amqp.url`` as a TOML array, or comma-separated in RELAY_AMQP_URL: the same nodes in
    the same order."""
    path = tmp_path / "relay.toml"
    path.write_text(
        '[amqp]\nurl = ["amqp://u:p@10.0.0.1:5672/", "amqps://u:p@10.0.0.2/", "amqp://10.0.0.3"]\n'
    )
    from_toml = load_settings(path, {}).amqp
    from_env = load_settings(
        None,
        {"RELAY_AMQP_URL": "amqp://u:p@10.0.0.1:5672/, amqps://u:p@10.0.0.2/,amqp://10.0.0.3"},
    ).amqp

    expected = ("amqp://u:p@10.0.0.1:5672/", "amqps://u:p@10.0.0.2/", "amqp://10.0.0.3")
    assert from_toml.urls() == from_env.urls() == expected
    assert describe(load_settings(path, {}))["amqp"]["url"] == (
        "amqp://u:********@10.0.0.1:5672/,amqps://u:********@10.0.0.2/,amqp://10.0.0.3"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amqp://u:p@h1/,http://u:p@h2/", "node 2 of the list: must start with amqp://"),
        ("amqp://u:p@h1/,amqp:///vhost", "node 2 of the list: must name a host"),
        ("amqp://u:p@h1/,amqp://u:p@h2:99999/", "node 2 of the list: has an invalid port"),
        ("amqp://u:p@h1/,amqp://u:q@h1:5672/", "node 2 of the list: names the same node"),
        (" , ", "must name at least one broker node"),
    ],
)
async def test_check_config_validates_each_node(value: str, message: str, tmp_path: Path) -> None:
    """``check-config`` checks every URL of the list and names the bad one by position, never
    by its credentials."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")

    result = await run_cli("check-config", env=cli_environ(empty, RELAY_AMQP_URL=value))

    assert result.code == 2
    assert result.stderr.startswith(f"retm-relay: configuration error: amqp.url: {message}")
    assert ":p@" not in result.stderr and ":q@" not in result.stderr


async def test_a_vhost_the_broker_refuses_is_named_on_readyz(
    start_relay: StartRelay, names: Names
) -> None:
    """A vhost that does not exist: the broker closes each connection while it is being
    opened. /readyz says so in an operator's words (not aiormq's ``Expected one of
    ['Connection.OpenOk'], got <Connection.Close object ...>``); events are spooled meanwhile."""
    url = AMQP_URL.rstrip("/") + "/" + names("no-such-vhost")
    relay = await start_relay(wait_durable=False, RELAY_AMQP_URL=url)
    publisher = relay.relay.app[PUBLISHER]
    await wait_for(lambda: publisher.last_error is not None, what="the first refusal")

    ready = await relay.get("/readyz")

    assert ready.status == 503
    assert ready.body["reasons"] == {
        "broker": "broker link down: the broker closed the connection while it was being "
        "opened: the vhost of amqp.url does not exist, or its user may not use it; events are "
        "spooled"
    }
