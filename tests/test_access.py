"""Access rules over real HTTP: plain HTTP refused on a public address, trusted proxies, the
source allow-list, the per-source rate limit, and ``Expect: 100-continue`` refused before the
body is sent. Test clients bind to 127.0.0.2 or 127.0.0.3 to be a source other than 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from relay.errors import ConfigError
from relay.service import Relay
from relay.settings import load_settings
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    StartRelay,
    Tap,
    relay_environ,
)
from tests.security import ROOT, read_response

BODY = b'{"event":"order.created","reference":"acc-1"}'
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def client_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (any 127.0.0.0/8 address works)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def post(session: aiohttp.ClientSession, url: str, body: bytes = BODY, **headers: str):
    async with session.post(url, data=body, headers={**HEADERS, **headers}) as response:
        return response.status, await response.read(), response.headers


async def metric(relay_url: str, sample: str) -> float | None:
    """The value of one sample line of /metrics (``relay_rejected_total{reason="x"}``)."""
    async with aiohttp.ClientSession() as session, session.get(relay_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


# -- plain HTTP on a public address ------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "relay.example.com"])
def test_plain_http_on_a_public_address_is_refused(host: str) -> None:
    """Without TLS or a trusted proxy, a non-loopback listener is a configuration error."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"RELAY_HTTP_HOST": host})
    assert caught.value.key == "http.host"
    assert "plain HTTP" in caught.value.message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_plain_http_on_loopback_is_fine(host: str) -> None:
    """Loopback (127.0.0.0/8, ::1, localhost) may serve plain HTTP: a local proxy in front."""
    assert load_settings(None, {"RELAY_HTTP_HOST": host}).http.host == host


def test_public_address_with_a_trusted_proxy_is_fine() -> None:
    """Behind a TLS-terminating proxy, the relay may listen on a private or public address."""
    environ = {"RELAY_HTTP_HOST": "0.0.0.0", "RELAY_HTTP_TRUSTED_PROXIES": "10.0.0.5"}
    assert load_settings(None, environ).http.trusted_proxies == ("10.0.0.5",)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_HTTP_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("RELAY_HTTP_ALLOW_SOURCES", "retm.example.com"),
        ("RELAY_HTTP_RATE_LIMIT", "-1"),
        ("RELAY_HTTP_RATE_BURST", "0"),
    ],
)
def test_bad_access_settings_name_their_key(name: str, value: str) -> None:
    """A CIDR that is not one, a negative rate or an empty burst stop the start."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {name: value})
    assert caught.value.key == name.removeprefix("RELAY_").lower().replace("_", ".", 1)


def test_serve_refuses_plain_http_on_a_public_address_at_start_up() -> None:
    """The real command: ``python -m relay serve`` exits 2 naming http.host, and so does
    ``check-config``; neither ever listens."""
    environ = {"PATH": "/usr/bin:/bin", "RELAY_HTTP_HOST": "0.0.0.0", "RELAY_HTTP_PORT": "0"}
    for command in ("serve", "check-config"):
        done = subprocess.run(
            [sys.executable, "-m", "relay", command],
            cwd=ROOT,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done
        assert done.stderr.startswith("retm-relay: configuration error: http.host: 0.0.0.0 is not")
        assert "http.tls_cert" in done.stderr
        assert "http.trusted_proxies" in done.stderr


# -- trusted proxies ----------------------------------------------------------------------------

WhoAmI = Callable[..., Awaitable[str]]


@pytest.fixture
async def whoami_relay(
    names: Names, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start a relay (the production class) with an extra guarded route ``POST /retm/whoami``
    that answers what the handlers see: ``remote`` and ``scheme``."""
    relays: list[Relay] = []

    async def start(**overrides: str) -> str:
        settings = load_settings(None, relay_environ(names, tmp_path / "state", **overrides))
        relay = Relay(settings)

        async def whoami(request: web.Request) -> web.Response:
            return web.json_response({"remote": request.remote, "scheme": request.scheme})

        relay.app.router.add_post("/retm/whoami", whoami)
        await relay.start()
        relays.append(relay)
        return relay.url

    yield start
    for relay in relays:
        await relay.stop()


