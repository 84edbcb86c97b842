"""The report of `make bench`: the summary a user reads, the details, and PASS/FAIL per target.

Works on the results dictionary the runner builds (and saves as JSON in bench/results/), so a
saved run can be printed again, as text or as markdown (``python -m bench.run --markdown``).

Targets (issue 14), all measured side by side in one run, so they are ratios:

- at each fixed rate (100, 400 and 1,000 req/s): retm-relay's p99 at most the naive relay's,
  and its CPU per event at most 0.8x the naive relay's;
- at 32 connections: retm-relay's throughput at least the naive relay's (its share of the
  confirm ceiling is reported alongside);
- with the Redis store at 500 req/s: p99 at most 1.2x the memory store's;

and issue 5's absolute ones: no answer over 1 s, 1,000,000 dedup keys in 200 MB, spool ingest
and drain at 2,000/s, READY=1 within 1.5 s. A check whose measurements are invalid (answers
that were not 2xx, messages lost or extra, events spooled under load) is INVALID, not PASS.
"""

from __future__ import annotations

from typing import Any

from bench.targets import quantile_bound

MB = 1024 * 1024
TARGETS = ("http", "confirm", "naive", "relay", "redis", "workers")
LABELS = {
    "http": "HTTP ceiling (aiohttp, uvloop)",
    "confirm": "confirm ceiling (aio-pika, no HTTP)",
    "naive": "naive relay (bench/naive_relay.py)",
    "relay": "retm-relay, memory store",
    "redis": "retm-relay, Redis store",
    "workers": "retm-relay, Redis, 2 workers",
}
RELAY_TARGETS = ("relay", "redis", "workers")

# Issue 14's targets: ratios of two targets measured in the same run.
P99_RATIO_MAX = 1.0  # retm-relay / naive relay, at each fixed rate
CPU_RATIO_MAX = 0.8  # retm-relay / naive relay, CPU per event at each fixed rate
THROUGHPUT_RATIO_MIN = 1.0  # retm-relay / naive relay, closed loop
REDIS_P99_RATIO_MAX = 1.2  # Redis store / memory store, at --redis-rate
# Issue 5's absolute targets.
TARGET_MAX_MS = 1000.0
TARGET_DEDUP_RSS_MB = 200.0
TARGET_SPOOL_RATE = 2000.0
TARGET_READY_S = 1.5
CLIENT_LAG_NOTE_MS = 5.0  # the open-loop client's own delay worth a note


