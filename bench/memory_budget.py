"""The memory-budget run of ``make bench`` (``python -m bench.run --memory-budget`` alone).

A relay process as production starts it (the example configuration, so the default
``http.max_inflight_bytes``) receives 300 concurrent webhooks of 1 MB each (a body of 1,000,000
bytes: an order with about 9,000 small line items, so parsing it costs what a real one does).
While they arrive, one small webhook is sent; afterwards every event answered 200 is looked for
on a queue bound to the relay's exchange (by message_id).

Targets (issue 10): the relay's peak RSS (VmHWM, /proc) stays under 400 MB; the small webhook is
answered 200 within 1 s; every 200 is on the queue. Webhooks refused by the budget get 503 with
Retry-After, as RETM would see them, and are not retried here. Prints the figures and PASS/FAIL
per target; exit status 1 when one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from bench.harness import NotifySocket, Server, Topology, child_environ, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config" / "relay.example.toml"
BIG_WEBHOOKS = 300
BIG_BYTES = 1_000_000
MAX_RSS_MB = 400.0
SMALL_WITHIN = 1.0  # seconds
#: the small webhook goes out once this many of the big ones have been answered or are in flight
SMALL_AFTER = 50


def big_body(n: int) -> bytes:
    """An ``order.created`` of exactly BIG_BYTES bytes with many small line items."""
    item = {"sku": "SKU-000000", "name": "Flat white, oat", "qty": 1, "price": 4.5}
    head = {"event": "order.created", "reference": f"memory-{n}", "items": []}
    prefix = orjson.dumps(head)[:-2]  # ... "items":[
    one = orjson.dumps(item)
    count = (BIG_BYTES - len(prefix) - 2) // (len(one) + 1)
    body = prefix + b",".join([one] * count) + b"]}"
    pad = BIG_BYTES - len(body)
    return body[:-1] + b',"note":"' + b"x" * (pad - 10) + b'"}' if pad >= 10 else body


@dataclass
class Outcome:
    """What the senders saw."""

    statuses: dict[int, int] = field(default_factory=dict)
    accepted_ids: set[str] = field(default_factory=set)
    errors: int = 0
    small_status: int | None = None
    small_seconds: float | None = None
    small_id: str | None = None


async def post(
    session: aiohttp.ClientSession, url: str, token: str, body: bytes
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw) if raw else {}


def post_blocking(port: int, token: str, body: bytes) -> tuple[int, dict[str, Any], float]:
    """One webhook from a thread of its own (http.client), so that its time is the relay's
    and not that of this process's busy event loop: (status, answer, seconds)."""
    begun = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            "/retm/events",
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    return response.status, orjson.loads(raw) if raw else {}, time.perf_counter() - begun


