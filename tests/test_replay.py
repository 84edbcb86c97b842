"""``retm-relay replay``: a window of the archive republished to a queue or an exchange, as a
real process against real RabbitMQ. Exactly the matching events arrive, byte for byte, with
their message_ids; ``--dry-run`` publishes nothing; bad arguments are one line and exit 2; a
broker failure mid-way says where to resume, and resuming completes the replay."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from relay.amqp.archive import unix_ms
from relay.amqp.link import broker_address
from relay.cli.replay import parse_time, topic_matches
from tests.cli import Result, names_environ, run_cli
from tests.conftest import AMQP_URL, Broker, Names, RunningRelay, StartRelay, read_archive


def event(name: str, reference: str, business: str = "b1") -> bytes:
    return orjson.dumps({"event": name, "reference": reference, "business_refrence": business})


@pytest.fixture
def env(tmp_path: Path, names: Names) -> dict[str, str]:
    """The command's environment: the broker and the test's own archive stream."""
    config = tmp_path / "empty.toml"
    config.write_text("")
    return names_environ(config, names)


async def target_queue(broker: Broker, names: Names, **arguments: object) -> str:
    """A fresh durable queue of the test's own (deleted afterwards)."""
    assert broker.channel is not None
    name = names(f"replay.{uuid.uuid4().hex[:6]}")
    await broker.channel.declare_queue(name, durable=True, arguments=arguments or None)
    broker.forget_later(queues=(name,))
    return name


async def drain(broker: Broker, queue: str) -> list[AbstractIncomingMessage]:
    """Every message now in ``queue`` (the replay has finished: its publishes are confirmed,
    so they are all there), acked."""
    channel = await broker.connection.channel()
    q = await channel.get_queue(queue, ensure=True)
    messages = []
    while (message := await q.get(fail=False)) is not None:
        await message.ack()
        messages.append(message)
    await channel.close()
    return messages


def same_event(replayed: AbstractIncomingMessage, archived: AbstractIncomingMessage) -> None:
    """``replayed`` is ``archived`` unchanged, plus the x-relay-replayed-at header."""
    headers = dict(replayed.headers)
    replayed_at = headers.pop("x-relay-replayed-at")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(replayed_at))
    expected = {k: v for k, v in archived.headers.items() if k != "x-stream-offset"}
    assert headers == expected
    assert (
        replayed.body,
        replayed.message_id,
        replayed.type,
        replayed.timestamp,
        replayed.content_type,
        replayed.delivery_mode,
        replayed.app_id,
    ) == (
        archived.body,
        archived.message_id,
        archived.type,
        archived.timestamp,
        archived.content_type,
        archived.delivery_mode,
        archived.app_id,
    )


async def post_all(relay: RunningRelay, bodies: list[bytes]) -> None:
    for body in bodies:
        answer = await relay.event(body)
        assert answer.status == 200, answer


def iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def received(message: AbstractIncomingMessage) -> int:
    at = datetime.fromisoformat(str(message.headers["x-relay-received-at"]))
    return int(at.timestamp() * 1000 + 0.5)


