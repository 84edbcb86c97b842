"""The targets of `make bench`, each started as a real process with a topology of its own.

``launch(ctx, target)`` starts one target (the HTTP ceiling, the naive relay, or retm-relay with
the memory store, with Redis, or with two workers on Redis) on a free port, publishing to an
exchange of its own (``bench.<run>.<target>.events``) with a durable queue bound to it (``#``),
and removes all of it afterwards. retm-relay runs ``python -m relay serve`` with
config/relay.example.toml (every feature on: auth, dedup, metrics, one log line per webhook,
the spool); only the port, a bench token, the exchange names, the state directory and, for the
Redis targets, the store are overridden.

``paths(launched)`` reads how a retm-relay target's events reached the broker from its own
/metrics: confirmed directly, or spooled (and forwarded later). A comparison made while the
relay spooled is not a comparison of the same work, so the runner marks it invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import clients, hotspots
from bench.harness import (
    NotifySocket,
    ProcessTree,
    Server,
    Topology,
    child_environ,
    free_port,
    wait_tcp,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
EXAMPLE_CONFIG = ROOT / "config" / "relay.example.toml"
RESULTS = BENCH / "results"
EVENTS_PATH = "/retm/events"
RELAYS = ("relay", "redis", "workers")
#: the relay's own latency histograms read by ``paths``: metric -> key prefix
TIMINGS = {
    "relay_request_seconds_bucket": "request",
    "relay_publish_confirm_seconds_bucket": "confirm",
}


@dataclass
class Options:
    """The runner's options (``python -m bench.run --help``); seconds unless named otherwise."""

    duration: int = 12
    warmup: int = 2
    connections: int = 32
    threads: int = 1
    rates: tuple[float, ...] = (100, 400, 1000)
    redis_rate: float = 500
    rounds: int = 2
    open_seconds: float = 6
    open_warmup: float = 1
    spool_seconds: int = 5
    ready_starts: int = 3
    dedup_keys: int = 1_000_000
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/15"
    queue_type: str = "classic"
    only: tuple[str, ...] = ()  # names of parts and targets to run; empty: all
    profile: bool = False
    profile_seconds: int = 10
    profile_rate: float = 400
    #: RELAY_* settings given to every retm-relay target on top of config/relay.example.toml
    #: (``--relay-setting``), e.g. ``{"RELAY_ARCHIVE_ENABLED": "false"}`` for an A/B run
    relay_settings: dict[str, str] = field(default_factory=dict)
    wrk: str = "wrk"

    def wants(self, name: str) -> bool:
        """Whether --only lets the part or target ``name`` run."""
        return not self.only or name in self.only


@dataclass
class Context:
    """One run: its options, id, scratch directory, broker topology and bench token."""

    opts: Options
    run_id: str
    workdir: Path
    topology: Topology
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    config: dict[str, Any] = field(default_factory=dict)
    ready_times: list[float] = field(default_factory=list)

    def names(self, target: str) -> dict[str, str]:
        """Exchange, queue and Redis key names of ``target`` in this run."""
        prefix = f"bench.{self.run_id}.{target}"
        return {
            "exchange": f"{prefix}.events",
            "queue": f"{prefix}.q",
            "unrouted": f"{prefix}.unrouted",
            "rejected": f"{prefix}.rejected",
            "archive": f"{prefix}.archive",
            "redis_prefix": f"{prefix}.dedup:",
            "prefix": prefix,
        }


class NotAvailable(Exception):
    """A target this branch cannot run (the reason is the message)."""


@dataclass
class Launched:
    """A started target: its URL, token, queue, process tree and, for retm-relay, /metrics."""

    target: str
    server: Server
    url: str
    token: str
    queue: str | None
    ready_seconds: float
    metrics_url: str | None = None
    log: dict[str, Any] = field(default_factory=dict)

    @property
    def tree(self) -> ProcessTree:
        return ProcessTree(self.server.pid)


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
        "RELAY_AMQP_REJECTED_EXCHANGE": n["rejected"],
        "RELAY_ARCHIVE_QUEUE": n["archive"],
        "RELAY_STATE_DIR": str(state),
    }
    return child_environ(**{**settings, **ctx.opts.relay_settings, **extra})


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


