"""Built-in HTTPS: only clients that trust the certificate get in, a bad certificate stops the
start naming the key, and SIGHUP serves a new certificate to new connections without dropping
the established ones (a real ``python -m relay serve`` process and a real signal)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from relay.errors import ConfigError
from relay.service import Relay, StartupError
from relay.settings import load_settings
from tests.cli import cli_environ, closed_port, run_cli
from tests.conftest import (
    TOKEN,
    Broker,
    Names,
    RelayProcess,
    StartRelay,
    relay_environ,
    wait_for,
)
from tests.security import Certs, get, open_https, read_response
from tests.test_workers import StartWorkers, Supervised, start_workers  # noqa: F401 - fixture

BODY = b'{"event":"order.created","reference":"tls-1"}'


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


async def test_client_trusting_the_ca_gets_in_and_others_do_not(
    start_relay: StartRelay, certs: Certs, broker: Broker, names: Names
) -> None:
    """With http.tls_cert/http.tls_key the relay serves HTTPS: a client that trusts the CA
    posts an event; one that does not fails the handshake; plain HTTP gets no answer."""
    leaf = certs.issue()
    relay = await start_relay(RELAY_HTTP_TLS_CERT=str(leaf.cert), RELAY_HTTP_TLS_KEY=str(leaf.key))
    tap = await broker.tap(names.exchange)
    assert relay.url.startswith("https://127.0.0.1:")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    async with aiohttp.ClientSession() as session:
        async with session.post(
            relay.url + "/retm/events", data=BODY, headers=headers, ssl=certs.client_context()
        ) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "accepted"
        message = await tap.get()
        assert message.body == BODY

        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.post(relay.url + "/retm/events", data=BODY, headers=headers)

        plain = relay.url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            await session.get(plain + "/healthz")

    assert tap.empty()


async def test_tls_connection_presents_the_configured_certificate(
    start_relay: StartRelay, certs: Certs
) -> None:
    """The certificate served is exactly the configured leaf, with or without SNI."""
    leaf = certs.issue()
    relay = await start_relay(RELAY_HTTP_TLS_CERT=str(leaf.cert), RELAY_HTTP_TLS_KEY=str(leaf.key))
    host, port = relay.relay.addresses[0]
    for server_hostname in ("localhost", "127.0.0.1"):  # an IP address sends no SNI
        reader, writer, der = await open_https(host, port, certs.client_context(), server_hostname)
        assert der == leaf.der
        assert await get(reader, writer, "/healthz") == 200
        writer.close()


async def test_send_reaches_a_tls_relay_by_trusting_its_own_certificate(
    start_relay: StartRelay, certs: Certs, broker: Broker, names: Names, tmp_path: Path
) -> None:
    """``retm-relay send`` with the relay's settings posts over HTTPS to the loopback address,
    trusting exactly http.tls_cert; a relay presenting another certificate is refused."""
    port = closed_port()
    leaf = certs.issue()
    tls = {"RELAY_HTTP_TLS_CERT": str(leaf.cert), "RELAY_HTTP_TLS_KEY": str(leaf.key)}
    await start_relay(RELAY_HTTP_PORT=str(port), **tls)
    tap = await broker.tap(names.exchange)
    config = tmp_path / "empty.toml"
    config.write_text("")
    settings = {"RELAY_HTTP_PORT": str(port), "RELAY_AUTH_TOKENS": TOKEN}

    sent = await run_cli("send", "-", env=cli_environ(config, **settings, **tls), stdin=BODY)

    assert sent.code == 0, sent
    assert sent.stdout.startswith('200 {"status":"accepted"')
    assert (await tap.get()).body == BODY

    (tmp_path / "other").mkdir()
    other = Certs(tmp_path / "other").issue()  # same names, another CA
    tls = {"RELAY_HTTP_TLS_CERT": str(other.cert), "RELAY_HTTP_TLS_KEY": str(other.key)}
    refused = await run_cli("send", "-", env=cli_environ(config, **settings, **tls), stdin=BODY)
    assert refused.code == 1
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert tap.empty()


@pytest.mark.parametrize(
    ("case", "key", "message"),
    [
        ("garbage-cert", "http.tls_cert", "is not a PEM certificate chain"),
        ("garbage-key", "http.tls_key", "is not a PEM private key for"),
        ("other-key", "http.tls_key", "is not the private key of"),
        ("key-as-cert", "http.tls_cert", "is not a PEM certificate chain"),
    ],
)
async def test_bad_certificate_stops_the_start_naming_the_key(
    certs: Certs, names: Names, tmp_path: Path, case: str, key: str, message: str
) -> None:
    """A file that is not what its setting says stops the start with one error naming it."""
    leaf, other = certs.issue(), certs.issue()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cert, key_file = {
        "garbage-cert": (garbage, leaf.key),
        "garbage-key": (leaf.cert, garbage),
        "other-key": (leaf.cert, other.key),
        "key-as-cert": (leaf.key, leaf.key),
    }[case]
    environ = relay_environ(
        names, tmp_path / "state", RELAY_HTTP_TLS_CERT=str(cert), RELAY_HTTP_TLS_KEY=str(key_file)
    )
    relay = Relay(load_settings(None, environ))
    with pytest.raises(StartupError) as caught:
        await relay.start()
    assert str(caught.value).startswith(f"{key}: ")
    assert message in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"RELAY_HTTP_TLS_CERT": "{missing}", "RELAY_HTTP_TLS_KEY": "{key}"}, "http.tls_cert",
         "cannot read"),
        ({"RELAY_HTTP_TLS_CERT": "{cert}", "RELAY_HTTP_TLS_KEY": "{missing}"}, "http.tls_key",
         "cannot read"),
        ({"RELAY_HTTP_TLS_CERT": "{cert}"}, "http.tls_key", "go together"),
        ({"RELAY_HTTP_TLS_KEY": "{key}"}, "http.tls_cert", "go together"),
    ],
)  # fmt: skip
def test_unreadable_or_half_tls_settings_are_configuration_errors(
    certs: Certs, tmp_path: Path, overrides: dict[str, str], key: str, message: str
) -> None:
    """Validation (and so ``check-config``) names the TLS key that is missing or unreadable."""
    leaf = certs.issue()
    paths = {"cert": leaf.cert, "key": leaf.key, "missing": tmp_path / "missing.pem"}
    environ = {name: value.format(**paths) for name, value in overrides.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ)
    assert caught.value.key == key
    assert message in caught.value.message


@pytest.mark.slow
async def test_sighup_serves_the_new_certificate_to_new_connections_only(
    certs: Certs, names: Names, tmp_path: Path
) -> None:
    """A real relay process: after the files are replaced and SIGHUP sent, new connections get
    the new certificate while an established connection keeps working on the old one; a bad
    replacement keeps the last good certificate and logs exactly one error."""
    first = certs.issue()
    cert, key = first.cert, first.key
    environ = relay_environ(
        names, tmp_path / "state", RELAY_HTTP_TLS_CERT=str(cert), RELAY_HTTP_TLS_KEY=str(key)
    )
    relay = RelayProcess(environ)
    try:
        await relay.start()
        assert relay.url.startswith("https://127.0.0.1:")
        port = int(relay.url.rsplit(":", 1)[1])
        context = certs.client_context()

        old_reader, old_writer, der = await open_https("127.0.0.1", port, context)
        assert der == first.der
        assert await get(old_reader, old_writer, "/healthz") == 200

        second = certs.issue(cert=cert, key=key)
        relay.signal(signal.SIGHUP)
        await relay.wait_log("tls.reloaded")

        reader, writer, der = await open_https("127.0.0.1", port, context)
        assert der == second.der
        assert await get(reader, writer, "/healthz") == 200
        writer.close()
        # The established connection was not dropped and still speaks with the old certificate.
        assert await get(old_reader, old_writer, "/readyz") in (200, 503)
        assert old_writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == first.der

        # A renewal caught half-way: the new certificate is there, its key is not yet.
        third = certs.issue()
        cert.write_bytes(third.cert.read_bytes())
        relay.signal(signal.SIGHUP)
        failed = await relay.wait_log("tls.reload_failed")
        assert failed["level"] == "error"
        assert failed["key"] == "http.tls_key"
        reader, writer, der = await open_https("127.0.0.1", port, context)
        assert der == second.der
        assert await get(reader, writer, "/healthz") == 200

        # The key arrives; the next SIGHUP completes the renewal.
        key.write_bytes(third.key.read_bytes())
        relay.signal(signal.SIGHUP)
        await wait_for(lambda: len(events(relay, "tls.reloaded")) == 2, what="second reload")
        assert len(events(relay, "tls.reload_failed")) == 1
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200
        assert b"relay_tls_reloads_total 2.0" in body
        assert b"relay_tls_reload_failures_total 1.0" in body
        writer.close()
        reader, writer, der = await open_https("127.0.0.1", port, context)
        assert der == third.der
        writer.close()
        old_writer.close()

        relay.signal(signal.SIGTERM)
        assert await relay.wait() == 0
    finally:
        await relay.kill()


def events(relay: RelayProcess, name: str) -> list[dict[str, object]]:
    return [line for line in relay.lines if line.get("event") == name]


@pytest.mark.slow
async def test_sighup_reaches_every_worker(start_workers: StartWorkers, certs: Certs) -> None:  # noqa: F811
    """With http.workers = 2, SIGHUP to the supervisor (what ``systemctl reload`` sends) makes
    every worker reload: new connections on the shared port and on each worker's own port get
    the new certificate, and the supervisor and its workers keep running."""
    first = certs.issue()
    tls = {"RELAY_HTTP_TLS_CERT": str(first.cert), "RELAY_HTTP_TLS_KEY": str(first.key)}
    group: Supervised = await start_workers(**tls)
    starting = await group.event("workers.starting")
    await group.notified("READY=1")
    urls = [starting["url"], *starting["worker_urls"]]
    assert all(url.startswith("https://127.0.0.1:") for url in urls), urls
    ports = [int(url.rsplit(":", 1)[1]) for url in urls]
    context = certs.client_context()

    async def served(port: int) -> bytes:
        reader, writer, der = await open_https("127.0.0.1", port, context)
        assert await get(reader, writer, "/healthz") == 200
        writer.close()
        return der

    assert {await served(port) for port in ports * 2} == {first.der}

    second = certs.issue(cert=first.cert, key=first.key)
    group.process.send_signal(signal.SIGHUP)
    await group.wait(lambda: len(group.events("tls.reloaded")) == 2, "both workers reloaded")

    # The kernel spreads connections on the shared port over both workers: ask several times.
    assert {await served(port) for port in ports * 4} == {second.der}
    assert group.process.returncode is None
    assert len(group.events("workers.worker_ready")) == 2  # no worker was restarted
    group.process.send_signal(signal.SIGTERM)
    assert await group.exit_code() == 0


async def test_a_handshake_that_never_ends_is_closed_after_the_read_timeout(
    start_relay: StartRelay, certs: Certs
) -> None:
    """A client that sends the first bytes of a ClientHello and stops is disconnected after
    ``http.read_timeout`` (here 1 s; the event loop's own default is 60 s), so half-open
    handshakes cannot hold the relay's file descriptors; a real client still gets in."""
    leaf = certs.issue()
    relay = await start_relay(
        RELAY_HTTP_TLS_CERT=str(leaf.cert),
        RELAY_HTTP_TLS_KEY=str(leaf.key),
        RELAY_HTTP_READ_TIMEOUT="1",
    )
    host, port = relay.relay.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"\x16\x03\x01")  # a TLS record header, and nothing more
        await writer.drain()
        async with asyncio.timeout(15):  # the handshake timeout, not the loop's 60 s
            rest = await reader.read()
    finally:
        writer.close()
    async with (
        aiohttp.ClientSession() as session,
        session.get(relay.url + "/healthz", ssl=certs.client_context()) as answer,
    ):
        status = answer.status

    assert rest == b""
    assert status == 200
