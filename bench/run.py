"""`make bench`: retm-relay against its yardsticks, side by side, on this machine.

Every target runs as a real process on a free port against the local RabbitMQ, publishing to
an exchange of its own (``bench.<run>.<target>.events``) with a durable queue bound to it
(``#``), both deleted afterwards. Per target:

1. open loop: bench/openloop.py at --rate req/s, first --warmup seconds (not counted), then
   --open-seconds (latency from each request's due time, so a stall is not hidden):
   p50/p99/p99.9/max. It runs first, warmed up at its own rate as wrk2 does, so that it
   measures the steady state at that rate rather than the broker working off a burst;
2. warm-up: wrk for --warmup seconds (not counted);
3. closed loop: wrk, --connections connections, --duration seconds, RETM-shaped bodies with a
   unique reference each (bench/retm.lua): req/s, answers that are not 2xx, max latency;
4. CPU seconds of the server's process tree (the process and its children, from
   /proc/PID/stat) during the closed loop per 1,000 answers, and the tree's peak RSS (sum of
   VmHWM) at the end;
5. the queue must then hold one message per 2xx answer (plus at most one per connection for
   the requests wrk cuts off in flight when it stops: published, never answered).

Targets: the HTTP ceiling (bench/http_ceiling.py), the confirm ceiling (bench/confirm_ceiling.py,
no HTTP), the naive relay (bench/naive_relay.py), and retm-relay (``python -m relay serve`` with
config/relay.example.toml; only the port, a bench token, the exchange names and the state
directory are overridden) with the memory store, with Redis, and with two workers on Redis. The
Redis runs need ``dedup.backend = "redis"`` to be implemented (/health must report it) and the
two-worker run needs ``http.workers`` (``retm-relay check-config`` must accept it); otherwise
their rows say n/a and why.

Then: RSS with 1,000,000 live dedup keys (bench/dedup_rss.py), spool ingest with the broker link
cut (through tests/proxy.py's FaultProxy) and drain once it is back (n/a while the relay has no
spool), and start to READY=1 (the runner binds the NOTIFY_SOCKET datagram socket itself).

Prints the table, the ratios and PASS/FAIL per target of issue 5; writes the results as JSON
to bench/results/ (``--markdown FILE`` prints a saved run as the README's table). Exits 1 when a
target FAILs or a run was invalid (an answer that was not 2xx, a message missing or extra).

    .venv/bin/python -m bench.run [--quick] [--only naive,relay] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika

from bench import clients, hotspots
from bench.harness import (
    NotifySocket,
    ProcessTree,
    Server,
    Topology,
    child_environ,
    free_port,
    pids_named,
    wait_tcp,
)
from bench.report import EXTRAS, LABELS, TARGETS, compute_checks, render
from tests.proxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
EXAMPLE_CONFIG = ROOT / "config" / "relay.example.toml"
RESULTS = BENCH / "results"
EVENTS_PATH = "/retm/events"


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


async def openloop(opts: Options, url: str, token: str) -> dict[str, Any]:
    """The open loop: bench/openloop.py at --rate for --open-seconds, after --warmup seconds at
    the same rate (as wrk2 calibrates at its target rate)."""
    return await clients.openloop(
        url, token=token, rate=opts.rate, seconds=opts.open_seconds, warmup=opts.warmup
    )


def redis_cli(*args: str) -> str:
    """Run redis-cli and return its output (the runner only deletes its own prefixed keys
    with it). Raises CalledProcessError when redis-cli fails."""
    return subprocess.run(
        ["redis-cli", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


# -- the run -------------------------------------------------------------------------------


@dataclass
class Options:
    duration: int = 12
    warmup: int = 2
    connections: int = 32
    threads: int = 1
    rate: float = 500
    open_seconds: float = 10
    spool_seconds: int = 5
    ready_starts: int = 3
    dedup_keys: int = 1_000_000
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/15"
    queue_type: str = "classic"
    only: tuple[str, ...] = TARGETS + EXTRAS
    profile: bool = False
    profile_seconds: int = 10
    wrk: str = "wrk"


@dataclass
class Context:
    opts: Options
    run_id: str
    workdir: Path
    topology: Topology
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    config: dict[str, Any] = field(default_factory=dict)
    ready_times: list[float] = field(default_factory=list)

    def names(self, target: str) -> dict[str, str]:
        prefix = f"bench.{self.run_id}.{target}"
        return {
            "exchange": f"{prefix}.events",
            "queue": f"{prefix}.q",
            "unrouted": f"{prefix}.unrouted",
            "archive": f"{prefix}.archive",
            "redis_prefix": f"{prefix}.dedup:",
            "prefix": prefix,
        }


def relay_env(
    ctx: Context, target: str, port: int, notify: NotifySocket, **extra: str
) -> dict[str, str]:
    """The environment of a retm-relay target: the example configuration plus only what
    isolates it (port, a bench token, its exchange names, a state directory)."""
    n = ctx.names(target)
    state = ctx.workdir / f"state-{target}"
    state.mkdir(exist_ok=True)
    settings = {
        "NOTIFY_SOCKET": str(notify.path),
        "RELAY_HTTP_PORT": str(port),
        "RELAY_AUTH_TOKENS": ctx.token,
        "RELAY_AMQP_URL": ctx.opts.amqp_url,
        "RELAY_AMQP_EXCHANGE": n["exchange"],
        "RELAY_AMQP_UNROUTED_EXCHANGE": n["unrouted"],
        "RELAY_ARCHIVE_QUEUE": n["archive"],
        "RELAY_STATE_DIR": str(state),
    }
    return child_environ(**{**settings, **extra})


def relay_argv() -> list[str]:
    return [sys.executable, "-m", "relay", "serve", "--config", str(EXAMPLE_CONFIG)]


async def check_config(env: dict[str, str]) -> tuple[bool, str, dict[str, Any]]:
    """``retm-relay check-config --show`` with ``env``: (ok, message, settings tree)."""
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "relay", "check-config", "--show", "--config", str(EXAMPLE_CONFIG)],
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        return False, err.decode().strip() or out.decode().strip(), {}
    text = out.decode()
    tree: dict[str, Any] = json.loads(text[: text.rindex("}") + 1])
    return True, "", tree


async def redis_extra(ctx: Context, target: str) -> dict[str, str]:
    """Settings of the Redis runs: DB 15 and, when the relay has the key, a unique prefix."""
    extra = {"RELAY_DEDUP_BACKEND": "redis", "RELAY_DEDUP_REDIS_URL": ctx.opts.redis_url}
    if "redis_prefix" in ctx.config.get("dedup", {}):
        extra["RELAY_DEDUP_REDIS_PREFIX"] = ctx.names(target)["redis_prefix"]
    else:  # no prefix to delete by: let the keys expire soon instead
        extra["RELAY_DEDUP_TTL"] = "3600"
    return extra


def cleanup_redis(ctx: Context, target: str) -> int:
    """Delete the keys a Redis run left under its prefix (DB of --redis-url); returns how many."""
    db = ctx.opts.redis_url.rsplit("/", 1)[-1] or "0"
    pattern = ctx.names(target)["redis_prefix"] + "*"
    keys = redis_cli("-n", db, "--scan", "--pattern", pattern).split()
    for i in range(0, len(keys), 500):
        redis_cli("-n", db, "unlink", *keys[i : i + 500])
    return len(keys)


async def measure_server(
    ctx: Context,
    target: str,
    server: Server,
    ready: Callable[[], Awaitable[float]],
    url: str,
    token: str,
    *,
    queue: str | None,
    verify: Callable[[], Awaitable[str | None]] | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Start ``server``, run the open loop (with its warm-up at the same rate), then the
    closed loop (after a warm-up at full speed) against ``url``, sample its process tree, stop
    it, and check the queue holds one message per 2xx answer.

    The open loop (latency at a fixed rate) runs first and warms up at its own rate, so that it
    measures the server in the steady state that rate produces, not the broker working off a
    burst: right after a few seconds at full speed (the closed loop, or its warm-up: thousands
    of persistent messages to write), RabbitMQ's confirm latency stays raised for seconds, and
    every target's p99 at 500 req/s, the naive relay's included, doubles or triples."""
    opts = ctx.opts
    result: dict[str, Any] = {"target": target, "label": LABELS[target]}
    result["ready_seconds"] = round(await server.start(ready), 3)
    try:
        if verify is not None:
            reason = await verify()
            if reason:
                return {**result, "na": reason}
        tree = ProcessTree(server.pid)
        cpu1 = time.perf_counter(), tree.cpu_seconds()
        opened = await openloop(opts, url, token)
        cpu2 = time.perf_counter(), tree.cpu_seconds()
        warm = await wrk(opts, url, opts.warmup, token)
        cpu0 = time.perf_counter(), tree.cpu_seconds()
        closed = await wrk(opts, url, opts.duration, token)
        cpu1_closed = time.perf_counter(), tree.cpu_seconds()
        result["processes"] = len(tree.pids())
        result["peak_rss_bytes"] = tree.peak_rss()
        if profile:
            result["profile"] = await run_profile(ctx, server, url, token)
    finally:
        result["exit_code"] = await server.stop()
    result["warmup"] = {k: warm[k] for k in ("requests", "rate", "ok", "non2xx", "max_ms")}
    result["closed"] = closed
    result["open"] = opened
    cpu_closed = cpu1_closed[1] - cpu0[1]
    result["cpu_seconds_closed"] = round(cpu_closed, 3)
    result["cpu_per_1000"] = round(cpu_closed / max(1, closed["requests"]) * 1000, 4)
    result["cpu_share_open"] = round((cpu2[1] - cpu1[1]) / (cpu2[0] - cpu1[0]), 3)
    answered_ok = warm["ok"] + closed["ok"] + opened["warmup_ok"]
    answered_ok += sum(n for code, n in opened["statuses"].items() if code.startswith("2"))
    # wrk stops with up to one request per connection in flight: published, never answered.
    result["unanswered_max"] = opts.connections * (2 + bool(profile))
    if profile and "profile" in result:
        answered_ok += result["profile"].get("ok", 0)
    result["answered_2xx"] = answered_ok
    if queue is not None:
        result["messages"] = await ctx.topology.count(queue)
    result["max_ms"] = max(closed["max_ms"], opened.get("max_ms", 0), warm["max_ms"])
    result["invalid"] = invalid_reasons(result)
    return result


