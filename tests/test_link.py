"""The supervised broker links (the publisher's and the loyalty RPC link's): close() releases
the connection, so the broker sees each link go when the relay stops."""

from __future__ import annotations

from pathlib import Path

from relay.amqp.publish import Publisher
from relay.amqp.rpc import RpcLink
from relay.metrics import Metrics
from relay.routing import Router
from relay.settings import AmqpSettings, load_settings
from tests.conftest import Broker, Names, proxy_url, relay_environ, wait_for
from tests.proxy import FaultProxy


def _amqp(broker: Broker, names: Names, tmp_path: Path, proxy: FaultProxy) -> AmqpSettings:
    environ = relay_environ(names, tmp_path, RELAY_AMQP_URL=proxy_url(proxy))
    amqp = load_settings(None, environ).amqp
    broker.forget_later(
        exchanges=(amqp.exchange, amqp.unrouted_exchange), queues=(amqp.unrouted_exchange,)
    )
    return amqp


async def test_close_closes_each_links_connection(
    broker: Broker, names: Names, tmp_path: Path, fault_proxy: FaultProxy
) -> None:
    """Publisher.close() and RpcLink.close() each close their own broker connection (seen
    from the proxy in front of the broker): one connection left after the first, none after
    the second."""
    amqp = _amqp(broker, names, tmp_path, fault_proxy)
    publisher = Publisher(
        amqp, Router(amqp.routing_key_template, amqp.exchange, amqp.exchanges), Metrics()
    )
    rpc = RpcLink(amqp, Metrics())
    try:
        await publisher.start()
        await rpc.start()
        assert publisher.connected.is_set()
        assert rpc.connected.is_set()
        assert fault_proxy.open_connections == 2

        await publisher.close()
        assert not publisher.connected.is_set()
        await wait_for(lambda: fault_proxy.open_connections == 1, what="the publisher's close")
        assert rpc.connected.is_set()

        await rpc.close()
        assert not rpc.connected.is_set()
        await wait_for(lambda: fault_proxy.open_connections == 0, what="the RPC link's close")
        assert fault_proxy.connections_total == 2
    finally:
        await publisher.close()
        await rpc.close()
