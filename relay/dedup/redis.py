"""The shared dedup store in Redis: the memory store's claim, then commit or release, made atomic
in Redis so that several relay instances (or workers) act as one.

One Redis key per dedup key, ``<dedup.redis_prefix><dedup key>`` (``retm-relay:dedup:...``):

- **claim**: the key is set to ``<owner>`` with ``PX <lease>`` when it does not exist, else what it
  holds is returned. ``<owner>`` is a random id of this process plus a counter. The lease (a
  little over ``amqp.publish_timeout``) frees the claim of an owner that crashed.
- **commit**: the key is set to ``delivered`` with ``PX <dedup.ttl>`` only if it still holds this
  owner's claim, or nothing (the lease ran out and nobody claimed the key since).
- **release**: the key is deleted only if it still holds this owner's claim.

A duplicate that arrives while the first delivery is in flight waits for that outcome and answers
the same way (``Verdict``): on the same process it waits on the owner's future, without Redis; on
another process it polls the key with backoff (5 ms doubling to 100 ms) until it reads
``delivered`` (DUPLICATE), or no longer the same owner (FAILED), or ``wait_timeout`` passes
(FAILED). Polling rather than pub/sub: concurrent copies of one event on two instances are rare,
and polling needs no subscriber connection or per-key subscriptions to keep consistent.

When Redis cannot be reached (refused, ``dedup.redis_timeout`` exceeded, LOADING, READONLY ...)
the store is *down*: it stops sending to Redis, probes it with PING (0.25 s doubling to 5 s), and
meanwhile either raises StoreUnavailable (``on_store_failure = "reject"``: the ingest answers 503
with Retry-After) or answers from the in-memory store of this process (``"local"``: counted in
``local_fallbacks``, logged once per outage).

Claims, commits and releases are *batched*: those issued during one event-loop turn (and while
the previous batch is at Redis) go to Redis as one call of a Lua script (``_BATCH``, by EVALSHA)
that applies each operation atomically, in the order issued, and returns one reply per
operation. One batch is at Redis at a time, so operations on a key are applied in the order this
process issued them. redis-py's per-command bookkeeping (packing, a pooled connection, a retry
wrapper, a parse) is paid once per batch instead of once per webhook: sent one command per
webhook, it cost a third of the relay's time; pipelined, a fifth (py-spy, ``make bench
BENCH_ARGS="--only redis --profile"``). The script needs Redis 2.6.12 or newer (``SET ... PX``).
On a Redis Cluster a script may only touch keys of one hash slot, so a batch goes out as one
script call per slot, pipelined per master (``_Batcher._send_by_slot``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, cast

import structlog
from redis.asyncio import Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from relay.dedup.memory import MemoryDedupStore, Verdict
from relay.errors import StoreUnavailable
from relay.redis_url import RedisTarget, parse_redis_url

log = structlog.get_logger("relay.dedup")

DELIVERED = b"delivered"
#: what counts as "Redis cannot be reached" (redis-py wraps socket errors in ConnectionError)
STORE_ERRORS = (RedisError, OSError)
PROBE_MIN, PROBE_MAX = 0.25, 5.0
POLL_MIN, POLL_MAX = 0.005, 0.1

# One batch of operations, each atomic, applied in order. KEYS[i]: the Redis key of operation i.
# ARGV[1] lease in ms, ARGV[2] ttl in ms, ARGV[3] the delivered marker; then for operation i,
# ARGV[1 + 3i] its kind (c: claim, d: commit as delivered, r: release), ARGV[2 + 3i] the owner
# and ARGV[3 + 3i] the ttl of a commit in ms ("" for the default ttl).
# Replies, one per operation: claim: "" when the owner now holds the key, else what it held;
# commit: 1, or 0 when another owner holds the key; release: 1 when deleted, else 0.
_BATCH = """
local lease, ttl, delivered = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i, key in ipairs(KEYS) do
  local kind, owner, own_ttl = ARGV[1 + 3 * i], ARGV[2 + 3 * i], ARGV[3 + 3 * i]
  local held = redis.call('GET', key)
  if kind == 'c' then
    if held then
      out[i] = held
    else
      redis.call('SET', key, owner, 'PX', lease)
      out[i] = ''
    end
  elseif kind == 'd' then
    if held == owner or not held then
      redis.call('SET', key, delivered, 'PX', own_ttl ~= '' and own_ttl or ttl)
      out[i] = 1
    elseif held == delivered then
      out[i] = 1
    else
      out[i] = 0
    end
  elseif held == owner then
    redis.call('DEL', key)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
