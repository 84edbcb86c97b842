"""Ingest: RETM's webhook POSTs become envelopes that are made durable before the answer.

Per request, in order: Bearer token (401), media type (415), content coding (415), body size
before and after decompression (413), JSON object (400), routing, dedup claim, confirmed publish,
dedup commit, answer. Every rejection is a 4xx with ``{"error": CODE, "detail": ...}``, one log
line and a metric; nothing a client sends produces a 500. The body published is the body
received (after HTTP decompression, without a leading UTF-8 BOM), never re-serialised.

Field names used here come from RETM's notification hooks (docs/retm.md, "Invoice webhooks",
"Customer webhook", "Identity fields"): ``event``, ``reference``, ``business_refrence`` (sic;
``business_reference`` also accepted) and ``branch_id``; and from the error webhook (docs/retm.md,
"Error webhook"): ``code``, ``endpoint``, ``message``.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, http_exceptions, web

from relay import json_body
from relay.amqp.publish import REJECTED_REASON_HEADER, Envelope
from relay.dedup.memory import DedupStore, Verdict, body_reference, dedup_key, key_event
from relay.errors import BrokerUnavailable, StoreUnavailable
from relay.http.auth import Principal, TokenAuthenticator
from relay.logs import iso_utc_millis
from relay.metrics import Metrics
from relay.routing import DELIVERY_ERROR, UNRECOGNIZED, Route, Router, event_name

log = structlog.get_logger("relay.ingest")

BOM = b"\xef\xbb\xbf"
RETRY_AFTER_SECONDS = "5"
_DECODERS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits per content coding
_UTF8_NAMES = frozenset({"utf-8", "utf8"})
MAX_HEADER_VALUE = 255
_RUN_ID = secrets.token_hex(3)  # request ids are <run>-<sequence>: unique, and cheap to make
_REQUEST_SEQ = itertools.count(1)
_LOG_EVENTS = {
    "accepted": "webhook.accepted",
    "spooled": "webhook.spooled",
    "duplicate": "webhook.duplicate",
}

Deliver = Callable[[Envelope], Awaitable[str]]
"""Makes an envelope durable; returns the outcome (``accepted`` or ``spooled``) or raises
BrokerUnavailable. The publisher's confirmed publish, or the spool in front of it."""


class Rejection(Exception):
    """A 4xx answer: ``status``, machine-readable ``code`` and a short ``detail`` (never
    request bytes). ``refused`` is set when an authenticated body was refused as not JSON or
    not an object: what the quarantine keeps."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.refused: Refused | None = None
        #: the body as received, when it arrived whole before the refusal (``bad_encoding``)
        self.received: bytes | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """An authenticated body refused although it arrived whole: a 400 (``invalid_json``,
    ``not_object``, ``too_deep``: the bytes decompressed, without a BOM; ``bad_encoding``:
    the bytes as received) or a 415 (``unsupported_media_type``, ``unsupported_encoding``:
    the bytes as received). Who sent it, the bytes, the declared ``Content-Type`` and
    ``Content-Encoding`` when the bytes are still encoded (None when absent) and the receive
    time (Unix seconds)."""

    principal: Principal
    raw: bytes
    content_type: str | None
    received_at: float
    content_encoding: str | None = None


#: refusals of a whole body whose bytes are kept as received (still encoded), not decoded
KEPT_AS_RECEIVED = frozenset({"unsupported_media_type", "unsupported_encoding", "bad_encoding"})


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON error answer of the HTTP contract."""
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "detail": detail}),
        content_type="application/json",
        headers=headers,
    )


def json_response(payload: Mapping[str, Any], status: int = 200) -> web.Response:
    """A JSON answer serialised with orjson."""
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


@dataclass(frozen=True, slots=True)
class Webhook:
    """A validated webhook request: who sent it and what."""

    principal: Principal
    raw: bytes
    body: dict[str, Any]
    received_at: float


