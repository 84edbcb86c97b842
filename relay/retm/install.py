"""RETM's app-install callback: a per-merchant webhook token, answered well inside 1 second.

When a merchant approves the app, RETM POSTs ``{code, business_id, data}`` to the "success
endpoint" and wants HTTP 200 within 1 second; the answer's ``token`` becomes the Bearer token of
every webhook RETM sends for that merchant, and its ``url`` the app's settings page
(docs/retm.md, "Authentication", "Install callback"; fixture ``install.success_callback.json``).

Per request, in order: media type (415), body (413/400), fields (400 ``invalid_install``), the
``install.require_data`` check (403 ``forbidden``, and nothing changes); then the
``app.installed`` event goes into the spool (fsynced, group-committed with the webhooks'), the
new token into the registry (rotating the merchant's older tokens, which stay valid for
``install.token_grace``), and the answer goes out. The spool's forwarder publishes the event
right after, so a slow or absent broker cannot make the answer slow, and a crash or a broker
outage cannot lose the ``code`` the back office needs. The event's body is the callback's body
as received: ``code``, ``business_id``, ``data``, never the token.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from relay.amqp.publish import Envelope
from relay.dedup.memory import dedup_key
from relay.errors import BrokerUnavailable, StoreUnavailable
from relay.http.auth import token_digest
from relay.ingest import (
    Rejection,
    check_media_type,
    contract_headers,
    error_response,
    json_response,
    parse_object,
    read_body,
)
from relay.metrics import Metrics
from relay.retm.tokens import BUSINESS_RE, TokenRegistry
from relay.routing import APP_INSTALLED, Router
from relay.settings import InstallSettings
from relay.spool.store import Spool

log = structlog.get_logger("relay.install")

MAX_CODE_CHARS = 1024


class InstallFlow:
    """The install route's handler.

    settings: ``install.*``. registry: issues the tokens. spool: where ``app.installed`` is made
    durable before the answer (its forwarder publishes it). router: the ``app.installed`` route.
    key_fields: ``dedup.key_fields`` (for the event's message_id). max_body_bytes:
    ``http.max_body_bytes``. clock: wall-clock seconds.
    """

    def __init__(
        self,
        *,
        settings: InstallSettings,
        registry: TokenRegistry,
        spool: Spool,
        router: Router,
        metrics: Metrics,
        key_fields: tuple[str, ...],
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.spool = spool
        self.router = router
        self.metrics = metrics
        self.key_fields = key_fields
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    # -- the route -------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST <install.path>``: answer 200 ``{"token", "url"}``, or 400/403/413/415/503."""
        started = time.perf_counter()
        try:
            check_media_type(request)
            raw = await read_body(request, self.max_body_bytes)
            body = parse_object(raw)
            business = check_install(body, self.settings.require_data)
        except Rejection as rej:
            outcome = "forbidden" if rej.status == 403 else "rejected"
            self.metrics.install(outcome)
            self.metrics.rejected(rej.code)
            log.warning(
                "install.rejected",
                status=rej.status,
                reason=rej.code,
                detail=rej.detail,
                remote=request.remote,
            )
            return error_response(rej.status, rej.code, rej.detail, rej.headers)
        received_at = self.clock()
        return await self._install(business, raw, body, received_at, started)

    async def _install(
        self, business: str, raw: bytes, body: dict[str, Any], received_at: float, started: float
    ) -> web.Response:
        route = self.router.route(APP_INSTALLED, business, None)
        envelope = Envelope(
            raw,
            route,
            dedup_key(business, APP_INSTALLED, body, raw, self.key_fields),
            APP_INSTALLED,
            received_at,
            contract_headers(APP_INSTALLED, business, body, received_at),
        )
        try:
            seq = await self.spool.put(envelope, "install")
        except BrokerUnavailable as exc:
            return self._unavailable(exc.reason, str(exc))
        try:
            token = await self.registry.issue(
                business, grace=self.settings.token_grace, source="install"
            )
        except StoreUnavailable as exc:
            # Nothing changes: take the event back (should the forwarder have been quicker,
            # RETM's retry publishes it again with the same message_id).
            with contextlib.suppress(BrokerUnavailable, StoreUnavailable):
                await self.spool.delete([seq])
            return self._unavailable("token_store", str(exc))
        log.info(
            "install.spooled",
            business=business,
            key=envelope.message_id,
            routing_key=route.routing_key,
        )
        elapsed = time.perf_counter() - started
        self.metrics.install("accepted")
        log.info(
            "install.accepted",
            business=business,
            fingerprint=token_digest(token).hex()[:8],
            latency_ms=round(elapsed * 1000, 2),
        )
        answer = {"token": token}
        if self.settings.settings_url:
            answer["url"] = self.settings.settings_url
        return json_response(answer)

    def _unavailable(self, reason: str, detail: str) -> web.Response:
        self.metrics.install("unavailable")
        self.metrics.unavailable(f"install_{reason}")
        log.warning("install.unavailable", reason=reason, detail=detail)
        return error_response(
            503, "unavailable", f"the install could not be stored ({reason}); retry later"
        )


def check_install(body: Mapping[str, Any], required: Mapping[str, str]) -> str:
    """The ``business_id`` of an install callback body (docs/retm.md, "Install callback").

    Raises Rejection 400 ``invalid_install`` unless ``code`` is a non-empty string,
    ``business_id`` 1-64 of ``[A-Za-z0-9_.-]`` and ``data`` an object (or absent); 403
    ``forbidden`` unless ``data`` holds every ``required`` key with its value.
    """
    code, business, data = body.get("code"), body.get("business_id"), body.get("data")
    if data is None:
        data = {}
    if not (
        isinstance(code, str)
        and 0 < len(code.strip()) <= MAX_CODE_CHARS
        and isinstance(business, str)
        and BUSINESS_RE.fullmatch(business) is not None
        and isinstance(data, dict)
    ):
        raise Rejection(
            400,
            "invalid_install",
            "the body must hold a non-empty string code, a business_id of 1-64 letters, "
            "digits, '_', '.', '-', and an object data",
        )
    if not _data_matches(data, required):
        raise Rejection(403, "forbidden", "the install callback failed a check")
    return business


def _data_matches(data: Mapping[str, Any], required: Mapping[str, str]) -> bool:
    """Whether ``data`` holds every required key with its value (compared in constant time;
    an integer value is compared as its decimal text, as a query parameter would be)."""
    ok = True
    for name, expected in required.items():
        value = data.get(name)
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str):
            ok = False
            continue
        ok &= hmac.compare_digest(text.encode(), expected.encode())
    return ok
