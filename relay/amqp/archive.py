"""Reading the archive, a RabbitMQ stream, over AMQP 0-9-1: for ``retm-relay replay`` and for
what ``/health`` shows about it.

A stream is read by a consumer with a prefetch (``basic.qos``, required) and manual acks (which
only return credit), and ``x-stream-offset`` saying where to start: ``first``, ``last`` (the
last chunk), ``next`` (only what is appended from now on), an offset, or a timestamp (whole
seconds; the reader starts at the chunk written at or after it). Each delivery carries its
offset in the ``x-stream-offset`` header.

What AMQP 0-9-1 cannot tell about a stream: how many messages it holds (``queue.declare-ok``
always reports 0), its first or last offset, its size on disk or its segments; and a stream
consumer never hears "end of stream", it simply waits for more. So:

- the end of a replay is the stream's end *when the replay started*: a consumer at ``next``
  learns the offset of the first message appended after that moment, and the reader stops
  before it. When nothing was appended since, a consumer at ``last`` has learnt where the last
  chunk (a batch of messages written together) begins; once the reader is in that chunk and
  gets nothing for ``TAIL`` seconds, it is at the end (the broker sends a chunk's messages in
  one burst). A reader that gets nothing at all for ``STALL`` seconds has nothing to read (an
  empty stream, or a start after the last chunk); one that stops getting deliveries before
  the end for that long raises StreamStalled. No decision rests on a short pause before the
  last chunk, where a loaded broker may well pause;
- the oldest and newest archived times come from reading the first message (``first``) and
  the last chunk (``last``), see ``ArchiveWatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import AMQPError

from relay.errors import RelayError
from relay.logs import iso_utc_millis
from relay.settings import ArchiveSettings

log = structlog.get_logger("relay.archive")

#: the header in which RabbitMQ gives each delivery from a stream its offset
OFFSET_HEADER = "x-stream-offset"
#: the contract's receive-time header (ISO 8601 UTC, milliseconds)
RECEIVED_HEADER = "x-relay-received-at"
#: deliveries in flight to the reader (basic.qos prefetch); acked in batches of ``BATCH``
PREFETCH = 1000
BATCH = 250
#: seconds without a delivery after which a reader that has reached the last chunk as of its
#: start (whose messages the broker sends in one burst), with nothing appended since, is at the
#: stream's end
TAIL = 0.3
#: seconds without a delivery after which the broker is taken to have stopped delivering
#: before the stream's end (an error); or, for a reader that got nothing at all, that there is
#: nothing at or after its start (an empty stream, or a start after the last chunk)
STALL = 30.0
#: seconds a look of ``ArchiveWatch`` may take (opening its channel; reading)
LOOK_TIMEOUT = 10.0


class StreamStalled(RelayError):
    """The broker stopped delivering before the stream's end (after ``STALL`` seconds)."""


def stream_offset(message: AbstractIncomingMessage) -> int:
    """The stream offset of a delivery (its ``x-stream-offset`` header); -1 when missing."""
    value = (message.headers or {}).get(OFFSET_HEADER)
    return value if isinstance(value, int) else -1


def received_ms(message: AbstractIncomingMessage) -> int | None:
    """The relay's receive time of an archived event, in Unix milliseconds: its
    ``x-relay-received-at`` header (``2026-12-04T10:00:00.123Z``), else its ``timestamp``
    property (whole seconds) times 1000; None when it has neither."""
    value = (message.headers or {}).get(RECEIVED_HEADER)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return unix_ms(parsed)
    if message.timestamp is not None:
        return int(message.timestamp.timestamp()) * 1000
    return None


def unix_ms(moment: datetime) -> int:
    """Unix milliseconds of an aware datetime, exactly (no float rounding; a fraction of a
    millisecond is dropped)."""
    delta = moment - datetime.fromtimestamp(0, moment.tzinfo)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


