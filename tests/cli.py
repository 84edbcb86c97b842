"""Running ``retm-relay`` commands as real processes (``python -m relay ...``) from async tests.

The command runs in a child process while the test's event loop keeps serving the in-process
relay it talks to, so nothing here blocks the loop. Long-running commands (``tail``) are
``CliProcess``: wait for a line (a condition, not a sleep), read lines, send a signal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, Names, spawn_relay


def cli_environ(config: Path, **overrides: str) -> dict[str, str]:
    """The process environment without the caller's ``RELAY_*`` settings, reading ``config``
    (an empty TOML file: never /etc/retm-relay/relay.toml), plus ``overrides``."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") or k.startswith("RELAY_TEST")
    }
    environ["RELAY_CONFIG"] = str(config)
    environ.update(overrides)
    return environ


def names_environ(config: Path, names: Names, **overrides: str) -> dict[str, str]:
    """``cli_environ`` for a command run against the test broker with the test's own names
    (event, unrouted and quarantine exchanges, archive stream), plus ``overrides``."""
    return cli_environ(
        config,
        RELAY_AMQP_URL=AMQP_URL,
        RELAY_AMQP_EXCHANGE=names.exchange,
        RELAY_AMQP_UNROUTED_EXCHANGE=names.unrouted,
        RELAY_AMQP_REJECTED_EXCHANGE=names.rejected,
        RELAY_ARCHIVE_QUEUE=names.archive,
        **overrides,
    )


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    """A finished command: exit code, stdout and stderr as text."""

    code: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str, env: Mapping[str, str], stdin: bytes | None = None, timeout: float = 30
) -> Result:
    """Run ``retm-relay ARGS`` to completion; fails the test after ``timeout`` seconds."""
    process = await spawn_relay(
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate(stdin)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"retm-relay {' '.join(args)} did not finish within {timeout}s")
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


class CliProcess:
    """A long-running command (``tail``) with line-by-line access to its output."""

    def __init__(self, process: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.process = process
        self.args = args
        self.stderr_lines: list[str] = []

    @classmethod
    async def start(cls, *args: str, env: Mapping[str, str]) -> CliProcess:
        return cls(await spawn_relay(*args, env=env), args)

    async def stderr_line(self, containing: str, timeout: float = 15) -> str:
        """Wait for a stderr line containing ``containing``; fail on EOF or timeout."""
        assert self.process.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.process.stderr.readline()
                    if not raw:
                        pytest.fail(
                            f"retm-relay {' '.join(self.args)} exited before printing "
                            f"{containing!r}; stderr: {self.stderr_lines}"
                        )
                    line = raw.decode().rstrip("\n")
                    self.stderr_lines.append(line)
                    if containing in line:
                        return line
        except TimeoutError:
            pytest.fail(f"no {containing!r} on stderr within {timeout}s: {self.stderr_lines}")

    async def stdout_line(self, timeout: float = 10) -> str:
        """The next stdout line (without its newline); fails after ``timeout`` seconds."""
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                raw = await self.process.stdout.readline()
        except TimeoutError:
            pytest.fail(f"no output line from retm-relay {' '.join(self.args)} in {timeout}s")
        assert raw, "stdout closed"
        return raw.decode().rstrip("\n")

    async def finish(self, sig: int | None = signal.SIGINT, timeout: float = 15) -> Result:
        """Send ``sig`` (None: none, the command ends by itself), wait for the exit, and return
        the remaining output."""
        if sig is not None and self.process.returncode is None:
            self.process.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                out, err = await self.process.communicate()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"retm-relay {' '.join(self.args)} did not exit within {timeout}s")
        assert self.process.returncode is not None
        stderr = "\n".join(self.stderr_lines) + ("\n" if self.stderr_lines else "") + err.decode()
        return Result(self.process.returncode, out.decode(), stderr)

    async def kill(self) -> None:
        """Stop the process whatever its state (test teardown)."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
