"""relay.http.protocol without a network: the JSON body of a refused request, and the check
that aiohttp's Server is as expected before its connections are given the JSON error handler
(else the relay keeps aiohttp's own, and says so)."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from relay.http.protocol import (
    JsonErrorRequestHandler,
    adopt,
    parser_error_body,
    parser_error_status,
)


async def _handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


def test_the_body_names_the_error_class_and_never_the_message() -> None:
    """The parser's message (which quotes the offending line) is not in the body."""
    exc = BadHttpMessage("Invalid header value char: b'Bearer secret-token\\x01'")
    body = parser_error_body(400, exc)
    assert orjson.loads(body) == {
        "error": "bad_request",
        "detail": "malformed HTTP request (BadHttpMessage)",
    }
    assert b"secret" not in body
    assert orjson.loads(parser_error_body(400, LineTooLong(b"x" * 9000, 8190)))["detail"] == (
        "malformed HTTP request (LineTooLong)"
    )


def test_a_version_the_parser_refuses_is_505() -> None:
    """``Invalid HTTP version`` from the parser becomes 505; any other bad status line 400."""
    version = BadStatusLine("GET / HTTP/1.2", "Invalid HTTP version")
    assert parser_error_status(400, version) == 505
    assert orjson.loads(parser_error_body(505, version))["error"] == ("http_version_not_supported")
    assert parser_error_status(400, BadStatusLine("GARBAGE")) == 400


async def test_adopt_gives_connections_the_json_error_handler() -> None:
    """An aiohttp Server as expected makes JsonErrorRequestHandler connections."""
    server = web.Server(_handler)
    assert adopt(server)
    connection = server()
    assert isinstance(connection, JsonErrorRequestHandler)


async def test_adopt_leaves_an_unexpected_server_alone() -> None:
    """The fallback: a Server without the private attributes (a future aiohttp) is left as it
    is, so its connections keep aiohttp's own handler."""
    server = web.Server(_handler)
    del server._kwargs
    assert not adopt(server)
    assert type(server) is web.Server
