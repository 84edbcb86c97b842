"""The deployment kit, checked by the real tools: the install script in a scratch root, the
systemd unit by systemd-analyze, the alert rules by promtool (and their metric names against a
live relay), the RabbitMQ definitions imported into a private vhost and used by a relay, and
the nginx example run in front of a relay.

promtool and nginx come from `make tools` (deploy/scripts/ensure-tools.sh); a missing tool
fails the test, it never skips it."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import orjson
import pytest
import yaml

from relay.service import Relay
from relay.settings import load_settings
from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    TOKEN,
    Broker,
    Names,
    StartRelay,
    relay_environ,
    wait_for,
)
from tests.security import ROOT, Certs

UNIT = ROOT / "systemd" / "retm-relay.service"
RULES = ROOT / "deploy" / "prometheus" / "retm-relay.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "retm-relay.rules.test.yml"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
NGINX_SITE = ROOT / "deploy" / "nginx" / "retm-relay.conf"

# Metrics the rules use that other branches add; remove each line once its branch is merged
# (the test then requires the metric from a live relay like every other one).


def tool(name: str) -> str:
    """The path of ``name``: unpacked by ``make tools`` into the venv, or on PATH."""
    for directory in ("usr/bin", "usr/sbin"):
        candidate = Path(sys.prefix) / "tools" / directory / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} is not installed: run `make tools` (deploy/scripts/ensure-tools.sh)")
    return found


def run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


# -- install script ---------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_install_script_in_a_scratch_root_is_idempotent_and_uninstalls(tmp_path: Path) -> None:
    """deploy/install.sh --root DIR installs the venv, unit, configuration and state directory
    under DIR without calling systemctl; a second run upgrades but keeps the operator's files;
    --uninstall keeps configuration and state, --purge removes them."""
    root, source = tmp_path / "root", tmp_path / "source"
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "docs", "relay", "config", "systemd", "deploy"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, source / part)
    script = source / "deploy" / "install.sh"
    etc, opt = root / "etc" / "retm-relay", root / "opt" / "retm-relay"
    state = root / "var" / "lib" / "retm-relay"
    unit = root / "etc" / "systemd" / "system" / "retm-relay.service"

    first = run("bash", script, "--root", root, "--python", sys.executable)
    assert first.returncode == 0, first.stderr

    assert "skipped: systemctl daemon-reload (scratch root)" in first.stdout
    assert "skipped: systemctl enable retm-relay.service (scratch root)" in first.stdout
    assert unit.read_bytes() == UNIT.read_bytes()
    assert (etc / "relay.toml").read_bytes() == (ROOT / "config/relay.example.toml").read_bytes()
    assert (mode(etc), mode(etc / "tls"), mode(state)) == (0o750, 0o750, 0o700)
    assert (mode(etc / "relay.toml"), mode(etc / "relay.env"), mode(unit)) == (0o640, 0o600, 0o644)
    assert (opt / "README.md").read_bytes() == (ROOT / "README.md").read_bytes()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert [p.name for p in sorted((opt / "docs").glob("*.md"))] == [p.name for p in pages] != []
    assert all((opt / "docs" / p.name).read_bytes() == p.read_bytes() for p in pages)
    tokens = re.findall(
        r"^RELAY_AUTH_TOKENS=([A-Za-z0-9_-]{43})$", (etc / "relay.env").read_text(), re.M
    )
    assert len(tokens) == 1
    assert tokens[0] not in first.stdout + first.stderr  # the token is never printed
    assert not (source / "build").exists()  # built from a copy, the checkout stays clean

    relay_cli = opt / "venv" / "bin" / "retm-relay"
    version = run(relay_cli, "--version")
    assert version.stdout.strip() == "retm-relay 0.1.0"
    check = run(
        "sh", "-c", f'set -a; . "{etc}/relay.env"; exec "{relay_cli}" check-config --show '
        f'--config "{etc}/relay.toml"', env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.endswith(f"configuration ok ({etc}/relay.toml)\n")
    assert '"token": "********"' in check.stdout

    # The operator edits the configuration; running the script again keeps it, and with the
    # same source leaves the program alone.
    (etc / "relay.toml").write_text("[http]\nport = 9090\n")
    (etc / "relay.env").write_text("RELAY_AUTH_TOKENS=operator-token\n")
    second = run("bash", script, "--root", root, "--python", sys.executable)
    assert second.returncode == 0, second.stderr
    assert f"kept {etc}/relay.toml" in second.stdout
    assert f"kept {etc}/relay.env" in second.stdout
    assert (etc / "relay.toml").read_text() == "[http]\nport = 9090\n"
    assert (etc / "relay.env").read_text() == "RELAY_AUTH_TOKENS=operator-token\n"
    assert f"kept retm-relay 0.1.0 in {opt}/venv (same source)" in second.stdout

    # A new version of the source: the next run upgrades the program.
    with (source / "relay" / "__init__.py").open("a") as init:
        init.write("UPGRADED = True\n")
    third = run("bash", script, "--root", root, "--python", sys.executable)
    assert third.returncode == 0, third.stderr
    assert f"installed retm-relay 0.1.0 into {opt}/venv" in third.stdout
    upgraded = run(
        opt / "venv" / "bin" / "python", "-c", "import relay; print(relay.UPGRADED)", cwd=root
    )
    assert upgraded.stdout == "True\n", upgraded.stderr
    assert (etc / "relay.toml").read_text() == "[http]\nport = 9090\n"

    refused = run("bash", script, "--root", root, "--purge")
    assert refused.returncode == 2
    assert "--purge goes with --uninstall" in refused.stderr

    removed = run("bash", script, "--root", root, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists()
    assert not opt.exists()
    assert (etc / "relay.toml").exists()
    assert state.is_dir()

    purged = run("bash", script, "--root", root, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not etc.exists()
    assert not state.exists()


def test_install_script_refuses_unknown_arguments() -> None:
    done = run("bash", ROOT / "deploy" / "install.sh", "--frobnicate")
    assert done.returncode == 2
    assert "unknown argument --frobnicate" in done.stderr


# -- systemd unit -----------------------------------------------------------------------------


def test_unit_exposure_is_2_or_lower() -> None:
    """``systemd-analyze security --offline=true`` rates the unit 2.0 or lower."""
    done = run(tool("systemd-analyze"), "security", "--offline=true", UNIT)
    found = re.search(r"Overall exposure level for retm-relay\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.0, done.stdout


def test_unit_verifies_without_warnings_and_reloads_with_sighup(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit with no warning (ExecStart pointed at this
    checkout's retm-relay), and ``systemctl reload`` sends SIGHUP to the main process."""
    text = UNIT.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
    copy = tmp_path / "retm-relay.service"
    copy.write_text(
        text.replace(
            "/opt/retm-relay/venv/bin/retm-relay", str(Path(sys.prefix) / "bin/retm-relay")
        )
    )
    done = run(tool("systemd-analyze"), "verify", copy)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


