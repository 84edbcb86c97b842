"""Malformed HTTP gets the contract's short JSON error body, never the offending bytes.

aiohttp answers a request its HTTP parser refuses (a bad header line, a line too long, two
``Content-Length`` headers ...) before any middleware runs, from ``RequestHandler.handle_error``,
with a plain-text body that quotes the parser's message, and that message quotes the offending
line: a bad ``Authorization`` header came back with its token. ``JsonErrorRunner`` is
``web.AppRunner`` whose connections use ``JsonErrorRequestHandler``, whose ``handle_error``
answers ``{"error": CODE, "detail": ...}`` instead, like every other 4xx (and closes the
connection, as aiohttp does). The log line and metric stay ``relay.logs.BadRequestFilter``'s.

aiohttp has no public hook for the protocol class: ``web.Server.__call__`` makes a
``RequestHandler`` from the server's private ``_loop`` and ``_kwargs``. ``JsonErrorRunner``
checks at start-up that they are there (aiohttp 3.9 to 3.14 have them); when they are not, it
keeps aiohttp's own server and logs ``http.plain_parser_errors`` once, so an aiohttp upgrade
degrades the answer's format, never the relay.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = structlog.get_logger("relay.http")


def parser_error_status(status: int, exc: BaseException | None) -> int:
    """The status to answer: aiohttp's, except 505 for a request line whose HTTP version
    its parser refuses (``HTTP/1.2``, ``HTTP/3.0``); versions it parses but the relay does not
    speak (``HTTP/2.0``, ``HTTP/0.9``) get their 505 from the app's ``http_version``."""
    if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in exc.message:
        return 505
    return status


def parser_error_body(status: int, exc: BaseException | None) -> bytes:
    """The JSON error body for a request aiohttp refused with ``status``: the status's
    phrase as the code (``bad_request``), and only the parser's error class as the detail."""
    if status == 505:
        return orjson.dumps(
            {
                "error": "http_version_not_supported",
                "detail": "only HTTP/1.0 and HTTP/1.1 are supported",
            }
        )
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Bad Request"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    if status >= 500:
        detail = "the request could not be handled"
    else:
        kind = type(exc).__name__ if exc is not None else "HttpProcessingError"
        detail = f"malformed HTTP request ({kind})"
    return orjson.dumps({"error": code, "detail": detail})


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with the JSON error body."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # noqa: ARG002 - holds request bytes: never used
    ) -> web.StreamResponse:
        """As aiohttp's (it logs, and raises ConnectionError once bytes were sent), but the
        body is ``parser_error_body``: ``message`` holds request bytes and is dropped."""
        super().handle_error(request, status, exc, None)
        status = parser_error_status(status, exc)
        response = web.Response(
            status=status,
            body=parser_error_body(status, exc),
            content_type="application/json",
        )
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    """``web.Server`` making ``JsonErrorRequestHandler`` connections."""

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def adopt(server: web.Server) -> bool:
    """Make ``server``'s new connections use ``JsonErrorRequestHandler``; False (and nothing
    changed) when aiohttp's Server lacks the private attributes this needs."""
    if type(server) is not web.Server or not all(
        hasattr(server, name) for name in ("_loop", "_kwargs")
    ):
        return False
    server.__class__ = _JsonErrorServer
    return True


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers malformed HTTP with the JSON error body."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not adopt(server):
            log.warning("http.plain_parser_errors", reason="aiohttp's Server is not as expected")
        return server
