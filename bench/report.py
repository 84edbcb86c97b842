"""The report of `make bench`: the table, the ratios and PASS/FAIL per target of issue 5.

Works on the results dictionary the runner builds (and saves as JSON in bench/results/), so a
saved run can be printed again, as text or as the README's markdown table.
"""

from __future__ import annotations

from typing import Any

MB = 1024 * 1024
TARGETS = ("http", "confirm", "naive", "relay", "noarchive", "redis", "workers")
EXTRAS = ("dedup", "spool", "ready")
LABELS = {
    "http": "HTTP ceiling (aiohttp, uvloop)",
    "confirm": "confirm ceiling (aio-pika, no HTTP)",
    "naive": "naive relay (bench/naive_relay.py)",
    "relay": "retm-relay, memory store",
    "noarchive": "retm-relay, memory store, archive off",
    "redis": "retm-relay, Redis store",
    "workers": "retm-relay, Redis, 2 workers",
}
RELAY_TARGETS = ("relay", "redis", "workers")

# Issue 5's targets.
TARGET_RATIO = 1.0
AIM_RATIO = 1.5
TARGET_P99_MS = 10.0
TARGET_MAX_MS = 1000.0
TARGET_DEDUP_RSS_MB = 200.0
TARGET_SPOOL_RATE = 2000.0
TARGET_READY_S = 1.5
CLIENT_LAG_NOTE_MS = 5.0  # the open-loop client's own delay worth a note


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "target",
        "req/s @32",
        "max ms @32",
        "p50 ms @500",
        "p99 ms @500",
        "p99.9 ms @500",
        "max ms @500",
        "CPU s/1k",
        "peak RSS MB",
    ]
    rows = []
    for target in TARGETS:
        r = results["targets"].get(target)
        if r is None:
            continue
        if "na" in r or "error" in r:
            rows.append([r["label"], f"n/a: {r.get('na') or r.get('error')}"])
            continue
        o = r["open"]
        rows.append(
            [
                r["label"] + (" [INVALID]" if r.get("invalid") else ""),
                _fmt(r["closed"]["rate"]),
                _fmt(r["closed"].get("max_ms"), 1),
                _fmt(o.get("p50_ms"), 2),
                _fmt(o.get("p99_ms"), 2),
                _fmt(o.get("p999_ms"), 2),
                _fmt(o.get("max_ms"), 1),
                _fmt(r["cpu_per_1000"], 3),
                _fmt(r["peak_rss_bytes"] / MB, 1),
            ]
        )
    return header, rows


def extra_lines(results: dict[str, Any]) -> list[tuple[str, str]]:
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
    if rd:
        starts = ", ".join(f"{t:.2f}" for t in rd["starts"])
        value = f"{rd['median']:.2f} s median of {len(rd['starts'])} starts ({starts} s)"
        lines.append(("start to READY=1", value))
    return lines


def compute_checks(results: dict[str, Any]) -> list[dict[str, str]]:
    """PASS/FAIL/N/A per target of issue 5."""
    t = results["targets"]
    checks: list[dict[str, str]] = []

    def add(name: str, target: str, value: str, ok: bool | None) -> None:
        status = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        checks.append({"check": name, "target": target, "value": value, "status": status})

    def usable(name: str) -> dict[str, Any] | None:
        r = t.get(name)
        return r if r and "na" not in r and "error" not in r else None

    naive = usable("naive")
    for name in RELAY_TARGETS:
        r = usable(name)
        if r is None:
            if name in t:
                add(f"throughput @32, {LABELS[name]}", ">= 1.0x naive relay", "n/a", None)
            continue
        if naive:
            ratio = r["closed"]["rate"] / naive["closed"]["rate"]
            aim = "" if ratio >= AIM_RATIO else f" (aim {AIM_RATIO}x not reached)"
            add(
                f"throughput @32, {LABELS[name]}",
                f">= {TARGET_RATIO}x naive relay",
                f"{ratio:.2f}x{aim}",
                ratio >= TARGET_RATIO,
            )
        p99 = r["open"].get("p99_ms")
        add(
            f"p99 @500 req/s, {LABELS[name]}",
            f"<= {TARGET_P99_MS:g} ms",
            f"{_fmt(p99, 2)} ms",
            p99 is not None and p99 <= TARGET_P99_MS,
        )
    relay_runs = [usable(name) for name in RELAY_TARGETS]
    maxima = [r["max_ms"] for r in relay_runs if r]
    spool = results.get("spool") or {}
    if spool.get("ingest") and "na" not in spool:
        maxima.append(spool["ingest"]["max_ms"])
    if maxima:
        worst = max(maxima)
        add(
            "no answer over 1 s (every retm-relay run)",
            f"max <= {TARGET_MAX_MS:g} ms",
            f"{worst:.1f} ms",
            worst <= TARGET_MAX_MS,
        )
    d = results.get("dedup")
    if d:
        if "error" in d:
            add("RSS with 1,000,000 dedup keys", "<= 200 MB", "n/a", None)
        else:
            rss = d["rss_bytes"] / MB
            add(
                f"RSS with {d['keys']:,} dedup keys",
                f"<= {TARGET_DEDUP_RSS_MB:g} MB",
                f"{rss:.1f} MB",
                rss <= TARGET_DEDUP_RSS_MB and d["keys"] >= 1_000_000,
            )
    if spool:
        na = "na" in spool or "error" in spool
        ingest = spool.get("ingest_rate")
        drain = spool.get("drain_rate")
        add(
            "spool ingest, broker link cut",
            f">= {TARGET_SPOOL_RATE:,.0f} req/s",
            "n/a" if na else f"{ingest:,.0f} req/s",
            None if na else (ingest or 0) >= TARGET_SPOOL_RATE,
        )
        add(
            "spool drain, broker back",
            f">= {TARGET_SPOOL_RATE:,.0f} msg/s",
            "n/a" if na else f"{_fmt(drain)} msg/s",
            None if na else (drain or 0) >= TARGET_SPOOL_RATE,
        )
    rd = results.get("ready")
    if rd:
        add(
            "start to READY=1 (median)",
            f"<= {TARGET_READY_S:g} s",
            f"{rd['median']:.2f} s",
            rd["median"] <= TARGET_READY_S,
        )
    return checks


