"""The archive's disk cost per event: a relay (in this process, archive on, names of its own)
takes N copies of RETM's ``order.created`` example (each with its own reference), then the size
of the stream's directory on the local broker's disk is divided by N.

    .venv/bin/python -m bench.archive_disk [--events 20000] [--amqp-url URL]
        [--stream-dir /var/lib/rabbitmq/mnesia/rabbit@localhost/stream]

Needs to read RabbitMQ's data directory (run it as root or as the rabbitmq user, on the
broker's machine). Everything it creates is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
from pathlib import Path

import aio_pika
import aiohttp
import orjson

from relay.logs import configure_logging
from relay.service import Relay
from relay.settings import load_settings

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "order.created.json"
TOKEN = secrets.token_urlsafe(24)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def entries(path: Path) -> list[Path]:
    return list(path.iterdir())


async def main(events: int, amqp_url: str, stream_dir: Path) -> None:
    name = f"bench.{secrets.token_hex(4)}"
    template = orjson.loads(FIXTURE.read_bytes())
    bodies = [orjson.dumps({**template, "reference": f"disk-{i:08d}"}) for i in range(events)]
    configure_logging("error", "console")
    before = {p.name for p in await asyncio.to_thread(entries, stream_dir)}
    connection = await aio_pika.connect(amqp_url)
    with tempfile.TemporaryDirectory() as state:
        settings = load_settings(
            None,
            {
                "RELAY_HTTP_PORT": "0",
                "RELAY_AUTH_TOKENS": TOKEN,
                "RELAY_AMQP_URL": amqp_url,
                "RELAY_AMQP_EXCHANGE": f"{name}.events",
                "RELAY_AMQP_UNROUTED_EXCHANGE": f"{name}.unrouted",
                "RELAY_AMQP_REJECTED_EXCHANGE": f"{name}.rejected",
                "RELAY_ARCHIVE_QUEUE": f"{name}.archive",
                "RELAY_STATE_DIR": state,
                "RELAY_LOYALTY_ENABLED": "false",
                "RELAY_LOG_LEVEL": "error",
            },
        )
        relay = Relay(settings)
        await relay.start()
        try:
            await relay.wait_durable()
            channel = await connection.channel()
            events_x = await channel.get_exchange(f"{name}.events")
            sink = await channel.declare_queue(f"{name}.sink", durable=True)
            await sink.bind(events_x, "#")  # routed, as in production
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            async with aiohttp.ClientSession() as session:
                todo = iter(bodies)

                async def worker() -> None:
                    for body in todo:
                        async with session.post(
                            relay.url + "/retm/events", data=body, headers=headers
                        ) as response:
                            await response.read()
                            assert response.status == 200, response.status

                await asyncio.gather(*(worker() for _ in range(16)))
            listing = await asyncio.to_thread(entries, stream_dir)
            # the stream's directory: __<vhost-less name, dots as underscores>_<timestamp>
            mark = f"__{name}.archive_".replace(".", "_")
            new = [p for p in listing if p.name not in before and p.name.startswith(mark)]
            assert len(new) == 1, f"cannot find the stream's directory in {stream_dir}: {new}"
            size = await asyncio.to_thread(directory_bytes, new[0])
        finally:
            await relay.stop()
            channel = await connection.channel()
            for queue in (
                f"{name}.sink",
                f"{name}.unrouted",
                f"{name}.rejected",
                f"{name}.archive",
            ):
                await channel.queue_delete(queue)
            for exchange in (
                f"{name}.events",
                f"{name}.unrouted",
                f"{name}.rejected",
                f"{name}.archive",
            ):
                await channel.exchange_delete(exchange)
            await connection.close()
    body = sum(map(len, bodies)) / events
    print(
        f"archive on disk: {events} events of {body:.0f} bytes (RETM's order.created example): "
        f"{size / 1e6:.1f} MB, {size / events:.0f} bytes per event "
        f"({size / events - body:.0f} bytes over the body)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.archive_disk", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument(
        "--stream-dir",
        type=Path,
        default=Path("/var/lib/rabbitmq/mnesia/rabbit@localhost/stream"),
    )
    args = parser.parse_args()
    asyncio.run(main(args.events, args.amqp_url, args.stream_dir))
