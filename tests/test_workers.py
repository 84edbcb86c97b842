"""``http.workers = 2``: ``retm-relay serve`` run as a real process (as systemd runs it), with a
real notify socket, real signals, a real RabbitMQ and the Redis dedup store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay.errors import ConfigError
from relay.settings import load_settings
from tests.conftest import (
    REDIS_URL,
    TOKEN,
    Broker,
    Names,
    Tap,
    fixture_bytes,
    relay_environ,
    spawn_relay,
    wait_for,
)


class Supervised:
    """A ``retm-relay serve`` process: its JSON log lines and its sd_notify datagrams."""

    def __init__(self, process: asyncio.subprocess.Process, notify: socket.socket) -> None:
        self.process = process
        self.notify = notify
        self.logs: list[dict[str, Any]] = []
        self.output: list[str] = []
        self.notifications: list[list[str]] = []
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_logs()), loop.create_task(self._read_notify())]

    async def _read_logs(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            text = line.decode(errors="replace").rstrip()
            self.output.append(text)
            with contextlib.suppress(orjson.JSONDecodeError):
                self.logs.append(orjson.loads(text))

    async def _read_notify(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.notify, 4096)
            self.notifications.append(data.decode().splitlines())

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.logs
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """``wait_for`` that shows the process's last output when it fails."""
        try:
            await wait_for(predicate, timeout=timeout, what=what)
        except pytest.fail.Exception:
            tail = "\n".join(self.output[-40:])
            pytest.fail(f"timed out after {timeout}s waiting for {what}; output:\n{tail}")

    async def event(self, name: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        """The first log line ``name`` with ``fields``, waiting for it."""
        await self.wait(
            lambda: bool(self.events(name, **fields)) or self.process.returncode is not None,
            f"log event {name}",
            timeout,
        )
        found = self.events(name, **fields)
        assert found, f"exited ({self.process.returncode}) before {name}:\n" + "\n".join(
            self.output[-40:]
        )
        return found[0]

    async def notified(self, line: str, timeout: float = 30) -> None:
        await self.wait(
            lambda: any(line in n for n in self.notifications), f"sd_notify {line}", timeout
        )

    async def exit_code(self, timeout: float = 30) -> int:
        """Wait for the process to exit and for every line it and its workers wrote."""
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._tasks[0]  # EOF once every process holding the output is gone
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks)
        self.notify.close()


StartWorkers = Callable[..., Any]


