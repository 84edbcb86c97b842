"""The status page (``GET /``) in real headless Chromium (Debian's, driven by Playwright): what it
renders equals ``/health`` in human units, the first HTML already holds every figure (also with
JavaScript off), the chart of the last hour shows the answers by outcome, it refreshes by itself,
and it says when the relay is unready or gone. Screenshots are kept under the test's tmp dir
(``status.png``, ``chart.png``, ``first-paint.png``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from relay import __version__
from relay.http.app import ARCHIVE
from relay.service import Relay
from relay.settings import load_settings
from tests.cli import closed_port
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    fixture_bytes,
    relay_environ,
)

# The flags Chromium needs on this kind of machine (no sandbox as root, no network but loopback).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}


def chromium_path() -> str:
    """Debian's Chromium ($RELAY_TEST_CHROMIUM overrides); fail loudly when it is missing."""
    path = os.environ.get("RELAY_TEST_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail(
            "chromium is not installed: `make test` installs it "
            "(deploy/scripts/ensure-chromium.sh), or apt-get install chromium"
        )
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A fresh headless Chromium (its own empty profile) for one test."""
    async with async_playwright() as playwright:
        b = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True
        )
        yield b
        await b.close()


class StatusPage:
    """The status page open in a browser tab, with the console errors it produced."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    @classmethod
    async def open(cls, browser: Browser, url: str) -> StatusPage:
        page = await browser.new_page(viewport=VIEWPORT)
        status = cls(page)
        response = await page.goto(url + "/?refresh=0.5")
        assert response is not None
        assert response.status == 200
        return status

    async def renders(self) -> int:
        return int(await self.page.evaluate("Number(document.body.dataset.renders || 0)"))

    async def wait_render(self, after: int = 0) -> None:
        """Wait until the page rendered /health more than ``after`` times."""
        await self.page.wait_for_function(
            "(after) => Number(document.body.dataset.renders || 0) > after",
            arg=after,
            timeout=10_000,
        )

    async def wait_text(self, path: list[str], text: str) -> None:
        """Wait until the element bound to ``path`` of /health shows ``text``."""
        selector = f"[data-path='{json.dumps(path, separators=(',', ':'))}']"
        await self.page.wait_for_function(
            "([s, t]) => document.querySelector(s)?.textContent === t",
            arg=[selector, text],
            timeout=10_000,
        )

    async def bound_values(self) -> dict[tuple[str, ...], tuple[str, str | None]]:
        """{JSON path: (text shown, format)} for every element bound to /health."""
        items = await self.page.eval_on_selector_all(
            "[data-path]",
            "nodes => nodes.map(n => [n.dataset.path, n.textContent, n.dataset.format || null])",
        )
        return {tuple(json.loads(p)): (t, f) for p, t, f in items}

    async def text(self, selector: str) -> str:
        return (await self.page.text_content(selector)) or ""


