"""The consumer contract (docs/asyncapi.yaml): valid AsyncAPI by the AsyncAPI project's own parser,
served by the relay at ``/asyncapi.yaml``, every RETM fixture valid against its message's payload
schema, and what a real relay publishes to a real RabbitMQ matches the documented routing key,
properties and headers: on the event exchange, the unrouted queue, the quarantine, the archive
stream and a replay's target queue."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage

from relay.http.auth import token_digest
from relay.logs import iso_utc_millis
from relay.settings import Settings
from tests.cli import names_environ, run_cli
from tests.conftest import (
    AMQP_URL,
    FIXTURES,
    ROOT,
    TOKEN,
    Broker,
    Names,
    StartRelay,
    fixture_bytes,
    read_archive,
)
from tests.test_loyalty import example

DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
PARSER = ROOT / "tools" / "asyncapi"
PRINCIPAL = f"token-{token_digest(TOKEN).hex()[:8]}"

#: the reasons a body is quarantined for (relay/json_body.py's BodyRefused codes)
REASONS = [
    "invalid_json",
    "not_object",
    "too_deep",
    "bad_encoding",
    "unsupported_media_type",
    "unsupported_encoding",
]
#: the event messages the relay publishes (not the loyalty RPC requests or replies)
EVENTS = [
    "order.created", "order.refunded", "customer.created", "customer.updated",
    "customer.deleted", "delivery.error", "app.installed", "unrecognized",
]  # fmt: skip

#: each fixture of RETM's bodies -> the message that carries it (None: not an AMQP message)
FIXTURE_MESSAGES = {
    "order.created.json": "order.created",
    "order.refunded.json": "order.refunded",
    "customer.created.json": "customer.created",
    "customer.updated.json": "customer.updated",
    "customer.deleted.json": "customer.deleted",
    "error.webhook.json": "delivery.error",
    "install.success_callback.json": "app.installed",
    "loyalty.check_reward.json": "loyalty.check_reward",
    "loyalty.redeem_reward.json": "loyalty.redeem_reward",
    "loyalty.check_reward.response.200.json": "loyalty.check_reward.reply",
    "loyalty.check_reward.response.400.json": "loyalty.check_reward.reply",
    # the relay's own HTTP answer to RETM's install callback, never published
    "install.success_callback.response.json": None,
}
MESSAGES = sorted(
    {
        "order.created", "order.refunded", "customer.created", "customer.updated",
        "customer.deleted", "delivery.error", "app.installed", "loyalty.check_reward",
        "loyalty.redeem_reward", "loyalty.check_reward.reply", "loyalty.redeem_reward.reply",
        "unrecognized", "rejected",
    }
)  # fmt: skip


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return loaded


def validator(document: dict[str, Any], pointer: str) -> jsonschema.Draft7Validator:
    """A validator for the schema at ``pointer`` (``#/components/...``) of the document, with
    the document as root so that its ``$ref``s resolve (a ``$ref`` beside other keywords is all
    that counts in draft 7, which AsyncAPI's schema format extends)."""
    return jsonschema.Draft7Validator({**document, "$ref": pointer})


def errors(document: dict[str, Any], pointer: str, instance: Any) -> list[str]:
    found = validator(document, pointer).iter_errors(instance)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


async def test_document_is_valid_asyncapi_by_the_asyncapi_parser() -> None:
    """@asyncapi/parser (tools/asyncapi, installed by `make test` from its lockfile) finds no
    error in docs/asyncapi.yaml, sees version 3.0.0 and one message per routing key."""
    node = shutil.which("node")
    if node is None or not (PARSER / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail("node or @asyncapi/parser is missing: `make node` (part of `make test`)")
    process = await asyncio.create_subprocess_exec(
        node,
        "validate.mjs",
        str(DOCUMENT),
        cwd=PARSER,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)

    lines = [json.loads(line) for line in out.decode().splitlines()]
    diagnostics, summary = lines[:-1], lines[-1]
    assert process.returncode == 0, (out, err)
    assert [d for d in diagnostics if d["severity"] in {"error", "warning"}] == []
    assert summary == {"errors": 0, "warnings": 0, "version": "3.0.0", "messages": MESSAGES}


async def test_parser_finds_a_broken_document(tmp_path: Path) -> None:
    """The parser check can fail: an exchange type AMQP does not know is an error."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(DOCUMENT.read_text().replace("type: topic", "type: topics"))
    node = shutil.which("node")
    assert node is not None
    process = await asyncio.create_subprocess_exec(
        node, "validate.mjs", str(broken), cwd=PARSER, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 1
    assert json.loads(out.decode().splitlines()[-1])["errors"] >= 1


def test_messages_are_named_by_their_routing_key(document: dict[str, Any]) -> None:
    """Each message's key, ``name`` and AMQP ``messageType`` (the ``type`` property) are its
    routing key (a quarantined body's are ``rejected``, its routing key is the reason), and
    each event channel's address is that routing key on the topic exchange ``retm.events``,
    durable."""
    messages = document["components"]["messages"]
    assert sorted(messages) == MESSAGES
    for key, message in messages.items():
        assert message["name"] == key
        if not key.endswith(".reply"):
            assert message["bindings"]["amqp"]["messageType"] == key
    exchange = document["components"]["channelBindings"]["eventExchange"]["amqp"]
    assert exchange["is"] == "routingKey"
    assert exchange["exchange"] == {
        "name": "retm.events",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }
    addresses = {
        channel["address"]: list(channel["messages"])
        for channel in document["channels"].values()
        if channel.get("bindings", {}).get("$ref") == "#/components/channelBindings/eventExchange"
    }
    assert addresses == {
        key: [key] for key in MESSAGES if not key.endswith(".reply") and key != "rejected"
    }


def test_quarantine_and_archive_channels_name_the_relays_destinations(
    document: dict[str, Any],
) -> None:
    """The quarantine channel is the durable fanout exchange ``amqp.rejected_exchange`` with
    the reason as its address (the three reasons the relay refuses a body for); the archive
    channel is the durable queue ``archive.queue`` and carries every event message (never the
    quarantined body); the unrouted channel every event message."""
    defaults = Settings()
    channels = document["channels"]
    rejected, archive = channels["rejected"], channels["archive"]
    assert rejected["address"] == "{reason}"
    assert rejected["parameters"]["reason"]["enum"] == REASONS
    assert list(rejected["messages"]) == ["rejected"]
    assert rejected["bindings"]["amqp"]["is"] == "routingKey"
    assert rejected["bindings"]["amqp"]["exchange"] == {
        "name": defaults.amqp.rejected_exchange,
        "type": "fanout",
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }
    assert archive["address"] == defaults.archive.queue
    assert archive["bindings"]["amqp"]["is"] == "queue"
    assert archive["bindings"]["amqp"]["queue"] == {
        "name": defaults.archive.queue,
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": "/",
    }
    assert sorted(archive["messages"]) == sorted(EVENTS)
    assert sorted(channels["unrouted"]["messages"]) == sorted(EVENTS)
    schemas = document["components"]["schemas"]
    assert schemas["RejectedHeaders"]["properties"]["x-relay-rejected-reason"]["enum"] == REASONS


async def test_the_relay_serves_the_document_without_a_token(start_relay: StartRelay) -> None:
    """``GET /asyncapi.yaml`` answers docs/asyncapi.yaml byte for byte (the package's copy is
    the same file), as application/yaml, with no token."""
    relay = await start_relay()
    async with relay.session.get(relay.url + "/asyncapi.yaml") as response:
        body = await response.read()
        content_type = response.headers["Content-Type"]

    packaged = resources.files("relay.http").joinpath("static/asyncapi.yaml").read_bytes()
    assert response.status == 200
    assert content_type == "application/yaml; charset=utf-8"
    assert body == DOCUMENT.read_bytes()
    assert packaged == DOCUMENT.read_bytes()


def test_every_fixture_is_named() -> None:
    """The fixture table below covers every file of tests/fixtures."""
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(FIXTURE_MESSAGES)


@pytest.mark.parametrize(
    ("fixture", "message"), [(f, m) for f, m in FIXTURE_MESSAGES.items() if m is not None]
)
def test_fixture_validates_against_its_payload_schema(
    document: dict[str, Any], fixture: str, message: str
) -> None:
    """Each RETM fixture is valid against the payload schema of the message that carries it."""
    body = orjson.loads(fixture_bytes(fixture))

    assert errors(document, f"#/components/messages/{message}/payload", body) == []


@pytest.mark.parametrize(
    ("fixture", "message", "change", "path"),
    [
        ("order.created.json", "order.created", {"total_price": 120.0}, "total_price"),
        ("order.created.json", "order.created", {"status": 9}, "status"),
        ("order.created.json", "order.refunded", {}, "event"),
        ("customer.created.json", "customer.created", {"customer": {"id": "48213"}}, "customer/id"),
        ("error.webhook.json", "delivery.error", {"code": "504"}, "code"),
        ("loyalty.redeem_reward.json", "loyalty.redeem_reward", {"branch_id": 7}, "branch_id"),
    ],
)
def test_payload_schemas_refuse_wrong_types(
    document: dict[str, Any], fixture: str, message: str, change: dict[str, Any], path: str
) -> None:
    """The schemas are not empty: a float total, an unknown status, the wrong event, a string
    customer id, a string error code or a numeric branch id is refused where it occurs."""
    body = {**orjson.loads(fixture_bytes(fixture)), **change}

    found = errors(document, f"#/components/messages/{message}/payload", body)

    assert found
    assert all(e.startswith(f"{path}:") for e in found), found


def properties_of(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The AMQP basic properties of a delivered message, as the contract names them."""
    found = {
        "content_type": message.content_type,
        "delivery_mode": int(message.delivery_mode) if message.delivery_mode else None,
        "message_id": message.message_id,
        "type": message.type,
        "timestamp": int(message.timestamp.timestamp()) if message.timestamp else None,
        "app_id": message.app_id,
        "correlation_id": message.correlation_id,
        "reply_to": message.reply_to,
        "expiration": None,
    }
    if message.expiration is not None:  # aio-pika gives seconds; AMQP carries milliseconds
        found["expiration"] = str(round(float(message.expiration) * 1000))
    return {k: v for k, v in found.items() if v is not None}


async def test_published_messages_match_the_contract(
    start_relay: StartRelay, broker: Broker, names: Names, document: dict[str, Any]
) -> None:
    """Events posted to a real relay arrive on a real queue with the routing key, properties,
    headers and payload the document gives for their message: order.created, customer.updated,
    delivery.error and unrecognized; and an event no queue was bound for reaches the unrouted
    queue with the headers the contract documents for it."""
    relay = await start_relay()
    tap = await broker.tap(names.exchange, "#")
    posts = [
        ("/retm/events", fixture_bytes("order.created.json"), "order.created"),
        ("/retm/events", fixture_bytes("customer.updated.json"), "customer.updated"),
        ("/retm/errors", fixture_bytes("error.webhook.json"), "delivery.error"),
        ("/retm/events", b'{"event": "Menu Changed!", "menu_id": 7}', "unrecognized"),
    ]
    for path, body, _ in posts:
        assert (await relay.post(path, body)).status == 200
    received = await tap.take(len(posts))

    components = document["components"]
    for (_, body, key), message in zip(posts, received, strict=True):
        spec = components["messages"][key]
        pointer = f"#/components/messages/{key}"
        properties = properties_of(message)
        headers = dict(message.headers or {})
        assert message.routing_key == key
        assert message.body == body
        assert message.content_type == spec["contentType"]
        assert message.type == spec["bindings"]["amqp"]["messageType"]
        assert properties["delivery_mode"] == 2  # operationBindings.relayPublish.deliveryMode
        assert errors(document, f"{pointer}/x-amqp-properties", properties) == []
        assert errors(document, f"{pointer}/headers", headers) == []
        assert errors(document, f"{pointer}/payload", orjson.loads(body)) == []
        assert headers["x-retm-event"] == key
    order, customer, error, unknown = received
    assert order.message_id == f"{PRINCIPAL}:order.created:e10270cd-1273-419e-8545-89ce060e6539"
    assert dict(order.headers or {}).keys() == {
        "x-retm-event", "x-relay-received-at", "x-retm-business", "x-retm-branch",
        "x-retm-reference",
    }  # fmt: skip
    assert (customer.headers or {})["x-retm-business"] == "nakheelember"
    assert re.fullmatch(
        rf"{re.escape(PRINCIPAL)}:delivery\.error:arrival-[0-9a-f]{{32}}", error.message_id or ""
    )
    assert (unknown.headers or {})["x-retm-event-raw"] == "Menu Changed!"

    await tap.queue.unbind(names.exchange, "#")
    unrouted = await broker.tap_queue(names.unrouted)
    assert (await relay.event(fixture_bytes("customer.deleted.json"))).status == 200
    diverted = await unrouted.get()
    headers = dict(diverted.headers or {})
    assert errors(document, "#/components/messages/customer.deleted/headers", headers) == []
    assert (headers["x-relay-routing-key"], headers["x-relay-exchange"]) == (
        "customer.deleted",
        names.exchange,
    )
    assert errors(document, "#/components/schemas/EventProperties", properties_of(diverted)) == []


async def test_loyalty_requests_and_replies_match_the_contract(
    start_relay: StartRelay, broker: Broker, names: Names, document: dict[str, Any]
) -> None:
    """With the example loyalty responder running, the RPC requests the relay publishes for
    Check Reward and Redeem Reward carry the documented routing key, properties (transient,
    reply_to, correlation_id, expiration) and headers; the answers RETM gets validate against
    the reply messages' payloads."""
    relay = await start_relay()
    responder = example.Responder(AMQP_URL, names.exchange, names("loyalty"))
    await responder.start()
    try:
        tap = await broker.tap(names.exchange, "loyalty.#")
        answers = {}
        for path, fixture in (
            ("/retm/loyalty/check-reward", "loyalty.check_reward.json"),
            ("/retm/loyalty/redeem-reward", "loyalty.redeem_reward.json"),
        ):
            answer = await relay.post(path, fixture_bytes(fixture))
            assert answer.status == 200, answer
            assert "x-relay-fallback" not in answer.headers
            answers[fixture.removesuffix(".json")] = answer.body
        requests = await tap.take(2)
    finally:
        await responder.close()

    for message, fixture in zip(requests, answers, strict=True):
        pointer = f"#/components/messages/{fixture}"
        properties = properties_of(message)
        assert message.routing_key == fixture
        assert message.body == fixture_bytes(f"{fixture}.json")
        assert (
            message.type
            == document["components"]["messages"][fixture]["bindings"]["amqp"]["messageType"]
        )
        assert errors(document, f"{pointer}/x-amqp-properties", properties) == []
        assert errors(document, f"{pointer}/headers", dict(message.headers or {})) == []
        assert errors(document, f"{pointer}/payload", orjson.loads(message.body)) == []
        assert errors(document, f"{pointer}.reply/payload", answers[fixture]) == []
    check, redeem = requests
    assert check.message_id == check.correlation_id  # a query: a fresh id
    digest = hashlib.sha256(fixture_bytes("loyalty.redeem_reward.json")).hexdigest()
    assert redeem.message_id == f"{PRINCIPAL}:loyalty.redeem_reward:sha256-{digest}"


async def test_app_installed_matches_the_contract(
    start_relay: StartRelay, broker: Broker, names: Names, document: dict[str, Any]
) -> None:
    """RETM's install callback, published as app.installed by a real relay, carries the
    documented routing key, properties, headers (the merchant as x-retm-business) and payload;
    the token the relay issued is not in it."""
    path = "/retm/install/contract-test-0123456789"
    relay = await start_relay(
        RELAY_INSTALL_ENABLED="true",
        RELAY_INSTALL_PATH=path,
        RELAY_INSTALL_REQUIRE_DATA="state=b7f1c2",
    )
    tap = await broker.tap(names.exchange, "app.#")
    body = fixture_bytes("install.success_callback.json")

    answer = await relay.post(path, body, token=None)
    message = await tap.get()

    pointer = "#/components/messages/app.installed"
    headers = dict(message.headers or {})
    assert answer.status == 200, answer
    assert (message.routing_key, message.type, message.body) == ("app.installed",) * 2 + (body,)
    assert errors(document, f"{pointer}/x-amqp-properties", properties_of(message)) == []
    assert errors(document, f"{pointer}/headers", headers) == []
    assert errors(document, f"{pointer}/payload", orjson.loads(message.body)) == []
    assert headers["x-retm-business"] == "nakheelember"
    assert answer.body["token"].encode() not in message.body


BOUND_TOKEN = "bound-token-0123456789abcdef"  # a second test token, bound to a business


async def test_quarantined_bodies_match_the_contract(
    start_relay: StartRelay, broker: Broker, names: Names, document: dict[str, Any]
) -> None:
    """Refused bodies posted to a real relay (one per reason, from an unbound and a bound
    token, on both webhook routes) reach the real quarantine queue with the reason as routing
    key, the body byte for byte, and exactly the properties and headers the document gives
    the ``rejected`` message."""
    relay = await start_relay(RELAY_AUTH_TOKENS=f"{TOKEN},nakheelember:{BOUND_TOKEN}")
    quarantine = await broker.tap_queue(names.rejected)
    # 513 levels that only the tolerant parser reads (a lone surrogate): refused as too_deep
    deep = b'{"event":"order.created","deep":' + b"[" * 512 + b'"\\ud800"' + b"]" * 512 + b"}"
    posts = [  # (path, body, token, declared content type, principal, reason)
        ("/retm/events", b'{"event":"order.created",', TOKEN, "text/plain", PRINCIPAL,
         "invalid_json"),
        ("/retm/events", b'["order.created"]', BOUND_TOKEN, None, "nakheelember", "not_object"),
        ("/retm/errors", deep, TOKEN, "application/json", PRINCIPAL, "too_deep"),
    ]  # fmt: skip
    answers = []
    before = time.time()
    for path, body, token, content_type, _, _ in posts:
        answers.append(await relay.post(path, body, token=token, content_type=content_type))
    after = time.time()
    kept = await quarantine.take(len(posts))

    spec = document["components"]["messages"]["rejected"]
    pointer = "#/components/messages/rejected"
    for (path, body, token, content_type, principal, reason), answer, message in zip(
        posts, answers, kept, strict=True
    ):
        properties = properties_of(message)
        headers = dict(message.headers or {})
        assert (answer.status, answer.body["error"]) == (400, reason)
        assert (message.exchange, message.routing_key) == (names.rejected, reason)
        assert message.body == body
        assert errors(document, f"{pointer}/x-amqp-properties", properties) == []
        assert errors(document, f"{pointer}/headers", headers) == []
        digest = hashlib.sha256(body).hexdigest()
        assert properties == {
            "content_type": spec["contentType"],
            "delivery_mode": 2,
            "message_id": f"{principal}:rejected:sha256-{digest}",
            "type": spec["bindings"]["amqp"]["messageType"],
            "timestamp": properties["timestamp"],
            "app_id": "retm-relay",
        }
        received_at = headers.pop("x-relay-received-at")
        assert iso_utc_millis(before) <= received_at <= iso_utc_millis(after)
        assert received_at.startswith(iso_utc_millis(properties["timestamp"])[:19])
        expected = {
            "x-relay-rejected-reason": reason,
            "x-relay-rejected-detail": answer.body["detail"],
            "x-relay-route": path.rsplit("/", 1)[1],
        }
        if content_type is not None:
            expected["x-relay-content-type"] = content_type
        if token == BOUND_TOKEN:
            expected["x-retm-business"] = "nakheelember"
        assert headers == expected
    assert (spec["contentType"], spec["bindings"]["amqp"]["messageType"]) == (
        "application/octet-stream",
        "rejected",
    )


async def test_bodies_refused_for_their_media_type_or_coding_are_kept_as_received(
    start_relay: StartRelay, broker: Broker, names: Names, document: dict[str, Any]
) -> None:
    """A whole body refused with a 415 (its media type, its content coding) or a 400
    ``bad_encoding`` from a sender with a valid token is kept on the quarantine exactly as it
    arrived (still encoded, the declared coding in ``x-relay-content-encoding``), valid
    against the document; a body over ``http.max_body_bytes`` is not kept (413, or the 415
    that comes first)."""
    relay = await start_relay(RELAY_HTTP_MAX_BODY_BYTES="4096")
    quarantine = await broker.tap_queue(names.rejected)
    event = b'{"event":"order.created","reference":"kept-as-received"}'
    latin1 = '{"event":"menu.updated","name":"Caf\u00e9"}'.encode("latin-1")
    posts = [  # (body, content type, content encoding, status, reason)
        (latin1, "application/json; charset=ISO-8859-1", None, 415, "unsupported_media_type"),
        (event, "application/json", "br", 415, "unsupported_encoding"),
        (b"\x1f\x8b\x08 not gzip at all", "application/json", "gzip", 400, "bad_encoding"),
    ]
    answers = []
    for body, content_type, encoding, _, _ in posts:
        headers = {"Content-Encoding": encoding} if encoding else None
        answers.append(
            await relay.post("/retm/events", body, content_type=content_type, headers=headers)
        )
    too_large = await relay.post("/retm/events", b"x" * 5000)
    too_large_html = await relay.post("/retm/events", b"x" * 5000, content_type="text/html")
    kept = await quarantine.take(len(posts))

    pointer = "#/components/messages/rejected"
    for (body, content_type, encoding, status, reason), answer, message in zip(
        posts, answers, kept, strict=True
    ):
        headers = dict(message.headers or {})
        assert (answer.status, answer.body["error"]) == (status, reason)
        assert (message.routing_key, message.body) == (reason, body)
        assert errors(document, f"{pointer}/x-amqp-properties", properties_of(message)) == []
        assert errors(document, f"{pointer}/headers", headers) == []
        assert message.message_id == (
            f"{PRINCIPAL}:rejected:sha256-{hashlib.sha256(body).hexdigest()}"
        )
        assert headers["x-relay-rejected-reason"] == reason
        assert headers["x-relay-content-type"] == content_type
        assert headers.get("x-relay-content-encoding") == encoding
    assert (too_large.status, too_large.body["error"]) == (413, "payload_too_large")
    assert (too_large_html.status, too_large_html.body["error"]) == (415, "unsupported_media_type")
    assert quarantine.empty()


def replay_environ(names: Names, config: Path) -> dict[str, str]:
    """``retm-relay replay``'s environment: the broker and the test's own archive."""
    config.write_text("")
    return names_environ(config, names)


async def test_archive_and_replayed_copies_match_the_contract(
    start_relay: StartRelay,
    broker: Broker,
    names: Names,
    document: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A refused body, a routed event and an unroutable one; read back from the real archive
    stream as the document says (prefetch, manual acks, ``x-stream-offset``), the archive holds
    the two events and not the refused body (it was answered 400, the quarantine keeps it):
    each is the message its consumer got, with the same routing key, properties and headers
    plus an integer ``x-stream-offset``, valid against its message's schemas; ``retm-relay
    replay --to-queue`` republishes each unchanged plus ``x-relay-replayed-at``, also valid."""
    relay = await start_relay()
    orders = await broker.tap(names.exchange, "order.#")
    unrouted = await broker.tap_queue(names.unrouted)
    quarantine = await broker.tap_queue(names.rejected)
    refused = b"not json " + uuid.uuid4().hex.encode()
    assert (await relay.event(refused)).status == 400
    kept = await quarantine.get()
    posted = [
        ("order.created", fixture_bytes("order.created.json"), 200),
        ("customer.deleted", fixture_bytes("customer.deleted.json"), 200),
    ]
    for _, body, status in posted:
        assert (await relay.event(body)).status == status
    consumed = [await orders.get(), await unrouted.get()]
    archived = await read_archive(broker, names.archive, posted[-1][1])

    assert kept.body == refused

    assert [m.body for m in archived] == [body for _, body, _ in posted]
    offsets = []
    for (key, _, _), original, copy in zip(posted, consumed, archived, strict=True):
        pointer = f"#/components/messages/{key}"
        headers = dict(copy.headers or {})
        offsets.append(headers.pop("x-stream-offset"))
        original_headers = dict(original.headers or {})
        for extra in ("x-relay-routing-key", "x-relay-exchange"):  # the unrouted copy's own
            original_headers.pop(extra, None)
        assert copy.exchange == names.archive
        assert copy.routing_key == (original.headers or {}).get(
            "x-relay-routing-key", original.routing_key
        )
        assert properties_of(copy) == properties_of(original)
        assert headers == original_headers
        assert errors(document, f"{pointer}/x-amqp-properties", properties_of(copy)) == []
        assert errors(document, f"{pointer}/headers", dict(copy.headers or {})) == []
        assert errors(document, f"{pointer}/payload", orjson.loads(copy.body)) == []
    assert all(isinstance(offset, int) for offset in offsets)
    assert offsets == sorted(offsets)

    assert broker.channel is not None
    target = names("replayed")
    await broker.channel.declare_queue(target, durable=True)
    broker.forget_later(queues=(target,))
    env = replay_environ(names, tmp_path / "empty.toml")
    result = await run_cli("replay", "--since", "10m", "--to-queue", target, env=env)
    assert (result.code, result.stdout) == (
        0,
        f"read 2, matched 2, published 2 to queue {target}\n",
    )
    queue = await broker.channel.get_queue(target, ensure=True)
    replayed = [await queue.get(timeout=5) for _ in posted]
    for (key, _, _), copy, message in zip(posted, archived, replayed, strict=True):
        pointer = f"#/components/messages/{key}"
        headers = dict(message.headers or {})
        replayed_at = headers.pop("x-relay-replayed-at")
        archived_headers = dict(copy.headers or {})
        del archived_headers["x-stream-offset"]
        assert (message.exchange, message.routing_key) == ("", target)
        assert message.body == copy.body
        assert properties_of(message) == properties_of(copy)
        assert headers == archived_headers
        assert errors(document, f"{pointer}/headers", dict(message.headers or {})) == []
        assert replayed_at == dict(replayed[0].headers or {})["x-relay-replayed-at"]
        await message.ack()
