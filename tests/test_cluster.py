"""More than one machine, on real multi-node engines that each test starts for itself (mark
``cluster``; ``make test`` runs them in a pytest invocation of their own): a three-node
RabbitMQ cluster with a quorum queue, a Redis Sentinel set (master, replica, three sentinels)
and a three-master Redis Cluster. Every engine listens on spare loopback ports, keeps its data in
this test's temporary folder (the RabbitMQ cluster with an Erlang cookie of its own) and is
killed and deleted afterwards; the shared broker and Redis are never touched.

The load is RETM-like: distinct events at a steady rate, each posted again after a short pause
whenever the answer is not a 2xx (or there is none), until it is one.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import pytest

from relay.http.app import PUBLISHER, SPOOL
from relay.retm.tokens import RedisTokenStore, TokenRecord
from relay.service import Relay
from relay.settings import load_settings
from tests.conftest import TOKEN, Broker, Names, relay_environ, wait_for
from tests.engines import (
    EngineError,
    RabbitCluster,
    RedisClusterSet,
    SentinelSet,
    redis_cli,
    start_rabbit_cluster,
    start_redis_cluster,
    start_sentinel_set,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """RETM-like senders: ``count`` distinct events at ``rate`` per second, each retried every
    0.3-0.6 s until its answer is a 2xx. ``answers`` counts every answer by status (or
    ``error``); ``ok`` holds the events answered 2xx."""

    url: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    answers: dict[str, int] = field(default_factory=dict)
    ok: set[int] = field(default_factory=set)
    slowest: float = 0.0

    def body(self, n: int) -> bytes:
        return orjson.dumps({"event": "order.created", "reference": f"{self.run}-{n}", "n": n})

    async def post(self, session: aiohttp.ClientSession, n: int) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                async with (
                    asyncio.timeout(10),
                    session.post(self.url, data=self.body(n), headers=headers) as response,
                ):
                    await response.read()
                    kind = str(response.status)
            except (TimeoutError, aiohttp.ClientError):
                kind = "error"
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answers[kind] = self.answers.get(kind, 0) + 1
            if kind.startswith("2"):
                self.ok.add(n)
                return
            attempt += 1
            await asyncio.sleep(0.3 + 0.3 * (attempt % 2))

    async def run_events(self, count: int, rate: float) -> None:
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            for n in range(count):
                await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
                tasks.append(asyncio.ensure_future(self.post(session, n)))
            await asyncio.gather(*tasks)


async def drain_queue(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message on ``queue`` (acknowledged as taken)."""
    connection = await aio_pika.connect(url)
    messages = []
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
    return messages


async def start_relay(environ: dict[str, str]) -> Relay:
    relay = Relay(load_settings(None, environ))
    await relay.start()
    async with asyncio.timeout(60):
        await relay.wait_durable()
    return relay


async def print_relay_state(relay: Relay) -> None:
    """Print what a stuck relay is doing (for a failed test: pytest shows it with the relay's
    log, which is the captured stdout): its /health, the publisher's link and each task's
    await point."""
    async with aiohttp.ClientSession() as session, session.get(relay.url + "/health") as r:
        print("\n/health:", await r.text())
    publisher = relay.app[PUBLISHER]
    link = publisher._link  # a post-mortem
    if link is not None:
        underlay = link.underlay
        print(
            f"link: unconfirmed {len(link.inflight)} ({publisher.in_flight()} events), "
            f"nacked in a row {link.nacked_in_a_row}, "
            f"delivery_tag {underlay.delivery_tag}, confirmations "
            f"{sorted(underlay.confirmations)[:50]}, closed {link.closed.is_set()}"
        )
    spool = relay.app[SPOOL]
    print(f"spool: held {spool.held}, deleting {sorted(spool.deleting)[:20]}")
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}")
        task.print_stack(limit=12, file=sys.stdout)


async def ready(relay: Relay) -> bool:
    async with aiohttp.ClientSession() as session, session.get(relay.url + "/readyz") as r:
        return r.status == 200


# -- a RabbitMQ cluster ------------------------------------------------------------------------


@pytest.fixture
async def rabbit_cluster(tmp_path: Path) -> AsyncIterator[RabbitCluster]:
    """Three RabbitMQ nodes joined into one cluster (about 15-30 s), killed afterwards."""
    try:
        cluster = await start_rabbit_cluster(tmp_path / "rabbit")
    except EngineError as exc:
        pytest.fail(str(exc))
    yield cluster
    await cluster.close()


