"""Install-callback latency: p50/p99/max of RETM's install POST, which must answer within 1 s.

Starts one relay in this process (as ``retm-relay serve`` does, port 0, a throw-away state
directory and exchange on the local RabbitMQ), posts the install fixture ``--count`` times with
``--concurrency`` requests in flight, prints the latency percentiles, and cleans up.

    .venv/bin/python bench/install_latency.py --count 2000 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import aio_pika
import aiohttp

from relay.logs import configure_logging
from relay.service import Relay
from relay.settings import load_settings

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


async def main(count: int, concurrency: int, amqp_url: str) -> None:
    name = f"bench.{secrets.token_hex(4)}"
    path = f"/retm/install/{secrets.token_urlsafe(24)}"
    body = (FIXTURE / "install.success_callback.json").read_bytes()
    configure_logging("error", "console")
    with tempfile.TemporaryDirectory() as state:
        settings = load_settings(
            None,
            {
                "RELAY_HTTP_PORT": "0",
                "RELAY_AMQP_URL": amqp_url,
                "RELAY_AMQP_EXCHANGE": f"{name}.events",
                "RELAY_AMQP_UNROUTED_EXCHANGE": f"{name}.unrouted",
                "RELAY_AMQP_REJECTED_EXCHANGE": f"{name}.rejected",
                "RELAY_ARCHIVE_QUEUE": f"{name}.archive",
                "RELAY_STATE_DIR": state,
                "RELAY_INSTALL_ENABLED": "true",
                "RELAY_INSTALL_PATH": path,
                "RELAY_INSTALL_REQUIRE_DATA": "state=b7f1c2",
                "RELAY_LOYALTY_ENABLED": "false",
                "RELAY_LOG_LEVEL": "error",
            },
        )
        relay = Relay(settings)
        await relay.start()
        await relay.wait_durable()
        latencies: list[float] = []
        todo = iter(range(count))
        try:
            async with aiohttp.ClientSession() as session:

                async def worker() -> None:
                    for _ in todo:
                        started = time.perf_counter()
                        async with session.post(
                            relay.url + path,
                            data=body,
                            headers={"Content-Type": "application/json"},
                        ) as response:
                            await response.read()
                            assert response.status == 200, response.status
                        latencies.append(time.perf_counter() - started)

                wall = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                wall = time.perf_counter() - wall
        finally:
            await relay.stop()
            connection = await aio_pika.connect(amqp_url)
            channel = await connection.channel()
            for queue in (f"{name}.unrouted", f"{name}.rejected", f"{name}.archive"):
                await channel.queue_delete(queue)
            for exchange in (
                f"{name}.events",
                f"{name}.unrouted",
                f"{name}.rejected",
                f"{name}.archive",
            ):
                await channel.exchange_delete(exchange)
            await connection.close()
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"install callbacks: {count}, concurrency {concurrency}, {count / wall:.0f}/s; "
        f"latency ms: p50 {cuts[49] * 1000:.2f}, p99 {cuts[98] * 1000:.2f}, "
        f"max {max(latencies) * 1000:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.concurrency, args.amqp_url))
