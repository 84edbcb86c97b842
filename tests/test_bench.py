"""The benchmark's own parts (bench/): bodies, percentiles, PASS/FAIL, /proc sampling, and the
naive relay it measures against (a real process on a real RabbitMQ). No speed is asserted here:
targets are checked by `make bench` only."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from bench.fixed_rate import invalid_reasons, pool
from bench.harness import (
    NotifySocket,
    ProcessTree,
    Server,
    Topology,
    child_environ,
    free_port,
    wait_tcp,
)
from bench.hotspots import parse
from bench.hotspots import summarize as summarize_profile
from bench.openloop import body_parts, percentile, summarize
from bench.report import compute_checks, render, summary, verdict
from bench.targets import Context, Options, cleanup_redis, redis_cli
from tests.conftest import AMQP_URL, REDIS_URL, Broker, Names, fixture_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_bodies_differ_from_the_fixture_only_in_their_reference() -> None:
    """A benchmark body is the RETM fixture byte for byte, with another reference value."""
    fixture = fixture_bytes("order.created.json")
    prefix, suffix = body_parts(fixture)
    body = prefix + b"bench-0001-4000-8000-000000000001" + suffix
    parsed, original = orjson.loads(body), orjson.loads(fixture)
    assert parsed["reference"] == "bench-0001-4000-8000-000000000001"
    assert original["reference"] == "e10270cd-1273-419e-8545-89ce060e6539"
    assert {k: v for k, v in parsed.items() if k != "reference"} == {
        k: v for k, v in original.items() if k != "reference"
    }
    assert parsed["order_reference"] == "5203"  # the other *reference field is untouched


def test_percentiles_are_nearest_rank() -> None:
    """p50/p99/p99.9 are the smallest samples with that share at or below them."""
    samples = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1000 ms
    assert percentile(sorted(samples), 0.5) == 0.5
    assert percentile(sorted(samples), 0.99) == 0.99
    assert percentile(sorted(samples), 0.999) == 0.999
    assert summarize(list(reversed(samples))) == {
        "count": 1000,
        "p50_ms": 500.0,
        "p99_ms": 990.0,
        "p999_ms": 999.0,
        "max_ms": 1000.0,
    }
    assert summarize([]) == {"count": 0}


def _closed(rate: float, max_ms: float, invalid: list[str] | None = None) -> dict[str, Any]:
    return {
        "label": "x",
        "closed": {"rate": rate, "max_ms": max_ms},
        "cpu_per_1000": 0.5,
        "peak_rss_bytes": 50 * 1024 * 1024,
        "max_ms": max_ms,
        "paths": {},
        "invalid": invalid or [],
    }


def _at(p99: float, cpu_ms: float, spooled: int = 0) -> dict[str, Any]:
    return {
        "count": 1000, "p50_ms": 1.0, "p99_ms": p99, "p999_ms": p99, "max_ms": p99,
        "rounds_p99_ms": [p99], "cpu_ms_per_event": cpu_ms, "client_lag_p99_ms": 0.1,
        "paths": {"direct": 1000 - spooled, "spooled": spooled},
    }  # fmt: skip


def test_checks_are_ratios_of_targets_measured_side_by_side() -> None:
    """Each of issue 14's targets gets PASS or FAIL from the ratio of two measurements of the
    same run; one spooled under load makes its checks INVALID; the verdict counts them all."""
    results: dict[str, Any] = {
        "rates": {
            "plan": {"naive": [100, 400], "relay": [100, 400, 500], "redis": [500]},
            "targets": {
                "naive": {"rates": {"100": _at(10.0, 1.0), "400": _at(10.0, 1.0)}, "invalid": []},
                "relay": {
                    "rates": {
                        "100": _at(9.0, 0.7),
                        "400": _at(12.0, 0.9, spooled=3),
                        "500": _at(10.0, 0.6),
                    },
                    "invalid": [
                        "@400 req/s: 3 events were spooled under load (997 confirmed directly)"
                    ],
                },
                "redis": {"rates": {"500": _at(11.0, 0.6)}, "invalid": []},
            },
        },
        "targets": {
            "confirm": _closed(4000, 5),
            "naive": _closed(1000, 50),
            "relay": _closed(1200, 40),
            "redis": {"label": "retm-relay, Redis store", "na": "no Redis store on this branch"},
        },
        "ready": {"starts": [1.2, 1.7, 1.4], "median": 1.4, "max": 1.7},
    }
    checks = compute_checks(results)
    assert {c["check"]: (c["status"], c["ratio"]) for c in checks} == {
        "p99 @100 req/s": ("PASS", "0.90x"),
        "CPU per event @100 req/s": ("PASS", "0.70x"),
        "p99 @400 req/s": ("INVALID", "1.20x"),
        "CPU per event @400 req/s": ("INVALID", "0.90x"),
        "req/s @32 connections": ("PASS", "1.20x"),
        "p99 @500 req/s, Redis store (baseline: memory store)": ("PASS", "1.10x"),
        "no answer over 1 s (every retm-relay run)": ("PASS", ""),
        "start to READY=1 (median)": ("PASS", ""),
    }
    assert verdict(checks) == (
        "INVALID: 2 of 8 checks invalid (p99 @400 req/s, CPU per event @400 req/s); "
        "no other failure"
    )
    results["checks"] = checks
    text = summary(results)
    assert "retm-relay @32 connections: 0.30x of the confirm ceiling (4,000 confirms/s" in text
    assert "retm-relay, memory store: @100: 1,000 / 0; @400: 997 / 3; @500: 1,000 / 0" in text
    assert "INVALID  p99 @400 req/s: retm-relay: @400 req/s: 3 events were spooled" in text
    details = render(results)
    assert "retm-relay, memory store @400 [INVALID]" in details
    assert "retm-relay, Redis store, closed loop" not in details
    assert "| retm-relay, Redis store | n/a: no Redis store on this branch |" in render(
        results, markdown=True
    )


def test_a_failed_target_fails_the_verdict() -> None:
    """A ratio over its target is FAIL, and the verdict names it."""
    checks = [
        {"check": "p99 @100 req/s", "status": "FAIL"},
        {"check": "CPU per event @100 req/s", "status": "PASS"},
        {"check": "RSS", "status": "N/A"},
    ]
    assert verdict(checks) == "FAIL: 1 of 2 checks failed (p99 @100 req/s) (1 not measured)"
    assert verdict(checks[1:]) == "PASS: all 1 checks passed (1 not measured)"


def test_rounds_pool_into_one_measurement_and_spooling_is_invalid() -> None:
    """The rounds of one target at one rate pool their latencies, answers, CPU and paths; a
    spooled event, a failed request or a queue that does not match makes the target invalid."""

    def phase(latencies: list[float], spooled: int) -> dict[str, Any]:
        return {
            "latencies_ms": latencies, "statuses": {"200": len(latencies)}, "warmup_ok": 10,
            "non2xx": 0, "errors": {}, "cpu_seconds": 0.5, "p99_ms": max(latencies),
            "client_lag_p99_ms": 0.2, "paths": {"direct": len(latencies) + 10 - spooled,
                                                "spooled": spooled},
        }  # fmt: skip

    pooled = pool([phase([1.0] * 99 + [50.0], 0), phase([2.0] * 100, 2)])
    assert pooled["count"] == 200
    assert pooled["p99_ms"] == 2.0
    assert pooled["max_ms"] == 50.0
    assert pooled["rounds_p99_ms"] == [50.0, 2.0]
    assert pooled["answered_2xx"] == 220
    assert pooled["cpu_ms_per_event"] == round(1.0 / 220 * 1000, 4)
    assert pooled["paths"] == {"direct": 218, "spooled": 2}
    assert invalid_reasons({"400": pooled}, 220, 219) == [
        "@400 req/s: 2 events were spooled under load (218 confirmed directly)",
        "the queue holds 219 messages for 220 2xx answers",
    ]
    pooled["paths"] = {"direct": 220, "spooled": 0}
    assert invalid_reasons({"400": pooled}, 220, 220) == []


def test_profile_summary_shares() -> None:
    """py-spy's collapsed stacks become shares of samples, inclusive and by leaf package."""
    raw = (
        "run (asyncio/runners.py:118);Ingest._handle (relay/ingest.py:10);"
        "loads (orjson/x.py:1) 3\n"
        "run (asyncio/runners.py:118);Ingest._handle (relay/ingest.py:10) 1\n"
    )
    summary = summarize_profile(parse(raw))
    assert summary["samples"] == 4
    assert dict(summary["self_by_package"]) == {"orjson": 75.0, "relay": 25.0}
    assert dict(summary["inclusive_relay"]) == {"relay/ingest.py:Ingest._handle": 100.0}