async def test_replay_by_pattern_puts_exactly_the_matching_events_on_the_queue(
    relay: RunningRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """``--pattern 'order.#'``: the three order events (not the customer event, nor the
    unroutable menu event) arrive on the target queue in archive order, byte-identical, with
    their message_ids and properties; the summary counts read, matched and published."""
    bodies = [
        event("order.created", "p-1"),
        event("customer.updated", "p-2"),
        event("order.refunded", "p-3"),
        event("menu.changed", "p-4"),
        event("order.created", "p-5"),
    ]
    await post_all(relay, bodies)
    archived = await read_archive(broker, names.archive, bodies[-1])
    queue = await target_queue(broker, names)

    result = await run_cli(
        "replay", "--since", "10m", "--pattern", "order.#", "--to-queue", queue, env=env
    )

    assert (result.code, result.stderr) == (0, ""), result
    assert result.stdout == f"read 5, matched 3, published 3 to queue {queue}\n"
    replayed = await drain(broker, queue)
    assert [m.body for m in replayed] == [bodies[0], bodies[2], bodies[4]]
    for message, original in zip(replayed, [archived[0], archived[2], archived[4]], strict=True):
        same_event(message, original)


async def test_replay_of_a_window_is_exact_to_the_millisecond_across_a_second_boundary(
    relay: RunningRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """Events received on both sides of a whole second: ``--since`` and ``--until`` given to
    the millisecond select exactly the events received in [since, until), although the
    stream can only be positioned by whole seconds."""
    bodies: list[bytes] = []
    before = after = 0
    second = int(time.time())
    while after < 3:  # post until three events follow a whole second that three preceded
        body = event("order.created", f"w-{len(bodies)}")
        await post_all(relay, [body])
        bodies.append(body)
        now = int(time.time())
        if now > second and before >= 3:
            after += 1
        elif now > second:
            before, second = 1, now
        else:
            before += 1
    times = [received(m) for m in await read_archive(broker, names.archive, bodies[-1])]
    crossing = max(i for i in range(1, len(times)) if times[i] // 1000 > times[i - 1] // 1000)
    # since: a receive time before the boundary (with an earlier one before it); until: the
    # second distinct receive time after the boundary (exclusive)
    first = max(i for i in range(1, crossing) if times[i] > times[i - 1])
    last = next(i for i in range(crossing + 1, len(times)) if times[i] > times[i - 1])
    expected = [b for b, t in zip(bodies, times, strict=True) if times[first] <= t < times[last]]
    queue = await target_queue(broker, names)

    result = await run_cli(
        "replay",
        "--since", iso(times[first]),
        "--until", iso(times[last]),
        "--to-queue", queue,
        env=env,
    )  # fmt: skip

    assert result.code == 0, result
    assert times[first] // 1000 < times[last] // 1000  # the window spans a whole second
    assert result.stdout == (
        f"read {len(bodies)}, matched {len(expected)}, published {len(expected)} to queue {queue}\n"
    )
    assert [m.body for m in await drain(broker, queue)] == expected


async def test_replay_by_business_takes_only_that_business(
    relay: RunningRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """``--business b2``: only the events whose x-retm-business is b2."""
    bodies = [
        event("order.created", "b-1", "b1"),
        event("order.created", "b-2", "b2"),
        event("customer.updated", "b-3", "b2"),
        event("order.created", "b-4", "b3"),
    ]
    await post_all(relay, bodies)
    await read_archive(broker, names.archive, bodies[-1])
    queue = await target_queue(broker, names)

    result = await run_cli(
        "replay", "--since", "1h", "--business", "b2", "--to-queue", queue, env=env
    )

    assert result.stdout == f"read 4, matched 2, published 2 to queue {queue}\n", result
    assert [m.body for m in await drain(broker, queue)] == bodies[1:3]


async def test_replay_by_relative_time_judges_the_receive_time(
    relay: RunningRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """An event appended now but received two hours ago (as one forwarded late from a spool
    would be) is outside ``--since 90m`` and inside ``--since 3h``; the relay's fresh events
    are inside both."""
    fresh = [event("order.created", "r-1"), event("order.created", "r-2")]
    await post_all(relay, fresh[:1])
    old_body = event("order.created", "r-old")
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    assert broker.channel is not None
    archive = await broker.channel.get_exchange(names.archive)
    await archive.publish(
        aio_pika.Message(
            old_body,
            message_id="r-old",
            headers={
                "x-relay-received-at": two_hours_ago.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            },
        ),
        routing_key="order.created",
    )
    await post_all(relay, fresh[1:])
    await read_archive(broker, names.archive, fresh[-1])
    recent, wide = await target_queue(broker, names), await target_queue(broker, names)

    in_90m = await run_cli("replay", "--since", "90m", "--to-queue", recent, env=env)
    in_3h = await run_cli("replay", "--since", "3h", "--to-queue", wide, env=env)

    assert in_90m.stdout == f"read 3, matched 2, published 2 to queue {recent}\n", in_90m
    assert in_3h.stdout == f"read 3, matched 3, published 3 to queue {wide}\n", in_3h
    assert [m.body for m in await drain(broker, recent)] == fresh
    assert [m.body for m in await drain(broker, wide)] == [fresh[0], old_body, fresh[1]]


async def test_replay_to_an_exchange_keeps_routing_keys_and_counts_returns(
    relay: RunningRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """``--to-exchange``: each event goes out with its own routing key; one that no queue is
    bound for there is counted as returned, not lost silently."""
    bodies = [event("order.created", "x-1"), event("customer.updated", "x-2")]
    await post_all(relay, bodies)
    await read_archive(broker, names.archive, bodies[-1])
    exchange = names("replay.x")
    tap = await broker.tap(exchange, "order.*")

    result = await run_cli("replay", "--since", "5m", "--to-exchange", exchange, env=env)

    assert result.stdout == (
        "read 2, matched 2, published 1, returned 1 (no queue bound for their routing key) "
        f"to exchange {exchange}\n"
    ), result
    message = await tap.get()
    assert (message.routing_key, message.body) == ("order.created", bodies[0])
    assert tap.empty()


async def test_dry_run_counts_and_publishes_nothing(
    relay: RunningRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """``--dry-run``: the same counts as a real run would give, and the queue stays empty."""
    bodies = [event("order.created", "d-1"), event("customer.updated", "d-2")]
    await post_all(relay, bodies)
    await read_archive(broker, names.archive, bodies[-1])
    queue = await target_queue(broker, names)

    result = await run_cli(
        "replay", "--since", "5m", "--pattern", "customer.*", "--to-queue", queue, "--dry-run",
        env=env,
    )  # fmt: skip

    assert result.code == 0, result
    assert result.stdout == (
        f"dry run: read 2, matched 1, published 0 (would publish 1 to queue {queue})\n"
    )
    assert await drain(broker, queue) == []


async def test_a_failure_mid_way_says_where_to_resume_and_resuming_completes_the_replay(
    start_relay: StartRelay, broker: Broker, names: Names, env: dict[str, str]
) -> None:
    """The target queue refuses publishes beyond 300 messages (``reject-publish``): the
    replay of 341 events stops with exit 1 naming the stream offset to resume from; every
    event before it is on the queue; after the queue is drained, ``--from-offset`` publishes
    the rest, so every event arrives (a few twice, with the same message_id)."""
    relay = await start_relay()
    bodies = [event("order.created", f"f-{i}") for i in range(340)]
    for start in range(0, 340, 50):
        answers = await asyncio.gather(*(relay.event(b) for b in bodies[start : start + 50]))
        assert {a.status for a in answers} == {200}
    sentinel = event("order.created", "f-sentinel")
    await post_all(relay, [sentinel])
    archived = await read_archive(broker, names.archive, sentinel, timeout=20)
    ids = {m.message_id for m in archived}
    queue = await target_queue(
        broker, names, **{"x-max-length": 300, "x-overflow": "reject-publish"}
    )

    failed = await run_cli("replay", "--since", "10m", "--to-queue", queue, env=env, timeout=60)

    assert (failed.code, failed.stdout) == (1, ""), failed
    match = re.fullmatch(
        r"retm-relay replay: the broker refused \(nacked\) a message for queue \S+; "
        r"read (\d+), matched (\d+), published (\d+); every matching event before stream "
        r"offset (\d+) is published: resume with the same arguments and --from-offset (\d+) "
        r"\(consumers that deduplicate by message_id take any event published twice once\)\n",
        failed.stderr,
    )
    assert match, failed.stderr
    published, offset = int(match[3]), int(match[4])
    assert published == 300
    first_part = await drain(broker, queue)
    assert len(first_part) == 300
    assert {m.message_id for m in first_part} >= {m.message_id for m in archived[:offset]}

    resumed = await run_cli(
        "replay", "--since", "10m", "--to-queue", queue, "--from-offset", str(offset),
        env=env, timeout=60,
    )  # fmt: skip
    assert resumed.code == 0, resumed
    count = len(archived) - offset
    assert resumed.stdout == f"read {count}, matched {count}, published {count} to queue {queue}\n"
    second_part = await drain(broker, queue)
    assert {m.message_id for m in first_part + second_part} == ids


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to-queue", "q"], "the following arguments are required: --since"),
        (["--since", "1h"], "one of the arguments --to-queue --to-exchange is required"),
        (
            ["--since", "1h", "--to-queue", "q", "--to-exchange", "x"],
            "argument --to-exchange: not allowed with argument --to-queue",
        ),
        (
            ["--since", "yesterday", "--to-queue", "q"],
            (
                "'yesterday' is neither ISO 8601 with a zone (2026-12-04T10:00:00Z) nor a "
                "duration back from now (90s, 10m, 2h, 3d)"
            ),
        ),
        (
            ["--since", "2026-12-04T10:00:00", "--to-queue", "q"],
            "'2026-12-04T10:00:00' has no zone: add Z or an offset such as +01:00",
        ),
        (["--since", "0h", "--to-queue", "q"], "'0h' is neither ISO 8601"),
        (["--since", "1h", "--until", "2h", "--to-queue", "q"], "--until must be later"),
        (["--since", "2999-01-01T00:00:00Z", "--to-queue", "q"], "is in the future"),
        (
            ["--since", "1h", "--pattern", "Order.#", "--to-queue", "q"],
            "--pattern 'Order.#' is not a topic pattern",
        ),
        (["--since", "1h", "--to-queue", "{archive}"], "must not be the archive"),
        (["--since", "1h", "--to-queue", "q", "--from-offset", "-1"], "--from-offset must be"),
        (
            ["--since", "1h", "--to-queue", "q", "--from-offset", "x"],
            "argument --from-offset: invalid int value: 'x'",
        ),
    ],
    ids=[
        "no-since",
        "no-target",
        "two-targets",
        "bad-time",
        "no-zone",
        "zero-duration",
        "until-before-since",
        "since-in-the-future",
        "bad-pattern",
        "archive-as-target",
        "negative-offset",
        "offset-not-a-number",
    ],
)
async def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, env: dict[str, str], names: Names
) -> None:
    """Every usage mistake: exit 2, nothing on stdout, one line on stderr naming it."""
    result: Result = await run_cli(
        "replay", *(a.format(archive=names.archive) for a in args), env=env
    )

    assert (result.code, result.stdout) == (2, ""), result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("retm-relay replay: ")
    assert message in result.stderr


async def test_a_missing_target_or_archive_is_one_line_and_exit_1(
    relay: RunningRelay, env: dict[str, str], names: Names
) -> None:
    """A target queue that does not exist, or an archive stream that does not: exit 1 with
    one line naming it, nothing published."""
    missing_queue = await run_cli("replay", "--since", "1h", "--to-queue", names("nope"), env=env)
    env["RELAY_ARCHIVE_QUEUE"] = names("no-archive")
    missing_archive = await run_cli(
        "replay", "--since", "1h", "--to-exchange", names.exchange, env=env
    )

    assert (missing_queue.code, missing_queue.stderr) == (
        1,
        f"retm-relay replay: the target queue {names('nope')} does not exist\n",
    )
    assert (missing_archive.code, missing_archive.stderr) == (
        1,
        (
            f"retm-relay replay: the archive stream '{names('no-archive')}' does not exist on "
            f"{broker_address(AMQP_URL)} (archive.queue)\n"
        ),
    )


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("#", "order.created", True),
        ("#", "unrecognized", True),
        ("order.#", "order", True),
        ("order.#", "order.created", True),
        ("order.#", "order.created.b1", True),
        ("order.#", "orders.created", False),
        ("order.*", "order.created", True),
        ("order.*", "order", False),
        ("order.*", "order.created.b1", False),
        ("*.created", "order.created", True),
        ("*.created", "created", False),
        ("#.created", "created", True),
        ("#.created", "order.x.created", True),
        ("order.#.b1", "order.b1", True),
        ("order.#.b1", "order.created.b1", True),
        ("order.#.b1", "order.created.b2", False),
        ("*.*", "order.created", True),
        ("*", "order.created", False),
        ("order.created", "order.created", True),
        ("order.created", "order.created.b1", False),
    ],
)
def test_topic_patterns_match_as_rabbitmq_does(pattern: str, key: str, matches: bool) -> None:
    """``*`` is exactly one word, ``#`` zero or more, words split at dots."""
    assert topic_matches(pattern, key) is matches


def test_times_are_iso_8601_with_a_zone_or_durations_back_from_now() -> None:
    """TIME arguments: a zone is required and honoured, milliseconds are kept exactly, and
    ``90s``, ``10m``, ``2h``, ``3d`` count back from now."""
    now = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    assert parse_time("2026-12-04T10:00:00.250Z", now) == datetime(
        2026, 12, 4, 10, 0, 0, 250_000, tzinfo=UTC
    )
    assert parse_time("2026-12-04T11:00:00.250+01:00", now) == datetime(
        2026, 12, 4, 10, 0, 0, 250_000, tzinfo=UTC
    )
    assert [parse_time(d, now) for d in ("90s", "10m", "2h", "3d")] == [
        now - timedelta(seconds=90),
        now - timedelta(minutes=10),
        now - timedelta(hours=2),
        now - timedelta(days=3),
    ]
    assert unix_ms(parse_time("2026-12-04T10:00:00.999Z", now)) == 1_796_378_400_999
    for bad in ("2026-12-04T10:00:00", "90", "1w", "-2h", "0s", ""):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_time(bad, now)
