"""``retm-relay send``: the operator's smoke test against a real relay and RabbitMQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.http.auth import token_digest
from tests.cli import cli_environ, closed_port, run_cli
from tests.conftest import (
    FIXTURES,
    TOKEN,
    Broker,
    Names,
    RunningRelay,
    assert_only_sentinel_follows,
    fixture_bytes,
)

PRINCIPAL = f"token-{token_digest(TOKEN).hex()[:8]}"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def send_environ(config: Path, relay: RunningRelay, **overrides: str) -> dict[str, str]:
    """The relay's own settings, as an operator's shell would have them."""
    port = str(relay.relay.addresses[0][1])
    return cli_environ(config, RELAY_HTTP_PORT=port, RELAY_AUTH_TOKENS=TOKEN, **overrides)


async def test_send_posts_a_file_and_prints_the_answer(
    relay: RunningRelay, broker: Broker, names: Names, config: Path
) -> None:
    """``send FILE`` posts the body to http://<http.host>:<http.port><events_path> with the first
    configured token, prints ``200 <answer>`` and exits 0; the body arrives byte for byte."""
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("order.created.json")
    reference = json.loads(raw)["reference"]

    result = await run_cli(
        "send", str(FIXTURES / "order.created.json"), env=send_environ(config, relay)
    )

    assert result.code == 0, result
    key = f"{PRINCIPAL}:order.created:{reference}"
    expected = {"status": "accepted", "id": key, "routing_key": "order.created"}
    assert result.stdout == f"200 {json.dumps(expected, separators=(',', ':'))}\n"
    assert result.stderr == ""
    message = await tap.get()
    assert message.body == raw
    assert message.message_id == key
    assert TOKEN not in result.stdout + result.stderr


async def test_send_reads_stdin_and_posts_to_the_error_webhook(
    relay: RunningRelay, broker: Broker, names: Names, config: Path
) -> None:
    """``send --errors -`` posts standard input to http.errors_path: published as
    ``delivery.error``."""
    tap = await broker.tap(names.exchange, "delivery.error")
    raw = fixture_bytes("error.webhook.json")

    result = await run_cli("send", "--errors", "-", env=send_environ(config, relay), stdin=raw)

    assert result.code == 0, result
    status, answer = result.stdout.rstrip("\n").split(" ", 1)
    assert status == "200"
    assert json.loads(answer)["routing_key"] == "delivery.error"
    message = await tap.get()
    assert (message.routing_key, message.body) == ("delivery.error", raw)


async def test_send_several_files_prints_one_line_each(
    relay: RunningRelay, broker: Broker, names: Names, config: Path
) -> None:
    """Several FILEs: one ``FILE: status answer`` line each, in order; the same body twice is
    RETM's retry, answered ``duplicate`` and published once."""
    tap = await broker.tap(names.exchange)
    order = str(FIXTURES / "order.created.json")
    customer = str(FIXTURES / "customer.created.json")

    result = await run_cli("send", order, customer, order, env=send_environ(config, relay))

    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [order, customer, order]
    statuses = [json.loads(line.split(" 200 ", 1)[1])["status"] for line in lines]
    assert statuses == ["accepted", "accepted", "duplicate"]
    assert [m.body for m in await tap.take(2)] == [
        fixture_bytes("order.created.json"),
        fixture_bytes("customer.created.json"),
    ]
    await assert_only_sentinel_follows(relay, tap)


async def test_send_with_a_wrong_token_prints_401_and_fails(
    relay: RunningRelay, broker: Broker, names: Names, config: Path
) -> None:
    """A token the relay does not accept: the 401 answer is printed, exit 1, nothing published,
    and the token given appears nowhere in the output."""
    tap = await broker.tap(names.exchange)
    wrong = "not-the-right-token-42"

    result = await run_cli(
        "send",
        "--token",
        wrong,
        str(FIXTURES / "order.created.json"),
        env=send_environ(config, relay),
    )

    assert result.code == 1
    assert result.stdout == (
        '401 {"error":"unauthorized","detail":"the Bearer token is not valid"}\n'
    )
    assert wrong not in result.stdout + result.stderr
    await assert_only_sentinel_follows(relay, tap)


async def test_send_to_a_relay_that_does_not_answer_exits_1(config: Path) -> None:
    """Nothing listens at the relay's address: exit 1 naming the URL."""
    port = closed_port()
    env = cli_environ(config, RELAY_HTTP_PORT=str(port), RELAY_AUTH_TOKENS=TOKEN)

    result = await run_cli("send", str(FIXTURES / "order.created.json"), env=env)

    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"retm-relay send: the relay does not answer at http://127.0.0.1:{port}/retm/events: "
    )
    assert TOKEN not in result.stderr


async def test_send_without_a_token_or_file_is_a_usage_error(config: Path) -> None:
    """No token configured, or an unreadable file: exit 2 before anything is sent."""
    no_token = await run_cli("send", str(FIXTURES / "order.created.json"), env=cli_environ(config))
    missing = await run_cli(
        "send", "/nonexistent/body.json", env=cli_environ(config, RELAY_AUTH_TOKENS=TOKEN)
    )

    assert no_token.code == 2
    assert "no token: set auth.tokens" in no_token.stderr
    assert missing.code == 2
    assert missing.stderr == (
        "retm-relay send: cannot read /nonexistent/body.json: No such file or directory\n"
    )
