"""Property: nothing a client sends produces a 5xx, and only accepted events are published.

Hypothesis throws arbitrary bodies (bytes, text, JSON of any shape, with or without a BOM,
compressed or not, corrupted), media types, content codings and Authorization headers at the
ingest route of one running relay, then proves by consuming the queue that exactly the events
answered ``accepted`` were published, each once, with the bytes the relay promised.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from dataclasses import dataclass, field

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TOKEN, Broker, Names, RunningRelay

HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
EVENTS = st.one_of(
    st.sampled_from(
        ["order.created", "Order.Refunded", "customer.updated", "#", "order.*", "", "a..b", "é"]
    ),
    st.text(max_size=20),
    JSON_VALUE,
)
OBJECTS = st.fixed_dictionaries(
    {"event": EVENTS},
    optional={
        "reference": st.one_of(st.text(max_size=40), st.integers(0, 2**63), JSON_VALUE),
        "business_refrence": st.one_of(st.text(max_size=20), JSON_VALUE),
        "branch_id": st.one_of(st.text(max_size=30), JSON_VALUE),
        "payload": JSON_VALUE,
    },
).map(orjson.dumps)
BODIES = st.one_of(
    OBJECTS,
    OBJECTS.map(lambda b: b"\xef\xbb\xbf" + b),
    JSON_VALUE.map(orjson.dumps),
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    OBJECTS.map(lambda b: b + b"x"),
    OBJECTS.map(lambda b: b[:-1]),
    OBJECTS.map(lambda b: b[:-1] + b',"big":123456789012345678901234567890}' if len(b) > 2 else b),
)
VALID_TYPE = st.sampled_from(
    ["application/json", "Application/JSON", "application/json; charset=utf-8"]
)
CONTENT_TYPES = st.one_of(
    VALID_TYPE,
    VALID_TYPE,
    st.sampled_from(
        [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF8",
            'application/json; charset="utf-8"',
            "application/json; charset=latin-1",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
        ]
    ),
    HEADER_TEXT,
    st.none(),
)
ENCODINGS = st.one_of(
    st.sampled_from([None, "identity", "gzip", "x-gzip", "deflate", "br", "GZIP", "gzip, br"]),
    HEADER_TEXT,
)
VALID_AUTH = st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}"])
AUTHS = st.one_of(
    VALID_AUTH,
    VALID_AUTH,
    VALID_AUTH,
    st.sampled_from([None, "Bearer", f"Basic {TOKEN}", "Bearer x", f"Bearer {TOKEN}x"]),
    HEADER_TEXT,
)


@dataclass
class Ledger:
    """What the relay answered 200 "accepted" for: message id -> the bytes it must publish."""

    expected: dict[str, bytes] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)


def _encode(body: bytes, encoding: str | None, compress: bool) -> bytes:
    if not compress or encoding is None:
        return body
    if encoding.lower() in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if encoding.lower() == "deflate":
        return zlib.compress(body)
    return body


async def test_arbitrary_input_never_gives_5xx(
    relay: RunningRelay, broker: Broker, names: Names
) -> None:
    """No generated request gets a 5xx; the published messages are exactly the accepted
    events, each once, with the decompressed, BOM-less bytes that were sent."""
    tap = await broker.tap(names.exchange, "#")
    unrouted = await broker.tap_queue(names.unrouted)
    ledger = Ledger()

    def example(
        body: bytes,
        content_type: str | None,
        encoding: str | None,
        compress: bool,
        auth: str | None,
    ) -> None:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        if auth is not None:
            headers["Authorization"] = auth
        sent = _encode(body, encoding, compress)
        answer = asyncio.run_coroutine_threadsafe(
            relay.event(sent, token=None, content_type=None, headers=headers), loop
        ).result(timeout=30)
        ledger.statuses[answer.status] = ledger.statuses.get(answer.status, 0) + 1
        assert answer.status < 500, (answer.status, answer.body)
        assert answer.status in (200, 400, 401, 413, 415), answer.status
        if answer.status == 200:
            assert answer.body["status"] in ("accepted", "duplicate")
            published = body[3:] if body.startswith(b"\xef\xbb\xbf") else body
            if answer.body["status"] == "accepted":
                assert answer.body["id"] not in ledger.expected
                ledger.expected[answer.body["id"]] = published
            else:
                assert answer.body["id"] in ledger.expected
        else:
            assert isinstance(answer.body, dict), answer.body
            assert set(answer.body) == {"error", "detail"}

    fuzz = settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    # Authenticated JSON requests with arbitrary bodies and codings: the publish path.
    authenticated = fuzz(
        given(
            body=BODIES,
            content_type=VALID_TYPE,
            encoding=ENCODINGS,
            compress=st.booleans(),
            auth=VALID_AUTH,
        )(example)
    )
    # Everything arbitrary, headers included: mostly the rejection paths.
    arbitrary = fuzz(
        given(
            body=BODIES,
            content_type=CONTENT_TYPES,
            encoding=ENCODINGS,
            compress=st.booleans(),
            auth=AUTHS,
        )(example)
    )
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(authenticated)
    await asyncio.to_thread(arbitrary)

    # the generator must reach the publish path, not only the rejections
    assert ledger.statuses.get(200, 0) > 50, ledger.statuses
    assert all(ledger.statuses.get(code, 0) > 10 for code in (400, 401, 415)), ledger.statuses
    sentinel = b'{"event":"zz.sentinel","reference":"end"}'
    assert (await relay.event(sentinel)).status == 200
    received: dict[str, bytes] = {}
    while True:
        message = await tap.get()
        if message.body == sentinel:
            break
        assert message.message_id not in received, "published twice"
        received[str(message.message_id)] = message.body
    assert received == ledger.expected
    assert unrouted.empty()
