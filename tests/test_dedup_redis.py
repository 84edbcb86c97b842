"""The shared dedup store in Redis: claim, commit or release across instances, against a real
Redis (DB 15 with a unique key prefix per test, or a private redis-server for outages)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from relay.dedup.memory import MemoryDedupStore, Verdict
from relay.dedup.redis import DELIVERED, RedisDedupStore, connect
from relay.errors import StoreUnavailable
from tests.conftest import REDIS_URL, PrivateRedis, wait_for
from tests.proxy import FaultProxy

TTL = 3600.0


@pytest.fixture
async def raw_redis() -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the test DB, to look at what the stores wrote."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(redis_prefix: str) -> AsyncIterator[Any]:
    """Start RedisDedupStores sharing ``redis_prefix`` (each one is "an instance")."""
    stores: list[RedisDedupStore] = []

    async def make(
        url: str = REDIS_URL,
        *,
        timeout: float = 1.0,
        lease: float = 5.0,
        wait_timeout: float = 5.0,
        on_store_failure: Any = "reject",
    ) -> RedisDedupStore:
        store = RedisDedupStore(
            connect(url, timeout),
            MemoryDedupStore(TTL, 1000),
            ttl=TTL,
            lease=lease,
            wait_timeout=wait_timeout,
            prefix=redis_prefix,
            on_store_failure=on_store_failure,
            address="test",
        )
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_commit_on_one_instance_is_a_duplicate_on_another(
    make_store: Any, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """A key committed by one instance is DUPLICATE for another, and Redis keeps it for the
    TTL under the prefix."""
    a, b = await make_store(), await make_store()

    assert await a.claim("k1") is Verdict.CLAIMED
    await a.commit("k1")  # returns before Redis has the mark: b waits for it meanwhile

    assert await b.claim("k1") is Verdict.DUPLICATE
    assert await a.claim("k1") is Verdict.DUPLICATE
    assert await raw_redis.get(f"{redis_prefix}k1") == DELIVERED
    pttl = await raw_redis.pttl(f"{redis_prefix}k1")
    assert TTL * 1000 - 60_000 < pttl <= TTL * 1000


async def test_a_commit_with_its_own_ttl_keeps_the_key_that_long(
    make_store: Any, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """``commit(key, ttl)`` (a body-hash key, ``dedup.hash_ttl``) sets that TTL in Redis, in
    the same batch as a commit with the store's TTL."""
    store = await make_store()
    assert await store.claim("hashed") is Verdict.CLAIMED
    assert await store.claim("referenced") is Verdict.CLAIMED

    await store.commit("hashed", 90.0)
    await store.commit("referenced")
    await store.flush()

    hashed = await raw_redis.pttl(f"{redis_prefix}hashed")
    referenced = await raw_redis.pttl(f"{redis_prefix}referenced")
    assert 80_000 < hashed <= 90_000
    assert TTL * 1000 - 60_000 < referenced <= TTL * 1000


