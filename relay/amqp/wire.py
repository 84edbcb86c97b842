"""The AMQP 0-9-1 frames of one Basic.Publish, marshalled with ``struct``.

pamqp marshals any frame generically, validating and dispatching field by field; for the relay
that costs more than everything else it does for a webhook. The relay publishes one kind of
message (the properties of the message contract, string headers), so it builds those bytes
itself: a method frame (Basic.Publish), a content header frame (the properties), and body
frames of at most the connection's ``frame_max``. ``tests/test_wire.py`` checks with hypothesis
that the bytes equal pamqp's for any message.

Frame layout (AMQP 0-9-1 §2.3.5, §4.2.6): type (1 octet), channel (2), payload size (4), payload,
frame end (0xCE).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from pamqp import encode

FRAME_END = b"\xce"
_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # Basic (60), Publish (40), reserved-1 (ticket)
_CONTENT_HEADER = struct.Struct(">HHQH")  # Basic (60), weight 0, body size, property flags
_LONGSTR = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")

# Property flags (AMQP 0-9-1 Basic class), in the order the properties are written.
F_CONTENT_TYPE = 0x8000
F_HEADERS = 0x2000
F_DELIVERY_MODE = 0x1000
F_MESSAGE_ID = 0x0080
F_TIMESTAMP = 0x0040
F_TYPE = 0x0020
F_APP_ID = 0x0008


def shortstr(value: str) -> bytes:
    """A short string: length octet and UTF-8 bytes (at most 255). Raises ValueError."""
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"short string over 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def field_table(headers: Mapping[str, object]) -> bytes:
    """A field table: string values as long strings (``S``), keys in sorted order as pamqp
    writes them; any other value type is encoded by pamqp."""
    if not all(isinstance(v, str) for v in headers.values()):
        return encode.field_table(dict(headers))  # type: ignore[arg-type]
    parts = []
    for key, value in sorted(headers.items()):
        raw = value.encode()  # type: ignore[attr-defined]
        parts.append(shortstr(key) + b"S" + _LONGSTR.pack(len(raw)) + raw)
    data = b"".join(parts)
    return _LONGSTR.pack(len(data)) + data


def properties(
    *,
    content_type: str,
    headers: Mapping[str, object],
    delivery_mode: int,
    message_id: str,
    timestamp: int,
    message_type: str,
    app_id: str,
) -> tuple[int, bytes]:
    """(property flags, property list) of the message contract's properties.

    timestamp: Unix seconds. Empty strings are left out, as pamqp does.
    """
    flags = F_DELIVERY_MODE | F_TIMESTAMP
    parts = []
    if content_type:
        flags |= F_CONTENT_TYPE
        parts.append(shortstr(content_type))
    if headers:
        flags |= F_HEADERS
        parts.append(field_table(headers))
    parts.append(bytes((delivery_mode,)))
    if message_id:
        flags |= F_MESSAGE_ID
        parts.append(shortstr(message_id))
    parts.append(_TIMESTAMP.pack(timestamp))
    if message_type:
        flags |= F_TYPE
        parts.append(shortstr(message_type))
    if app_id:
        flags |= F_APP_ID
        parts.append(shortstr(app_id))
    return flags, b"".join(parts)


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    props: tuple[int, bytes],
    max_content: int,
    *,
    mandatory: bool = True,
) -> bytes:
    """The frames of one Basic.Publish, ready to write.

    channel: the channel number. props: from ``properties``. max_content: the largest body
    frame payload (``frame_max`` minus the 8 bytes of frame overhead).
    """
    method = (
        _PUBLISH + shortstr(exchange) + shortstr(routing_key) + (b"\x01" if mandatory else b"\x00")
    )
    flags, plist = props
    header = _CONTENT_HEADER.pack(60, 0, len(body), flags) + plist
    out = [
        _HEAD.pack(1, channel, len(method)), method, FRAME_END,
        _HEAD.pack(2, channel, len(header)), header, FRAME_END,
    ]  # fmt: skip
    if len(body) < max_content:
        if body:
            out += (_HEAD.pack(3, channel, len(body)), body, FRAME_END)
    else:
        for start in range(0, len(body), max_content):
            chunk = body[start : start + max_content]
            out += (_HEAD.pack(3, channel, len(chunk)), chunk, FRAME_END)
    return b"".join(out)
