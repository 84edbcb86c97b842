"""The two ways a publish reaches the broker: the fast path and aiormq's public ``basic_publish``.

``FastSender`` (the default) marshals the frames of each publish with ``relay.amqp.wire`` and
writes every publish of one event-loop turn in one go, registering each confirmation in aiormq's
*private* channel state exactly as aiormq's own ``basic_publish`` does: ``delivery_tag`` (the
channel's publish counter), ``confirmations`` (delivery tag -> future, settled by aiormq when an
ack, nack, return or channel close arrives), ``message_id_delivery_tag`` (how a Basic.Return
finds its publish) and ``write_queue`` (the connection's frame writer, fed ``ChannelFrame``).
That saves most of the relay's CPU per webhook, at the price of depending on aiormq internals.

So the fast path is only used after it has passed two checks:

1. ``internals_problem``, on each new channel: the attributes are there, with the types and the
   values the fast path expects of a fresh channel in publisher-confirm mode, returns raising;
2. ``probe``, once per process on a channel of its own: one mandatory publish through the fast
   path to the default exchange with a routing key no queue can have (``amq.*`` names are
   reserved for the broker), which the broker must return (the confirmation fails with
   PublishError, found through ``message_id_delivery_tag``) and then ack, leaving no message
   anywhere.

When either fails, or ``amqp.fast_publish = false`` forces it, ``PublicSender`` publishes with
aiormq's public ``Channel.basic_publish`` instead: same frames, same confirms, about a third more
CPU per event. ``pyproject.toml`` pins the aiormq, aio-pika and pamqp versions both paths were
tested with; ``tests/test_publish_contract.py`` and ``tests/test_spool_faults.py`` run the whole
publish contract through both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, Protocol

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError, PublishError
from pamqp.commands import Basic

from relay.amqp import wire

PublishPath = Literal["fast", "public"]

#: the probe's routing key on the default exchange: queue names starting with ``amq.`` are
#: reserved for the broker, so no queue by this name can exist and the probe is always returned
PROBE_ROUTING_KEY = "amq.retm-relay.fast-path-probe"


@dataclasses.dataclass(frozen=True, slots=True)
class Properties:
    """The AMQP properties of one publish (the message contract's set).

    timestamp: Unix seconds. headers: string values (``x-retm-*``, ``x-relay-*``).
    """

    content_type: str
    headers: Mapping[str, Any]
    delivery_mode: int
    message_id: str
    timestamp: int
    message_type: str
    app_id: str


class Sender(Protocol):
    """Sends one publish (mandatory unless told otherwise, on a channel in publisher-confirm
    mode)."""

    path: PublishPath

    def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
    ) -> asyncio.Future[Any]:
        """Queue the publish; the future settles with the broker's answer: the Basic.Ack frame,
        PublishError when the broker returned it, DeliveryError when nacked, an AMQPError when
        the channel closes first."""
        ...


class FastSender:
    """Writes the Basic.Publish frames made during one event-loop turn in one write.

    Each ``send`` returns the publish's confirmation future. At the end of the turn, ``_flush``
    gives every publish of the batch the channel's next delivery tag and registers its future in
    the channel's ``confirmations`` (and its message_id for returns), exactly as aiormq's
    ``basic_publish`` does, then hands the frames to the connection's writer as one frame group.
    Tags are assigned and frames queued in one synchronous step, so they stay in the order the
    broker numbers them, also alongside aiormq's own ``basic_publish`` on the same channel.
    """

    __slots__ = ("_batch", "_loop", "channel", "max_content", "number")
    path: PublishPath = "fast"

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self.number = channel.number
        self.max_content = channel.max_content_size
        self._loop = asyncio.get_running_loop()
        self._batch: list[tuple[bytes, str, asyncio.Future[Any]]] = []

    def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
    ) -> asyncio.Future[Any]:
        """See ``Sender.send``."""
        frames = wire.publish_frames(
            self.number,
            exchange,
            routing_key,
            body,
            wire.properties(
                content_type=props.content_type,
                headers=props.headers,
                delivery_mode=props.delivery_mode,
                message_id=props.message_id,
                timestamp=props.timestamp,
                message_type=props.message_type,
                app_id=props.app_id,
            ),
            self.max_content,
            mandatory=mandatory,
        )
        future: asyncio.Future[Any] = self.channel.create_future()
        if not self._batch:
            self._loop.call_soon(self._flush)
        self._batch.append((frames, props.message_id, future))
        return future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        channel = self.channel
        if channel.is_closed:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(ChannelInvalidStateError(f"channel {channel} closed"))
            return
        parts = []
        confirmations, by_message_id = channel.confirmations, channel.message_id_delivery_tag
        for frames, message_id, future in batch:
            if future.done():  # failed while waiting for this turn (the link died)
                continue
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirmations[tag] = future
            by_message_id[message_id] = tag
            future.add_done_callback(partial(_forget_message_id, by_message_id, message_id, tag))
            parts.append(frames)
        if parts:
            channel.write_queue.put_nowait(
                ChannelFrame(payload=b"".join(parts), should_close=False)
            )


def _forget_message_id(table: dict[str, int], message_id: str, tag: int, _: object) -> None:
    if table.get(message_id) == tag:
        del table[message_id]


class PublicSender:
    """Publishes with aiormq's public ``Channel.basic_publish`` (one task per publish, which
    marshals the frames with pamqp and waits for the confirm); the fallback of ``FastSender``.
    """

    path: PublishPath = "public"

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._tasks: set[asyncio.Task[Any]] = set()

    def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        mandatory: bool = True,
    ) -> asyncio.Future[Any]:
        """See ``Sender.send``."""
        future: asyncio.Future[Any] = self.channel.create_future()
        properties = Basic.Properties(
            content_type=props.content_type or None,
            headers=dict(props.headers) or None,
            delivery_mode=props.delivery_mode,
            message_id=props.message_id or None,
            timestamp=datetime.fromtimestamp(props.timestamp, UTC),
            message_type=props.message_type or None,
            app_id=props.app_id or None,
        )
        task = asyncio.ensure_future(
            self.channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                wait=False,
            )
        )
        self._tasks.add(task)
        task.add_done_callback(partial(self._settle, future))
        return future

    def _settle(self, future: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if future.done():  # the link died first and its publishes were failed already
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning
            return
        if task.cancelled():
            future.set_exception(ChannelInvalidStateError("the publish was cancelled"))
        elif (error := task.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(task.result())


def internals_problem(channel: aiormq.Channel) -> str | None:
    """What in ``channel`` differs from the aiormq internals ``FastSender`` relies on (None when
    nothing): the attributes, their types, and the state of a fresh channel in publisher-confirm
    mode whose returns raise (``confirmations`` empty, ``delivery_tag`` an int)."""
    expected: dict[str, type] = {
        "delivery_tag": int,
        "confirmations": dict,
        "message_id_delivery_tag": dict,
        "number": int,
        "max_content_size": int,
        "publisher_confirms": bool,
        "on_return_raises": bool,
    }
    for name, kind in expected.items():
        if not hasattr(channel, name):
            return f"aiormq.Channel has no attribute {name!r}"
        value = getattr(channel, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"aiormq.Channel.{name} is {type(value).__name__}, expected {kind.__name__}"
    if not callable(getattr(getattr(channel, "write_queue", None), "put_nowait", None)):
        return "aiormq.Channel.write_queue has no put_nowait"
    if not (channel.publisher_confirms and channel.on_return_raises):
        return "the channel is not in publisher-confirm mode with returns raising"
    if channel.confirmations:
        return "a fresh channel already has confirmations registered"
    fields = (
        {f.name for f in dataclasses.fields(ChannelFrame)}
        if dataclasses.is_dataclass(ChannelFrame)
        else set()
    )
    if not {"payload", "should_close"} <= fields:
        return "aiormq.abc.ChannelFrame has no payload and should_close fields"
    return None


async def probe(sender: FastSender) -> str | None:
    """Publish one message through ``sender`` that the broker must return, and check that aiormq
    settled it as a return of that very publish; None when it did, else what went wrong.

    Raises what the channel raises when it closes (an AMQPError: the broker refused the publish,
    or the link died); the caller's timeout bounds the wait.
    """
    channel = sender.channel
    message_id = f"retm-relay-probe-{uuid.uuid4().hex}"
    tag = channel.delivery_tag + 1
    props = Properties("", {}, 1, message_id, 0, "", "")
    confirmation = sender.send("", PROBE_ROUTING_KEY, b"", props)
    try:
        result = await confirmation
    except PublishError:
        pass  # returned, as it must be
    else:
        return f"the probe publish was not returned but settled with {result!r}"
    await asyncio.sleep(0)  # the confirmation's other done callbacks (the bookkeeping) run now
    if channel.delivery_tag != tag:
        return f"delivery_tag is {channel.delivery_tag} after the probe, not {tag}"
    if message_id in channel.message_id_delivery_tag:
        return "message_id_delivery_tag still holds the probe after it settled"
    return None
