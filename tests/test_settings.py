"""Settings: defaults < TOML < RELAY_* variables, validated once, errors naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.settings import (
    Secret,
    Settings,
    TokenSpec,
    describe,
    load_settings,
    resolve_config_path,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_contract() -> None:
    """With no file and no variables, the documented defaults apply."""
    s = load_settings(None, {})
    assert (s.http.host, s.http.port, s.http.max_body_bytes) == ("127.0.0.1", 8080, 1_048_576)
    assert s.auth.tokens == ()
    assert s.amqp.url.value == "amqp://guest:guest@127.0.0.1:5672/"
    assert (s.amqp.exchange, s.amqp.unrouted_exchange) == ("retm.events", "retm.unrouted")
    assert s.amqp.rejected_exchange == "retm.rejected"
    assert s.dedup.hash_ttl == 3600.0
    assert s.amqp.publish_timeout == 5.0
    assert (s.dedup.backend, s.dedup.ttl, s.dedup.max_entries) == ("memory", 86400.0, 1_000_000)
    assert s.dedup.redis_url.value == "redis://127.0.0.1:6379/0"
    assert s.state.dir == Path("var")
    assert (s.log.level, s.log.format) == ("info", "auto")


def test_example_configuration_is_valid_and_matches_the_defaults() -> None:
    """config/relay.example.toml loads, every value in it is the built-in default, and every
    key of every section is documented in it (set, or commented out with its default)."""
    path = ROOT / "config" / "relay.example.toml"
    example = load_settings(path, {})
    assert dataclasses.replace(example, source="defaults") == load_settings(None, {})
    text = path.read_text()
    for section in dataclasses.fields(Settings):
        if section.name == "source":
            continue
        assert f"[{section.name}]" in text
        for f in dataclasses.fields(getattr(example, section.name)):
            assert re.search(rf"^#? ?{f.name} = ", text, re.MULTILINE), f"{section.name}.{f.name}"


def test_environment_overrides_toml(tmp_path: Path) -> None:
    """RELAY_<SECTION>_<KEY> beats the file, which beats the defaults."""
    path = tmp_path / "relay.toml"
    path.write_text(
        # a public address needs TLS or a trusted proxy in front (plain HTTP is refused)
        '[http]\nport = 9000\nhost = "0.0.0.0"\ntrusted_proxies = ["10.0.0.1"]\n'
        '[amqp]\nexchange = "from.toml"\n'
        'publish_timeout = 3\n[auth]\ntokens = ["t1", {token = "t2", business = "biz"}]\n'
    )
    s = load_settings(
        path,
        {"RELAY_HTTP_PORT": "9001", "RELAY_AMQP_PASSIVE": "yes", "RELAY_DEDUP_KEY_FIELDS": "a, b"},
    )
    assert (s.http.port, s.http.host) == (9001, "0.0.0.0")
    assert (s.amqp.exchange, s.amqp.publish_timeout, s.amqp.passive) == ("from.toml", 3.0, True)
    assert s.auth.tokens == (TokenSpec(Secret("t1")), TokenSpec(Secret("t2"), "biz"))
    assert s.dedup.key_fields == ("a", "b")
    assert s.source == str(path)


def test_tokens_from_environment_and_file(tmp_path: Path) -> None:
    """RELAY_AUTH_TOKENS is comma-separated with optional ``business:``; the _FILE form reads
    one or more per line and skips comments."""
    s = load_settings(None, {"RELAY_AUTH_TOKENS": "a, nakheelember:b ,"})
    assert s.auth.tokens == (TokenSpec(Secret("a")), TokenSpec(Secret("b"), "nakheelember"))
    secret_file = tmp_path / "tokens"
    secret_file.write_text("# rotated 2026-11\nold-token\nbiz:new-token\n")
    s = load_settings(None, {"RELAY_AUTH_TOKENS_FILE": str(secret_file)})
    assert s.auth.tokens == (TokenSpec(Secret("old-token")), TokenSpec(Secret("new-token"), "biz"))


def test_state_directory_from_systemd() -> None:
    """state.dir defaults to $STATE_DIRECTORY (the first entry) when systemd sets it."""
    s = load_settings(None, {"STATE_DIRECTORY": "/var/lib/retm-relay:/var/lib/other"})
    assert s.state.dir == Path("/var/lib/retm-relay")
    s = load_settings(None, {"STATE_DIRECTORY": "/x", "RELAY_STATE_DIR": "/y"})
    assert s.state.dir == Path("/y")


@pytest.mark.parametrize(
    ("environ", "toml", "key"),
    [
        ({"RELAY_HTTP_PORT": "eighty"}, "", "http.port"),
        ({"RELAY_HTTP_PORT": "70000"}, "", "http.port"),
        ({"RELAY_AMQP_PUBLISH_TIMEOUT": "10"}, "", "amqp.publish_timeout"),
        ({"RELAY_AMQP_PUBLISH_TIMEOUT": "0"}, "", "amqp.publish_timeout"),
        ({"RELAY_AMQP_URL": "http://x"}, "", "amqp.url"),
        ({"RELAY_AMQP_EXCHANGE": "amq.topic"}, "", "amqp.exchange"),
        ({"RELAY_AMQP_UNROUTED_EXCHANGE": "retm.events"}, "", "amqp.unrouted_exchange"),
        ({"RELAY_AMQP_REJECTED_EXCHANGE": "retm.unrouted"}, "", "amqp.rejected_exchange"),
        ({"RELAY_AMQP_REJECTED_EXCHANGE": "amq.fanout"}, "", "amqp.rejected_exchange"),
        ({"RELAY_DEDUP_HASH_TTL": "0"}, "", "dedup.hash_ttl"),
        ({"RELAY_AMQP_ROUTING_KEY_TEMPLATE": "{business}"}, "", "amqp.routing_key_template"),
        ({"RELAY_AMQP_ROUTING_KEY_TEMPLATE": "{event}.{tenant}"}, "", "amqp.routing_key_template"),
        ({"RELAY_AMQP_PASSIVE": "maybe"}, "", "amqp.passive"),
        ({"RELAY_DEDUP_BACKEND": "memcached"}, "", "dedup.backend"),
        ({"RELAY_DEDUP_TTL": "-1"}, "", "dedup.ttl"),
        ({"RELAY_LOG_LEVEL": "verbose"}, "", "log.level"),
        ({"RELAY_AMQP_URLL": "amqp://x"}, "", "RELAY_AMQP_URLL"),
        ({"RELAY_AUTH_TOKENS": "bad token"}, "", "auth.tokens"),
        ({}, "[http]\nport = 8080.5\n", "http.port"),
        ({}, "[http]\nprot = 1\n", "http.prot"),
        ({}, "[htp]\n", "htp"),
        ({}, '[amqp]\npublish_timeout = "5"\n', "amqp.publish_timeout"),
        ({}, "[auth]\ntokens = [1]\n", "auth.tokens"),
        ({}, "[http\n", "config"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, environ: dict[str, str], toml: str, key: str
) -> None:
    """Each bad value raises ConfigError naming the key, and never echoes a secret."""
    path = None
    if toml:
        path = tmp_path / "relay.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ)
    assert caught.value.key == key
    assert "bad token" not in str(caught.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """An explicit --config that does not exist is an error, not silent defaults."""
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", {})


def test_config_path_resolution(tmp_path: Path) -> None:
    """--config, else $RELAY_CONFIG, else the system path when present, else defaults."""
    assert resolve_config_path("a.toml", {"RELAY_CONFIG": "b.toml"}) == Path("a.toml")
    assert resolve_config_path(None, {"RELAY_CONFIG": "b.toml"}) == Path("b.toml")


def test_describe_masks_secrets() -> None:
    """The printable settings never contain a token or a password."""
    s = load_settings(
        None,
        {"RELAY_AUTH_TOKENS": "tok-secret", "RELAY_AMQP_URL": "amqp://u:pw-secret@h:5672/"},
    )
    text = repr(describe(s)) + repr(s)
    assert "tok-secret" not in text
    assert "pw-secret" not in text


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    """``check-config`` exits 0 on a good configuration and 2 naming the bad key."""
    good = _run_cli("check-config", "--config", "config/relay.example.toml", env={})
    assert good.returncode == 0, good.stderr
    assert "configuration ok (config/relay.example.toml)" in good.stdout

    bad = _run_cli("check-config", env={"RELAY_AMQP_PUBLISH_TIMEOUT": "30"})
    assert bad.returncode == 2
    assert "amqp.publish_timeout" in bad.stderr

    shown = _run_cli("check-config", "--show", env={"RELAY_AUTH_TOKENS": "never-print-me"})
    assert shown.returncode == 0
    assert "never-print-me" not in shown.stdout + shown.stderr
    assert '"token": "********"' in shown.stdout


def test_usage_errors_exit_2() -> None:
    """An unknown command or option is a usage error: exit 2."""
    assert _run_cli("frobnicate", env={}).returncode == 2
    assert _run_cli("serve", "--bogus", env={}).returncode == 2


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_a_number_that_is_not_finite_is_refused(value: str, tmp_path: Path) -> None:
    """``inf`` and ``nan`` (spelled so in TOML and in the environment alike) are refused for
    every number setting, naming the key, rather than accepted and failing on first use (an
    infinite ``dedup.ttl`` overflowed on the first webhook)."""
    with pytest.raises(ConfigError) as from_environ:
        load_settings(None, {"RELAY_DEDUP_TTL": value})
    config = tmp_path / "relay.toml"
    config.write_text(f"[dedup]\nhash_ttl = {value}\n")
    with pytest.raises(ConfigError) as from_file:
        load_settings(config, {})

    assert str(from_environ.value) == "dedup.ttl: must be a finite number"
    assert str(from_file.value) == "dedup.hash_ttl: must be a finite number"