async def test_kill_9_of_the_connected_node_moves_the_relay_to_another(
    rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    """Under a steady RETM-like load, ``kill -9`` the node the relay is connected to: every
    event ends with a 2xx, every 2xx event is on the quorum queue with its body byte for
    byte, at most 0.5 % are there twice, and the relay is on another node and ready again
    within 15 s."""
    names = Names()
    cluster = rabbit_cluster
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            names("all"), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "#")
    environ = relay_environ(names, tmp_path / "state", RELAY_AMQP_URL=",".join(cluster.urls))
    relay = await start_relay(environ)
    publisher, spool = relay.app[PUBLISHER], relay.app[SPOOL]
    count = 1500
    load = Load(relay.url + "/retm/events")
    try:
        await wait_for(publisher.connected.is_set, timeout=30, what="the broker link")
        first = cluster.node_at(publisher.address)
        sending = asyncio.ensure_future(load.run_events(count, rate=100))
        await wait_for(lambda: len(load.ok) >= 300, timeout=60, what="300 events answered")
        first.kill()
        killed_at = time.monotonic()

        async def moved_and_ready() -> bool:
            moved = publisher.connected.is_set() and publisher.address != first.address
            return moved and await ready(relay)

        await wait_for(moved_and_ready, timeout=15, what="the relay ready on another node")
        back_after = time.monotonic() - killed_at
        await asyncio.wait_for(sending, 240)
        try:
            await wait_for(lambda: spool.depth == 0, timeout=60, what="the spool to drain")
        except pytest.fail.Exception:
            await print_relay_state(relay)
            raise
        failovers = publisher.failovers
        survivor = next(node for node in cluster.nodes if node is not first)
    finally:
        await relay.stop()
    messages = await drain_queue(survivor.url, names("all"))

    numbers = [orjson.loads(m.body)["n"] for m in messages]
    duplicates = len(numbers) - len(set(numbers))
    assert load.ok == set(range(count))
    assert set(numbers) == load.ok
    assert all(m.body == load.body(orjson.loads(m.body)["n"]) for m in messages)
    assert all(m.routing_key == "order.created" for m in messages)
    assert duplicates <= count * 0.005, duplicates
    assert failovers >= 1  # a link reset for nacks (NACKS_BEFORE_RESET) adds one
    print(  # the figures for the report (pytest -s shows them)
        f"\nrabbit cluster: {count} events, answers {load.answers}, duplicates {duplicates}, "
        f"back on another node and ready {back_after:.2f} s after kill -9, "
        f"slowest answer {load.slowest:.2f} s"
    )


# -- Redis Sentinel ------------------------------------------------------------------------------


@pytest.fixture
async def sentinel_set(tmp_path: Path) -> AsyncIterator[SentinelSet]:
    try:
        sentinels = await start_sentinel_set(tmp_path / "sentinel")
    except EngineError as exc:
        pytest.fail(str(exc))
    yield sentinels
    await sentinels.close()


async def test_the_dedup_store_follows_a_sentinel_failover(
    sentinel_set: SentinelSet, broker: Broker, names: Names, tmp_path: Path
) -> None:
    """Kill the Redis master under load: every event ends with a 2xx (503 while no master
    answers, ``on_store_failure = "reject"``), an event delivered before the failover is still
    a duplicate after it, and each event is once on the queue."""
    tap = await broker.tap(names.exchange)
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    environ = relay_environ(
        names,
        tmp_path / "state",
        RELAY_DEDUP_BACKEND="redis",
        RELAY_DEDUP_REDIS_URL=sentinel_set.url,
        RELAY_DEDUP_REDIS_PREFIX=prefix,
    )
    relay = await start_relay(environ)
    load = Load(relay.url + "/retm/events")
    count = 600
    early = b'{"event":"order.created","reference":"before-the-failover"}'
    master, replica = sentinel_set.master, sentinel_set.replica
    try:
        await wait_for(lambda: ready(relay), timeout=30, what="readiness")
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            async with session.post(load.url, data=early, headers=headers) as r:
                first_answer = (r.status, orjson.loads(await r.read())["status"])

            async def replicated() -> bool:  # the delivered mark is on the replica too
                dbsize = [await redis_cli(s.port, "DBSIZE") for s in (master, replica)]
                return dbsize[0] == dbsize[1] != "0\n"

            await wait_for(replicated, timeout=30, what="the replica to have the mark")
            sending = asyncio.ensure_future(load.run_events(count, rate=60))
            await wait_for(lambda: len(load.ok) >= 120, timeout=60, what="120 events answered")
            master.kill()
            await wait_for(
                lambda: _new_master(sentinel_set, master.port),
                timeout=60,
                what="the sentinels to promote the replica",
            )
            await asyncio.wait_for(sending, 240)
            async with session.post(load.url, data=early, headers=headers) as r:
                again = (r.status, orjson.loads(await r.read())["status"])
    finally:
        await relay.stop()
    messages = await tap.take(count + 1, timeout=30)

    assert first_answer == (200, "accepted")
    assert again == (200, "duplicate")
    assert load.ok == set(range(count))
    assert sorted(m.body for m in messages) == sorted([early, *map(load.body, range(count))])
    assert tap.empty()
    assert "503" in load.answers  # the failover was seen: no master for a while
    print(f"\nsentinel failover: {count} events, answers {load.answers}")


