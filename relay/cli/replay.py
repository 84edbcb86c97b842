"""``retm-relay replay``: republish a time window of the archive (a RabbitMQ stream) to a queue
or an exchange, for a consumer that mishandled events (docs/replay.md).

Not ``retm-relay spool replay``, which forwards this host's spool (events the broker could not
take yet) to the broker once.

The window is judged on each event's receive time, to the millisecond (the
``x-relay-received-at`` header). The stream is read from the second before ``--since`` (a
stream's timestamps are whole seconds) to its end as of the start (``relay.amqp.archive``):
to the end, not to ``--until``, because an event forwarded late from a relay's spool is
appended after events received later than it. Each matching event is republished with
publisher confirms, unchanged (body, ``message_id``, type, timestamp, headers) but for the
added ``x-relay-replayed-at`` header; a consumer that drops message_ids it has already taken
takes each event once.

Windows of ``BATCH`` events are published at once and confirmed before the next is read, so
after a broker failure every event before the first of the failed window is published: the
error names that stream offset, and ``--from-offset`` resumes there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import IO, Any, NoReturn

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity, DeliveryError, PublishError

from relay.amqp.archive import (
    OFFSET_HEADER,
    StreamStalled,
    read_stream,
    received_ms,
    stream_offset,
    unix_ms,
)
from relay.amqp.link import connect_first, nodes_text
from relay.errors import RelayError
from relay.logs import iso_utc_millis
from relay.settings import Settings, is_binding_pattern

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
REPLAYED_HEADER = "x-relay-replayed-at"
BUSINESS_HEADER = "x-retm-business"
_DURATION_RE = re.compile(r"([1-9][0-9]{0,8})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ReplayError(RelayError):
    """The replay stopped (broker unreachable, stream or target missing, broker failure
    mid-way); the message says how far it got and how to resume."""


def parse_time(text: str, now: datetime) -> datetime:
    """A TIME argument: ISO 8601 with a zone (``2026-12-04T10:00:00Z``,
    ``2026-12-04T11:00:00.250+01:00``), or a duration back from ``now``: a whole number and
    ``s``, ``m``, ``h`` or ``d`` (``90s``, ``10m``, ``2h``, ``3d``). Returns an aware UTC
    datetime; raises ValueError saying what is wrong."""
    duration = _DURATION_RE.fullmatch(text)
    if duration:
        try:
            return now - timedelta(seconds=int(duration[1]) * _UNITS[duration[2]])
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither ISO 8601 with a zone (2026-12-04T10:00:00Z) nor a duration "
            "back from now (90s, 10m, 2h, 3d)"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no zone: add Z or an offset such as +01:00")
    return moment.astimezone(UTC)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether ``routing_key`` matches the topic binding ``pattern`` as RabbitMQ's topic
    exchange decides: words split at ``.``, ``*`` is exactly one word, ``#`` zero or more."""
    return _matcher(pattern)(routing_key)


@cache
def _matcher(pattern: str) -> Callable[[str], bool]:
    words = tuple(pattern.split("."))

    def matches(routing_key: str) -> bool:
        key = routing_key.split(".")

        @cache
        def at(i: int, j: int) -> bool:
            if i == len(words):
                return j == len(key)
            if words[i] == "#":
                return at(i + 1, j) or (j < len(key) and at(i, j + 1))
            return j < len(key) and words[i] in ("*", key[j]) and at(i + 1, j + 1)

        return at(0, 0)

    return matches


@dataclass(frozen=True, slots=True)
class Window:
    """Which archived events a replay takes: received in [``since_ms``, ``until_ms``) (Unix
    milliseconds; ``until_ms`` None: no upper bound), routing key matching ``pattern``, and
    with ``business`` as their ``x-retm-business`` header when set."""

    since_ms: int
    until_ms: int | None
    pattern: str = "#"
    business: str | None = None

    def matches(self, message: AbstractIncomingMessage) -> bool:
        """Whether an archived message is in the window (one without a receive time is not)."""
        at = received_ms(message)
        if at is None or at < self.since_ms:
            return False
        if self.until_ms is not None and at >= self.until_ms:
            return False
        if self.business is not None:
            value = (message.headers or {}).get(BUSINESS_HEADER)
            if value != self.business:
                return False
        return topic_matches(self.pattern, message.routing_key or "")


@dataclass(frozen=True, slots=True)
class Target:
    """Where matching events go: a queue (through the default exchange) or an exchange (with
    each event's own routing key)."""

    queue: str | None = None
    exchange: str | None = None

    def describe(self) -> str:
        return f"queue {self.queue}" if self.queue is not None else f"exchange {self.exchange}"