# -- Prometheus alert rules -------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    """``promtool check rules`` accepts the rules; ``promtool test rules`` proves each alert
    fires on its condition and stays quiet on the look-alikes."""
    promtool = tool("promtool")
    check = run(promtool, "check", "rules", RULES)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 15 rules found" in check.stdout
    tests = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


def test_every_alert_has_a_firing_unit_test_and_operator_text() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tested
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {r["alert"] for r in rules} == firing
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


async def test_every_relay_metric_in_the_rules_exists(
    start_relay: StartRelay, tmp_path: Path, redis_prefix: str
) -> None:
    """Each ``relay_*`` metric the rules use is exported by a running relay (with TLS and the
    Redis dedup store, so their metrics exist too), or is listed as coming from another
    branch."""
    leaf = Certs(tmp_path).issue()
    relay = await start_relay(
        RELAY_HTTP_TLS_CERT=str(leaf.cert),
        RELAY_HTTP_TLS_KEY=str(leaf.key),
        RELAY_DEDUP_BACKEND="redis",
        RELAY_DEDUP_REDIS_URL=REDIS_URL,
        RELAY_DEDUP_REDIS_PREFIX=redis_prefix,
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(relay.url + "/metrics", ssl=False) as response,
    ):
        exposition = await response.text()
    exported = set(re.findall(r"^# HELP (relay_\w+)", exposition, re.M))
    used = set(re.findall(r"\b(relay_[a-z_]+)\b", RULES.read_text()))
    assert used <= exported, used - exported
    assert re.search(r'^relay_ready_check\{check="broker"\} 1\.0$', exposition, re.M)


# -- RabbitMQ definitions ---------------------------------------------------------------------


@pytest.fixture
async def private_vhost() -> AsyncIterator[str]:
    """A vhost of this test's own on the shared broker (deleted afterwards), guest allowed."""
    rabbitmqctl = tool("rabbitmqctl")
    vhost = f"test-{uuid.uuid4().hex[:10]}"
    created = await asyncio.to_thread(run, rabbitmqctl, "add_vhost", vhost)
    assert created.returncode == 0, created.stderr
    try:
        allowed = await asyncio.to_thread(
            run, rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
        )
        assert allowed.returncode == 0, allowed.stderr
        yield vhost
    finally:
        await asyncio.to_thread(run, rabbitmqctl, "delete_vhost", vhost)