async def _new_master(sentinels: SentinelSet, old_port: int) -> bool:
    try:
        return await sentinels.master_port() != old_port
    except EngineError:
        return False


# -- a Redis Cluster -----------------------------------------------------------------------------


@pytest.fixture
async def redis_cluster(tmp_path: Path) -> AsyncIterator[RedisClusterSet]:
    try:
        cluster = await start_redis_cluster(tmp_path / "redis-cluster")
    except EngineError as exc:
        pytest.fail(str(exc))
    yield cluster
    await cluster.close()


async def test_two_relays_share_dedup_across_a_redis_cluster(
    redis_cluster: RedisClusterSet, broker: Broker, names: Names, tmp_path: Path
) -> None:
    """Two relays with their dedup store on a three-master Redis Cluster: the same event
    posted to both at once is one message (one answer ``accepted``, the other ``duplicate``),
    for each of 200 events; their keys are spread over all three masters."""
    tap = await broker.tap(names.exchange)
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    relays = [
        await start_relay(
            relay_environ(
                names,
                tmp_path / f"state{n}",
                RELAY_DEDUP_BACKEND="redis",
                RELAY_DEDUP_REDIS_URL=redis_cluster.url,
                RELAY_DEDUP_REDIS_PREFIX=prefix,
            )
        )
        for n in range(2)
    ]
    count = 200
    bodies = [b'{"event":"order.created","reference":"both-%d"}' % n for n in range(count)]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    async def post(session: aiohttp.ClientSession, relay: Relay, body: bytes) -> tuple[int, str]:
        async with session.post(relay.url + "/retm/events", data=body, headers=headers) as r:
            return r.status, orjson.loads(await r.read())["status"]

    try:
        for relay in relays:
            await wait_for(functools.partial(ready, relay), timeout=30, what="readiness")
        async with aiohttp.ClientSession() as session:
            pairs = await asyncio.gather(
                *(
                    asyncio.gather(post(session, relays[0], b), post(session, relays[1], b))
                    for b in bodies
                )
            )
        keys_per_master = [
            int(await redis_cli(server.port, "DBSIZE")) for server in redis_cluster.servers
        ]
    finally:
        for relay in relays:
            await relay.stop()
    messages = await tap.take(count, timeout=30)

    assert all(sorted(pair) == [(200, "accepted"), (200, "duplicate")] for pair in pairs)
    assert sorted(m.body for m in messages) == sorted(bodies)
    assert tap.empty()
    assert sum(keys_per_master) == count
    assert all(n > 0 for n in keys_per_master), keys_per_master


async def test_the_token_registry_works_on_a_redis_cluster(
    redis_cluster: RedisClusterSet,
) -> None:
    """The registry's hash and version counter share a slot, so its transaction (WATCH,
    MULTI/EXEC) runs on a Cluster: a record added is loaded back and the version moves."""
    store = RedisTokenStore(redis_cluster.url, f"test-{uuid.uuid4().hex[:8]}:tokens")
    record = TokenRecord(b"\x01" * 32, "nakheelember", 1_700_000_000.0, None, "cli")
    try:
        before = await store.version()
        await store.add(record, rotate_until=None)
        records = await store.load()
        after = await store.version()
    finally:
        await store.close()

    assert (before, after) == ("0", "1")
    assert records == [record]