def lookup(health: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = health
    for key in path:
        value = value[key]
    return value


def shown(value: Any, fmt: str | None) -> str:
    """How the page must show ``value`` (the page's own rules, restated): ``none``, yes/no,
    counts with thousands separators, times as ``YYYY-MM-DD HH:MM:SS UTC``, sizes in binary
    units with one decimal."""
    if value is None:
        return "none"
    if fmt == "time":
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    if fmt == "bytes":
        units = ["B", "KiB", "MiB", "GiB", "TiB"]
        exponent = 0
        while value >= 1024 ** (exponent + 1) and exponent < 4:
            exponent += 1
        return (
            f"{int(value)} B"
            if exponent == 0
            else f"{value / 1024**exponent:.1f} {units[exponent]}"
        )
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # the broker's nodes
    return str(value)


def assert_matches_health(
    values: dict[tuple[str, ...], tuple[str, str | None]], health: dict[str, Any]
) -> None:
    """Every figure bound to /health shows its value there, by the page's rules."""
    for path, (text, fmt) in values.items():
        expected = lookup(health, path)
        if fmt == "duration":
            assert 0 <= expected - seconds_of(text) <= 5, (path, text, expected)
        else:
            assert text == shown(expected, fmt), (path, text, expected)


async def chart_bars(page: Page) -> list[dict[str, Any]]:
    """Every bar of the chart: outcome, count, minute, drawn height and fill colour."""
    bars: list[dict[str, Any]] = await page.eval_on_selector_all(
        "#chart rect.bar",
        """rects => rects.map(r => ({
            outcome: r.dataset.outcome, count: Number(r.dataset.count),
            minute: Number(r.dataset.minute), height: r.getBBox().height,
            y: r.getBBox().y, fill: getComputedStyle(r).fill}))""",
    )
    return bars


def totals(bars: list[dict[str, Any]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for bar in bars:
        found[bar["outcome"]] = found.get(bar["outcome"], 0) + bar["count"]
    return found


def seconds_of(duration: str) -> int:
    """``1h 02m 03s`` -> 3723, ``1d 00h 00m`` -> 86400 (the page's duration format)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"(?:(\d+)d ?)?(?:(\d+)h ?)?(?:(\d+)m ?)?(?:(\d+)s)?", duration)
    assert parts, duration
    return sum(int(n or 0) * units[u] for n, u in zip(parts.groups(), "dhms", strict=True))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_status_page_shows_what_health_says(
    relay: RunningRelay, broker: Broker, names: Names, browser: Browser, tmp_path: Path
) -> None:
    """After real traffic, every number the page shows equals /health at that moment:
    readiness, broker link, events per minute by type, duplicates, rejections by reason,
    unroutable, the last RETM error, the quarantine, the (empty) spool, version and uptime.
    A screenshot is taken at that moment."""
    await broker.tap(names.exchange, "order.#")  # customer events stay unroutable
    first, second = fixture_bytes("order.created.json"), fixture_bytes("order.refunded.json")
    for body in (first, second, first, fixture_bytes("customer.created.json")):
        assert (await relay.event(body)).status == 200
    assert (await relay.event(first, token="wrong-token")).status == 401
    assert (await relay.event(b"[1]")).status == 400
    assert (await relay.post("/retm/errors", fixture_bytes("error.webhook.json"))).status == 200

    await relay.relay.app[ARCHIVE].look()  # the archive's times as of now (next look: 30 s)
    status = await StatusPage.open(browser, relay.url)
    await status.wait_text(["counters", "duplicate"], "1")
    await status.wait_text(["last_retm_error", "code"], "504")
    screenshot = tmp_path / "status.png"
    await status.page.screenshot(path=str(screenshot), full_page=True)
    values = await status.bound_values()
    health = (await relay.get("/health")).body

    assert png_size(screenshot)[0] == VIEWPORT["width"]
    assert_matches_health(values, health)
    must_show = {
        ("status",): "ready",
        ("version",): __version__,
        ("checks", "broker"): "ok",
        ("broker", "connected"): "yes",
        ("events_per_minute", "order.created"): "1",
        ("events_per_minute", "order.refunded"): "1",
        ("events_per_minute", "customer.created"): "1",
        ("events_per_minute", "delivery.error"): "1",
        ("counters", "published_by_event", "order.created"): "1",
        ("counters", "duplicate"): "1",
        ("counters", "unroutable"): "2",
        ("counters", "rejected_by_reason", "unauthorized"): "1",
        ("counters", "rejected_by_reason", "not_object"): "1",
        ("last_retm_error", "code"): "504",
        ("last_retm_error", "endpoint"): "https://hooks.example.com/retm/events",
        ("quarantine", "exchange"): names.rejected,
        ("quarantine", "kept"): "1",
        ("quarantine", "duplicates"): "0",
        ("quarantine", "last", "reason"): "not_object",
        ("quarantine", "last", "bytes"): "3 B",
        ("archive", "queue"): names.archive,
        ("archive", "max_age"): "7D",
        ("archive", "error"): "none",
    }
    assert {path: values[path][0] for path in must_show} == must_show
    assert ("uptime_seconds",) in values
    assert values[("archive", "oldest_received_at")][0].endswith(" UTC")
    assert values[("spool", "events")][0] == "0"
    assert values[("spool", "max_bytes")] == ("1.0 GiB", "bytes")
    assert values[("dedup", "ttl_seconds")] == ("1d 00h 00m", "duration")
    assert values[("last_retm_error", "received_at")][0].endswith(" UTC")
    assert await status.page.query_selector("#spool-na") is None
    assert status.errors == []  # no script error, no Content-Security-Policy violation

    # The chart: the last hour's answers by outcome, drawn in colour, heights to scale. (The page
    # loaded again without its quick refresh: a refresh swaps the chart out mid-screenshot.)
    await status.page.goto(relay.url + "/?refresh=3600")
    bars = await chart_bars(status.page)
    chart_png = tmp_path / "chart.png"
    await status.page.locator("#chart").screenshot(path=str(chart_png))
    series = health["outcomes_per_minute"]
    top = int(await status.page.get_attribute("#chart", "data-top") or 0)
    assert totals(bars) == {"accepted": 4, "duplicate": 1, "rejected": 2}
    assert {o: sum(series[o]) for o in ("accepted", "duplicate", "rejected", "spooled")} == {
        "accepted": 4, "duplicate": 1, "rejected": 2, "spooled": 0,
    }  # fmt: skip
    assert len(series["accepted"]) == series["minutes"] == 60
    assert top >= max(
        sum(series[o][i] for o in ("accepted", "duplicate", "rejected", "spooled"))
        for i in range(60)
    )
    colours = {"accepted": "rgb(47, 126, 216)", "duplicate": "rgb(142, 111, 216)",
               "rejected": "rgb(217, 83, 79)"}  # fmt: skip
    for bar in bars:
        assert series["start"] <= bar["minute"] < series["start"] + 3600
        assert abs(bar["height"] - bar["count"] / top * 184) < 0.2, bar
        assert bar["fill"] == colours[bar["outcome"]], bar
    legend = await status.page.eval_on_selector_all(
        ".legend li", "items => items.map(i => [i.dataset.outcome, i.textContent])"
    )
    assert legend == [
        ["accepted", "accepted 4"], ["duplicate", "duplicate 1"], ["spooled", "spooled 0"],
        ["rejected", "rejected 2"],
    ]  # fmt: skip
    assert png_size(chart_png)[0] >= 900


async def test_first_html_holds_the_figures_without_any_script(
    relay: RunningRelay, browser: Browser, tmp_path: Path
) -> None:
    """With JavaScript off (a plain screenshot, no fetch), the page as served already shows
    every figure of /health and the chart: server-side rendered."""
    for body in (fixture_bytes("order.created.json"), fixture_bytes("order.created.json")):
        assert (await relay.event(body)).status == 200
    await relay.relay.app[ARCHIVE].look()  # the archive's times as of now (next look: 30 s)
    context = await browser.new_context(java_script_enabled=False, viewport=VIEWPORT)
    page = await context.new_page()
    response = await page.goto(relay.url + "/")
    assert response is not None
    await page.screenshot(path=str(tmp_path / "first-paint.png"), full_page=True)
    status = StatusPage(page)
    values = await status.bound_values()
    health = (await relay.get("/health")).body
    bars = await chart_bars(page)

    assert await page.get_attribute("body", "data-renders") is None
    assert_matches_health(values, health)
    assert values[("status",)][0] == "ready"
    assert values[("counters", "accepted")][0] == "1"
    assert values[("counters", "duplicate")][0] == "1"
    assert values[("events_per_minute", "order.created")][0] == "1"
    assert totals(bars) == {"accepted": 1, "duplicate": 1}
    assert (await page.text_content("#updated") or "").endswith(" UTC")
    await context.close()


async def test_status_page_refreshes_by_itself(relay: RunningRelay, browser: Browser) -> None:
    """An event posted while the page is open appears without a reload."""
    status = await StatusPage.open(browser, relay.url)
    await status.wait_render()
    assert "no events published yet" in await status.text("#events")

    assert (await relay.event(fixture_bytes("customer.deleted.json"))).status == 200

    await status.wait_text(["events_per_minute", "customer.deleted"], "1")
    await status.wait_text(["counters", "accepted"], "1")
    assert status.errors == []


async def test_status_page_shows_unready_reasons_and_the_spool(
    start_relay: StartRelay, browser: Browser, tmp_path: Path
) -> None:
    """With the broker unreachable the page says degraded with /health's reason, and shows the
    spool holding the events accepted meanwhile, with its depth and the oldest event's age."""
    port = closed_port()
    relay = await start_relay(RELAY_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    for reference in ("s-1", "s-2", "s-3"):
        body = b'{"event":"order.created","reference":"%s"}' % reference.encode()
        assert (await relay.event(body)).status == 200

    status = await StatusPage.open(browser, relay.url)
    await status.wait_text(["status"], "degraded")
    await status.wait_text(["spool", "events"], "3")
    await status.page.screenshot(path=str(tmp_path / "status-degraded.png"), full_page=True)
    values = await status.bound_values()
    health = (await relay.get("/health")).body

    reason = health["checks"]["broker"]
    assert reason.startswith("broker link down: ")
    assert values[("checks", "broker")][0] == reason
    assert values[("broker", "connected")][0] == "no"
    assert health["spool"]["events"] == 3
    assert values[("spool", "bytes")] == (shown(health["spool"]["bytes"], "bytes"), "bytes")
    assert values[("spool", "full")][0] == "no"
    assert values[("spool", "path")][0] == health["spool"]["path"]
    assert totals(await chart_bars(status.page)) == {"spooled": 3}
    age_shown = seconds_of(values[("spool", "oldest_age_seconds")][0])
    assert 0 <= health["spool"]["oldest_age_seconds"] - age_shown <= 5
    assert await status.page.query_selector("#spool-na") is None
    assert status.errors == []


async def test_status_page_says_when_the_relay_is_gone(
    names: Names, broker: Broker, browser: Browser, tmp_path: Path
) -> None:
    """When /health stops answering, the page says so and keeps the last values."""
    settings = load_settings(None, relay_environ(names, tmp_path / "state"))
    broker.forget_later(exchanges=(names.exchange, *names.own), queues=names.own)
    relay = Relay(settings)
    await relay.start()
    try:
        status = await StatusPage.open(browser, relay.url)
        await status.wait_render()
    finally:
        await relay.stop()

    await status.page.wait_for_selector("body.unreachable #banner", timeout=10_000)
    assert await status.text("#status") == "unreachable"
    banner = await status.text("#banner")
    assert banner.startswith(f"The relay does not answer {relay.url}/?refresh=0.5 (since ")
    assert await status.text("[data-path='[\"version\"]']") == __version__
    await status.page.screenshot(path=str(tmp_path / "status-gone.png"))
    assert TOKEN not in await status.page.content()


async def test_root_serves_the_page_with_a_strict_policy(relay: RunningRelay) -> None:
    """GET / is the self-contained page (no external URL), under a Content-Security-Policy
    that allows only its own inline code; POST / is 405, as on any read-only route."""
    page = await relay.get("/")
    post = await relay.post("/", b"{}")

    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = page.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; script-src 'sha256-")
    assert "connect-src 'self'" in csp
    assert re.search(r"(src|href)=\"(https?:)?//", page.body) is None
    assert post.status == 405
    assert post.headers["Allow"] == "GET,HEAD" or set(post.headers["Allow"].split(", ")) == {
        "GET",
        "HEAD",
    }


async def test_page_shows_what_retm_sent_as_text_only(relay: RunningRelay) -> None:
    """Values from a request (the error webhook's endpoint and message) are escaped: they show
    as text and can never add markup to the page."""
    hostile = b'{"code": 500, "endpoint": "<b>x</b>", "message": "<script>alert(1)</script>\'"}'
    assert (await relay.post("/retm/errors", hostile)).status == 200

    page = (await relay.get("/")).body

    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert page.count("<script>") == 1  # the page's own refresher only