_WWW_AUTH = {
    "missing": 'Bearer realm="retm-relay"',
    "malformed": 'Bearer realm="retm-relay", error="invalid_request"',
    "invalid": 'Bearer realm="retm-relay", error="invalid_token"',
}


def check_token(authenticator: TokenAuthenticator, request: web.BaseRequest) -> Principal:
    """The request's principal; raises Rejection 401 with ``WWW-Authenticate: Bearer``, or
    400 ``duplicate_authorization`` when the request has more than one Authorization header
    (which one a proxy on the way honoured cannot be known)."""
    values = request.headers.getall(hdrs.AUTHORIZATION, ())
    if len(values) > 1:
        raise Rejection(
            400, "duplicate_authorization", "a request must have one Authorization header"
        )
    result = authenticator.authenticate(values[0] if values else None)
    if isinstance(result, Principal):
        return result
    detail = {
        "missing": "an Authorization: Bearer token is required",
        "malformed": "the Authorization header must be 'Bearer <token>'",
        "invalid": "the Bearer token is not valid",
    }[result]
    raise Rejection(401, "unauthorized", detail, {hdrs.WWW_AUTHENTICATE: _WWW_AUTH[result]})


_media_type_cache: dict[str, bool] = {}
#: charsets accepted with a JSON body: UTF-8, and ASCII (a subset; text/plain's default)
_JSON_CHARSETS = _UTF8_NAMES | {"us-ascii", "ascii"}


def _is_json_media(content_type: str, *, lenient: bool) -> bool:
    key = f"{lenient:d}{content_type}"
    verdict = _media_type_cache.get(key)
    if verdict is None:
        media, *params = content_type.split(";")
        media = media.strip().lower()
        if lenient:
            verdict = media in ("", "application/json", "text/plain") or (
                media.startswith("application/") and media.endswith("+json")
            )
        else:
            verdict = media == "application/json"
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                verdict = verdict and value.strip().strip('"').lower() in _JSON_CHARSETS
        if len(_media_type_cache) < 256:
            _media_type_cache[key] = verdict
    return verdict


def check_media_type(request: web.BaseRequest, *, lenient: bool = False) -> None:
    """``application/json`` in any letter case, with no charset or a UTF-8 one; else 415.

    lenient (an authenticated webhook sender, whose body is judged as JSON anyway): also no
    ``Content-Type`` at all, ``text/plain`` and ``application/*+json``.
    """
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    if content_type is None:
        if lenient:
            return
    elif _is_json_media(content_type, lenient=lenient):
        return
    detail = (
        "Content-Type must be application/json, application/*+json or text/plain (UTF-8)"
        if lenient
        else "Content-Type must be application/json (UTF-8)"
    )
    raise Rejection(415, "unsupported_media_type", detail)


def content_codings(request: web.BaseRequest) -> list[str]:
    """The request's content codings in the order they were applied: every
    ``Content-Encoding`` header and every comma-separated entry, lower-cased, without
    ``identity``. Raises Rejection 415 naming none of the request's bytes when one is not
    gzip, x-gzip or deflate."""
    codings = [
        coding.strip().lower()
        for header in request.headers.getall(hdrs.CONTENT_ENCODING, ())
        for coding in header.split(",")
    ]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if any(coding not in _DECODERS for coding in codings):
        raise Rejection(
            415, "unsupported_encoding", "Content-Encoding must be gzip, deflate or identity"
        )
    return codings


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The body, decompressed per ``Content-Encoding`` (gzip, deflate; several codings,
    repeated headers included, are undone in reverse order), at most ``limit`` bytes before
    and after each decompression, without a leading UTF-8 BOM.

    Raises Rejection: 413 too large, 415 unsupported coding, 400 corrupt or truncated data.
    """
    codings = content_codings(request)
    too_large = Rejection(413, "payload_too_large", f"the body must be at most {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except (OSError, http_exceptions.HttpProcessingError, aiohttp.ClientError):
        raise Rejection(400, "incomplete_body", "the body could not be read in full") from None
    received = raw
    for coding in reversed(codings):
        try:
            raw = _decompress(raw, _DECODERS[coding], limit, too_large)
        except Rejection as rej:
            if rej.code == "bad_encoding":
                rej.received = received
            raise
    if raw.startswith(BOM):
        raw = raw[3:]
    return raw


async def read_received(request: web.BaseRequest, limit: int) -> bytes | None:
    """The body exactly as received (no content coding undone), for the quarantine of a body
    refused before it was read; None when it is over ``limit`` bytes or did not arrive whole
    (then only the refusal is answered)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    try:
        return await request.read()
    except (
        web.HTTPRequestEntityTooLarge,
        OSError,
        http_exceptions.HttpProcessingError,
        aiohttp.ClientError,
    ):
        return None


