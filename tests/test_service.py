"""The service as an operator runs it: a real process, real signals, systemd notifications."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import pytest

from relay.http.app import HEALTH, PUBLISHER
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    StartRelay,
    assert_only_sentinel_follows,
    fixture_bytes,
    proxy_url,
    relay_environ,
    wait_for,
)
from tests.proxy import FaultProxy


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, token: str = TOKEN) -> int:
    async with session.post(
        url + "/retm/events",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as response:
        await response.read()
        return response.status


async def test_sigterm_with_requests_in_flight_loses_nothing(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """SIGTERM while events stream in: every event answered 2xx is on the queue, every event on
    the queue was answered 2xx, and the process exits 0 after a clean shutdown."""
    tap = await broker.tap(names.exchange)
    relay = await RelayProcess(relay_environ(names, tmp_path)).start()
    await relay.wait_log("relay.ready")
    accepted: list[bytes] = []
    failed: list[bytes] = []
    sent = 0

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal sent
        for i in range(10_000):
            body = orjson.dumps({"event": "order.created", "reference": f"{n}-{i}"})
            sent += 1
            try:
                status = await _post(session, relay.url, body)
            except aiohttp.ClientError:
                failed.append(body)
                return
            (accepted if status == 200 else failed).append(body)
            if status != 200:
                return

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(n, session)) for n in range(16)]
        await wait_for(lambda: len(accepted) >= 200, what="200 accepted events")
        relay.signal(signal.SIGTERM)
        await asyncio.gather(*clients)

    assert await relay.wait() == 0
    await relay.wait_log("relay.stopped")
    received = [m.body for m in await tap.take(len(accepted))]
    assert sorted(received) == sorted(accepted)
    assert tap.empty()
    assert not set(failed) & set(received)
    assert len(accepted) + len(failed) == sent


async def test_systemd_notify_ready_watchdog_stopping(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """Under systemd: READY=1 once listening with the broker link up, WATCHDOG=1 pings when
    WATCHDOG_USEC is set, STOPPING=1 on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    environ = relay_environ(
        names, tmp_path / "state", NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="200000"
    )
    relay = await RelayProcess(environ).start()
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def until(predicate_text: str) -> None:
        async with asyncio.timeout(15):
            while not any(predicate_text in m for m in messages):
                messages.append((await loop.sock_recv(sock, 4096)).decode())

    await until("READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert f"STATUS=serving on {relay.url}" in ready
    await until("WATCHDOG=1")
    relay.signal(signal.SIGTERM)
    await until("STOPPING=1")
    assert await relay.wait() == 0
    sock.close()


async def test_topology_mismatch_stops_start_with_one_clear_error(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """An exchange of the relay's name but another type stops the start: exit 1, one error
    line naming the exchange, no traceback."""
    assert broker.channel is not None
    await broker.channel.declare_exchange(names.exchange, aio_pika.ExchangeType.DIRECT)
    broker.forget_later(exchanges=(names.exchange,))

    relay = await RelayProcess(relay_environ(names, tmp_path)).start(wait_listening=False)

    assert await relay.wait() == 1
    errors = [line for line in relay.lines if line.get("level") == "error"]
    assert len(errors) == 1, relay.output()
    assert errors[0]["event"] == "relay.start_failed"
    assert (
        f"exchange '{names.exchange}' exists on the broker with another type" in errors[0]["error"]
    )
    assert "Traceback" not in relay.output()


async def test_port_in_use_stops_start(broker: Broker, names: Names, tmp_path: Path) -> None:
    """A busy port is one clear error and exit 1."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    environ = relay_environ(names, tmp_path, RELAY_HTTP_PORT=str(port))

    relay = await RelayProcess(environ).start(wait_listening=False)

    assert await relay.wait() == 1
    busy.close()
    error = await relay.wait_log("relay.start_failed")
    assert error["error"] == f"http.host/http.port 127.0.0.1:{port} is in use"


async def test_configuration_error_exits_2(names: Names, tmp_path: Path) -> None:
    """A bad setting stops ``serve`` with exit 2 and the key in the message."""
    environ = relay_environ(names, tmp_path, RELAY_AMQP_PUBLISH_TIMEOUT="soon")
    relay = await RelayProcess(environ).start(wait_listening=False)
    assert await relay.wait() == 2
    assert "amqp.publish_timeout" in relay.output()


async def test_logs_are_json_lines_and_never_contain_a_token(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """One JSON line per webhook with outcome, event, key, routing key and latency; neither the
    accepted token nor a wrong one ever appears in the output."""
    wrong = "wrong-secret-token-value"
    relay = await RelayProcess(relay_environ(names, tmp_path)).start()
    await relay.wait_log("relay.ready")
    async with aiohttp.ClientSession() as session:
        assert await _post(session, relay.url, fixture_bytes("order.created.json")) == 200
        assert await _post(session, relay.url, fixture_bytes("order.created.json")) == 200
        assert await _post(session, relay.url, b"{}", token=wrong) == 401
    relay.signal(signal.SIGTERM)
    assert await relay.wait() == 0

    output = relay.output()
    assert TOKEN not in output
    assert wrong not in output
    assert "guest:guest" not in output
    assert all(line["event"] != "<non-json>" for line in relay.lines), output
    accepted = next(line for line in relay.lines if line["event"] == "webhook.accepted")
    assert accepted["outcome"] == "accepted"
    assert accepted["retm_event"] == "order.created"
    assert accepted["routing_key"] == "order.created"
    assert accepted["key"].endswith(":order.created:e10270cd-1273-419e-8545-89ce060e6539")
    assert isinstance(accepted["latency_ms"], float)
    assert isinstance(accepted["request_id"], str)
    duplicate = next(line for line in relay.lines if line["event"] == "webhook.duplicate")
    assert duplicate["key"] == accepted["key"]
    rejected = next(line for line in relay.lines if line["event"] == "webhook.rejected")
    assert (rejected["status"], rejected["reason"]) == (401, "unauthorized")


async def test_broker_unreachable_at_start_spools_then_forwards(
    start_relay: StartRelay, broker: Broker, names: Names, fault_proxy: FaultProxy
) -> None:
    """No broker at start-up: the relay still listens and accepts (the event is spooled, the
    answer does not wait for the publish deadline), readiness is 503 "degraded" with the
    reason; once the broker answers, the spooled event is forwarded without a restart and
    readiness is 200."""
    fault_proxy.cut()
    relay = await start_relay(RELAY_AMQP_URL=proxy_url(fault_proxy), RELAY_AMQP_PUBLISH_TIMEOUT="9")
    tap = await broker.tap(names.exchange)
    raw = fixture_bytes("customer.deleted.json")

    loop = asyncio.get_running_loop()
    started = loop.time()
    down = await relay.event(raw)
    elapsed = loop.time() - started
    ready = await relay.get("/readyz")

    assert (down.status, down.body["status"]) == (200, "accepted")
    assert elapsed < 9, "answered only after the publish deadline"
    assert ready.status == 503
    assert ready.body["status"] == "degraded"
    assert ready.body["reasons"]["broker"].startswith("broker link down")
    assert ready.body["reasons"]["broker"].endswith("events are spooled")
    assert (await relay.get("/healthz")).status == 200

    fault_proxy.restore()
    assert (await tap.get(timeout=20)).body == raw
    await wait_for(relay.relay.app[PUBLISHER].connected.is_set, timeout=20)
    await wait_for(lambda: relay.relay.app[HEALTH].readiness()[0], what="readiness")
    assert (await relay.get("/readyz")).status == 200
    await assert_only_sentinel_follows(relay, tap, event="customer.deleted")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_health_routes_need_no_token(start_relay: StartRelay, method: str) -> None:
    """Liveness, readiness, details and metrics answer without a token."""
    relay = await start_relay()
    for path in ("/healthz", "/readyz", "/health", "/metrics"):
        answer = await relay.get(path, method=method)
        assert answer.status == 200, path
