"""Topology for ``retm-relay declare`` and ``retm-relay tail``: which exchange a binding pattern
needs, the consumer queues of the settings, and declaring them on a broker.

A consumer queue (``consumers.queues``) is a durable quorum queue with
``x-dead-letter-exchange`` set to the dead-letter exchange (direct, ``<amqp.exchange>.dlx`` by
default) and ``x-dead-letter-routing-key`` set to its own name, so that a message its consumer
rejects (``basic.reject``/``nack`` without requeue) lands in the quorum queue ``<name>.dead``,
bound to the dead-letter exchange with that key. Declaring is idempotent: the same arguments
again change nothing; other arguments on an existing queue are a TopologyError naming it.

``plan`` is pure (no I/O); ``declare`` talks to the broker through an aio-pika channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import aio_pika
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)
from pamqp.common import FieldTable

from relay.amqp.link import connect_first, nodes_text
from relay.amqp.publish import RELAY_QUEUE_ARGUMENTS, Publisher
from relay.errors import TopologyError
from relay.metrics import Metrics
from relay.routing import Router
from relay.settings import Settings, dead_letter_exchange

QUORUM = "quorum"


def exchanges_for_pattern(settings: Settings, pattern: str) -> tuple[str, ...]:
    """The event exchanges a binding ``pattern`` must be bound to so that it sees every event
    it matches: the family's exchange when the pattern's first word is a literal (``order.#``
    with ``amqp.exchanges = {order = "retm.orders"}`` gives ``retm.orders``), every event
    exchange when it starts with ``*`` or ``#``. Default exchange first."""
    amqp = settings.amqp
    first = pattern.split(".", 1)[0]
    if first in {"*", "#"}:
        return (amqp.exchange, *sorted(set(amqp.exchanges.values()) - {amqp.exchange}))
    return (amqp.exchanges.get(first, amqp.exchange),)


