"""The spool as a store: durable rows in order, group commit, holds and late confirms, capacity,
persisted dedup keys, and one process per file. Real SQLite files in a temporary directory."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay.amqp.publish import Envelope
from relay.dedup.memory import MemoryDedupStore, digest
from relay.errors import BrokerUnavailable
from relay.routing import Route
from relay.spool.store import Spool, SpooledEvent, SpoolError
from tests.conftest import spool_at, wait_for


def envelope(n: int, body: bytes | None = None) -> Envelope:
    return Envelope(
        body or b'{"event":"order.created","reference":"r-%d"}' % n,
        Route("retm.events", "order.created"),
        f"token-x:order.created:r-{n}",
        "order.created",
        1_700_000_000.0 + n,
        {"x-retm-event": "order.created", "x-retm-reference": f"r-{n}"},
    )


SpoolFactory = Callable[..., Spool]


@pytest.fixture
async def make_spool(tmp_path: Path) -> AsyncIterator[SpoolFactory]:
    spools: list[Spool] = []

    def make(name: str = "spool.db", **options: object) -> Spool:
        spool = spool_at(tmp_path / name, **options)
        spools.append(spool)
        return spool

    yield make
    for spool in spools:
        await spool.close()


async def test_rows_come_back_in_order_with_every_field(make_spool: SpoolFactory) -> None:
    """What goes in (body, route, message_id, event, time, headers) comes out byte for byte,
    oldest first, and survives closing and reopening the file."""
    spool = make_spool()
    await spool.open()
    sent = [envelope(i) for i in range(5)]
    for e in sent:
        await spool.put(e, "disconnected")
    await spool.close()

    again = make_spool()
    await again.open()
    rows = await again.peek(10)

    assert [r.envelope for r in rows] == sent
    assert [r.reason for r in rows] == ["disconnected"] * 5
    assert (again.depth, again.bytes) == (5, sum(r.size for r in rows))
    assert again.oldest_at == rows[0].spooled_at


async def test_a_burst_of_puts_shares_few_commits(make_spool: SpoolFactory) -> None:
    """200 events spooled at once are committed in far fewer transactions than 200 (group
    commit: one fsync per round of the writer thread)."""
    spool = make_spool()
    await spool.open()
    before = spool.commits

    seqs = await asyncio.gather(*(spool.put(envelope(i), "timeout") for i in range(200)))

    assert sorted(seqs) == seqs == list(range(1, 201))
    assert spool.commits - before < 50
    assert spool.depth == 200


async def test_delete_frees_room_and_is_never_forwarded_again(make_spool: SpoolFactory) -> None:
    """Deleted rows are gone from peek, the counters and the file."""
    spool = make_spool()
    await spool.open()
    for i in range(4):
        await spool.put(envelope(i), "queued")

    await spool.delete([1, 3])

    assert [r.seq for r in await spool.peek(10)] == [2, 4]
    assert spool.depth == 2
    assert spool.oldest_at is not None


async def test_a_late_confirm_deletes_the_spooled_copy(make_spool: SpoolFactory) -> None:
    """A row spooled after its publish timed out is held while that publish runs; when the
    publish is confirmed after all, the row is deleted without being forwarded."""
    spool = make_spool()
    await spool.open()
    confirm: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def late_publish() -> bool:
        return await confirm

    pending = asyncio.ensure_future(late_publish())
    seq = await spool.put(envelope(1), "timeout", pending)
    assert seq in spool.held
    confirm.set_result(True)
    await pending

    await wait_for(lambda: spool.depth == 0, what="the late-confirmed row to be deleted")
    assert spool.late_confirms == 1
    assert spool.held == {}
    assert await spool.peek(10) == []


async def test_a_failed_late_publish_releases_the_row(make_spool: SpoolFactory) -> None:
    """When the timed-out publish fails (its link died), the row is released to the
    forwarder and marked as possibly sent already."""
    spool = make_spool()
    await spool.open()
    pending = asyncio.ensure_future(asyncio.sleep(3600, result=True))
    seq = await spool.put(envelope(1), "timeout", pending)

    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.sleep(0)

    assert spool.held == {}
    assert spool.maybe_sent == {seq}
    assert [r.seq for r in await spool.peek(10)] == [seq]
    assert spool.late_confirms == 0


async def test_full_spool_refuses_then_accepts_after_draining(make_spool: SpoolFactory) -> None:
    """At max_events the next put raises spool_full and the spool reports itself full until
    deletes bring it below 90 %."""
    spool = make_spool(max_events=3)
    await spool.open()
    for i in range(3):
        await spool.put(envelope(i), "disconnected")

    with pytest.raises(BrokerUnavailable) as info:
        await spool.put(envelope(9), "disconnected")
    assert info.value.reason == "spool_full"
    assert spool.full
    assert spool.readiness() == (
        f"spool full: 3 events, {spool.bytes} bytes (spool.max_events 3, spool.max_bytes 10000000)"
    )

    await spool.delete([1, 2])
    assert not spool.full
    assert spool.readiness() is None
    assert await spool.put(envelope(9), "disconnected") == 4


async def test_max_bytes_counts_bodies(make_spool: SpoolFactory) -> None:
    """A body that would pass max_bytes is refused even below max_events."""
    spool = make_spool(max_bytes=2000)
    await spool.open()
    await spool.put(envelope(1, b"x" * 1000), "timeout")
    with pytest.raises(BrokerUnavailable):
        await spool.put(envelope(2, b"y" * 1000), "timeout")
    assert spool.depth == 1


async def test_dedup_keys_survive_a_restart(make_spool: SpoolFactory) -> None:
    """Keys committed through the dedup hook, and the keys of spooled events, are restored
    into a fresh dedup store after reopening; expired keys are not."""
    clock = [1_800_000_000.0]
    spool = make_spool(clock=lambda: clock[0])
    await spool.open()
    dedup = MemoryDedupStore(100, 1000, clock=lambda: clock[0], on_commit=spool.remember_key)
    await dedup.claim("a")
    await dedup.commit("a")
    await spool.put(envelope(7), "disconnected")
    spool.remember_key(digest("old"), int(clock[0]) + 1)
    await spool.close()

    clock[0] += 50
    again = make_spool(clock=lambda: clock[0])
    restored = MemoryDedupStore(100, 1000, clock=lambda: clock[0])
    loaded = restored.restore(await again.open())

    assert loaded == 2
    assert restored.is_delivered("a")
    assert restored.is_delivered(envelope(7).message_id)
    assert not restored.is_delivered("old")


async def test_a_second_process_cannot_open_the_same_spool(make_spool: SpoolFactory) -> None:
    """The spool file is locked while open: a second opener fails with a clear message, and a
    spool of another name in the same directory opens fine."""
    first = make_spool()
    await first.open()

    with pytest.raises(SpoolError, match="in use by another process"):
        await make_spool().open()
    other = make_spool("spool-2.db")
    await other.open()
    assert other.opened.is_set()


async def test_a_write_failure_answers_spool_error(
    make_spool: SpoolFactory, tmp_path: Path
) -> None:
    """When SQLite refuses the write (here: the table is gone), put raises spool_error and the
    counters stay as they were."""
    spool = make_spool()
    await spool.open()
    conn = sqlite3.connect(tmp_path / "spool.db")
    conn.execute("DROP TABLE events")
    conn.close()

    with pytest.raises(BrokerUnavailable) as info:
        await spool.put(envelope(1), "timeout")

    assert info.value.reason == "spool_error"
    assert (spool.depth, spool.bytes) == (0, 0)


async def test_failing_writes_make_the_spool_unready_until_one_succeeds(
    make_spool: SpoolFactory, tmp_path: Path
) -> None:
    """While spool writes fail (here another connection holds the write lock, as a full disk
    would refuse them), readiness names the failure; the next write that succeeds clears it."""
    spool = make_spool()
    await spool.open()
    blocker = sqlite3.connect(tmp_path / "spool.db", timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    with pytest.raises(BrokerUnavailable):
        await spool.put(envelope(1), "timeout")
    reason = spool.readiness()
    blocker.execute("ROLLBACK")
    blocker.close()
    await spool.put(envelope(2), "timeout")

    assert reason is not None
    assert reason.startswith("spool writes failing: database is locked")
    assert spool.readiness() is None


async def test_a_row_deleted_while_a_read_runs_is_not_read(make_spool: SpoolFactory) -> None:
    """A row deleted (a late confirm, a confirmed forward) while the forwarder's read is under
    way is not in that read's result, although the read's snapshot still held it: it would
    otherwise be forwarded a second time."""
    spool = make_spool()
    await spool.open()
    first = await spool.put(envelope(1), "test")
    await spool.put(envelope(2), "test")
    snapshot_taken, release = threading.Event(), threading.Event()
    read = spool._read

    def read_then_wait(limit: int, after: int) -> list[SpooledEvent]:
        rows = read(limit, after)
        snapshot_taken.set()
        release.wait(10)
        return rows

    spool._read = read_then_wait  # type: ignore[method-assign]
    reading = asyncio.ensure_future(spool.peek(10))
    assert await asyncio.to_thread(snapshot_taken.wait, 10)
    await spool.delete([first])
    release.set()

    assert [row.envelope.message_id for row in await reading] == ["token-x:order.created:r-2"]
