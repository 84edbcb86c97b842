"""The chaos soak: ``make chaos`` (or ``python -m chaos.soak``).

A sender that behaves like RETM (10 s timeout; on a timeout, a connection error or a non-2xx it
retries up to 3 times; deliveries out of order) posts N distinct events at a steady rate to a
real relay process (``python -m relay serve``), whose broker link runs through a loopback TCP
proxy. Meanwhile the soak repeatedly cuts the link (RST), stalls it (no FIN, no RST: bytes stop)
and kills the relay with SIGKILL, restarting it after a second as systemd's Restart= would.

At the end it waits for the spool to drain, stops the relay, consumes the whole queue and
prints a table: events sent, events answered 2xx, events on the queue, lost (2xx but not on the
queue: must be 0), duplicates by message_id, answers slower than 10 s (must be 0), and the
spool's peak depth; then the verdict, one line per target: nothing lost, at most 0.1 %
duplicates, no answer slower than 10 s, the spool drained, a clean exit after SIGTERM. Exit 0
only when every target is met.

With ``--cluster`` the broker is a three-node RabbitMQ cluster of the soak's own (one proxy in
front of each node, ``amqp.url`` listing the three) with a quorum queue, and the dedup store is
a Redis Sentinel set of its own (master, replica, three sentinels); besides the faults above the
soak ``kill -9``s the node the relay is connected to (and restarts it) and kills the Redis
master (the sentinels promote the replica; the old master comes back as a replica). The table
then also counts the relay's failovers to another node.

Everything it creates has unique names (``chaos.<hex>.*``) and is deleted afterwards; it only
talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import orjson

from tests.engines import (
    RabbitCluster,
    SentinelSet,
    start_rabbit_cluster,
    start_sentinel_set,
)
from tests.proxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "chaos-token-" + uuid.uuid4().hex
RETM_TIMEOUT = 10.0
RETRIES = 3
RETRY_DELAYS = (2.0, 4.0, 8.0)  # seconds before each retry (RETM does not document its own)
RESTART_DELAY = 1.0  # seconds between a SIGKILL and the restart (systemd RestartSec)
#: most copies by message_id, as a share of the events on the queue, for a PASS
MAX_DUPLICATE_PERCENT = 0.1


@dataclass
class Tally:
    """What the sender saw."""

    sent: int = 0
    ok: set[int] = field(default_factory=set)
    attempts: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    slow: int = 0
    max_latency: float = 0.0
    gave_up: int = 0

    def answer(self, kind: str, latency: float) -> None:
        self.answers[kind] = self.answers.get(kind, 0) + 1
        self.max_latency = max(self.max_latency, latency)
        if latency >= RETM_TIMEOUT:
            self.slow += 1


class RelayProcess:
    """The relay as systemd runs it: a child process, restarted after SIGKILL."""

    def __init__(self, environ: dict[str, str], log_path: Path) -> None:
        self.environ = environ
        self.log = log_path.open("ab")
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(self.environ)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", cwd=ROOT, env=env,
            stdout=self.log, stderr=self.log,
        )  # fmt: skip
        self.starts += 1

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
            self.kills += 1

    async def stop(self) -> int:
        if self.process is None or self.process.returncode is not None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        return await self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def event_body(run: str, n: int) -> bytes:
    return orjson.dumps(
        {"event": "order.created", "reference": f"{run}-{n}", "n": n, "total": n % 997}
    )


async def send_one(
    session: aiohttp.ClientSession, url: str, body: bytes, n: int, tally: Tally
) -> None:
    """One event, RETM style: up to 1 + RETRIES attempts, each with a 10 s timeout."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for attempt in range(1 + RETRIES):
        if attempt:
            await asyncio.sleep(RETRY_DELAYS[attempt - 1] * (0.5 + random.random()))
        tally.attempts += 1
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(RETM_TIMEOUT),
                session.post(url, data=body, headers=headers) as response,
            ):
                await response.read()
                status = response.status
        except TimeoutError:
            tally.answer("timeout", time.monotonic() - started)
            continue
        except aiohttp.ClientError:
            tally.answer("connection error", 0.0)  # nobody listening: not an answer
            continue
        tally.answer(str(status), time.monotonic() - started)
        if 200 <= status < 300:
            tally.ok.add(n)
            return
    tally.gave_up += 1