async def test_release_lets_another_instance_claim(
    make_store: Any, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """A released claim is gone: the retry on another instance claims the key."""
    a, b = await make_store(), await make_store()

    assert await a.claim("k1") is Verdict.CLAIMED
    await a.release("k1")

    assert await raw_redis.get(f"{redis_prefix}k1") is None
    assert await b.claim("k1") is Verdict.CLAIMED
    await b.commit("k1")
    await b.flush()
    assert await raw_redis.get(f"{redis_prefix}k1") == DELIVERED


@pytest.mark.parametrize(("outcome", "verdict"), [("commit", "duplicate"), ("release", "failed")])
async def test_follower_on_another_instance_answers_like_the_first(
    make_store: Any, outcome: str, verdict: str
) -> None:
    """A duplicate arriving on another instance while the first is in flight waits for it and
    answers the same way: DUPLICATE after a commit, FAILED after a release."""
    a, b = await make_store(), await make_store(wait_timeout=60)
    assert await a.claim("k1") is Verdict.CLAIMED

    followers = [asyncio.create_task(b.claim("k1")) for _ in range(3)]
    await wait_for(lambda: b.status()["remote_waits"] == 3, what="b to wait on a's claim")
    assert not any(f.done() for f in followers)
    await getattr(a, outcome)("k1")

    async with asyncio.timeout(10):  # on the outcome, long before b's wait_timeout
        verdicts = await asyncio.gather(*followers)
    assert [v.value for v in verdicts] == [verdict] * 3


async def test_followers_on_the_same_instance_wait_in_process(make_store: Any) -> None:
    """Copies arriving at the instance that holds the claim wait on it in-process (no polling
    of Redis) and become duplicates once it commits."""
    a = await make_store()
    assert await a.claim("k1") is Verdict.CLAIMED

    followers = [asyncio.create_task(a.claim("k1")) for _ in range(5)]
    await asyncio.sleep(0)
    assert a.status()["remote_waits"] == 0
    await a.commit("k1")

    assert await asyncio.gather(*followers) == [Verdict.DUPLICATE] * 5


async def test_follower_gives_up_after_wait_timeout(make_store: Any) -> None:
    """When the first delivery never finishes, a follower answers FAILED after wait_timeout."""
    a = await make_store()
    b = await make_store(wait_timeout=0.2)
    assert await a.claim("k1") is Verdict.CLAIMED

    assert await b.claim("k1") is Verdict.FAILED


async def test_claim_of_a_crashed_owner_lapses_and_only_the_owner_settles_it(
    make_store: Any, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """An owner that never finishes loses its claims after the lease; once another instance
    holds those keys, the old owner's commit and release leave its claims alone."""
    k1, k2 = f"{redis_prefix}k1", f"{redis_prefix}k2"
    a = await make_store(lease=0.2)
    b = await make_store()
    assert await a.claim("k1") is Verdict.CLAIMED
    assert await a.claim("k2") is Verdict.CLAIMED
    await wait_for(lambda: _gone(raw_redis, k1, k2), timeout=5, what="the leases to lapse")

    assert await b.claim("k1") is Verdict.CLAIMED
    assert await b.claim("k2") is Verdict.CLAIMED
    b_owners = [await raw_redis.get(k1), await raw_redis.get(k2)]
    with capture_logs() as logs:
        await a.commit("k1")  # too late: b holds the key now
        await a.flush()
    await a.release("k2")

    assert [await raw_redis.get(k1), await raw_redis.get(k2)] == b_owners
    assert b_owners[0] != b_owners[1]
    assert [e["event"] for e in logs] == ["dedup.claim_lost"]
    await b.commit("k1")
    await b.release("k2")
    await b.flush()
    assert [await raw_redis.get(k1), await raw_redis.get(k2)] == [DELIVERED, None]


async def test_commit_after_the_lease_lapsed_still_marks_delivered(
    make_store: Any, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """An event made durable after its lease lapsed (nobody claimed it since) is still marked
    delivered: the retry is a duplicate."""
    a = await make_store(lease=0.1)
    assert await a.claim("k1") is Verdict.CLAIMED
    await wait_for(lambda: _gone(raw_redis, f"{redis_prefix}k1"), what="the lease to lapse")

    await a.commit("k1")
    await a.flush()

    assert await raw_redis.get(f"{redis_prefix}k1") == DELIVERED


async def test_operations_issued_together_are_applied_in_order(
    make_store: Any, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Claims, commits and releases issued in one event-loop turn go to Redis together and each
    gets its own answer, applied in the order issued: 50 claims at once; 25 commits and 25
    releases at once; then another instance finds 25 duplicates and claims 25; a release and a
    claim of the same key issued together leave the key claimed by the second."""
    a, b = await make_store(), await make_store()
    keys = [f"k{i}" for i in range(50)]
    rkeys = [f"{redis_prefix}{k}" for k in keys]

    assert await asyncio.gather(*(a.claim(k) for k in keys)) == [Verdict.CLAIMED] * 50
    held = await raw_redis.mget(rkeys)
    assert len(set(held)) == 50
    assert all(h and h.startswith(a._instance.encode()) for h in held)

    await asyncio.gather(*(a.commit(k) for k in keys[:25]), *(a.release(k) for k in keys[25:]))
    await a.flush()
    assert await raw_redis.mget(rkeys) == [DELIVERED] * 25 + [None] * 25

    verdicts = await asyncio.gather(*(b.claim(k) for k in keys))
    assert verdicts == [Verdict.DUPLICATE] * 25 + [Verdict.CLAIMED] * 25

    _, verdict = await asyncio.gather(b.release("k30"), a.claim("k30"))
    assert verdict is Verdict.CLAIMED
    assert (await raw_redis.get(rkeys[30])).startswith(a._instance.encode())


async def test_unreachable_redis_rejects_then_recovers(
    make_store: Any, fault_redis: FaultProxy
) -> None:
    """reject mode: with Redis cut off a claim raises StoreUnavailable at once and the store
    reports down; it probes with backoff and serves again once Redis is back."""
    store = await make_store(_proxied(fault_redis))
    assert await store.claim("k1") is Verdict.CLAIMED
    await store.commit("k1")
    await store.flush()

    fault_redis.cut()
    with pytest.raises(StoreUnavailable):
        await store.claim("k2")
    assert not store.up
    assert (store.readiness() or "").startswith("redis test unreachable: ConnectionError")
    with pytest.raises(StoreUnavailable):
        await store.claim("k3")  # down: refused without waiting on Redis
    await store.release("k2")  # never raises

    fault_redis.restore()
    await wait_for(lambda: store.up, what="the store to come back")
    assert store.readiness() is None
    assert await store.claim("k1") is Verdict.DUPLICATE
    assert await store.claim("k2") is Verdict.CLAIMED
    assert store.failures == 1


async def test_stalled_redis_fails_fast(make_store: Any, fault_redis: FaultProxy) -> None:
    """A Redis that stops answering (no RST, no FIN) fails the claim after dedup.redis_timeout,
    not after RETM has given up. A commit returns at once either way: when its mark cannot be
    written (timed out in flight, or the store known down) it is logged and the key remembered
    here, so the retry is still a duplicate on this instance."""
    store = await make_store(_proxied(fault_redis), timeout=0.3)
    assert await store.claim("k1") is Verdict.CLAIMED
    assert await store.claim("k2") is Verdict.CLAIMED

    fault_redis.stall()
    with capture_logs() as logs:
        await store.commit("k1")  # sent; Redis does not answer
        await store.flush()
    assert [e["event"] for e in logs] == ["dedup.store_down", "dedup.commit_failed"]
    assert not store.up
    fault_redis.restore()
    await wait_for(lambda: store.up, what="the store to come back")

    fault_redis.stall()
    with pytest.raises(StoreUnavailable, match="TimeoutError"):
        await store.claim("k3")
    with capture_logs() as logs:
        await store.commit("k2")  # known down: not sent
    assert [e["event"] for e in logs] == ["dedup.commit_failed"]
    assert await store.claim("k1") is Verdict.DUPLICATE
    assert await store.claim("k2") is Verdict.DUPLICATE

    fault_redis.restore()
    await wait_for(lambda: store.up, what="the store to come back")


async def test_local_mode_falls_back_to_memory_and_back(
    make_store: Any, fault_redis: FaultProxy, raw_redis: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """local mode: while Redis is cut off, claims are answered by the process's memory store
    (counted, logged once); once Redis is back, new keys go to Redis again and keys delivered
    meanwhile are still duplicates here."""
    store = await make_store(_proxied(fault_redis), on_store_failure="local")

    fault_redis.cut()
    with capture_logs() as logs:
        assert await store.claim("k1") is Verdict.CLAIMED
        follower = asyncio.create_task(store.claim("k1"))
        await asyncio.sleep(0)
        await store.commit("k1")
        assert await follower is Verdict.DUPLICATE
        assert await store.claim("k1") is Verdict.DUPLICATE
        assert await store.claim("k2") is Verdict.CLAIMED
        await store.release("k2")
    assert store.readiness() is None
    assert store.status()["state"] == "local_fallback"
    assert store.local_fallbacks == 3  # k1, its follower, k2 (k1's retry is a local duplicate)
    assert [e["event"] for e in logs].count("dedup.store_down") == 1

    fault_redis.restore()
    await wait_for(lambda: store.up, what="the store to come back")
    assert await store.claim("k1") is Verdict.DUPLICATE
    assert await store.claim("k2") is Verdict.CLAIMED
    await store.commit("k2")
    await store.flush()
    assert await raw_redis.get(f"{redis_prefix}k2") == DELIVERED
    assert await raw_redis.get(f"{redis_prefix}k1") is None
    assert store.local_fallbacks == 3


async def test_store_starts_while_redis_is_down(
    make_store: Any, private_redis: PrivateRedis
) -> None:
    """A relay may start before Redis: the store starts down and comes up when Redis does."""
    await private_redis.stop()
    store = await make_store(private_redis.url)
    assert not store.up
    with pytest.raises(StoreUnavailable):
        await store.claim("k1")

    await private_redis.start()
    await wait_for(lambda: store.up, what="the store to come up")
    assert await store.claim("k1") is Verdict.CLAIMED
    assert store.server_version.split(".")[0].isdigit()


@pytest.fixture
async def fault_redis() -> AsyncIterator[FaultProxy]:
    """A TCP proxy in front of the shared test Redis, to cut or stall the link to it."""
    proxy = await FaultProxy(int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])).start()
    yield proxy
    await proxy.close()


def _proxied(proxy: FaultProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}/{REDIS_URL.rsplit('/', 1)[1]}"


async def _gone(client: redis.asyncio.Redis, *keys: str) -> bool:
    return await client.exists(*keys) == 0
