"""An idempotent consumer of retm-relay's events (aio-pika), small enough to copy.

- Its own durable quorum queue, bound to the relay's topic exchange with the patterns it wants,
  declared with the same arguments as ``retm-relay declare`` gives a consumer queue: a message
  the consumer rejects is dead-lettered through the direct exchange RETM_DEAD_LETTER_EXCHANGE to
  the quorum queue ``<queue>.dead``.
- Manual acknowledgements: a message is acknowledged only after its result is on disk.
- Deduplication by ``message_id`` (the relay's dedup key): the journal of processed events, one
  JSON line per event, is also the record of the ids already seen, so a copy (a replay, a
  second relay without shared dedup, a redelivery after a crash before the ack) is acknowledged
  without being processed twice, across restarts too.
- Poison messages (no message_id, a body that is not a JSON object, an order whose total is not
  a decimal string, a customer without an integer id) are rejected without requeue: they land
  in ``<queue>.dead`` instead of coming back forever.

Settings (environment): RETM_AMQP_URL (amqp://guest:guest@127.0.0.1:5672/), RETM_EXCHANGE
(retm.events), RETM_QUEUE (example.orders), RETM_BINDINGS (comma-separated binding patterns,
order.#), RETM_DEAD_LETTER_EXCHANGE (<RETM_EXCHANGE>.dlx), RETM_JOURNAL (processed.jsonl).

Output on stdout: ``ready QUEUE`` once its queue is bound, then one line per message:
``processed ID KEY``, ``duplicate ID`` or ``dead-lettered ID: REASON``. SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

MONEY = re.compile(r"-?[0-9]+\.[0-9]{3}")


class Poison(Exception):
    """A message this consumer can never process: it is dead-lettered, never requeued."""


class Journal:
    """Processed events, one JSON line each (fsynced), and the set of their message ids."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.seen.add(json.loads(line)["message_id"])
                except (ValueError, KeyError):
                    continue  # a line torn by a crash: its message was never acknowledged
        self.file = path.open("a")

    def record(self, entry: dict[str, Any]) -> None:
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.seen.add(entry["message_id"])


def check(routing_key: str, body: Any) -> str:
    """What the event says, in a few words; raises Poison when it cannot be processed."""
    if not isinstance(body, dict):
        raise Poison("not a JSON object")
    family = routing_key.split(".", 1)[0]
    if family == "order":
        total = body.get("total_price")
        if not isinstance(total, str) or not MONEY.fullmatch(total):
            raise Poison(f"total_price is not a decimal string: {total!r}")
        return f"invoice {body.get('invoice_id')} total {total}"
    if family == "customer":
        customer = body.get("customer")
        if not isinstance(customer, dict) or type(customer.get("id")) is not int:
            raise Poison("customer.id is not an integer")
        return f"customer {customer['id']}"
    return f"{len(body)} fields"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def examine(message: AbstractIncomingMessage) -> str:
    """What the message says, in a few words; raises Poison when it cannot be processed."""
    if not message.message_id:
        raise Poison("no message_id")
    try:
        body = json.loads(message.body)
    except ValueError:
        raise Poison("not JSON") from None
    return check(message.routing_key or "", body)


async def handle(message: AbstractIncomingMessage, journal: Journal) -> None:
    """Process one message at most once; acknowledge it, or reject it to the dead letters."""
    message_id = message.message_id or ""
    if message_id in journal.seen:
        await message.ack()
        say(f"duplicate {message_id}")
        return
    try:
        summary = examine(message)
    except Poison as exc:
        await message.reject(requeue=False)
        say(f"dead-lettered {message_id or '-'}: {exc}")
        return
    journal.record(
        {"message_id": message_id, "routing_key": message.routing_key, "summary": summary}
    )
    await message.ack()
    say(f"processed {message_id} {message.routing_key}")


async def main() -> None:
    env = os.environ
    url = env.get("RETM_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    exchange_name = env.get("RETM_EXCHANGE", "retm.events")
    queue_name = env.get("RETM_QUEUE", "example.orders")
    bindings = [p for p in env.get("RETM_BINDINGS", "order.#").split(",") if p]
    dlx_name = env.get("RETM_DEAD_LETTER_EXCHANGE", f"{exchange_name}.dlx")
    journal = Journal(Path(env.get("RETM_JOURNAL", "processed.jsonl")))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dlx = await channel.declare_exchange(dlx_name, aio_pika.ExchangeType.DIRECT, durable=True)
        dead = await channel.declare_queue(
            f"{queue_name}.dead", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx, queue_name)
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": dlx_name,
                "x-dead-letter-routing-key": queue_name,
            },
        )
        for pattern in bindings:
            await queue.bind(exchange, pattern)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await handle(message, journal)

        say(f"ready {queue_name}")  # declared and bound: from here on nothing is missed
        tag = await queue.consume(on_message)
        await stop.wait()
        await queue.cancel(tag)


if __name__ == "__main__":
    asyncio.run(main())
