"""The consumer contract: ``GET /asyncapi.yaml`` serves the AsyncAPI 3.0 document of the messages
the relay publishes (exchange, routing keys, properties, headers, payload schemas).

The document is package data (``static/asyncapi.yaml``, the same bytes as ``docs/asyncapi.yaml``
in the repository; a test keeps them equal), read once. Like ``/health`` it needs no token: it
describes the relay, never a merchant's data.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

#: RFC 9512's media type for YAML
CONTENT_TYPE = "application/yaml"


class Contract:
    """The AsyncAPI document's bytes and the handler that serves them."""

    def __init__(self) -> None:
        self.document = resources.files("relay.http").joinpath("static/asyncapi.yaml").read_bytes()

    async def handler(self, _: web.Request) -> web.Response:
        """``GET /asyncapi.yaml``: the AsyncAPI document (application/yaml, UTF-8)."""
        return web.Response(
            body=self.document,
            content_type=CONTENT_TYPE,
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )
