"""`make bench`: retm-relay against its yardsticks, side by side, on this machine.

1. Fixed rates (bench/fixed_rate.py), first, while the broker is idle: the naive relay and
   retm-relay at --rates req/s (100, 400 and 1,000), and retm-relay with the memory store and
   with Redis at --redis-rate (500), in interleaved rounds, open loop (latency from each
   request's due time): p99 and CPU per event side by side, and from retm-relay's /metrics how
   many events were confirmed directly and how many were spooled.
2. Closed loop, target by target (bench/targets.py starts each as a real process with an
   exchange and a bound queue of its own): a wrk warm-up, then wrk with --connections
   connections for --duration seconds, RETM-shaped bodies with a unique reference each
   (bench/retm.lua): req/s, max latency, CPU seconds of the server's process tree (from /proc)
   per 1,000 answers, peak RSS, events confirmed directly and spooled; the queue must then hold
   one message per 2xx answer (plus at most one per connection for the requests wrk cuts off in
   flight when it stops). Targets: the HTTP ceiling (bench/http_ceiling.py), the confirm
   ceiling (bench/confirm_ceiling.py, no HTTP), the naive relay (bench/naive_relay.py), and
   retm-relay with config/relay.example.toml (every feature on) with the memory store, with
   Redis, and with two workers on Redis. The runner waits for the broker to go idle in between.
3. The other parts (``PARTS``): RSS with 1,000,000 live dedup keys (bench/dedup_rss.py), spool
   ingest with the broker link cut and drain once it is back, start to READY=1.

Prints a short summary (what was compared, the ratios, PASS/FAIL per target, the verdict),
then the details; writes every figure as JSON to bench/results/ (``--markdown FILE`` prints a
saved run as markdown). A target that answered anything but 2xx, lost or duplicated a message,
or spooled under load is INVALID for a comparison. Exits 1 when a check fails or is invalid.

    .venv/bin/python -m bench.run [--quick] [--only rates,naive,relay] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika

from bench import clients, hotspots, memory_budget
from bench.fixed_rate import run_fixed_rates
from bench.harness import (
    NotifySocket,
    ProcessTree,
    Server,
    Topology,
    child_environ,
    free_port,
    pids_named,
)
from bench.report import LABELS, TARGETS, compute_checks, render, summary
from bench.targets import (
    EVENTS_PATH,
    RESULTS,
    ROOT,
    Context,
    Launched,
    NotAvailable,
    Options,
    check_config,
    launch,
    path_delta,
    paths,
    profile,
    relay_argv,
    relay_env,
)
from tests.proxy import FaultProxy


async def wrk(opts: Options, url: str, seconds: int, token: str) -> dict[str, Any]:
    """The closed loop: wrk with --connections and --threads for ``seconds``."""
    return await clients.wrk(
        opts.wrk,
        url,
        seconds=seconds,
        connections=opts.connections,
        threads=opts.threads,
        token=token,
    )


# -- the closed loop, target by target -----------------------------------------------------


async def closed_loop(ctx: Context, launched: Launched, profile: bool) -> dict[str, Any]:
    """Warm-up, then the closed loop against ``launched``: wrk's summary, CPU per 1,000
    answers and peak RSS of the process tree, and for retm-relay the events confirmed directly
    and spooled during the loop (from its /metrics)."""
    opts, tree = ctx.opts, launched.tree
    result: dict[str, Any] = {
        "target": launched.target,
        "label": LABELS[launched.target],
        "ready_seconds": round(launched.ready_seconds, 3),
    }
    warm = await wrk(opts, launched.url, opts.warmup, launched.token)
    before = await paths(launched)
    cpu0 = tree.cpu_seconds()
    closed = await wrk(opts, launched.url, opts.duration, launched.token)
    cpu = tree.cpu_seconds() - cpu0
    result["paths"] = path_delta(before, await paths(launched))
    result["processes"] = len(tree.pids())
    result["peak_rss_bytes"] = tree.peak_rss()
    if profile:
        result["profile"] = await run_profile(ctx, launched.server, launched.url, launched.token)
    result["warmup"] = {k: warm[k] for k in ("requests", "rate", "ok", "non2xx", "max_ms")}
    result["closed"] = closed
    result["cpu_seconds_closed"] = round(cpu, 3)
    result["cpu_per_1000"] = round(cpu / max(1, closed["requests"]) * 1000, 4)
    answered_ok = warm["ok"] + closed["ok"] + (result.get("profile") or {}).get("ok", 0)
    result["answered_2xx"] = answered_ok
    # wrk stops with up to one request per connection in flight: published, never answered.
    result["unanswered_max"] = opts.connections * (2 + bool(profile))
    if launched.queue is not None:
        result["messages"] = await ctx.topology.count(launched.queue)
    result["max_ms"] = max(closed["max_ms"], warm["max_ms"])
    return result


def invalid_reasons(r: dict[str, Any]) -> list[str]:
    """Why a target's closed loop cannot be trusted: answers that were not 2xx, messages
    missing or extra, events spooled under load."""
    reasons = [
        f"{phase}: {r[phase]['non2xx']} answers were not 2xx"
        for phase in ("warmup", "closed")
        if r[phase].get("non2xx")
    ]
    errors = r["closed"].get("errors", {})
    reasons.extend(
        f"closed loop: {errors[kind]} socket {kind} errors"
        for kind in ("connect", "read", "write", "timeout")
        if errors.get(kind)
    )
    if r.get("paths", {}).get("spooled"):
        reasons.append(
            f"closed loop: {r['paths']['spooled']} events were spooled under load "
            f"({r['paths'].get('direct', 0)} confirmed directly)"
        )
    if "messages" in r:
        ok, slack = r["answered_2xx"], r.get("unanswered_max", 0)
        if not ok <= r["messages"] <= ok + slack:
            reasons.append(
                f"the queue holds {r['messages']} messages for {ok} 2xx answers "
                f"(and at most {slack} requests cut off in flight when wrk stopped)"
            )
    return reasons


async def run_profile(ctx: Context, server: Server, url: str, token: str) -> dict[str, Any]:
    """An extra closed-loop phase with py-spy sampling the server (not counted in the table):
    see ``targets.profile``."""
    seconds = ctx.opts.profile_seconds
    return await profile(ctx, server, lambda: wrk(ctx.opts, url, seconds, token), "closed")


async def run_confirm_ceiling(ctx: Context) -> dict[str, Any]:
    """bench/confirm_ceiling.py: aio-pika publishing with confirms, no HTTP."""
    opts, n = ctx.opts, ctx.names("confirm")
    await ctx.topology.bind(n["exchange"], n["queue"])
    try:
        r = await clients.run_json(
            [
                *[sys.executable, "-m", "bench.confirm_ceiling", "--amqp-url", opts.amqp_url],
                *["--exchange", n["exchange"], "--seconds", str(opts.duration)],
                *["--warmup", str(opts.warmup), "--in-flight", str(opts.connections)],
                *["--rate", f"{opts.redis_rate:g}", "--open-seconds", str(opts.open_seconds)],
            ]
        )
        messages = await ctx.topology.count(n["queue"])
    finally:
        await ctx.topology.delete([n["exchange"]], [n["queue"]])
    closed = {**r["closed"], "non2xx": 0, "max_ms": None}
    return {
        "target": "confirm",
        "label": LABELS["confirm"],
        "closed": closed,
        "open": r["open"],
        "cpu_per_1000": round(closed["cpu_seconds"] / closed["requests"] * 1000, 4),
        "peak_rss_bytes": r["peak_rss_bytes"],
        "messages": messages,
        "answered_2xx": r["published"],
        "max_ms": r["open"]["max_ms"],
        "invalid": []
        if messages == r["published"]
        else [f"{messages} messages for {r['published']}"],
    }


async def run_target(ctx: Context, target: str) -> dict[str, Any]:
    """The closed loop of one target of ``TARGETS``."""
    if target == "confirm":
        return await run_confirm_ceiling(ctx)
    profile = ctx.opts.profile and target in ("naive", "relay", "redis")
    try:
        async with launch(ctx, target) as launched:
            result = await closed_loop(ctx, launched, profile)
    except NotAvailable as exc:
        return {"target": target, "label": LABELS[target], "na": str(exc)}
    if launched.log:
        result["log"] = launched.log
    result["invalid"] = invalid_reasons(result)
    return result


async def broker_settles(idle_share: float = 0.15, timeout: float = 30.0) -> None:
    """Wait (at most ``timeout`` seconds) until RabbitMQ's Erlang VM uses under ``idle_share``
    of a CPU over a second: deleting a target's queue of tens of thousands of persistent
    messages keeps the broker busy for a while, which would otherwise land on the next target."""
    beam = pids_named("beam.smp")
    if not beam:
        return
    tree = ProcessTree(beam[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = tree.cpu_seconds()
        await asyncio.sleep(1.0)
        if tree.cpu_seconds() - before < idle_share:
            return


async def run_dedup_rss(ctx: Context) -> dict[str, Any]:
    n = ctx.names("dedup")
    own = [n["unrouted"], n["rejected"], n["archive"]]
    ctx.topology.track([n["exchange"], *own], own)
    try:
        return await clients.run_json(
            [
                sys.executable,
                "-m",
                "bench.dedup_rss",
                "--amqp-url",
                ctx.opts.amqp_url,
                "--exchange",
                n["exchange"],
                "--unrouted",
                n["unrouted"],
                "--rejected",
                n["rejected"],
                "--archive",
                n["archive"],
                "--state-dir",
                str(ctx.workdir / "state-dedup"),
                "--keys",
                str(ctx.opts.dedup_keys),
            ]
        )
    finally:
        await ctx.topology.delete([n["exchange"], *own], own)


async def run_spool(ctx: Context) -> dict[str, Any]:
    """Cut the broker link (FaultProxy), post for --spool-seconds, restore, and time the drain
    until the queue holds one message per 2xx answer."""
    opts, n = ctx.opts, ctx.names("spool")
    supported = "spool" in ctx.config
    broker_port = int(opts.amqp_url.rsplit(":", 1)[1].split("/")[0])
    proxy = await FaultProxy(broker_port).start()
    proxied = opts.amqp_url.replace(f":{broker_port}", f":{proxy.port}")
    port = free_port()
    url = f"http://127.0.0.1:{port}{EVENTS_PATH}"
    health_url = f"http://127.0.0.1:{port}/health"
    notify = NotifySocket(ctx.workdir)
    env = relay_env(ctx, "spool", port, notify, RELAY_AMQP_URL=proxied)
    server = Server("spool", relay_argv(), env, ctx.workdir)
    result: dict[str, Any] = {"supported": supported}

    async def connected() -> bool:
        _, health = await clients.get_json(health_url)
        return bool((health.get("broker") or {}).get("connected"))

    async def until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> float:
        async with asyncio.timeout(timeout):
            while not await predicate():  # noqa: ASYNC110 - polling another process's state
                await asyncio.sleep(0.02)
        return time.perf_counter()

    try:
        own = [n["unrouted"], n["rejected"], n["archive"]]
        ctx.topology.track(own, own)
        await ctx.topology.bind(n["exchange"], n["queue"])
        await server.start(notify.wait_ready)
        proxy.cut()
        await until(lambda: _not(connected), 15)
        ingest = await wrk(opts, url, opts.spool_seconds, ctx.token)
        accepted: int = ingest["ok"]
        result["ingest"] = {
            k: ingest[k] for k in ("requests", "seconds", "ok", "statuses", "max_ms", "errors")
        }
        result["ingest_rate"] = round(accepted / ingest["seconds"], 1)
        proxy.restore()
        restored = time.perf_counter()
        up = await until(connected, 30)
        result["reconnect_seconds"] = round(up - restored, 3)

        async def drained() -> bool:
            count: int = await ctx.topology.count(n["queue"])
            return count >= accepted

        done = await until(drained, 60 + accepted / 500)
        await asyncio.sleep(0.5)  # anything beyond one message per 2xx would show up by now
        result["messages"] = await ctx.topology.count(n["queue"])
        # wrk stops with up to one request per connection in flight: spooled, never answered.
        if not accepted <= result["messages"] <= accepted + opts.connections:
            result["invalid"] = [
                f"the queue holds {result['messages']} messages for {accepted} 2xx answers"
            ]
        result["drain_seconds"] = round(done - up, 3)
        result["drain_rate"] = round(accepted / max(done - up, 1e-3), 1) if accepted else None
    except TimeoutError:
        result["error"] = "timed out waiting for the broker link or the drain"
    finally:
        await server.stop()
        notify.close()
        await proxy.close()
        own = [n["unrouted"], n["rejected"], n["archive"]]
        await ctx.topology.delete([n["exchange"], *own], [n["queue"], *own])
    if not supported:
        statuses = result.get("ingest", {}).get("statuses")
        result["na"] = f"no spool on this branch (answers while the link was cut: {statuses})"
    return result


async def _not(predicate: Callable[[], Awaitable[bool]]) -> bool:
    return not await predicate()


async def run_ready(ctx: Context) -> dict[str, Any]:
    """Start retm-relay (memory store, example configuration) --ready-starts times: seconds
    from exec to READY=1 on the notify socket."""
    n = ctx.names("ready")
    own = [n["unrouted"], n["rejected"], n["archive"]]
    ctx.topology.track([n["exchange"], *own], own)
    times = []
    try:
        for _ in range(ctx.opts.ready_starts):
            notify = NotifySocket(ctx.workdir)
            port = free_port()
            server = Server("ready", relay_argv(), relay_env(ctx, "ready", port, notify),
                            ctx.workdir)  # fmt: skip
            try:
                times.append(round(await server.start(notify.wait_ready), 3))
            finally:
                await server.stop()
                notify.close()
    finally:
        await ctx.topology.delete([n["exchange"], *own], own)
    return {"starts": times, "median": statistics.median(times), "max": max(times)}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    names = ("aiohttp", "aio-pika", "aiormq", "pamqp", "uvloop", "orjson", "structlog", "redis")
    for name in (*names, "retm-relay"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


async def run_archive_cost(ctx: Context) -> dict[str, Any]:
    """What the archive costs: retm-relay with the archive on against the same relay with it
    off, side by side in alternating rounds (bench/archive_cost.py)."""
    from bench import archive_cost  # noqa: PLC0415 - it imports this module

    return await archive_cost.measure(ctx.opts, rounds=4, seconds=5)


async def run_memory(ctx: Context) -> dict[str, Any]:
    """The memory-budget run (bench/memory_budget.py) on the run's broker."""
    result = await memory_budget.run(ctx.opts.amqp_url)
    print(memory_budget.render(result), flush=True)
    return result