def own_timings(paths: dict[str, int]) -> str:
    """The relay's own p99 of handling and of the confirm, as the bounds of the histogram
    buckets holding them (``<= 10 / <= 5`` ms), from its /metrics."""
    bounds = [quantile_bound(paths, prefix) for prefix in ("request", "confirm")]
    if bounds[0] is None:
        return "-"
    return " / ".join("-" if b is None else f"<={b * 1000:g}" for b in bounds)


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _usable(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results["targets"].get(name)
    return r if r and "na" not in r and "error" not in r else None


def _at_rate(
    results: dict[str, Any], target: str, rate: str
) -> tuple[dict[str, Any] | None, list[str]]:
    """(the pooled fixed-rate measurement of ``target`` at ``rate``, why it is invalid)."""
    t = ((results.get("rates") or {}).get("targets") or {}).get(target) or {}
    m = (t.get("rates") or {}).get(rate)
    if m is None:
        return None, []
    mine = [r for r in t.get("invalid", []) if r.startswith(f"@{rate} ") or not r.startswith("@")]
    return m, mine


# -- checks --------------------------------------------------------------------------------


def compute_checks(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per target: check, baseline, retm-relay, ratio, target, value, status (PASS,
    FAIL, INVALID, N/A)."""
    checks: list[dict[str, str]] = []

    def add(
        name: str, target: str, value: str, ok: bool | None, *, invalid: list[str] | None = None,
        baseline: str = "", mine: str = "", ratio: str = "",
    ) -> None:  # fmt: skip
        status = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        status = "INVALID" if invalid else status
        checks.append({
            "check": name, "target": target, "value": value, "status": status,
            "baseline": baseline, "mine": mine, "ratio": ratio, "invalid": "; ".join(invalid or []),
        })  # fmt: skip

    plan = (results.get("rates") or {}).get("plan") or {}
    for rate_value in plan.get("naive", []):
        rate = f"{rate_value:g}"
        naive, naive_bad = _at_rate(results, "naive", rate)
        relay, relay_bad = _at_rate(results, "relay", rate)
        bad = [f"naive: {r}" for r in naive_bad] + [f"retm-relay: {r}" for r in relay_bad]
        if naive is None or relay is None or not naive.get("count") or not relay.get("count"):
            add(f"p99 @{rate} req/s", f"<= {P99_RATIO_MAX}x naive", "n/a", None)
            add(f"CPU per event @{rate} req/s", f"<= {CPU_RATIO_MAX}x naive", "n/a", None)
            continue
        ratio = relay["p99_ms"] / naive["p99_ms"]
        add(
            f"p99 @{rate} req/s", f"<= {P99_RATIO_MAX}x naive",
            f"{relay['p99_ms']:.2f} ms vs {naive['p99_ms']:.2f} ms: {ratio:.2f}x",
            ratio <= P99_RATIO_MAX, invalid=bad,
            baseline=f"{naive['p99_ms']:.2f} ms", mine=f"{relay['p99_ms']:.2f} ms",
            ratio=f"{ratio:.2f}x",
        )  # fmt: skip
        ratio = relay["cpu_ms_per_event"] / naive["cpu_ms_per_event"]
        add(
            f"CPU per event @{rate} req/s", f"<= {CPU_RATIO_MAX}x naive",
            f"{relay['cpu_ms_per_event']:.3f} ms vs {naive['cpu_ms_per_event']:.3f} ms: "
            f"{ratio:.2f}x",
            ratio <= CPU_RATIO_MAX, invalid=bad,
            baseline=f"{naive['cpu_ms_per_event']:.3f} ms",
            mine=f"{relay['cpu_ms_per_event']:.3f} ms", ratio=f"{ratio:.2f}x",
        )  # fmt: skip
    naive_closed, relay_closed = _usable(results, "naive"), _usable(results, "relay")
    if "relay" in results["targets"]:
        if naive_closed and relay_closed:
            mine, theirs = relay_closed["closed"]["rate"], naive_closed["closed"]["rate"]
            ratio = mine / theirs
            confirm = _usable(results, "confirm")
            share = (
                f"; {mine / confirm['closed']['rate']:.2f}x of the confirm ceiling"
                if (confirm)
                else ""
            )
            bad = [f"naive: {r}" for r in naive_closed.get("invalid", [])]
            bad += [f"retm-relay: {r}" for r in relay_closed.get("invalid", [])]
            add(
                "req/s @32 connections", f">= {THROUGHPUT_RATIO_MIN}x naive",
                f"{mine:,.0f} vs {theirs:,.0f}: {ratio:.2f}x{share}",
                ratio >= THROUGHPUT_RATIO_MIN, invalid=bad,
                baseline=f"{theirs:,.0f}", mine=f"{mine:,.0f}", ratio=f"{ratio:.2f}x",
            )  # fmt: skip
        else:
            add("req/s @32 connections", f">= {THROUGHPUT_RATIO_MIN}x naive", "n/a", None)
    for rate_value in plan.get("redis", []):
        rate = f"{rate_value:g}"
        memory, memory_bad = _at_rate(results, "relay", rate)
        redis, redis_bad = _at_rate(results, "redis", rate)
        name = f"p99 @{rate} req/s, Redis store (baseline: memory store)"
        if not memory or not redis or not memory.get("count") or not redis.get("count"):
            na = ((results.get("rates") or {}).get("targets") or {}).get("redis", {}).get("na")
            add(name, f"<= {REDIS_P99_RATIO_MAX}x memory", f"n/a{': ' + na if na else ''}", None)
            continue
        ratio = redis["p99_ms"] / memory["p99_ms"]
        bad = [f"memory: {r}" for r in memory_bad] + [f"Redis: {r}" for r in redis_bad]
        add(
            name, f"<= {REDIS_P99_RATIO_MAX}x memory",
            f"{redis['p99_ms']:.2f} ms vs {memory['p99_ms']:.2f} ms: {ratio:.2f}x",
            ratio <= REDIS_P99_RATIO_MAX, invalid=bad,
            baseline=f"{memory['p99_ms']:.2f} ms", mine=f"{redis['p99_ms']:.2f} ms",
            ratio=f"{ratio:.2f}x",
        )  # fmt: skip
    _absolute_checks(results, add)
    cost = results.get("archive") or {}
    if "throughput_ratio" in cost:
        add(
            "archive cost (on / off, median of rounds)", "reported",
            f"throughput {cost['throughput_ratio']:.2f}x, CPU per event {cost['cpu_ratio']:.2f}x",
            None,
        )  # fmt: skip
    for name, target, value, ok in (results.get("memory") or {}).get("checks") or []:
        add(f"memory budget: {name}", target, value, bool(ok))
    return checks


def _absolute_checks(results: dict[str, Any], add: Any) -> None:
    """Issue 5's targets that are not ratios."""
    runs = [_usable(results, name) for name in RELAY_TARGETS]
    maxima = [r["max_ms"] for r in runs if r]
    for name, t in (((results.get("rates") or {}).get("targets")) or {}).items():
        if name in RELAY_TARGETS:
            maxima += [m["max_ms"] for m in (t.get("rates") or {}).values() if m.get("count")]
    spool = results.get("spool") or {}
    if spool.get("ingest") and "na" not in spool:
        maxima.append(spool["ingest"]["max_ms"])
    if maxima:
        worst = max(maxima)
        add(
            "no answer over 1 s (every retm-relay run)", f"max <= {TARGET_MAX_MS:g} ms",
            f"{worst:.1f} ms", worst <= TARGET_MAX_MS, mine=f"{worst:.1f} ms",
        )  # fmt: skip
    d = results.get("dedup")
    if d:
        if "error" in d:
            add("RSS with 1,000,000 dedup keys", "<= 200 MB", "n/a", None)
        else:
            rss = d["rss_bytes"] / MB
            add(
                f"RSS with {d['keys']:,} dedup keys", f"<= {TARGET_DEDUP_RSS_MB:g} MB",
                f"{rss:.1f} MB", rss <= TARGET_DEDUP_RSS_MB and d["keys"] >= 1_000_000,
                mine=f"{rss:.1f} MB",
            )  # fmt: skip
    if spool:
        na = "na" in spool or "error" in spool
        ingest, drain = spool.get("ingest_rate"), spool.get("drain_rate")
        add(
            "spool ingest, broker link cut", f">= {TARGET_SPOOL_RATE:,.0f} req/s",
            "n/a" if na else f"{ingest:,.0f} req/s",
            None if na else (ingest or 0) >= TARGET_SPOOL_RATE,
            invalid=spool.get("invalid"), mine="" if na else f"{ingest:,.0f} req/s",
        )  # fmt: skip
        add(
            "spool drain, broker back", f">= {TARGET_SPOOL_RATE:,.0f} msg/s",
            "n/a" if na else f"{_fmt(drain)} msg/s",
            None if na else (drain or 0) >= TARGET_SPOOL_RATE,
            invalid=spool.get("invalid"), mine="" if na else f"{_fmt(drain)} msg/s",
        )  # fmt: skip
    rd = results.get("ready")
    if rd and "error" not in rd:
        add(
            "start to READY=1 (median)", f"<= {TARGET_READY_S:g} s", f"{rd['median']:.2f} s",
            rd["median"] <= TARGET_READY_S, mine=f"{rd['median']:.2f} s",
        )  # fmt: skip


def verdict(checks: list[dict[str, str]]) -> str:
    """One line over every check: PASS only when each one that was measured passed."""
    counted = [c for c in checks if c["status"] != "N/A"]
    failed = [c["check"] for c in counted if c["status"] == "FAIL"]
    invalid = [c["check"] for c in counted if c["status"] == "INVALID"]
    na = len(checks) - len(counted)
    tail = f" ({na} not measured)" if na else ""
    if invalid:
        return (
            f"INVALID: {len(invalid)} of {len(counted)} checks invalid ({', '.join(invalid)}); "
            + (f"failed: {', '.join(failed)}" if failed else "no other failure")
            + tail
        )
    if failed:
        return f"FAIL: {len(failed)} of {len(counted)} checks failed ({', '.join(failed)}){tail}"
    return f"PASS: all {len(counted)} checks passed{tail}"


# -- the summary ---------------------------------------------------------------------------


def paths_line(results: dict[str, Any]) -> list[str]:
    """Per retm-relay target and phase: events confirmed directly / spooled."""
    out = []
    rates = ((results.get("rates") or {}).get("targets")) or {}
    for target in RELAY_TARGETS:
        parts = []
        for rate, m in ((rates.get(target) or {}).get("rates") or {}).items():
            p = m.get("paths") or {}
            if p:
                parts.append(f"@{rate}: {p.get('direct', 0):,} / {p.get('spooled', 0):,}")
        closed = _usable(results, target)
        if closed and closed.get("paths"):
            p = closed["paths"]
            parts.append(f"@32 conns: {p.get('direct', 0):,} / {p.get('spooled', 0):,}")
        elif closed:
            parts.append("@32 conns: n/a (no single /metrics)")
        if parts:
            out.append(f"  {LABELS[target]}: {'; '.join(parts)}")
    return out


def summary(results: dict[str, Any], markdown: bool = False) -> str:
    """What was compared, the ratios, PASS/FAIL per target and the verdict."""
    m = results.get("machine", {})
    load = f"load average {m.get('loadavg_start', ['?'])[0]} -> {m.get('loadavg_end', ['?'])[0]}"
    opts = results.get("options", {})
    head = (
        f"retm-relay (config/relay.example.toml: auth, dedup, metrics, a log line per webhook, "
        f"the spool) against the naive relay, side by side in one run "
        f"({results.get('run_id', '?')}; {opts.get('rounds', '?')} interleaved rounds of "
        f"{opts.get('open_seconds', '?')} s per fixed rate; {load} on {m.get('cpus', '?')} CPUs). "
        "Ratios are retm-relay / baseline; absolute figures vary with the machine's load."
    )
    if opts.get("relay_settings"):
        changed = ", ".join(f"{k}={v}" for k, v in sorted(opts["relay_settings"].items()))
        head += f" retm-relay ran with these settings changed: {changed}."
    checks = results.get("checks") or compute_checks(results)
    header = ["check", "baseline", "retm-relay", "ratio", "target", "result"]
    rows = [
        [c["check"], c.get("baseline", ""), c.get("mine") or c["value"], c.get("ratio", ""),
         c["target"], c["status"]]
        for c in checks
    ]  # fmt: skip
    notes = [f"{c['check']}: {c['invalid']}" for c in checks if c.get("invalid")]
    confirm, relay = _usable(results, "confirm"), _usable(results, "relay")
    also = []
    if confirm and relay:
        share = relay["closed"]["rate"] / confirm["closed"]["rate"]
        also.append(
            f"retm-relay @32 connections: {share:.2f}x of the confirm ceiling "
            f"({confirm['closed']['rate']:,.0f} confirms/s, no HTTP)"
        )
    naive = _usable(results, "naive")
    for target in ("redis", "workers"):
        r = _usable(results, target)
        if r and naive:
            ratio = r["closed"]["rate"] / naive["closed"]["rate"]
            also.append(
                f"{LABELS[target]} @32 connections: {ratio:.2f}x the naive relay "
                "(reported, no target)"
            )
    lines = paths_line(results)
    if markdown:
        out = [head, "", "| " + " | ".join(header) + " |", "|---|---:|---:|---:|---|---|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
        out += [f"- {a}" for a in also]
        if lines:
            out.append("- events confirmed directly / spooled (from retm-relay's /metrics):")
            out += [f"  - {line.strip()}" for line in lines]
        out += [f"- INVALID {n}" for n in notes]
        out += ["", f"**Verdict: {verdict(checks)}**"]
        return "\n".join(out)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    out = [head, ""]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    out.extend(
        "  ".join(c.ljust(w) if i in (0, 4, 5) else c.rjust(w)
                  for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )  # fmt: skip
    out.append("")
    out.extend(also)
    if lines:
        out.append("events confirmed directly / spooled (from retm-relay's /metrics):")
        out.extend(lines)
    out.extend(f"INVALID  {n}" for n in notes)
    out.append("")
    out.append(f"verdict: {verdict(checks)}")
    return "\n".join(out)


# -- the details ---------------------------------------------------------------------------


def rate_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The fixed-rate measurements, one row per target and rate."""
    header = ["target @ rate", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "p99 per round",
              "CPU ms/event", "direct / spooled", "own p99 ms: handling / confirm"]  # fmt: skip
    rows = []
    part = results.get("rates") or {}
    for target, t in (part.get("targets") or {}).items():
        if "na" in t:
            rows.append([f"{LABELS[target]}", f"n/a: {t['na']}"])
            continue
        for rate, m in (t.get("rates") or {}).items():
            p = m.get("paths") or {}
            rows.append([
                f"{LABELS[target]} @{rate}" + (" [INVALID]" if _at_rate(results, target, rate)[1]
                                                else ""),
                _fmt(m.get("p50_ms"), 2), _fmt(m.get("p99_ms"), 2), _fmt(m.get("p999_ms"), 2),
                _fmt(m.get("max_ms"), 1), ", ".join(f"{x:.2f}" for x in m["rounds_p99_ms"]),
                _fmt(m["cpu_ms_per_event"], 3),
                f"{p.get('direct', 0):,} / {p.get('spooled', 0):,}" if p else "-",
                own_timings(p),
            ])  # fmt: skip
    return header, rows


def closed_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The closed-loop measurements, one row per target."""
    header = ["target", "req/s @32", "max ms @32", "CPU s/1k", "peak RSS MB", "direct / spooled",
              "own p99 ms: handling / confirm"]  # fmt: skip
    rows = []
    for target in TARGETS:
        r = results["targets"].get(target)
        if r is None:
            continue
        if "na" in r or "error" in r:
            rows.append([r["label"], f"n/a: {r.get('na') or r.get('error')}"])
            continue
        p = r.get("paths") or {}
        rows.append([
            r["label"] + (" [INVALID]" if r.get("invalid") else ""),
            _fmt(r["closed"]["rate"]), _fmt(r["closed"].get("max_ms"), 1),
            _fmt(r["cpu_per_1000"], 3), _fmt(r["peak_rss_bytes"] / MB, 1),
            f"{p.get('direct', 0):,} / {p.get('spooled', 0):,}" if p else "-",
            own_timings(p),
        ])  # fmt: skip
    return header, rows


def extra_lines(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The other parts, one line each."""
    lines = []
    d = results.get("dedup")
    if d:
        value = (
            f"n/a: {d['error']}"
            if "error" in d
            else f"{d['rss_bytes'] / MB:.1f} MB (peak {d.get('peak_rss_bytes', 0) / MB:.1f} MB; "
            f"relay process before loading "
            f"{d['rss_baseline_bytes'] / MB:.1f} MB; {d['bytes_per_key']:.0f} bytes/key; "
            f"{d['entries']:,} entries, {d['evictions']} evicted)"
        )
        lines.append((f"RSS with {d.get('keys', 0):,} live dedup keys", value))
    s = results.get("spool")
    if s:
        if "na" in s or "error" in s:
            lines.append(("spool ingest, broker link cut", f"n/a: {s.get('na') or s['error']}"))
            lines.append(("spool drain, broker back", f"n/a: {s.get('na') or s['error']}"))
        else:
            ingest = s["ingest"]
            value = (
                f"{s['ingest_rate']:,.0f} req/s ({ingest['ok']:,} accepted; "
                f"statuses {ingest['statuses']}; max {ingest['max_ms']:.0f} ms)"
            )
            lines.append(("spool ingest, broker link cut", value))
            value = (
                f"{_fmt(s.get('drain_rate'))} msg/s ({s['messages']:,} messages in "
                f"{s['drain_seconds']} s once the link was back; reconnecting took "
                f"{s['reconnect_seconds']} s)"
            )
            lines.append(("spool drain, broker back", value))
    rd = results.get("ready")
    if rd and "error" not in rd:
        starts = ", ".join(f"{t:.2f}" for t in rd["starts"])
        value = f"{rd['median']:.2f} s median of {len(rd['starts'])} starts ({starts} s)"
        lines.append(("start to READY=1", value))
    return lines


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(header) + " |"]
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out += ["| " + " | ".join(row + [""] * (len(header) - len(row))) + " |" for row in rows]
        return out
    full = [r for r in rows if len(r) == len(header)]
    widths = [max([len(header[i]), *(len(r[i]) for r in full)]) for i in range(len(header))]
    out = [
        "  ".join(
            [header[0].ljust(widths[0])]
            + [h.rjust(w) for h, w in zip(header[1:], widths[1:], strict=True)]
        )
    ]
    for row in rows:
        if len(row) != len(header):
            out.append(row[0].ljust(widths[0]) + "  " + "  ".join(row[1:]))
        else:
            out.append(
                "  ".join(
                    [row[0].ljust(widths[0])]
                    + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
                )
            )
    return out  # fmt: skip


def render(results: dict[str, Any], markdown: bool = False) -> str:
    """The details: the fixed-rate table, the closed-loop table, the other parts, the checks'
    invalid reasons and notes; with ``markdown``, the summary first."""
    out: list[str] = []
    if markdown:
        out += [summary(results, markdown=True), ""]
    if results.get("rates", {}).get("error"):
        out.append(f"fixed rates: error: {results['rates']['error']}")
    header, rows = rate_rows(results)
    if rows:
        out += ["Fixed rates (open loop, latency from each request's due time):", ""]
        out += [*_table(header, rows, markdown), ""]
    header, rows = closed_rows(results)
    if rows:
        out += ["Closed loop (wrk, 32 connections):", ""]
        out += [*_table(header, rows, markdown), ""]
    lines = extra_lines(results)
    width = max((len(name) for name, _ in lines), default=0)
    bullet = "- " if markdown else ""
    out.extend(f"{bullet}{name.ljust(0 if markdown else width)}  {value}" for name, value in lines)
    for target in TARGETS:
        for reason in (results["targets"].get(target) or {}).get("invalid") or []:
            out.append(f"{bullet}INVALID  {LABELS[target]}, closed loop: {reason}")
    for target, t in (((results.get("rates") or {}).get("targets")) or {}).items():
        for reason in t.get("invalid") or []:
            out.append(f"{bullet}INVALID  {LABELS[target]}, fixed rates: {reason}")
        for rate, m in (t.get("rates") or {}).items():
            lag = m.get("client_lag_p99_ms")
            if lag is not None and lag > CLIENT_LAG_NOTE_MS:
                out.append(
                    f"{bullet}note: {LABELS[target]} @{rate}: the open-loop client ran up to "
                    f"{lag:.1f} ms (p99) behind its schedule; the latencies include that delay"
                )
    for reason in (results.get("spool") or {}).get("invalid") or []:
        out.append(f"{bullet}INVALID  spool: {reason}")
    for target in RELAY_TARGETS:
        logs = [(results["targets"].get(target) or {}).get("log") or {},
                (((results.get("rates") or {}).get("targets") or {}).get(target) or {}).get("log")
                or {}]  # fmt: skip
        for log in logs:
            noisy = {k: v for k, v in log.items() if k not in ("lines", "file") and v}
            if noisy:
                where = f" ({log['file']})" if "file" in log else ""
                out.append(
                    f"{bullet}note: {LABELS[target]} logged {noisy} in {log['lines']} lines{where}"
                )
    return "\n".join(out)