async def test_process_tree_sees_children_and_their_cpu() -> None:
    """CPU seconds and peak RSS are read for a process and its descendants from /proc."""
    code = "import subprocess,sys; subprocess.run([sys.executable,'-c','while 1: pass'])"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    try:
        tree = ProcessTree(proc.pid)
        deadline = time.monotonic() + 10
        while len(tree.pids()) < 2 or tree.cpu_seconds() < 0.05:
            assert time.monotonic() < deadline, "the child never showed up or never ran"
            await asyncio.sleep(0.02)
        assert tree.pids()[0] == proc.pid
        assert tree.peak_rss() > 2 * 1024 * 1024
    finally:
        for pid in reversed(ProcessTree(proc.pid).pids()):
            os.kill(pid, 9)
        await proc.wait()


async def test_notify_socket_receives_ready(tmp_path: Path) -> None:
    """The runner's NOTIFY_SOCKET gets READY=1 the way systemd would."""
    notify = NotifySocket(tmp_path)
    try:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.sendto(b"STATUS=starting", str(notify.path))
        sender.sendto(b"READY=1\nSTATUS=serving", str(notify.path))
        sender.close()
        at = await asyncio.wait_for(notify.wait_ready(), 5)
        assert at <= time.perf_counter()
    finally:
        notify.close()
    assert not notify.path.exists()