@pytest.fixture
async def start_workers(
    broker: Broker, names: Names, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[StartWorkers]:
    """Start ``retm-relay serve`` with two workers sharing the Redis dedup store (``RELAY_*``
    overrides as keyword arguments); killed after the test if still running."""
    started: list[Supervised] = []
    # The supervisor's notify sockets go to $TMPDIR: a short directory of the test's own (a
    # socket path must stay under 108 bytes), removed afterwards even if it was SIGKILLed.
    runtime = tempfile.mkdtemp(prefix="rr-")

    async def start(**overrides: str) -> Supervised:
        notify_path = tmp_path / f"notify-{len(started)}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        environ.update(
            relay_environ(
                names,
                tmp_path / "state",
                RELAY_HTTP_WORKERS="2",
                RELAY_DEDUP_BACKEND="redis",
                RELAY_DEDUP_REDIS_URL=REDIS_URL,
                RELAY_DEDUP_REDIS_PREFIX=redis_prefix,
                RELAY_LOG_FORMAT="json",
                **overrides,
            )
        )
        environ["NOTIFY_SOCKET"] = str(notify_path)
        environ["TMPDIR"] = runtime
        broker.forget_later(exchanges=(names.exchange, *names.own), queues=names.own)
        process = await spawn_relay("serve", env=environ, stderr=asyncio.subprocess.STDOUT)
        group = Supervised(process, notify)
        started.append(group)
        return group

    yield start
    for group in started:
        await group.close()
    shutil.rmtree(runtime)


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    async with session.post(
        url + "/retm/events",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json()


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        if response.content_type == "application/json":
            return await response.json()
        return await response.text()


def _requests(metrics_text: str) -> float:
    """relay_requests_total summed over routes and outcomes."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("relay_requests_total{")
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _only_sentinel_follows(session: aiohttp.ClientSession, url: str, tap: Tap) -> None:
    sentinel = b'{"event":"order.created","reference":"sentinel-%d"}' % os.getpid()
    assert (await _post(session, url, sentinel))[0] == 200
    assert (await tap.get()).body == sentinel


async def test_two_workers_serve_deduplicate_and_stop_on_sigterm(
    start_workers: StartWorkers, broker: Broker, names: Names
) -> None:
    """Two workers share one port and a Redis store: systemd hears READY=1 once both are up,
    each worker's own port shows that worker, a copy posted to each worker at once is published
    once, the shared port spreads connections over both, and SIGTERM stops everything cleanly
    (exit 0, STOPPING=1, workers gone, port free)."""
    group = await start_workers()
    ready = await group.event("workers.ready")
    await group.notified("READY=1")
    assert group.notifications[-1][0] == "READY=1"
    assert group.notifications[-1][1] == f"STATUS=2 of 2 workers ready on {ready['url']}"
    url = ready["url"]
    workers = ready["workers"]
    pids = [w["pid"] for w in workers]
    assert [w["index"] for w in workers] == [0, 1]
    assert len(set(pids)) == 2
    tap = await broker.tap(names.exchange)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for index, worker in enumerate(workers):
            health = await _get(s, worker["url"] + "/health")
            assert health["worker"] == {
                "index": index,
                "count": 2,
                "pid": pids[index],
                "port": int(worker["url"].rsplit(":", 1)[1]),
            }
            assert health["dedup"]["backend"] == "redis"
            assert health["dedup"]["state"] == "up"

            async def ready(url: str = worker["url"]) -> bool:
                return bool((await _get(s, url + "/readyz"))["status"] == "ready")

            await wait_for(ready, what=f"worker {index} to be ready")

        raw = fixture_bytes("order.created.json")
        answers = await asyncio.gather(*(_post(s, w["url"], raw) for w in workers))
        assert sorted((status, body["status"]) for status, body in answers) == [
            (200, "accepted"),
            (200, "duplicate"),
        ]
        assert (await tap.get()).body == raw

        spread = [b'{"event":"order.created","reference":"spread-%d"}' % i for i in range(16)]
        for index, body in enumerate(spread):
            status, answer = await _post(s, url, body)
            assert (status, answer["status"]) == (200, "accepted")
            assert answer["id"].endswith(f":order.created:spread-{index}")
        assert sorted(m.body for m in await tap.take(16)) == sorted(spread)
        counts = [_requests(await _get(s, w["url"] + "/metrics")) for w in workers]
        assert sum(counts) == 18
        assert min(counts) > 1, f"the shared port sent every connection to one worker: {counts}"
        await _only_sentinel_follows(s, url, tap)

    group.process.send_signal(signal.SIGTERM)
    assert await group.exit_code() == 0
    await group.notified("STOPPING=1")
    assert [e["exit_code"] for e in group.events("workers.stopped")] == [0]
    assert len(group.events("relay.stopped", worker=0)) == 1
    assert len(group.events("relay.stopped", worker=1)) == 1
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the shared port any more
        await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    with socket.socket() as sock:  # and nothing holds it (TIME_WAIT aside)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))


async def test_a_worker_that_dies_is_restarted(
    start_workers: StartWorkers, broker: Broker, names: Names
) -> None:
    """A worker killed with SIGKILL is restarted on its own port and serves again; the other
    worker is untouched."""
    group = await start_workers()
    ready = await group.event("workers.ready")
    workers = ready["workers"]
    tap = await broker.tap(names.exchange)

    os.kill(workers[1]["pid"], signal.SIGKILL)
    exited = await group.event("workers.worker_exited", worker=1)
    assert exited["exit_code"] == -signal.SIGKILL
    await group.wait(
        lambda: len(group.events("workers.worker_ready", worker=1)) == 2,
        "worker 1 to be ready again",
    )
    new_pid = group.events("workers.worker_ready", worker=1)[1]["pid"]

    async with aiohttp.ClientSession() as s:
        assert (await _get(s, workers[1]["url"] + "/health"))["worker"]["pid"] == new_pid
        assert (await _get(s, workers[0]["url"] + "/health"))["worker"]["pid"] == workers[0]["pid"]
        body = b'{"event":"order.created","reference":"after-restart"}'
        assert (await _post(s, workers[1]["url"], body))[1]["status"] == "accepted"
        assert (await tap.get()).body == body
    assert new_pid != workers[1]["pid"]
    assert group.process.returncode is None

    group.process.send_signal(signal.SIGTERM)
    assert await group.exit_code() == 0


async def test_a_stuck_worker_is_killed_by_the_watchdog_and_restarted(
    start_workers: StartWorkers,
) -> None:
    """Under a systemd watchdog, the supervisor pings systemd itself and watches its workers'
    pings: a worker that stops pinging (SIGSTOP: a stuck process) is killed and restarted."""
    group = await start_workers(WATCHDOG_USEC="2000000")
    ready = await group.event("workers.ready")
    stuck = ready["workers"][1]
    await group.notified("WATCHDOG=1")

    os.kill(stuck["pid"], signal.SIGSTOP)

    assert (await group.event("workers.worker_stuck"))["pid"] == stuck["pid"]
    exited = await group.event("workers.worker_exited", worker=1)
    assert exited["exit_code"] == -signal.SIGKILL
    await group.wait(
        lambda: len(group.events("workers.worker_ready", worker=1)) == 2,
        "worker 1 to be ready again",
    )
    assert not group.events("workers.worker_stuck", worker=0)
    group.process.send_signal(signal.SIGTERM)
    assert await group.exit_code() == 0


async def test_workers_stop_when_the_supervisor_is_killed(start_workers: StartWorkers) -> None:
    """If the supervisor dies without a chance to stop them (SIGKILL), its workers notice
    (their lifeline pipe closes) and stop gracefully instead of serving on as orphans."""
    group = await start_workers()
    ready = await group.event("workers.ready")
    pids = [w["pid"] for w in ready["workers"]]

    group.process.kill()

    await group.wait(lambda: not any(_alive(p) for p in pids), "workers to stop")
    await group.wait(
        lambda: len(group.events("relay.supervisor_gone")) == 2, "both workers to log it"
    )
    assert len(group.events("relay.stopped")) == 2


async def test_a_worker_failing_at_start_up_fails_the_start(
    start_workers: StartWorkers, broker: Broker, names: Names
) -> None:
    """A worker that cannot start (here: the exchange exists with another type) stops the whole
    start with exit 1 rather than being restarted in a loop; systemd never hears READY=1."""
    assert broker.channel is not None
    await broker.channel.declare_exchange(names.exchange, "direct", durable=True)

    group = await start_workers()

    assert await group.exit_code() == 1
    assert (await group.event("workers.start_failed"))["exit_code"] == 1
    assert not any("READY=1" in n for n in group.notifications)
    assert group.events("workers.stopped")[0]["exit_code"] == 1


async def test_several_workers_with_the_memory_store_are_refused() -> None:
    """http.workers > 1 with dedup.backend = "memory" stops at start-up with exit 2, naming
    the key."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    environ["RELAY_HTTP_WORKERS"] = "2"
    process = await spawn_relay("serve", env=environ)
    _, stderr = await process.communicate()

    assert process.returncode == 2
    assert stderr.decode() == (
        "retm-relay: configuration error: http.workers: more than one worker needs a shared "
        'dedup store: set dedup.backend = "redis"\n'
    )


async def test_shared_port_in_use_fails_the_start(start_workers: StartWorkers) -> None:
    """A port held by another program (without SO_REUSEPORT) stops the start with exit 1 and
    one clear error naming the key."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        group = await start_workers(RELAY_HTTP_PORT=str(port))

        assert await group.exit_code() == 1
    failed = group.events("relay.start_failed")
    assert len(failed) == 1
    assert failed[0]["error"].startswith(f"http.host/http.port 127.0.0.1:{port}: [Errno 98]")
    assert not group.events("workers.worker_started")


def test_several_workers_need_a_shared_store() -> None:
    """http.workers > 1 with the memory store is refused when the settings load, naming the
    key; with the Redis store it is accepted."""
    with pytest.raises(ConfigError) as error:
        load_settings(None, {"RELAY_HTTP_WORKERS": "2"})
    assert error.value.key == "http.workers"
    assert "dedup.backend" in error.value.message
    settings = load_settings(None, {"RELAY_HTTP_WORKERS": "2", "RELAY_DEDUP_BACKEND": "redis"})
    assert (settings.http.workers, settings.http.worker_port_base) == (2, 0)


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"RELAY_HTTP_WORKERS": "0"}, "http.workers"),
        ({"RELAY_HTTP_WORKERS": "65", "RELAY_DEDUP_BACKEND": "redis"}, "http.workers"),
        (
            {"RELAY_HTTP_WORKERS": "4", "RELAY_DEDUP_BACKEND": "redis", "RELAY_HTTP_PORT": "65534"},
            "http.port",
        ),
        (
            {
                "RELAY_HTTP_WORKERS": "4",
                "RELAY_DEDUP_BACKEND": "redis",
                "RELAY_HTTP_WORKER_PORT_BASE": "65533",
            },
            "http.worker_port_base",
        ),
    ],
)
def test_bad_worker_settings_name_the_key(environ: dict[str, str], key: str) -> None:
    """Worker settings that cannot work are refused with an error naming the key."""
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ)
    assert error.value.key == key
