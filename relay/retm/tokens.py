"""The token registry: one webhook Bearer token (or several, while one rotates) per merchant.

RETM sends, on every webhook, the token the receiver answered to the merchant's install callback
(docs/retm.md, "Authentication", "Install callback"). The install flow and ``retm-relay tokens``
create such tokens; this module keeps them and feeds them to the ``TokenAuthenticator``, so a token
names its merchant (``business``) and that merchant is the principal of every event it
authenticates.

Only the token's SHA-256 digest is stored, with its business, creation time, the time it stops
being accepted (``expires_at``: the end of a rotation's grace period, or none) and its source.
The token itself exists only in the answer to RETM (or the CLI's output) that created it.

Two stores, behind ``TokenStore``: SQLite in ``state.dir`` (one relay; the CLI writes the same
file while the daemon runs) and Redis (several relays share one registry). The daemon reads the
store once at start-up, applies its own writes at once, and notices other writers' changes by
polling a cheap version number once a second: SQLite's ``PRAGMA data_version`` (which changes
when another connection commits) or a Redis counter incremented in the same transaction as every
change. Polling a version, rather than Redis pub/sub, also catches changes made while the link
to the store was down; a second of delay is fine for operator commands.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
import structlog

from relay.dedup.redis import STORE_ERRORS, connect
from relay.errors import RelayError, StoreUnavailable
from relay.http.auth import TokenAuthenticator, token_digest
from relay.redis_url import parse_redis_url
from relay.statefiles import private_database

REDIS_TIMEOUT = 0.5  # seconds: an install must answer within 1 s

log = structlog.get_logger("relay.tokens")

POLL_INTERVAL = 1.0
BUSINESS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""A RETM ``business_id`` as the registry accepts it (the API subdomain: docs/retm.md,
"Install callback")."""
SQLITE_FILE = "tokens.sqlite3"
T = TypeVar("T")


class TokenStoreError(RelayError):
    """The registry store refused an operation (unknown token, bad file); the message says why."""


def new_token() -> str:
    """A fresh webhook token: 32 random bytes, URL-safe base64 (43 characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def make_token(business: str, source: str, now: float) -> tuple[str, TokenRecord]:
    """A fresh token for ``business`` and its record (created at ``now``, no expiry)."""
    token = new_token()
    return token, TokenRecord(token_digest(token), business, now, None, source)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One registered token, without the token.

    digest: SHA-256 of the token (32 bytes). business: RETM ``business_id`` it belongs to.
    created_at, expires_at: Unix seconds; ``expires_at`` is when the token stops being accepted
    (``None``: until revoked or rotated). source: ``install`` or ``cli``.
    """

    digest: bytes
    business: str
    created_at: float
    expires_at: float | None
    source: str

    @property
    def fingerprint(self) -> str:
        """The first 8 hex characters of the digest: safe to log and to show, names the token."""
        return self.digest.hex()[:8]

    def active(self, now: float) -> bool:
        """Whether the token is accepted at Unix time ``now``."""
        return self.expires_at is None or now < self.expires_at

    def as_json(self) -> dict[str, Any]:
        """The record as stored in Redis and printed by ``tokens list --json`` (no digest)."""
        return {
            "business": self.business,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "source": self.source,
        }


def rotated(records: Iterable[TokenRecord], business: str, until: float) -> list[TokenRecord]:
    """The records of ``business`` that must now expire at ``until`` (a rotation's grace end):
    those with no expiry or a later one."""
    return [
        replace(r, expires_at=until)
        for r in records
        if r.business == business and (r.expires_at is None or r.expires_at > until)
    ]


def select(records: Iterable[TokenRecord], selector: str) -> list[TokenRecord]:
    """The records a CLI selector names: a fingerprint (or a longer hex prefix of the digest,
    at least 8 characters), else a business. Raises TokenStoreError when it names none."""
    records = list(records)
    lowered = selector.lower()
    if len(lowered) >= 8 and all(c in "0123456789abcdef" for c in lowered):
        by_digest = [r for r in records if r.digest.hex().startswith(lowered)]
        if by_digest:
            return by_digest
    by_business = [r for r in records if r.business == selector]
    if not by_business:
        raise TokenStoreError(f"no token with fingerprint or business {selector!r}")
    return by_business


