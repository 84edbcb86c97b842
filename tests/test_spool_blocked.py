"""A broker alarm (connection.blocked): events go to the spool instead of waiting for the
publish deadline, and are forwarded once the alarm clears. The alarm is raised on a RabbitMQ
node of this test's own (its own name, ports, data directory and Erlang cookie), never on the
shared broker other tests use."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from relay.http.app import PUBLISHER, SPOOL
from tests.conftest import Names, StartRelay, wait_for

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PrivateNode:
    """A RabbitMQ node started for one test."""

    name: str
    port: int
    home: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def ctl(self, *args: str) -> None:
        process = await asyncio.create_subprocess_exec(
            str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args,
            env={**os.environ, "HOME": str(self.home)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        assert process.returncode == 0, out.decode()


@pytest.fixture
async def private_node(tmp_path: Path) -> AsyncIterator[PrivateNode]:
    """Start a private RabbitMQ node (fails loudly when RabbitMQ is not installed)."""
    server = RABBITMQ_BIN / "rabbitmq-server"
    if not server.exists():
        pytest.fail(f"{server} is missing: install rabbitmq-server (make test does)")
    home = tmp_path / "rabbit"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    (home / "enabled_plugins").write_text("[].")
    name = f"relaytest-{secrets.token_hex(4)}@localhost"
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq"),
    }
    process = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, waited for below
        [str(server)], env=env, cwd=home, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    node = PrivateNode(name, port, home, process)
    try:

        async def answers() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the private RabbitMQ node exited with {process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_for(answers, timeout=90, what="the private RabbitMQ node")
        await node.ctl("await_startup")
        yield node
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(process.wait), 30)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
async def test_blocked_connection_spools_at_once_and_forwards_after_the_alarm(
    start_relay: StartRelay, private_node: PrivateNode, names: Names
) -> None:
    """Under a memory alarm the broker blocks the relay's connection (after its first publish,
    which is spooled at its deadline): later events are spooled without waiting, readiness
    says degraded and why; once the alarm clears, every event reaches the queue once, in
    order (the first one by its late confirm, not a second copy)."""
    relay = await start_relay(RELAY_AMQP_URL=private_node.url, RELAY_AMQP_PUBLISH_TIMEOUT="1")
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    connection = await aio_pika.connect(private_node.url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(names("blocked"))
    await queue.bind(exchange, "#")
    sent = [b'{"event":"order.created","reference":"alarm-%d"}' % i for i in range(4)]

    before = await relay.event(sent[0])
    await private_node.ctl("set_vm_memory_high_watermark", "0")
    first_blocked = await relay.event(sent[1])
    await wait_for(lambda: publisher.blocked, what="connection.blocked")
    during = [await relay.event(b) for b in sent[2:]]
    readiness = await relay.get("/readyz")
    metrics = (await relay.get("/metrics")).body
    await private_node.ctl("set_vm_memory_high_watermark", "0.4")
    await wait_for(lambda: spool.depth == 0, timeout=20, what="the spool to drain")
    received = [await queue.get(timeout=5) for _ in sent]
    extra = await queue.get(fail=False)
    await connection.close()

    assert [a.status for a in (before, first_blocked, *during)] == [200] * 4
    assert readiness.status == 503
    assert readiness.body["status"] == "degraded"
    assert readiness.body["reasons"]["broker"] == (
        "the broker blocked the connection (memory or disk alarm); events are spooled"
    )
    assert 'relay_spooled_total{reason="timeout"} 1.0' in metrics
    assert 'relay_spooled_total{reason="queued"} 2.0' in metrics
    assert [m.body for m in received] == sent
    assert extra is None
    assert spool.late_confirms == 1
