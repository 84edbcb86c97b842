"""An example loyalty responder for retm-relay: copy it, and replace the two rule functions.

RETM's Check Reward and Redeem Reward hooks are synchronous: a cashier waits for the answer. The
relay publishes each one as an AMQP request (routing key ``loyalty.check_reward`` or
``loyalty.redeem_reward``, body = RETM's JSON exactly as sent, ``reply_to``, ``correlation_id``,
``expiration`` = the relay's deadline) and answers RETM with the reply. A responder therefore:

1. consumes a queue bound to the relay's exchange with ``loyalty.check_reward.#`` and
   ``loyalty.redeem_reward.#`` (``#`` also matches keys the relay extends with the business and
   branch when ``amqp.routing_key_template`` says so);
2. for each request, computes the HTTP status and JSON body RETM should get (RETM's shapes:
   docs/retm.md, "Check Reward"; fixtures ``loyalty.check_reward.response.200.json`` and
   ``.400.json``);
3. publishes the reply to the default exchange with routing key = the request's ``reply_to``,
   the same ``correlation_id``, the status in the ``x-http-status`` header, then acks.

The queue is shared by every copy of the responder (competing consumers, so one request is
answered once) and ``auto_delete``: when the last responder stops, the queue goes away, and the
relay sees at once that nobody can answer (it answers RETM with its fallback instead of making
the cashier wait for the timeout). Requests are transient and expire with the relay's deadline.

Redeem Reward changes state, so answer a repeated request (same ``message_id``, which the relay
sets to the event's dedup key) with the first answer instead of redeeming twice. This example
keeps answers in memory; a real loyalty system records the message_id with the redemption.

Run it (next to a running relay):

    .venv/bin/python deploy/examples/loyalty_responder.py \\
        --amqp-url amqp://guest:guest@127.0.0.1:5672/ --exchange retm.events
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("loyalty-responder")

Answer = tuple[int, dict[str, Any]]
"""(HTTP status for RETM, JSON body for RETM)."""

Handler = Callable[[dict[str, Any]], Awaitable[Answer]]

# -- your loyalty rules: replace these two functions ------------------------------------------

# Demonstration data: one known coupon code, as in RETM's examples (tests/fixtures).
REWARDS: dict[str, dict[str, Any]] = {
    "NKH-4821": {
        "type": 2,
        "is_percentage": False,
        "customer_number": "0555000123",
        "discount_amount": "12",
        "max_discount_amount": 0,
        "allowed_products": [{"product_id": "01jv5qwxhhay3x48s2re9m7r30", "quantity": 1}],
        "button": {
            "label": {"ar": "عرض نقاطي", "en": "View my points"},
            "url": "https://loyalty.example.com/retm/points",
            "close_modal": True,
        },
    },
}


def invalid(message: str, *errors: str) -> Answer:
    """RETM's "invalid reward" answer: 400 with ``message`` and ``errors`` (docs/retm.md,
    "Check Reward")."""
    return 400, {"data": [], "message": message, "errors": list(errors)}


async def check_reward(request: dict[str, Any]) -> Answer:
    """Check Reward: is ``reward_code`` valid for ``business_refrence``? 200 with ``data``
    (the discount), or 400. Must not change anything: RETM may ask again."""
    code = request.get("reward_code")
    if not isinstance(code, str) or not code:
        return invalid("A reward code is required", "reward_code is missing")
    reward = REWARDS.get(code)
    if reward is None:
        return invalid(f"Reward {code} does not exist", f"unknown reward code {code}")
    return 200, {"data": reward, "errors": []}


async def redeem_reward(request: dict[str, Any]) -> Answer:
    """Redeem Reward: use ``reward_code`` at ``branch_id``. 200, or 400 when it cannot be."""
    code = request.get("reward_code")
    if not isinstance(code, str) or code not in REWARDS:
        return invalid(f"Reward {code} does not exist", f"unknown reward code {code}")
    return 200, {"data": {"reward_code": code, "redeemed": True}, "errors": []}


# -- the RPC plumbing: keep as it is -----------------------------------------------------------


class Responder:
    """Consumes loyalty requests from ``queue`` (bound to ``exchange``) and replies.

    handlers: event (``loyalty.check_reward``, ``loyalty.redeem_reward``) -> rule function.
    prefetch: requests handled at once (each in its own task, so a slow one blocks no other).
    """

    def __init__(
        self,
        url: str,
        exchange: str = "retm.events",
        queue: str = "retm.loyalty",
        handlers: dict[str, Handler] | None = None,
        prefetch: int = 32,
    ) -> None:
        self.url = url
        self.exchange_name = exchange
        self.queue_name = queue
        self.handlers = handlers or {
            "loyalty.check_reward": check_reward,
            "loyalty.redeem_reward": redeem_reward,
        }
        self.prefetch = prefetch
        self.answered: dict[str, tuple[int, bytes]] = {}  # redeem message_id -> first answer
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def start(self) -> None:
        """Connect, declare the queue and its bindings, and start consuming."""
        self.connection = await aio_pika.connect_robust(self.url)
        self.channel = await self.connection.channel()
        await self.channel.set_qos(prefetch_count=self.prefetch)
        exchange = await self.channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self.channel.declare_queue(self.queue_name, auto_delete=True)
        for event in self.handlers:
            await queue.bind(exchange, f"{event}.#")
        await queue.consume(self.on_request)
        log.info("responder.ready queue=%s exchange=%s", self.queue_name, self.exchange_name)

    async def close(self) -> None:
        """Stop consuming and disconnect (the auto_delete queue goes with the last one)."""
        if self.connection is not None:
            await self.connection.close()

    async def on_request(self, message: AbstractIncomingMessage) -> None:
        """Answer one request; ack it once the reply is published."""
        assert self.channel is not None
        event = message.type or ""
        handler = self.handlers.get(event)
        if not message.reply_to or handler is None:
            log.warning("responder.unusable event=%r reply_to=%r", event, message.reply_to)
            await message.reject()
            return
        repeat = (
            self.answered.get(message.message_id or "") if event.endswith("redeem_reward") else None
        )
        if repeat is not None:
            status, body = repeat
        else:
            try:
                request = json.loads(message.body)
                status, payload = await handler(request if isinstance(request, dict) else {})
            except Exception:  # any failure still owes the cashier an answer
                log.exception("responder.failed event=%s", event)
                status, payload = invalid("The reward cannot be checked", "loyalty system error")
            body = json.dumps(payload, ensure_ascii=False).encode()
            if event.endswith("redeem_reward") and message.message_id:
                self.answered[message.message_id] = (status, body)
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                correlation_id=message.correlation_id,
                headers={"x-http-status": status},
            ),
            routing_key=message.reply_to,
        )
        await message.ack()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", default="retm.events", help="the relay's amqp.exchange")
    parser.add_argument("--queue", default="retm.loyalty")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    responder = Responder(args.amqp_url, args.exchange, args.queue)
    await responder.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await responder.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