class TokenStore(Protocol):
    """Where the registry lives (SQLite in ``state.dir``, or Redis).

    Every method raises StoreUnavailable when the store cannot be reached.
    """

    async def load(self) -> list[TokenRecord]:
        """Every record, oldest first."""
        ...

    async def version(self) -> str:
        """A value that changes whenever another writer changed the registry."""
        ...

    async def add(self, record: TokenRecord, rotate_until: float | None) -> list[TokenRecord]:
        """Store ``record``; with ``rotate_until``, in the same transaction the business's other
        tokens expire at that time (see ``rotated``). Returns those changed records."""
        ...

    async def remove(self, digests: Iterable[bytes]) -> None:
        """Delete the records with these digests (revocation: refused at once)."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


class SqliteDb:
    """One SQLite file in WAL mode with ``synchronous=FULL`` (a committed write is on disk),
    used from one worker thread so that no query runs on the event loop.

    path: the file (its directory is created, the file made private). schema: SQL run once
    at open. Errors surface as StoreUnavailable naming the file.
    """

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._schema = schema
        self._executor = concurrent.futures.ThreadPoolExecutor(1, f"relay-sqlite-{path.stem}")
        self._conn: sqlite3.Connection | None = None

    async def run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """``func(connection)`` on the database's thread; returns its result."""

        def call() -> T:
            if self._conn is None:
                self._conn = self._open()
            return func(self._conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    def _open(self) -> sqlite3.Connection:
        private_database(self.path)  # 0600 before SQLite writes a byte (relay/statefiles.py)
        conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(self._schema)
        return conn

    async def close(self) -> None:
        """Close the connection on its thread and stop the thread."""

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        with contextlib.suppress(RuntimeError):
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)


class SqliteTokenStore:
    """The registry in ``<state.dir>/tokens.sqlite3``: a returned ``add`` is on disk."""

    def __init__(self, state_dir: Path) -> None:
        self.db = SqliteDb(
            state_dir / SQLITE_FILE,
            "CREATE TABLE IF NOT EXISTS tokens ("
            " digest BLOB PRIMARY KEY, business TEXT NOT NULL, created_at REAL NOT NULL,"
            " expires_at REAL, source TEXT NOT NULL);",
        )
        self._run = self.db.run

    async def load(self) -> list[TokenRecord]:
        """Every record, oldest first."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT digest, business, created_at, expires_at, source FROM tokens"
                " ORDER BY created_at"
            ).fetchall()
        )
        return [TokenRecord(bytes(d), b, ca, ea, s) for d, b, ca, ea, s in rows]

    async def version(self) -> str:
        """``PRAGMA data_version``: changes when another connection (the CLI) commits."""
        row = await self._run(lambda c: c.execute("PRAGMA data_version").fetchone())
        return str(row[0])

    async def add(self, record: TokenRecord, rotate_until: float | None) -> list[TokenRecord]:
        """Insert ``record`` and expire the business's other tokens, in one transaction."""

        def tx(c: sqlite3.Connection) -> list[TokenRecord]:
            c.execute("BEGIN IMMEDIATE")
            try:
                changed: list[TokenRecord] = []
                if rotate_until is not None:
                    rows = c.execute(
                        "SELECT digest, business, created_at, expires_at, source FROM tokens"
                        " WHERE business = ?",
                        (record.business,),
                    ).fetchall()
                    current = [TokenRecord(bytes(d), b, ca, ea, s) for d, b, ca, ea, s in rows]
                    changed = rotated(current, record.business, rotate_until)
                    c.executemany(
                        "UPDATE tokens SET expires_at = ? WHERE digest = ?",
                        [(r.expires_at, r.digest) for r in changed],
                    )
                    # Tokens whose grace ended long ago are only clutter by now.
                    c.execute(
                        "DELETE FROM tokens WHERE business = ? AND expires_at < ?",
                        (record.business, record.created_at - 86_400),
                    )
                c.execute(
                    "INSERT INTO tokens (digest, business, created_at, expires_at, source)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        record.digest,
                        record.business,
                        record.created_at,
                        record.expires_at,
                        record.source,
                    ),
                )
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            return changed

        return await self._run(tx)

    async def remove(self, digests: Iterable[bytes]) -> None:
        """Delete the records with these digests."""
        params = [(d,) for d in digests]
        await self._run(lambda c: c.executemany("DELETE FROM tokens WHERE digest = ?", params))

    async def close(self) -> None:
        """Close the database."""
        await self.db.close()


