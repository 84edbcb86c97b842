"""The service: owns the run loop, the listener, signals, systemd notifications and shutdown.

``Relay`` starts and stops one relay (tests use it exactly as ``serve`` does). ``serve`` runs one
until SIGTERM or SIGINT: it stops accepting, lets the requests in flight finish (including their
publishes), closes the broker link last, all within ``http.shutdown_timeout``. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from relay import __version__
from relay.app import HEALTH, SPOOL, make_app
from relay.errors import RelayError
from relay.settings import Settings
from relay.systemd import Notifier

log = structlog.get_logger("relay.service")


class StartupError(RelayError):
    """The relay could not start (port in use, topology mismatch ...); the message says why."""


class Relay:
    """One relay: the aiohttp app on its listener, with its resources.

    ``async with Relay(settings) as relay`` starts it (the broker link is tried, the socket
    listens) and stops it gracefully on exit. ``url`` is the base URL actually bound (port 0
    picks a free port).
    """

    def __init__(self, settings: Settings, **app_options: Any) -> None:
        self.settings = settings
        self.app = make_app(settings, **app_options)
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            auto_decompress=False,  # the ingest stage decompresses, bounded by max_body_bytes
            handle_signals=False,
            shutdown_timeout=settings.http.shutdown_timeout,
        )
        self.addresses: list[tuple[str, int]] = []

    @property
    def url(self) -> str:
        """``http://host:port`` of the first bound address."""
        host, port = self.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    async def start(self) -> None:
        """Open the broker link (raises StartupError on a topology mismatch) and listen
        (StartupError when the address is in use or cannot be bound)."""
        try:
            await self.runner.setup()
        except RelayError as exc:
            await self.runner.cleanup()
            raise StartupError(str(exc)) from None
        http = self.settings.http
        site = web.TCPSite(self.runner, http.host, http.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc}"
            raise StartupError(f"http.host/http.port {http.host}:{http.port} {what}") from None
        server = site._server  # aiohttp has no public accessor for the bound sockets
        sockets = getattr(server, "sockets", None) or []
        self.addresses = [sock.getsockname()[:2] for sock in sockets]
        log.info("relay.listening", url=self.url, version=__version__)

    async def wait_durable(self) -> None:
        """Return once the relay can make events durable: the spool is open (the broker may
        still be away; events are then spooled and forwarded once it is back)."""
        await self.app[SPOOL].opened.wait()

    async def stop(self) -> None:
        """Stop listening, finish the requests in flight, release resources (broker last)."""
        await self.runner.cleanup()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run a relay until ``stop`` is set or SIGTERM/SIGINT arrives; returns the exit code
    (0 after a clean shutdown). Raises StartupError when the relay cannot start."""
    environ = os.environ if environ is None else environ
    stop = stop or asyncio.Event()
    notifier = Notifier(environ)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("relay.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("relay.stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    relay = Relay(settings)
    background: list[asyncio.Task[None]] = []
    try:
        await relay.start()
    except StartupError:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        notifier.close()
        raise
    try:

        async def announce_ready() -> None:
            await relay.wait_durable()
            ready, checks = relay.app[HEALTH].readiness()
            notifier.ready(f"serving on {relay.url}; " + ("ready" if ready else str(checks)))
            log.info("relay.ready", url=relay.url)

        background.append(loop.create_task(announce_ready(), name="relay-ready"))
        background.append(loop.create_task(notifier.watchdog(), name="relay-watchdog"))
        await stop.wait()
        notifier.stopping()
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            async with asyncio.timeout(settings.http.shutdown_timeout + 5):
                await relay.stop()
        except TimeoutError:
            log.error("relay.shutdown_timeout", seconds=settings.http.shutdown_timeout)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        notifier.close()
    log.info("relay.stopped")
    return 0
