"""systemd integration: ``sd_notify`` (READY=1, RELOADING=1, STATUS=, WATCHDOG=1, STOPPING=1).

The protocol is one datagram per notification to the socket named by ``$NOTIFY_SOCKET`` (a path,
or an abstract socket when it starts with ``@``); without it every call is a no-op, so the relay
runs the same outside systemd. See sd_notify(3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("relay.systemd")


class Notifier:
    """Sends sd_notify messages; ``environ`` is read once (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``,
    ``WATCHDOG_PID``)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: seconds between two WATCHDOG=1 pings (half the watchdog period), or None
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        """Whether the process runs under systemd with a notify socket."""
        return self._socket is not None

    def notify(self, *lines: str) -> None:
        """Send ``KEY=value`` lines in one datagram; failures are logged, never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        """READY=1 with a STATUS= line."""
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """RELOADING=1 (with MONOTONIC_USEC, as systemd 253+ wants): a reload has begun; the
        next ``ready`` ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def status(self, status: str) -> None:
        """Update STATUS= (shown by ``systemctl status``)."""
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        """STOPPING=1: the graceful shutdown has begun."""
        self.notify("STOPPING=1", "STATUS=stopping")

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 from the event loop until cancelled; a stuck loop stops the pings
        and systemd restarts the service."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        """Close the notify socket."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
