"""Pure stages without I/O: routing, dedup keys and the memory store, token checks."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from relay.dedup.memory import MemoryDedupStore, Verdict, dedup_key
from relay.http.auth import TokenAuthenticator, token_digest
from relay.routing import Router, event_name, segment
from relay.settings import Secret, TokenSpec

# -- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("order.created", "order.created"),
        ("Order.Created", "order.created"),
        ("ORDER.REFUNDED", "order.refunded"),
        ("menu_changed", "menu_changed"),
        ("a-b.c_d.0", "a-b.c_d.0"),
        ("#", None),
        ("*", None),
        ("order.*", None),
        ("order.#", None),
        ("", None),
        (".", None),
        ("order.", None),
        ("order..created", None),
        ("order created", None),
        ("ordér.created", None),
        ("\u212a.created", None),  # KELVIN SIGN lower-cases to ASCII "k": still not ASCII input
        ("a" * 255, "a" * 255),
        ("a" * 256, None),
        (None, None),
        (1, None),
        (["order.created"], None),
    ],
)
def test_event_name(value: object, expected: str | None) -> None:
    """The body's ``event`` lower-cased when it is dotted words of [a-z0-9_-] within 255 bytes."""
    assert event_name(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("nakheelember", "nakheelember"),
        ("01JES4ZR1EZMA2GYK611H2KZ10", "01jes4zr1ezma2gyk611h2kz10"),
        ("a.b*c#d e", "a_b_c_d_e"),
        ("", "_"),
        (None, "_"),
        (4817, "4817"),
        (True, "_"),
        ("x" * 100, "x" * 64),
        ("مطعم", "____"),
    ],
)
def test_segment_is_sanitised(value: object, expected: str) -> None:
    """Business and branch segments can never add a dot, a wildcard or an empty segment."""
    assert segment(value) == expected


def test_router_template_and_limit() -> None:
    """The template fills {business} and {branch}; a key over 255 bytes falls back to the event."""
    router = Router("{event}.{business}.{branch}", "ex", {"order": "orders"})
    assert router.route("order.created", "biz", "br").routing_key == "order.created.biz.br"
    assert router.route("order.created", "biz", "br").exchange == "orders"
    assert router.route("customer.created", None, None).routing_key == "customer.created._._"
    assert router.route("customer.created", None, None).exchange == "ex"
    long_event = ".".join(["e" * 60] * 4)  # 243 bytes
    assert router.route(long_event, "b" * 64, "c").routing_key == long_event
    assert router.exchanges == ("ex", "orders")


# -- dedup keys --------------------------------------------------------------------------------


def test_dedup_key_uses_reference_or_body_hash() -> None:
    """``<principal>:<event>:<reference>``; no reference -> the body's SHA-256."""
    assert dedup_key("p", "order.created", {"reference": "r1"}, b"{}") == "p:order.created:r1"
    assert dedup_key("p", "e", {"reference": 4817}, b"{}") == "p:e:4817"
    hashed = dedup_key("p", "e", {"reference": ""}, b'{"reference":""}')
    assert hashed.startswith("p:e:sha256-") and len(hashed) == len("p:e:sha256-") + 64
    assert dedup_key("p", "e", {"reference": True}, b"{}") == dedup_key("p", "e", {}, b"{}")
    assert dedup_key("p", "e", {"id": "x"}, b"{}", ("reference", "id")) == "p:e:x"


def test_dedup_key_fits_a_message_id() -> None:
    """A long reference or event still gives a key of at most 255 bytes (AMQP shortstr)."""
    key = dedup_key("principal", "e" * 255, {"reference": "é" * 500}, b"{}")
    assert len(key.encode()) <= 255
    other = dedup_key("principal", "e" * 255, {"reference": "é" * 499}, b"{}")
    assert key != other


# -- memory dedup store ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_claim_commit_duplicate_and_release() -> None:
    """A committed key is a duplicate; a released key can be claimed again."""
    store = MemoryDedupStore(ttl=60, max_entries=10, clock=FakeClock())
    assert await store.claim("a") is Verdict.CLAIMED
    await store.commit("a")
    assert await store.claim("a") is Verdict.DUPLICATE
    assert await store.claim("b") is Verdict.CLAIMED
    await store.release("b")
    assert await store.claim("b") is Verdict.CLAIMED
    assert (len(store), store.in_flight) == (1, 1)


async def test_follower_waits_for_the_first_delivery() -> None:
    """A duplicate arriving while the first is in flight answers the way the first ends."""
    store = MemoryDedupStore(ttl=60, max_entries=10, clock=FakeClock())
    assert await store.claim("k") is Verdict.CLAIMED
    follower = asyncio.create_task(store.claim("k"))
    await asyncio.sleep(0)
    assert not follower.done()
    await store.commit("k")
    assert await follower is Verdict.DUPLICATE

    assert await store.claim("j") is Verdict.CLAIMED
    follower = asyncio.create_task(store.claim("j"))
    await asyncio.sleep(0)
    await store.release("j")
    assert await follower is Verdict.FAILED
    assert await store.claim("j") is Verdict.CLAIMED


