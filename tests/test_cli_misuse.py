"""The command line under careless use: every mistake ends with one line naming it and exit
code 2 (usage) or 1 (runtime), never a Python traceback; a reader that stops early (``| head``)
ends the command quietly. Real processes (``python -m relay``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay.spool.store import connect
from tests.cli import cli_environ, run_cli
from tests.conftest import spawn_relay


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    return path


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ("send", "--path", "retm/events", "{body}"),
            2,
            "retm-relay send: --path must start with /, not 'retm/events'\n",
        ),
        (
            ("send", "--url", "http://127.0.0.1:notaport/retm/events", "{body}"),
            1,
            (
                "retm-relay send: cannot post to http://127.0.0.1:notaport/retm/events: "
                "nonnumeric port: 'notaport'\n"
            ),
        ),
        (
            ("send", "--url", "relay.example.com/retm/events", "{body}"),
            1,
            (
                "retm-relay send: cannot post to relay.example.com/retm/events: "
                "unknown url type: 'relay.example.com/retm/events'\n"
            ),
        ),
    ],
    ids=["path-without-slash", "url-bad-port", "url-without-scheme"],
)
async def test_send_names_a_bad_target_without_a_traceback(
    args: tuple[str, ...], code: int, message: str, empty_config: Path, tmp_path: Path
) -> None:
    """A path or URL that cannot be posted to is one line on stderr, with its exit code."""
    body = tmp_path / "body.json"
    body.write_bytes(b'{"event":"order.created","reference":"misuse-1"}')
    environ = cli_environ(empty_config, RELAY_AUTH_TOKENS="misuse-token-0123456789")

    result = await run_cli(*(a.format(body=body) for a in args), env=environ)

    assert (result.code, result.stdout, result.stderr) == (code, "", message)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
async def test_send_refuses_a_timeout_that_is_not_a_positive_number(
    timeout: str, empty_config: Path, tmp_path: Path
) -> None:
    """``--timeout`` must be a positive number of seconds: anything else is a usage error."""
    body = tmp_path / "body.json"
    body.write_bytes(b"{}")
    environ = cli_environ(empty_config, RELAY_AUTH_TOKENS="misuse-token-0123456789")

    result = await run_cli("send", "--timeout", timeout, str(body), env=environ)

    assert result.code == 2
    assert result.stderr.endswith(
        f"retm-relay send: error: argument --timeout: must be a positive number, not {timeout!r}\n"
    )


async def test_a_reader_that_stops_early_ends_the_command_quietly(
    empty_config: Path, tmp_path: Path
) -> None:
    """``retm-relay spool stats | head -1``: stdout closes before the command has written
    everything; it exits 0 and prints nothing on stderr (no BrokenPipeError traceback)."""
    connect(tmp_path / "state" / "spool.db").close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write
    try:
        process = await spawn_relay(
            "spool", "stats", env=cli_environ(empty_config), stdout=write_end
        )
    finally:
        os.close(write_end)
    async with asyncio.timeout(30):
        _, err = await process.communicate()

    assert (process.returncode, err.decode()) == (0, "")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "RELAY_AMQP_URL",
            "amqp://user:secret-pw@[::1",
            "amqp.url: is not a valid URL (check the host's brackets)",
        ),
        (
            "RELAY_DEDUP_REDIS_URL",
            "redis://:secret-pw@[::1",
            "dedup.redis_url: is not a valid URL (check the host's brackets and the port)",
        ),
        (
            "RELAY_DEDUP_REDIS_URL",
            "redis://:secret-pw@localhost:99999/0",
            "dedup.redis_url: is not a valid URL (check the host's brackets and the port)",
        ),
        (
            "RELAY_INSTALL_SETTINGS_URL",
            "http://[x",
            "install.settings_url: is not a valid URL (check the host's brackets)",
        ),
    ],
    ids=["amqp-bracket", "redis-bracket", "redis-port", "install-bracket"],
)
async def test_a_url_that_cannot_be_parsed_is_one_line_and_exit_2(
    setting: str, value: str, message: str, empty_config: Path
) -> None:
    """A URL the parser refuses (an unclosed IPv6 bracket, a port out of range) is a
    configuration error like any other: one line naming the key, never the password, exit 2;
    ``check-config`` finds it, so ``serve`` never reaches it."""
    environ = cli_environ(empty_config, RELAY_DEDUP_BACKEND="redis", **{setting: value})

    checked = await run_cli("check-config", env=environ)

    assert (checked.code, checked.stdout) == (2, "")
    assert checked.stderr == f"retm-relay: configuration error: {message}\n"


async def test_replay_since_before_the_year_1_is_a_usage_error(empty_config: Path) -> None:
    """A duration back from now that reaches before the year 1 is one line and exit 2."""
    result = await run_cli(
        "replay", "--since", "9999999d", "--to-queue", "q", "--dry-run",
        env=cli_environ(empty_config),
    )  # fmt: skip

    assert (result.code, result.stdout) == (2, "")
    assert result.stderr == "retm-relay replay: '9999999d' reaches back before the year 1\n"


async def test_a_state_dir_that_cannot_be_created_stops_the_start_in_one_line(
    empty_config: Path,
) -> None:
    """``serve`` with a ``state.dir`` that cannot be created logs ``relay.start_failed``
    naming it and exits 1, without a traceback."""
    environ = cli_environ(empty_config, RELAY_STATE_DIR="/proc/1/no-such-dir", RELAY_HTTP_PORT="0")

    result = await run_cli("serve", env=environ)

    assert result.code == 1
    assert "Traceback" not in result.stderr + result.stdout
    failed = [line for line in result.stdout.splitlines() if "relay.start_failed" in line]
    assert len(failed) == 1
    assert (
        "state.dir '/proc/1/no-such-dir' cannot be created: No such file or directory" in failed[0]
    )