async def send_all(port: int, token: str, outcome: Outcome) -> None:
    """300 concurrent big webhooks (bodies made beforehand), and one small one once
    SMALL_AFTER of them are out."""
    url = f"http://127.0.0.1:{port}/retm/events"
    bodies = [big_body(n) for n in range(BIG_WEBHOOKS)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    started = asyncio.Event()
    out = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def big(body: bytes) -> None:
            nonlocal out
            out += 1
            if out >= SMALL_AFTER:
                started.set()
            try:
                status, answer = await post(session, url, token, body)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                outcome.errors += 1
                return
            outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
            if status == 200:
                outcome.accepted_ids.add(answer["id"])

        async def small() -> None:
            await started.wait()
            await asyncio.sleep(0.2)  # the flood is under way
            body = b'{"event":"order.created","reference":"memory-small-%s"}' % (
                uuid.uuid4().hex.encode()
            )
            status, answer, seconds = await asyncio.to_thread(post_blocking, port, token, body)
            outcome.small_seconds = seconds
            outcome.small_status = status
            outcome.small_id = answer.get("id")

        await asyncio.gather(small(), *(big(body) for body in bodies))


async def drained(port: int, timeout: float = 120) -> bool:
    """Wait until the relay's spool is empty (/health): every 200 has then been published."""
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
                    async with session.get(f"http://127.0.0.1:{port}/health") as r:
                        if orjson.loads(await r.read())["spool"]["events"] == 0:
                            return True
                await asyncio.sleep(0.2)


async def message_ids(amqp_url: str, queue: str) -> set[str]:
    """The message_ids of everything on ``queue`` (consumed)."""
    found: set[str] = set()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            found.add(message.message_id or "")
    return found


def rss_peak_mb(pid: int) -> float:
    """The process's peak RSS (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(amqp_url: str) -> dict[str, Any]:
    """One memory-budget run; returns the figures and the checks."""
    run_id = uuid.uuid4().hex[:8]  # (names on the shared broker)
    prefix = f"bench.{run_id}.memory"
    exchange, queue, unrouted = f"{prefix}.events", f"{prefix}.q", f"{prefix}.unrouted"
    workdir = Path(tempfile.mkdtemp(prefix="retm-bench-memory-"))
    token = secrets.token_urlsafe(24)
    port = free_port()
    notify = NotifySocket(workdir)
    env = child_environ(
        NOTIFY_SOCKET=str(notify.path),
        RELAY_HTTP_PORT=str(port),
        RELAY_AUTH_TOKENS=token,
        RELAY_AMQP_URL=amqp_url,
        RELAY_AMQP_EXCHANGE=exchange,
        RELAY_AMQP_UNROUTED_EXCHANGE=unrouted,
        RELAY_AMQP_REJECTED_EXCHANGE=f"{prefix}.rejected",
        RELAY_ARCHIVE_QUEUE=f"{prefix}.archive",
        RELAY_STATE_DIR=str(workdir / "state"),
        RELAY_LOG_LEVEL="warning",
    )
    argv = [sys.executable, "-m", "relay", "serve", "--config", str(EXAMPLE_CONFIG)]
    server = Server("memory", argv, env, workdir)
    topology = Topology(amqp_url, {})
    await topology.open()
    outcome = Outcome()
    result: dict[str, Any] = {}
    try:
        own = [unrouted, f"{prefix}.rejected", f"{prefix}.archive"]
        topology.track(own, own)
        await topology.bind(exchange, queue)
        await server.start(notify.wait_ready)
        result["rss_start_mb"] = round(rss_peak_mb(server.pid), 1)
        begun = time.perf_counter()
        await send_all(port, token, outcome)
        result["seconds"] = round(time.perf_counter() - begun, 2)
        result["rss_peak_mb"] = round(rss_peak_mb(server.pid), 1)
        with contextlib.suppress(TimeoutError):
            await drained(port)
        await server.stop()
        on_queue = await message_ids(amqp_url, queue)
    finally:
        await server.stop()
        notify.close()
        own = [unrouted, f"{prefix}.rejected", f"{prefix}.archive"]
        await topology.delete([exchange, *own], [queue, *own])
        await topology.close()
        shutil.rmtree(workdir, ignore_errors=True)
    wanted = set(outcome.accepted_ids)
    if outcome.small_status == 200 and outcome.small_id:
        wanted.add(outcome.small_id)
    missing = wanted - on_queue
    result.update(
        {
            "big_webhooks": BIG_WEBHOOKS,
            "big_bytes": BIG_BYTES,
            "statuses": {str(k): v for k, v in sorted(outcome.statuses.items())},
            "connection_errors": outcome.errors,
            "small_status": outcome.small_status,
            "small_ms": None
            if outcome.small_seconds is None
            else round(outcome.small_seconds * 1000, 1),
            "accepted": len(wanted),
            "on_queue": len(wanted & on_queue),
            "missing": len(missing),
        }
    )
    small_ok = outcome.small_status == 200 and (outcome.small_seconds or 99) <= SMALL_WITHIN
    result["checks"] = [
        ("peak RSS of the relay", f"< {MAX_RSS_MB:.0f} MB", f"{result['rss_peak_mb']} MB",
         result["rss_peak_mb"] < MAX_RSS_MB),
        ("small webhook during the flood", f"200 within {SMALL_WITHIN:g} s",
         f"{outcome.small_status} in {result['small_ms']} ms", small_ok),
        ("every 200 on the queue", "0 missing", f"{len(missing)} missing of {len(wanted)}",
         not missing and bool(wanted)),
    ]  # fmt: skip
    return result


def render(result: dict[str, Any]) -> str:
    """The run's figures and its PASS/FAIL lines."""
    lines = [
        (
            f"memory budget: {result['big_webhooks']} concurrent webhooks of "
            f"{result['big_bytes']:,} bytes in {result['seconds']} s; answers "
            f"{result['statuses']}, {result['connection_errors']} connection errors; relay RSS "
            f"{result['rss_start_mb']} MB at the start, peak {result['rss_peak_mb']} MB; "
            f"{result['on_queue']} of {result['accepted']} accepted events on the queue"
        )
    ]
    for name, target, value, ok in result["checks"]:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name:<32} {target:<18} {value}")
    return "\n".join(lines)


def main(amqp_url: str) -> int:
    """Run, print, and return the exit status (1 when a target failed)."""
    result = asyncio.run(run(amqp_url))
    print(render(result))
    return 0 if all(ok for *_, ok in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/"))
