"""``dedup.redis_url``: one server, a Sentinel set or a Redis Cluster (relay/redis_url.py),
checked when the settings load, and never shown with its password."""

from __future__ import annotations

import pytest

from relay.errors import ConfigError
from relay.redis_url import RedisTarget, parse_redis_url
from relay.settings import describe, load_settings


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    target = parse_redis_url(
        "rediss+sentinel://relay:s3cret@10.0.0.1:26380,10.0.0.2,[::1]:26381/mymaster/2"
        "?sentinel_auth=true&ssl_ca_certs=/etc/ca.pem"
    )

    assert target == RedisTarget(
        "sentinel",
        target.url,
        (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("::1", 26381)),
        "mymaster",
        2,
        "relay",
        "s3cret",
        True,
        {"ssl_ca_certs": "/etc/ca.pem"},
        True,
    )
    assert target.address == "sentinel 10.0.0.1:26380,10.0.0.2:26379,::1:26381/mymaster/2"


def test_a_cluster_url_names_its_nodes() -> None:
    target = parse_redis_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/")

    assert (target.kind, target.hosts, target.password, target.tls, target.db) == (
        "cluster",
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        "pw",
        False,
        0,
    )
    assert target.address == "cluster 10.0.0.1:7000,10.0.0.2:7001"


def test_a_single_server_is_left_to_redis_py() -> None:
    assert parse_redis_url("redis://:pw@127.0.0.1:6380/3").address == "127.0.0.1:6380/3"
    assert parse_redis_url("unix:///run/redis.sock").address == "/run/redis.sock"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h/", "must start with redis://, rediss://, unix://, redis+sentinel://"),
        ("redis+sentinel://h1:26379,h2:26379", "must end with /SERVICE or /SERVICE/DB"),
        ("redis+sentinel://h1/svc/x", "the database must be a number, not 'x'"),
        ("redis+sentinel://:pw@h1:99999/svc", "invalid port '99999' of h1"),
        ("redis+cluster://h1:7000/3", "a Redis Cluster has database 0 only"),
        ("redis+cluster:///", "must name at least one host:port"),
        ("redis+cluster://h1?password=x", "unknown query parameter 'password'"),
    ],
)
def test_bad_urls_are_refused_when_the_settings_load(url: str, message: str) -> None:
    """The error names dedup.redis_url and what is wrong, never the password."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"RELAY_DEDUP_REDIS_URL": url})

    assert caught.value.key == "dedup.redis_url"
    assert message in str(caught.value)
    assert "pw" not in str(caught.value)


def test_check_config_masks_the_password_of_a_sentinel_url() -> None:
    settings = load_settings(
        None, {"RELAY_DEDUP_REDIS_URL": "redis+sentinel://:s3cret@h1:26379,h2:26379/svc/0"}
    )

    assert describe(settings)["dedup"]["redis_url"] == (
        "redis+sentinel://:********@h1:26379,h2:26379/svc/0"
    )
