"""Malformed HTTP (what aiohttp's parser refuses before any handler runs) is answered 400 and
logged as one WARNING line without a traceback and without the offending bytes, which may
hold a Bearer token. A real relay process (``python -m relay serve``) and raw sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import TOKEN, Broker, Names, RelayProcess, relay_environ
from tests.test_access import metric


async def raw_request(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the relay closes it."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        # the token, then a control character: the header value is refused
        b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\x01\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        # the token, then 9 KB more: the header line is too long
        b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"x" * 9000
        + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        # two Content-Length headers (request smuggling)
        (
            b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\n{}"
        ),
    ],
    ids=["bad-header-char", "header-too-long", "two-content-lengths"],
)
async def test_malformed_http_is_one_warning_line_without_the_bytes(
    request_bytes: bytes, broker: Broker, names: Names, tmp_path: Path
) -> None:
    """The answer is a 400 with the short JSON error body, no byte of the request in it; the
    log has exactly one line for it, ``http.bad_request`` at
    WARNING with the client's address and the parser's error class, no traceback, and no
    trace of the token anywhere in the relay's output; ``relay_rejected_total`` counts it
    with reason ``bad_http``."""
    broker.forget_later(exchanges=(names.exchange, *names.own), queues=names.own)
    relay = await RelayProcess(relay_environ(names, tmp_path / "state")).start()
    try:
        await relay.wait_log("relay.ready")
        before = len(relay.lines)
        answer = await raw_request(relay.url, request_bytes)
        line = await relay.wait_log("http.bad_request", timeout=10)
        counted = await metric(relay.url, 'relay_rejected_total{reason="bad_http"}')
    finally:
        await relay.kill()

    assert answer.startswith((b"HTTP/1.0 400 Bad Request\r\n", b"HTTP/1.1 400 Bad Request\r\n"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json" in head
    error = orjson.loads(body)
    assert error["error"] == "bad_request"
    assert error["detail"] == f"malformed HTTP request ({line['reason']})"
    assert TOKEN.encode() not in answer
    new = relay.lines[before:]
    assert new == [line]
    assert line["level"] == "warning"
    assert line["remote"] == "127.0.0.1"
    assert line["reason"] in {"BadHttpMessage", "LineTooLong", "InvalidHeader"}
    assert "exception" not in line
    assert TOKEN not in relay.output()
    assert counted == 1.0
