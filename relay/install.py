"""RETM's app-install callback: a per-merchant webhook token, answered well inside 1 second.

When a merchant approves the app, RETM POSTs ``{code, business_id, data}`` to the "success
endpoint" and wants HTTP 200 within 1 second; the answer's ``token`` becomes the Bearer token of
every webhook RETM sends for that merchant, and its ``url`` the app's settings page
(retm/webhooks.md §2.2, §3.8; fixture ``install.success_callback.json``).

Per request, in order: media type (415), body (413/400), fields (400 ``invalid_install``), the
``install.require_data`` check (403 ``forbidden``, and nothing changes); then the
``app.installed`` event goes into a local outbox (SQLite, fsynced), the new token into the
registry (rotating the merchant's older tokens, which stay valid for ``install.token_grace``),
and the answer goes out. The outbox's forwarder publishes the event through the same ``deliver``
as webhooks, after the answer, so neither the broker nor the spool can make the answer slow,
and a crash or a broker outage cannot lose the ``code`` the back office needs. The event's body
is the callback's body as received: ``code``, ``business_id``, ``data``, never the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from relay.auth import token_digest
from relay.dedup import dedup_key
from relay.errors import BrokerUnavailable, StoreUnavailable
from relay.ingest import (
    Deliver,
    Rejection,
    check_media_type,
    contract_headers,
    error_response,
    json_response,
    parse_object,
    read_body,
)
from relay.metrics import Metrics
from relay.publish import Envelope
from relay.routing import APP_INSTALLED, Router
from relay.settings import InstallSettings
from relay.tokens import BUSINESS_RE, SqliteDb, TokenRegistry

log = structlog.get_logger("relay.install")

OUTBOX_FILE = "install-outbox.sqlite3"
MAX_CODE_CHARS = 1024
RETRY_MIN, RETRY_MAX = 0.5, 10.0


class Outbox:
    """``app.installed`` events made durable before the install answer, until published.

    Rows: id, body (bytes as received), business, received_at (Unix seconds), message_id.
    """

    def __init__(self, state_dir: Path) -> None:
        self.db = SqliteDb(
            state_dir / OUTBOX_FILE,
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " body BLOB NOT NULL, business TEXT NOT NULL, received_at REAL NOT NULL,"
            " message_id TEXT NOT NULL);",
        )
        self.pending = 0

    async def put(self, body: bytes, business: str, received_at: float, message_id: str) -> int:
        """Store one event durably; returns its id. Raises StoreUnavailable."""

        def insert(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "INSERT INTO outbox (body, business, received_at, message_id) VALUES (?,?,?,?)",
                (body, business, received_at, message_id),
            )
            return int(cur.lastrowid or 0)

        row_id = await self.db.run(insert)
        self.pending += 1
        return row_id

    async def oldest(self, limit: int = 50) -> list[tuple[int, bytes, str, float, str]]:
        """Up to ``limit`` waiting events, oldest first."""
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT id, body, business, received_at, message_id FROM outbox"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [(i, bytes(b), bus, at, mid) for i, b, bus, at, mid in rows]

    async def count(self) -> int:
        """How many events wait."""
        row = await self.db.run(lambda c: c.execute("SELECT count(*) FROM outbox").fetchone())
        self.pending = int(row[0])
        return self.pending

    async def remove(self, *row_ids: int) -> None:
        """Forget published (or abandoned) events, in one transaction."""
        params = [(i,) for i in row_ids]

        def delete(c: sqlite3.Connection) -> None:
            with c:  # one commit (one fsync) for the lot
                c.execute("BEGIN")
                c.executemany("DELETE FROM outbox WHERE id = ?", params)

        await self.db.run(delete)
        self.pending = max(0, self.pending - len(row_ids))


class InstallFlow:
    """The install route's handler and the outbox forwarder.

    settings: ``install.*``. registry: issues the tokens. deliver: makes an envelope durable
    (the publisher's confirmed publish, or the spool). router: the ``app.installed`` route.
    key_fields: ``dedup.key_fields`` (for the event's message_id). max_body_bytes:
    ``http.max_body_bytes``. clock: wall-clock seconds.
    """

    def __init__(
        self,
        *,
        settings: InstallSettings,
        registry: TokenRegistry,
        outbox: Outbox,
        deliver: Deliver,
        router: Router,
        metrics: Metrics,
        key_fields: tuple[str, ...],
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.outbox = outbox
        self.deliver = deliver
        self.router = router
        self.metrics = metrics
        self.key_fields = key_fields
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

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
        message_id = dedup_key(business, APP_INSTALLED, body, raw, self.key_fields)
        try:
            row_id = await self.outbox.put(raw, business, received_at, message_id)
        except StoreUnavailable as exc:
            return self._unavailable("outbox", str(exc))
        try:
            token = await self.registry.issue(
                business, grace=self.settings.token_grace, source="install"
            )
        except StoreUnavailable as exc:
            with contextlib.suppress(StoreUnavailable):
                await self.outbox.remove(row_id)
            return self._unavailable("token_store", str(exc))
        self._wake.set()
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

    # -- the outbox forwarder --------------------------------------------------------------

    async def start(self) -> None:
        """Count what an earlier run left in the outbox and start forwarding it."""
        try:
            left = await self.outbox.count()
        except StoreUnavailable as exc:
            log.warning("install.outbox_unavailable", error=str(exc))
            left = 0
        if left:
            log.info("install.outbox_pending", events=left)
            self._wake.set()
        self._task = asyncio.get_running_loop().create_task(
            self._forward(), name="relay-install-outbox"
        )

    async def close(self) -> None:
        """Stop forwarding (what is left stays in the outbox for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.outbox.db.close()

    async def _forward(self) -> None:
        delay = RETRY_MIN
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay if self.outbox.pending else None):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._forward_batch()
            except (BrokerUnavailable, StoreUnavailable) as exc:
                log.warning("install.forward_failed", error=str(exc), retry_in=round(delay, 1))
                delay = min(delay * 2, RETRY_MAX) * (0.75 + random.random() / 2)  # noqa: S311
                continue
            delay = RETRY_MIN

    async def _forward_batch(self) -> None:
        while rows := await self.outbox.oldest():
            done: list[int] = []
            try:
                for row_id, body, business, received_at, message_id in rows:
                    route = self.router.route(APP_INSTALLED, business, None)
                    parsed = parse_object(body) if body else {}
                    headers = contract_headers(APP_INSTALLED, business, parsed, received_at)
                    envelope = Envelope(
                        body, route, message_id, APP_INSTALLED, received_at, headers
                    )
                    outcome = await self.deliver(envelope)
                    done.append(row_id)
                    log.info(
                        "install.published",
                        business=business,
                        key=message_id,
                        routing_key=route.routing_key,
                        outcome=outcome,
                    )
            finally:
                if done:  # (a crash before this re-publishes them: same message_id)
                    await self.outbox.remove(*done)


def check_install(body: Mapping[str, Any], required: Mapping[str, str]) -> str:
    """The ``business_id`` of an install callback body (retm/webhooks.md §3.8).

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