def invalid_reasons(r: dict[str, Any]) -> list[str]:
    """Why a target's run cannot be trusted: answers that were not 2xx, messages missing."""
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
    if r["open"].get("non2xx"):
        reasons.append(
            f"open loop: {r['open']['non2xx']} failed "
            f"(statuses {r['open']['statuses']}, errors {r['open']['errors']})"
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
    collapsed stacks (``--format raw``, which speedscope and flamegraph.pl read) to
    bench/results/, and a summary of where the time goes (bench/hotspots.py)."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{ctx.run_id}-{server.name}.txt"
    seconds = ctx.opts.profile_seconds
    spy = await asyncio.create_subprocess_exec(
        *[py_spy, "record", "--pid", str(server.pid), "--rate", "200", "--nonblocking"],
        *["--format", "raw", "--output", str(out), "--duration", str(seconds + 1)],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)
    load = await wrk(ctx.opts, url, seconds, token)
    _, err = await spy.communicate()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode()[-500:]}", "ok": load["ok"]}
    summary = hotspots.summarize(hotspots.parse(out.read_text()), top=25)
    return {"file": str(out.relative_to(ROOT)), "rate": load["rate"], "ok": load["ok"], **summary}


async def run_target(ctx: Context, target: str) -> dict[str, Any]:
    opts, n = ctx.opts, ctx.names(target)
    if target == "confirm":
        await ctx.topology.bind(n["exchange"], n["queue"])
        try:
            r = await clients.run_json(
                [
                    sys.executable,
                    "-m",
                    "bench.confirm_ceiling",
                    "--amqp-url",
                    opts.amqp_url,
                    "--exchange",
                    n["exchange"],
                    "--seconds",
                    str(opts.duration),
                    "--warmup",
                    str(opts.warmup),
                    "--in-flight",
                    str(opts.connections),
                    "--rate",
                    str(opts.rate),
                    "--open-seconds",
                    str(opts.open_seconds),
                ]
            )
            messages = await ctx.topology.count(n["queue"])
        finally:
            await ctx.topology.delete([n["exchange"]], [n["queue"]])
        closed = {**r["closed"], "non2xx": 0, "max_ms": None}
        result = {
            "target": target,
            "label": LABELS[target],
            "closed": closed,
            "open": r["open"],
            "cpu_per_1000": round(closed["cpu_seconds"] / closed["requests"] * 1000, 4),
            "peak_rss_bytes": r["peak_rss_bytes"],
            "messages": messages,
            "answered_2xx": r["published"],
            "max_ms": r["open"]["max_ms"],
        }
        result["invalid"] = (
            [] if messages == r["published"] else [f"{messages} messages for {r['published']}"]
        )
        return result

    port = free_port(3 if target == "workers" else 1)
    url = f"http://127.0.0.1:{port}{EVENTS_PATH}"
    if target == "http":
        server = Server(target, [sys.executable, str(BENCH / "http_ceiling.py"), str(port)],
                        child_environ(), ctx.workdir)  # fmt: skip
        return await measure_server(
            ctx, target, server, lambda: wait_tcp(port), url, "", queue=None
        )
    await ctx.topology.bind(n["exchange"], n["queue"])
    created_exchanges, created_queues = [n["exchange"]], [n["queue"]]
    try:
        if target == "naive":
            env = child_environ(AMQP_URL=opts.amqp_url, EXCHANGE=n["exchange"], PORT=str(port))
            server = Server(target, [sys.executable, str(BENCH / "naive_relay.py")], env,
                            ctx.workdir)  # fmt: skip
            return await measure_server(
                ctx,
                target,
                server,
                lambda: wait_tcp(port),
                url,
                "",
                queue=n["queue"],
                profile=opts.profile,
            )
        ctx.topology.track([n["unrouted"], n["archive"]], [n["unrouted"], n["archive"]])
        created_exchanges += [n["unrouted"], n["archive"]]
        created_queues += [n["unrouted"], n["archive"]]
        return await run_relay_target(ctx, target, port, url)
    finally:
        await ctx.topology.delete(created_exchanges, created_queues)
        if target in ("redis", "workers"):
            try:
                cleanup_redis(ctx, target)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"bench: could not delete the Redis keys of {target}: {exc}")


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