class RedisTokenStore:
    """The registry in Redis: hash ``<key>`` (field: digest hex, value: the record as JSON) and
    counter ``<key>:version`` (``{<key>}:version`` on a Redis Cluster), both changed in one
    MULTI/EXEC transaction (WATCH makes a rotation's read-modify-write safe against another
    relay doing the same)."""

    def __init__(self, url: str, key: str) -> None:
        self.key = key
        # A Redis Cluster runs a transaction only on keys of one slot: there the counter's
        # name carries the hash key's name as its hash tag, which puts both on one slot.
        cluster = parse_redis_url(url).kind == "cluster"
        self.version_key = f"{{{key}}}:version" if cluster else f"{key}:version"
        self._redis = connect(url, REDIS_TIMEOUT)
        self._errors = STORE_ERRORS

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except self._errors as exc:
            raise StoreUnavailable(f"token registry in Redis: {exc}") from None

    @staticmethod
    def _record(field: bytes | str, value: bytes | str) -> TokenRecord:
        data = orjson.loads(value)
        return TokenRecord(
            bytes.fromhex(field.decode() if isinstance(field, bytes) else field),
            data["business"],
            data["created_at"],
            data["expires_at"],
            data["source"],
        )

    async def load(self) -> list[TokenRecord]:
        """Every record, oldest first."""
        raw = await self._call(self._redis.hgetall(self.key))
        return sorted((self._record(f, v) for f, v in raw.items()), key=lambda r: r.created_at)

    async def version(self) -> str:
        """The version counter (``0`` before the first change)."""
        value = await self._call(self._redis.get(self.version_key))
        return value.decode() if value else "0"

    async def add(self, record: TokenRecord, rotate_until: float | None) -> list[TokenRecord]:
        """Store ``record`` and expire the business's other tokens, atomically."""
        from redis.exceptions import WatchError  # noqa: PLC0415

        async def tx() -> list[TokenRecord]:
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(self.key)
                        changed: list[TokenRecord] = []
                        if rotate_until is not None:
                            raw = await pipe.hgetall(self.key)
                            current = [self._record(f, v) for f, v in raw.items()]
                            changed = rotated(current, record.business, rotate_until)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        for r in (*changed, record):
                            pipe.hset(self.key, r.digest.hex(), orjson.dumps(r.as_json()))
                        pipe.incr(self.version_key)
                        await pipe.execute()
                    except WatchError:
                        continue
                    return changed

        result: list[TokenRecord] = await self._call(tx())
        return result

    async def remove(self, digests: Iterable[bytes]) -> None:
        """Delete the records with these digests."""
        fields = [d.hex() for d in digests]
        if not fields:
            return

        async def tx() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.key, *fields)
                pipe.incr(self.version_key)
                await pipe.execute()

        await self._call(tx())

    async def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()


def open_store(
    store: str, state_dir: Path, redis_url: str, redis_key: str
) -> SqliteTokenStore | RedisTokenStore:
    """The store ``install.store`` names: ``state`` (SQLite) or ``redis``."""
    if store == "redis":
        return RedisTokenStore(redis_url, redis_key)
    return SqliteTokenStore(state_dir)