CLAIM, COMMIT, RELEASE = b"c", b"d", b"r"


class _Batcher:
    """Sends the claims, commits and releases issued meanwhile as one call of ``_BATCH``.

    ``call(kind, rkey, owner)`` queues one operation and returns a future of its reply (see
    ``_BATCH``). The queue goes out at the end of the event-loop turn, or when the batch at
    Redis answers: one batch at a time, in the order issued. An error (a connection error, a
    timeout, an error reply such as READONLY or LOADING) becomes the exception of every future
    of its batch; the caller catches ``STORE_ERRORS`` as for a direct command.
    """

    def __init__(self, redis: Client, *, lease_ms: int, ttl_ms: int) -> None:
        self.redis = redis
        self.script = redis.register_script(_BATCH)
        self._head = (lease_ms, ttl_ms, DELIVERED)
        self._queue: list[tuple[bytes, bytes, bytes, bytes, asyncio.Future[Any]]] = []
        self._sending: asyncio.Task[None] | None = None
        self._flush_soon = False

    def call(
        self, kind: bytes, rkey: bytes, owner: bytes, ttl_ms: bytes = b""
    ) -> asyncio.Future[Any]:
        """Queue one operation for the next batch (``ttl_ms``: a commit's own TTL, in
        milliseconds as ASCII digits; empty for the default)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((kind, rkey, owner, ttl_ms, future))
        if self._sending is None and not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        if self._sending is not None or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._sending = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add_done_callback(self._sent)

    def _sent(self, _task: asyncio.Task[None]) -> None:
        self._sending = None
        if self._queue:
            self._flush()

    async def _send(
        self, batch: list[tuple[bytes, bytes, bytes, bytes, asyncio.Future[Any]]]
    ) -> None:
        try:
            if isinstance(self.redis, RedisCluster):
                await self._send_by_slot(self.redis, batch)
                return
            keys = [rkey for _, rkey, _, _, _ in batch]
            args: list[Any] = list(self._head)
            for kind, _, owner, ttl_ms, _ in batch:
                args += (kind, owner, ttl_ms)
            replies = await self.script(keys=keys, args=args)
        except (*STORE_ERRORS, asyncio.CancelledError) as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(
                        exc if isinstance(exc, STORE_ERRORS) else RedisConnectionError("closed")
                    )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)

    async def _send_by_slot(
        self,
        cluster: RedisCluster,
        batch: list[tuple[bytes, bytes, bytes, bytes, asyncio.Future[Any]]],
    ) -> None:
        """A Redis Cluster runs a script only on keys of one hash slot: one call of ``_BATCH``
        per slot the batch touches, all in one pipeline (one round trip per master, in
        parallel). The keys keep their names, so they spread over every slot and master (no
        hash tag puts them on one). A slot's error fails only that slot's operations; the
        operations of one slot stay in the order issued."""
        by_slot: dict[int, list[int]] = {}
        for index, (_, rkey, _, _, _) in enumerate(batch):
            by_slot.setdefault(key_slot(rkey), []).append(index)
        pipe = cluster.pipeline()
        for indices in by_slot.values():
            args: list[Any] = list(self._head)
            for index in indices:
                args += (batch[index][0], batch[index][2], batch[index][3])
            keys = [batch[index][1] for index in indices]
            pipe.eval(_BATCH, len(keys), *keys, *args)
        results = await pipe.execute(raise_on_error=False)
        for indices, result in zip(by_slot.values(), results, strict=True):
            if isinstance(result, BaseException):
                error = result if isinstance(result, STORE_ERRORS) else RedisError(str(result))
                for index in indices:
                    if not batch[index][4].done():
                        batch[index][4].set_exception(error)
                continue
            for index, reply in zip(indices, result, strict=True):
                if not batch[index][4].done():
                    batch[index][4].set_result(reply)

    async def drain(self) -> None:
        """Send what is queued and wait until every batch has been answered (or failed)."""
        while self._sending is not None or self._queue:
            if self._sending is None:
                self._flush()
            if self._sending is not None:
                await asyncio.wait([self._sending])


@dataclass(slots=True)
class _Claim:
    owner: bytes
    outcome: asyncio.Future[bool]


def redis_address(url: str) -> str:
    """Where ``dedup.redis_url`` points, without credentials, for ``/health`` and logs:
    ``host:port/db``, the socket path, ``sentinel h1:26379,.../mymaster/0`` or
    ``cluster h1:7000,...`` (relay.redis_url)."""
    return parse_redis_url(url).address


#: a client of ``connect``: one server (also a Sentinel master's), or a Redis Cluster
Client = Redis | RedisCluster


def connect(url: str, timeout: float) -> Client:
    """A redis-py asyncio client for ``dedup.redis_url`` (relay.redis_url: one server, the
    master a Sentinel set names, or a Redis Cluster) that fails fast: ``timeout`` seconds to
    connect and per command, and one immediate retry on a broken connection (a pooled
    connection that Redis closed), never on a timeout. Connects lazily, on the first command.

    With Sentinel the client asks the sentinels for the master on each new connection, so
    after a failover (the old master's connections fail, the store is down and probes) it
    reaches the new master. With a Cluster the client follows MOVED and ASK redirections and
    refreshes its slot map when a master fails over. Raises RedisUrlError for a bad URL."""
    target = parse_redis_url(url)
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "client_name": "retm-relay",
    }
    if target.kind == "single":
        return Redis.from_url(url, retry=retry, **common)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    tls = _tls_options(target) if target.tls else {}
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            retry=Retry(NoBackoff(), 1),
            **auth,
            **tls,
            **common,
        )
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **tls,
    }
    if target.sentinel_auth:
        sentinel_kwargs.update(auth)
    sentinel = Sentinel(target.hosts, sentinel_kwargs=sentinel_kwargs)
    client: Redis = sentinel.master_for(
        target.service, db=target.db, retry=retry, **auth, **tls, **common
    )
    return client


def _tls_options(target: RedisTarget) -> dict[str, Any]:
    """redis-py's ``ssl*`` arguments from the URL's TLS query parameters."""
    options: dict[str, Any] = {"ssl": True}
    for name, value in target.options.items():
        if name == "ssl_check_hostname":
            options[name] = value.lower() in {"1", "true", "yes", "on"}
        else:
            options[name] = value
    return options


class RedisDedupStore:
    """The DedupStore protocol on a shared Redis (see the module docstring).

    redis: a client from ``connect``. fallback: this process's MemoryDedupStore, used while
    Redis is down in ``local`` mode (and remembering keys whose commit could not reach Redis).
    ttl: seconds a delivered key is kept. lease: seconds a claim lives without commit or release.
    wait_timeout: seconds a duplicate waits for the in-flight first delivery.
    prefix: prepended to every dedup key. on_store_failure: ``reject`` or ``local``.
    address: where Redis is (no credentials), for ``status``.
    """

    def __init__(
        self,
        redis: Client,
        fallback: MemoryDedupStore,
        *,
        ttl: float,
        lease: float,
        wait_timeout: float,
        prefix: str = "retm-relay:dedup:",
        on_store_failure: Literal["reject", "local"] = "reject",
        address: str = "",
    ) -> None:
        self.redis = redis
        self.fallback = fallback
        self.ttl = ttl
        self.lease = lease
        self.wait_timeout = wait_timeout
        self.prefix = prefix
        self.on_store_failure = on_store_failure
        self.address = address
        #: whether Redis answered the last command (False: down, being probed)
        self.up = False
        self.last_error: str | None = "not connected yet"
        self.down_since: float | None = time.time()
        self.server_version = ""
        #: Redis commands that failed (claims, commits, releases, waits; not the probes)
        self.failures = 0
        #: claims answered by the in-memory store because Redis was down (``local`` mode)
        self.local_fallbacks = 0
        self._ttl_ms = max(1, round(ttl * 1000))
        self._lease_ms = max(1, round(lease * 1000))
        self._instance = secrets.token_hex(8)
        self._counter = itertools.count(1)
        self._claims: dict[str, _Claim] = {}
        self._local_claims: set[str] = set()
        self._watches: dict[str, asyncio.Task[Verdict]] = {}
        self._remote_waiters = 0
        self._probe: asyncio.Task[None] | None = None
        self._batch = _Batcher(redis, lease_ms=self._lease_ms, ttl_ms=self._ttl_ms)

    def __len__(self) -> int:
        """Delivered keys remembered in this process (the local fallback store)."""
        return len(self.fallback)

    @property
    def in_flight(self) -> int:
        """Keys this process claimed and has not yet committed or released."""
        return len(self._claims) + len(self._local_claims)

    async def start(self) -> None:
        """Try Redis once (PING, server version); when it does not answer, start probing it in
        the background. Never raises: Redis may come up after the relay."""
        try:
            await self._check()
        except STORE_ERRORS as exc:
            self.last_error = _describe(exc)
            log.warning(
                "dedup.store_down",
                redis=self.address,
                error=self.last_error,
                on_store_failure=self.on_store_failure,
            )
            self._start_probe()
        else:
            self._mark_up()

    async def close(self) -> None:
        """Stop probing and waiting, and close the Redis connections."""
        tasks = [t for t in (self._probe, *self._watches.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await task
        await self._batch.drain()
        await self.redis.aclose()

    # -- the DedupStore protocol ------------------------------------------------------------

    async def claim(self, key: str) -> Verdict:
        """Claim ``key`` (see Verdict). Raises StoreUnavailable when Redis cannot be reached in
        ``reject`` mode. A duplicate of an in-flight key waits at most ``wait_timeout``."""
        if key in self._local_claims:  # claimed in the local store during an outage
            return await self._claim_locally(key)
        own = self._claims.get(key)
        if own is not None:
            return await self._follow(own.outcome)
        if len(self.fallback) and self.fallback.is_delivered(key):
            return Verdict.DUPLICATE  # committed here while Redis could not be written
        if not self.up:
            return await self._degraded(key)
        owner = f"{self._instance}:{next(self._counter)}".encode()
        try:
            held = await self._try_claim(self._rkey(key), owner)
        except STORE_ERRORS as exc:
            self._failed("claim", exc)
            return await self._degraded(key)
        if held is None or held == owner:  # ours (== owner: a retried SET had been applied)
            self._claims[key] = _Claim(owner, asyncio.get_running_loop().create_future())
            return Verdict.CLAIMED
        if held == DELIVERED:
            return Verdict.DUPLICATE
        own = self._claims.get(key)
        if own is not None and own.owner == held:  # claimed here meanwhile
            return await self._follow(own.outcome)
        try:
            return await self._follow_remote(key, held)
        except StoreUnavailable:
            if self.on_store_failure == "reject":
                raise
            return await self._claim_locally(key)

    async def commit(self, key: str, ttl: float | None = None) -> None:
        """Mark ``key`` delivered for ``ttl`` seconds (None: the store's ``ttl``) and wake its
        waiters here (as duplicates).

        Returns without waiting for Redis: the mark goes out with the next batch, and until it
        lands the claim makes copies on other instances wait for it (operations of this process
        reach Redis in the order issued). When Redis cannot be written the key is remembered
        in this process, the failure is logged (``dedup.commit_failed``) and counted, and the
        claim's lease frees the key for other instances. Never raises (see ``flush``)."""
        if key in self._local_claims:
            self._local_claims.discard(key)
            await self.fallback.commit(key, ttl)
            return
        claim = self._claims.pop(key, None)
        if claim is None:
            return
        _settle(claim.outcome, delivered=True)
        if not self.up:  # known down: not sent, remembered here
            self._commit_failed(key, ttl)
            return
        ttl_ms = b"" if ttl is None else str(max(1, round(ttl * 1000))).encode()
        done = self._batch.call(COMMIT, self._rkey(key), claim.owner, ttl_ms)
        done.add_done_callback(functools.partial(self._committed, key, ttl))

    async def release(self, key: str) -> None:
        """Give up the claim on ``key`` and wake its waiters (as failed). Waits for Redis, so
        that a retry after the failure answer can claim the key anywhere; never raises: when
        Redis cannot be reached, the claim's lease frees the key."""
        if key in self._local_claims:
            self._local_claims.discard(key)
            await self.fallback.release(key)
            return
        claim = self._claims.pop(key, None)
        if claim is None:
            return
        _settle(claim.outcome, delivered=False)
        if not self.up:
            return
        try:
            await self._batch.call(RELEASE, self._rkey(key), claim.owner)
        except STORE_ERRORS as exc:
            self._failed("release", exc)

    async def flush(self) -> None:
        """Wait until Redis has answered every operation issued so far (or they failed)."""
        await self._batch.drain()

    # -- status -------------------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None when ready, else why not: Redis down in ``reject`` mode. In ``local`` mode the
        relay stays ready (it deduplicates per process meanwhile)."""
        if self.up or self.on_store_failure == "local":
            return None
        return f"redis {self.address} unreachable: {self.last_error}"

    def status(self) -> dict[str, Any]:
        """The ``dedup`` section of ``/health``."""
        if self.up:
            state = "up"
        else:
            state = "local_fallback" if self.on_store_failure == "local" else "down"
        return {
            "backend": "redis",
            "state": state,
            "redis": self.address,
            "redis_version": self.server_version or None,
            "on_store_failure": self.on_store_failure,
            "last_error": None if self.up else self.last_error,
            "down_since": None if self.down_since is None else _iso(self.down_since),
            "failures": self.failures,
            "local_fallbacks": self.local_fallbacks,
            "in_flight": self.in_flight,
            "remote_waits": self._remote_waiters,
            "local_entries": len(self.fallback),
            "ttl_seconds": self.ttl,
            "lease_seconds": self.lease,
            "wait_timeout_seconds": self.wait_timeout,
            "prefix": self.prefix,
        }

    # -- internals ----------------------------------------------------------------------------

    def _rkey(self, key: str) -> bytes:
        return (self.prefix + key).encode("utf-8", "surrogatepass")

    def _committed(self, key: str, ttl: float | None, done: asyncio.Future[Any]) -> None:
        exc = RedisConnectionError("closed") if done.cancelled() else done.exception()
        if exc is not None:
            self._failed("commit", exc)
            self._commit_failed(key, ttl)
        elif not done.result():
            log.warning("dedup.claim_lost", key=key, lease_seconds=self.lease)

    def _commit_failed(self, key: str, ttl: float | None) -> None:
        """The event is durable but Redis lacks its mark: a retry on another instance may
        publish a copy (same message_id, which consumers can drop); here it is a duplicate."""
        self.fallback.commit_now(key, ttl)
        log.warning("dedup.commit_failed", key=key, error=self.last_error)

    async def _try_claim(self, rkey: bytes, owner: bytes) -> bytes | None:
        """One batched operation: None when ``owner`` now holds ``rkey``, else what it held."""
        held: bytes = await self._batch.call(CLAIM, rkey, owner)
        return held or None

    async def _follow(self, outcome: asyncio.Future[bool]) -> Verdict:
        try:
            async with asyncio.timeout(self.wait_timeout):
                delivered = await asyncio.shield(outcome)
        except TimeoutError:
            return Verdict.FAILED
        return Verdict.DUPLICATE if delivered else Verdict.FAILED

    async def _follow_remote(self, key: str, owner: bytes) -> Verdict:
        """Wait for another process's delivery of ``key``; one poller per key here."""
        watch = self._watches.get(key)
        if watch is None:
            watch = asyncio.get_running_loop().create_task(self._watch(key, owner))
            self._watches[key] = watch
            watch.add_done_callback(lambda t: self._watch_done(key, t))
        self._remote_waiters += 1
        try:
            return await asyncio.shield(watch)
        finally:
            self._remote_waiters -= 1

    def _watch_done(self, key: str, task: asyncio.Task[Verdict]) -> None:
        if self._watches.get(key) is task:
            del self._watches[key]
        if not task.cancelled():
            task.exception()  # retrieved here: a follower that went away must not warn

    async def _watch(self, key: str, owner: bytes) -> Verdict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        rkey = self._rkey(key)
        delay = POLL_MIN
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)
            try:
                held = await cast(Awaitable[bytes | None], self.redis.get(rkey))
            except STORE_ERRORS as exc:
                self._failed("wait", exc)
                raise StoreUnavailable(f"redis unreachable: {self.last_error}") from None
            if held == DELIVERED:
                return Verdict.DUPLICATE
            if held != owner:  # released, lease ran out, or claimed anew: the first one failed
                return Verdict.FAILED
        return Verdict.FAILED

    async def _degraded(self, key: str) -> Verdict:
        if self.on_store_failure == "reject":
            raise StoreUnavailable(f"redis unreachable: {self.last_error}")
        return await self._claim_locally(key)

    async def _claim_locally(self, key: str) -> Verdict:
        self.local_fallbacks += 1
        verdict = await self.fallback.claim(key)
        if verdict is Verdict.CLAIMED:
            self._local_claims.add(key)
        return verdict

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = _describe(exc)
        if not self.up:
            return
        self.up = False
        self.down_since = time.time()
        log.warning(
            "dedup.store_down",
            redis=self.address,
            operation=operation,
            error=self.last_error,
            on_store_failure=self.on_store_failure,
        )
        self._start_probe()

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_up(), name="dedup-redis-probe"
            )

    async def _probe_until_up(self) -> None:
        delay = PROBE_MIN
        while True:
            await asyncio.sleep(delay)
            try:
                await self._check()
            except STORE_ERRORS as exc:
                self.last_error = _describe(exc)
                delay = min(delay * 2, PROBE_MAX)
                continue
            down_for = None if self.down_since is None else time.time() - self.down_since
            self._mark_up()
            log.info(
                "dedup.store_recovered",
                redis=self.address,
                down_seconds=None if down_for is None else round(down_for, 3),
                version=self.server_version,
            )
            return

    async def _check(self) -> None:
        await self.redis.ping()
        if not self.server_version:
            info = await self.redis.info("server")
            if "redis_version" not in info:  # a Cluster's {node: info} of several nodes
                info = next((v for v in info.values() if isinstance(v, dict)), {})
            self.server_version = str(info.get("redis_version", ""))

    def _mark_up(self) -> None:
        self.up = True
        self.last_error = None
        self.down_since = None


def _settle(outcome: asyncio.Future[bool], *, delivered: bool) -> None:
    if not outcome.done():
        outcome.set_result(delivered)


def _describe(exc: BaseException) -> str:
    """A short reason; redis-py's messages name host and port, never the password."""
    return f"{type(exc).__name__}: {exc}"[:300]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
