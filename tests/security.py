"""Helpers for the TLS, access and deployment tests: certificates made with trustme, and raw
HTTP/1.1 over a socket for what aiohttp's client will not do (``Expect: 100-continue`` without
sending the body, several requests on one TLS connection)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Certificate:
    """A leaf certificate written to ``cert`` (chain, leaf first) and ``key`` (PEM)."""

    cert: Path
    key: Path
    der: bytes  # the leaf, as a TLS peer presents it


class Certs:
    """A test CA (trustme) that issues certificates for ``localhost`` and 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.count = 0

    def issue(self, *names: str, cert: Path | None = None, key: Path | None = None) -> Certificate:
        """Issue a certificate and write it (to ``cert``/``key`` when given, replacing them
        atomically as a certificate renewal tool would)."""
        self.count += 1
        leaf = self.ca.issue_cert(*(names or ("localhost", "127.0.0.1")))
        cert = cert or self.directory / f"cert{self.count}.pem"
        key = key or self.directory / f"key{self.count}.pem"
        _replace(cert, b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        _replace(key, leaf.private_key_pem.bytes())
        der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        return Certificate(cert, key, der)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


async def open_https(
    host: str, port: int, context: ssl.SSLContext, server_hostname: str = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A TLS connection; returns the streams and the DER of the certificate the server sent."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=server_hostname
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, der


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-cased names), body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
    return int(status_line.split()[1]), headers, body


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """GET ``path`` on an open keep-alive connection; returns the status."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    status, _, _ = await read_response(reader)
    return status
