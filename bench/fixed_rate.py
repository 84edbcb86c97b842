"""The fixed-rate part of `make bench`: retm-relay and the naive relay side by side at the rates
RETM really sends.

The naive relay, retm-relay with the memory store and retm-relay with Redis run at the same
time, idle but for the one being measured. For each rate (--rates, and --redis-rate for the
memory store against Redis) the runner makes --rounds rounds, and in each round measures every
target at that rate in turn (the order reversed every other round, so that a slow spell of the
shared machine lands on each of them alike): bench/openloop.py for --open-warmup seconds (not
counted) and then --open-seconds, latency from each request's due time. The rounds of one
target at one rate are pooled: p50/p99/p99.9/max over all their requests, and CPU per event
(the server's process tree, from /proc, over the phase including its warm-up, divided by the
2xx answers of the phase).

For retm-relay it also reads /metrics before and after each phase: events confirmed directly
and events spooled, and its own timings (handling, confirm). With --profile, py-spy then samples
the naive relay and retm-relay for --profile-seconds each at --profile-rate (not counted).

A target that spooled under load, answered anything but 2xx, or whose queue does not hold
exactly one message per 2xx answer is invalid for a comparison.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

from bench import clients
from bench.openloop import summarize
from bench.targets import Context, Launched, NotAvailable, launch, path_delta, paths, profile

#: the targets of this part, in the order of the first round
ORDER = ("naive", "relay", "redis")


def plan(ctx: Context) -> dict[str, tuple[float, ...]]:
    """The rates (req/s) each target is measured at."""
    opts = ctx.opts
    relay_rates = tuple(sorted({*opts.rates, opts.redis_rate}))
    return {"naive": tuple(opts.rates), "relay": relay_rates, "redis": (opts.redis_rate,)}


async def phase(ctx: Context, launched: Launched, rate: float) -> dict[str, Any]:
    """One open loop at ``rate`` against ``launched``: its latencies, CPU and paths."""
    opts, tree = ctx.opts, launched.tree
    before_paths = await paths(launched)
    cpu_before = tree.cpu_seconds()
    result = await clients.openloop(
        launched.url,
        token=launched.token,
        rate=rate,
        seconds=opts.open_seconds,
        warmup=opts.open_warmup,
        raw=True,
    )
    cpu = tree.cpu_seconds() - cpu_before
    result["cpu_seconds"] = round(cpu, 3)
    result["paths"] = path_delta(before_paths, await paths(launched))
    return result


def pool(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one target at one rate as one measurement."""
    latencies = [x / 1000 for p in phases for x in p["latencies_ms"]]
    ok = sum(n for p in phases for code, n in p["statuses"].items() if code.startswith("2"))
    answered = ok + sum(p["warmup_ok"] for p in phases)
    cpu = sum(p["cpu_seconds"] for p in phases)
    totals: dict[str, int] = {}
    for p in phases:
        for key, value in p["paths"].items():
            totals[key] = totals.get(key, 0) + value
    return {
        **summarize(latencies),
        "rounds_p99_ms": [p["p99_ms"] for p in phases],
        "answered_2xx": answered,
        "non2xx": sum(p["non2xx"] for p in phases),
        "statuses": [p["statuses"] for p in phases],
        "errors": [p["errors"] for p in phases if p["errors"]],
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_event": round(cpu / max(1, answered) * 1000, 4),
        "client_lag_p99_ms": max(p["client_lag_p99_ms"] or 0 for p in phases),
        "paths": totals,
    }


async def run_fixed_rates(ctx: Context) -> dict[str, Any]:
    """The whole part: ``{"rates": {target: {rate: pooled}}, "targets": {target: validity}}``
    (see the module docstring)."""
    rates_of = plan(ctx)
    out: dict[str, Any] = {"plan": {t: list(r) for t, r in rates_of.items()}, "targets": {}}
    measured: dict[str, dict[float, list[dict[str, Any]]]] = {t: {} for t in ORDER}
    async with contextlib.AsyncExitStack() as stack:
        running: dict[str, Launched] = {}
        for target in ORDER:
            try:
                running[target] = await stack.enter_async_context(launch(ctx, target))
            except NotAvailable as exc:
                out["targets"][target] = {"na": str(exc)}
        for rate in sorted({r for rs in rates_of.values() for r in rs}):
            for n in range(ctx.opts.rounds):
                order = [t for t in ORDER if t in running and rate in rates_of[t]]
                for target in reversed(order) if n % 2 else order:
                    result = await phase(ctx, running[target], rate)
                    measured[target].setdefault(rate, []).append(result)
        profiles: dict[str, dict[str, Any]] = {}
        if ctx.opts.profile:
            rate = ctx.opts.profile_rate
            for target in ("naive", "relay"):
                if target in running:
                    launched = running[target]
                    profiles[target] = await profile(
                        ctx,
                        launched.server,
                        partial(
                            clients.openloop,
                            launched.url,
                            token=launched.token,
                            rate=rate,
                            seconds=ctx.opts.profile_seconds,
                            warmup=ctx.opts.open_warmup,
                        ),
                        f"at-{rate:g}",
                    )
        for target, launched in running.items():
            pooled = {f"{rate:g}": pool(phases) for rate, phases in measured[target].items()}
            answered = sum(p["answered_2xx"] for p in pooled.values())
            answered += profiles.get(target, {}).get("ok", 0)
            messages = await ctx.topology.count(launched.queue) if launched.queue else None
            out["targets"][target] = {
                "ready_seconds": round(launched.ready_seconds, 3),
                "rates": pooled,
                "answered_2xx": answered,
                "messages": messages,
                "invalid": invalid_reasons(pooled, answered, messages),
            }
            if target in profiles:
                out["targets"][target]["profile"] = profiles[target]
    for target, launched in running.items():
        if launched.log:
            out["targets"][target]["log"] = launched.log
    return out


def invalid_reasons(
    pooled: dict[str, dict[str, Any]], answered: int, messages: int | None
) -> list[str]:
    """Why a target's fixed-rate measurements are not a comparison of the same work."""
    reasons = []
    for rate, p in pooled.items():
        if p["non2xx"]:
            reasons.append(f"@{rate} req/s: {p['non2xx']} requests failed ({p['errors']})")
        spooled = p["paths"].get("spooled")
        if spooled:
            reasons.append(
                f"@{rate} req/s: {spooled} events were spooled under load "
                f"({p['paths'].get('direct', 0)} confirmed directly)"
            )
    if messages is not None and messages != answered:
        reasons.append(f"the queue holds {messages} messages for {answered} 2xx answers")
    return reasons