async def read_stream(
    connection: aio_pika.abc.AbstractConnection,
    name: str,
    start: int | datetime,
    *,
    stall: float = STALL,
) -> AsyncGenerator[list[AbstractIncomingMessage], None]:
    """Read the stream ``name`` from ``start`` (an offset, or a datetime: from the chunk
    written at or after that second) to its end as of the call, in batches of at most
    ``BATCH`` deliveries in stream order. Each batch is acked (credit only) when the caller
    asks for the next one.

    Raises ChannelNotFoundEntity when the stream does not exist, StreamStalled when the broker
    stops delivering before the known end, and aio-pika's connection errors.
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    end: asyncio.Future[int] = loop.create_future()
    last_chunk: asyncio.Future[int] = loop.create_future()
    channel = await connection.channel()
    probe = await connection.channel()
    try:
        await probe.set_qos(prefetch_count=1)  # per consumer: each probe takes one message
        probe_queue = await probe.get_queue(name, ensure=True)

        def settle(future: asyncio.Future[int]) -> Callable[[AbstractIncomingMessage], Any]:
            async def on_message(message: AbstractIncomingMessage) -> None:
                if not future.done():
                    future.set_result(stream_offset(message))

            return on_message

        # First learn where "now" is, then start reading: a message appended in between is
        # read by both, so none is missed and the reader stops at the right one.
        await probe_queue.consume(settle(end), arguments={OFFSET_HEADER: "next"})
        await probe_queue.consume(settle(last_chunk), arguments={OFFSET_HEADER: "last"})
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(name, ensure=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        await queue.consume(on_message, arguments={OFFSET_HEADER: start})
        highest = -1
        while True:
            in_last_chunk = last_chunk.done() and highest >= last_chunk.result()
            # in the last chunk, whose messages come in one burst: a short pause is the end
            timeout = TAIL if in_last_chunk and not end.done() else stall
            try:
                async with asyncio.timeout(timeout):  # (wait_for can swallow a cancel in 3.11)
                    first = await inbox.get()
            except TimeoutError:
                if in_last_chunk and not end.done():
                    return  # read to the end, and nothing was appended since the start
                if highest < 0 and not end.done():
                    return  # nothing at or after ``start`` (or an empty stream)
                raise StreamStalled(
                    f"no delivery for {stall:g}s before the stream's end (read up to offset "
                    f"{highest})"
                ) from None
            batch = [first]
            while len(batch) < BATCH and not inbox.empty():
                batch.append(inbox.get_nowait())
            stop = end.result() if end.done() else None
            if stop is not None:
                batch = [m for m in batch if stream_offset(m) < stop]
            if batch:
                highest = stream_offset(batch[-1])
                yield batch
                await batch[-1].ack(multiple=True)
            if stop is not None and (not batch or highest >= stop - 1):
                return
    finally:
        for ch in (probe, channel):
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, AMQPError, TimeoutError):
                async with asyncio.timeout(1):  # a stalled link never answers
                    await ch.close()


async def first_and_last(
    channel: AbstractChannel, name: str, wait: float = 1.0
) -> tuple[int | None, int | None]:
    """The receive times (Unix ms) of the stream's first message and the newest of its last
    chunk, as far as ``wait`` seconds of reading show; (None, None) for an empty stream.

    Raises ChannelNotFoundEntity when the stream does not exist, aio-pika's errors otherwise.
    """
    await channel.set_qos(prefetch_count=200)
    queue = await channel.get_queue(name, ensure=True)
    oldest = await _read(queue, "first", wait, 1)
    newest = await _read(queue, "last", wait, 200)
    first = min((t for t in oldest if t is not None), default=None)
    last = max((t for t in newest if t is not None), default=None)
    return first, last


async def _read(
    queue: aio_pika.abc.AbstractQueue, offset: str, wait: float, most: int
) -> list[int | None]:
    """Receive times of up to ``most`` deliveries from ``offset``: the first within ``wait``
    seconds, the rest as long as they keep coming (0.2 s apart at most)."""
    got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        got.put_nowait(message)

    tag = await queue.consume(on_message, arguments={OFFSET_HEADER: offset})
    times: list[int | None] = []
    try:
        timeout = wait
        while len(times) < most:
            try:
                async with asyncio.timeout(timeout):
                    message = await got.get()
            except TimeoutError:
                break
            times.append(received_ms(message))
            await message.ack()
            timeout = 0.2
    finally:
        with contextlib.suppress(AMQPError, *CONNECTION_EXCEPTIONS, TimeoutError):
            async with asyncio.timeout(1):  # a stalled link never answers
                await queue.cancel(tag)
    return times


@dataclass(slots=True)
class ArchiveWatch:
    """What ``/health`` shows about the archive, refreshed every ``interval`` seconds by
    reading the stream's first message and last chunk on a channel of the relay's own link.

    open_channel: returns a new channel on the broker link (closed after each look), or raises.
    last_archived: the receive time (Unix seconds) of the latest event this relay archived.
    connected: set while the broker link is up (looks wait for it). interval: seconds.
    """

    settings: ArchiveSettings
    open_channel: Callable[[], Awaitable[AbstractChannel]]
    last_archived: Callable[[], float | None]
    connected: asyncio.Event
    interval: float = 30.0
    oldest_ms: int | None = None
    newest_ms: int | None = None
    checked_at: float | None = None
    error: str | None = None
    _task: asyncio.Task[None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def start(self) -> None:
        """Start looking in the background (a task; ``stop`` ends it)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-archive")

    async def stop(self) -> None:
        """Stop looking (cancelling again should a library swallow the cancellation)."""
        task = self._task
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.warning("archive.watch_failed", error=str(task.exception()))

    async def _run(self) -> None:
        while True:
            await self.connected.wait()
            await self.look()
            await asyncio.sleep(self.interval)

    async def look(self) -> None:
        """Read the first and newest receive times now (after a look under way); on failure
        keep the last values and set ``error``."""
        async with self._lock:
            await self._look()

    async def _look(self) -> None:
        try:
            async with asyncio.timeout(LOOK_TIMEOUT):
                channel = await self.open_channel()
        except (RelayError, AMQPError, *CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            self.error = f"no broker link: {exc or type(exc).__name__}"
            return
        try:
            async with asyncio.timeout(LOOK_TIMEOUT):
                self.oldest_ms, self.newest_ms = await first_and_last(channel, self.settings.queue)
            self.error = None
        except (AMQPError, *CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            self.error = str(exc) or type(exc).__name__
            log.warning("archive.unreadable", queue=self.settings.queue, error=self.error)
        finally:
            self.checked_at = time.time()
            # a stalled link never answers a close: never wait for it long (nor on shutdown)
            with contextlib.suppress(AMQPError, *CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(1):
                    await channel.close()

    def status(self) -> dict[str, Any]:
        """The ``archive`` section of ``/health``: times as ISO 8601 UTC with milliseconds."""
        last = self.last_archived()
        return {
            "enabled": True,
            "queue": self.settings.queue,
            "max_age": self.settings.max_age,
            "max_bytes": self.settings.max_bytes,
            "oldest_received_at": _iso_ms(self.oldest_ms),
            "newest_received_at": _iso_ms(self.newest_ms),
            "last_archived_here_at": None if last is None else iso_utc_millis(last),
            "checked_at": _iso_ms(None if self.checked_at is None else int(self.checked_at * 1e3)),
            "error": self.error,
            "unknown": "size on disk, message count and segments: AMQP 0-9-1 does not report "
            "them for a stream (see the management UI or rabbitmq-streams)",
        }


def _iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