def _decompress(data: bytes, wbits: int, limit: int, too_large: Rejection) -> bytes:
    corrupt = Rejection(400, "bad_encoding", "the body is not valid for its Content-Encoding")
    out = bytearray()
    remaining = data
    try:
        while True:  # gzip allows several members back to back
            decoder = zlib.decompressobj(wbits)
            out += decoder.decompress(remaining, limit + 1 - len(out))
            if len(out) > limit or decoder.unconsumed_tail:
                raise too_large
            if not decoder.eof:
                raise corrupt
            remaining = decoder.unused_data
            if not remaining:
                return bytes(out)
            if wbits != 31:
                raise corrupt
    except zlib.error:
        if wbits == 15 and not out:  # "deflate" sent as a raw stream, as some clients do
            return _decompress(data, -15, limit, too_large)
        raise corrupt from None


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (RFC 8259, see ``relay.json_body``); raises Rejection 400
    ``invalid_json``, ``not_object`` or ``too_deep``."""
    try:
        return json_body.parse_object(raw)
    except json_body.BodyRefused as exc:
        raise Rejection(400, exc.code, exc.detail) from None


def _text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value[:MAX_HEADER_VALUE]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def contract_headers(
    event: str, business: str | None, body: Mapping[str, Any], received_at: float
) -> dict[str, Any]:
    """The ``x-retm-*`` and ``x-relay-received-at`` headers of the message contract."""
    headers: dict[str, Any] = {
        "x-retm-event": event,
        "x-relay-received-at": iso_utc_millis(received_at),
    }
    if business:
        headers["x-retm-business"] = business
    branch = _text(body.get("branch_id"))
    if branch:
        headers["x-retm-branch"] = branch
    reference = _text(body.get("reference"))
    if reference:
        headers["x-retm-reference"] = reference
    return headers


def body_business(body: Mapping[str, Any]) -> str | None:
    """The business named in a RETM body: ``business_refrence`` (sic, every RETM endpoint page)
    or ``business_reference`` (the Promotional Coupon guide), when non-empty."""
    return _text(body.get("business_refrence")) or _text(body.get("business_reference"))


MISMATCH_HEADER = "x-relay-business-mismatch"


def merchant(principal: Principal, body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(business, mismatch) of a webhook: the token's merchant when the token names one (a
    registry token, or a bound ``auth.tokens`` entry), else the body's business; ``mismatch``
    is the body's business when it names another merchant than the token (letter case aside).
    RETM often sends ``business_refrence`` empty, so the token is the reliable source."""
    named = body_business(body)
    if principal.business is None:
        return named, None
    if named is not None and named.lower() != principal.business.lower():
        return principal.business, named
    return principal.business, None


