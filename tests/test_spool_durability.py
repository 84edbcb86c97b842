"""Spool durability at the edges: delivered keys reach the file while nothing else is written,
a late confirm never lets its row be forwarded, and a delete that cannot be written never
makes the forwarder publish the same rows again. Real relays, real RabbitMQ, real SQLite."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import uuid
from pathlib import Path

import aiohttp
import orjson

from relay.amqp.publish import Envelope
from relay.dedup.memory import digest
from relay.http.app import FORWARDER, PUBLISHER, SPOOL
from relay.routing import Route
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    StartRelay,
    assert_only_sentinel_follows,
    proxy_url,
    relay_environ,
    spool_at,
    wait_for,
)
from tests.proxy import FaultProxy


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
    spool = spool_at(tmp_path / "spool.db")
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
    broker.forget_later(exchanges=(names.exchange, *names.own), queues=names.own)
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
    spool = spool_at(tmp_path / "spool.db")
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


async def test_a_failed_delete_does_not_forward_the_rows_again(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """Spooled events are forwarded and confirmed, but their delete cannot be written (here
    another connection holds the spool's write lock; a full disk does the same): the
    forwarder does not publish them again and again. Once the file is writable, the delete
    is retried, and every event is on the queue exactly once."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy))
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    forwarder = relay.relay.app[FORWARDER]
    tap = await broker.tap(names.exchange)
    sent = [b'{"event":"order.created","reference":"undeleted-%d"}' % i for i in range(3)]
    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    answers = [await relay.event(b) for b in sent]
    locker = sqlite3.connect(spool.path, timeout=5, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # the relay's writer now waits 5 s, then fails
        fault_proxy.restore()
        received = [await tap.get(timeout=15) for _ in sent]
        # Either the forwarder publishes the rows again (the defect), or their delete fails
        # and they stay marked as being deleted (nothing left to forward). Each write waits
        # 5 s for the lock before it fails, and when the rows are confirmed in separate acks
        # their deletes fail one after the other (a CI run took 15 s for three): allow for six.
        await wait_for(
            lambda: (
                forwarder.forwarded > len(sent)
                or (forwarder._idle.is_set() and spool.depth == len(sent))
            ),
            timeout=30,
            what="the failed delete to settle",
        )
        forwarded_while_locked = forwarder.forwarded
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await wait_for(lambda: spool.depth == 0, timeout=15, what="the delete to be retried")
    sentinel = b'{"event":"order.created","reference":"undeleted-sentinel"}'
    last = await relay.event(sentinel)
    after = await tap.get(timeout=15)

    assert [a.status for a in answers] == [200, 200, 200]
    assert [m.body for m in received] == sent
    assert forwarded_while_locked == len(sent)
    assert last.status == 200
    assert last.body["status"] == "accepted"
    assert after.body == sentinel
    assert tap.empty()


async def test_confirmed_rows_whose_delete_failed_do_not_hold_new_events(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """Spooled events are forwarded and confirmed, but their delete cannot be written (as
    on a full disk): a new webhook is not queued behind rows that are already on the broker
    (it would be answered 503 while the spool cannot write); it is confirmed directly, and
    consumers still see every event once, in order."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy))
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    tap = await broker.tap(names.exchange)
    sent = [b'{"event":"order.created","reference":"stuck-%d"}' % i for i in range(3)]
    fresh = b'{"event":"order.created","reference":"stuck-fresh"}'
    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    answers = [await relay.event(b) for b in sent]
    locker = sqlite3.connect(spool.path, timeout=5, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # the relay's writer now waits 5 s, then fails
        fault_proxy.restore()
        received = [await tap.get(timeout=15) for _ in sent]
        await wait_for(lambda: bool(spool.undeleted), timeout=15, what="the delete to fail")
        depth_then = spool.depth
        answer = await relay.event(fresh)
        after = await tap.get(timeout=15)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await wait_for(lambda: spool.depth == 0, timeout=15, what="the delete to be retried")

    assert [a.status for a in answers] == [200, 200, 200]
    assert [m.body for m in received] == sent
    assert depth_then == 3
    assert (answer.status, answer.body["status"]) == (200, "accepted")
    assert after.body == fresh
    await assert_only_sentinel_follows(relay, tap)
