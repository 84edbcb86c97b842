"""Open-loop client for `make bench`: a fixed request rate, timed without coordinated omission.

wrk2 is not packaged by Debian, so this plays its part: request i is due at
``start + i / RATE`` whatever happened to the earlier ones (new connections are opened when all
are busy, up to --max-connections), and its latency runs from that due time to the end of the
answer. A server that stalls is charged for every request that should have been sent meanwhile.
A second of warm-up at the same rate comes first and is not counted.

Bodies are RETM-shaped (tests/fixtures/order.created.json) with a unique reference each. Prints
one JSON object: statuses, errors, latency percentiles in milliseconds (p50, p99, p99.9, max)
and the client's own lag behind schedule (when that is large, the client was the bottleneck);
with --raw also every latency, so that the runner can pool rounds.

    python bench/openloop.py URL --token TOKEN --rate 500 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "order.created.json"
REFERENCE = b'"reference": "'


def body_parts(fixture: bytes) -> tuple[bytes, bytes]:
    """The fixture split around its ``reference`` value: (up to the opening quote, from the
    closing quote); a body is ``prefix + reference + suffix``."""
    start = fixture.index(REFERENCE) + len(REFERENCE)
    end = fixture.index(b'"', start)
    return fixture[:start], fixture[end:]


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of an ascending list: the smallest value with at least
    ``q`` of the samples at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(latencies: list[float]) -> dict[str, float | int]:
    """count, p50/p99/p99.9/max (milliseconds) of latencies in seconds."""
    ordered = sorted(latencies)
    if not ordered:
        return {"count": 0}
    ms = {
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "p999_ms": percentile(ordered, 0.999),
        "max_ms": ordered[-1],
    }
    return {"count": len(ordered), **{k: round(v * 1000, 3) for k, v in ms.items()}}


async def at_rate(
    rate: float, total: int, start: float, job: Callable[[int, float], Awaitable[None]]
) -> None:
    """Start ``job(i, due)`` for each i below ``total`` at its due time ``start + i / rate``
    (``time.perf_counter`` seconds), whether or not the earlier ones have finished; then wait
    for all of them."""
    tasks = []
    for i in range(total):
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(job(i, intended)))
    await asyncio.gather(*tasks)


async def run(args: argparse.Namespace, fixture: bytes) -> dict[str, object]:
    prefix, suffix = body_parts(fixture)
    run_id = args.run_id or uuid.uuid4().hex[:8]
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    connector = aiohttp.TCPConnector(limit=args.max_connections)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    statuses: Counter[tuple[str, str]] = Counter()  # (phase, status) -> answers
    errors: Counter[tuple[str, str]] = Counter()  # (phase, exception) -> requests

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def phase(name: str, seconds: float) -> tuple[list[float], list[float]]:
            total = int(args.rate * seconds)
            latencies = [0.0] * total
            lags = [0.0] * total
            start = time.perf_counter() + 0.02

            async def one(i: int, intended: float) -> None:
                reference = f"{run_id}-{name}-4000-8000-{i:012x}".encode()
                lags[i] = time.perf_counter() - intended
                try:
                    async with session.post(
                        args.url, data=prefix + reference + suffix, headers=headers
                    ) as response:
                        await response.read()
                        statuses[name, str(response.status)] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[name, type(exc).__name__] += 1
                latencies[i] = time.perf_counter() - intended

            await at_rate(args.rate, total, start, one)
            return latencies, lags

        await phase("w", args.warmup)
        latencies, lags = await phase("m", args.seconds)
    lag = summarize(lags)
    raw = {"latencies_ms": [round(x * 1000, 3) for x in latencies]} if args.raw else {}
    measured = {status: n for (phase, status), n in statuses.items() if phase == "m"}
    failed = {exc: n for (phase, exc), n in errors.items() if phase == "m"}
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        **summarize(latencies),
        "statuses": measured,
        "errors": failed,
        "non2xx": sum(n for s, n in measured.items() if not s.startswith("2"))
        + sum(failed.values()),
        "warmup_ok": sum(n for (p, s), n in statuses.items() if p == "w" and s.startswith("2")),
        "client_lag_p99_ms": lag.get("p99_ms"),
        "client_lag_max_ms": lag.get("max_ms"),
        **raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--token", default="")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=15)
    parser.add_argument("--run-id", default="")
    parser.add_argument("--fixture", default=str(FIXTURE))
    parser.add_argument("--raw", action="store_true", help="also print every latency (ms)")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args, Path(args.fixture).read_bytes()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