async def test_naive_relay_publishes_confirmed_persistent_copies(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """The yardstick is a real relay: 200 after the confirm, the body as sent, routed by event."""
    tap = await broker.tap(names.exchange, "order.#")
    port = free_port()
    env = child_environ(AMQP_URL=AMQP_URL, EXCHANGE=names.exchange, PORT=str(port))
    argv = [sys.executable, str(ROOT / "bench" / "naive_relay.py")]
    server = Server("naive", argv, env, tmp_path)
    await server.start(lambda: wait_tcp(port))
    try:
        body = fixture_bytes("order.created.json")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/retm/events", data=body) as response,
        ):
            assert response.status == 200
            assert await response.json() == {"status": "accepted"}
        message = await tap.get()
        assert message.body == body
        assert message.routing_key == "order.created"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert tap.empty()
    finally:
        assert await server.stop() == 0


@pytest.mark.parametrize("span", [1, 3])
def test_free_port_ranges_are_bindable(span: int) -> None:
    """free_port(span) gives a port with the next span-1 ports free as well."""
    port = free_port(span)
    for p in range(port, port + span):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


async def _run_json(*argv: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def test_open_loop_client_sends_every_scheduled_request(tmp_path: Path) -> None:
    """At R req/s for S seconds the open-loop client sends R*S measured requests (after its
    warm-up) and reports every answer's status."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "http_ceiling.py"), str(port)]
    server = Server("http", argv, child_environ(), tmp_path)
    await server.start(lambda: wait_tcp(port))
    try:
        url = f"http://127.0.0.1:{port}/retm/events"
        r = await _run_json(
            "-m", "bench.openloop", url, "--rate", "100", "--seconds", "1", "--warmup", "0.2"
        )
    finally:
        await server.stop()
    assert r["count"] == 100
    assert r["statuses"] == {"200": 100}
    assert r["warmup_ok"] == 20
    assert r["non2xx"] == 0
    assert r["errors"] == {}
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]


async def test_confirm_ceiling_publishes_are_routed_and_counted(
    broker: Broker, names: Names
) -> None:
    """Every message the confirm ceiling reports as published is confirmed on the bound queue."""
    assert broker.channel is not None
    exchange = await broker.channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await broker.channel.declare_queue(names("ceiling"), durable=True)
    await queue.bind(exchange, "#")
    broker.forget_later(exchanges=(names.exchange,), queues=(queue.name,))
    r = await _run_json(
        "-m",
        "bench.confirm_ceiling",
        "--amqp-url",
        AMQP_URL,
        "--exchange",
        names.exchange,
        "--seconds",
        "0.5",
        "--warmup",
        "0.1",
        "--in-flight",
        "4",
        "--rate",
        "50",
        "--open-seconds",
        "0.2",
    )
    assert r["open"]["count"] == 10
    assert r["closed"]["requests"] > 0
    declared = await broker.channel.declare_queue(queue.name, passive=True)
    assert declared.declaration_result.message_count == r["published"]
    assert r["published"] >= r["closed"]["requests"] + 10


def test_redis_cleanup_deletes_only_the_runs_keys(tmp_path: Path) -> None:
    """After a Redis run the runner deletes the keys under its own prefix, and nothing else."""
    ctx = Context(
        Options(redis_url=REDIS_URL), uuid.uuid4().hex[:10], tmp_path, Topology(AMQP_URL, {})
    )
    db = REDIS_URL.rsplit("/", 1)[1]
    prefix = ctx.names("redis")["redis_prefix"]
    other = f"test.{uuid.uuid4().hex[:10]}.keep"
    for key in (prefix + "a", prefix + "b", other):
        assert redis_cli("-n", db, "set", key, "1", "EX", "60").strip() == "OK"
    assert cleanup_redis(ctx, "redis") == 2
    assert redis_cli("-n", db, "exists", prefix + "a", prefix + "b").strip() == "0"
    assert redis_cli("-n", db, "exists", other).strip() == "1"
    redis_cli("-n", db, "del", other)
