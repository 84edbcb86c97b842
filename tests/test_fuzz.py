"""Property: nothing a client sends produces a 5xx, and only accepted events are published.

Hypothesis throws arbitrary bodies (bytes, text, JSON of any shape, with or without a BOM,
compressed or not, corrupted; JSON that orjson refuses and RFC 8259 allows), media types,
content codings and Authorization headers, one or several of each, at the ingest route of one
running relay, then proves by consuming the queues that exactly the events answered
``accepted`` were published, each once, with the bytes the relay promised, and that each
authenticated body refused as not a JSON object was quarantined once, byte for byte.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from dataclasses import dataclass, field

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay.ingest import KEPT_AS_RECEIVED
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
# JSON by RFC 8259 that orjson refuses: lone surrogate escapes (a name cut inside an emoji),
# numbers beyond a double, integers of hundreds or thousands of digits.
LONE_SURROGATES = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.characters(max_codepoint=0x7F)
    ),
    min_size=1,
    max_size=8,
).filter(lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in t))
HUGE_NUMBERS = st.one_of(
    st.integers(309, 9999).map(lambda e: f"1e{e}"),
    st.integers(309, 999).map(lambda e: f"-2.5E+{e}"),
    st.integers(21, 6000).map(lambda n: "9" * n),
    st.integers(21, 400).map(lambda n: "-" + "1" * n),
)


@st.composite
def rfc8259_objects(draw: st.DrawFn) -> bytes:
    """A JSON object (as bytes) that orjson refuses: its text holds a lone surrogate escape or
    a number no double can hold, anywhere in an otherwise ordinary RETM-like body."""
    fields = draw(
        st.dictionaries(st.sampled_from(["reference", "name", "note"]), LONE_SURROGATES, max_size=2)
    )
    body = {"event": draw(st.sampled_from(["order.created", "customer.updated", "x"])), **fields}
    text = json.dumps(body, ensure_ascii=True)  # escapes each lone surrogate as \udXXX
    if not fields or draw(st.booleans()):
        number = draw(HUGE_NUMBERS)
        nested = draw(st.sampled_from(['"n":%s', '"a":[1,%s]', '"o":{"p":%s}']))
        text = text[:-1] + ", " + nested % number + "}"
    return text.encode()


RFC_8259_ONLY = rfc8259_objects()
BODIES = st.one_of(
    OBJECTS,
    OBJECTS.map(lambda b: b"\xef\xbb\xbf" + b),
    JSON_VALUE.map(orjson.dumps),
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    OBJECTS.map(lambda b: b + b"x"),
    OBJECTS.map(lambda b: b[:-1]),
    OBJECTS.map(lambda b: b[:-1] + b',"big":123456789012345678901234567890}' if len(b) > 2 else b),
    RFC_8259_ONLY,
    RFC_8259_ONLY.map(lambda b: b[:-1]),  # cut short: not JSON any more
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
LENIENT_TYPE = st.sampled_from(
    [
        None,
        "text/plain",
        "text/plain; charset=utf-8",
        "application/vnd.retm+json",
        "application/json",
    ]
)
# (aiohttp's client folds names that differ only in letter case into one header, so the
# second Authorization keeps the first one's spelling; tests/test_edge.py sends the other
# spellings over a raw socket)
HEADER_NAME_CASES = st.just("Authorization")
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
    #: authenticated bodies answered 400 as not a JSON object: what the quarantine must hold
    quarantined: set[bytes] = field(default_factory=set)


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
    quarantine = await broker.tap_queue(names.rejected)
    ledger = Ledger()

    def send(
        body: bytes,
        content_type: str | None,
        encoding: str | None,
        compress: bool,
        auth: str | None,
        extra: list[tuple[str, str]] | None = None,
        wire: bytes | None = None,
    ) -> int:
        """Post ``body`` (``wire``: the bytes to send instead, already encoded) and check the
        answer; the ledger learns what must be published or quarantined. The status."""
        headers: CIMultiDict[str] = CIMultiDict()
        if content_type is not None:
            headers["Content-Type"] = content_type
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        if auth is not None:
            headers["Authorization"] = auth
        headers.extend(extra or [])
        sent = _encode(body, encoding, compress) if wire is None else wire
        answer = asyncio.run_coroutine_threadsafe(
            relay.event(sent, token=None, content_type=None, headers=headers), loop
        ).result(timeout=30)
        ledger.statuses[answer.status] = ledger.statuses.get(answer.status, 0) + 1
        assert answer.status < 500, (answer.status, answer.body)
        assert answer.status in (200, 400, 401, 413, 415), answer.status
        published = body[3:] if body.startswith(b"\xef\xbb\xbf") else body
        if answer.status == 200:
            assert answer.body["status"] in ("accepted", "duplicate")
            if answer.body["status"] == "accepted":
                assert answer.body["id"] not in ledger.expected
                ledger.expected[answer.body["id"]] = published
            else:
                assert answer.body["id"] in ledger.expected
        else:
            assert isinstance(answer.body, dict), answer.body
            assert set(answer.body) == {"error", "detail"}
            if answer.body["error"] in ("invalid_json", "not_object", "too_deep"):
                ledger.quarantined.add(published)
            elif answer.body["error"] in KEPT_AS_RECEIVED:  # kept still encoded
                ledger.quarantined.add(sent)
        return int(answer.status)

    def example(
        body: bytes,
        content_type: str | None,
        encoding: str | None,
        compress: bool,
        auth: str | None,
    ) -> None:
        send(body, content_type, encoding, compress, auth)

    def rfc8259_example(body: bytes, content_type: str | None, auth: str) -> None:
        """JSON by RFC 8259 that orjson refuses, from an authenticated sender: always 200."""
        assert send(body, content_type, None, False, auth) == 200

    def header_shapes(
        body: bytes,
        content_type: str | None,
        auth: str | None,
        codings: list[str],
        second_auth: tuple[str, str] | None,
    ) -> None:
        """Headers repeated or in any letter case: the same rules, never a 5xx; two
        Authorization headers are always a 400."""
        extra = [("Content-Encoding", coding) for coding in codings]
        if second_auth is not None:
            extra.append(second_auth)
        sent = body
        for coding in codings:  # applied in order, as a sender would
            sent = _encode(sent, coding, True)
        status = send(body, content_type, None, False, auth, extra, sent)
        if second_auth is not None and auth is not None:
            assert status == 400

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
    # JSON that only the tolerant parser reads, with every media type a JSON sender may use.
    tolerant = fuzz(
        given(body=RFC_8259_ONLY, content_type=LENIENT_TYPE, auth=VALID_AUTH)(rfc8259_example)
    )
    # Header shapes: repeated Content-Encoding, a second Authorization, any letter case.
    shapes = fuzz(
        given(
            body=BODIES,
            content_type=st.one_of(LENIENT_TYPE, CONTENT_TYPES),
            auth=st.one_of(VALID_AUTH, AUTHS),
            codings=st.lists(
                st.sampled_from(["gzip", "deflate", "identity", "GZIP", "br"]), max_size=3
            ),
            second_auth=st.one_of(
                st.none(), st.tuples(HEADER_NAME_CASES, st.one_of(VALID_AUTH, HEADER_TEXT))
            ),
        )(header_shapes)
    )
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(authenticated)
    await asyncio.to_thread(arbitrary)
    await asyncio.to_thread(tolerant)
    await asyncio.to_thread(shapes)

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
    kept = [message.body for message in await quarantine.take(len(ledger.quarantined))]
    assert sorted(kept) == sorted(ledger.quarantined)  # each refused body once
    refused_sentinel = b"{zz.sentinel, not JSON"
    assert (await relay.event(refused_sentinel)).status == 400
    assert (await quarantine.get()).body == refused_sentinel  # nothing else was kept
