"""The install and loyalty flows' pure parts: settings checks, token records and stores, the
authenticator's expiry, the install body check, reply parsing and the redeem answer cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from relay.amqp.rpc import NoAnswer, Reply, parse_reply
from relay.errors import ConfigError
from relay.http.auth import TokenAuthenticator, token_digest
from relay.ingest import Rejection
from relay.retm.install import check_install
from relay.retm.loyalty import MemoryReplyCache
from relay.retm.tokens import (
    SqliteTokenStore,
    TokenRecord,
    TokenStoreError,
    make_token,
    rotated,
    select,
)
from relay.settings import describe, load_settings


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"RELAY_LOYALTY_TIMEOUT": "10"}, "loyalty.timeout"),
        ({"RELAY_LOYALTY_TIMEOUT": "0"}, "loyalty.timeout"),
        ({"RELAY_LOYALTY_FALLBACK_BODY": "{"}, "loyalty.fallback_body"),
        ({"RELAY_LOYALTY_FALLBACK_STATUS": "99"}, "loyalty.fallback_status"),
        ({"RELAY_LOYALTY_CHECK_REWARD_PATH": "/retm/events"}, "loyalty.check_reward_path"),
        (
            {"RELAY_INSTALL_ENABLED": "true", "RELAY_INSTALL_PATH": "/retm/errors"},
            "install.path",
        ),
        ({"RELAY_INSTALL_PATH": "no-slash"}, "install.path"),
        ({"RELAY_INSTALL_SETTINGS_URL": "ftp://example.com/x"}, "install.settings_url"),
        ({"RELAY_INSTALL_TOKEN_GRACE": "-1"}, "install.token_grace"),
        ({"RELAY_INSTALL_STORE": "disk"}, "install.store"),
        ({"RELAY_INSTALL_REQUIRE_DATA": "state"}, "install.require_data"),
    ],
)
def test_bad_flow_settings_name_their_key(environ: dict[str, str], key: str) -> None:
    """Every bad install/loyalty value stops the start with the key named."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ)
    assert info.value.key == key


def test_install_capabilities_are_masked(tmp_path: Path) -> None:
    """The install path and the required data are secrets: masked in check-config and repr;
    they can come from files (systemd credentials), one pair per line."""
    secret_file = tmp_path / "require"
    secret_file.write_text("state=s3cret-state\npartner=acme\n")
    settings = load_settings(
        None,
        {
            "RELAY_INSTALL_ENABLED": "true",
            "RELAY_INSTALL_PATH": "/retm/install/unguessable-part",
            "RELAY_INSTALL_REQUIRE_DATA_FILE": str(secret_file),
        },
    )
    assert settings.install.require_data == {"state": "s3cret-state", "partner": "acme"}
    shown = describe(settings)["install"]
    assert shown["path"] == "/retm/install/********"
    assert shown["require_data"] == {"state": "********", "partner": "********"}
    assert "s3cret" not in repr(settings)
    assert "unguessable" not in repr(settings)


def test_expired_token_is_refused_on_the_clock() -> None:
    """A token with an expiry is accepted before it and refused from it on."""
    clock = Clock()
    auth = TokenAuthenticator(clock=clock)
    auth.add_digest(token_digest("tok"), "biz", expires_at=clock.now + 10)
    principal = auth.authenticate("Bearer tok")
    assert not isinstance(principal, str)
    assert principal.id == "biz"
    assert principal.business == "biz"
    clock.now += 10
    assert auth.authenticate("Bearer tok") == "invalid"


def _record(business: str, created: float, expires: float | None = None) -> TokenRecord:
    return TokenRecord(token_digest(f"{business}{created}"), business, created, expires, "cli")


def test_rotation_expires_only_that_business_later_tokens() -> None:
    """rotated() sets the grace end on the business's tokens that would outlive it."""
    keep = _record("a", 1, expires=50)
    active = _record("a", 2)
    late = _record("a", 3, expires=500)
    other = _record("b", 4)
    changed = rotated([keep, active, late, other], "a", 100)
    assert [(r.digest, r.expires_at) for r in changed] == [
        (active.digest, 100),
        (late.digest, 100),
    ]


def test_select_by_fingerprint_or_business() -> None:
    """A CLI selector is a digest prefix (8+ hex) or a business; naming none is an error."""
    a1, a2, b1 = _record("a", 1), _record("a", 2), _record("b", 3)
    assert select([a1, a2, b1], a2.fingerprint) == [a2]
    assert select([a1, a2, b1], "a") == [a1, a2]
    with pytest.raises(TokenStoreError):
        select([a1], "deadbeef")
    with pytest.raises(TokenStoreError):
        select([a1], "nobody")