class TokenRegistry:
    """Keeps a ``TokenAuthenticator`` in step with a ``TokenStore``.

    authenticator: gains each registered token's digest, bound to its business and expiry.
    clock: wall-clock seconds (injectable for tests). poll_interval: seconds between version
    checks. ``loaded`` is set once the store was read; ``last_error`` says why it was not.
    configured: how many tokens the settings hold (``auth.tokens``), for the ``tokens.loaded``
    log line, which gives the count of each kind.
    """

    def __init__(
        self,
        store: TokenStore,
        authenticator: TokenAuthenticator,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
        configured: int = 0,
    ) -> None:
        self.store = store
        self.configured = configured
        self.authenticator = authenticator
        self.clock = clock
        self.poll_interval = poll_interval
        self.loaded = asyncio.Event()
        self.last_error = ""
        self._records: dict[bytes, TokenRecord] = {}
        self._version: str | None = None
        self._writing = 0  # local writes in progress
        self._writes = 0  # local writes finished
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._records)

    def status(self) -> dict[str, Any]:
        """Registry state for ``/health``."""
        now = self.clock()
        return {
            "store": "redis" if isinstance(self.store, RedisTokenStore) else "state",
            "loaded": self.loaded.is_set(),
            "tokens": len(self._records),
            "active": sum(1 for r in self._records.values() if r.active(now)),
            "merchants": len({r.business for r in self._records.values()}),
            "last_error": self.last_error or None,
        }

    async def start(self) -> None:
        """Read the store (a failure is logged and retried by the poll loop) and start polling."""
        await self._refresh()
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="relay-tokens")

    async def close(self) -> None:
        """Stop polling and close the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    async def issue(self, business: str, *, grace: float | None, source: str) -> str:
        """Create, store and accept a new token for ``business``; returns the token.

        grace: seconds the business's other tokens stay valid (a rotation), or ``None`` to
        leave them alone (an extra token). Raises StoreUnavailable when the store fails; the
        token is then neither stored nor accepted.
        """
        now = self.clock()
        token, record = make_token(business, source, now)
        self._writing += 1
        try:
            changed = await self.store.add(record, None if grace is None else now + grace)
        finally:
            self._writing -= 1
            self._writes += 1
        for r in (*changed, record):
            self._accept(r)
        return token

    def _accept(self, record: TokenRecord) -> None:
        self._records[record.digest] = record
        self.authenticator.add_digest(record.digest, record.business, record.expires_at)

    def apply(self, records: Iterable[TokenRecord]) -> None:
        """Make the accepted set exactly ``records`` (the store's full content)."""
        fresh = {r.digest: r for r in records}
        for digest in self._records.keys() - fresh.keys():
            del self._records[digest]
            self.authenticator.remove_digest(digest)
        for digest, record in fresh.items():
            if self._records.get(digest) != record:
                self._accept(record)

    async def _refresh(self) -> None:
        try:
            version = await self.store.version()
            if version != self._version or not self.loaded.is_set():
                writes = self._writes
                records = await self.store.load()
                if self._writing or self._writes != writes:
                    # A local write overlapped the read, which may predate it (with Redis the
                    # answers come on different connections): read again at the next poll.
                    return
                self.apply(records)
                self._version = version
                if not self.loaded.is_set():
                    log.info(
                        "tokens.loaded",
                        settings=self.configured,
                        registry=len(self._records),
                        tokens=self.configured + len(self._records),
                    )
                self.loaded.set()
        except StoreUnavailable as exc:
            if str(exc) != self.last_error:
                log.warning("tokens.store_unavailable", error=str(exc))
            self.last_error = str(exc)
            return
        if self.last_error:
            log.info("tokens.store_available")
        self.last_error = ""

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self._refresh()
            now = self.clock()
            for record in [r for r in self._records.values() if not r.active(now)]:
                # Refused already (the authenticator checks the expiry); free the slot.
                self.authenticator.remove_digest(record.digest)
