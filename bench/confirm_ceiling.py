"""Confirm ceiling for `make bench`: the broker's publisher-confirm rate, with no HTTP at all.

Publishes the same RETM-shaped bodies as the HTTP benchmarks (unique reference each) as
persistent, mandatory messages to EXCHANGE (which the runner binds a queue to), on one
aio-pika channel with publisher confirms, through aiormq's ``basic_publish`` with properties built
once (the cheapest path aio-pika offers). Two phases:

- open loop: RATE publishes per second for OPEN_SECONDS, after WARMUP seconds at that rate,
  each timed from its scheduled start to its confirm: p50/p99/p99.9/max;
- closed loop: IN_FLIGHT publishes outstanding at all times (as many as the HTTP benchmark's
  connections), for SECONDS after WARMUP seconds of the same: confirms per second, CPU seconds
  per 1,000.

Prints one JSON object on stdout. No relay can confirm faster than this through one channel.

    python bench/confirm_ceiling.py --exchange NAME [--seconds 12] [--in-flight 32] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid
from pathlib import Path

import aio_pika
import uvloop
from pamqp import commands as spec

from bench.openloop import at_rate, body_parts, summarize

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "order.created.json"


async def run(args: argparse.Namespace) -> dict[str, object]:
    prefix, suffix = body_parts(FIXTURE.read_bytes())
    run_id = uuid.uuid4().hex[:8]
    counter = 0

    def body() -> bytes:
        nonlocal counter
        counter += 1
        return prefix + f"{run_id}-0000-4000-8000-{counter:012x}".encode() + suffix

    connection = await aio_pika.connect(args.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    underlay = await channel.get_underlay_channel()
    properties = spec.Basic.Properties(content_type="application/json", delivery_mode=2)

    async def publish() -> None:
        await underlay.basic_publish(
            body(),
            exchange=args.exchange,
            routing_key="order.created",
            properties=properties,
            mandatory=True,
        )

    async def closed_loop(seconds: float) -> tuple[int, float]:
        deadline = time.perf_counter() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await publish()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.in_flight)))
        return done, time.perf_counter() - started

    async def open_loop(seconds: float) -> list[float]:
        total = int(args.rate * seconds)
        latencies: list[float] = [0.0] * total
        start = time.perf_counter() + 0.05

        async def timed(i: int, intended: float) -> None:
            await publish()
            latencies[i] = time.perf_counter() - intended

        await at_rate(args.rate, total, start, timed)
        return latencies

    # As the HTTP targets: the open loop first, warmed up at its own rate; then the closed loop.
    await open_loop(args.warmup)
    latencies = await open_loop(args.open_seconds)
    total = len(latencies)

    await closed_loop(args.warmup)
    cpu0 = time.process_time()
    confirms, elapsed = await closed_loop(args.seconds)
    cpu = time.process_time() - cpu0

    await connection.close()
    return {
        "closed": {
            "requests": confirms,
            "seconds": round(elapsed, 3),
            "rate": round(confirms / elapsed, 1),
            "in_flight": args.in_flight,
            "cpu_seconds": round(cpu, 3),
        },
        "open": {"rate": args.rate, **summarize(latencies), "statuses": {"confirmed": total}},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "published": counter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--open-seconds", type=float, default=10)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