async def sender(url: str, run: str, count: int, rate: float, tally: Tally) -> None:
    """``count`` events at ``rate`` per second; each is delayed by up to 0.5 s at random, so
    deliveries arrive out of order."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(count):
            due = start + n / rate + random.random() * 0.5
            tasks.append(
                asyncio.ensure_future(
                    _later(due, send_one(session, url, event_body(run, n), n, tally))
                )
            )
            tally.sent += 1
            if n % 50 == 0:
                await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
        await asyncio.gather(*tasks)


async def _later(due: float, coro: object) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, due - loop.time()))
    await coro  # type: ignore[misc]


@dataclass
class Cluster:
    """The engines of ``--cluster``: the RabbitMQ cluster with one proxy per node (the relay
    knows the nodes by their proxies), and the Sentinel set."""

    rabbit: RabbitCluster
    proxies: list[FaultProxy]
    sentinels: SentinelSet
    cookie: str = ""

    def proxy_of(self, address: str) -> FaultProxy | None:
        return next((p for p in self.proxies if p.url_host_port == address), None)


async def connected_proxy(url: str, cluster: Cluster) -> FaultProxy | None:
    """The proxy (node) the relay's publisher is connected to, from its /health."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
        async with (
            aiohttp.ClientSession() as session,
            asyncio.timeout(1),
            session.get(url + "/health") as r,
        ):
            data = orjson.loads(await r.read())
            return cluster.proxy_of(data["broker"]["address"])
    return None


async def kill_node(url: str, cluster: Cluster) -> str:
    """kill -9 the RabbitMQ node the relay is on, wait 3 s, restart it and wait until it has
    rejoined (so that the next node kill leaves a majority)."""
    proxy = await connected_proxy(url, cluster)
    index = cluster.proxies.index(proxy) if proxy is not None else 0
    node = cluster.rabbit.nodes[index]
    node.kill()
    await asyncio.sleep(3)
    await node.stop()
    node.start(cluster.cookie)
    await node.wait_started(timeout=180)
    return node.name


async def fail_over_redis(cluster: Cluster) -> None:
    """kill -9 the Redis master, wait until the sentinels name another, restart the old one
    (the sentinels make it a replica of the new master)."""
    sentinels = cluster.sentinels
    old = await sentinels.master_port()
    server = next(s for s in (sentinels.master, sentinels.replica) if s.port == old)
    server.kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await sentinels.master_port() != old:
                break
        await asyncio.sleep(0.2)
    await server.stop()
    server.start()
    await server.wait_started()


async def faults(
    proxy: FaultProxy | None,
    relay: RelayProcess,
    done: asyncio.Event,
    log: list[str],
    times: list[tuple[float, str]],
    url: str = "",
    cluster: Cluster | None = None,
) -> None:
    """Cut, stall and kill in turn (with ``cluster`` also a node kill and a Redis failover),
    every few seconds, until ``done``. ``proxy``: the one broker proxy; with a cluster the
    proxy of the node the relay is on."""
    kinds = ["cut", "stall", "kill"]
    if cluster is not None:
        kinds = ["cut", "node kill", "stall", "redis failover", "kill"]
    i = 0
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(random.uniform(4, 8)):
                await done.wait()
        if done.is_set():
            return
        kind = kinds[i % len(kinds)]
        i += 1
        times.append((time.monotonic(), f"{kind} (start)"))
        target = proxy
        if cluster is not None and kind in {"cut", "stall"}:
            target = await connected_proxy(url, cluster)
        if kind == "cut" and target is not None:
            target.cut()
            await asyncio.sleep(random.uniform(1, 3))
            target.restore()
        elif kind == "stall" and target is not None:
            target.stall()
            await asyncio.sleep(random.uniform(2, 6))
            target.restore()
        elif kind == "node kill" and cluster is not None:
            await kill_node(url, cluster)
        elif kind == "redis failover" and cluster is not None:
            await fail_over_redis(cluster)
        elif kind == "kill":
            await relay.kill()
            await asyncio.sleep(RESTART_DELAY)
            await relay.start()
        log.append(kind)
        times.append((time.monotonic(), kind))


def failovers_logged(log_path: Path) -> int:
    """Broker links that came up on another node (``broker.connected`` with failover)."""
    count = 0
    with contextlib.suppress(OSError):
        for line in log_path.read_bytes().splitlines():
            if b'"broker.connected"' in line and b'"failover": true' in line.replace(
                b'"failover":true', b'"failover": true'
            ):
                count += 1
    return count