async def test_sqlite_store_sees_another_writer(tmp_path: Path) -> None:
    """The daemon's connection sees the CLI's commits through a new data_version; a rotation
    expires the older token in the same transaction; removal deletes."""
    daemon, cli = SqliteTokenStore(tmp_path), SqliteTokenStore(tmp_path)
    try:
        assert await daemon.load() == []
        before = await daemon.version()
        _, first = make_token("biz", "cli", 1000.0)
        assert await cli.add(first, None) == []
        assert await daemon.version() != before
        _, second = make_token("biz", "install", 1001.0)
        changed = await cli.add(second, 1601.0)
        assert [(r.digest, r.expires_at) for r in changed] == [(first.digest, 1601.0)]
        loaded = await daemon.load()
        assert [(r.digest, r.expires_at, r.source) for r in loaded] == [
            (first.digest, 1601.0, "cli"),
            (second.digest, None, "install"),
        ]
        await cli.remove([first.digest])
        assert [r.digest for r in await daemon.load()] == [second.digest]
        assert (tmp_path / "tokens.sqlite3").stat().st_mode & 0o077 == 0
    finally:
        await daemon.close()
        await cli.close()


def test_install_body_checks() -> None:
    """business_id and code are required and shaped; data must hold the required values."""
    required = {"state": "b7f1c2"}
    good = {"code": "abc", "business_id": "nakheelember", "data": {"state": "b7f1c2", "x": 1}}
    assert check_install(good, required) == "nakheelember"
    assert check_install({"code": "c", "business_id": "b"}, {}) == "b"
    cases: list[tuple[dict[str, Any], int]] = [
        ({**good, "code": ""}, 400),
        ({**good, "code": 5}, 400),
        ({**good, "business_id": "a/b"}, 400),
        ({**good, "business_id": "x" * 65}, 400),
        ({**good, "data": []}, 400),
        ({**good, "data": {"state": "B7F1C2"}}, 403),
        ({**good, "data": {"state": None}}, 403),
        ({**good, "data": {}}, 403),
    ]
    for body, status in cases:
        with pytest.raises(Rejection) as info:
            check_install(body, required)
        assert info.value.status == status, body
    assert check_install({**good, "data": {"n": 7}}, {"n": "7"}) == "nakheelember"


def _message(body: bytes, headers: dict[str, Any] | None) -> Any:
    return SimpleNamespace(
        header=SimpleNamespace(properties=SimpleNamespace(headers=headers)), body=body
    )


def test_parse_reply_status_and_body() -> None:
    """x-http-status (int, digits or bytes) sets the status, 200 by default; a non-JSON body
    or a status outside 200-599 is a bad reply."""
    assert parse_reply(_message(b"{}", None)) == Reply(200, b"{}")
    assert parse_reply(_message(b"[]", {"x-http-status": 400})) == Reply(400, b"[]")
    assert parse_reply(_message(b"{}", {"x-http-status": "201"})) == Reply(201, b"{}")
    assert parse_reply(_message(b"{}", {"x-http-status": b"422"})) == Reply(422, b"{}")
    for body, headers in (
        (b"not json", None),
        (b"", None),
        (b"{}", {"x-http-status": "abc"}),
        (b"{}", {"x-http-status": 99}),
        (b"{}", {"x-http-status": True}),
    ):
        with pytest.raises(NoAnswer) as info:
            parse_reply(_message(body, headers))
        assert info.value.reason == "bad_reply"


async def test_reply_cache_ttl_and_bound() -> None:
    """Redeem answers live for the TTL on the clock and at most max_entries of them."""
    clock = Clock()
    cache = MemoryReplyCache(ttl=60, max_entries=2, clock=clock)
    await cache.put("a", Reply(200, b"a"))
    await cache.put("b", Reply(200, b"b"))
    await cache.put("c", Reply(400, b"c"))
    assert len(cache) == 2
    assert await cache.get("a") is None
    assert await cache.get("c") == Reply(400, b"c")
    clock.now += 60
    assert await cache.get("b") is None
    assert await cache.get("c") is None
    assert len(cache) == 0


@pytest.mark.parametrize(
    "path", ["/retm/install", "/retm/install/short", "/retm/install/abcdefghijklmno"]
)
def test_install_enabled_refuses_a_guessable_path(path: str) -> None:
    """With install.enabled, whoever reaches the route mints tokens: a path without a random
    segment of 16+ characters stops the start, naming install.path."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"RELAY_INSTALL_ENABLED": "true", "RELAY_INSTALL_PATH": path})
    assert caught.value.key == "install.path"
    assert load_settings(None, {"RELAY_INSTALL_PATH": path}).install.path == path