#: The parts after the closed loops, in order: name (for --only, and the key of its results)
#: -> (what it measures, the coroutine that runs it). A new part is one entry here.
PARTS: dict[str, tuple[str, Callable[[Context], Awaitable[dict[str, Any]]]]] = {
    "dedup": ("RSS with --dedup-keys live dedup keys", run_dedup_rss),
    "spool": ("spool ingest and drain", run_spool),
    "ready": ("start to READY=1", run_ready),
    "archive": ("archive cost: archive on / off (bench/archive_cost.py)", run_archive_cost),
    "memory": ("memory budget: concurrent 1 MB webhooks (bench/memory_budget.py)", run_memory),
}
FAILURES = (RuntimeError, OSError, aio_pika.exceptions.AMQPError)
NAMES = ("rates", *TARGETS, *PARTS)


async def run(opts: Options) -> dict[str, Any]:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    workdir = Path(tempfile.mkdtemp(prefix="retm-bench-"))
    topology = Topology(opts.amqp_url, {"x-queue-type": opts.queue_type})
    await topology.open()
    ctx = Context(opts, run_id.replace("-", ""), workdir, topology)
    results: dict[str, Any] = {
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "loadavg_start": loadavg(),
        },
        "versions": versions(),
        "options": {k: v for k, v in vars(opts).items() if k != "wrk"},
        "targets": {},
    }
    print(f"retm-relay bench {run_id}: load average {loadavg()} on {os.cpu_count()} CPUs")
    try:
        ok, message, ctx.config = await check_config(
            child_environ(RELAY_AUTH_TOKENS=ctx.token, RELAY_STATE_DIR=str(workdir))
        )
        if not ok:
            raise SystemExit(f"bench: the example configuration does not check: {message}")
        if opts.wants("rates"):
            rates = ", ".join(f"{r:g}" for r in opts.rates)
            print(f"  fixed rates ({rates} req/s; {opts.redis_rate:g} with Redis) ...", flush=True)
            started = time.perf_counter()
            try:
                results["rates"] = await run_fixed_rates(ctx)
            except FAILURES as exc:
                results["rates"] = {"error": str(exc)}
            print(f"    ({time.perf_counter() - started:.0f} s)", flush=True)
            await broker_settles()
        for target in TARGETS:
            if not opts.wants(target):
                continue
            print(f"  {LABELS[target]}, closed loop ...", flush=True)
            started = time.perf_counter()
            try:
                results["targets"][target] = await run_target(ctx, target)
            except FAILURES as exc:
                results["targets"][target] = {"target": target, "label": LABELS[target],
                                              "error": str(exc)}  # fmt: skip
            r = results["targets"][target]
            outcome = r.get("na") or r.get("error") or f"{r['closed']['rate']:,.0f} req/s"
            print(f"    {outcome} ({time.perf_counter() - started:.0f} s)", flush=True)
            await broker_settles()
        for name, (label, part) in PARTS.items():
            if not opts.wants(name):
                continue
            print(f"  {label} ...", flush=True)
            try:
                results[name] = await part(ctx)
            except FAILURES as exc:
                results[name] = {"error": str(exc)}
    finally:
        await topology.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results["machine"]["loadavg_end"] = loadavg()
    results["ready_seconds_all_starts"] = [round(t, 3) for t in ctx.ready_times]
    results["checks"] = compute_checks(results)
    return results


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Options()
    parser.add_argument("--duration", type=int, default=d.duration, help="closed loop, seconds")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="seconds")
    parser.add_argument("--connections", type=int, default=d.connections)
    parser.add_argument("--threads", type=int, default=d.threads, help="wrk threads")
    parser.add_argument(
        "--rates",
        default=",".join(f"{r:g}" for r in d.rates),
        help="fixed rates (req/s, comma-separated) of retm-relay against the naive relay",
    )
    parser.add_argument(
        "--redis-rate", type=float, default=d.redis_rate, help="Redis against memory, req/s"
    )
    parser.add_argument("--rounds", type=int, default=d.rounds, help="per fixed rate")
    parser.add_argument("--open-seconds", type=float, default=d.open_seconds, help="per round")
    parser.add_argument("--open-warmup", type=float, default=d.open_warmup, help="per round")
    parser.add_argument("--spool-seconds", type=int, default=d.spool_seconds)
    parser.add_argument("--ready-starts", type=int, default=d.ready_starts)
    parser.add_argument("--dedup-keys", type=int, default=d.dedup_keys)
    parser.add_argument("--amqp-url", default=os.environ.get("BENCH_AMQP_URL", d.amqp_url))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", d.redis_url))
    parser.add_argument("--queue-type", default=d.queue_type, choices=("classic", "quorum"))
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of {','.join(NAMES)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 3 s closed loop, 1 s warm-up, 1 round of 2 s per fixed rate, "
        "2 s spool, 1 start",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the naive relay and retm-relay with py-spy at --profile-rate after the "
        "fixed rates, and under the closed loop (with Redis too)",
    )
    parser.add_argument("--profile-seconds", type=int, default=d.profile_seconds)
    parser.add_argument(
        "--profile-rate", type=float, default=d.profile_rate, help="fixed rate of --profile"
    )
    parser.add_argument(
        "--relay-setting",
        action="append",
        default=[],
        metavar="RELAY_KEY=VALUE",
        help="a setting for every retm-relay target, on top of config/relay.example.toml "
        "(repeatable; e.g. RELAY_ARCHIVE_ENABLED=false for an A/B run; the summary names it)",
    )
    parser.add_argument("--markdown", metavar="RESULTS_JSON", help="print a saved run as markdown")
    parser.add_argument(
        "--memory-budget",
        action="store_true",
        help="only the memory-budget run (bench/memory_budget.py; also --only memory)",
    )
    args = parser.parse_args(argv)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(NAMES)
    if unknown:
        parser.error(f"unknown --only names: {', '.join(sorted(unknown))}")
    relay_settings = {}
    for item in args.relay_setting:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("RELAY_"):
            parser.error(f"--relay-setting {item!r}: expected RELAY_KEY=VALUE")
        relay_settings[key] = value
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        rates=tuple(float(r) for r in args.rates.split(",") if r.strip()),
        redis_rate=args.redis_rate,
        rounds=args.rounds,
        open_seconds=args.open_seconds,
        open_warmup=args.open_warmup,
        spool_seconds=args.spool_seconds,
        ready_starts=args.ready_starts,
        dedup_keys=args.dedup_keys,
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        queue_type=args.queue_type,
        only=only,
        profile=args.profile,
        profile_seconds=args.profile_seconds,
        profile_rate=args.profile_rate,
        relay_settings=relay_settings,
    )
    if args.quick:
        opts.duration, opts.warmup, opts.open_seconds, opts.rounds = 3, 1, 2, 1
        opts.spool_seconds, opts.ready_starts, opts.profile_seconds = 2, 1, 5
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    if args.markdown:
        print(render(json.loads(Path(args.markdown).read_text()), markdown=True))
        return 0
    if args.memory_budget:
        return memory_budget.main(opts.amqp_url)
    wrk_path = shutil.which("wrk")
    if wrk_path is None:
        print("bench: wrk is not installed (Debian: apt-get install wrk; `make bench` does it)")
        return 2
    opts.wrk = wrk_path
    results = asyncio.run(run(opts))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{results['run_id']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    shutil.copyfile(path, RESULTS / "latest.json")
    print()
    print(render(results))
    print()
    print(summary(results))
    print()
    saved = path.relative_to(ROOT)
    print(f"results: {saved} (as markdown: python -m bench.run --markdown {saved})")
    load = results["machine"]
    if max(load["loadavg_start"][0], load["loadavg_end"][0]) > 0.5:
        print(
            f"note: load average {load['loadavg_start']} at the start, {load['loadavg_end']} at "
            "the end: other work was running, so these numbers are noisy."
        )
    at_rate = ((results.get("rates") or {}).get("targets")) or {}
    for where, target, prof in [
        *((f"at {opts.profile_rate:g} req/s", t, (at_rate.get(t) or {}).get("profile"))
          for t in ("naive", "relay")),
        *(("under the closed loop", t, (results["targets"].get(t) or {}).get("profile"))
          for t in ("naive", "relay", "redis")),
    ]:  # fmt: skip
        if prof and "error" in prof:
            print(f"profile of {LABELS[target]} {where}: {prof['error']}")
        elif prof:
            print(f"\nprofile of {LABELS[target]} {where} ({prof['file']}):")
            print(hotspots.render(prof))
    failed = any(c["status"] in ("FAIL", "INVALID") for c in results["checks"])
    invalid = any(r.get("invalid") for r in results["targets"].values())
    invalid = invalid or bool((results.get("spool") or {}).get("invalid"))
    errors = [k for k, r in results["targets"].items() if "error" in r]
    errors += [k for k in ("rates", *PARTS) if "error" in (results.get(k) or {})]
    if errors:
        print(f"errors in: {', '.join(errors)}")
    return 1 if failed or invalid or errors else 0


if __name__ == "__main__":
    sys.exit(main())
