"""Spool durability at the edges: delivered keys reach the file while nothing else is written,
and a late confirm never lets its row be forwarded. Real relays, real RabbitMQ, real SQLite."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import uuid
from pathlib import Path

import aiohttp
import orjson

from relay.dedup import digest
from relay.publish import Envelope
from relay.routing import Route
from relay.spool import Spool
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    relay_environ,
    wait_for,
)


def persisted_keys(path: Path) -> int:
    """Rows in the spool file's dedup log, read by a connection of our own."""
    conn = sqlite3.connect(path, timeout=5)
    try:
        (count,) = conn.execute("SELECT count(*) FROM dedup_log").fetchone()
    finally:
        conn.close()
    return int(count)


def asleep(thread_name: str) -> bool:
    """Whether the thread of that name is sleeping (state S in /proc: waiting for work)."""
    for thread in threading.enumerate():
        if thread.name == thread_name and thread.native_id is not None:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] == "S"
    return False


async def test_a_delivered_key_is_written_while_the_spool_is_otherwise_idle(
    tmp_path: Path,
) -> None:
    """A key handed to ``remember_key`` reaches the file within the flush interval even when
    no other spool write follows to wake the writer thread (which is asleep, waiting for
    work, when the key arrives)."""
    spool = Spool(
        tmp_path / "spool.db",
        max_bytes=10_000_000,
        max_events=1000,
        dedup_ttl=3600.0,
        dedup_max_entries=1000,
    )
    await spool.open()
    try:
        seen = [False]

        def asleep_twice() -> bool:  # two polls in a row: not just a wait for the GIL
            was, seen[0] = seen[0], asleep("relay-spool-writer")
            return was and seen[0]

        await wait_for(asleep_twice, what="the spool's writer thread to wait for work")
        spool.remember_key(digest("token-x:order.created:idle-1"), 4_000_000_000)
        await wait_for(
            lambda: persisted_keys(tmp_path / "spool.db") == 1,
            timeout=5,
            what="the delivered key in the spool file",
        )
    finally:
        await spool.close()


async def test_kill_9_after_a_confirmed_event_keeps_its_retry_a_duplicate(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """An event confirmed by the broker, with no other event after it: once its key is in the
    spool file the relay is killed with SIGKILL, and after a restart RETM's retry is answered
    ``duplicate`` and not published a second time."""
    broker.forget_later(exchanges=(names.exchange, names.unrouted), queues=(names.unrouted,))
    environ = relay_environ(names, tmp_path / "state")
    tap = await broker.tap(names.exchange)
    event = b'{"event":"order.created","reference":"idle-kill-%s"}' % uuid.uuid4().hex.encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    async with aiohttp.ClientSession() as session:
        first = await RelayProcess(environ).start()
        try:
            async with session.post(first.url + "/retm/events", data=event, headers=headers) as r:
                answer = (r.status, orjson.loads(await r.read()))
            assert (await tap.get()).body == event
            await wait_for(
                lambda: persisted_keys(tmp_path / "state" / "spool.db") == 1,
                timeout=5,
                what="the delivered key in the spool file",
            )
        finally:
            await first.kill()
        second = await RelayProcess(environ).start()
        try:
            async with session.post(second.url + "/retm/events", data=event, headers=headers) as r:
                retry = (r.status, orjson.loads(await r.read()))
        finally:
            second.signal(signal.SIGTERM)
            await second.wait()

    assert answer[0] == 200
    assert answer[1]["status"] == "accepted"
    assert retry == (200, {**answer[1], "status": "duplicate"})
    assert tap.empty()


def _envelope(n: int) -> Envelope:
    return Envelope(
        b'{"event":"order.created","reference":"late-%d"}' % n,
        Route("retm.events", "order.created"),
        f"token-x:order.created:late-{n}",
        "order.created",
        1_700_000_000.0 + n,
        {"x-retm-event": "order.created"},
    )


async def test_a_late_confirmed_row_is_not_forwardable_before_its_delete_runs(
    tmp_path: Path,
) -> None:
    """The moment a held row's timed-out publish is confirmed, the row counts as being
    deleted: a forwarder reading the spool before the delete has started skips it, so the
    late confirm is the only copy (the forwarder skips rows that are held or being deleted)."""
    spool = Spool(
        tmp_path / "spool.db",
        max_bytes=10_000_000,
        max_events=1000,
        dedup_ttl=3600.0,
        dedup_max_entries=1000,
    )
    await spool.open()
    try:
        confirm: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def late_publish() -> bool:
            return await confirm

        pending = asyncio.ensure_future(late_publish())
        seq = await spool.put(_envelope(1), "timeout", pending)
        confirm.set_result(True)
        await pending  # the hold's callback has run; the delete task has not started yet
        forwardable = seq not in spool.held and seq not in spool.deleting
        await wait_for(lambda: spool.depth == 0, what="the late-confirmed row to be deleted")
    finally:
        await spool.close()

    assert not forwardable
    assert spool.late_confirms == 1
