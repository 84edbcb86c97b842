"""The relay a competent user would write instead of retm-relay: the benchmark's yardstick.

aiohttp + aio-pika, one robust connection, one channel with publisher confirms, and the 200 only
after the broker confirmed the persistent message. No auth, dedup, metrics, logs or spool.
Kept as written by such a user: do not tune it, and do not give it retm-relay's optimisations.

    AMQP_URL=amqp://guest:guest@127.0.0.1/ EXCHANGE=retm.events PORT=8080 python naive_relay.py
"""

import json
import os

import aio_pika
from aiohttp import web

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1/")
EXCHANGE = os.environ.get("EXCHANGE", "retm.events")
exchange_key = web.AppKey("exchange", aio_pika.abc.AbstractExchange)


async def amqp(app: web.Application):
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    app[exchange_key] = await channel.declare_exchange(
        EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    yield
    await connection.close()


async def events(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        event = json.loads(body)["event"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "bad request"}, status=400)
    message = aio_pika.Message(
        body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    try:
        await request.app[exchange_key].publish(message, routing_key=event)
    except Exception:
        return web.json_response({"error": "unavailable"}, status=503)
    return web.json_response({"status": "accepted"})


app = web.Application()
app.cleanup_ctx.append(amqp)
app.router.add_post("/retm/events", events)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