def redis_cli(*args: str) -> str:
    """Run redis-cli and return its output (the runner only deletes its own prefixed keys
    with it). Raises CalledProcessError when redis-cli fails."""
    return subprocess.run(
        ["redis-cli", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


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


@contextlib.asynccontextmanager
async def launch(ctx: Context, target: str) -> AsyncIterator[Launched]:
    """Start ``target`` (one of ``TARGETS`` but the confirm ceiling) with its own exchange and
    bound queue; stop it and delete its exchanges, queues and Redis keys on exit.

    Raises NotAvailable when this branch cannot run it (no Redis store, no workers), and
    RuntimeError when it does not become ready.
    """
    opts, n = ctx.opts, ctx.names(target)
    port = free_port(3 if target == "workers" else 1)
    url = f"http://127.0.0.1:{port}{EVENTS_PATH}"
    exchanges, queues = [], []
    notify: NotifySocket | None = None
    server: Server | None = None
    try:
        if target == "http":
            argv = [sys.executable, str(BENCH / "http_ceiling.py"), str(port)]
            server = Server(target, argv, child_environ(), ctx.workdir)
            ready = await server.start(lambda: wait_tcp(port))
            yield Launched(target, server, url, "", None, ready)
            return
        await ctx.topology.bind(n["exchange"], n["queue"])
        exchanges, queues = [n["exchange"]], [n["queue"]]
        if target == "naive":
            env = child_environ(AMQP_URL=opts.amqp_url, EXCHANGE=n["exchange"], PORT=str(port))
            server = Server(target, [sys.executable, str(BENCH / "naive_relay.py")], env,
                            ctx.workdir)  # fmt: skip
            ready = await server.start(lambda: wait_tcp(port))
            yield Launched(target, server, url, "", n["queue"], ready)
            return
        own = [n["unrouted"], n["rejected"], n["archive"]]  # the relay's own exchanges and queues
        ctx.topology.track(own, own)
        exchanges.extend(own)
        queues.extend(own)
        extra: dict[str, str] = {}
        if target in ("redis", "workers"):
            extra.update(await redis_extra(ctx, target))
        if target == "workers":
            extra["RELAY_HTTP_WORKERS"] = "2"
        notify = NotifySocket(ctx.workdir)
        env = relay_env(ctx, target, port, notify, **extra)
        ok, message, _ = await check_config(env)
        if not ok:
            raise NotAvailable(f"check-config: {message}")
        server = Server(target, relay_argv(), env, ctx.workdir)
        ready = await server.start(notify.wait_ready)
        if "RELAY_DEDUP_BACKEND" in extra:
            _, health = await clients.get_json(f"http://127.0.0.1:{port}/health")
            backend = (health.get("dedup") or {}).get("backend")
            if backend != "redis":
                raise NotAvailable(
                    f'dedup.backend = "redis" is accepted but /health reports the {backend} '
                    "store (no Redis store on this branch)"
                )
        ctx.ready_times.append(ready)
        launched = Launched(
            target, server, url, ctx.token, n["queue"], ready,
            metrics_url=f"http://127.0.0.1:{port}/metrics" if target != "workers" else None,
        )  # fmt: skip
        try:
            yield launched
        finally:
            await server.stop()
            launched.log = log_summary(server.log_path)
            if len(launched.log) > 1:  # warnings, errors: keep the log
                RESULTS.mkdir(exist_ok=True)
                kept = RESULTS / f"{ctx.run_id}-{target}.log"
                shutil.copyfile(server.log_path, kept)
                launched.log["file"] = str(kept.relative_to(ROOT))
    finally:
        if server is not None:
            await server.stop()
        if notify is not None:
            notify.close()
        await ctx.topology.delete(exchanges, queues)
        if target in ("redis", "workers"):
            try:
                cleanup_redis(ctx, target)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"bench: could not delete the Redis keys of {target}: {exc}")


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


async def paths(launched: Launched) -> dict[str, int] | None:
    """How a retm-relay target's events reached the broker so far, from its /metrics:
    ``published`` (confirmed, counting forwards from the spool), ``spooled``, ``forwarded``,
    ``direct`` = published - forwarded, ``spooled_<reason>`` per reason the relay gave
    (``stalled``, ``queued`` behind spooled events, ``timeout`` ...), and the cumulative bucket
    counts of its own timings (``request_le_<seconds>``: webhook handling, from the request's
    headers to the answer; ``confirm_le_<seconds>``: publish to confirm). None for targets
    without /metrics."""
    if launched.metrics_url is None:
        return None
    async with aiohttp.ClientSession() as session, session.get(launched.metrics_url) as r:
        text = await r.text()
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        timing = TIMINGS.get(name)
        if timing and 'le="' in line and ('route="' not in line or 'route="events"' in line):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            reasons[f"{timing}_le_{le}"] += int(float(line.rsplit(" ", 1)[1]))
            continue
        if name in ("relay_published_total", "relay_spooled_total", "relay_spool_forwarded_total"):
            value = int(float(line.rsplit(" ", 1)[1]))
            totals[name] += value
            if name == "relay_spooled_total" and 'reason="' in line:
                reasons["spooled_" + line.split('reason="', 1)[1].split('"', 1)[0]] += value
    published = totals["relay_published_total"]
    forwarded = totals["relay_spool_forwarded_total"]
    return {
        "published": published,
        "spooled": totals["relay_spooled_total"],
        "forwarded": forwarded,
        "direct": published - forwarded,
        **reasons,
    }


def quantile_bound(counts: dict[str, int], prefix: str, q: float = 0.99) -> float | None:
    """The upper bound (seconds) of the histogram bucket holding the ``q`` quantile of the
    ``<prefix>_le_<seconds>`` counts of ``paths`` (None without samples)."""
    buckets = sorted(
        (float(key.rsplit("_", 1)[1]), n)
        for key, n in counts.items()
        if key.startswith(prefix + "_le_") and not key.endswith("+Inf")
    )
    total = counts.get(f"{prefix}_le_+Inf", 0)
    if not total:
        return None
    for bound, n in buckets:
        if n >= q * total:
            return bound
    return float("inf")


def path_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    """The events of one phase: ``after`` minus ``before`` per counter (empty without
    /metrics)."""
    if before is None or after is None:
        return {}
    return {key: after[key] - before.get(key, 0) for key in after}


async def profile(
    ctx: Context, server: Server, load: Callable[[], Awaitable[dict[str, Any]]], phase: str
) -> dict[str, Any]:
    """Sample ``server`` with py-spy while ``load()`` runs (an extra phase, not counted in the
    tables): collapsed stacks (``--format raw``, which speedscope and flamegraph.pl read) to
    bench/results/profile-RUN-TARGET-PHASE.txt, and a summary of where the time goes
    (bench/hotspots.py). ``ok``: the 2xx answers of ``load`` (for the queue's count)."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{ctx.run_id}-{server.name}-{phase}.txt"
    seconds = ctx.opts.profile_seconds
    spy = await asyncio.create_subprocess_exec(
        *[py_spy, "record", "--pid", str(server.pid), "--rate", "200", "--nonblocking"],
        *["--threads", "--format", "raw", "--output", str(out), "--duration", str(seconds + 1)],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)
    result = await load()
    ok = result.get("ok")
    if ok is None:  # the open loop's summary
        ok = result["warmup_ok"] + sum(
            n for code, n in result["statuses"].items() if code.startswith("2")
        )
    _, err = await spy.communicate()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode()[-500:]}", "ok": ok}
    summary = hotspots.summarize(hotspots.parse(out.read_text()), top=25)
    return {"file": str(out.relative_to(ROOT)), "ok": ok, **summary}
