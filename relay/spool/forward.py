"""Store and forward: the delivery policy in front of the publisher, and the forwarder.

``StoreAndForward.deliver`` is the ``Deliver`` of the ingest stage. It publishes directly while
the spool is empty and the link is up and unblocked (2xx after the broker's confirm:
``accepted``); otherwise, and whenever the direct publish fails (nack, deadline, link lost), it
writes the event to the spool (2xx after the fsync: ``spooled``). While the spool holds events,
new events queue behind them, so consumers see events in spool order.

``Forwarder`` publishes spooled events oldest first once the link is up, a window of many
publishes in flight at a time (RabbitMQ confirms them in batches), and deletes each row only
after its confirm. An event whose first publish timed out is *held* until that publish settles:
a late confirm deletes the row (no second copy); a failure releases it to the forwarder. A row
whose earlier publish was left unconfirmed by a dying link may reach the queue twice, with the
same message_id; so may a row published when the relay was killed, before its confirm came
back (at most ``FORWARD_WINDOW`` rows). Those forwards are counted in
``relay_spool_redelivered_total``. A confirmed row's delete is fsynced, so it never comes back.
A burst of webhooks waits for a direct publish slot (``BACKLOG_WAIT``) rather than going to the
spool, so a healthy broker confirms it directly and a crash after it forwards nothing again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from relay.amqp.publish import Envelope, Publisher
from relay.errors import BrokerUnavailable
from relay.metrics import Metrics
from relay.spool.store import Spool, SpooledEvent

log = structlog.get_logger("relay.forward")

#: publishes of spooled events in flight at once: what a lost link or a SIGKILL can leave
#: unconfirmed, so the most events one such fault while the spool drains can repeat. 16 keeps
#: the drain above 2,000 events/s on 2 CPUs (64 drained about 1.6x faster, and a cut of the link
#: mid-drain then repeated up to 64 events: `make chaos` measured 0.44 % duplicates)
FORWARD_WINDOW = 16
#: direct publishes allowed in flight at once; beyond it a new event waits for a free slot,
#: up to BACKLOG_WAIT seconds, and is spooled after that (reason ``backlog``). It bounds what
#: a dying link can leave unconfirmed (possible second copies) and the confirm latency a slow
#: link can build up. It is a guard, not a working limit: at 1,000 events a second it allows a
#: second of confirm latency (128 allowed 0.13 s, which a busy 2-core host exceeded, and once an
#: event is spooled every next one queues behind it: the relay then ran on the spool, at more
#: CPU per event, until the load dropped).
MAX_DIRECT_IN_FLIGHT = 1024
#: seconds a new event waits for a direct publish slot before it is spooled. A burst the
#: broker confirms as fast as it comes is then never spooled: a crash right after it leaves
#: nothing to forward again (forwarded rows published but unconfirmed at a SIGKILL are what
#: can reach consumers twice)
BACKLOG_WAIT = 1.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0  # seconds between rounds after a failed forward


class StoreAndForward:
    """The ``deliver`` policy (see the module docstring)."""

    def __init__(self, publisher: Publisher, spool: Spool, metrics: Metrics) -> None:
        self.publisher = publisher
        self.spool = spool
        self.metrics = metrics
        self._slots = asyncio.Semaphore(MAX_DIRECT_IN_FLIGHT)

    def _why_spool(self) -> str | None:
        """Why a new event must go to the spool now (None: publish it directly)."""
        publisher = self.publisher
        if self.spool.to_forward:
            return "queued"  # behind events already spooled: keep the spool's order
        if not publisher.connected.is_set():
            return "disconnected"
        if publisher.suspect:
            return "stalled"  # do not add to the publishes a silent link holds
        return None

    async def deliver(self, envelope: Envelope) -> str:
        """Make ``envelope`` durable: ``accepted`` (confirmed by the broker) or ``spooled``
        (fsynced to the spool). Raises BrokerUnavailable (``spool_full``, ``spool_error``)
        when neither is possible, so the webhook answers 503."""
        spool, slots = self.spool, self._slots
        pending: asyncio.Future[Any] | None = None
        reason = self._why_spool()
        if reason is None:
            if not slots.locked():
                await slots.acquire()  # (free: returns at once)
            else:
                try:
                    async with asyncio.timeout(BACKLOG_WAIT):
                        await slots.acquire()
                except TimeoutError:
                    reason = "backlog"
            if reason is None:
                try:
                    reason = self._why_spool()  # (things may have changed while it waited)
                    if reason is None:
                        await self.publisher.publish(envelope)
                        return "accepted"
                except BrokerUnavailable as exc:
                    reason, pending = exc.reason, exc.pending
                finally:
                    slots.release()
        seq = await spool.put(envelope, reason, pending)
        if pending is not None or reason == "channel_closed":  # the publish went out
            spool.mark_sent([seq])  # (a forward after a restart is then a redelivery)
        if reason == "channel_closed":  # the link died after the publish went out
            spool.maybe_sent.add(seq)
        self.metrics.spooled(reason)
        return "spooled"


@dataclass(slots=True)
class _Drain:
    """The state of one ``Forwarder.drain``."""

    limit: int | None
    inflight: dict[asyncio.Task[bool], int] = field(default_factory=dict)
    #: publishes that finished, and None for each delete that finished
    finished: asyncio.Queue[asyncio.Task[bool] | None] = field(default_factory=asyncio.Queue)
    cursor: int = 0
    moved: int = 0
    confirmed: list[int] = field(default_factory=list)
    exhausted: bool = False
    failed: bool = False
    #: why the first publish of this drain that failed did (``reason: detail``)
    failure: str = ""
    #: confirmed rows in the delete being written
    deleting: int = 0

    @property
    def undeleted(self) -> int:
        """Confirmed rows whose delete is not committed yet: they hold their window slot, so
        that what a crash can forward again stays within the window."""
        return len(self.confirmed) + self.deleting


class Forwarder:
    """Publishes spooled events to the broker, oldest first, and deletes each after its
    confirm. A window of up to ``window`` publishes stays in flight: as confirms come back,
    more rows are read and published, and the confirmed rows are deleted in groups.

    ``start`` runs it in the background; ``stop`` lets the publishes in flight settle (bounded
    by ``grace`` seconds) and deletes the confirmed ones, so no confirmed event stays behind.
    """

    def __init__(
        self,
        spool: Spool,
        publisher: Publisher,
        *,
        window: int = FORWARD_WINDOW,
        grace: float = 6.0,
    ) -> None:
        self.spool = spool
        self.publisher = publisher
        self.window = window
        self.grace = grace
        self.forwarded = 0
        self.redelivered = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        """Start forwarding in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-forwarder")

    async def stop(self) -> None:
        """Stop taking rows, let the publishes in flight settle and delete the confirmed
        ones; the rest stays spooled for the next start."""
        self._closing = True
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await self._idle.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        spool, publisher = self.spool, self.publisher
        delay = BACKOFF_MIN
        while not self._closing:
            if not spool.depth:
                spool.changed.clear()
                if not spool.depth:
                    await spool.changed.wait()
                continue
            if not publisher.connected.is_set():
                await publisher.connected.wait()
                continue
            if publisher.blocked:
                await publisher.wait_unblocked()
                continue
            spool.changed.clear()
            self._idle.clear()
            try:
                ok, moved = await self.drain()
            finally:
                self._idle.set()
            if not ok:  # a nack, a deadline or a closing link: back off before trying again
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            if not moved and spool.undeleted:  # a delete failed (a full disk): retry it
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BACKOFF_MAX):
                        await spool.changed.wait()
                with contextlib.suppress(BrokerUnavailable):
                    await spool.delete([])
            elif not moved:  # nothing forwardable now (the head is held): wait for a change
                await spool.changed.wait()

    async def drain(
        self, limit: int | None = None, progress: Callable[[int], None] | None = None
    ) -> tuple[bool, int]:
        """Forward spooled rows oldest first, up to ``window`` in flight, until nothing is
        left to forward (or ``limit`` rows were confirmed). Returns (no publish failed, rows
        confirmed). After the first failure no new row is published; the ones in flight
        settle first. ``progress`` is called with the running count after each delete."""
        spool = self.spool
        run = _Drain(limit)
        deleting: asyncio.Task[None] | None = None

        async def delete(seqs: list[int], moved: int) -> None:
            try:
                await spool.delete(seqs)
            except BrokerUnavailable as exc:
                log.error("spool.delete_failed", error=str(exc), events=len(seqs))
            if progress is not None:
                progress(moved)

        def wake(_: object) -> None:
            run.deleting = 0
            run.finished.put_nowait(None)

        while True:
            if not (run.failed or run.exhausted or self._closing):
                await self._fill(run)
            if not run.inflight and (deleting is None or deleting.done()):
                break
            finished = [await run.finished.get()]
            while not run.finished.empty():
                finished.append(run.finished.get_nowait())
            done = {task for task in finished if task is not None}
            confirmed = self._settle(done, run.inflight)
            run.failed = run.failed or len(confirmed) < len(done)
            run.confirmed += confirmed
            run.moved += len(confirmed)
            if run.confirmed and (deleting is None or deleting.done()):
                run.deleting = len(run.confirmed)
                deleting = asyncio.ensure_future(delete(run.confirmed, run.moved))
                deleting.add_done_callback(wake)
                run.confirmed = []
            if spool.changed.is_set() and not run.failed:
                spool.changed.clear()
                run.exhausted = False  # new rows (or a released hold): read again
        if deleting is not None:
            await deleting
        if run.confirmed:
            await delete(run.confirmed, run.moved)
        if run.moved:
            log.info("spool.forwarded", events=run.moved, left=spool.depth, failed=run.failed)
        if run.failed:
            log.warning(
                "spool.forward_failed", error=run.failure, forwarded=run.moved, left=spool.depth
            )
        return not run.failed, run.moved

    async def _fill(self, run: _Drain) -> None:
        """Read rows after the cursor and publish them, up to the window (in groups of a
        quarter window, not one read per confirm)."""
        spool = self.spool
        room = self.window - len(run.inflight) - run.undeleted
        batch = max(1, self.window // 4)
        if run.limit is not None:
            room = min(room, run.limit - run.moved - len(run.inflight))
            batch = min(batch, max(1, room))
        if room < batch:
            return
        rows = await spool.peek(room, after=run.cursor)
        run.exhausted = len(rows) < room
        batch_rows: list[SpooledEvent] = []
        passed = run.cursor  # the last row read before a held one
        for row in rows:
            if row.seq in spool.held:
                run.exhausted = True  # its first publish may still be confirmed: wait
                break
            passed = row.seq
            if row.seq not in spool.deleting:
                batch_rows.append(row)
        run.cursor = passed
        # logged before they go out: after a crash, forwarding one again is a redelivery
        spool.mark_sent([row.seq for row in batch_rows])
        for row in batch_rows:
            task = asyncio.ensure_future(self._publish(row, run))
            task.add_done_callback(run.finished.put_nowait)
            run.inflight[task] = row.seq

    def _settle(
        self, done: set[asyncio.Task[bool]], inflight: dict[asyncio.Task[bool], int]
    ) -> list[int]:
        """Take finished publishes out of ``inflight``; the seqs that were confirmed."""
        confirmed = []
        for task in done:
            seq = inflight.pop(task)
            if task.result():
                confirmed.append(seq)
                self.forwarded += 1
                if seq in self.spool.maybe_sent:
                    self.redelivered += 1
        return confirmed

    async def _publish(self, row: SpooledEvent, run: _Drain) -> bool:
        try:
            await self.publisher.publish(row.envelope)
        except BrokerUnavailable as exc:
            if not run.failure:
                run.failure = str(exc)
            if exc.pending is not None:
                self.spool.hold(row.seq, exc.pending)
            elif exc.reason == "channel_closed":
                self.spool.maybe_sent.add(row.seq)
            return False
        return True
