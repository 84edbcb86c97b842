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
same message_id; those forwards are counted in ``relay_spool_redelivered_total``.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from relay.errors import BrokerUnavailable
from relay.metrics import Metrics
from relay.publish import Envelope, Publisher
from relay.spool import Spool, SpooledEvent

log = structlog.get_logger("relay.forward")

FORWARD_WINDOW = 128  # spooled events published at once (one read, one delete per round)
#: direct publishes allowed in flight at once; beyond it new events are spooled (reason
#: ``backlog``). It bounds what a dying link can leave unconfirmed (possible second copies)
#: and the confirm latency a slow link can build up.
MAX_DIRECT_IN_FLIGHT = 128
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0  # seconds between rounds after a failed forward


class StoreAndForward:
    """The ``deliver`` policy (see the module docstring)."""

    def __init__(self, publisher: Publisher, spool: Spool, metrics: Metrics) -> None:
        self.publisher = publisher
        self.spool = spool
        self.metrics = metrics

    async def deliver(self, envelope: Envelope) -> str:
        """Make ``envelope`` durable: ``accepted`` (confirmed by the broker) or ``spooled``
        (fsynced to the spool). Raises BrokerUnavailable (``spool_full``, ``spool_error``)
        when neither is possible, so the webhook answers 503."""
        publisher, spool = self.publisher, self.spool
        pending: asyncio.Task[bool] | None = None
        if spool.depth:
            reason = "queued"  # behind events already spooled: keep the spool's order
        elif not publisher.connected.is_set():
            reason = "disconnected"
        elif publisher.suspect:
            reason = "stalled"  # do not add to the publishes a silent link holds
        elif publisher.in_flight() >= MAX_DIRECT_IN_FLIGHT:
            reason = "backlog"
        else:
            try:
                await publisher.publish(envelope)
            except BrokerUnavailable as exc:
                reason, pending = exc.reason, exc.pending
            else:
                return "accepted"
        seq = await spool.put(envelope, reason, pending)
        if reason == "channel_closed":  # the link died after the publish went out
            spool.maybe_sent.add(seq)
        self.metrics.spooled(reason)
        return "spooled"


class Forwarder:
    """Publishes spooled events to the broker, oldest first, and deletes each after its
    confirm. ``start`` runs it in the background; ``stop`` lets the round in flight finish
    (bounded by ``amqp.publish_timeout``) so that no confirmed event stays behind."""

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
        """Stop after the round in flight (its confirmed rows are deleted); the rest stays
        spooled for the next start."""
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
            rows = await spool.peek(self.window)
            batch: list[SpooledEvent] = []
            for row in rows:
                if row.seq in spool.held:
                    break  # its first publish may still be confirmed: keep the order
                if row.seq not in spool.deleting:
                    batch.append(row)
            if not batch:
                await spool.changed.wait()
                continue
            self._idle.clear()
            try:
                ok = await self.forward_batch(batch)
            finally:
                self._idle.set()
            if ok:
                delay = BACKOFF_MIN
            else:  # a nack, a deadline or a closing link: back off before the next round
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def forward_batch(self, batch: list[SpooledEvent]) -> bool:
        """Publish ``batch`` at once (in seq order, on one channel) and delete the rows that
        were confirmed; True when all were. Used by the loop and by ``spool replay``."""
        spool = self.spool
        results = await asyncio.gather(*(self._publish(row) for row in batch))
        confirmed = [row.seq for row, ok in zip(batch, results, strict=True) if ok]
        if confirmed:
            again = sum(1 for seq in confirmed if seq in spool.maybe_sent)
            self.forwarded += len(confirmed)
            self.redelivered += again
            try:
                await spool.delete(confirmed)
            except BrokerUnavailable as exc:
                log.error("spool.delete_failed", error=str(exc), events=len(confirmed))
                return False
            log.info(
                "spool.forwarded",
                events=len(confirmed),
                maybe_duplicates=again,
                left=spool.depth,
            )
        return len(confirmed) == len(batch)

    async def _publish(self, row: SpooledEvent) -> bool:
        try:
            await self.publisher.publish(row.envelope)
        except BrokerUnavailable as exc:
            if exc.pending is not None:
                self.spool.hold(row.seq, exc.pending)
            elif exc.reason == "channel_closed":
                self.spool.maybe_sent.add(row.seq)
            return False
        return True