async def watch_spool(url: str, done: asyncio.Event, peak: list[int]) -> None:
    """Sample the relay's spool depth (relay_spool_events) every 100 ms."""
    async with aiohttp.ClientSession() as session:
        while not done.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with asyncio.timeout(1), session.get(url + "/health") as r:
                    data = orjson.loads(await r.read())
                    peak[0] = max(peak[0], int(data["spool"]["events"]))
            await asyncio.sleep(0.1)


async def wait_drained(url: str, timeout: float) -> bool:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                async with asyncio.timeout(1), session.get(url + "/health") as r:
                    data = orjson.loads(await r.read())
                    if data["spool"]["events"] == 0 and data["broker"]["connected"]:
                        return True
            await asyncio.sleep(0.2)
    return False


async def consume_all(url: str, queue_name: str) -> list[tuple[str, bytes]]:
    """Every message on the queue as (message_id, body): a consumer (prefetch 1000) until the
    count the queue had, then until nothing more came for 3 s (a consumer, not basic.get one
    at a time, which takes minutes on a quorum queue)."""
    messages: list[tuple[str, bytes]] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(queue_name, passive=True)
        expected = queue.declaration_result.message_count or 0
        async with queue.iterator(no_ack=True) as it:
            while True:
                try:
                    async with asyncio.timeout(30 if len(messages) < expected else 3):
                        message = await it.__anext__()
                except (TimeoutError, StopAsyncIteration):
                    break
                messages.append((message.message_id or "", message.body))
    return messages