class Ingest:
    """The webhook handlers (``events``, ``errors``) and their dependencies.

    deliver: makes an envelope durable (see ``Deliver``). dedup: the dedup store.
    max_body_bytes: ``http.max_body_bytes``. key_fields: ``dedup.key_fields``.
    hash_ttl: seconds a key made from a body hash is remembered (``dedup.hash_ttl``).
    rejected_exchange: the quarantine (``amqp.rejected_exchange``).
    """

    def __init__(
        self,
        *,
        authenticator: TokenAuthenticator,
        router: Router,
        dedup: DedupStore,
        deliver: Deliver,
        metrics: Metrics,
        max_body_bytes: int,
        key_fields: tuple[str, ...],
        hash_ttl: float = 3600.0,
        rejected_exchange: str = "retm.rejected",
    ) -> None:
        self.authenticator = authenticator
        self.router = router
        self.dedup = dedup
        self.deliver = deliver
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.key_fields = key_fields
        self.hash_ttl = hash_ttl
        self.rejected_exchange = rejected_exchange
        self.last_retm_error: dict[str, Any] | None = None
        #: quarantine counters since the start: kept, duplicates (a retry of a kept body)
        self.quarantined = 0
        self.quarantine_duplicates = 0
        self.last_quarantined: dict[str, Any] | None = None

    async def read_webhook(self, request: web.BaseRequest) -> Webhook:
        """Authenticate and read a webhook request; raises Rejection, with ``refused`` set
        when the sender is authenticated and its whole body is refused: not a JSON object
        (decoded bytes), or its media type or content coding (the bytes as received, when at
        most ``max_body_bytes``; see ``Refused``)."""
        received_at = time.time()
        principal = check_token(self.authenticator, request)
        content_type = request.headers.get(hdrs.CONTENT_TYPE)
        try:
            check_media_type(request, lenient=True)
            raw = await read_body(request, self.max_body_bytes)
        except Rejection as rej:
            if rej.code in KEPT_AS_RECEIVED:
                received = rej.received
                if received is None:  # refused before the body was read: read it as it is
                    received = await read_received(request, self.max_body_bytes)
                if received is not None:
                    encoding = ", ".join(request.headers.getall(hdrs.CONTENT_ENCODING, ()))
                    rej.refused = Refused(
                        principal, received, content_type, received_at, encoding or None
                    )
            raise
        try:
            body = parse_object(raw)
        except Rejection as rej:
            rej.refused = Refused(principal, raw, content_type, received_at)
            raise
        return Webhook(principal, raw, body, received_at)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """``POST /retm/events``: a notification hook (``order.*``, ``customer.*``, any event)."""
        return await self._handle(request, "events", None)

    async def errors(self, request: web.Request) -> web.StreamResponse:
        """``POST /retm/errors``: RETM's error webhook, published as ``delivery.error``."""
        return await self._handle(request, "errors", DELIVERY_ERROR)

    async def _handle(
        self, request: web.Request, route_name: str, fixed_event: str | None
    ) -> web.StreamResponse:
        started = time.perf_counter()
        metrics = self.metrics
        metrics.in_flight(1)
        structlog.contextvars.bind_contextvars(request_id=f"{_RUN_ID}-{next(_REQUEST_SEQ):x}")
        try:
            try:
                hook = await self.read_webhook(request)
            except Rejection as rej:
                kept: dict[str, str] = {}
                if rej.refused is not None:
                    outcome = await self._quarantine(rej, rej.refused, route_name, started)
                    if isinstance(outcome, web.Response):
                        return outcome  # 503: the copy could not be made durable
                    kept = {"quarantine": outcome[0], "message_id": outcome[1]}
                metrics.rejected(rej.code)
                metrics.request(route_name, "rejected", time.perf_counter() - started)
                log.warning(
                    "webhook.rejected",
                    route=route_name,
                    status=rej.status,
                    reason=rej.code,
                    detail=rej.detail,
                    remote=request.remote,
                    **kept,
                )
                return error_response(rej.status, rej.code, rej.detail, rej.headers)
            if fixed_event is None:
                raw_event = hook.body.get("event")
                event = event_name(raw_event) or UNRECOGNIZED
            else:
                raw_event, event = None, fixed_event
            return await self._publish(hook, route_name, event, raw_event, started)
        finally:
            metrics.in_flight(-1)

    async def _publish(
        self,
        hook: Webhook,
        route_name: str,
        event: str,
        raw_event: object,
        started: float,
    ) -> web.StreamResponse:
        body, principal = hook.body, hook.principal
        business, mismatch = merchant(principal, body)
        route = self.router.route(event, business, body.get("branch_id"))
        if event == DELIVERY_ERROR:
            # RETM's error webhook has no id, and the same alert may rightly come again: each
            # arrival is its own event (never answered "duplicate"), with a message_id of its own
            key, ttl = f"{principal.id}:{event}:arrival-{uuid.uuid4().hex}", None
        else:
            key = dedup_key(
                principal.id, key_event(event, raw_event), body, hook.raw, self.key_fields
            )
            referenced = body_reference(body, self.key_fields) is not None
            ttl = None if referenced else self.hash_ttl
        headers = contract_headers(event, business, body, hook.received_at)
        if mismatch is not None:
            headers[MISMATCH_HEADER] = mismatch
            self.metrics.business_mismatch()
            log.warning("webhook.business_mismatch", business=business, body_business=mismatch)
        if event == UNRECOGNIZED and isinstance(raw_event, str):
            headers["x-retm-event-raw"] = raw_event[:MAX_HEADER_VALUE]
        answer = {"id": key, "routing_key": route.routing_key}
        log_fields = {
            "route": route_name,
            "retm_event": event,
            "key": key,
            "routing_key": route.routing_key,
        }
        envelope = Envelope(hook.raw, route, key, event, hook.received_at, headers)
        # RETM's error webhook is never deduplicated (its key is unique per arrival anyway)
        deduplicate = event != DELIVERY_ERROR
        outcome = await self._deliver_once(
            envelope, ttl, deduplicate, route_name, started, log_fields
        )
        if isinstance(outcome, web.Response):
            return outcome
        if outcome == "duplicate":
            self.metrics.duplicate()
            return self._answer(route_name, "duplicate", answer, started, log_fields)
        if event == DELIVERY_ERROR:
            self.metrics.retm_error()
            self._remember_retm_error(body, hook.received_at)
        return self._answer(route_name, outcome, answer, started, log_fields)

    async def _deliver_once(
        self,
        envelope: Envelope,
        ttl: float | None,
        deduplicate: bool,
        route_name: str,
        started: float,
        log_fields: dict[str, str],
    ) -> str | web.Response:
        """Make ``envelope`` durable once: claim its message_id in the dedup store (unless
        ``deduplicate`` is False), deliver, commit the key for ``ttl`` seconds (None: the
        store's TTL), or release it on failure. The outcome, ``accepted``, ``spooled`` or
        ``duplicate``; or the 503 to answer when it could not be made durable."""
        key = envelope.message_id
        if deduplicate:
            try:
                verdict = await self.dedup.claim(key)
            except StoreUnavailable as exc:
                return self._unavailable(route_name, "dedup_store", str(exc), started, log_fields)
            if verdict is Verdict.DUPLICATE:
                return "duplicate"
            if verdict is Verdict.FAILED:
                return self._unavailable(
                    route_name,
                    "first_attempt_failed",
                    "an earlier delivery of this event failed",
                    started,
                    log_fields,
                )
        committed = False
        try:
            outcome = await self.deliver(envelope)
            if deduplicate:
                await self.dedup.commit(key, ttl)
            committed = True
        except BrokerUnavailable as exc:
            return self._unavailable(route_name, exc.reason, str(exc), started, log_fields)
        finally:
            if deduplicate and not committed:
                await self.dedup.release(key)
        return outcome

    async def _quarantine(
        self, rej: Rejection, refused: Refused, route_name: str, started: float
    ) -> tuple[str, str] | web.Response:
        """Keep a refused body on the quarantine exchange, deduplicated by its SHA-256 for
        ``hash_ttl``. Once it is durable, or was kept already: (outcome, message_id), outcome
        ``accepted``, ``spooled`` or ``duplicate``, and the caller answers the 400. When it
        cannot be made durable: the 503 to answer instead (RETM retries; nothing is lost)."""
        received_at = refused.received_at
        principal = refused.principal
        key = f"{principal.id}:rejected:sha256-{hashlib.sha256(refused.raw).hexdigest()}"
        headers: dict[str, Any] = {
            REJECTED_REASON_HEADER: rej.code,
            "x-relay-rejected-detail": rej.detail[:MAX_HEADER_VALUE],
            "x-relay-route": route_name,
            "x-relay-received-at": iso_utc_millis(received_at),
        }
        if refused.content_type is not None:
            headers["x-relay-content-type"] = refused.content_type[:MAX_HEADER_VALUE]
        if refused.content_encoding is not None:
            headers["x-relay-content-encoding"] = refused.content_encoding[:MAX_HEADER_VALUE]
        if principal.business is not None:
            headers["x-retm-business"] = principal.business
        log_fields = {"route": route_name, "key": key, "rejected_reason": rej.code}
        envelope = Envelope(
            refused.raw,
            Route(self.rejected_exchange, rej.code),  # the reason as routing key
            key,
            "rejected",
            received_at,
            headers,
        )
        outcome = await self._deliver_once(
            envelope, self.hash_ttl, True, route_name, started, log_fields
        )
        if isinstance(outcome, web.Response):
            return outcome
        if outcome == "duplicate":
            self.quarantine_duplicates += 1
            self.metrics.quarantined(rej.code, "duplicate")
            return "duplicate", key
        self.quarantined += 1
        self.metrics.quarantined(rej.code, outcome)
        self.last_quarantined = {
            "reason": rej.code,
            "route": route_name,
            "bytes": len(refused.raw),
            "message_id": key,
            "received_at": received_at,
        }
        return outcome, key

    def quarantine_status(self) -> dict[str, Any]:
        """The ``/health`` section ``quarantine``: the exchange, how many refused bodies were
        kept and how many retries of one were recognised since the start, and the last one."""
        return {
            "exchange": self.rejected_exchange,
            "kept": self.quarantined,
            "duplicates": self.quarantine_duplicates,
            "last": self.last_quarantined,
        }

    def _answer(
        self,
        route_name: str,
        outcome: str,
        answer: dict[str, str],
        started: float,
        log_fields: dict[str, str],
    ) -> web.Response:
        elapsed = time.perf_counter() - started
        self.metrics.request(route_name, outcome, elapsed)
        log.info(
            _LOG_EVENTS[outcome],
            outcome=outcome,
            latency_ms=round(elapsed * 1000, 2),
            **log_fields,
        )
        status = "duplicate" if outcome == "duplicate" else "accepted"
        return json_response({"status": status, **answer})

    def _unavailable(
        self,
        route_name: str,
        reason: str,
        detail: str,
        started: float,
        log_fields: dict[str, str],
    ) -> web.Response:
        elapsed = time.perf_counter() - started
        self.metrics.unavailable(reason)
        self.metrics.request(route_name, "unavailable", elapsed)
        log.warning(
            "webhook.unavailable",
            reason=reason,
            detail=detail,
            latency_ms=round(elapsed * 1000, 2),
            **log_fields,
        )
        return error_response(
            503,
            "unavailable",
            f"the event could not be made durable ({reason}); retry later",
            {hdrs.RETRY_AFTER: RETRY_AFTER_SECONDS},
        )

    def _remember_retm_error(self, body: Mapping[str, Any], received_at: float) -> None:
        def short(value: object) -> object:
            return value[:500] if isinstance(value, str) else value

        self.last_retm_error = {
            "code": short(body.get("code")),
            "endpoint": short(body.get("endpoint")),
            "message": short(body.get("message")),
            "received_at": received_at,
        }