def vhost_url(vhost: str, user: str = "guest", password: str = "guest") -> str:
    base = AMQP_URL.rstrip("/").replace("guest:guest@", f"{user}:{password}@")
    return base + "/" + quote(vhost, safe="")


# The broker permissions the README recommends for the relay's user (configure, write, read).
RELAY_PERMISSIONS = (
    r"^retm\.(events|unrouted|rejected|archive)$",
    r"^retm\.(events|unrouted|rejected|archive)$",
    r"^retm\.(unrouted|rejected|archive)$",
)
RELAY_PASSIVE_PERMISSIONS = ("^$", r"^retm\.(events|unrouted|rejected|archive)$", "^$")


@pytest.mark.slow
async def test_definitions_give_consumer_queues_with_dead_lettering(
    private_vhost: str, names: Names, tmp_path: Path
) -> None:
    """The definitions file, imported by rabbitmqctl into a private vhost: erp.orders gets
    ``order.#``, crm.customers gets ``customer.*``; a rejected message and one redelivered past
    the delivery limit are dead-lettered to the queue's own dead-letter queue; and a relay,
    passive or declaring, starts against that topology and feeds the queues."""
    definitions = orjson.loads(DEFINITIONS.read_bytes())
    assert set(definitions) == {"exchanges", "queues", "bindings", "policies"}  # nothing global
    for kind in ("exchanges", "queues", "bindings", "policies"):
        for item in definitions[kind]:
            assert item["vhost"] == "/"
            item["vhost"] = private_vhost
    # rabbitmqctl runs as the rabbitmq user: the file must be readable by it (pytest's
    # tmp_path is not), so it goes to a world-readable file of its own in /tmp.
    with tempfile.NamedTemporaryFile(suffix=".json", dir="/tmp") as imported:
        imported.write(orjson.dumps(definitions))
        imported.flush()
        os.chmod(imported.name, 0o644)
        done = await asyncio.to_thread(
            run, tool("rabbitmqctl"), "import_definitions", imported.name
        )
    assert done.returncode == 0, done.stdout + done.stderr

    user, password = f"test-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    connection = await aio_pika.connect(vhost_url(private_vhost))
    try:
        channel = await connection.channel()

        async def declared() -> bool:  # the import finishes asynchronously
            try:
                probe = await connection.channel()
                await probe.get_queue("crm.customers.dead", ensure=True)
                await probe.close()
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
            return True

        await wait_for(declared, what="the imported queues")
        events = await channel.get_exchange("retm.events")
        for key in (
            "order.created",
            "order.refunded",
            "customer.updated",
            "customer.a.b",
            "menu.x",
        ):
            message = aio_pika.Message(key.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await events.publish(message, routing_key=key)

        orders = await channel.get_queue("erp.orders")
        customers = await channel.get_queue("crm.customers")
        first = await _get(orders)
        second = await _get(orders)
        assert (first.routing_key, second.routing_key) == ("order.created", "order.refunded")
        customer = await _get(customers)
        assert customer.routing_key == "customer.updated"
        assert await orders.get(fail=False) is None
        assert await customers.get(fail=False) is None

        # A consumer rejects a message: it lands in erp.orders.dead, with its history.
        await first.reject(requeue=False)
        await second.ack()
        dead = await _get(await channel.get_queue("erp.orders.dead"))
        assert dead.body == b"order.created"
        death = dead.headers["x-death"][0]
        assert (death["queue"], death["reason"], death["routing-keys"]) == (
            "erp.orders", "rejected", ["order.created"],
        )  # fmt: skip
        await dead.ack()

        # A poison message that crashes its consumer every time: after 5 redeliveries (the
        # policy's delivery-limit) it is dead-lettered instead of looping for ever.
        deliveries = 1
        await customer.nack(requeue=True)
        while (message := await customers.get(fail=False, timeout=5)) is not None:
            deliveries += 1
            await message.nack(requeue=True)
        assert deliveries == 6
        dead = await _get(await channel.get_queue("crm.customers.dead"))
        assert dead.routing_key == "crm.customers"
        assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
        await dead.ack()

        # `retm-relay declare` with the same consumer queues finds exactly these (same
        # arguments), so the file and the command can be used together.
        declare = await asyncio.to_thread(
            run,
            sys.executable, "-m", "relay", "declare",
            cwd=ROOT,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "RELAY_AMQP_URL": vhost_url(private_vhost),
                "RELAY_AMQP_EXCHANGE": "retm.events",
                "RELAY_AMQP_UNROUTED_EXCHANGE": "retm.unrouted",
                "RELAY_AMQP_REJECTED_EXCHANGE": "retm.rejected",
                "RELAY_CONSUMERS_QUEUES": "erp.orders=order.#,crm.customers=customer.*",
            },
        )  # fmt: skip
        assert declare.returncode == 0, declare.stdout + declare.stderr
        assert "crm.customers.dead" in declare.stdout

        # The relay starts against this topology as a broker user with the permissions the
        # README gives: only checking it (passive) or declaring it.
        rabbitmqctl = tool("rabbitmqctl")
        added = await asyncio.to_thread(run, rabbitmqctl, "add_user", user, password)
        assert added.returncode == 0, added.stderr
        for passive, permissions in (
            ("true", RELAY_PASSIVE_PERMISSIONS),
            ("false", RELAY_PERMISSIONS),
        ):
            allowed = await asyncio.to_thread(
                run, rabbitmqctl, "set_permissions", "-p", private_vhost, user, *permissions
            )
            assert allowed.returncode == 0, allowed.stderr
            environ = relay_environ(
                names,
                tmp_path / f"state-{passive}",
                RELAY_AMQP_URL=vhost_url(private_vhost, user, password),
                RELAY_AMQP_EXCHANGE="retm.events",
                RELAY_AMQP_UNROUTED_EXCHANGE="retm.unrouted",
                RELAY_AMQP_REJECTED_EXCHANGE="retm.rejected",
                RELAY_ARCHIVE_QUEUE="retm.archive",
                RELAY_AMQP_PASSIVE=passive,
            )
            relay = Relay(load_settings(None, environ))
            await relay.start()
            try:
                await asyncio.wait_for(relay.wait_durable(), 15)
                body = b'{"event":"order.created","reference":"defs-%s"}' % passive.encode()
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(
                        relay.url + "/retm/events",
                        data=body,
                        headers={
                            "Authorization": f"Bearer {TOKEN}",
                            "Content-Type": "application/json",
                        },
                    ) as response,
                ):
                    assert response.status == 200, await response.text()
            finally:
                await relay.stop()
            message = await _get(orders)
            assert message.body == body
            await message.ack()
    finally:
        await connection.close()
        await asyncio.to_thread(run, tool("rabbitmqctl"), "delete_user", user)


