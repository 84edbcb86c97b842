"""The consumer examples (deploy/examples/consumers/python and node) run as real processes against
real relays and a real RabbitMQ: each processes every event once, acknowledges a copy with the
same message_id without processing it again (also after a restart), and dead-letters a poison
message into its own dead-letter queue."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import orjson
import pytest

from relay.http.auth import token_digest
from tests.cli import cli_environ, run_cli
from tests.conftest import (
    AMQP_URL,
    ROOT,
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    fixture_bytes,
)

EXAMPLES = ROOT / "deploy" / "examples" / "consumers"
PRINCIPAL = f"token-{token_digest(TOKEN).hex()[:8]}"
ORDER = fixture_bytes("order.created.json")
REFUND = fixture_bytes("order.refunded.json")
POISON = b'{"event":"order.created","reference":"poison-1","total_price":75}'
ORDER_ID = f"{PRINCIPAL}:order.created:e10270cd-1273-419e-8545-89ce060e6539"
REFUND_ID = f"{PRINCIPAL}:order.refunded:4bdaf820-a800-4e19-9fec-721d5cdbb2b9"
POISON_ID = f"{PRINCIPAL}:order.created:poison-1"


def command(language: str) -> list[str]:
    """How to start the example; fails loudly when its runtime or packages are missing."""
    if language == "python":
        return [sys.executable, str(EXAMPLES / "python" / "consumer.py")]
    node = shutil.which("node")
    if node is None or not (EXAMPLES / "node" / "node_modules" / "amqplib").is_dir():
        pytest.fail("node or amqplib is missing: `make node` (part of `make test`) installs it")
    return [node, str(EXAMPLES / "node" / "consumer.js")]


class Consumer:
    """One run of an example consumer, its stdout lines collected."""

    def __init__(self, language: str, environ: dict[str, str]) -> None:
        self.language = language
        self.environ = environ
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Consumer:
        self.process = await asyncio.create_subprocess_exec(
            *command(self.language),
            env=self.environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_line(f"ready {self.environ['RETM_QUEUE']}")
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._new_line.set()

    async def wait_line(self, line: str, timeout: float = 20) -> None:
        """Wait until the consumer printed ``line``; fail if it exits first."""
        async with asyncio.timeout(timeout):
            while line not in self.lines:
                if self._reader is not None and self._reader.done():
                    pytest.fail(f"the {self.language} consumer exited: {self.lines}")
                self._new_line.clear()
                await self._new_line.wait()

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await self.process.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


StartConsumer = Callable[[str], Awaitable[Consumer]]


@pytest.fixture
async def start_consumer(
    names: Names, broker: Broker, tmp_path: Path
) -> AsyncIterator[StartConsumer]:
    """Start an example consumer on this test's exchange, with its own queue, dead-letter
    exchange and journal; everything is removed afterwards."""
    started: list[Consumer] = []
    queue, dlx = names("orders"), names("dlx")
    broker.forget_later(exchanges=(dlx,), queues=(queue, f"{queue}.dead"))

    async def start(language: str) -> Consumer:
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RETM_AMQP_URL": AMQP_URL,
            "RETM_EXCHANGE": names.exchange,
            "RETM_QUEUE": queue,
            "RETM_BINDINGS": "order.#",
            "RETM_DEAD_LETTER_EXCHANGE": dlx,
            "RETM_JOURNAL": str(tmp_path / "processed.jsonl"),
        }
        consumer = await Consumer(language, environ).start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        await consumer.kill()


def journal(tmp_path: Path) -> list[tuple[str, str]]:
    """(message_id, routing key) of every event the consumer processed, in order."""
    lines = (tmp_path / "processed.jsonl").read_text().splitlines()
    return [(e["message_id"], e["routing_key"]) for e in map(json.loads, lines)]


async def dead_letters(name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything waiting on the dead-letter queue ``name`` (taken and acknowledged)."""
    connection = await aio_pika.connect(AMQP_URL)
    found = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(name, ensure=True)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            found.append(message)
    return found


async def ready_count(name: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(name, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def post(relay: RunningRelay, body: bytes, status: str) -> None:
    answer = await relay.event(body)
    assert (answer.status, answer.body["status"]) == (200, status), answer


@pytest.mark.parametrize("language", ["python", "node"])
async def test_consumer_example_processes_once_and_dead_letters_poison(
    language: str,
    start_relay: StartRelay,
    start_consumer: StartConsumer,
    broker: Broker,
    names: Names,
    tmp_path: Path,
) -> None:
    """Two relays without shared dedup both publish the same order (one message_id, two
    messages): the consumer processes it once and acknowledges the copy. A poison order (a
    number for its total) is dead-lettered byte for byte; a customer event it is not bound for
    never reaches it. After a restart it still knows the ids it processed: a replayed copy is
    acknowledged, not processed."""
    first, second = await start_relay(), await start_relay()
    consumer = await start_consumer(language)

    await post(first, ORDER, "accepted")
    await post(second, ORDER, "accepted")  # its own dedup cache: a second message, same id
    await post(first, POISON, "accepted")
    await post(first, fixture_bytes("customer.created.json"), "accepted")
    await post(first, REFUND, "accepted")
    await consumer.wait_line(f"processed {REFUND_ID} order.refunded")

    assert consumer.lines == [
        f"ready {names('orders')}",
        f"processed {ORDER_ID} order.created",
        f"duplicate {ORDER_ID}",
        f"dead-lettered {POISON_ID}: total_price is not a decimal string: 75",
        f"processed {REFUND_ID} order.refunded",
    ]
    assert journal(tmp_path) == [(ORDER_ID, "order.created"), (REFUND_ID, "order.refunded")]
    # `retm-relay tail --queue` shows the dead letter and leaves it on the quorum queue.
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    shown = await run_cli(
        "tail", "--queue", names("orders") + ".dead", "--json", env=cli_environ(empty)
    )
    assert shown.code == 0, shown
    (line,) = shown.stdout.splitlines()
    assert (json.loads(line)["body"], json.loads(line)["properties"]["message_id"]) == (
        json.loads(POISON),
        POISON_ID,
    )
    (dead,) = await dead_letters(names("orders") + ".dead")
    assert dead.body == POISON
    assert dead.message_id == POISON_ID
    assert dead.routing_key == names("orders")
    assert (await consumer.stop(), await ready_count(names("orders"))) == (0, 0)

    # A replay of the order (same message_id) while the consumer is down, then a new order.
    assert broker.channel is not None
    exchange = await broker.channel.get_exchange(names.exchange)
    await exchange.publish(
        aio_pika.Message(ORDER, message_id=ORDER_ID, content_type="application/json"),
        routing_key="order.created",
    )
    new_order = orjson.loads(ORDER) | {"reference": "after-restart"}
    new_id = f"{PRINCIPAL}:order.created:after-restart"
    restarted = await start_consumer(language)
    await post(first, orjson.dumps(new_order), "accepted")
    await restarted.wait_line(f"processed {new_id} order.created")

    assert restarted.lines[1:] == [f"duplicate {ORDER_ID}", f"processed {new_id} order.created"]
    assert journal(tmp_path)[2:] == [(new_id, "order.created")]
    assert await restarted.stop() == 0
