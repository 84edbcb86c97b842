"""``retm-relay tail``: watch the events the relay publishes, live, one line each; or read what
already waits on a named queue (``--queue``).

tail binds a temporary queue to the event exchange(s) with a binding pattern and prints every
message that arrives. The queue is server-named, exclusive and auto-delete (it vanishes with the
connection), capped at ``MAX_BACKLOG`` messages (the oldest are dropped), and consumed with
automatic acknowledgement: tail never takes a message from anyone else's queue.

One caveat, by the nature of AMQP: while tail is bound, the events its pattern matches count as
routed, so an event no other queue is bound for is not also diverted to the unrouted exchange.

``--queue NAME`` reads the messages already waiting on an existing queue (``retm.unrouted``, the
quarantine ``retm.rejected``, a consumer's dead-letter queue), prints them and exits when the
queue holds no more (or after ``--count``). By default this is non-destructive: each message is
taken without acknowledgement and, once all are printed, the whole batch is given back with
``basic.nack(multiple, requeue)``, so the queue holds the same messages again (flagged
redelivered; a quorum queue counts the requeue as a delivery). Should tail die first, the broker
requeues the unacknowledged messages itself when the connection closes. ``ack=True`` (``--ack``)
acknowledges each message once printed, removing it from the queue. Messages are taken one at a
time with ``basic.get``, so tail never holds more than one in memory.

Line format: ``<routing key> <business> <reference> <summary>``; ``-`` for what is unknown. A
message whose routing key does not name its event shows the event instead (``x-retm-event``,
else the ``type`` property): one that ``retm-relay replay --to-queue`` published through the
default exchange, or that was dead-lettered under its queue's name, has the queue's name as
routing key. The summary comes from RETM's field names (docs/retm.md, "Invoice webhooks",
"Customer webhook", "Error webhook"): ``invoice_id``, ``total_price``, ``products`` and
``status`` of invoice events, ``customer.id`` and ``customer.name`` of customer events,
``code``, ``endpoint`` and ``message`` of the error webhook, ``reward_code`` of loyalty hooks;
for anything else, the body's size and top-level keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import ChannelNotFoundEntity, ProbableAuthenticationError
from tqdm import tqdm

from relay.amqp.link import connect_first, nodes_text
from relay.amqp.publish import REJECTED_REASON_HEADER
from relay.amqp.topology import exchanges_for_pattern
from relay.settings import Settings

MAX_BACKLOG = 10_000  # x-max-length of tail's queue: a slow terminal never fills the broker
PREFETCH = 200
SUMMARY_CHARS = 100
INVOICE_STATUS = {1: "closed", 2: "pending", 3: "active", 4: "refunded", 5: "void"}


def _printable(text: str, limit: int = SUMMARY_CHARS) -> str:
    """``text`` safe for a terminal: control characters (escape sequences) become ``?``."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def summary(routing_key: str, body: bytes) -> str:
    """A short description of an event from its body: the order total, the customer, the
    error ... (see the module docstring); ``N bytes`` when nothing better is known."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{len(body)} bytes, not JSON"
    if not isinstance(data, dict):
        return f"{len(body)} bytes"
    parts: list[str] = []
    family = routing_key.split(".", 1)[0]
    if family == "order":
        if data.get("invoice_id") is not None:
            parts.append(f"invoice {_text(data['invoice_id'])}")
        if data.get("total_price") is not None:
            parts.append(f"total {_text(data['total_price'])}")
        if isinstance(data.get("products"), list):
            n = len(data["products"])
            parts.append(f"{n} product{'' if n == 1 else 's'}")
        status = data.get("status")
        if status is not None:
            named = INVOICE_STATUS.get(status) if isinstance(status, int) else None
            parts.append(named or f"status {_text(status)}")
    elif family == "customer" and isinstance(data.get("customer"), dict):
        customer = data["customer"]
        parts.append(
            " ".join(
                _text(customer[k]) for k in ("id", "name") if customer.get(k) not in (None, "")
            )
        )
        parts[-1] = f"customer {parts[-1]}".rstrip()
    elif routing_key.startswith("delivery.error"):
        parts.append(
            f"code {_text(data.get('code'))} at {_text(data.get('endpoint'))}: "
            f"{_text(data.get('message'))}"
        )
    elif data.get("reward_code") is not None:
        parts.append(f"reward code {_text(data['reward_code'])}")
    if not parts:
        keys = list(data)
        listed = ", ".join(keys[:6]) + (", …" if len(keys) > 6 else "")
        parts.append(f"{len(body)} bytes: {listed}" if keys else f"{len(body)} bytes")
    return _printable(", ".join(parts))


def event_key(message: AbstractIncomingMessage) -> str:
    """The routing key that names ``message``'s event: its routing key when that is the event
    (``x-retm-event``, else the ``type`` property) or the event with more segments
    (``amqp.routing_key_template``); else the event itself. A message that ``replay
    --to-queue`` published through the default exchange, or that was dead-lettered with
    ``x-dead-letter-routing-key``, has a queue's name as routing key. A message that names no
    event (not the relay's, or a quarantined body) keeps its routing key."""
    headers: Mapping[str, Any] = message.headers or {}
    routing_key = message.routing_key or ""
    if REJECTED_REASON_HEADER in headers:
        return routing_key
    event = _text(headers.get("x-retm-event")) or _text(message.type)
    if not event or routing_key == event or routing_key.startswith(event + "."):
        return routing_key
    return event


def format_line(message: AbstractIncomingMessage) -> str:
    """One line for ``message``: routing key (the event's, see ``event_key``), business,
    reference, summary. A message from the unrouted exchange shows the routing key it was meant
    for, marked ``(unrouted)``; one from the quarantine shows why it was refused (its routing
    key), marked ``(rejected)``."""
    headers: Mapping[str, Any] = message.headers or {}
    routing_key = event_key(message)
    intended = headers.get("x-relay-routing-key")
    shown = f"{_text(intended)} (unrouted)" if intended is not None else routing_key
    if REJECTED_REASON_HEADER in headers:
        shown = f"{_text(headers[REJECTED_REASON_HEADER])} (rejected)"
    business = _text(headers.get("x-retm-business")) or "-"
    reference = _text(headers.get("x-retm-reference")) or "-"
    key_for_summary = _text(intended) if intended is not None else routing_key
    raw_event = headers.get("x-retm-event-raw")
    text = summary(key_for_summary, message.body)
    if raw_event is not None:
        text = _printable(f"event {_text(raw_event)!r}, {text}")
    return (
        f"{_printable(shown, 255):<20} {_printable(business, 64):<14} "
        f"{_printable(reference, 64):<36} {text}"
    )


def _json_default(value: object) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # AMQP decimals and anything else a publisher may put in a header


def format_json(message: AbstractIncomingMessage) -> bytes:
    """The whole message as one JSON line: exchange, routing key, properties, headers and the
    body (parsed JSON; the text when it is not JSON)."""
    try:
        body: Any = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        body = message.body.decode("utf-8", "replace")
    document = {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "redelivered": message.redelivered,
        "properties": {
            "content_type": message.content_type,
            "delivery_mode": int(message.delivery_mode) if message.delivery_mode else None,
            "message_id": message.message_id,
            "type": message.type,
            "timestamp": message.timestamp,
            "app_id": message.app_id,
        },
        "headers": dict(message.headers or {}),
        "body": body,
    }
    return orjson.dumps(document, default=_json_default)


class TailError(Exception):
    """tail cannot go on: the broker is unreachable, an exchange or queue is missing, the link
    broke."""


async def run(
    settings: Settings,
    pattern: str,
    *,
    exchange: str | None = None,
    as_json: bool = False,
    count: int | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Bind and print until SIGINT/SIGTERM, or until ``count`` events were printed; returns
    the number printed. Raises TailError (with a message for the operator) when the broker is
    unreachable, an exchange does not exist or the link breaks."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await _tail(settings, pattern, exchange, as_json, count, out, err, stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _connect(settings: Settings, name: str) -> AbstractConnection:
    """A connection to the first of ``amqp.url``'s nodes that answers; raises TailError saying
    why not."""
    address = nodes_text(settings.amqp)
    try:
        connection, _ = await connect_first(settings.amqp, f"retm-relay tail {name}")
    except ProbableAuthenticationError:
        raise TailError(f"the broker at {address} refused the credentials of amqp.url") from None
    except (*CONNECTION_EXCEPTIONS, TimeoutError, OSError) as exc:
        raise TailError(f"cannot connect to the broker at {address}: {exc}") from None
    return connection


async def read_queue(
    settings: Settings,
    queue_name: str,
    *,
    ack: bool = False,
    as_json: bool = False,
    count: int | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Print the messages waiting on the existing queue ``queue_name`` until it holds no more
    (or ``count`` were printed); returns the number printed. ``ack``: acknowledge (remove)
    each printed message; otherwise give them all back to the queue at the end (see the module
    docstring). Raises TailError when the broker is unreachable, the queue does not exist or the
    link breaks."""
    address = nodes_text(settings.amqp)
    connection = await _connect(settings, queue_name)
    printed = 0
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.get_queue(queue_name, ensure=True)
        except ChannelNotFoundEntity:
            raise TailError(f"queue {queue_name!r} does not exist on {address}") from None
        mode = "acknowledging (removing) each" if ack else "giving every message back at the end"
        err.write(f"retm-relay tail: reading queue {queue_name} ({mode})\n")
        err.flush()
        last: AbstractIncomingMessage | None = None
        try:
            while count is None or printed < count:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                line = format_json(message).decode() if as_json else format_line(message)
                out.write(line + "\n")
                out.flush()
                printed += 1
                if ack:
                    await message.ack()
                else:
                    last = message
        except CONNECTION_EXCEPTIONS as exc:
            raise TailError(f"the broker link was lost after {printed} messages: {exc}") from None
        finally:
            if last is not None and not channel.is_closed:
                await last.nack(multiple=True, requeue=True)
    return printed


async def _tail(
    settings: Settings,
    pattern: str,
    exchange: str | None,
    as_json: bool,
    count: int | None,
    out: TextIO,
    err: TextIO,
    stop: asyncio.Event,
) -> int:
    address = nodes_text(settings.amqp)
    connection = await _connect(settings, pattern)

    lost: list[str] = []
    received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    def on_close(_: object, exc: BaseException | None = None) -> None:
        if not stop.is_set():
            lost.append(str(exc) if exc else "closed")
            stop.set()

    printed = 0
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(
            None,
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": MAX_BACKLOG, "x-overflow": "drop-head"},
        )
        targets = (exchange,) if exchange else exchanges_for_pattern(settings, pattern)
        for name in targets:
            try:
                await channel.get_exchange(name, ensure=True)
            except ChannelNotFoundEntity:
                raise TailError(
                    f"exchange {name!r} does not exist on {address}: start the relay once "
                    "or run `retm-relay declare`"
                ) from None
            await queue.bind(name, pattern)
        connection.close_callbacks.add(on_close)
        await queue.consume(received.put, no_ack=True)
        amqp = settings.amqp
        fanout = set(targets) <= {amqp.unrouted_exchange, amqp.rejected_exchange}
        err.write(
            f"retm-relay tail: listening on {queue.name}, bound to {', '.join(targets)}"
            + ("" if fanout else f" with {pattern!r}")
            + " (Ctrl-C stops)\n"
            + (
                ""  # a fanout of the relay's own: tail takes copies, nothing is diverted
                if fanout
                else "retm-relay tail: while this runs, an event that no other queue is bound "
                "for reaches only this tail, not the unrouted queue\n"
            )
        )
        err.flush()
        printed = await _print_until_stopped(received, stop, as_json, count, out, err)
        stop.set()  # closing the connection from here on is not a lost link
    if lost:
        raise TailError(f"the broker link was lost after {printed} events: {lost[0]}")
    return printed


async def _print_until_stopped(
    received: asyncio.Queue[AbstractIncomingMessage],
    stop: asyncio.Event,
    as_json: bool,
    count: int | None,
    out: TextIO,
    err: TextIO,
) -> int:
    printed = 0
    # A live count (with a bar when --count is given) on stderr, only when it is a terminal.
    bar_format = (
        "{desc}{n_fmt} events, {elapsed}, {rate_fmt}"
        if count is None
        else "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} events, {elapsed}"
    )
    with tqdm(
        total=count, unit="event", file=err, disable=None, leave=False, bar_format=bar_format
    ) as bar:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while count is None or printed < count:
                getting = asyncio.ensure_future(received.get())
                await asyncio.wait((getting, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                message = getting.result()
                line = format_json(message).decode() if as_json else format_line(message)
                if bar.disable:
                    out.write(line + "\n")
                    out.flush()
                else:
                    tqdm.write(line, file=out)
                    out.flush()
                printed += 1
                bar.update(1)
                if received.empty():
                    bar.refresh()  # tqdm redraws at most every 0.1 s: show the final count
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
    return printed