async def run_relay_target(ctx: Context, target: str, port: int, url: str) -> dict[str, Any]:
    extra: dict[str, str] = {}
    if target in ("redis", "workers"):
        extra.update(await redis_extra(ctx, target))
    if target == "workers":
        extra["RELAY_HTTP_WORKERS"] = "2"
    if target == "noarchive":
        extra["RELAY_ARCHIVE_ENABLED"] = "false"
    notify = NotifySocket(ctx.workdir)
    try:
        env = relay_env(ctx, target, port, notify, **extra)
        ok, message, _ = await check_config(env)
        if not ok:
            return {"target": target, "label": LABELS[target], "na": f"check-config: {message}"}

        async def verify() -> str | None:
            if "RELAY_DEDUP_BACKEND" not in extra:
                return None
            _, health = await clients.get_json(f"http://127.0.0.1:{port}/health")
            backend = (health.get("dedup") or {}).get("backend")
            if backend != "redis":
                return (
                    f'dedup.backend = "redis" is accepted but /health reports the {backend} '
                    "store (no Redis store on this branch)"
                )
            return None

        server = Server(target, relay_argv(), env, ctx.workdir)
        result = await measure_server(
            ctx,
            target,
            server,
            notify.wait_ready,
            url,
            ctx.token,
            queue=ctx.names(target)["queue"],
            verify=verify,
            profile=ctx.opts.profile and target in ("relay", "redis"),
        )
        if "na" not in result:
            ctx.ready_times.append(result["ready_seconds"])
            result["log"] = log_summary(server.log_path)
            if len(result["log"]) > 1 or result.get("invalid"):  # warnings, errors: keep it
                RESULTS.mkdir(exist_ok=True)
                kept = RESULTS / f"{ctx.run_id}-{target}.log"
                shutil.copyfile(server.log_path, kept)
                result["log"]["file"] = str(kept.relative_to(ROOT))
        return result
    finally:
        notify.close()