@dataclass(slots=True)
class Progress:
    """Counts of a replay so far. ``resume_offset``: the stream offset from which a new run
    (``--from-offset``) misses nothing (everything before it was published or not matched);
    ``returned``: events an exchange had no queue bound for (``--to-exchange`` only)."""

    read: int = 0
    matched: int = 0
    published: int = 0
    returned: int = 0
    resume_offset: int | None = None

    def summary(self, target: Target, dry_run: bool) -> str:
        if dry_run:
            return (
                f"dry run: read {self.read}, matched {self.matched}, published 0 "
                f"(would publish {self.matched} to {target.describe()})"
            )
        line = f"read {self.read}, matched {self.matched}, published {self.published}"
        if self.returned:
            line += f", returned {self.returned} (no queue bound for their routing key)"
        return f"{line} to {target.describe()}"


def replayed(message: AbstractIncomingMessage, replayed_at: str) -> aio_pika.Message:
    """The message to republish: body and properties as archived, headers as archived without
    the stream's ``x-stream-offset``, plus ``x-relay-replayed-at`` (ISO 8601 UTC)."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != OFFSET_HEADER}
    headers[REPLAYED_HEADER] = replayed_at
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def replay(
    settings: Settings,
    window: Window,
    target: Target,
    *,
    dry_run: bool = False,
    from_offset: int | None = None,
    progress: Progress | None = None,
    on_batch: Callable[[Progress], None] = lambda _: None,
) -> Progress:
    """Read the archive ``archive.queue`` and republish what ``window`` matches to
    ``target`` (with ``dry_run`` only count). ``from_offset``: start at this stream offset
    instead of the second before ``window.since_ms``. ``on_batch`` is called after each
    batch (for a progress bar). Returns the counts; ``progress`` (when given) is updated as it
    goes, so the caller knows how far a failed replay got.

    Raises ReplayError (the broker unreachable, the stream or target missing, a publish
    nacked, the broker failing mid-way).
    """
    progress = progress if progress is not None else Progress()
    address = nodes_text(settings.amqp)
    try:
        connection, _ = await connect_first(settings.amqp, "retm-relay replay")
    except (*CONNECTION_EXCEPTIONS, TimeoutError, OSError) as exc:
        raise ReplayError(f"cannot connect to the broker at {address}: {exc}") from None
    async with connection:
        publish = await _publisher(connection, target)
        start: int | datetime = (
            from_offset
            if from_offset is not None
            else datetime.fromtimestamp(window.since_ms // 1000 - 1, UTC)
        )
        replayed_at = iso_utc_millis(time.time())
        name = settings.archive.queue
        try:
            async with contextlib.aclosing(read_stream(connection, name, start)) as batches:
                async for batch in batches:
                    progress.resume_offset = stream_offset(batch[0])
                    matched = [m for m in batch if window.matches(m)]
                    progress.read += len(batch)
                    progress.matched += len(matched)
                    if not dry_run and matched:
                        outcomes = await asyncio.gather(
                            *(
                                publish(replayed(m, replayed_at), m.routing_key or "")
                                for m in matched
                            ),
                            return_exceptions=True,
                        )
                        progress.published += sum(o is True for o in outcomes)
                        progress.returned += sum(o is False for o in outcomes)
                        failed = [o for o in outcomes if isinstance(o, BaseException)]
                        if failed:
                            raise failed[0]
                    progress.resume_offset = stream_offset(batch[-1]) + 1
                    on_batch(progress)
        except ChannelNotFoundEntity:
            raise ReplayError(
                f"the archive stream {name!r} does not exist on {address} (archive.queue)"
            ) from None
        except (AMQPError, *CONNECTION_EXCEPTIONS, StreamStalled, TimeoutError, OSError) as exc:
            raise ReplayError(f"the broker failed: {exc or type(exc).__name__}") from None
    return progress


async def _publisher(
    connection: aio_pika.abc.AbstractConnection, target: Target
) -> Callable[[aio_pika.Message, str], Any]:
    """Check that the target exists (ReplayError otherwise) and return the coroutine function
    that publishes one message to it with a confirm: True when delivered, False when the
    target exchange had no queue bound for it; a nack raises ReplayError."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        if target.queue is not None:
            await channel.declare_queue(target.queue, passive=True)
            exchange = channel.default_exchange
        else:
            assert target.exchange is not None
            exchange = await channel.get_exchange(target.exchange, ensure=True)
    except ChannelNotFoundEntity:
        raise ReplayError(f"the target {target.describe()} does not exist") from None

    async def publish(message: aio_pika.Message, routing_key: str) -> bool:
        key = target.queue if target.queue is not None else routing_key
        try:
            await exchange.publish(message, key, mandatory=True)
        except PublishError:
            if target.queue is not None:
                raise ReplayError(f"the target {target.describe()} disappeared") from None
            return False
        except DeliveryError:
            raise ReplayError(
                f"the broker refused (nacked) a message for {target.describe()}"
            ) from None
        return True

    return publish


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``retm-relay replay``; its usage errors are one line (exit 2)."""

    def one_line_error(message: str) -> NoReturn:
        sys.stderr.write(f"retm-relay replay: {message} (see retm-relay replay --help)\n")
        raise SystemExit(EXIT_USAGE)

    parser.error = one_line_error  # type: ignore[method-assign]
    parser.add_argument(
        "--since",
        required=True,
        metavar="TIME",
        help="first receive time of the window: ISO 8601 with a zone (2026-12-04T10:00:00Z) "
        "or a duration back from now (90s, 10m, 2h, 3d)",
    )
    parser.add_argument(
        "--until",
        metavar="TIME",
        help="end of the window (exclusive), in the same forms (default: no end; the archive "
        "is read to its end as of the start)",
    )
    parser.add_argument(
        "--pattern",
        default="#",
        help="only events whose routing key matches this topic pattern ('*' one word, '#' "
        "zero or more; default #)",
    )
    parser.add_argument(
        "--business", metavar="ID", help="only events of this RETM business (x-retm-business)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-queue", metavar="Q", help="publish to this existing queue")
    target.add_argument(
        "--to-exchange",
        metavar="X",
        help="publish to this existing exchange with each event's own routing key",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="only count what would be replayed; publish nothing"
    )
    parser.add_argument(
        "--from-offset",
        type=int,
        metavar="N",
        help="start reading the archive at this stream offset instead of the second before "
        "--since (what a replay that failed mid-way prints, to resume it)",
    )


def _usage(message: str) -> int:
    sys.stderr.write(f"retm-relay replay: {message}\n")
    return EXIT_USAGE


def run(settings: Settings, args: argparse.Namespace, *, out: IO[str], err: IO[str]) -> int:
    """Check the arguments (exit 2 with one line), replay with a progress bar on a terminal,
    print the one-line summary on ``out``; exit 1 with how far it got on a broker failure."""
    from tqdm import tqdm  # noqa: PLC0415 - only this command draws a bar

    from relay.cli.args import run_loop  # noqa: PLC0415

    now = datetime.now(UTC)
    try:
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until is not None else None
    except ValueError as exc:
        return _usage(f"{exc}")
    if since > now:
        return _usage(f"--since {args.since} is in the future")
    if until is not None and until <= since:
        return _usage("--until must be later than --since")
    if not is_binding_pattern(args.pattern):
        return _usage(
            f"--pattern {args.pattern!r} is not a topic pattern (dotted words of [a-z0-9_-], "
            "'*', '#')"
        )
    if args.from_offset is not None and args.from_offset < 0:
        return _usage("--from-offset must be 0 or more")
    archive = settings.archive.queue
    if archive in (args.to_queue, args.to_exchange):
        return _usage(f"the target must not be the archive {archive!r} itself")
    window = Window(
        unix_ms(since), None if until is None else unix_ms(until), args.pattern, args.business
    )
    target = Target(args.to_queue, args.to_exchange)
    progress = Progress()
    with tqdm(unit=" events", file=err, disable=None, dynamic_ncols=True) as bar:

        def on_batch(p: Progress) -> None:
            bar.update(p.read - bar.n)
            bar.set_postfix(matched=p.matched, published=p.published, refresh=False)

        try:
            run_loop(
                replay(
                    settings,
                    window,
                    target,
                    dry_run=args.dry_run,
                    from_offset=args.from_offset,
                    progress=progress,
                    on_batch=on_batch,
                )
            )
        except ReplayError as exc:
            bar.close()
            err.write(f"retm-relay replay: {exc}{_how_far(progress)}\n")
            return EXIT_FAILURE
    out.write(progress.summary(target, args.dry_run) + "\n")
    return EXIT_OK


def _how_far(progress: Progress) -> str:
    """How far a failed replay got and how to resume it (empty when it read nothing)."""
    done = f"; read {progress.read}, matched {progress.matched}, published {progress.published}"
    if progress.resume_offset is None:
        return "" if progress.read == 0 else f"{done}; run the same command again"
    return (
        f"{done}; every matching event before stream offset {progress.resume_offset} is "
        f"published: resume with the same arguments and --from-offset {progress.resume_offset}"
        " (consumers that deduplicate by message_id take any event published twice once)"
    )
