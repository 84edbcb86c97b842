"""The operator commands' pure parts: consumer-queue settings, the topology plan, tail's
summaries, the events-per-minute window, and every command's --help. No I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.amqp.topology import Binding, exchanges_for_pattern, plan
from relay.cli.main import build_parser
from relay.cli.send import default_url
from relay.cli.tail import summary
from relay.errors import ConfigError
from relay.rates import PerMinute, RecentCounts
from relay.settings import QueueSpec, load_settings
from tests.conftest import fixture_bytes

# -- settings: consumers.queues --------------------------------------------------------------


def test_consumer_queues_from_toml(tmp_path: Path) -> None:
    """``[[consumers.queues]]`` tables give name, bindings and an optional exchange."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[amqp]\nexchanges = { order = "retm.orders" }\n'
        '[consumers]\ndead_letter_exchange = "retm.dead"\n'
        '[[consumers.queues]]\nname = "erp.orders"\nbindings = ["order.#", "customer.created"]\n'
        '[[consumers.queues]]\nname = "audit"\nbindings = "#"\nexchange = "retm.orders"\n'
    )

    settings = load_settings(config, {})

    assert settings.consumers.queues == (
        QueueSpec("erp.orders", ("order.#", "customer.created")),
        QueueSpec("audit", ("#",), "retm.orders"),
    )
    assert settings.consumers.dead_letter_exchange == "retm.dead"


def test_consumer_queues_from_the_environment() -> None:
    """``RELAY_CONSUMERS_QUEUES``: queue=pattern pairs; a repeated name adds a binding."""
    settings = load_settings(
        None, {"RELAY_CONSUMERS_QUEUES": "erp=order.#, crm=customer.*,erp=customer.created"}
    )

    assert settings.consumers.queues == (
        QueueSpec("erp", ("order.#", "customer.created")),
        QueueSpec("crm", ("customer.*",)),
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RELAY_CONSUMERS_QUEUES": "erp"}, "consumers.queues: must be queue=pattern pairs"),
        ({"RELAY_CONSUMERS_QUEUES": "erp=Order.#"}, "binding 'Order.#' of 'erp' must be"),
        ({"RELAY_CONSUMERS_QUEUES": "erp=order..x"}, "binding 'order..x' of 'erp' must be"),
        ({"RELAY_CONSUMERS_QUEUES": "amq.x=#"}, "queue name 'amq.x' is reserved"),
        ({"RELAY_CONSUMERS_QUEUES": "a=#,a.dead=#"}, "queue 'a.dead' is listed twice"),
        ({"RELAY_CONSUMERS_QUEUES": "retm.unrouted=#"}, "is the relay's unrouted queue"),
        ({"RELAY_CONSUMERS_QUEUES": "retm.rejected=#"}, "is the relay's quarantine queue"),
        (
            {"RELAY_CONSUMERS_DEAD_LETTER_EXCHANGE": "retm.events"},
            "consumers.dead_letter_exchange: must differ from the relay's exchanges",
        ),
    ],
)
def test_bad_consumer_settings_name_the_key(environ: dict[str, str], message: str) -> None:
    """A consumer queue that cannot work stops the command with the key and the reason."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ)
    assert message in str(info.value)


def test_a_queue_bound_to_an_unknown_exchange_is_refused(tmp_path: Path) -> None:
    """``exchange`` must be one of the relay's own exchanges (a typo would bind nothing)."""
    config = tmp_path / "relay.toml"
    config.write_text('[[consumers.queues]]\nname = "q"\nbindings = ["#"]\nexchange = "nope"\n')
    with pytest.raises(ConfigError, match="exchange 'nope' of 'q' is not one of the relay's"):
        load_settings(config, {})


# -- topology plan -----------------------------------------------------------------------------


def test_patterns_pick_the_exchanges_that_carry_their_events() -> None:
    """With per-family exchanges, ``order.#`` needs only the order exchange; ``#`` and
    ``*.created`` need every event exchange, default first."""
    settings = load_settings(None, {"RELAY_AMQP_EXCHANGES": "order=retm.orders"})

    assert exchanges_for_pattern(settings, "order.#") == ("retm.orders",)
    assert exchanges_for_pattern(settings, "customer.*") == ("retm.events",)
    assert exchanges_for_pattern(settings, "#") == ("retm.events", "retm.orders")
    assert exchanges_for_pattern(settings, "*.created") == ("retm.events", "retm.orders")


def test_plan_gives_quorum_queues_with_their_dead_letter_queues() -> None:
    """Each consumer queue: quorum, dead-lettered by its own name to ``<exchange>.dlx``, and a
    ``<name>.dead`` quorum queue bound there with that key."""
    settings = load_settings(None, {"RELAY_CONSUMERS_QUEUES": "erp=order.#,erp=#"})

    p = plan(settings)

    assert p.dead_letter_exchange == "retm.events.dlx"
    erp, dead = p.queues
    assert erp.name == "erp"
    assert erp.arguments == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "retm.events.dlx",
        "x-dead-letter-routing-key": "erp",
    }
    assert erp.bindings == (
        Binding("erp", "retm.events", "order.#"),
        Binding("erp", "retm.events", "#"),
    )
    assert dead.name == "erp.dead"
    assert dead.arguments == {"x-queue-type": "quorum"}
    assert dead.bindings == (Binding("erp.dead", "retm.events.dlx", "erp"),)