def log_summary(path: Path) -> dict[str, Any]:
    """Lines and levels in a relay's JSON log."""
    levels: Counter[str] = Counter()
    lines = 0
    with path.open("rb") as f:
        for raw in f:
            lines += 1
            for level in (b"warning", b"error", b"critical"):
                if b'"level":"' + level + b'"' in raw:
                    levels[level.decode()] += 1
    return {"lines": lines, **levels}


async def run_dedup_rss(ctx: Context) -> dict[str, Any]:
    n = ctx.names("dedup")
    ctx.topology.track([n["exchange"], n["unrouted"], n["archive"]], [n["unrouted"], n["archive"]])
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
                "--archive",
                n["archive"],
                "--state-dir",
                str(ctx.workdir / "state-dedup"),
                "--keys",
                str(ctx.opts.dedup_keys),
            ]
        )
    finally:
        await ctx.topology.delete(
            [n["exchange"], n["unrouted"], n["archive"]], [n["unrouted"], n["archive"]]
        )


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
        ctx.topology.track([n["unrouted"], n["archive"]], [n["unrouted"], n["archive"]])
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
        await ctx.topology.delete(
            [n["exchange"], n["unrouted"], n["archive"]], [n["queue"], n["unrouted"], n["archive"]]
        )
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
    ctx.topology.track([n["exchange"], n["unrouted"], n["archive"]], [n["unrouted"], n["archive"]])
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
        await ctx.topology.delete(
            [n["exchange"], n["unrouted"], n["archive"]], [n["unrouted"], n["archive"]]
        )
    return {"starts": times, "median": statistics.median(times), "max": max(times)}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("aiohttp", "aio-pika", "aiormq", "uvloop", "orjson", "structlog", "retm-relay"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


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
        for target in TARGETS:
            if target not in opts.only:
                continue
            print(f"  {LABELS[target]} ...", flush=True)
            started = time.perf_counter()
            try:
                results["targets"][target] = await run_target(ctx, target)
            except (RuntimeError, OSError, aio_pika.exceptions.AMQPError) as exc:
                results["targets"][target] = {"target": target, "label": LABELS[target],
                                              "error": str(exc)}  # fmt: skip
            r = results["targets"][target]
            summary = r.get("na") or r.get("error") or f"{r['closed']['rate']:,.0f} req/s"
            print(f"    {summary} ({time.perf_counter() - started:.0f} s)", flush=True)
            await broker_settles()
        for extra, func, label in (
            ("dedup", run_dedup_rss, f"RSS with {opts.dedup_keys:,} dedup keys"),
            ("spool", run_spool, "spool ingest and drain"),
            ("ready", run_ready, "start to READY=1"),
        ):
            if extra not in opts.only:
                continue
            print(f"  {label} ...", flush=True)
            try:
                results[extra] = await func(ctx)
            except (RuntimeError, OSError, aio_pika.exceptions.AMQPError) as exc:
                results[extra] = {"error": str(exc)}
    finally:
        await topology.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results["machine"]["loadavg_end"] = loadavg()
    results["ready_seconds_all_starts"] = ctx.ready_times
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
    parser.add_argument("--rate", type=float, default=d.rate, help="open loop, req/s")
    parser.add_argument("--open-seconds", type=float, default=d.open_seconds)
    parser.add_argument("--spool-seconds", type=int, default=d.spool_seconds)
    parser.add_argument("--ready-starts", type=int, default=d.ready_starts)
    parser.add_argument("--dedup-keys", type=int, default=d.dedup_keys)
    parser.add_argument("--amqp-url", default=os.environ.get("BENCH_AMQP_URL", d.amqp_url))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", d.redis_url))
    parser.add_argument("--queue-type", default=d.queue_type, choices=("classic", "quorum"))
    parser.add_argument(
        "--only",
        default=",".join(d.only),
        help=f"comma-separated subset of {','.join(TARGETS + EXTRAS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 3 s closed loop, 1 s warm-up, 3 s open loop, 2 s spool, 1 start",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measurements of the naive relay and of retm-relay with the memory "
        "store and with Redis, sample each with py-spy under load",
    )
    parser.add_argument("--profile-seconds", type=int, default=d.profile_seconds)
    parser.add_argument("--markdown", metavar="RESULTS_JSON", help="print a saved run as markdown")
    args = parser.parse_args(argv)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(TARGETS + EXTRAS)
    if unknown:
        parser.error(f"unknown --only names: {', '.join(sorted(unknown))}")
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        rate=args.rate,
        open_seconds=args.open_seconds,
        spool_seconds=args.spool_seconds,
        ready_starts=args.ready_starts,
        dedup_keys=args.dedup_keys,
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        queue_type=args.queue_type,
        only=only,
        profile=args.profile,
        profile_seconds=args.profile_seconds,
    )
    if args.quick:
        opts.duration, opts.warmup, opts.open_seconds = 3, 1, 3
        opts.spool_seconds, opts.ready_starts, opts.profile_seconds = 2, 1, 5
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    if args.markdown:
        print(render(json.loads(Path(args.markdown).read_text()), markdown=True))
        return 0
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
    saved = path.relative_to(ROOT)
    print(f"results: {saved} (as markdown: python -m bench.run --markdown {saved})")
    load = results["machine"]
    if max(load["loadavg_start"][0], load["loadavg_end"][0]) > 0.5:
        print(
            f"note: load average {load['loadavg_start']} at the start, {load['loadavg_end']} at "
            "the end: other work was running, so these numbers are noisy."
        )
    for target in ("naive", "relay", "redis"):
        prof = (results["targets"].get(target) or {}).get("profile")
        if prof and "error" in prof:
            print(f"profile of {LABELS[target]}: {prof['error']}")
        elif prof:
            print(f"\nprofile of {LABELS[target]} under load ({prof['file']}):")
            print(hotspots.render(prof))
    failed = any(c["status"] == "FAIL" for c in results["checks"])
    invalid = any(r.get("invalid") for r in results["targets"].values())
    invalid = invalid or bool((results.get("spool") or {}).get("invalid"))
    errors = [k for k, r in results["targets"].items() if "error" in r]
    errors += [k for k in EXTRAS if "error" in (results.get(k) or {})]
    if errors:
        print(f"errors in: {', '.join(errors)}")
    return 1 if failed or invalid or errors else 0


if __name__ == "__main__":
    sys.exit(main())