async def main(count: int, rate: float, amqp_url: str, with_cluster: bool = False) -> int:
    run = f"chaos.{uuid.uuid4().hex[:8]}"
    exchange, unrouted, queue_name = f"{run}.events", f"{run}.unrouted", f"{run}.all"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    cluster: Cluster | None = None
    proxy: FaultProxy | None = None
    if with_cluster:
        print("chaos: starting a 3-node RabbitMQ cluster and a Redis Sentinel set")
        rabbit = await start_rabbit_cluster(state / "rabbit")
        cookie = (rabbit.nodes[0].home / ".erlang.cookie").read_text()
        proxies = [await FaultProxy(node.port).start() for node in rabbit.nodes]
        sentinels = await start_sentinel_set(state / "redis")
        cluster = Cluster(rabbit, proxies, sentinels, cookie)
        amqp_url = rabbit.urls[0]
        relay_amqp = ",".join(f"amqp://guest:guest@127.0.0.1:{p.port}/" for p in cluster.proxies)
    else:
        broker_port = int(amqp_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
        proxy = await FaultProxy(broker_port).start()
        relay_amqp = amqp_url.replace(f":{broker_port}", f":{proxy.port}")
    environ = {
        "RELAY_HTTP_PORT": str(port),
        "RELAY_AUTH_TOKENS": TOKEN,
        "RELAY_AMQP_URL": relay_amqp,
        "RELAY_AMQP_EXCHANGE": exchange,
        "RELAY_AMQP_UNROUTED_EXCHANGE": unrouted,
        "RELAY_AMQP_REJECTED_EXCHANGE": f"{run}.rejected",
        "RELAY_ARCHIVE_QUEUE": f"{run}.archive",
        "RELAY_STATE_DIR": str(state),
        "RELAY_LOG_LEVEL": "info",
        "RELAY_LOG_FORMAT": "json",
    }
    if cluster is not None:
        environ["RELAY_DEDUP_BACKEND"] = "redis"
        environ["RELAY_DEDUP_REDIS_URL"] = cluster.sentinels.url
        environ["RELAY_DEDUP_REDIS_PREFIX"] = f"{run}:"
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(
        queue_name, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(ex, "#")
    relay = RelayProcess(environ, state / "relay.log")
    tally = Tally()
    fault_log: list[str] = []
    fault_times: list[tuple[float, str]] = []
    peak = [0]
    done = asyncio.Event()
    started = time.monotonic()
    print(
        f"chaos: {count} events at {rate:g}/s to {url}, faults every 4-8 s; log {state}/relay.log"
        + (" (cluster)" if cluster else "")
    )
    try:
        await relay.start()
        await wait_drained(url, 30)
        background = [
            asyncio.ensure_future(faults(proxy, relay, done, fault_log, fault_times, url, cluster)),
            asyncio.ensure_future(watch_spool(url, done, peak)),
        ]
        await sender(url + "/retm/events", run, count, rate, tally)
        done.set()
        await asyncio.gather(*background)
        for p in [proxy] if cluster is None else cluster.proxies:
            if p is not None:
                p.restore()
        if relay.process is None or relay.process.returncode is not None:
            await relay.start()
        drained = await wait_drained(url, 120)
        code = await relay.stop()
        if cluster is not None:  # a node that answers (the first may have been restarted)
            amqp_url = next(n.url for n in cluster.rabbit.nodes if n.running)
        messages = await consume_all(amqp_url, queue_name)
    finally:
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue_name)
            await channel.queue_delete(unrouted)
            await channel.queue_delete(f"{run}.archive")
            await channel.exchange_delete(exchange)
            await channel.exchange_delete(unrouted)
            await channel.exchange_delete(f"{run}.archive")
            await channel.queue_delete(f"{run}.rejected")
            await channel.exchange_delete(f"{run}.rejected")
        with contextlib.suppress(Exception):
            await connection.close()
        await relay.kill()
        if proxy is not None:
            await proxy.close()
        if cluster is not None:
            for p in cluster.proxies:
                await p.close()
            await cluster.rabbit.close()
            await cluster.sentinels.close()
    elapsed = time.monotonic() - started
    failovers = failovers_logged(state / "relay.log")

    refs = [orjson.loads(body)["n"] for _, body in messages]
    on_queue = set(refs)
    ids = [mid for mid, _ in messages]
    duplicates = len(ids) - len(set(ids))
    lost = tally.ok - on_queue
    rows = [
        ("events sent", f"{tally.sent}"),
        ("events answered 2xx", f"{len(tally.ok)}"),
        ("events on the queue", f"{len(on_queue)}"),
        ("lost (2xx, not on the queue)", f"{len(lost)}"),
        ("duplicates by message_id", f"{duplicates} ({100 * duplicates / max(1, len(on_queue)):.3f} %)"),  # noqa: E501
        ("answers slower than 10 s", f"{tally.slow}"),
        ("slowest answer", f"{tally.max_latency:.2f} s"),
        ("spool peak depth", f"{peak[0]}"),
        ("requests (with retries)", f"{tally.attempts}"),
        ("answers", ", ".join(f"{k}: {v}" for k, v in sorted(tally.answers.items()))),
        ("events given up after 3 retries", f"{tally.gave_up}"),
        ("on the queue but never 2xx", f"{len(on_queue - tally.ok)}"),
        ("faults", f"{fault_log.count('cut')} cuts, {fault_log.count('stall')} stalls, {relay.kills} kill -9 + restart"  # noqa: E501
            + (f", {fault_log.count('node kill')} node kill -9 + restart, {fault_log.count('redis failover')} Sentinel failovers" if cluster else "")),  # noqa: E501
        ("failovers to another node", f"{failovers}"),
        ("spool drained at the end", "yes" if drained else "NO"),
        ("relay exit after SIGTERM", f"{code}"),
        ("duration", f"{elapsed:.0f} s"),
    ]  # fmt: skip
    seen: set[str] = set()
    copies_at = []
    for mid, body in messages:
        if mid in seen:
            copies_at.append(started + 1 + orjson.loads(body)["n"] / rate)
        seen.add(mid)
    report = [f"{t - started:7.1f} s  {kind}" for t, kind in fault_times]
    report += [f"{t - started:7.1f} s  copy sent about then" for t in sorted(copies_at)]
    (state / "faults.txt").write_text("\n".join(sorted(report)) + "\n")
    width = max(len(k) for k, _ in rows)
    print(f"| {'':<{width}} | result |\n| {'-' * width} | ------ |")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    share = 100 * duplicates / max(1, len(on_queue))
    verdict = [  # (target, figure, met): every target the table reports
        ("lost (2xx, not on the queue) = 0", f"{len(lost)}", not lost),
        (
            f"duplicates by message_id <= {MAX_DUPLICATE_PERCENT} %",
            f"{share:.3f} % ({duplicates})",
            share <= MAX_DUPLICATE_PERCENT,
        ),
        ("answers slower than 10 s = 0", f"{tally.slow}", tally.slow == 0),
        ("spool drained at the end", "yes" if drained else "no", drained),
        ("relay exit after SIGTERM = 0", f"{code}", code == 0),
    ]
    for target, figure, met in verdict:
        print(f"chaos: {'PASS' if met else 'FAIL'}  {target}: {figure}")
    ok = all(met for _, _, met in verdict)
    print("chaos: PASS" if ok else "chaos: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="distinct events (20000)")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second (200)")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="against a 3-node RabbitMQ cluster and a Redis Sentinel set of the soak's own, "
        "with node kills and Sentinel failovers besides the other faults",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.events, args.rate, args.amqp_url, args.cluster)))