# -- send --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080/retm/events"),
        ("0.0.0.0", "http://127.0.0.1:8080/retm/events"),
        ("::", "http://[::1]:8080/retm/events"),
        ("relay.internal", "http://relay.internal:8080/retm/events"),
    ],
)
def test_send_default_url_reads_the_listener_settings(host: str, url: str) -> None:
    """A wildcard listener is reached on loopback. (Plain HTTP off loopback needs a trusted
    proxy in front, hence RELAY_HTTP_TRUSTED_PROXIES.)"""
    environ = {"RELAY_HTTP_HOST": host, "RELAY_HTTP_TRUSTED_PROXIES": "10.0.0.1"}
    settings = load_settings(None, environ)
    assert default_url(settings, settings.http.events_path) == url


def test_send_default_url_needs_a_fixed_port() -> None:
    """Port 0 (any free port): ask for --url."""
    settings = load_settings(None, {"RELAY_HTTP_PORT": "0"})
    with pytest.raises(ConfigError, match=r"http\.port: is 0"):
        default_url(settings, "/retm/events")


# -- tail summaries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routing_key", "fixture", "expected"),
    [
        ("order.created", "order.created.json", "invoice 4817, total 120.000, 4 products, closed"),
        ("customer.deleted", "customer.deleted.json", "customer 48213 Khalid Al-Mutairi"),
        (
            "delivery.error",
            "error.webhook.json",
            (
                "code 504 at https://hooks.example.com/retm/events: No 2xx response received "
                "after 3 consecutive del…"
            ),
        ),
        ("loyalty.check_reward", "loyalty.check_reward.json", "reward code NKH-4821"),
    ],
)
def test_tail_summary_of_retm_fixtures(routing_key: str, fixture: str, expected: str) -> None:
    """The one-line summary of each RETM example body."""
    assert summary(routing_key, fixture_bytes(fixture)) == expected


def test_tail_summary_of_other_bodies() -> None:
    """Unknown bodies show size and keys; terminal escape sequences never pass through."""
    assert summary("menu.updated", b'{"menu":1,"items":[]}') == "21 bytes: menu, items"
    assert summary("order.created", b"not json") == "8 bytes, not JSON"
    assert summary("order.created", b"[]") == "2 bytes"
    hostile = b'{"customer":{"id":1,"name":"\\u001b[2Jevil\\u0007"}}'
    assert summary("customer.created", hostile) == "customer 1 ?[2Jevil?"


# -- events per minute -------------------------------------------------------------------------


def test_recent_counts_slide_over_one_minute() -> None:
    """Counts cover the last 60 seconds; older ones drop out, names stay with 0."""
    now = [1000.0]
    recent = RecentCounts(window=60, clock=lambda: now[0])
    recent.add("order.created")
    now[0] = 1030.5
    recent.add("order.created", 2)
    recent.add("customer.created")

    assert recent.counts() == {"customer.created": 1, "order.created": 3}
    now[0] = 1060.0
    assert recent.counts() == {"customer.created": 1, "order.created": 2}
    now[0] = 1091.0
    assert recent.counts() == {"customer.created": 0, "order.created": 0}


def test_recent_counts_memory_is_bounded_by_the_window() -> None:
    """However many events, one name keeps at most ``window`` one-second buckets."""
    now = [0.0]
    recent = RecentCounts(window=60, clock=lambda: now[0])
    for i in range(10_000):
        now[0] = i / 10
        recent.add("order.created")
    assert len(recent._buckets["order.created"]) <= 60
    assert recent.counts() == {"order.created": 600}


def test_per_minute_counts_whole_utc_minutes_of_the_last_hour() -> None:
    """Counts fall into wall-clock minutes; the series is the last 60 minutes, oldest first,
    the current minute last, zeros where nothing happened and for names never counted."""
    now = [1_800_000_000.0 + 59]  # 59 s into a minute (1_800_000_000 is a multiple of 60)
    per_minute = PerMinute(minutes=60, clock=lambda: now[0])
    per_minute.add("accepted")
    now[0] += 1  # the next minute
    per_minute.add("accepted", 2)
    per_minute.add("rejected")

    series = per_minute.series(("accepted", "rejected", "spooled"))

    assert series["start"] == 1_800_000_060 - 59 * 60
    assert series["minutes"] == 60
    assert series["accepted"] == [0] * 58 + [1, 2]
    assert series["rejected"] == [0] * 59 + [1]
    assert series["spooled"] == [0] * 60
    now[0] += 59 * 60  # the first count is now 60 minutes old: out of the window
    assert per_minute.series(("accepted",))["accepted"] == [2] + [0] * 59


def test_per_minute_memory_is_bounded_by_the_hour() -> None:
    """A day of traffic keeps at most 60 buckets per name."""
    now = [0.0]
    per_minute = PerMinute(minutes=60, clock=lambda: now[0])
    for i in range(24 * 60 * 4):
        now[0] = i * 15.0
        per_minute.add("accepted")
    assert len(per_minute._buckets["accepted"]) <= 60
    assert per_minute.series(("accepted",))["accepted"] == [4] * 60


# -- --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "check-config", "send", "tail", "declare"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    """``retm-relay COMMAND --help`` ends with an example of the command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices[command].format_help()  # type: ignore[attr-defined]
    assert f"retm-relay {command}" in text.split("\nexample:\n", 1)[1]