async def whoami(session: aiohttp.ClientSession, url: str, **headers: str) -> dict[str, str]:
    async with session.post(url + "/retm/whoami", headers=headers) as response:
        assert response.status == 200, await response.text()
        result: dict[str, str] = await response.json()
        return result


async def test_forwarded_headers_are_believed_from_a_trusted_proxy_only(
    whoami_relay: Callable[..., Awaitable[str]],
) -> None:
    """From a trusted proxy (127.0.0.1 here) the client and scheme come from X-Forwarded-For
    (right to left, past further trusted proxies) and X-Forwarded-Proto; from any other peer
    the same headers are ignored."""
    url = await whoami_relay(RELAY_HTTP_TRUSTED_PROXIES="127.0.0.1,10.0.0.0/8")
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    async with client_from("127.0.0.1") as proxy, client_from("127.0.0.2") as stranger:
        assert await whoami(proxy, url, **forwarded) == {"remote": "203.0.113.7", "scheme": "https"}
        assert await whoami(proxy, url) == {"remote": "127.0.0.1", "scheme": "http"}
        # A chain: the client forged the first entry; the last untrusted hop is the client.
        chain = "198.51.100.66, 192.0.2.44, 10.1.2.3"
        assert (await whoami(proxy, url, **{"X-Forwarded-For": chain}))["remote"] == "192.0.2.44"
        # All hops trusted: the left-most is the client.
        chain = "10.9.9.9, 10.1.2.3"
        assert (await whoami(proxy, url, **{"X-Forwarded-For": chain}))["remote"] == "10.9.9.9"
        # Garbage stops the walk at the last good address.
        chain = "203.0.113.7, unknown"
        assert (await whoami(proxy, url, **{"X-Forwarded-For": chain}))["remote"] == "127.0.0.1"
        # Not a proxy: nothing it claims is believed.
        assert await whoami(stranger, url, **forwarded) == {"remote": "127.0.0.2", "scheme": "http"}


async def test_forwarded_headers_are_ignored_without_trusted_proxies(
    whoami_relay: Callable[..., Awaitable[str]],
) -> None:
    """With no http.trusted_proxies (the default), X-Forwarded-* never change anything."""
    url = await whoami_relay()
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    async with aiohttp.ClientSession() as session:
        assert await whoami(session, url, **forwarded) == {"remote": "127.0.0.1", "scheme": "http"}


# -- allow-list -------------------------------------------------------------------------------


