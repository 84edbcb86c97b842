"""The hand-marshalled Basic.Publish frames equal pamqp's, byte for byte, for any message."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from functools import partial

import pamqp.frame
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from relay.amqp import wire

SHORT = st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255)
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=0, max_size=80)
HEADERS = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=30),
    st.text(max_size=80),
    max_size=6,
)


def pamqp_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: spec.Basic.Properties,
    max_content: int,
) -> bytes:
    """What aiormq's basic_publish writes (its frame splitting, pamqp's marshalling)."""
    frames: list[object] = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    if body:
        if len(body) < max_content:
            frames.append(ContentBody(body))
        else:
            with io.BytesIO(body) as fp:
                frames += [ContentBody(c) for c in iter(partial(fp.read, max_content), b"")]
    return b"".join(pamqp.frame.marshal(f, channel) for f in frames)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(
    channel=st.integers(1, 2047),
    exchange=NAME,
    routing_key=NAME,
    body=st.one_of(st.binary(max_size=300), st.binary(min_size=4000, max_size=9000)),
    max_content=st.sampled_from([131064, 4088, 1000]),
    content_type=st.sampled_from(["application/json", ""]),
    headers=HEADERS,
    message_id=SHORT,
    timestamp=st.integers(0, 253_402_300_799),  # datetime reaches the year 9999
    message_type=SHORT,
    app_id=st.sampled_from(["retm-relay", ""]),
)
def test_publish_frames_equal_pamqp(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    max_content: int,
    content_type: str,
    headers: dict[str, str],
    message_id: str,
    timestamp: int,
    message_type: str,
    app_id: str,
) -> None:
    """Any exchange, routing key, body size (one or several body frames), headers and
    properties give exactly pamqp's bytes."""
    props = wire.properties(
        content_type=content_type,
        headers=headers,
        delivery_mode=2,
        message_id=message_id,
        timestamp=timestamp,
        message_type=message_type,
        app_id=app_id,
    )
    expected = pamqp_frames(
        channel,
        exchange,
        routing_key,
        body,
        spec.Basic.Properties(
            content_type=content_type or None,
            headers=headers or None,
            delivery_mode=2,
            message_id=message_id or None,
            timestamp=datetime.fromtimestamp(timestamp, UTC),
            message_type=message_type or None,
            app_id=app_id or None,
        ),
        max_content,
    )
    got = wire.publish_frames(channel, exchange, routing_key, body, props, max_content)
    assert got == expected


def test_non_string_header_values_fall_back_to_pamqp() -> None:
    """A header that is not a string is encoded by pamqp's own table encoder."""
    table = {"x-count": 3, "x-name": "a"}
    assert wire.field_table(table) == pamqp.encode.field_table(table)
