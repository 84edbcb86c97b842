"""The service: owns the run loop, the listener, signals, systemd notifications and shutdown.

``Relay`` starts and stops one relay (tests use it exactly as ``serve`` does). ``serve`` runs one
until SIGTERM or SIGINT: it stops accepting, lets the requests in flight finish (including their
publishes), closes the broker link last, all within ``http.shutdown_timeout``. A second signal
exits at once. SIGHUP reloads the TLS certificate (``relay.tls``) without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
from collections.abc import Mapping
from typing import Any

import structlog

from relay import __version__
from relay.errors import ConfigError, RelayError
from relay.http.app import GUARD, HEALTH, METRICS, SPOOL, make_app
from relay.http.limits import GuardedSite, raise_nofile_limit
from relay.http.protocol import JsonErrorRunner
from relay.http.tls import CertificateStore
from relay.settings import Settings
from relay.statefiles import PRIVATE_DIR
from relay.systemd import Notifier
from relay.workers import WorkerInfo, worker_url

log = structlog.get_logger("relay.service")


#: allocations between two young-generation collections (CPython's default is 700)
GC_THRESHOLD = (20_000, 50, 100)


def _tune_gc() -> None:
    """Move everything allocated at start-up (modules, settings, the app) out of the cyclic
    garbage collector's reach and collect the young generation less often. Each webhook
    allocates hundreds of short-lived objects; with the default threshold the collector ran
    every few requests and cost about 15 % of the throughput (``make bench``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class StartupError(RelayError):
    """The relay could not start (port in use, topology mismatch ...); the message says why."""


class Relay:
    """One relay: the aiohttp app on its listener, with its resources.

    ``async with Relay(settings) as relay`` starts it (the broker link is tried, the socket
    listens) and stops it gracefully on exit. ``url`` is the base URL actually bound (port 0
    picks a free port).

    worker: set when this relay is one of ``http.workers`` (relay/workers.py): it then binds
    ``http.port`` with SO_REUSEPORT, and also listens alone on ``worker.port`` (``worker_url``).
    """

    def __init__(
        self, settings: Settings, *, worker: WorkerInfo | None = None, **app_options: Any
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.app = make_app(settings, worker=worker, **app_options)
        #: the HTTPS certificate (http.tls_cert/http.tls_key), loaded by ``start``
        self.certificates: CertificateStore | None = None
        self.runner = JsonErrorRunner(
            self.app,
            access_log=None,
            auto_decompress=False,  # the ingest stage decompresses, bounded by max_body_bytes
            handle_signals=False,
            shutdown_timeout=settings.http.shutdown_timeout,
            keepalive_timeout=settings.http.keepalive_timeout,  # aiohttp closes idle ones
            lingering_time=settings.http.read_timeout,  # the unread rest of a body, at most
        )
        self.addresses: list[tuple[str, int]] = []
        #: this worker's own URL (None when the relay is one process)
        self.worker_url: str | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (``https://`` with TLS) of the first bound address."""
        host, port = self.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.certificates is not None else "http"
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        """Load the TLS certificate (StartupError naming http.tls_cert or http.tls_key), open
        the broker link (StartupError on a topology mismatch) and listen (StartupError when the
        address is in use or cannot be bound)."""
        http = self.settings.http
        if http.tls_cert is not None and http.tls_key is not None:
            try:
                self.certificates = CertificateStore(http.tls_cert, http.tls_key)
            except ConfigError as exc:
                raise StartupError(str(exc)) from None
            store = self.certificates
            metrics = self.app[METRICS]
            metrics.counter_callback(
                "relay_tls_reloads",
                "Certificate reloads (SIGHUP) that succeeded.",
                lambda: store.reloads,
            )
            metrics.counter_callback(
                "relay_tls_reload_failures",
                "Certificate reloads that failed (the previous certificate stays in use).",
                lambda: store.reload_failures,
            )
        state_dir = self.settings.state.dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        except OSError as exc:
            raise StartupError(
                f"state.dir {str(state_dir)!r} cannot be created: {exc.strerror or exc}"
            ) from None
        try:
            await self.runner.setup()
        except RelayError as exc:
            await self.runner.cleanup()
            raise StartupError(str(exc)) from None
        reuse_port = self.worker is not None or None
        ssl_context = self.certificates.context if self.certificates is not None else None
        guard = self.app[GUARD]
        site = GuardedSite(
            self.runner,
            guard,
            http.host,
            http.port,
            backlog=1024,
            reuse_port=reuse_port,
            ssl_context=ssl_context,
        )
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc}"
            raise StartupError(f"http.host/http.port {http.host}:{http.port} {what}") from None
        self.addresses = site.bound
        if self.worker is not None:
            own = GuardedSite(
                self.runner,
                guard,
                http.host,
                self.worker.port,
                reuse_port=True,
                ssl_context=ssl_context,
            )
            try:
                await own.start()
            except OSError as exc:
                await self.runner.cleanup()
                raise StartupError(
                    f"http.worker_port_base: {http.host}:{self.worker.port} cannot be bound: {exc}"
                ) from None
            self.worker_url = worker_url(http.host, own.bound[0][1], tls=ssl_context is not None)
        log.info("relay.listening", url=self.url, worker_url=self.worker_url, version=__version__)

    def reload(self) -> None:
        """SIGHUP: load the TLS certificate and key again for new connections (established ones
        keep theirs). Other settings need a restart."""
        if self.certificates is None:
            log.info("relay.reload", detail="nothing to reload: no http.tls_cert")
            return
        self.certificates.reload()

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
    worker: WorkerInfo | None = None,
) -> int:
    """Run a relay until ``stop`` is set or SIGTERM/SIGINT arrives; returns the exit code
    (0 after a clean shutdown). Raises StartupError when the relay cannot start.

    worker: set in a worker process (relay/workers.py); it also stops when its supervisor is
    gone (EOF on ``worker.lifeline_fd``)."""
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

    raise_nofile_limit()
    relay = Relay(settings, worker=worker)
    announced = _handle_reload(relay, notifier)
    background: list[asyncio.Task[None]] = []
    try:
        await relay.start()
    except StartupError:
        _forget_handlers(loop, None)
        notifier.close()
        raise
    try:

        async def announce_ready() -> None:
            await relay.wait_durable()
            _tune_gc()
            ready, checks = relay.app[HEALTH].readiness()
            notifier.ready(f"serving on {relay.url}; " + ("ready" if ready else str(checks)))
            announced.set()
            log.info("relay.ready", url=relay.url)

        background.append(loop.create_task(announce_ready(), name="relay-ready"))
        if worker is not None and worker.lifeline_fd is not None:
            _watch_lifeline(worker.lifeline_fd, stop)
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
        _forget_handlers(loop, worker)
        notifier.close()
    log.info("relay.stopped")
    return 0


def _forget_handlers(loop: asyncio.AbstractEventLoop, worker: WorkerInfo | None) -> None:
    """Remove the signal handlers (and a worker's lifeline reader) ``serve`` installed."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(signum)
    if worker is not None and worker.lifeline_fd is not None:
        with contextlib.suppress(OSError):
            loop.remove_reader(worker.lifeline_fd)


def _watch_lifeline(fd: int, stop: asyncio.Event) -> None:
    """Set ``stop`` when the supervisor's end of the lifeline pipe closes (it exited or died)."""
    loop = asyncio.get_running_loop()

    def on_readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not stop.is_set():
                log.warning("relay.supervisor_gone")
                stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)


def _handle_reload(relay: Relay, notifier: Notifier) -> asyncio.Event:
    """Handle SIGHUP from now on (before the start: its default action would end the process);
    returns the event to set once READY=1 was sent."""
    announced = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, _on_reload, relay, notifier, announced
    )
    return announced


def _on_reload(relay: Relay, notifier: Notifier, announced: asyncio.Event) -> None:
    """SIGHUP: reload, telling systemd (RELOADING=1 ... READY=1) once READY=1 was sent."""
    if not announced.is_set():  # READY=1 must not come before the relay is ready
        relay.reload()
        return
    notifier.reloading()
    relay.reload()
    notifier.ready(f"serving on {relay.url}; reloaded")