def ratios(results: dict[str, Any]) -> list[str]:
    t = results["targets"]

    def rate(name: str) -> float | None:
        r = t.get(name)
        return r["closed"]["rate"] if r and "closed" in r else None

    out = []
    on, off = rate("relay"), rate("noarchive")
    if on and off:
        out.append(f"archive cost: {LABELS['relay']} / {LABELS['noarchive']}: {on / off:.2f}x")
    for name in RELAY_TARGETS:
        mine = rate(name)
        if mine is None:
            continue
        for other in ("naive", "confirm", "http"):
            theirs = rate(other)
            if theirs:
                out.append(f"{LABELS[name]} / {LABELS[other]}: {mine / theirs:.2f}x")
    return out


def render(results: dict[str, Any], markdown: bool = False) -> str:
    header, rows = table_rows(results)
    out: list[str] = []
    if markdown:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in rows:
            cells = row + [""] * (len(header) - len(row))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.extend(f"- {name}: {value}" for name, value in extra_lines(results))
        out.extend(f"- {line}" for line in ratios(results))
        out.append("")
        out.append("| check | target | measured | |")
        out.append("|---|---|---|---|")
        out.extend(
            f"| {c['check']} | {c['target']} | {c['value']} | {c['status']} |"
            for c in results["checks"]
        )
        return "\n".join(out)
    measured = [r for r in rows if len(r) > 2]
    first = max([30, len(header[0]), *(len(r[0]) for r in measured)])
    num = [max([len(header[i]), *(len(r[i]) for r in measured)]) for i in range(1, 9)]
    out.append(
        header[0].ljust(first)
        + "".join(f"  {h:>{w}}" for h, w in zip(header[1:], num, strict=True))
    )
    for row in rows:
        if len(row) == 2:
            out.append(row[0].ljust(first) + "  " + row[1])
        else:
            out.append(
                row[0].ljust(first)
                + "".join(f"  {c:>{w}}" for c, w in zip(row[1:], num, strict=True))
            )
    out.append("")
    width = max((len(name) for name, _ in extra_lines(results)), default=0)
    out.extend(f"{name.ljust(width)}  {value}" for name, value in extra_lines(results))
    out.append("")
    out.extend(ratios(results))
    out.append("")
    w1 = max((len(c["check"]) for c in results["checks"]), default=0)
    w2 = max((len(c["target"]) for c in results["checks"]), default=0)
    out.extend(
        f"{c['status']:<4}  {c['check'].ljust(w1)}  {c['target'].ljust(w2)}  {c['value']}"
        for c in results["checks"]
    )
    out.extend(
        f"INVALID  {LABELS[target]}: {reason}"
        for target in TARGETS
        for reason in (results["targets"].get(target) or {}).get("invalid") or []
    )
    out.extend(
        f"INVALID  spool: {reason}" for reason in (results.get("spool") or {}).get("invalid") or []
    )
    for target in TARGETS:
        lag = ((results["targets"].get(target) or {}).get("open") or {}).get("client_lag_p99_ms")
        if lag is not None and lag > CLIENT_LAG_NOTE_MS:
            out.append(
                f"note: {LABELS[target]}: the open-loop client ran up to {lag:.1f} ms (p99) behind "
                "its schedule; the latencies include that delay"
            )
    for target in RELAY_TARGETS:
        log = (results["targets"].get(target) or {}).get("log") or {}
        noisy = {k: v for k, v in log.items() if k not in ("lines", "file") and v}
        if noisy:
            where = f" ({log['file']})" if "file" in log else ""
            out.append(f"note: {LABELS[target]} logged {noisy} in {log['lines']} lines{where}")
    return "\n".join(out)