@dataclass(frozen=True, slots=True)
class Binding:
    """Queue ``queue`` bound to ``exchange`` with ``routing_key`` (a pattern, or a direct key)."""

    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class QueuePlan:
    """One queue to declare: its name, ``x-*`` arguments and bindings."""

    name: str
    arguments: FieldTable
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``declare`` creates besides the relay's own topology: the dead-letter
    exchange (direct) and the consumer queues with their dead-letter queues, in order."""

    dead_letter_exchange: str
    queues: tuple[QueuePlan, ...]


def plan(settings: Settings) -> Plan:
    """The consumer topology of ``settings`` (``consumers.*``), without touching a broker."""
    dlx = dead_letter_exchange(settings)
    queues: list[QueuePlan] = []
    for spec in settings.consumers.queues:
        bindings = tuple(
            Binding(spec.name, exchange, pattern)
            for pattern in spec.bindings
            for exchange in (
                (spec.exchange,) if spec.exchange else exchanges_for_pattern(settings, pattern)
            )
        )
        queues.append(
            QueuePlan(
                spec.name,
                {
                    "x-queue-type": QUORUM,
                    "x-dead-letter-exchange": dlx,
                    "x-dead-letter-routing-key": spec.name,
                },
                bindings,
            )
        )
        dead = f"{spec.name}.dead"
        queues.append(QueuePlan(dead, {"x-queue-type": QUORUM}, (Binding(dead, dlx, spec.name),)))
    return Plan(dlx, tuple(queues))


@dataclass(frozen=True, slots=True)
class Row:
    """One line of ``declare``'s table: an exchange or a queue that exists on the broker.

    kind: ``exchange`` or ``queue``. type: the exchange type or queue type (as declared; a
    passive check only knows that a queue ``exists``). messages and
    consumers: for queues, as the broker counted them at declare time (None for exchanges).
    detail: bindings, dead-lettering, or what the entity is for.
    """

    kind: Literal["exchange", "queue"]
    name: str
    type: str
    messages: int | None
    consumers: int | None
    detail: str


async def declare(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, *, passive: bool = False
) -> list[Row]:
    """Declare (or with ``passive`` only check) the consumer topology of ``settings`` on
    ``channel``; returns the rows of what exists. The relay's own exchanges are declared
    by ``Publisher.declare`` before this.

    Raises TopologyError naming the entity when it exists with other arguments, is missing in
    passive mode, or the broker user may not configure it. The broker closes the channel then.
    """
    p = plan(settings)
    rows: list[Row] = []
    entity = f"exchange {p.dead_letter_exchange!r}"
    try:
        if p.queues:
            if passive:
                dlx = await channel.get_exchange(p.dead_letter_exchange, ensure=True)
            else:
                dlx = await channel.declare_exchange(
                    p.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
                )
            rows.append(
                Row("exchange", dlx.name, "direct", None, None, "dead letters of the queues below")
            )
        for q in p.queues:
            entity = f"queue {q.name!r}"
            if passive:
                queue = await channel.declare_queue(q.name, passive=True)
            else:
                queue = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
                for b in q.bindings:
                    entity = f"binding of {q.name!r} to {b.exchange!r}"
                    await queue.bind(b.exchange, b.routing_key)
            result = queue.declaration_result
            bound = ", ".join(f"{b.exchange} {b.routing_key}" for b in q.bindings)
            detail = f"{'expects bindings' if passive else 'bound to'} {bound}"
            if "x-dead-letter-exchange" in q.arguments:
                detail += f"; dead letters to {q.name}.dead"
            rows.append(
                Row(
                    "queue",
                    q.name,
                    "exists" if passive else QUORUM,
                    result.message_count,
                    result.consumer_count,
                    detail,
                )
            )
    except ChannelPreconditionFailed as exc:
        raise TopologyError(
            f"{entity} exists on the broker with other arguments ({_reply_text(exc)}); "
            "delete it or rename it in consumers.queues"
        ) from None
    except ChannelNotFoundEntity as exc:
        what = "does not exist" if passive else "refers to something missing"
        raise TopologyError(f"{entity} {what}: {_reply_text(exc)}") from None
    except ChannelAccessRefused as exc:
        raise TopologyError(
            f"the broker user may not configure {entity}: {_reply_text(exc)}"
        ) from None
    return rows


async def relay_rows(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> list[Row]:
    """Rows for the relay's own topology (event exchanges, the unrouted and the quarantine
    exchanges with their queues, the archive's exchange and stream), after
    ``Publisher.declare`` made or checked them on another channel."""
    amqp = settings.amqp
    rows = [
        Row(
            "exchange",
            name,
            "topic",
            None,
            None,
            "events"
            if name == amqp.exchange
            else "events of "
            + ", ".join(sorted(f"{k}.*" for k, v in amqp.exchanges.items() if v == name)),
        )
        for name in (amqp.exchange, *sorted(set(amqp.exchanges.values()) - {amqp.exchange}))
    ]
    own = (
        (amqp.unrouted_exchange, "events no queue was bound for"),
        (amqp.rejected_exchange, "quarantine: authenticated bodies refused as not JSON objects"),
    )
    for name, purpose in own:
        rows.append(Row("exchange", name, "fanout", None, None, purpose))
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        rows.append(
            Row(
                "queue",
                name,
                "exists" if amqp.passive else RELAY_QUEUE_ARGUMENTS["x-queue-type"],
                result.message_count,
                result.consumer_count,
                f"bound to {name}",
            )
        )
    archive = settings.archive
    if archive.enabled:
        rows.append(
            Row("exchange", archive.queue, "fanout", None, None, "the archive: every event")
        )
        # AMQP 0-9-1 reports no message count for a stream (declare-ok says 0): shown as "-".
        stream = await channel.declare_queue(archive.queue, passive=True)
        rows.append(
            Row(
                "queue",
                archive.queue,
                "stream",
                None,
                stream.declaration_result.consumer_count,
                f"bound to {archive.queue}; max_age {archive.max_age}, "
                f"max_bytes {archive.max_bytes}",
            )
        )
    return rows


async def declare_all(settings: Settings) -> list[Row]:
    """Connect to the first node of ``amqp.url`` that answers; declare (with ``amqp.passive``:
    only check) the relay's own topology exactly as the relay does at start-up, then the
    consumer topology; return the rows of what exists.

    Raises TopologyError with a message for the operator when the broker is unreachable,
    refuses the credentials, or an entity disagrees, is missing or may not be configured.
    """
    amqp = settings.amqp
    address = nodes_text(amqp)
    try:
        connection, _ = await connect_first(amqp, "retm-relay declare")
    except ProbableAuthenticationError:
        raise TopologyError(
            f"the broker at {address} refused the credentials of amqp.url"
        ) from None
    except (*CONNECTION_EXCEPTIONS, TimeoutError, OSError) as exc:
        raise TopologyError(f"cannot connect to the broker at {address}: {exc}") from None
    router = Router(amqp.routing_key_template, amqp.exchange, amqp.exchanges)
    try:
        async with connection:
            await Publisher(amqp, router, Metrics(), settings.archive).declare(
                await connection.channel()
            )
            rows = await relay_rows(await connection.channel(), settings)
            rows += await declare(await connection.channel(), settings, passive=amqp.passive)
    except ChannelAccessRefused as exc:
        raise TopologyError(f"the broker user may not do this: {_reply_text(exc)}") from None
    except (AMQPError, *CONNECTION_EXCEPTIONS) as exc:
        raise TopologyError(f"the broker failed the declaration: {exc}") from None
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table with a header line, ending in a newline."""
    header = ("KIND", "NAME", "TYPE", "MESSAGES", "CONSUMERS", "DETAIL")
    lines = [
        (
            r.kind,
            r.name,
            r.type,
            "-" if r.messages is None else str(r.messages),
            "-" if r.consumers is None else str(r.consumers),
            r.detail,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *lines)) for i in range(len(header) - 1)]
    out = []
    for line in (header, *lines):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out) + "\n"


def _reply_text(exc: BaseException) -> str:
    args = [a for a in exc.args if isinstance(a, str)]
    return args[-1] if args else str(exc)
