"""Deduplication: the dedup key, and the in-memory store. Pure logic (no aiohttp, no aio-pika).

Semantics (docs/reliability.md, "Retries and duplicates"): the first delivery *claims* its key; the
key becomes *delivered* only once the event is durable (``commit``); a failure ``release``s it so
the retry is not blocked. A duplicate arriving while the first is in flight waits for that outcome
and answers the same way. Delivered keys live for ``ttl`` seconds, at most ``max_entries`` of them.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from relay.routing import UNRECOGNIZED

MAX_KEY_BYTES = 255  # the key is the AMQP message_id, a shortstr


class Verdict(enum.Enum):
    """The answer of ``DedupStore.claim``.

    CLAIMED: the caller owns the key and must ``commit`` or ``release`` it.
    DUPLICATE: the key was already delivered (answered 200 "duplicate").
    FAILED: the caller waited on another in-flight delivery of the key, and that one failed
    (answered like it, with a 503 the sender may retry).
    """

    CLAIMED = "claimed"
    DUPLICATE = "duplicate"
    FAILED = "failed"


class DedupStore(Protocol):
    """Where delivered keys are remembered; the memory store here, or Redis (shared)."""

    async def claim(self, key: str) -> Verdict:
        """Claim ``key``; waits while another delivery of it is in flight."""
        ...

    async def commit(self, key: str, ttl: float | None = None) -> None:
        """Mark a claimed key delivered for ``ttl`` seconds (None: the store's TTL). Never
        raises: a shared store that cannot be written logs it and remembers the key locally
        (the event is durable already)."""
        ...

    async def release(self, key: str) -> None:
        """Give up a claim so a retry can claim the key again. Never raises."""
        ...

    def __len__(self) -> int:
        """Delivered keys currently remembered (locally, for metrics)."""
        ...


def dedup_key(
    principal: str,
    event: str,
    body: Mapping[str, object],
    raw: bytes,
    key_fields: Iterable[str] = ("reference",),
) -> str:
    """``<principal>:<event>:<reference>``, at most 255 bytes.

    principal: the authenticated business, or a token fingerprint (never the token).
    event: the routing event (``order.created``, ``unrecognized``, ``delivery.error``).
    body, raw: the parsed JSON object and its bytes. The reference is the first of
    ``key_fields`` holding a non-empty string or an integer (RETM's ``reference``, a UUID on the
    Customer hook, docs/retm.md, "Identity fields"); otherwise the SHA-256 of ``raw`` in its place.
    A key that would be longer than 255 bytes uses the SHA-256 of its reference instead.
    """
    reference = body_reference(body, key_fields)
    if reference is None:
        reference = "sha256-" + hashlib.sha256(raw).hexdigest()
    key = f"{principal}:{event}:{reference}"
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        digest = hashlib.sha256(reference.encode("utf-8", "surrogatepass")).hexdigest()
        key = f"{principal}:{event}:sha256-{digest}"
        if len(key.encode()) > MAX_KEY_BYTES:
            key = f"{principal}:sha256-{hashlib.sha256(key.encode()).hexdigest()}"
    return key


def key_event(event: str, raw_event: object) -> str:
    """The event part of a dedup key: ``event``, except for an ``unrecognized`` event that
    named one (``"Menu Updated"``, ``"menü.updated"``, ``5``): ``unrecognized-<12 hex>``, the
    start of the SHA-256 of that value as JSON. Two unusable event names about one object
    (sharing its ``reference``) are then two events, as two valid names are; a retry, which
    repeats the body, keeps its key. A body with no ``event`` at all keeps ``unrecognized``."""
    if event != UNRECOGNIZED or raw_event is None:
        return event
    named = json.dumps(raw_event, sort_keys=True, ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
    return f"{UNRECOGNIZED}-{hashlib.sha256(named).hexdigest()[:12]}"


def body_reference(body: Mapping[str, object], key_fields: Iterable[str]) -> str | None:
    """The event's own identity: the first of ``key_fields`` holding a non-empty string or an
    integer, as text; None when there is none (the key is then made from the body's SHA-256,
    kept only for ``dedup.hash_ttl``)."""
    for name in key_fields:
        value = body.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def digest(key: str) -> bytes:
    """The 16-byte BLAKE2b digest under which a delivered key is stored (memory and spool)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class MemoryDedupStore:
    """Delivered keys in memory, bounded by ``ttl`` (seconds) and ``max_entries``.

    Memory per delivered key is about 110 bytes: a 16-byte digest, a dict slot and a deque slot;
    expiry times are whole seconds shared by every key committed in the same second. Keys expire
    in commit order, so expiry and eviction both pop from the front of the deque in O(1).

    clock: wall-clock seconds (``time.time``), injectable for tests; wall clock so that expiry
    times persisted with the spool stay meaningful across a restart.
    wait_timeout: how long (seconds) a duplicate waits for an in-flight first delivery.
    on_commit: called with (digest, expiry) for each commit, to persist delivered keys.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        *,
        clock: Callable[[], float] = time.time,
        wait_timeout: float = 10.0,
        on_commit: Callable[[bytes, int], None] | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.wait_timeout = wait_timeout
        self.evictions = 0
        self._clock = clock
        self._on_commit = on_commit
        self._delivered: dict[bytes, int] = {}
        self._order: deque[bytes] = deque()
        self._stale: dict[bytes, int] = {}
        #: claimed keys -> (the future their followers wait on, the key's digest)
        self._pending: dict[str, tuple[asyncio.Future[bool], bytes]] = {}
        self._expiry_second = -1
        self._expiry_value = 0

    def __len__(self) -> int:
        return len(self._delivered)

    @property
    def in_flight(self) -> int:
        """Keys claimed and not yet committed or released."""
        return len(self._pending)

    async def claim(self, key: str) -> Verdict:
        """Claim ``key`` (see Verdict). A follower waits at most ``wait_timeout`` seconds for
        the in-flight first delivery; if that does not finish in time the follower gets FAILED."""
        pending = self._pending.get(key)
        if pending is None:
            d = digest(key)
            expiry = self._delivered.get(d)
            if expiry is not None and expiry > self._clock():
                return Verdict.DUPLICATE
            self._pending[key] = (asyncio.get_running_loop().create_future(), d)
            return Verdict.CLAIMED
        try:
            async with asyncio.timeout(self.wait_timeout):
                delivered = await asyncio.shield(pending[0])
        except TimeoutError:
            return Verdict.FAILED
        return Verdict.DUPLICATE if delivered else Verdict.FAILED

    def is_delivered(self, key: str) -> bool:
        """Whether ``key`` is delivered and not yet expired. (An expired key stays in memory
        until it reaches the front of the commit order; see ``_trim``.)"""
        expiry = self._delivered.get(digest(key))
        return expiry is not None and expiry > self._clock()

    async def commit(self, key: str, ttl: float | None = None) -> None:
        """Mark ``key`` delivered for ``ttl`` seconds (None: the store's ``ttl``; a shorter one
        for keys made from a body hash, ``dedup.hash_ttl``) and wake its waiters (as
        duplicates)."""
        self.commit_now(key, ttl)

    def commit_now(self, key: str, ttl: float | None = None) -> None:
        """Synchronous ``commit``, for callers that cannot await (a publisher confirm callback)."""
        pending = self._pending.pop(key, None)
        d = digest(key) if pending is None else pending[1]
        now = self._clock()
        # A shorter TTL than the store's breaks the commit order of expiry times: such a key
        # may stay in memory (expired, so no longer a duplicate) until the keys before it go.
        expiry = self._expiry(now) if ttl is None or ttl >= self.ttl else int(now + ttl) + 1
        self._remember(d, expiry)
        if self._on_commit is not None:
            self._on_commit(d, expiry)
        if pending is not None and not pending[0].done():
            pending[0].set_result(True)

    async def release(self, key: str) -> None:
        """Forget the claim on ``key`` and wake its waiters (as failed)."""
        self._settle(key, delivered=False)

    def restore(self, entries: Iterable[tuple[bytes, int]]) -> int:
        """Load delivered keys persisted before a restart: (digest, expiry) pairs in commit
        order. Expired ones are skipped; returns how many were loaded."""
        now = self._clock()
        loaded = 0
        for d, expiry in entries:
            if expiry > now:
                self._remember(d, expiry)
                loaded += 1
        return loaded

    def _remember(self, d: bytes, expiry: int) -> None:
        if d in self._delivered:  # committed again after it expired: the old slot goes stale
            self._stale[d] = self._stale.get(d, 0) + 1
        self._delivered[d] = expiry
        self._order.append(d)
        self._trim()

    def _settle(self, key: str, *, delivered: bool) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result(delivered)

    def _expiry(self, now: float) -> int:
        second = int(now)
        if second != self._expiry_second:  # share one int object per second of commits
            self._expiry_second = second
            self._expiry_value = int(now + self.ttl) + 1
        return self._expiry_value

    def _trim(self) -> None:
        """Drop expired keys from the front, then evict the oldest beyond ``max_entries``.

        Invariant: every digest in ``_delivered`` sits in ``_order`` once, plus once more per
        count in ``_stale`` (older slots of a key committed again, always nearer the front).
        """
        order, delivered, stale = self._order, self._delivered, self._stale
        now = self._clock()
        while order:
            d = order[0]
            if d in stale:
                order.popleft()
                if stale[d] == 1:
                    del stale[d]
                else:
                    stale[d] -= 1
                continue
            expiry = delivered[d]
            if expiry > now and len(delivered) <= self.max_entries:
                break
            order.popleft()
            del delivered[d]
            if expiry > now:
                self.evictions += 1
