"""The edge (docs/edge.md): every RFC 8259 object is accepted, refused bodies from RETM are
quarantined, lenient media types, alerts never swallowed, strict HTTP, nothing echoed back.

A real relay, a real RabbitMQ; assertions consume the real queues and compare exact bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import signal
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from structlog.testing import capture_logs

from relay.http.app import PUBLISHER, SPOOL
from relay.service import Relay
from relay.settings import load_settings
from tests.conftest import (
    AMQP_URL,
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    RunningRelay,
    StartRelay,
    assert_only_sentinel_follows,
    proxy_url,
    relay_environ,
    wait_for,
)
from tests.proxy import FaultProxy
from tests.test_access import metric

FINGERPRINT = "token-" + hashlib.sha256(TOKEN.encode()).hexdigest()[:8]

# -- 1. every RFC 8259 object is accepted --------------------------------------------------------

RFC_8259_BODIES = [
    # a customer's name cut inside an emoji: a lone high surrogate escape
    pytest.param(
        b'{"event":"customer.updated","reference":"c-1","business_refrence":"shop",'
        b'"customer":{"name":"Nora \\ud83d"}}',
        "customer.updated",
        "c-1",
        id="lone-surrogate-in-a-name",
    ),
    pytest.param(
        b'{"event":"order.created","reference":"o-1","total_price":1e400}',
        "order.created",
        "o-1",
        id="number-beyond-a-double",
    ),
    pytest.param(
        b'{"event":"order.created","reference":"o-2","id":' + b"9" * 400 + b"}",
        "order.created",
        "o-2",
        id="400-digit-integer",
    ),
    pytest.param(
        b'{"event":"order.created","reference":"o-3","id":-' + b"1" * 5000 + b"}",
        "order.created",
        "o-3",
        id="5000-digit-integer",
    ),
    pytest.param(
        b'{"event":"Order.Refunded","reference":"o-4\\udc00","x":[1e999,-1e999]}',
        "order.refunded",
        "o-4\ufffd",
        id="lone-low-surrogate-in-the-reference",
    ),
    pytest.param(
        b'{"event":"order.created","reference":"o-5","deep":'
        + b"[" * 500
        + b'"\\ud800"'
        + b"]" * 500
        + b"}",
        "order.created",
        "o-5",
        id="501-levels-with-a-surrogate",
    ),
]


@pytest.mark.parametrize(("body", "routing_key", "reference"), RFC_8259_BODIES)
async def test_json_that_orjson_refuses_is_accepted_byte_for_byte(
    relay: RunningRelay,
    broker: Broker,
    names: Names,
    body: bytes,
    routing_key: str,
    reference: str,
) -> None:
    """A body that is JSON by RFC 8259 but that orjson refuses is answered 200, published
    byte for byte, and its event, reference and business are read as for any other body."""
    tap = await broker.tap(names.exchange)

    answer = await relay.event(body)

    assert answer.status == 200, answer.body
    key = f"{FINGERPRINT}:{routing_key}:{reference}"
    assert answer.body == {"status": "accepted", "id": key, "routing_key": routing_key}
    message = await tap.get()
    assert (message.body, message.routing_key, message.message_id) == (body, routing_key, key)
    assert message.headers["x-retm-event"] == routing_key
    assert message.headers["x-retm-reference"] == reference
    if b"business_refrence" in body:
        assert message.headers["x-retm-business"] == "shop"
    assert (await relay.event(body)).body["status"] == "duplicate"


async def test_nesting_beyond_the_limit_of_the_tolerant_parser_is_refused(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """513 levels that only the tolerant parser can read: 400 ``too_deep`` (the documented
    limit is 512); nothing is published on the event exchange."""
    tap = await broker.tap(names.exchange)
    body = b'{"event":"order.created","deep":' + b"[" * 512 + b'"\\ud800"' + b"]" * 512 + b"}"

    answer = await relay.event(body)

    assert answer.status == 400
    assert answer.body == {
        "error": "too_deep",
        "detail": "the body is nested deeper than 512 levels",
    }
    await assert_only_sentinel_follows(relay, tap)


# -- 2. quarantine ---------------------------------------------------------------------------------


async def test_refused_bodies_of_an_authenticated_sender_are_quarantined_once(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """Not JSON (and not an object): 400 as before, and a copy on the quarantine queue, byte
    for byte, with the reason, declared content type, route and receive time in headers and
    the body hash as message_id; RETM's two retries add no copy; a stranger's body is never
    kept; all counted on /metrics and shown on /health, and each request is one log line."""
    quarantine = await broker.tap_queue(names.rejected)
    not_json = b'{"event":"order.created","reference":"r-1",'  # cut short: not JSON
    not_object = b'["order.created"]'

    with capture_logs() as logs:
        answers = [await relay.event(not_json, content_type="text/plain") for _ in range(3)]
        stranger = await relay.event(b"{not json from a stranger", token="wrong-token")
        array = await relay.event(not_object, content_type=None)

    assert [a.status for a in answers] == [400, 400, 400]
    assert answers[0].body["error"] == "invalid_json"
    assert stranger.status == 401
    assert (array.status, array.body["error"]) == (400, "not_object")
    first, second = await quarantine.take(2)
    digest = hashlib.sha256(not_json).hexdigest()
    assert first.body == not_json
    assert first.message_id == f"{FINGERPRINT}:rejected:sha256-{digest}"
    assert (first.exchange, first.routing_key) == (names.rejected, "invalid_json")
    assert (first.content_type, first.type, first.app_id) == (
        "application/octet-stream",
        "rejected",
        "retm-relay",
    )
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    headers = dict(first.headers)
    received_at = headers.pop("x-relay-received-at")
    assert isinstance(received_at, str)
    assert received_at.endswith("Z")
    assert headers == {
        "x-relay-rejected-reason": "invalid_json",
        "x-relay-rejected-detail": answers[0].body["detail"],
        "x-relay-route": "events",
        "x-relay-content-type": "text/plain",
    }
    assert second.body == not_object
    assert second.routing_key == "not_object"
    assert "x-relay-content-type" not in second.headers
    assert quarantine.empty()

    assert (
        await metric(relay.url, 'relay_quarantined_total{outcome="accepted",reason="invalid_json"}')
        == 1.0
    )
    assert (
        await metric(
            relay.url, 'relay_quarantined_total{outcome="duplicate",reason="invalid_json"}'
        )
        == 2.0
    )
    health = (await relay.get("/health")).body["quarantine"]
    assert {k: health[k] for k in ("exchange", "kept", "duplicates")} == {
        "exchange": names.rejected,
        "kept": 2,
        "duplicates": 2,
    }
    assert health["last"]["reason"] == "not_object"
    assert health["last"]["bytes"] == len(not_object)
    lines = [line for line in logs if line.get("route") == "events"]
    assert [(line["event"], line.get("quarantine")) for line in lines] == [
        ("webhook.rejected", "accepted"),
        ("webhook.rejected", "duplicate"),
        ("webhook.rejected", "duplicate"),
        ("webhook.rejected", None),
        ("webhook.rejected", "accepted"),
    ]
    assert lines[0]["message_id"] == first.message_id


async def test_quarantine_goes_through_the_spool_across_a_restart(
    broker: Broker, names: Names, tmp_path: Path, fault_proxy: FaultProxy
) -> None:
    """With the broker away, a refused body is spooled (the 400 comes after the fsync); the
    relay is killed with SIGKILL; the next relay's forwarder publishes it to the quarantine
    exchange, byte for byte, with its headers and message_id."""
    environ = relay_environ(names, tmp_path / "state", RELAY_AMQP_URL=proxy_url(fault_proxy))
    body = b"\xff\xfe not JSON at all " + uuid.uuid4().hex.encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    first = await RelayProcess(environ).start()
    try:
        await first.wait_log("broker.connected")
        fault_proxy.cut()
        await first.wait_log("broker.disconnected")
        async with (
            aiohttp.ClientSession() as session,
            session.post(first.url + "/retm/events", data=body, headers=headers) as r,
        ):
            answer = (r.status, orjson.loads(await r.read())["error"])
        kept = await first.wait_log("webhook.rejected")
    finally:
        await first.kill()
    assert answer == (400, "invalid_json")
    assert (kept["reason"], kept["quarantine"]) == ("invalid_json", "spooled")

    quarantine = await broker.tap_queue(names.rejected)
    second = await RelayProcess({**environ, "RELAY_AMQP_URL": AMQP_URL}).start()
    try:
        message = await quarantine.get(timeout=20)
    finally:
        second.signal(signal.SIGTERM)
        await second.wait()
    assert message.body == body
    assert (message.exchange, message.routing_key) == (names.rejected, "invalid_json")
    assert message.message_id == f"{FINGERPRINT}:rejected:sha256-{hashlib.sha256(body).hexdigest()}"
    assert message.headers["x-relay-rejected-reason"] == "invalid_json"
    assert message.content_type == "application/octet-stream"


async def test_a_refused_body_that_cannot_be_kept_is_a_503_not_a_500(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """Broker away and the spool full: a refused body cannot be made durable on the
    quarantine, so the answer is the 503 of the contract (``Retry-After``, one
    ``webhook.unavailable`` line naming the refusal), never a 500; RETM's retry, once the
    broker is back, is answered the 400 and the body kept."""
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_SPOOL_MAX_EVENTS="1")
    quarantine = await broker.tap_queue(names.rejected)
    publisher, spool = relay.relay.app[PUBLISHER], relay.relay.app[SPOOL]
    refused = b"not json " + uuid.uuid4().hex.encode()
    fault_proxy.cut()
    await wait_for(lambda: not publisher.connected.is_set(), what="the link to drop")
    filler = await relay.event(b'{"event":"order.created","reference":"filler"}')

    with capture_logs() as logs:
        full = await relay.event(refused)
    fault_proxy.restore()
    await wait_for(lambda: spool.depth == 0 and not spool.full, what="the spool to drain")
    retried = await relay.event(refused)

    assert filler.status == 200
    assert (full.status, full.headers["Retry-After"]) == (503, "5")
    assert full.body == {
        "error": "unavailable",
        "detail": "the event could not be made durable (spool_full); retry later",
    }
    lines = [line for line in logs if line["event"].startswith("webhook.")]
    assert [(line["event"], line["reason"], line["rejected_reason"]) for line in lines] == [
        ("webhook.unavailable", "spool_full", "invalid_json")
    ]
    assert (retried.status, retried.body["error"]) == (400, "invalid_json")
    message = await quarantine.get()
    assert (message.body, message.routing_key) == (refused, "invalid_json")
    assert quarantine.empty()


# -- 3. media types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "text/plain; charset=utf-8",
        "Text/Plain; charset=US-ASCII",
        "application/vnd.api+json",
        "application/problem+json; charset=UTF-8",
        "application/json",
    ],
)
async def test_a_json_object_is_accepted_whatever_json_media_type_says_so(
    relay: RunningRelay, broker: Broker, names: Names, content_type: str | None
) -> None:
    """From an authenticated sender a JSON object is accepted with no Content-Type, with
    text/plain and with application/*+json, and published as sent."""
    tap = await broker.tap(names.exchange)
    body = b'{"event":"order.created","reference":"%s"}' % uuid.uuid4().hex.encode()

    answer = await relay.event(body, content_type=content_type)

    assert (answer.status, answer.body["status"]) == (200, "accepted")
    message = await tap.get()
    assert (message.body, message.content_type) == (body, "application/json")


# -- 6. alerts are never swallowed -----------------------------------------------------------------


async def test_each_error_webhook_arrival_is_published_and_counted(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """The same error webhook three times: three messages, each with a message_id of its own,
    three 200 ``accepted``, counted in relay_retm_error_webhooks_total (0 before)."""
    tap = await broker.tap(names.exchange, "delivery.error")
    body = b'{"code":500,"endpoint":"https://relay.example/retm/events","message":"timeout"}'
    assert await metric(relay.url, "relay_retm_error_webhooks_total") == 0.0

    answers = [await relay.post("/retm/errors", body) for _ in range(3)]

    assert [(a.status, a.body["status"]) for a in answers] == [(200, "accepted")] * 3
    messages = await tap.take(3)
    assert [m.body for m in messages] == [body] * 3
    ids = [m.message_id for m in messages]
    assert ids == [a.body["id"] for a in answers]
    assert len(set(ids)) == 3
    assert all(str(i).startswith(f"{FINGERPRINT}:delivery.error:arrival-") for i in ids)
    assert await metric(relay.url, "relay_retm_error_webhooks_total") == 3.0


async def test_body_hash_keys_last_hash_ttl_and_references_last_ttl(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """An event without a reference is a duplicate for ``dedup.hash_ttl`` (60 s here) and is
    published again once that has passed, with the same message_id; an event with a reference
    stays a duplicate for ``dedup.ttl``. Time is the relay's injected clock."""
    now = [1_900_000_000.0]
    settings = load_settings(
        None, relay_environ(names, tmp_path / "state", RELAY_DEDUP_HASH_TTL="60")
    )
    relay = Relay(settings, clock=lambda: now[0])
    await relay.start()
    try:
        await asyncio.wait_for(relay.wait_durable(), 15)
        tap = await broker.tap(names.exchange)
        plain = b'{"event":"menu.updated","items":[1,2]}'
        referenced = b'{"event":"menu.updated","reference":"m-1"}'
        async with aiohttp.ClientSession() as session:

            async def post(body: bytes) -> str:
                async with session.post(
                    relay.url + "/retm/events",
                    data=body,
                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"},
                ) as r:
                    return str(orjson.loads(await r.read())["status"])

            first = [await post(plain), await post(referenced)]
            now[0] += 59
            within = [await post(plain), await post(referenced)]
            now[0] += 2
            after = [await post(plain), await post(referenced)]
        messages = await tap.take(3)
    finally:
        await relay.stop()

    assert first == ["accepted", "accepted"]
    assert within == ["duplicate", "duplicate"]
    assert after == ["accepted", "duplicate"]
    assert [m.body for m in messages] == [plain, referenced, plain]
    assert messages[0].message_id == messages[2].message_id
    assert tap.empty()


# -- 7 and 10. strict HTTP, nothing echoed ---------------------------------------------------------


async def raw_exchange(url: str, data: bytes) -> tuple[bytes, bytes]:
    """Send ``data`` on a fresh connection; (status line, body) of the answer, read until the
    relay closes the connection."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


async def test_two_authorization_headers_get_400(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """Two Authorization headers, even both valid: 400 ``duplicate_authorization``, and
    nothing published or quarantined."""
    tap = await broker.tap(names.exchange)
    quarantine = await broker.tap_queue(names.rejected)
    headers = CIMultiDict(
        [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]
    )
    async with relay.session.post(
        relay.url + "/retm/events",
        data=b"{not json",
        headers=headers,
    ) as response:
        status, body = response.status, orjson.loads(await response.read())

    assert status == 400
    assert body == {
        "error": "duplicate_authorization",
        "detail": "a request must have one Authorization header",
    }
    await assert_only_sentinel_follows(relay, tap)
    assert quarantine.empty()


@pytest.mark.parametrize("second", [b"authorization", b"AUTHORIZATION", b"Authorization"])
async def test_two_authorization_headers_in_any_letter_case_get_400(
    relay: RunningRelay, second: bytes
) -> None:
    """The second Authorization header may be spelt in any letter case (the header names are
    the same): 400 ``duplicate_authorization``, over a raw connection."""
    body = b'{"event":"order.created","reference":"two-auth"}'
    request = (
        b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
        + second + b": Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip

    status_line, answer = await raw_exchange(relay.url, request)

    assert status_line == b"HTTP/1.1 400 Bad Request"
    assert orjson.loads(answer)["error"] == "duplicate_authorization"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
async def test_other_http_versions_get_505(
    relay: RunningRelay, broker: Broker, names: Names, version: bytes
) -> None:
    """A request line that is not HTTP/1.0 or 1.1 is answered 505 with the JSON error body
    (``HTTP/1.1 505`` from the app for a version aiohttp parses, ``HTTP/1.0 505`` from the
    connection for one its parser refuses), and the event is not published."""
    tap = await broker.tap(names.exchange)
    body = b'{"event":"order.created","reference":"v2"}'
    request = (
        b"POST /retm/events " + version + b"\r\nHost: relay\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )

    status_line, answer = await raw_exchange(relay.url, request)

    expected = "1.1" if version in (b"HTTP/2.0", b"HTTP/0.9") else "1.0"
    assert status_line == f"HTTP/{expected} 505 HTTP Version Not Supported".encode()
    assert orjson.loads(answer) == {
        "error": "http_version_not_supported",
        "detail": "only HTTP/1.0 and HTTP/1.1 are supported",
    }
    await assert_only_sentinel_follows(relay, tap)


async def test_repeated_content_encoding_is_decoded_in_full(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """``Content-Encoding: gzip`` twice (two headers) on a body gzipped twice: both codings
    are undone and the original bytes published; ``gzip`` then ``br``: 415."""
    tap = await broker.tap(names.exchange)
    body = b'{"event":"order.created","reference":"twice-gzipped"}'
    headers = CIMultiDict(
        [
            ("Authorization", f"Bearer {TOKEN}"),
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("Content-Encoding", "gzip"),
        ]
    )
    async with relay.session.post(
        relay.url + "/retm/events", data=gzip.compress(gzip.compress(body)), headers=headers
    ) as response:
        twice = response.status, orjson.loads(await response.read())
    headers.popall("Content-Encoding")
    headers.extend([("Content-Encoding", "gzip"), ("Content-Encoding", "br")])
    async with relay.session.post(
        relay.url + "/retm/events", data=gzip.compress(body), headers=headers
    ) as response:
        brotli = response.status, orjson.loads(await response.read())

    assert twice[0] == 200
    assert twice[1]["status"] == "accepted"
    assert (await tap.get()).body == body
    assert brotli == (
        415,
        {
            "error": "unsupported_encoding",
            "detail": "Content-Encoding must be gzip, deflate or identity",
        },
    )
    await assert_only_sentinel_follows(relay, tap)


@pytest.mark.parametrize(
    ("request_bytes", "kind"),
    [
        (
            b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\x01\r\nContent-Length: 2\r\n\r\n{}",
            "BadHttpMessage",
        ),
        (
            b"POST /retm/events HTTP/1.1\r\nHost: relay\r\nAuthorization Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 2\r\n\r\n{}",
            "BadHttpMessage",
        ),
    ],
    ids=["control-character", "no-colon"],
)
async def test_malformed_http_answer_is_the_short_json_error(
    relay: RunningRelay, request_bytes: bytes, kind: str
) -> None:
    """aiohttp's parser refuses the header line that holds the token: the answer is the same
    short JSON error body as every other 4xx, without a byte of the request."""
    status_line, body = await raw_exchange(relay.url, request_bytes)

    assert status_line.split(b" ", 1)[1] == b"400 Bad Request"
    assert orjson.loads(body) == {
        "error": "bad_request",
        "detail": f"malformed HTTP request ({kind})",
    }
    assert TOKEN.encode() not in body
    assert b"Bearer" not in body


async def test_quarantine_is_declared_like_the_unrouted_destination(
    start_relay: StartRelay, broker: Broker, names: Names
) -> None:
    """The relay declares the quarantine as it declares the unrouted destination: a durable
    fanout exchange and a quorum queue of the same name, bound to it. Declaring them
    again with exactly those arguments is accepted by the broker (any other type or argument
    would be refused), and a message published to the exchange lands in the queue."""
    await start_relay()
    channel = await broker.connection.channel()
    for name in names.own:
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await exchange.publish(aio_pika.Message(name.encode()), routing_key="any")
        message = await queue.get(timeout=5)
        assert message.body == name.encode()
        await message.ack()
    await channel.close()


async def test_error_answers_never_carry_request_bytes(relay: RunningRelay) -> None:
    """A token put in the path (404) or the method of a 405 never comes back in the answer:
    the detail names neither (aiohttp's parser refuses methods it does not know, with the
    JSON error body of a malformed request)."""
    secret = "s3cr3t-" + uuid.uuid4().hex
    status_404, body_404 = await raw_exchange(
        relay.url,
        f"GET /retm/events/{secret} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode(),
    )
    method = "PROPFIND"
    status_405, body_405 = await raw_exchange(
        relay.url,
        f"{method} /retm/events HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode(),
    )

    assert status_404 == b"HTTP/1.1 404 Not Found"
    assert orjson.loads(body_404) == {"error": "not_found", "detail": "no such route"}
    assert status_405 == b"HTTP/1.1 405 Method Not Allowed"
    assert orjson.loads(body_405) == {
        "error": "method_not_allowed",
        "detail": "this method is not allowed here; use POST",
    }
    assert secret.encode() not in body_404
    assert method.encode() not in body_405