async def test_allow_list_refuses_other_sources_but_not_monitoring(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """With http.allow_sources, other sources get 403 ``source_not_allowed`` and publish
    nothing; health, metrics, the status page and the AsyncAPI document stay reachable; an
    allowed source is served as usual."""
    relay = await start_relay(RELAY_HTTP_ALLOW_SOURCES="127.0.0.2/32,2001:db8::/32")
    tap = await broker.tap(names.exchange)
    url = relay.url + "/retm/events"
    async with client_from("127.0.0.1") as outsider, client_from("127.0.0.2") as allowed:
        status, body, _ = await post(outsider, url)
        assert status == 403
        assert orjson.loads(body) == {
            "error": "source_not_allowed",
            "detail": "this source address may not call the relay",
        }
        for path in ("/healthz", "/readyz", "/health", "/metrics", "/", "/asyncapi.yaml"):
            async with outsider.get(relay.url + path) as response:
                assert response.status == 200, path

        status, body, _ = await post(allowed, url)
        assert status == 200
        assert orjson.loads(body)["status"] == "accepted"
    assert (await tap.get()).body == BODY
    assert tap.empty()
    assert await metric(relay.url, 'relay_rejected_total{reason="source_not_allowed"}') == 1.0


async def test_allow_list_applies_to_the_client_behind_a_trusted_proxy(
    start_relay: StartRelay,
) -> None:
    """Behind a proxy, the allow-list checks the client the proxy names, not the proxy."""
    relay = await start_relay(
        RELAY_HTTP_TRUSTED_PROXIES="127.0.0.1", RELAY_HTTP_ALLOW_SOURCES="203.0.113.0/24"
    )
    url = relay.url + "/retm/events"
    async with client_from("127.0.0.1") as proxy:
        status, _, _ = await post(proxy, url, **{"X-Forwarded-For": "203.0.113.9"})
        assert status == 200
        status, _, _ = await post(proxy, url, **{"X-Forwarded-For": "198.51.100.9"})
        assert status == 403
        status, _, _ = await post(proxy, url)  # the proxy itself is not on the list
        assert status == 403


# -- rate limit -------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after_per_source(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """With 0.001 requests/s and a burst of 3, a source gets 3 answers, then 429 with
    Retry-After (1000 s for the next token); another source has its own bucket; bad tokens
    count too (no free guessing); monitoring is never limited."""
    relay = await start_relay(RELAY_HTTP_RATE_LIMIT="0.001", RELAY_HTTP_RATE_BURST="3")
    tap = await broker.tap(names.exchange)
    url = relay.url + "/retm/events"
    async with client_from("127.0.0.2") as first, client_from("127.0.0.3") as second:
        answers = [
            await post(first, url, BODY.replace(b"acc-1", f"rl-{i}".encode())) for i in range(3)
        ]
        assert [status for status, _, _ in answers] == [200, 200, 200]
        status, body, headers = await post(first, url, BODY.replace(b"acc-1", b"rl-3"))
        assert status == 429
        assert headers["Retry-After"] == "1000"
        assert orjson.loads(body) == {
            "error": "rate_limited",
            "detail": "too many requests from this source; retry in 1000 s",
        }
        status, _, _ = await post(first, url, Authorization="Bearer wrong")
        assert status == 429

        status, _, _ = await post(second, url, BODY.replace(b"acc-1", b"rl-4"))
        assert status == 200
        for _ in range(10):
            async with first.get(relay.url + "/healthz") as response:
                assert response.status == 200

    bodies = [m.body for m in await tap.take(4)]
    assert bodies == [BODY.replace(b"acc-1", k) for k in (b"rl-0", b"rl-1", b"rl-2", b"rl-4")]
    assert tap.empty()
    assert await metric(relay.url, 'relay_rejected_total{reason="rate_limited"}') == 2.0


# -- Expect: 100-continue --------------------------------------------------------------------


async def send_head(
    relay: RunningRelay, path: str, headers: dict[str, str], length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = relay.relay.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    lines = [f"POST {path} HTTP/1.1", "Host: relay", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize(
    ("authorization", "www_authenticate"),
    [
        (None, 'Bearer realm="retm-relay"'),
        ("Bearer wrong-token", 'Bearer realm="retm-relay", error="invalid_token"'),
        ("Basic dXNlcjpwYXNz", 'Bearer realm="retm-relay", error="invalid_request"'),
    ],
)
async def test_expect_100_continue_with_a_bad_token_is_refused_before_the_body(
    relay: RunningRelay, broker: Broker, names: Names, authorization: str | None,
    www_authenticate: str,
) -> None:  # fmt: skip
    """The client sends only the headers with ``Expect: 100-continue``: the first thing it gets
    is the final 401 (no ``100 Continue``) with ``Connection: close``, so it closes without
    ever sending the body, as curl does."""
    tap = await broker.tap(names.exchange)
    headers = {"Content-Type": "application/json", "Expect": "100-continue"}
    if authorization:
        headers["Authorization"] = authorization
    reader, writer = await send_head(relay, "/retm/events", headers, len(BODY))

    status, response_headers, body = await read_response(reader)

    assert status == 401
    assert response_headers["www-authenticate"] == www_authenticate
    assert response_headers["connection"] == "close"
    assert orjson.loads(body)["error"] == "unauthorized"
    writer.close()  # the body is never sent
    assert await metric(relay.url, 'relay_rejected_total{reason="unauthorized"}') == 1.0
    await _only_sentinel(relay, tap)


async def test_expect_100_continue_with_a_body_over_the_limit_gets_413_before_it(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """A good token announcing a body over ``http.max_body_bytes`` gets the final 413 (no
    ``100 Continue``) with ``Connection: close``: the client never sends the body."""
    tap = await broker.tap(names.exchange)
    headers = {**HEADERS, "Expect": "100-continue"}
    reader, writer = await send_head(relay, "/retm/events", headers, 1_048_577)

    status, response_headers, body = await read_response(reader)
    writer.close()

    assert status == 413
    assert response_headers["connection"] == "close"
    assert orjson.loads(body)["error"] == "payload_too_large"
    await _only_sentinel(relay, tap)


async def test_expect_100_continue_with_a_good_token_continues(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """A good token gets ``100 Continue``, then the body is read and published as usual."""
    tap = await broker.tap(names.exchange)
    headers = {**HEADERS, "Expect": "100-continue"}
    reader, writer = await send_head(relay, "/retm/events", headers, len(BODY))

    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(BODY)
    status, _, body = await read_response(reader)
    writer.close()

    assert status == 200
    assert orjson.loads(body)["status"] == "accepted"
    assert (await tap.get()).body == BODY


async def test_expect_100_continue_from_a_refused_source_gets_403_before_the_body(
    start_relay: StartRelay,
) -> None:
    """The allow-list answers before ``100 Continue`` too; any other expectation gets 417."""
    relay = await start_relay(RELAY_HTTP_ALLOW_SOURCES="192.0.2.0/24")
    headers = {**HEADERS, "Expect": "100-continue"}
    reader, writer = await send_head(relay, "/retm/events", headers, len(BODY))
    status, response_headers, body = await read_response(reader)
    assert (status, response_headers["connection"]) == (403, "close")
    assert orjson.loads(body)["error"] == "source_not_allowed"
    writer.close()

    open_relay = await start_relay()
    headers = {**HEADERS, "Expect": "something-else"}
    reader, writer = await send_head(open_relay, "/retm/events", headers, len(BODY))
    status, _, body = await read_response(reader)
    assert status == 417
    assert orjson.loads(body)["error"] == "expectation_failed"
    writer.close()


async def test_expect_100_continue_counts_once_against_the_rate_limit(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """A request checked at ``Expect`` time is not checked again when its body arrives: with a
    burst of 2, one 100-continue request and one plain request pass, the third gets 429."""
    relay = await start_relay(RELAY_HTTP_RATE_LIMIT="0.001", RELAY_HTTP_RATE_BURST="2")
    tap = await broker.tap(names.exchange)
    headers = {**HEADERS, "Expect": "100-continue"}
    reader, writer = await send_head(relay, "/retm/events", headers, len(BODY))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(BODY)
    status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200

    url = relay.url + "/retm/events"
    async with aiohttp.ClientSession() as session:
        second, _, _ = await post(session, url, BODY.replace(b"acc-1", b"acc-2"))
        third, _, _ = await post(session, url, BODY.replace(b"acc-1", b"acc-3"))
    assert (second, third) == (200, 429)
    assert [m.body for m in await tap.take(2)] == [BODY, BODY.replace(b"acc-1", b"acc-2")]


async def _only_sentinel(relay: RunningRelay, tap: Tap) -> None:
    from tests.conftest import assert_only_sentinel_follows  # noqa: PLC0415

    await assert_only_sentinel_follows(relay, tap)
