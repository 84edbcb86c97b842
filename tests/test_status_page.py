"""The status page (``GET /``) in real headless Chromium (Debian's, driven by Playwright): what it
renders equals ``/health``, it refreshes by itself, and it says when the relay is unready or
gone. Screenshots are kept under the test's tmp dir (``status.png``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import AsyncIterator
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
            f"Number(document.body.dataset.renders || 0) > {after}", timeout=10_000
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
    """How the page must show ``value`` (the page's own rules, restated)."""
    if value is None:
        return "none"
    if fmt == "time":
        import time  # noqa: PLC0415

        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # JavaScript shows 86400.0 as 86400
    return str(value)


def seconds_of(duration: str) -> int:
    """``1h 02m 03s`` -> 3723 (the page's duration format)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"(?:(\d+)d )?(?:(\d+)h )?(?:(\d+)m )?(?:(\d+)s)?", duration)
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
    unroutable, the last RETM error, the (empty) spool, version and uptime. A screenshot is
    taken at that moment."""
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
    for path, (text, fmt) in values.items():
        expected = lookup(health, path)
        if fmt == "duration":
            assert 0 <= expected - seconds_of(text) <= 5, (path, text, expected)
        else:
            assert text == shown(expected, fmt), (path, text, expected)
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
        ("archive", "queue"): names.archive,
        ("archive", "max_age"): "7D",
        ("archive", "error"): "none",
    }
    assert {path: values[path][0] for path in must_show} == must_show
    assert ("uptime_seconds",) in values
    assert values[("archive", "oldest_received_at")][0].endswith("Z")
    assert values[("spool", "events")][0] == "0"
    assert await status.page.query_selector("#spool-na") is None
    assert status.errors == []  # no script error, no Content-Security-Policy violation


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
    assert values[("spool", "bytes")][0] == str(health["spool"]["bytes"])
    assert values[("spool", "full")][0] == "no"
    assert values[("spool", "path")][0] == health["spool"]["path"]
    age_shown = seconds_of(values[("spool", "oldest_age_seconds")][0])
    assert 0 <= health["spool"]["oldest_age_seconds"] - age_shown <= 5
    assert await status.page.query_selector("#spool-na") is None
    assert status.errors == []


async def test_status_page_says_when_the_relay_is_gone(
    names: Names, broker: Broker, browser: Browser, tmp_path: Path
) -> None:
    """When /health stops answering, the page says so and keeps the last values."""
    settings = load_settings(None, relay_environ(names, tmp_path / "state"))
    broker.forget_later(exchanges=(names.exchange, names.unrouted), queues=(names.unrouted,))
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
    assert banner.startswith(f"The relay does not answer {relay.url}/health")
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
