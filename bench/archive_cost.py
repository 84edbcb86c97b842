"""What the archive costs the relay, side by side on a busy machine: two relays run at once
(the example configuration, memory store), one with the archive on and one with it off, each
with its own exchange, bound queue and state; wrk drives one at a time (closed loop, 32
connections) in alternating order for several rounds, and the relay's CPU time is sampled.
Alternating short rounds keep other work on the machine from landing on one side only; the
median of the per-round ratios is the figure.

    .venv/bin/python -m bench.archive_cost [--rounds 6] [--seconds 6]

Everything it creates on the broker is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import NotifySocket, ProcessTree, Server, Topology, free_port
from bench.run import EVENTS_PATH, Context, Options, relay_argv, relay_env, wrk

SIDES = {"on": {"RELAY_ARCHIVE_ENABLED": "true"}, "off": {"RELAY_ARCHIVE_ENABLED": "false"}}


async def measure(opts: Options, rounds: int, seconds: int) -> dict[str, Any]:
    """Alternating rounds of the two relays; the medians of the per-round ratios (archive on /
    off) of throughput and of the relay's CPU seconds per 1,000 requests."""
    workdir = Path(tempfile.mkdtemp(prefix="retm-archive-cost-"))
    topology = Topology(opts.amqp_url, {"x-queue-type": "classic"})
    await topology.open()
    ctx = Context(opts, uuid.uuid4().hex[:8], workdir, topology)
    servers: dict[str, tuple[Server, str, NotifySocket]] = {}
    rows: list[dict[str, Any]] = []
    try:
        for side, extra in SIDES.items():
            n = ctx.names(side)  # the names relay_env gives the relay
            topology.track(
                [n["exchange"], n["unrouted"], n["rejected"], n["archive"]],
                [n["queue"], n["unrouted"], n["rejected"], n["archive"]],
            )
            await topology.bind(n["exchange"], n["queue"])
            port = free_port()
            notify = NotifySocket(workdir)
            env = relay_env(ctx, side, port, notify, **extra)
            server = Server(side, relay_argv(), env, workdir)
            await server.start(notify.wait_ready)
            servers[side] = (server, f"http://127.0.0.1:{port}{EVENTS_PATH}", notify)
        for _, url, _ in servers.values():  # warm up both
            await wrk(opts, url, 2, ctx.token)
        for i in range(rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            row: dict[str, Any] = {}
            for side in order:
                server, url, _ = servers[side]
                tree = ProcessTree(server.pid)
                cpu = tree.cpu_seconds()
                result = await wrk(opts, url, seconds, ctx.token)
                cpu = tree.cpu_seconds() - cpu
                row[side] = (result["rate"], cpu / max(1, result["requests"]) * 1000)
            rows.append(row)
            print(
                f"round {i + 1}: archive on {row['on'][0]:,.0f} req/s "
                f"({row['on'][1]:.3f} CPU s/1k), off {row['off'][0]:,.0f} req/s "
                f"({row['off'][1]:.3f} CPU s/1k): on/off {row['on'][0] / row['off'][0]:.2f}x",
                flush=True,
            )
    finally:
        for server, _, notify in servers.values():
            await server.stop()
            notify.close()
        await topology.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "rounds": rows,
        "throughput_ratio": round(statistics.median(r["on"][0] / r["off"][0] for r in rows), 3),
        "cpu_ratio": round(statistics.median(r["on"][1] / r["off"][1] for r in rows), 3),
    }


async def main(rounds: int, seconds: int) -> None:
    result = await measure(Options(duration=seconds), rounds, seconds)
    throughput, cpu = result["throughput_ratio"], result["cpu_ratio"]
    load = (await asyncio.to_thread(Path("/proc/loadavg").read_text)).split()[:3]
    print(
        f"archive on / off, median of {rounds} rounds of {seconds} s: "
        f"throughput {throughput:.2f}x, relay CPU per request {cpu:.2f}x "
        f"(load average {' '.join(load)}, "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.archive_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.seconds))