async def test_follower_gives_up_after_wait_timeout() -> None:
    """A follower of a first delivery that never finishes answers FAILED after wait_timeout."""
    store = MemoryDedupStore(ttl=60, max_entries=10, clock=FakeClock(), wait_timeout=0.01)
    await store.claim("k")
    assert await store.claim("k") is Verdict.FAILED


async def test_ttl_expires_delivered_keys() -> None:
    """A key is a duplicate for ``ttl`` seconds (rounded up to whole seconds), then new again."""
    clock = FakeClock()
    store = MemoryDedupStore(ttl=60, max_entries=10, clock=clock)
    await store.claim("k")
    await store.commit("k")
    clock.now += 60
    assert await store.claim("k") is Verdict.DUPLICATE
    clock.now += 2
    assert await store.claim("k") is Verdict.CLAIMED
    await store.commit("k")
    assert len(store) == 1
    clock.now += 30
    assert await store.claim("k") is Verdict.DUPLICATE
    clock.now += 40
    await store.claim("other")
    await store.commit("other")  # trims the expired "k"
    assert len(store) == 1


async def test_max_entries_evicts_oldest_and_counts() -> None:
    """Beyond max_entries the oldest delivered keys are evicted, and counted."""
    store = MemoryDedupStore(ttl=60, max_entries=3, clock=FakeClock())
    for key in "abcde":
        await store.claim(key)
        await store.commit(key)
    assert len(store) == 3
    assert store.evictions == 2
    assert await store.claim("a") is Verdict.CLAIMED
    assert await store.claim("e") is Verdict.DUPLICATE


async def test_recommitted_key_survives_eviction_of_its_old_slot() -> None:
    """A key committed again after it expired keeps its new lifetime when the old slot is
    trimmed from the front."""
    clock = FakeClock()
    store = MemoryDedupStore(ttl=10, max_entries=2, clock=clock)
    await store.claim("k")
    await store.commit("k")
    clock.now += 20
    await store.claim("k")
    await store.commit("k")  # old slot of "k" is stale now
    await store.claim("x")
    await store.commit("x")
    assert await store.claim("k") is Verdict.DUPLICATE
    assert len(store) == 2
    assert store.evictions == 0


async def test_restore_and_on_commit() -> None:
    """on_commit sees (digest, expiry) of each commit; restore loads the live ones."""
    clock = FakeClock()
    persisted: list[tuple[bytes, int]] = []
    store = MemoryDedupStore(
        ttl=60, max_entries=10, clock=clock, on_commit=lambda d, e: persisted.append((d, e))
    )
    await store.claim("k")
    await store.commit("k")
    assert len(persisted) == 1 and persisted[0][1] >= clock.now + 60

    fresh = MemoryDedupStore(ttl=60, max_entries=10, clock=clock)
    assert fresh.restore([*persisted, (b"\0" * 16, int(clock.now) - 1)]) == 1
    assert await fresh.claim("k") is Verdict.DUPLICATE


def test_memory_per_delivered_key_is_bounded() -> None:
    """100,000 delivered keys cost at most 160 bytes each (1,000,000 keys stay under 160 MB)."""
    store = MemoryDedupStore(ttl=3600, max_entries=1_000_000, clock=FakeClock())
    keys = [f"token-0123abcd:order.created:{i:08d}-4d25-a87b-7a4211ff94e6" for i in range(100_000)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for key in keys:
        store.commit_now(key)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(store) == 100_000
    assert (after - before) / 100_000 <= 160


# -- auth --------------------------------------------------------------------------------------


def test_authenticator() -> None:
    """Tokens match exactly; the principal is the bound business or a token fingerprint."""
    auth = TokenAuthenticator(
        [TokenSpec(Secret("plain-token")), TokenSpec(Secret("bound-token"), "nakheelember")]
    )
    plain = auth.authenticate("Bearer plain-token")
    bound = auth.authenticate("bearer   bound-token")
    assert not isinstance(plain, str) and not isinstance(bound, str)
    assert plain.id == f"token-{token_digest('plain-token').hex()[:8]}"
    assert plain.business is None
    assert (bound.id, bound.business) == ("nakheelember", "nakheelember")
    assert auth.authenticate(None) == "missing"
    assert auth.authenticate("") == "missing"
    assert auth.authenticate("Bearer") == "malformed"
    assert auth.authenticate("Basic plain-token") == "malformed"
    assert auth.authenticate("Bearer plain-token extra") == "malformed"
    assert auth.authenticate("Bearer plain-tokeN") == "invalid"
    assert auth.authenticate("Bearer \udcff\udcfe") == "invalid"
    auth.remove_digest(token_digest("plain-token"))
    assert auth.authenticate("Bearer plain-token") == "invalid"


def test_secret_repr_is_masked() -> None:
    """A secret never shows in repr or str, so it cannot leak into a log line."""
    spec = TokenSpec(Secret("s3cr3t-value"), "biz")
    assert "s3cr3t" not in repr(spec)
    assert "s3cr3t" not in str(Secret("s3cr3t-value"))
