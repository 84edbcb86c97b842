"""Bad input gets the right 4xx with a JSON reason, is counted, and publishes nothing."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import orjson
import pytest

from tests.conftest import Broker, Names, RunningRelay, assert_only_sentinel_follows

GOOD = b'{"event":"order.created","reference":"r-1"}'


@pytest.mark.parametrize(
    ("header", "www_authenticate"),
    [
        (None, 'Bearer realm="retm-relay"'),
        ("Bearer", 'Bearer realm="retm-relay", error="invalid_request"'),
        ("Bearer ", 'Bearer realm="retm-relay", error="invalid_request"'),
        ("Bearer a b", 'Bearer realm="retm-relay", error="invalid_request"'),
        ("Basic dXNlcjpwYXNz", 'Bearer realm="retm-relay", error="invalid_request"'),
        ("Token test-token-0123456789abcdef", 'Bearer realm="retm-relay", error="invalid_request"'),
        ("Bearer wrong-token", 'Bearer realm="retm-relay", error="invalid_token"'),
        ("Bearer test-token-0123456789abcdeF", 'Bearer realm="retm-relay", error="invalid_token"'),
        ("Bearer tëst-tökén", 'Bearer realm="retm-relay", error="invalid_token"'),
    ],
)
async def test_bad_tokens_get_401_and_publish_nothing(
    relay: RunningRelay,
    broker: Broker,
    names: Names,
    header: str | None,
    www_authenticate: str,
) -> None:
    """Missing, malformed, other-scheme and wrong tokens: 401 with WWW-Authenticate: Bearer."""
    tap = await broker.tap(names.exchange)
    headers = {"Authorization": header} if header is not None else {}

    answer = await relay.event(GOOD, token=None, headers=headers)

    assert answer.status == 401
    assert answer.body["error"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"] == www_authenticate
    await assert_only_sentinel_follows(relay, tap)


async def test_scheme_is_case_insensitive(relay: RunningRelay) -> None:
    """``bearer`` and ``BEARER`` are the same scheme (RFC 9110 §11.1)."""
    answer = await relay.event(
        GOOD, token=None, headers={"Authorization": "bEaReR test-token-0123456789abcdef"}
    )
    assert answer.status == 200


async def test_two_tokens_at_once_for_rotation(start_relay: object) -> None:
    """Both tokens of ``RELAY_AUTH_TOKENS=old,new`` are accepted while RETM switches over."""
    relay = await start_relay(RELAY_AUTH_TOKENS="old-token-1,new-token-2")  # type: ignore[operator]
    a = await relay.event(GOOD, token="old-token-1")
    b = await relay.event(GOOD.replace(b"r-1", b"r-2"), token="new-token-2")
    c = await relay.event(GOOD.replace(b"r-1", b"r-3"), token="test-token-0123456789abcdef")
    assert (a.status, b.status, c.status) == (200, 200, 401)


def _gzip_bomb(size: int) -> bytes:
    return gzip.compress(b'{"event":"order.created","pad":"' + b"a" * size + b'"}', 9)


BAD_BODIES = [
    pytest.param(b"\xff\xfe{}", {}, 400, "invalid_json", id="invalid-utf8"),
    pytest.param(
        b'{"event":"order.created","x":"\xc3"}', {}, 400, "invalid_json", id="bad-utf8-in-string"
    ),
    pytest.param(b'{"event":"order.created","total":NaN}', {}, 400, "invalid_json", id="nan"),
    pytest.param(b'{"total":Infinity}', {}, 400, "invalid_json", id="infinity"),
    pytest.param(b"", {}, 400, "invalid_json", id="empty"),
    pytest.param(b"   ", {}, 400, "invalid_json", id="whitespace"),
    pytest.param(b"[1,2,3]", {}, 400, "not_object", id="top-level-array"),
    pytest.param(b'"order.created"', {}, 400, "not_object", id="top-level-string"),
    pytest.param(b"null", {}, 400, "not_object", id="null"),
    pytest.param(GOOD + b"garbage", {}, 400, "invalid_json", id="trailing-garbage"),
    pytest.param(GOOD + b"{}", {}, 400, "invalid_json", id="two-objects"),
    pytest.param(b'{"a":' * 2000 + b"1" + b"}" * 2000, {}, 400, "too_deep", id="2000-deep"),
    pytest.param(b'{"a":"\\ud800","b":NaN}', {}, 400, "invalid_json", id="surrogate-and-nan"),
    pytest.param(b'{"a":1e400,"b":-Infinity}', {}, 400, "invalid_json", id="big-and-infinity"),
    pytest.param(b"\xef\xbb\xbf\xef\xbb\xbf{}", {}, 400, "invalid_json", id="two-boms"),
    pytest.param(
        b"\x1f\x8b\x08\x00garbage",
        {"Content-Encoding": "gzip"},
        400,
        "bad_encoding",
        id="corrupt-gzip",
    ),
    pytest.param(
        gzip.compress(GOOD)[:-6],
        {"Content-Encoding": "gzip"},
        400,
        "bad_encoding",
        id="truncated-gzip",
    ),
    pytest.param(
        gzip.compress(GOOD) + b"junk",
        {"Content-Encoding": "gzip"},
        400,
        "bad_encoding",
        id="gzip-trailing-junk",
    ),
    pytest.param(
        b"not deflate", {"Content-Encoding": "deflate"}, 400, "bad_encoding", id="corrupt-deflate"
    ),
    pytest.param(
        _gzip_bomb(2 * 1024 * 1024),
        {"Content-Encoding": "gzip"},
        413,
        "payload_too_large",
        id="gzip-expands-past-limit",
    ),
    pytest.param(
        zlib.compress(b" " * (2 * 1024 * 1024) + GOOD),
        {"Content-Encoding": "deflate"},
        413,
        "payload_too_large",
        id="deflate-expands-past-limit",
    ),
    pytest.param(GOOD, {"Content-Encoding": "br"}, 415, "unsupported_encoding", id="brotli"),
    pytest.param(
        GOOD, {"Content-Encoding": "gzip, br"}, 415, "unsupported_encoding", id="gzip-then-br"
    ),
    pytest.param(
        gzip.compress(GOOD),
        {"Content-Encoding": "gzip, gzip"},
        400,
        "bad_encoding",
        id="gzip-claimed-twice-applied-once",
    ),
    pytest.param(b"{" + b" " * (1024 * 1024) + b"}", {}, 413, "payload_too_large", id="too-large"),
]


@pytest.mark.parametrize(("body", "headers", "status", "code"), BAD_BODIES)
async def test_bad_bodies_get_4xx_and_publish_nothing(
    relay: RunningRelay,
    broker: Broker,
    names: Names,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """Each malformed body gets its documented 4xx and JSON error code; nothing is published."""
    tap = await broker.tap(names.exchange)

    answer = await relay.event(body, headers=headers)

    assert (answer.status, answer.body["error"]) == (status, code)
    assert isinstance(answer.body["detail"], str)
    await assert_only_sentinel_follows(relay, tap)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/json; charset=klingon",
        "text/plain; charset=utf-16",
        "application/jsonx",
        "text/json",
        "text/html",
        "application/xml",
        "application/vnd.api+jsonx",
    ],
)
async def test_other_media_types_get_415(
    relay: RunningRelay, broker: Broker, names: Names, content_type: str | None
) -> None:
    """Anything but a JSON media type (application/json, application/*+json, text/plain or
    none, UTF-8) is 415, including a form body."""
    tap = await broker.tap(names.exchange)
    body = b"event=order.created&reference=r" if content_type and "form" in content_type else GOOD

    answer = await relay.event(body, content_type=content_type)

    assert (answer.status, answer.body["error"]) == (415, "unsupported_media_type")
    await assert_only_sentinel_follows(relay, tap)


async def test_rejections_are_counted_by_reason(relay: RunningRelay) -> None:
    """/metrics counts rejected requests by reason; /health shows the same numbers."""
    await relay.event(b"[]")
    await relay.event(b"[]")
    await relay.event(GOOD, token="nope")

    metrics = (await relay.get("/metrics")).body
    assert 'relay_rejected_total{reason="not_object"} 2.0' in metrics
    assert 'relay_rejected_total{reason="unauthorized"} 1.0' in metrics
    assert 'relay_requests_total{outcome="rejected",route="events"} 3.0' in metrics
    health = (await relay.get("/health")).body
    assert health["counters"]["rejected_by_reason"] == {"not_object": 2, "unauthorized": 1}


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_webhook_path_get_405(relay: RunningRelay, method: str) -> None:
    """HEAD, GET, PUT ... on the webhook path: 405 with ``Allow: POST``."""
    answer = await relay.get("/retm/events", method=method)
    assert answer.status == 405
    assert answer.headers["Allow"] == "POST"
    if method != "HEAD":
        assert answer.body["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "path", ["/retm/events/", "/retm/event", "/retm/events/x", "/RETM/events", "/status"]
)
async def test_unknown_paths_get_404_without_redirect(relay: RunningRelay, path: str) -> None:
    """A trailing slash or another path is 404 with a JSON body, never a redirect."""
    answer = await relay.post(path, GOOD)
    assert answer.status == 404
    assert answer.body["error"] == "not_found"
    assert "Location" not in answer.headers


ROUTING_CASES = [
    ("#", "unrecognized"),
    ("order.*", "unrecognized"),
    ("", "unrecognized"),
    ("a" * 256, "unrecognized"),
    ("a" * 255, "a" * 255),
    ("é" * 128, "unrecognized"),
    ("Order.Created", "order.created"),
    ("order..created", "unrecognized"),
    (".order", "unrecognized"),
    ("order created", "unrecognized"),
    ("order.created\n", "unrecognized"),
    (None, "unrecognized"),
    (42, "unrecognized"),
    (["order.created"], "unrecognized"),
    ("customer.updated_v2-beta", "customer.updated_v2-beta"),
]


@pytest.mark.parametrize(("event", "routing_key"), ROUTING_CASES)
async def test_routing_key_edge_cases(
    relay: RunningRelay, broker: Broker, names: Names, event: object, routing_key: str
) -> None:
    """Odd ``event`` values follow the rule, are still published, and the next normal event
    publishes on the same connection."""
    tap = await broker.tap(names.exchange)
    raw = (
        orjson.dumps({"event": event, "reference": "edge"})
        if event is not None
        else b'{"reference":"edge"}'
    )

    answer = await relay.event(raw)

    assert answer.status == 200
    assert answer.body["routing_key"] == routing_key
    message = await tap.get()
    assert (message.routing_key, message.body) == (routing_key, raw)
    if routing_key == "unrecognized" and isinstance(event, str):
        assert message.headers["x-retm-event-raw"] == event[:255]
    await assert_only_sentinel_follows(relay, tap)


RAW_REQUESTS = [
    pytest.param(b"GARBAGE\r\n\r\n", id="garbage-request-line"),
    pytest.param(
        b"POST /retm/events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        id="bad-content-length",
    ),
    pytest.param(
        b"POST /retm/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer test-token-0123456789abcdef\r\n"
        b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        id="bad-chunk-size",
    ),
    pytest.param(
        b"POST /retm/events HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        id="header-too-large",
    ),
    pytest.param(
        b"POST /retm/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\n{}",
        id="two-content-lengths",
    ),
]


@pytest.mark.parametrize("request_bytes", RAW_REQUESTS)
async def test_malformed_http_is_a_4xx(
    relay: RunningRelay, broker: Broker, names: Names, request_bytes: bytes
) -> None:
    """Malformed HTTP framing is answered 4xx by the server, never 5xx, and publishes nothing."""
    tap = await broker.tap(names.exchange)
    host, port = relay.relay.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request_bytes)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    status = int(status_line.split()[1])
    assert 400 <= status < 500, status_line
    await assert_only_sentinel_follows(relay, tap)


async def test_client_gone_mid_body_publishes_nothing(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """A sender that promises 1,000 bytes, sends 10 and hangs up publishes nothing, and the relay
    keeps serving."""
    tap = await broker.tap(names.exchange)
    host, port = relay.relay.addresses[0]
    _, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /retm/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        b"Authorization: Bearer test-token-0123456789abcdef\r\n"
        b"Content-Type: application/json\r\n\r\n" + GOOD[:10]
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await assert_only_sentinel_follows(relay, tap)
