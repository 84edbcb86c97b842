"""The load-balancer examples for several relays (docs/several-machines.md): the nginx upstream
example passes ``nginx -t``, the HAProxy example passes ``haproxy -c``, and HAProxy, run as
shipped (only the certificate and the relays' addresses filled in), balances webhooks over two
relays and stops sending them to one whose /readyz fails. nginx and haproxy come from `make
tools` (deploy/scripts/ensure-tools.sh) when they are not on the PATH."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from relay.http.app import METRICS
from tests.cli import closed_port
from tests.conftest import TOKEN, RunningRelay, StartRelay, free_port, wait_for
from tests.security import Certs
from tests.test_deploy import nginx_main, run, tool

ROOT = Path(__file__).resolve().parent.parent
NGINX_UPSTREAMS = ROOT / "deploy" / "nginx" / "retm-relay-upstreams.conf"
HAPROXY = ROOT / "deploy" / "haproxy" / "retm-relay.cfg"
RELAYS = ("10.0.0.21:8080", "10.0.0.22:8080", "10.0.0.23:8080")


def haproxy_environ() -> dict[str, str]:
    """haproxy unpacked by `make tools` finds its libraries (liblua ...) next to it."""
    libraries = [str(p) for p in (Path(sys.prefix) / "tools" / "usr" / "lib").glob("*-linux-*")]
    path = ":".join([*libraries, os.environ.get("LD_LIBRARY_PATH", "")]).strip(":")
    return {**os.environ, "LD_LIBRARY_PATH": path}


def haproxy_config(directory: Path, **replacements: str) -> Path:
    """The example with ``replacements`` made (each text must occur exactly once) and the
    certificate pointed at a test certificate (cert and key in one PEM file)."""
    leaf = Certs(directory).issue("relay.example.com")
    pem = directory / "relay.pem"
    pem.write_bytes(leaf.cert.read_bytes() + leaf.key.read_bytes())
    text = HAPROXY.read_text()
    for old, new in {"/etc/haproxy/certs/relay.example.com.pem": str(pem), **replacements}.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = directory / "haproxy.cfg"
    path.write_text(text)
    return path


def test_nginx_upstream_example_passes_nginx_t(tmp_path: Path) -> None:
    """``nginx -t`` accepts the several-relays example (only the certificate paths filled)."""
    leaf = Certs(tmp_path).issue("relay.example.com")
    site = NGINX_UPSTREAMS.read_text()
    for old, new in {
        "/etc/letsencrypt/live/relay.example.com/fullchain.pem": str(leaf.cert),
        "/etc/letsencrypt/live/relay.example.com/privkey.pem": str(leaf.key),
    }.items():
        assert site.count(old) == 1
        site = site.replace(old, new)
    conf = nginx_main(tmp_path, site)

    done = run(tool("nginx"), "-t", "-p", tmp_path, "-c", conf, "-e", tmp_path / "error.log")

    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    assert all(f"server {relay} max_fails=2 fail_timeout=5s;" in site for relay in RELAYS)


def test_haproxy_example_passes_haproxy_c(tmp_path: Path) -> None:
    """``haproxy -c`` accepts the example (only the certificate filled in); it health-checks
    the relays on /readyz."""
    conf = haproxy_config(tmp_path)

    done = run(tool("haproxy"), "-c", "-f", conf, env=haproxy_environ())

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout
    text = conf.read_text()
    assert "http-check send meth GET uri /readyz" in text
    assert all(f"10.0.0.{n}:8080" in text for n in (21, 22, 23))


@pytest.fixture
async def two_relays(start_relay: StartRelay) -> tuple[RunningRelay, RunningRelay]:
    """A ready relay and one whose broker does not answer (its /readyz says degraded)."""
    ready = await start_relay()
    unready = await start_relay(
        RELAY_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{closed_port()}/", wait_durable=True
    )
    return ready, unready


@pytest.mark.slow
async def test_haproxy_sends_webhooks_only_to_ready_relays(
    two_relays: tuple[RunningRelay, RunningRelay], tmp_path: Path
) -> None:
    """HAProxy as shipped, in front of two relays (the third address replaced by a closed
    port): once its /readyz checks have run, every webhook goes to the ready relay and is
    answered 200; the relay whose broker is away gets none."""
    ready, unready = two_relays
    port = free_port()
    ports = [r.url.rsplit(":", 1)[1] for r in (ready, unready)]
    conf = haproxy_config(
        tmp_path,
        **{
            "bind :443": f"bind 127.0.0.1:{port}",
            "10.0.0.21:8080": f"127.0.0.1:{ports[0]}",
            "10.0.0.22:8080": f"127.0.0.1:{ports[1]}",
            "10.0.0.23:8080": f"127.0.0.1:{closed_port()}",
            "inter 2s fall 2 rise 2": "inter 200ms fall 2 rise 2",
        },
    )
    haproxy = await asyncio.create_subprocess_exec(
        tool("haproxy"), "-db", "-f", str(conf), env=haproxy_environ(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}/retm/events"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    counts = [r.relay.app[METRICS] for r in (ready, unready)]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:

            async def post(n: int) -> int:
                body = b'{"event":"order.created","reference":"lb-%d"}' % n
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        return response.status
                except aiohttp.ClientError:
                    return 0

            async def only_the_ready_relay() -> bool:
                before = counts[1].counts.get("accepted", 0) + counts[1].counts.get("spooled", 0)
                statuses = [await post(n) for n in range(10)]
                after = counts[1].counts.get("accepted", 0) + counts[1].counts.get("spooled", 0)
                return statuses == [200] * 10 and after == before

            await wait_for(only_the_ready_relay, timeout=30, what="HAProxy to mark relays")
            statuses = [await post(100 + n) for n in range(20)]
    finally:
        haproxy.terminate()
        await haproxy.wait()

    assert statuses == [200] * 20
