"""Environment variables override keys that the TOML file also sets (as the README promises and
``make run`` relies on: the example file sets ``auth.tokens = []``, the Makefile sets
``RELAY_AUTH_TOKENS_FILE``)."""

from __future__ import annotations

from pathlib import Path

from relay.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_environment_overrides_a_key_the_file_sets(tmp_path: Path) -> None:
    """``RELAY_AMQP_PUBLISH_TIMEOUT`` wins over the file's ``amqp.publish_timeout``."""
    config = tmp_path / "relay.toml"
    config.write_text("[amqp]\npublish_timeout = 5.0\n")

    settings = load_settings(config, {"RELAY_AMQP_PUBLISH_TIMEOUT": "2.5"})

    assert settings.amqp.publish_timeout == 2.5


def test_token_file_overrides_the_example_configuration(tmp_path: Path) -> None:
    """``make run``: the example configuration with ``RELAY_AUTH_TOKENS_FILE``."""
    token_file = tmp_path / "dev-token"
    token_file.write_text("dev-token-value\n")

    settings = load_settings(
        ROOT / "config" / "relay.example.toml", {"RELAY_AUTH_TOKENS_FILE": str(token_file)}
    )

    assert [spec.token.value for spec in settings.auth.tokens] == ["dev-token-value"]
