"""The harness of `make bench`: targets as real child processes, sampled from /proc, and
the broker topology they publish to.

``Server`` starts a target and waits until it is ready (a TCP accept, or READY=1 on a
``NotifySocket`` the runner binds as systemd would); ``ProcessTree`` reads the CPU time and
peak RSS of a process and all its descendants (the workers of a multi-worker relay) from
/proc/PID/stat and /proc/PID/status; ``Topology`` binds, counts and deletes queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ... utime, stime)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _status_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


class ProcessTree:
    """A process and its descendants, sampled from /proc (CPU seconds, RSS in bytes)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        """The process and every live descendant."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ppid = int(_stat_fields(int(entry.name))[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the live tree (and of children it has reaped)."""
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                f = _stat_fields(pid)
                ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        return ticks / CLK_TCK

    def peak_rss(self) -> int:
        """Sum of each live process's peak RSS (VmHWM), bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError):
                total += _status_kb(pid, "VmHWM") * 1024
        return total


# -- helpers -------------------------------------------------------------------------------


def pids_named(name: str) -> list[int]:
    """The pids of the live processes whose command name (``/proc/PID/comm``) is ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def free_port(span: int = 1) -> int:
    """A port P on 127.0.0.1 such that P .. P+span-1 are all free right now. A single port
    comes from the kernel (bind to port 0); a range is looked for below the ephemeral range
    (``net.ipv4.ip_local_port_range``), where the client side of every outgoing connection
    on the machine does not take ports at random. Raises RuntimeError when none is found."""
    if span == 1:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
            return port
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low, 10000 + span)
    for _ in range(500):
        port = random.randrange(10000, top - span + 1)
        ok = True
        for p in range(port, port + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port range")


def child_environ(**extra: str) -> dict[str, str]:
    """The runner's environment without relay settings or systemd variables, plus ``extra``."""
    skip = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY", "RELAY_CONFIG"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k not in skip}
    env.update(extra)
    return env


class NotifySocket:
    """The ``NOTIFY_SOCKET`` datagram socket systemd would give the relay, bound by the runner."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    async def wait_ready(self) -> float:
        """Wait for a datagram with a ``READY=1`` line; returns ``time.perf_counter()`` then."""
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            if b"READY=1" in data.split(b"\n"):
                return time.perf_counter()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


async def wait_tcp(port: int) -> float:
    """Wait until 127.0.0.1:port accepts a connection; returns ``time.perf_counter()``."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return time.perf_counter()


class Server:
    """A benchmark target as a real child process, its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, ready: Callable[[], Awaitable[float]], timeout: float = 30) -> float:
        """Start the process and wait for ``ready()``; returns seconds from exec to ready."""
        with self.log_path.open("wb") as log:
            started = time.perf_counter()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=str(ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        ready_task = asyncio.ensure_future(ready())
        exit_task = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait(
            (ready_task, exit_task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready_task in done:
            exit_task.cancel()
            return ready_task.result() - started
        ready_task.cancel()
        if exit_task not in done:
            exit_task.cancel()
            await self.stop()
        raise RuntimeError(
            f"{self.name} did not become ready within {timeout}s; its output:\n{self.tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL to its process group (the workers it started) after
        ``timeout`` seconds."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                return await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return await proc.wait()


class Topology:
    """The runner's own AMQP connection: binds a queue for each target, counts its messages,
    and deletes what a target created. Every name it is told about (``track``) and has not
    deleted yet is deleted by ``close``, so an interrupted run leaves nothing behind."""

    def __init__(self, url: str, queue_arguments: dict[str, Any]) -> None:
        self.url = url
        self.queue_arguments = queue_arguments
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.exchanges: set[str] = set()
        self.queues: set[str] = set()

    async def open(self) -> None:
        self.connection = await aio_pika.connect(self.url)

    def track(self, exchanges: Iterable[str] = (), queues: Iterable[str] = ()) -> None:
        """Remember names a target will declare, to delete them at the latest in ``close``."""
        self.exchanges.update(exchanges)
        self.queues.update(queues)

    async def bind(self, exchange: str, queue: str) -> None:
        """Declare ``exchange`` (durable topic) and a durable ``queue`` bound with ``#``."""
        assert self.connection is not None
        self.track([exchange], [queue])
        async with self.connection.channel() as channel:
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            q = await channel.declare_queue(queue, durable=True, arguments=self.queue_arguments)
            await q.bind(ex, "#")

    async def count(self, queue: str) -> int:
        """Messages ready in ``queue``."""
        assert self.connection is not None
        async with self.connection.channel() as channel:
            q = await channel.declare_queue(queue, passive=True)
            return int(q.declaration_result.message_count or 0)

    async def delete(self, exchanges: Iterable[str], queues: Iterable[str]) -> None:
        """Delete queues, then exchanges; a name that is already gone is fine."""
        assert self.connection is not None
        for kind, names in (("queue", list(queues)), ("exchange", list(exchanges))):
            for name in names:
                channel = await self.connection.channel()
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    if kind == "queue":
                        await channel.queue_delete(name)
                        self.queues.discard(name)
                    else:
                        await channel.exchange_delete(name)
                        self.exchanges.discard(name)
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.close()

    async def close(self) -> None:
        """Delete whatever is still tracked, then close the connection."""
        if self.connection is not None:
            await self.delete(sorted(self.exchanges), sorted(self.queues))
            await self.connection.close()
