"""``--config PATH`` is honoured wherever ``--help`` shows it: before the command
(``retm-relay --config PATH COMMAND``, the form of the top-level usage line), after it, and after
a subcommand of ``spool`` and ``tokens``. Real processes (``python -m relay``)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from relay.spool.store import connect
from tests.cli import cli_environ, run_cli


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A TOML file whose settings differ from the built-in defaults."""
    path = tmp_path / "relay.toml"
    path.write_text(f'[http]\nport = 18181\n[state]\ndir = "{tmp_path / "state"}"\n')
    return path


@pytest.mark.parametrize(
    "args",
    [
        ("--config", "{config}", "check-config", "--show"),
        ("check-config", "--config", "{config}", "--show"),
        ("check-config", "--show", "--config", "{config}"),
    ],
)
async def test_check_config_reads_the_file_wherever_config_is_given(
    args: tuple[str, ...], config: Path, tmp_path: Path
) -> None:
    """The file named by ``--config`` is the one read, before or after the command name."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = await run_cli(
        *(a.format(config=config) for a in args), env=cli_environ(empty), timeout=30
    )

    assert result.code == 0, result.stderr
    shown = orjson.loads(result.stdout.rsplit("}\n", 1)[0] + "}")
    assert shown["http"]["port"] == 18181
    assert shown["source"] == str(config)


async def test_a_missing_config_file_given_before_the_command_is_an_error(
    tmp_path: Path,
) -> None:
    """``retm-relay --config MISSING check-config`` fails with exit 2 naming the file, instead
    of carrying on with the built-in defaults."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    missing = tmp_path / "missing.toml"

    result = await run_cli("--config", str(missing), "check-config", env=cli_environ(empty))

    assert result.code == 2
    assert result.stderr == f"retm-relay: configuration error: config: file not found: {missing}\n"


@pytest.mark.parametrize(
    "args",
    [
        ("spool", "stats", "--json", "--config", "{config}"),
        ("spool", "--config", "{config}", "stats", "--json"),
        ("--config", "{config}", "spool", "stats", "--json"),
    ],
)
async def test_spool_commands_read_the_file_wherever_config_is_given(
    args: tuple[str, ...], config: Path, tmp_path: Path
) -> None:
    """``spool stats`` opens the spool in the ``state.dir`` of the file given by ``--config``."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    connect(tmp_path / "state" / "spool.db").close()

    result = await run_cli(*(a.format(config=config) for a in args), env=cli_environ(empty))

    assert result.code == 0, result.stderr
    assert orjson.loads(result.stdout)["path"] == str(tmp_path / "state" / "spool.db")


@pytest.mark.parametrize(
    "args",
    [
        ("tokens", "list", "--json", "--config", "{config}"),
        ("tokens", "--config", "{config}", "list", "--json"),
        ("--config", "{config}", "tokens", "list", "--json"),
    ],
)
async def test_tokens_commands_read_the_file_wherever_config_is_given(
    args: tuple[str, ...], config: Path, tmp_path: Path
) -> None:
    """``tokens list`` accepts ``--config`` after the action too, as ``spool stats`` does, and
    uses the registry in that file's ``state.dir``."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")

    result = await run_cli(*(a.format(config=config) for a in args), env=cli_environ(empty))

    assert result.code == 0, result.stderr
    assert result.stdout == ""
    assert (tmp_path / "state" / "tokens.sqlite3").exists()
