"""State on disk (relay/statefiles.py, relay/spool/store.py): files readable by the relay's
user only, whatever the umask, and a spool that gives its space back once drained."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson

from relay.http.app import SPOOL
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    StartRelay,
    proxy_url,
    relay_environ,
    wait_for,
)
from tests.proxy import FaultProxy


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """This process's umask set to ``mask`` (children started meanwhile inherit it)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    """File name -> permission bits of every file in ``directory``."""
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


async def test_state_files_are_0600_whatever_the_umask(
    broker: Broker, names: Names, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A relay started with umask 000 (outside systemd) creates its state directory 0700
    and the spool database, its -wal and -shm, its lock and the token registry with its
    -wal and -shm all 0600; one event spooled makes sure the spool's WAL exists."""
    state = tmp_path / "state"
    environ = relay_environ(names, state, RELAY_AMQP_URL=proxy_url(fault_proxy))
    fault_proxy.cut()
    with umask(0o000):
        relay = await RelayProcess(environ).start(wait_listening=False)
    try:
        url = (await relay.wait_log("relay.listening"))["url"]
        await relay.wait_log("tokens.loaded")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url + "/retm/events",
                data=b'{"event":"order.created","reference":"mode-1"}',
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            ) as r,
        ):
            answer = r.status, orjson.loads(await r.read())
        found = modes(state)
    finally:
        await relay.kill()

    assert answer[0] == 200
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    expected = {
        "spool.db",
        "spool.db-wal",
        "spool.db-shm",
        "spool.db.lock",
        "spool.db.sent",
        "tokens.sqlite3",
        "tokens.sqlite3-wal",
        "tokens.sqlite3-shm",
    }
    assert expected <= set(found)
    assert {name: found[name] for name in expected} == dict.fromkeys(expected, 0o600)


def spool_disk_bytes(path: Path) -> int:
    """Bytes the spool takes on disk: the database, its WAL and its shared-memory file."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += path.with_name(path.name + suffix).stat().st_size
    return total


async def test_a_drained_spool_gives_its_space_back(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """50 MB spooled while the broker link is cut (500 events of 100 kB) take more than
    50 MB on disk; once the link is back and the forwarder has drained them, the spool's
    files (database, WAL, SHM) shrink to at most 8 MB within a minute, and every event is on
    the queue once."""
    tap = await broker.tap(names.exchange)
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy))
    spool = relay.relay.app[SPOOL]
    fault_proxy.cut()
    pad = b"x" * 100_000
    bodies = [
        b'{"event":"order.created","reference":"fill-%d","pad":"%s"}' % (i, pad) for i in range(500)
    ]
    answers = []
    for start in range(0, 500, 50):
        answers += await asyncio.gather(*(relay.event(b) for b in bodies[start : start + 50]))
    peak = spool_disk_bytes(spool.path)
    fault_proxy.restore()
    received = [m.body for m in await tap.take(500, timeout=60)]
    await wait_for(lambda: spool.depth == 0, timeout=60, what="the spool drained")
    await wait_for(
        lambda: spool.compactions >= 1 and spool_disk_bytes(spool.path) <= 8_000_000,
        timeout=60,
        what="the spool's files back to 8 MB",
    )
    after = spool_disk_bytes(spool.path)

    assert [a.status for a in answers] == [200] * 500
    assert {a.body["status"] for a in answers} == {"accepted"}
    assert peak > 50_000_000
    assert sorted(received) == sorted(bodies)
    assert after <= 8_000_000
