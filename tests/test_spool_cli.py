"""``retm-relay spool stats|list|replay|purge``, run as a real process against real spool files
and a real RabbitMQ: each with the path that works and one that must fail clearly."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from relay.amqp.publish import Envelope
from relay.routing import Route
from relay.spool.store import connect, read_stats
from tests.conftest import Broker, Names, relay_environ, spawn_relay, spool_at


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Awaitable[Result]]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def cli(names: Names, state: Path, broker: Broker) -> Cli:
    broker.forget_later(exchanges=(names.exchange, *names.own), queues=names.own)

    async def run(*args: str, stdin: bytes = b"") -> Result:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(relay_environ(names, state))
        process = await spawn_relay("spool", *args, env=env, stdin=asyncio.subprocess.PIPE)
        out, err = await process.communicate(stdin)
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())

    return run


def envelope(names: Names, n: int) -> Envelope:
    return Envelope(
        b'{"event":"order.created","reference":"cli-%d"}' % n,
        Route(names.exchange, "order.created"),
        f"token-cli:order.created:cli-{n}",
        "order.created",
        1_700_000_000.0 + n,
        {"x-retm-event": "order.created"},
    )


@pytest.fixture
async def spooled(names: Names, state: Path) -> list[Envelope]:
    """Three events written to ``state/spool.db`` (the spool is closed again)."""
    spool = spool_at(state / "spool.db", max_events=100, dedup_max_entries=100)
    await spool.open()
    sent = [envelope(names, i) for i in range(3)]
    for e in sent:
        await spool.put(e, "disconnected")
    await spool.close()
    return sent


def events_left(state: Path) -> int:
    conn = connect(state / "spool.db")
    try:
        return read_stats(conn).events
    finally:
        conn.close()


async def test_stats_reports_totals(cli: Cli, spooled: list[Envelope], state: Path) -> None:
    """``stats --json`` gives the events, bytes, oldest age and persisted dedup keys."""
    result = await cli("stats", "--json")

    assert result.code == 0, result.err
    data = orjson.loads(result.out)
    assert data["path"] == str(state / "spool.db")
    assert (data["events"], data["dedup_keys"], data["in_use"]) == (3, 3, False)
    assert data["bytes"] > sum(len(e.body) for e in spooled)
    assert data["oldest_age_seconds"] >= 0


async def test_stats_of_an_empty_spool_never_prints_none(cli: Cli, state: Path) -> None:
    """``stats`` of an empty spool: one line per figure, ``-`` for the oldest event (none),
    ``no`` for a spool no relay holds; never ``None``."""
    spool = spool_at(state / "spool.db", max_events=100, max_bytes=2_000_000)
    await spool.open()
    await spool.close()

    result = await cli("stats")

    assert result.code == 0, result.err
    lines = dict(line.split(None, 1) for line in result.out.splitlines())
    assert "None" not in result.out
    assert lines["events"] == "0"
    assert lines["oldest_spooled_at"] == "-"
    assert lines["oldest_age_seconds"] == "0"
    assert lines["dedup_keys"] == "0"
    assert lines["in_use"] == "no"
    assert lines["path"] == str(state / "spool.db")


async def test_stats_without_a_spool_fails_clearly(cli: Cli, state: Path) -> None:
    """No spool file: exit 1 with a message naming the path, nothing on stdout."""
    result = await cli("stats")

    assert result.code == 1
    assert result.out == ""
    assert result.err == (
        f"retm-relay spool: no spool at {state / 'spool.db'} (check state.dir and spool.file)\n"
    )


async def test_list_shows_events_oldest_first(cli: Cli, spooled: list[Envelope]) -> None:
    """``list --json`` prints one line per event in spool order; ``--newest`` reverses it."""
    oldest = await cli("list", "--json")
    newest = await cli("list", "--json", "--newest", "--limit", "2")

    assert oldest.code == newest.code == 0
    rows = [orjson.loads(line) for line in oldest.out.splitlines()]
    assert [r["message_id"] for r in rows] == [e.message_id for e in spooled]
    assert {r["reason"] for r in rows} == {"disconnected"}
    assert [orjson.loads(line)["seq"] for line in newest.out.splitlines()] == [3, 2]


async def test_list_rejects_a_bad_limit(cli: Cli, spooled: list[Envelope]) -> None:
    """``--limit 0`` is a usage error (exit 2) naming the option."""
    result = await cli("list", "--limit", "0")

    assert result.code == 2
    assert "argument --limit: must be at least 1" in result.err


async def test_replay_publishes_in_order_and_empties_the_spool(
    cli: Cli, spooled: list[Envelope], broker: Broker, names: Names, state: Path
) -> None:
    """``replay`` publishes every spooled event with its message_id, oldest first, deletes
    each after its confirm and reports progress on stderr."""
    tap = await broker.tap(names.exchange)

    result = await cli("replay")

    assert result.code == 0, result.err
    messages = await tap.take(3)
    assert [m.body for m in messages] == [e.body for e in spooled]
    assert [m.message_id for m in messages] == [e.message_id for e in spooled]
    assert "replayed 3/3 events" in result.err
    assert result.out == f"replayed 3 events; 0 left in {state / 'spool.db'}\n"
    assert events_left(state) == 0


async def test_replay_refuses_while_a_relay_holds_the_spool(
    cli: Cli, spooled: list[Envelope], state: Path
) -> None:
    """While another process has the spool open, ``replay`` exits 1 and changes nothing."""
    holder = spool_at(state / "spool.db")
    await holder.open()
    try:
        result = await cli("replay")
    finally:
        await holder.close()

    assert result.code == 1
    assert "is in use by another process" in result.err
    assert events_left(state) == 3


async def test_purge_with_confirmation_deletes_everything(
    cli: Cli, spooled: list[Envelope], state: Path
) -> None:
    """``purge`` asks first; answering ``yes`` deletes every event (``--yes`` skips the
    question)."""
    result = await cli("purge", stdin=b"yes\n")

    assert result.code == 0, result.err
    assert "Delete 3 spooled events" in result.out
    assert "purged 3 events" in result.out
    assert events_left(state) == 0
    assert (await cli("purge", "--yes")).out.endswith("is empty; nothing to purge\n")


async def test_purge_not_confirmed_deletes_nothing(
    cli: Cli, spooled: list[Envelope], state: Path
) -> None:
    """Any answer but yes (or no terminal to answer from) keeps every event; exit 1."""
    result = await cli("purge", stdin=b"")

    assert result.code == 1
    assert result.err == "retm-relay spool: not confirmed; nothing was deleted\n"
    assert events_left(state) == 3


@pytest.mark.parametrize("command", ["stats", "list", "replay", "purge"])
async def test_every_command_has_help_with_an_example(cli: Cli, command: str) -> None:
    """``--help`` describes the command and ends with an example."""
    result = await cli(command, "--help")

    assert result.code == 0
    assert f"usage: retm-relay spool {command}" in result.out
    description, _, example = result.out.partition("\nexample:\n  ")
    assert f"retm-relay spool {command}" in example
    assert description.count("\n") > 3
