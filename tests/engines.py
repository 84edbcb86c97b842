"""Private RabbitMQ and Redis engines that a test starts for itself: a single RabbitMQ node, a
RabbitMQ cluster, a Redis Sentinel set and a Redis Cluster. Each listens on spare loopback
ports, keeps its data in a folder of its own (a RabbitMQ cluster also has its own Erlang
cookie), and is killed and deleted afterwards; the shared broker and Redis are never touched.

The chaos soak (chaos/soak.py) starts the same engines, so this module only needs the standard
library, aio-pika and redis-py (no pytest).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class EngineError(RuntimeError):
    """An engine did not start, or a control command failed (the message says which)."""


def free_port() -> int:
    """A TCP port nothing listens on right now (for a private server of a test's own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it is true; EngineError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise EngineError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def answers(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _kill_group(process: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to the process group ``process`` leads (the engine and its helpers)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)


async def _stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap it."""
    if process.poll() is None:
        _kill_group(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), grace)
        except TimeoutError:
            _kill_group(process)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # helpers (erl_child_setup ...) left behind
    await asyncio.to_thread(process.wait)


# -- RabbitMQ ------------------------------------------------------------------------------------


@dataclass
class RabbitNode:
    """One RabbitMQ node of a test's own: ``name`` (``relaytest-<hex>-<n>@localhost``), AMQP
    ``port``, ``home`` (HOME with the Erlang cookie, data and logs), the server process."""

    name: str
    port: int
    home: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def address(self) -> str:
        """As the relay names a node (``relay.amqp.link.broker_address``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n NODE ARGS``; its output. EngineError when it fails."""
        process = await asyncio.create_subprocess_exec(
            str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args,
            env={**os.environ, "HOME": str(self.home)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise EngineError(f"rabbitmqctl {' '.join(args)} on {self.name}: timed out") from None
        if process.returncode != 0:
            raise EngineError(f"rabbitmqctl {' '.join(args)} on {self.name}: {out.decode()}")
        return out.decode()

    def start(self, cookie: str) -> None:
        """Start the server (returns at once; ``wait_started`` waits for it)."""
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists():
            raise EngineError(f"{server} is missing: install rabbitmq-server (make test does)")
        self.home.mkdir(parents=True, exist_ok=True)
        cookie_file = self.home / ".erlang.cookie"
        if not cookie_file.exists():
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)
        (self.home / "enabled_plugins").write_text("[].")
        dist_port = free_port()
        env = {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            # Erlang distribution on loopback only
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq"),
        }
        self.process = subprocess.Popen(
            [str(server)], env=env, cwd=self.home, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def wait_started(self, timeout: float = 120) -> None:
        """Wait until the node accepts AMQP connections and has booted."""

        async def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(f"RabbitMQ node {self.name} exited ({self.process.returncode})")
            return await answers(self.port)

        await until(up, timeout, f"RabbitMQ node {self.name}")
        await self.ctl("await_startup")

    def kill(self) -> None:
        """``kill -9`` the node (every process of it), without waiting."""
        if self.process is not None:
            _kill_group(self.process)

    async def stop(self) -> None:
        if self.process is not None:
            await _stop(self.process)


async def start_rabbit_node(base: Path) -> RabbitNode:
    """One running RabbitMQ node in ``base`` (see ``RabbitNode``)."""
    node = RabbitNode(f"relaytest-{secrets.token_hex(4)}@localhost", free_port(), base)
    node.start(secrets.token_hex(16))
    try:
        await node.wait_started()
    except BaseException:
        await node.stop()
        raise
    return node


@dataclass
class RabbitCluster:
    """A RabbitMQ cluster of a test's own: its nodes share one Erlang cookie of their own."""

    nodes: list[RabbitNode]
    base: Path

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node_at(self, address: str) -> RabbitNode:
        """The node the relay calls ``address`` (``127.0.0.1:<port>``)."""
        return next(node for node in self.nodes if node.address == address)

    async def close(self) -> None:
        """Kill every node and delete the cluster's folder."""
        await asyncio.gather(*(node.stop() for node in self.nodes))
        shutil.rmtree(self.base, ignore_errors=True)


async def start_rabbit_cluster(base: Path, size: int = 3) -> RabbitCluster:
    """``size`` RabbitMQ nodes started together, the others joined to the first with
    ``rabbitmqctl join_cluster``; returns once every node reports the whole cluster running."""
    cookie = secrets.token_hex(16)
    tag = secrets.token_hex(3)
    nodes = [
        RabbitNode(f"relaytest-{tag}-{n}@localhost", free_port(), base / f"node{n}")
        for n in range(1, size + 1)
    ]
    cluster = RabbitCluster(nodes, base)
    try:
        for node in nodes:
            node.start(cookie)
        await asyncio.gather(*(node.wait_started() for node in nodes))
        for node in nodes[1:]:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", nodes[0].name)
            await node.ctl("start_app")
        names = [node.name for node in nodes]

        async def formed() -> bool:
            status = await nodes[0].ctl("cluster_status", "--formatter", "json")
            return all(status.count(name) >= 2 for name in names) and '"running_nodes"' in (status)

        await until(formed, 60, "the RabbitMQ cluster to form")
        for node in nodes:
            await node.ctl("await_startup")
    except BaseException:
        await cluster.close()
        raise
    return cluster


# -- Redis ---------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """One redis-server (or sentinel) of a test's own on ``port``, files in ``directory``."""

    port: int
    directory: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.process = subprocess.Popen(
                ["redis-server", *self.args], cwd=self.directory, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        except FileNotFoundError:
            raise EngineError("redis-server is not installed (make test installs it)") from None

    async def wait_started(self, timeout: float = 20) -> None:
        await until(lambda: answers(self.port), timeout, f"redis on port {self.port}")

    def kill(self) -> None:
        """``kill -9`` the server."""
        if self.process is not None:
            _kill_group(self.process)

    async def stop(self) -> None:
        if self.process is not None:
            await _stop(self.process, grace=10)


def _server_args(port: int, directory: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--save", "", "--appendonly", "no", *extra,
    )  # fmt: skip


async def redis_cli(port: int, *args: str, timeout: float = 60) -> str:
    """``redis-cli -p PORT ARGS``; its output. EngineError when it fails."""
    process = await asyncio.create_subprocess_exec(
        "redis-cli", "-h", "127.0.0.1", "-p", str(port), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    if process.returncode != 0:
        raise EngineError(f"redis-cli -p {port} {' '.join(args)}: {out.decode()}")
    return out.decode()


@dataclass
class SentinelSet:
    """A Redis master, one replica and three sentinels monitoring it as ``service``."""

    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]
    base: Path
    service: str = "relaymaster"
    down_after_ms: int = 1000

    @property
    def url(self) -> str:
        """``dedup.redis_url`` for the relay (database 0)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    async def master_port(self) -> int:
        """The master's port as the sentinels (the first that answers) report it now."""
        for sentinel in self.sentinels:
            with contextlib.suppress(EngineError, TimeoutError):
                out = await redis_cli(
                    sentinel.port, "SENTINEL", "get-master-addr-by-name", self.service, timeout=5
                )
                lines = out.split()
                if len(lines) == 2:
                    return int(lines[1])
        raise EngineError("no sentinel reports the master")

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in (*self.sentinels, self.replica, self.master)))
        shutil.rmtree(self.base, ignore_errors=True)


async def start_sentinel_set(base: Path) -> SentinelSet:
    """Start the master, its replica (synced) and three sentinels that agree on the master."""
    master_port = free_port()
    master = RedisServer(master_port, base / "master", _server_args(master_port, base / "master"))
    replica_port = free_port()
    replica = RedisServer(
        replica_port,
        base / "replica",
        _server_args(replica_port, base / "replica", "--replicaof", "127.0.0.1", str(master_port)),
    )
    sentinels: list[RedisServer] = []
    result = SentinelSet(master, replica, sentinels, base)
    try:
        for server in (master, replica):
            server.start()
            await server.wait_started()
        await until(lambda: _replica_synced(master_port), 30, "the replica to sync with the master")
        for n in range(3):
            port = free_port()
            directory = base / f"sentinel{n}"
            directory.mkdir(parents=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {result.service} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {result.service} {result.down_after_ms}\n"
                f"sentinel failover-timeout {result.service} 5000\n"
                f"sentinel parallel-syncs {result.service} 1\n"
            )
            sentinel = RedisServer(port, directory, (str(conf), "--sentinel"))
            sentinels.append(sentinel)
            sentinel.start()
        for sentinel in sentinels:
            await sentinel.wait_started()

        async def agreed() -> bool:
            for sentinel in sentinels:
                out = await redis_cli(sentinel.port, "SENTINEL", "sentinels", result.service)
                if out.count("127.0.0.1") < 2:  # each sentinel knows the other two
                    return False
            return True

        await until(agreed, 30, "the sentinels to find each other")
    except BaseException:
        await result.close()
        raise
    return result


async def _replica_synced(master_port: int) -> bool:
    info = await redis_cli(master_port, "INFO", "replication")
    return "connected_slaves:1" in info and "state=online" in info


@dataclass
class RedisClusterSet:
    """A Redis Cluster of three masters (no replicas), slots spread by redis-cli."""

    servers: list[RedisServer]
    base: Path
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.servers)
        return f"redis+cluster://{hosts}"

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers))
        shutil.rmtree(self.base, ignore_errors=True)


async def start_redis_cluster(base: Path, masters: int = 3) -> RedisClusterSet:
    """``masters`` cluster-enabled redis-servers joined by ``redis-cli --cluster create``;
    returns once every node says ``cluster_state:ok``."""
    servers = []
    for n in range(masters):
        port = free_port()
        directory = base / f"node{n}"
        servers.append(
            RedisServer(
                port,
                directory,
                _server_args(
                    port,
                    directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    str(free_port()),
                ),
            )
        )
    cluster = RedisClusterSet(servers, base)
    try:
        for server in servers:
            server.start()
        for server in servers:
            await server.wait_started()
        await redis_cli(
            servers[0].port, "--cluster", "create",
            *(f"127.0.0.1:{s.port}" for s in servers),
            "--cluster-replicas", "0", "--cluster-yes",
        )  # fmt: skip

        async def ok() -> bool:
            for server in servers:
                if "cluster_state:ok" not in await redis_cli(server.port, "CLUSTER", "INFO"):
                    return False
            return True

        await until(ok, 30, "the Redis Cluster to be ok")
    except BaseException:
        await cluster.close()
        raise
    return cluster
