"""The status page: ``GET /`` answers one self-contained HTML page for a person, rendered by the
relay from the same details as ``/health``, so the first HTML already holds every figure (a
plain headless screenshot shows them, no script needed).

- Sizes in binary units (``1.0 GiB``), durations as ``1h 02m 03s``, counts with thousands
  separators, every time in UTC and labelled so.
- A chart of webhook answers per minute over the last hour by outcome (accepted, duplicate,
  spooled, rejected), drawn as inline SVG from ``outcomes_per_minute``.
- Each figure taken from ``/health`` sits in an element whose ``data-path`` is its JSON path
  there, and ``data-format`` says how it was shown (``duration``, ``bytes``, ``time``); each
  bar of the chart has ``data-outcome``, ``data-minute`` and ``data-count``. The browser
  test compares them with ``/health``.

The template (``static/status.html``) holds the style and a small script that refreshes the
page by fetching it again and swapping in its ``#top`` and ``#figures`` parts; no external
assets, no build step. It is served with a Content-Security-Policy that allows only its own
inline script and style (by hash) and ``fetch`` to the relay itself. Every value is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from html import escape
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from relay.metrics import CHART_OUTCOMES

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)
HEADER_MARK = "<!--relay:header-->"
MAIN_MARK = "<!--relay:main-->"

# The counters shown, in order: (label, key of /health's counters)
COUNTERS = (
    ("published", "published"),
    ("accepted", "accepted"),
    ("duplicates", "duplicate"),
    ("rejected (4xx)", "rejected"),
    ("unroutable", "unroutable"),
    ("unavailable (503)", "unavailable"),
    ("spooled", "spooled"),
    ("late confirms", "late_confirms"),
)
# Sections of /health shown as tables by the page's own rules, and the rest shown generically.
KNOWN_SECTIONS = {
    "status", "version", "uptime_seconds", "checks", "counters", "last_event_at",
    "events_per_minute", "outcomes_per_minute", "spool", "broker", "dedup", "last_retm_error",
    "quarantine",
}  # fmt: skip


def _csp(html: bytes) -> str:
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for match in _INLINE.finditer(html):
        digest = base64.b64encode(hashlib.sha256(match.group(2)).digest()).decode()
        hashes[match.group(1).decode()].append(f"'sha256-{digest}'")
    script = " ".join(hashes["script"]) or "'none'"
    style = " ".join(hashes["style"]) or "'none'"
    return (
        "default-src 'none'; "
        f"script-src {script}; "
        f"style-src {style}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


# -- Human units --------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``3723`` -> ``1h 02m 03s``; days as ``1d 00h 00m``; under a minute ``42s``."""
    s = int(seconds)
    d, s = divmod(s, 86_400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def size(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``4.0 KiB``, ``1.0 GiB`` (one decimal)."""
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def utc(value: float | str) -> str:
    """A Unix time, or an ISO 8601 UTC string, as ``2026-12-04 20:43:19 UTC``."""
    if isinstance(value, str):
        when = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    else:
        when = datetime.fromtimestamp(value, UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_of(key: str, value: object) -> str | None:
    """How a value named ``key`` is shown: ``duration`` (``*_seconds``), ``bytes``
    (``bytes``, ``*_bytes``), ``time`` (``*_at``, ``*_since``), or None (as it is)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str) or value is None:
        return None
    if isinstance(value, str):
        return "time" if key.endswith(("_at", "_since")) and _is_iso(value) else None
    if key.endswith("_seconds"):
        return "duration"
    if key == "bytes" or key.endswith("_bytes"):
        return "bytes"
    if key.endswith(("_at", "_since")):
        return "time"
    return None


def _is_iso(value: str) -> bool:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def shown(value: object, fmt: str | None) -> str:
    """The text of ``value`` on the page: ``none`` for null, ``yes``/``no``, counts with
    thousands separators, a list of strings joined by commas, and the human units of ``fmt``
    (see ``format_of``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if fmt == "duration" and isinstance(value, int | float):
        return duration(value)
    if fmt == "bytes" and isinstance(value, int | float):
        return size(value)
    if fmt == "time" and isinstance(value, int | float | str):
        return utc(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # the broker's nodes
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


# -- HTML pieces ------------------------------------------------------------------------------


def _attr(value: object) -> str:
    return escape(str(value), quote=True)


def cell(path: Iterable[str], value: object, fmt: str | None = None, cls: str = "") -> str:
    """A ``<td>`` bound to ``path`` of /health, showing ``value``."""
    classes = " ".join(c for c in (cls, "none" if value is None else "") if c)
    attrs = f" data-path='{_attr(orjson.dumps(list(path)).decode())}'"
    if fmt:
        attrs += f' data-format="{fmt}"'
    if classes:
        attrs += f' class="{classes}"'
    return f"<td{attrs}>{escape(shown(value, fmt))}</td>"


def key_row(label: str, path: list[str], value: object, cls: str = "wrap") -> str:
    """A two-column row: label, and the value at ``path`` with the format its key implies."""
    fmt = format_of(path[-1], value)
    if fmt == "time":
        cls = "wrap"
    elif isinstance(value, int | float) and not isinstance(value, bool):
        cls = "num" + (" big" if "big" in cls else "")
    return f'<tr><td class="key">{escape(label)}</td>{cell(path, value, fmt, cls)}</tr>'


def table(table_id: str, rows: list[str], empty: str) -> str:
    body = "".join(rows) or f'<tr><td class="none">{escape(empty)}</td></tr>'
    return f'<table id="{table_id}">{body}</table>'


def section(title: str, content: str, *, wide: bool = False, extra: str = "") -> str:
    cls = ' class="wide"' if wide else ""
    return f"<section{cls}><h2>{escape(title)}{extra}</h2>{content}</section>"


def _label(key: str) -> str:
    """``max_bytes`` -> ``max size``, ``ttl_seconds`` -> ``ttl``, ``in_flight`` -> ``in flight``."""
    if key == "bytes":
        return "size"
    return key.removesuffix("_seconds").replace("_bytes", "_size").replace("_", " ")


def flat_rows(name: str, data: Mapping[str, Any], skip: Iterable[str] = ()) -> list[str]:
    """One row per scalar of a /health section (nested objects are left out)."""
    skipped = set(skip)
    return [
        key_row(_label(k), [name, k], v)
        for k, v in data.items()
        if k not in skipped and (v is None or not isinstance(v, dict | list))
    ]


# -- The chart --------------------------------------------------------------------------------

CHART_W, CHART_H = 960, 230
PLOT_X, PLOT_TOP, PLOT_BOTTOM = 46, 12, 196  # left edge, top and bottom of the bars' area


def _nice_ceiling(n: int) -> int:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``n`` (at least 1)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= n:
                return m * step
        step *= 10


def chart(series: Mapping[str, Any]) -> str:
    """The inline SVG of webhook answers per minute by outcome, stacked, oldest minute left;
    x labels every ten minutes (UTC), y from 0 to a round maximum."""
    minutes = int(series["minutes"])
    start = int(series["start"])
    counts = {o: list(series.get(o) or [0] * minutes) for o in CHART_OUTCOMES}
    totals = [sum(counts[o][i] for o in CHART_OUTCOMES) for i in range(minutes)]
    top = _nice_ceiling(max(totals, default=0))
    height = PLOT_BOTTOM - PLOT_TOP
    slot = (CHART_W - PLOT_X - 8) / minutes
    svg = (
        f'<svg id="chart" class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" '
        f'aria-label="Webhook answers per minute over the last hour, by outcome (UTC)" '
        f'data-top="{top}" data-start="{start}">'
    )
    parts = [svg]
    for fraction in (0, 0.5, 1):
        y = PLOT_BOTTOM - fraction * height
        parts.append(
            f'<line class="grid" x1="{PLOT_X}" y1="{y:.1f}" x2="{CHART_W - 8}" y2="{y:.1f}"/>'
        )
        label = f"{top * fraction:g}"
        parts.append(f'<text x="{PLOT_X - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for i in range(minutes):
        minute = start + 60 * i
        x = PLOT_X + i * slot + 1
        base = float(PLOT_BOTTOM)
        stamp = time.strftime("%H:%M", time.gmtime(minute))
        for outcome in CHART_OUTCOMES:
            n = counts[outcome][i]
            if not n:
                continue
            h = n / top * height
            base -= h
            parts.append(
                f'<rect class="bar {outcome}" x="{x:.1f}" y="{base:.1f}" '
                f'width="{slot - 2:.1f}" height="{h:.1f}" data-outcome="{outcome}" '
                f'data-minute="{minute}" data-count="{n}">'
                f"<title>{stamp} UTC: {n:,} {outcome}</title></rect>"
            )
        if i % 10 == 0 or i == minutes - 1:
            parts.append(
                f'<text x="{x + (slot - 2) / 2:.1f}" y="{PLOT_BOTTOM + 16}" '
                f'text-anchor="middle">{stamp}</text>'
            )
    if not any(totals):
        parts.append(
            f'<text class="empty" x="{(CHART_W + PLOT_X) / 2:.0f}" y="{PLOT_TOP + height / 2:.0f}" '
            'text-anchor="middle">no webhooks in the last hour</text>'
        )
    parts.append(
        f'<text x="{CHART_W - 8}" y="{CHART_H - 4}" text-anchor="end">minute (UTC)</text></svg>'
    )
    legend = "".join(
        f'<li class="{o}" data-outcome="{o}" data-total="{sum(counts[o])}">'
        f"{o} <b>{sum(counts[o]):,}</b></li>"
        for o in CHART_OUTCOMES
    )
    return f'<ul class="legend">{legend}</ul>' + "".join(parts)


# -- The page ---------------------------------------------------------------------------------


def render_header(h: Mapping[str, Any], now: float) -> str:
    """``<header id="top">``: readiness pill, version, uptime, when rendered (UTC)."""
    status = str(h.get("status", "unknown"))
    pill = "ok" if status == "ready" else "bad"
    return (
        '<header id="top">'
        "<h1>retm-relay</h1>"
        f'<span id="status" class="pill {pill}" data-path=\'["status"]\'>{escape(status)}</span>'
        f'<span class="meta">version <b data-path=\'["version"]\'>'
        f"{escape(str(h.get('version', '')))}</b></span>"
        f'<span class="meta">uptime <b id="uptime" data-path=\'["uptime_seconds"]\' '
        f'data-format="duration">{duration(float(h.get("uptime_seconds", 0)))}</b></span>'
        f'<span class="meta">updated <b id="updated">'
        f"{time.strftime('%H:%M:%S', time.gmtime(now))} UTC</b></span>"
        "</header>"
    )


def render_main(h: Mapping[str, Any]) -> str:
    """``<main id="figures">``: every section of the page."""
    out: list[str] = []
    checks = h.get("checks") or {}
    out.append(
        section(
            "Readiness",
            table(
                "checks",
                [
                    key_row(name, ["checks", name], r, "ok" if r == "ok" else "bad wrap")
                    for name, r in checks.items()
                ],
                "no readiness checks",
            ),
        )
    )
    broker = h.get("broker") or {}
    broker_rows = []
    for key, label in (
        ("connected", "connected"),
        ("address", "address"),
        ("nodes", "nodes"),
        ("failovers", "failovers"),
        ("connected_since", "connected since"),
        ("reconnects", "reconnects"),
        ("last_error", "last error"),
    ):
        if key in broker:
            value = broker[key]
            cls = {"connected": "ok" if value else "bad", "last_error": "bad wrap" if value else ""}
            broker_rows.append(key_row(label, ["broker", key], value, cls.get(key, "wrap")))
    out.append(section("Broker link", table("broker", broker_rows, "n/a")))

    counters = h.get("counters") or {}
    out.append(
        section(
            "Webhooks and events",
            table(
                "counters",
                [
                    key_row(label, ["counters", key], counters[key])
                    for label, key in COUNTERS
                    if key in counters
                ],
                "no counters",
            ),
        )
    )
    series = h.get("outcomes_per_minute")
    if isinstance(series, dict):
        out.append(section("Webhooks per minute, last hour (UTC)", chart(series), wide=True))
    out.append(_events_section(h, counters))
    reasons = counters.get("rejected_by_reason") or {}
    out.append(
        section(
            "Rejected by reason",
            table(
                "rejected",
                [
                    key_row(r, ["counters", "rejected_by_reason", r], reasons[r])
                    for r in sorted(reasons)
                ],
                "nothing rejected",
            ),
        )
    )
    out.append(_spool_section(h.get("spool")))
    error = h.get("last_retm_error")
    error_rows = []
    if isinstance(error, dict):
        for key, label in (
            ("received_at", "received"),
            ("code", "code"),
            ("endpoint", "endpoint"),
            ("message", "message"),
        ):
            error_rows.append(
                key_row(label, ["last_retm_error", key], error.get(key), "bad" * (key == "code"))
            )
    out.append(section("Last RETM error webhook", table("retm-error", error_rows, "none received")))
    out.append(_quarantine_section(h.get("quarantine")))
    dedup = h.get("dedup")
    out.append(
        section("Dedup", table("dedup", flat_rows("dedup", dedup), "n/a"))
        if isinstance(dedup, dict)
        else section("Dedup", table("dedup", [], "n/a"))
    )
    for name, data in h.items():
        if name not in KNOWN_SECTIONS and isinstance(data, dict):
            title = name.replace("_", " ").capitalize()
            out.append(section(title, table(f"section-{name}", flat_rows(name, data), "n/a")))
    return '<main id="figures">' + "".join(out) + "</main>"


def _events_section(h: Mapping[str, Any], counters: Mapping[str, Any]) -> str:
    per_minute = h.get("events_per_minute") or {}
    totals = counters.get("published_by_event") or {}
    last_at = h.get("last_event_at") or {}
    names = sorted({*per_minute, *totals})
    rows = []
    if names:
        rows.append(
            '<tr><th>event type</th><th class="num">last minute</th>'
            '<th class="num">since start</th><th class="num">last published</th></tr>'
        )
    for name in names:
        at = last_at.get(name)
        rows.append(
            f'<tr><td class="wrap">{escape(name)}</td>'
            + cell(["events_per_minute", name], per_minute.get(name, 0), None, "num")
            + cell(["counters", "published_by_event", name], totals.get(name, 0), None, "num")
            + cell(["last_event_at", name], at, "time" if at else None, "num")
            + "</tr>"
        )
    total = sum(per_minute.values())
    return section(
        "Events published by event type",
        table("events", rows, "no events published yet"),
        wide=True,
        extra=f' <span id="rate-total" class="meta">· {total:,} in the last minute</span>',
    )


def _quarantine_section(quarantine: object) -> str:
    """The quarantine: authenticated bodies refused as not JSON objects, kept on
    ``amqp.rejected_exchange`` (``/health``'s ``quarantine``)."""
    rows: list[str] = []
    if isinstance(quarantine, dict):
        rows += [
            key_row("exchange", ["quarantine", "exchange"], quarantine.get("exchange")),
            key_row("kept", ["quarantine", "kept"], quarantine.get("kept")),
            key_row(
                "retries recognised", ["quarantine", "duplicates"], quarantine.get("duplicates")
            ),
        ]
        last = quarantine.get("last")
        if isinstance(last, dict):
            rows += [
                key_row("last reason", ["quarantine", "last", "reason"], last.get("reason"), "bad"),
                key_row(
                    "last received", ["quarantine", "last", "received_at"], last.get("received_at")
                ),
                key_row("last size", ["quarantine", "last", "bytes"], last.get("bytes")),
            ]
    return section("Quarantine (refused bodies kept)", table("quarantine", rows, "n/a"))


def _spool_section(spool: object) -> str:
    if not isinstance(spool, dict):
        rows = [
            '<tr><td class="key">depth</td><td id="spool-na" class="none">n/a</td></tr>',
            '<tr><td class="key">age</td><td class="none">n/a</td></tr>',
        ]
        return section("Spool", table("spool", rows, ""))
    rows = []
    if "events" in spool:
        rows.append(key_row("depth (events)", ["spool", "events"], spool["events"], "big"))
    if "oldest_age_seconds" in spool:
        rows.append(
            key_row(
                "oldest event's age", ["spool", "oldest_age_seconds"], spool["oldest_age_seconds"]
            )
        )
    rows += flat_rows("spool", spool, skip=("events", "oldest_age_seconds"))
    return section("Spool", table("spool", rows, "empty spool section"))


class StatusPage:
    """The status page's template, read once from the package, and its handler.

    details: the provider of ``/health``'s data (``Health.details``). clock: wall-clock
    seconds, for the page's "updated" time.
    """

    def __init__(
        self, details: Callable[[], Mapping[str, Any]], clock: Callable[[], float] = time.time
    ) -> None:
        template = resources.files("relay.http").joinpath("static/status.html").read_text()
        self.head, rest = template.split(HEADER_MARK)
        self.middle, self.tail = rest.split(MAIN_MARK)
        self.details = details
        self.clock = clock
        self.headers = {
            "Content-Security-Policy": _csp(template.encode()),
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    def render(self) -> str:
        """The whole page with the current figures."""
        h = self.details()
        return self.head + render_header(h, self.clock()) + self.middle + render_main(h) + self.tail

    async def handler(self, _: web.Request) -> web.Response:
        """``GET /``: the status page (text/html, UTF-8), rendered now."""
        return web.Response(
            text=self.render(), content_type="text/html", charset="utf-8", headers=self.headers
        )
