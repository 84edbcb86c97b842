"""The status page: ``GET /`` serves one self-contained HTML file (``static/status.html``)
that polls ``/health`` and shows it to a person, refreshing by itself.

The page has no external assets and no build step. It is served with a Content-Security-Policy
that allows only its own inline script and style (by hash) and ``fetch`` to the relay itself.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def _csp(html: bytes) -> str:
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for match in _INLINE.finditer(html):
        digest = base64.b64encode(hashlib.sha256(match.group(2)).digest()).decode()
        hashes[match.group(1).decode()].append(f"'sha256-{digest}'")
    script = " ".join(hashes["script"]) or "'none'"
    style = " ".join(hashes["style"]) or "'none'"
    return (
        "default-src 'none'; "
        f"script-src {script}; "
        f"style-src {style}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class StatusPage:
    """The HTML of the status page, read once from the package, and its handler."""

    def __init__(self) -> None:
        self.html = resources.files("relay.http").joinpath("static/status.html").read_bytes()
        self.headers = {
            "Content-Security-Policy": _csp(self.html),
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    async def handler(self, _: web.Request) -> web.Response:
        """``GET /``: the status page (text/html, UTF-8)."""
        return web.Response(
            body=self.html, content_type="text/html", charset="utf-8", headers=self.headers
        )
