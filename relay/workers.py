"""Several workers on one host: ``http.workers = N`` runs N relay processes on one port.

``retm-relay serve`` with ``http.workers`` > 1 becomes a small supervisor (``Supervisor``) that
starts N workers, each the same ``serve`` command in a process of its own, and presents them to
systemd as one service:

- **One port**: the supervisor binds ``http.host:http.port`` with SO_REUSEPORT without listening
  (this resolves port 0 and keeps the port reserved across worker restarts); every worker listens
  on it with SO_REUSEPORT and the kernel spreads connections over them (Linux).
- **One port per worker**: worker n also listens on ``worker_port_base + n`` (reserved the same
  way), so that ``/metrics``, ``/health`` and ``/readyz`` there are that worker's alone.
- **systemd**: each worker gets its own notify socket from the supervisor (``NOTIFY_SOCKET``), so
  the worker code is the one-process code: the supervisor sends ``READY=1`` once every worker
  sent it, relays the watchdog (a worker that stops pinging is killed and restarted), and is the
  only process that talks to systemd (``NotifyAccess=main`` stays right).
- **Signals**: SIGTERM or SIGINT is forwarded once to every worker, which stops gracefully; a
  second signal is forwarded again, which makes the workers exit at once. SIGHUP
  (``systemctl reload``) goes to every ready worker, which reloads its TLS certificate. Workers
  run in their own session so that a terminal's Ctrl-C reaches only the supervisor. The unit
  needs ``KillMode=mixed`` so that systemd signals only the supervisor first.
- **Restarts**: a worker that exits on its own after start-up is restarted with backoff (0.5 s
  doubling to 10 s); one that fails before every worker was ready stops the whole start (exit 1).
- **Lifeline**: each worker holds the read end of a pipe whose write end only the supervisor
  holds; if the supervisor dies (even by SIGKILL) the worker reads EOF and stops gracefully.

A worker learns its place from ``RETM_RELAY_WORKER`` (``WorkerInfo``); ``make_app`` keeps it in
``app[WORKER]`` so that state which must not be shared can be named per worker (``state_name``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from relay.errors import RelayError
from relay.settings import Settings
from relay.systemd import Notifier

log = structlog.get_logger("relay.workers")

WORKER_ENV = "RETM_RELAY_WORKER"
RESTART_MIN, RESTART_MAX = 0.5, 10.0
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class WorkerError(RelayError):
    """The workers could not be started (port in use, a worker failed at start-up ...)."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker's place: ``index`` in [0, ``count``), its own ``port`` (``/metrics`` and
    ``/health`` of this worker alone), and ``lifeline_fd``, the pipe whose EOF means the
    supervisor is gone."""

    index: int
    count: int
    port: int
    lifeline_fd: int | None = None

    def to_environ(self) -> str:
        """The value of ``RETM_RELAY_WORKER`` (``index=0,count=2,port=8081,lifeline=5``)."""
        lifeline = "" if self.lifeline_fd is None else str(self.lifeline_fd)
        return f"index={self.index},count={self.count},port={self.port},lifeline={lifeline}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerInfo | None:
        """The worker described by ``RETM_RELAY_WORKER``, or None when this process is not a
        worker. Raises WorkerError when the variable is malformed."""
        raw = environ.get(WORKER_ENV)
        if not raw:
            return None
        try:
            fields = dict(part.split("=", 1) for part in raw.split(","))
            lifeline = fields.get("lifeline", "")
            info = cls(
                int(fields["index"]),
                int(fields["count"]),
                int(fields["port"]),
                int(lifeline) if lifeline else None,
            )
        except (KeyError, ValueError):
            raise WorkerError(f"{WORKER_ENV} is malformed: {raw!r}") from None
        if not 0 <= info.index < info.count:
            raise WorkerError(f"{WORKER_ENV} is malformed: {raw!r}")
        return info

    def status(self) -> dict[str, Any]:
        """The ``worker`` section of ``/health``."""
        return {"index": self.index, "count": self.count, "pid": os.getpid(), "port": self.port}


def state_name(worker: WorkerInfo | None, stem: str, suffix: str) -> str:
    """The file name in ``state.dir`` of state that must not be shared between workers:
    ``spool.db`` for a relay of one process, ``spool-<index>.db`` for worker ``index``."""
    return f"{stem}{suffix}" if worker is None else f"{stem}-{worker.index}{suffix}"


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Bind (without listening) every address of ``host`` on ``port`` with SO_REUSEPORT, as the
    workers will; returns the port (chosen by the kernel when ``port`` is 0) and the sockets,
    which keep it reserved until closed. Raises OSError (EADDRINUSE ...)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str | int]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return port, sockets


def worker_url(host: str, port: int, *, tls: bool = False) -> str:
    """``http://host:port`` (``https://`` with ``tls``), with brackets around an IPv6 host."""
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@dataclass(eq=False)
class _Slot:
    """One worker position: its own port and notify socket survive its restarts."""

    index: int
    port: int
    notify: socket.socket
    notify_path: str
    process: asyncio.subprocess.Process | None = None
    lifeline: int | None = None
    ready: bool = False
    exits: list[int] = field(default_factory=list)
    backoff: float = RESTART_MIN
    restart: asyncio.TimerHandle | None = None
    watchdog: asyncio.TimerHandle | None = None
    waiter: asyncio.Task[None] | None = None


class Supervisor:
    """Runs ``settings.http.workers`` relay processes as one service (see the module docstring).

    command: the worker's command line (``python -m relay serve --config PATH``).
    environ: the environment the workers inherit (``NOTIFY_SOCKET`` and ``WATCHDOG_*`` are the
    supervisor's own and replaced per worker).
    """

    def __init__(
        self, settings: Settings, command: Sequence[str], environ: Mapping[str, str]
    ) -> None:
        self.settings = settings
        self._tls = settings.http.tls_cert is not None
        self.command = list(command)
        self.environ = dict(environ)
        self.port = 0
        self.slots: list[_Slot] = []
        self._notifier = Notifier(environ)
        self._watchdog_usec = (
            int(environ["WATCHDOG_USEC"]) if self._notifier.watchdog_interval else None
        )
        self._reserved: list[socket.socket] = []
        self._own_ports: list[int] = []
        self._spawning: set[asyncio.Task[None]] = set()
        self._runtime_dir = ""
        self._stop = asyncio.Event()
        self._announced = False
        self._stopping = False
        self._exit_code = 0

    @property
    def url(self) -> str:
        """The shared URL every worker listens on."""
        return worker_url(self.settings.http.host, self.port, tls=self._tls)

    async def run(self) -> int:
        """Start the workers, run until SIGTERM/SIGINT, stop them; returns the exit code (0
        after a clean stop, 1 when a worker failed at start-up or did not stop cleanly).
        Raises WorkerError when a port cannot be reserved."""
        loop = asyncio.get_running_loop()
        try:
            self._reserve_ports()
            self._runtime_dir = tempfile.mkdtemp(prefix="retm-relay-")
            for index, port in enumerate(self._own_ports):
                path = os.path.join(self._runtime_dir, f"worker-{index}")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.bind(path)
                sock.setblocking(False)
                slot = _Slot(index, port, sock, path)
                self.slots.append(slot)
                loop.add_reader(sock.fileno(), self._on_notify, slot)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)
            watchdog = loop.create_task(self._notifier.watchdog(), name="workers-watchdog")
            log.info(
                "workers.starting",
                url=self.url,
                workers=len(self.slots),
                worker_urls=[
                    worker_url(self.settings.http.host, s.port, tls=self._tls) for s in self.slots
                ],
            )
            for slot in self.slots:
                await self._spawn(slot)
            await self._stop.wait()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await self._shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self._cleanup()
        log.info("workers.stopped", exit_code=self._exit_code)
        return self._exit_code

    # -- start-up -----------------------------------------------------------------------------

    def _reserve_ports(self) -> None:
        http = self.settings.http
        try:
            self.port, sockets = reserve_port(http.host, http.port)
        except OSError as exc:
            raise WorkerError(f"http.host/http.port {http.host}:{http.port}: {exc}") from None
        self._reserved.extend(sockets)
        base = http.worker_port_base or (self.port + 1 if http.port else 0)
        for index in range(http.workers):
            wanted = base + index if base else 0
            try:
                port, sockets = reserve_port(http.host, wanted)
            except OSError as exc:
                raise WorkerError(
                    f"http.worker_port_base: worker {index}'s port {http.host}:{wanted}: {exc}"
                ) from None
            self._reserved.extend(sockets)
            self._own_ports.append(port)

    async def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping or self._stop.is_set():
            return
        read_end, write_end = os.pipe()
        info = WorkerInfo(slot.index, len(self.slots), slot.port, lifeline_fd=read_end)
        environ = {k: v for k, v in self.environ.items() if k not in _SYSTEMD_ENV}
        environ.update(
            {
                "NOTIFY_SOCKET": slot.notify_path,
                "RELAY_HTTP_PORT": str(self.port),
                WORKER_ENV: info.to_environ(),
            }
        )
        if self._watchdog_usec:
            environ["WATCHDOG_USEC"] = str(self._watchdog_usec)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                env=environ,
                pass_fds=(read_end,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            os.close(write_end)
            log.error("workers.spawn_failed", worker=slot.index, error=str(exc))
            self._exited(slot, None)
            return
        finally:
            os.close(read_end)
        slot.process, slot.lifeline, slot.ready = process, write_end, False
        log.info("workers.worker_started", worker=slot.index, pid=process.pid)
        slot.waiter = asyncio.get_running_loop().create_task(self._wait(slot, process))

    def _spawn_later(self, slot: _Slot) -> None:
        task = asyncio.get_running_loop().create_task(self._spawn(slot))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _wait(self, slot: _Slot, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if slot.lifeline is not None:
            os.close(slot.lifeline)
            slot.lifeline = None
        if slot.watchdog is not None:
            slot.watchdog.cancel()
            slot.watchdog = None
        slot.process, slot.ready = None, False
        self._exited(slot, code)

    def _exited(self, slot: _Slot, code: int | None) -> None:
        if code is not None:
            slot.exits.append(code)
        if self._stopping:
            if code != 0:
                log.warning("workers.worker_stopped_uncleanly", worker=slot.index, exit_code=code)
                self._exit_code = 1
            return
        if not self._announced:
            log.error("workers.start_failed", worker=slot.index, exit_code=code)
            self._exit_code = 1
            self._stop.set()
            return
        log.warning(
            "workers.worker_exited",
            worker=slot.index,
            exit_code=code,
            restart_in_seconds=slot.backoff,
        )
        self._notifier.status(self._status_line())
        slot.restart = asyncio.get_running_loop().call_later(slot.backoff, self._spawn_later, slot)
        slot.backoff = min(slot.backoff * 2, RESTART_MAX)

    # -- notifications from the workers -------------------------------------------------------

    def _on_notify(self, slot: _Slot) -> None:
        while True:
            try:
                data = slot.notify.recv(4096)
            except OSError:  # BlockingIOError: nothing more to read
                return
            lines = data.decode(errors="replace").splitlines()
            if "READY=1" in lines and slot.process is not None and not slot.ready:
                slot.ready = True
                slot.backoff = RESTART_MIN
                self._arm_watchdog(slot)
                self._worker_ready(slot)
            if "WATCHDOG=1" in lines and slot.ready:
                self._arm_watchdog(slot)

    def _worker_ready(self, slot: _Slot) -> None:
        pid = slot.process.pid if slot.process else None
        log.info("workers.worker_ready", worker=slot.index, pid=pid)
        if self._announced:
            self._notifier.status(self._status_line())
            return
        if all(s.ready for s in self.slots):
            self._announced = True
            self._notifier.ready(self._status_line())
            log.info(
                "workers.ready",
                url=self.url,
                workers=[
                    {
                        "index": s.index,
                        "pid": s.process.pid if s.process else None,
                        "url": worker_url(self.settings.http.host, s.port, tls=self._tls),
                    }
                    for s in self.slots
                ],
            )

    def _status_line(self) -> str:
        ready = sum(s.ready for s in self.slots)
        return f"{ready} of {len(self.slots)} workers ready on {self.url}"

    def _arm_watchdog(self, slot: _Slot) -> None:
        if self._watchdog_usec is None:
            return
        if slot.watchdog is not None:
            slot.watchdog.cancel()
        slot.watchdog = asyncio.get_running_loop().call_later(
            self._watchdog_usec / 1_000_000, self._stuck, slot
        )

    def _stuck(self, slot: _Slot) -> None:
        slot.watchdog = None
        if slot.process is not None and slot.process.returncode is None:
            log.error("workers.worker_stuck", worker=slot.index, pid=slot.process.pid)
            with contextlib.suppress(ProcessLookupError):
                slot.process.kill()

    # -- stopping -----------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            log.warning("workers.forced_stop", signal=name)
            self._signal_workers(signal.SIGTERM)  # a second signal: workers exit at once
            return
        log.info("workers.stopping", signal=name)
        self._stop.set()

    def _on_reload(self) -> None:
        """SIGHUP (``systemctl reload``): every ready worker reloads its TLS certificate. A worker
        still starting may not have its own SIGHUP handler yet (the signal would end it); it
        reads the current files as it starts anyway."""
        ready = [s for s in self.slots if s.ready and s.process and s.process.returncode is None]
        log.info("workers.reloading", workers=[s.index for s in ready])
        for slot in ready:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGHUP)

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    async def _shutdown(self) -> None:
        self._stopping = True
        self._notifier.stopping()
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        if self._spawning:  # a restart under way: let it finish, then stop it with the rest
            await asyncio.wait(self._spawning)
        self._signal_workers(signal.SIGTERM)
        waiters = [s.waiter for s in self.slots if s.waiter is not None and not s.waiter.done()]
        if not waiters:
            return
        _, pending = await asyncio.wait(waiters, timeout=self.settings.http.shutdown_timeout + 5)
        if pending:
            log.error("workers.shutdown_timeout", seconds=self.settings.http.shutdown_timeout)
            self._signal_workers(signal.SIGKILL)
            self._exit_code = 1
            await asyncio.wait(pending)

    def _cleanup(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            loop.remove_reader(slot.notify.fileno())
            slot.notify.close()
            if slot.lifeline is not None:
                os.close(slot.lifeline)
                slot.lifeline = None
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        if self._runtime_dir:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        self._notifier.close()


def worker_command(config: str | None) -> list[str]:
    """The command line of a worker: this interpreter running ``relay serve``."""
    command = [sys.executable, "-m", "relay", "serve"]
    if config:
        command += ["--config", config]
    return command