async def _get(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (message := await queue.get(fail=False)) is None:
        if loop.time() > deadline:
            pytest.fail(f"no message on {queue.name}")
        await asyncio.sleep(0.02)
    return message


# -- nginx ------------------------------------------------------------------------------------


def nginx_main(directory: Path, site: str) -> Path:
    """An nginx.conf of the test's own (pid, logs, temp files under ``directory``) that
    includes ``site`` as /etc/nginx/nginx.conf includes sites-enabled/."""
    (directory / "site.conf").write_text(site)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"pid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log warn;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {directory}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {directory}/site.conf;\n"
        "}\n"
    )
    return conf


def site_with(certificate: Any, **replacements: str) -> str:
    text = NGINX_SITE.read_text()
    replacements = {
        "/etc/letsencrypt/live/relay.example.com/fullchain.pem": str(certificate.cert),
        "/etc/letsencrypt/live/relay.example.com/privkey.pem": str(certificate.key),
        **replacements,
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_nginx_example_passes_nginx_t(tmp_path: Path) -> None:
    """``nginx -t`` accepts the example as shipped (only the certificate paths filled in)."""
    leaf = Certs(tmp_path).issue("relay.example.com")
    conf = nginx_main(tmp_path, site_with(leaf))
    done = run(tool("nginx"), "-t", "-p", tmp_path, "-c", conf, "-e", tmp_path / "error.log")
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
async def test_nginx_example_terminates_tls_in_front_of_a_relay(
    start_relay: StartRelay, broker: Broker, names: Names, tmp_path: Path
) -> None:
    """The example, run for real in front of a relay that trusts it as a proxy: a client
    allowed by the relay's allow-list posts over HTTPS and the event is published; another
    client is refused even when it forges X-Forwarded-For; monitoring is for the local network
    only; bodies over 1 MiB stop at nginx."""
    relay = await start_relay(
        RELAY_HTTP_TRUSTED_PROXIES="127.0.0.1", RELAY_HTTP_ALLOW_SOURCES="127.0.0.2/32"
    )
    tap = await broker.tap(names.exchange)
    certs = Certs(tmp_path)
    leaf = certs.issue("relay.example.com")
    port = free_port()
    relay_port = relay.relay.addresses[0][1]
    site = site_with(
        leaf,
        **{
            "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
            "listen [::]:443 ssl http2;": "",
            "server 127.0.0.1:8080;": f"server 127.0.0.1:{relay_port};",
        },
    )
    conf = nginx_main(tmp_path, site)
    nginx = await asyncio.create_subprocess_exec(
        tool("nginx"), "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log"),
        "-g", "daemon off; master_process off;",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_for(listening, what="nginx listening")
        url = f"https://127.0.0.1:{port}"
        context = certs.client_context()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        body = b'{"event":"order.created","reference":"via-nginx"}'

        async def post(source: str, data: bytes | io.BytesIO, **extra: str) -> tuple[int, bytes]:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=context)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post(
                    url + "/retm/events",
                    data=data,
                    headers={**headers, **extra},
                    server_hostname="relay.example.com",
                ) as response,
            ):
                return response.status, await response.read()

        async def get(source: str, path: str) -> int:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=context)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(url + path, server_hostname="relay.example.com") as response,
            ):
                return response.status

        status, answer = await post("127.0.0.2", body)
        assert status == 200, answer
        assert orjson.loads(answer)["status"] == "accepted"
        assert (await tap.get()).body == body

        status, answer = await post("127.0.0.3", body, **{"X-Forwarded-For": "127.0.0.2"})
        assert status == 403
        assert orjson.loads(answer)["error"] == "source_not_allowed"

        status, _ = await post("127.0.0.2", io.BytesIO(b"{" + b" " * (1024 * 1024) + b"}"))
        assert status == 413

        assert await get("127.0.0.1", "/metrics") == 200
        assert await get("127.0.0.2", "/metrics") == 403  # nginx: not the local network list
        assert await get("127.0.0.2", "/admin") == 404
        assert tap.empty()
    finally:
        nginx.terminate()
        await nginx.wait()
