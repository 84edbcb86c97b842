"""The token bucket and the address helpers, without I/O: time is a settable clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.http.access import Networks, client_address, forwarded_scheme, parse_ip, rate_key
from relay.http.ratelimit import RateLimiter, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_steady_rate() -> None:
    """A fresh source may send ``burst`` requests at once, then one per 1/rate seconds."""
    clock = Clock()
    limiter = RateLimiter(2.0, 3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)  # refused requests take no token
    clock.now += 0.25
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)


def test_bucket_refills_to_burst_only() -> None:
    """A long pause gives back at most ``burst`` tokens."""
    clock = Clock()
    limiter = RateLimiter(1.0, 2, clock=clock)
    limiter.acquire("a")
    clock.now += 3600
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_sources_have_their_own_buckets() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0


def test_refusals_count_a_streak_for_logging_once() -> None:
    """``refusals`` is 1 on the first refusal of a streak and resets after an accepted one."""
    clock = Clock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    limiter.acquire("a")
    limiter.acquire("a")
    assert limiter.refusals("a") == 1
    limiter.acquire("a")
    assert limiter.refusals("a") == 2
    clock.now += 1
    limiter.acquire("a")
    assert limiter.refusals("a") == 0
    assert limiter.refusals("never-seen") == 0


def test_memory_is_bounded_by_forgetting_the_least_recently_seen() -> None:
    """Past ``max_sources`` the least recently seen source is forgotten (and starts full)."""
    clock = Clock()
    limiter = RateLimiter(0.001, 1, max_sources=3, clock=clock)
    for source in ("a", "b", "c"):
        assert limiter.acquire(source) == 0.0
    assert limiter.acquire("a") > 0  # "a" is now the most recently seen
    assert limiter.acquire("d") == 0.0  # evicts "b"
    assert (len(limiter), limiter.evictions) == (3, 1)
    assert limiter.acquire("c") > 0  # still limited: not evicted
    assert limiter.acquire("b") == 0.0  # forgotten, so full again (evicts "a")
    assert limiter.acquire("a") == 0.0
    assert len(limiter) == 3


@given(st.lists(st.text(min_size=1, max_size=4), max_size=300))
def test_never_more_buckets_than_max_sources(sources: list[str]) -> None:
    limiter = RateLimiter(1.0, 1, max_sources=16, clock=Clock())
    for source in sources:
        limiter.acquire(source)
        assert len(limiter) <= 16


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.001, "1"), (1.0, "1"), (1.2, "2"), (999.5, "1000")]
)
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(0, 1)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1, 0)


def test_addresses_parse_and_ipv4_mapped_ipv6_counts_as_ipv4() -> None:
    """A dual-stack listener sees IPv4 clients as ``::ffff:a.b.c.d``; they match IPv4 lists."""
    assert str(parse_ip("::ffff:192.0.2.1")) == "192.0.2.1"
    assert parse_ip("unknown") is None
    assert parse_ip("192.0.2.1:443") is None
    networks = Networks(["192.0.2.0/24", "2001:db8::/32"])
    assert "::ffff:192.0.2.77" in networks
    assert "192.0.2.77" in networks
    assert "2001:db8::1" in networks
    assert "192.0.3.1" not in networks
    assert "not-an-address" not in networks
    assert not Networks([])


def test_client_address_walks_x_forwarded_for_from_the_right() -> None:
    trusted = Networks(["127.0.0.1", "10.0.0.0/8"])
    assert client_address("127.0.0.1", ["203.0.113.1, 10.0.0.2"], trusted) == "203.0.113.1"
    assert client_address("127.0.0.1", ["198.51.100.9", "203.0.113.1"], trusted) == "203.0.113.1"
    assert client_address("192.0.2.5", ["203.0.113.1"], trusted) == "192.0.2.5"
    assert client_address("::ffff:127.0.0.1", [" 2001:db8::7 "], trusted) == "2001:db8::7"
    assert client_address("127.0.0.1", [], trusted) == "127.0.0.1"
    assert client_address(None, ["203.0.113.1"], trusted) == ""


def test_forwarded_scheme_takes_the_last_value() -> None:
    assert forwarded_scheme(["https"]) == "https"
    assert forwarded_scheme(["http, HTTPS"]) == "https"
    assert forwarded_scheme(["gopher"]) is None
    assert forwarded_scheme([]) is None


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    """One host usually holds a whole /64; counting per address would let it rotate freely."""
    assert (
        rate_key("2001:db8:1:2:aaaa::1") == rate_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    )
    assert rate_key("2001:db8:1:3::1") != rate_key("2001:db8:1:2::1")
    assert rate_key("192.0.2.1") == "192.0.2.1"
