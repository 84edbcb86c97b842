"""HTTP ceiling for `make bench`: the least an aiohttp server can do per webhook POST.

Reads the body and answers 200, on uvloop with no access log: no auth, parsing or broker. No
relay built on aiohttp can answer faster on this machine.

    python bench/http_ceiling.py PORT
"""

import sys

import uvloop
from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"status":"accepted"}', content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/retm/events", accept)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, loop=uvloop.new_event_loop(), print=None
    )


if __name__ == "__main__":
    main()
