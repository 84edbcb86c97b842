"""TLS: the HTTPS listener's certificate, loaded at start-up and reloaded on SIGHUP.

RETM only calls HTTPS URLs (docs/retm.md, "Transport"), so the relay either terminates TLS itself
(``http.tls_cert``, ``http.tls_key``) or sits behind a proxy that does.

Reloading swaps contexts rather than loading the new files into the live one: a failed
``load_cert_chain`` (a renewed certificate whose key is not written yet, say) leaves an
``SSLContext`` holding the new certificate without its key, and every handshake after that
fails. So ``CertificateStore.reload`` builds a complete new context from the files and, only
when that succeeds, makes it current; the listener's context has a ``sni_callback`` that hands
each new handshake the current one. OpenSSL calls it for every ClientHello, with or without
SNI. Connections already established keep the context they were made with, so nothing is
dropped; a bad new certificate leaves the old one in service and logs one error.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import structlog

from relay.errors import ConfigError

log = structlog.get_logger("relay.tls")


def _no_password() -> bytes:
    raise ConfigError("http.tls_key", "is encrypted; the relay needs an unencrypted key file")


def load_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for HTTP/1.1 over TLS 1.2 or 1.3 with the PEM chain at ``cert`` (leaf
    first) and its unencrypted PEM private key at ``key``.

    Raises ConfigError naming ``http.tls_cert`` or ``http.tls_key``: unreadable file, not PEM,
    encrypted key, or a key that does not match the certificate. The message never contains
    key material.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:  # before OSError, its base class
        raise _diagnose(cert, key, exc) from None
    except OSError as exc:  # the file name is not in the exception: find which one
        for which, path in (("http.tls_cert", cert), ("http.tls_key", key)):
            try:
                path.open("rb").close()
            except OSError as err:
                raise ConfigError(which, f"cannot read {path}: {err.strerror}") from None
        raise ConfigError("http.tls_cert", f"cannot load {cert}: {exc.strerror}") from None
    return context


def _diagnose(cert: Path, key: Path, exc: ssl.SSLError) -> ConfigError:
    """Say which of the two files is wrong: OpenSSL only says "PEM lib"."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return ConfigError("http.tls_key", f"{key} is not the private key of {cert}")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)  # parses every certificate in the file
    except ssl.SSLError:
        return ConfigError("http.tls_cert", f"{cert} is not a PEM certificate chain")
    return ConfigError("http.tls_key", f"{key} is not a PEM private key for {cert}")


class CertificateStore:
    """The listener's TLS context and the certificate it currently serves.

    ``context`` is given to the listener once; ``reload()`` re-reads ``cert`` and ``key`` and
    makes new handshakes use them. Raises ConfigError (as ``load_context``) at construction.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = load_context(cert, key)
        self._current = self.context
        self.context.sni_callback = self._select
        #: reloads that succeeded and failed since start-up
        self.reloads = 0
        self.reload_failures = 0

    def _select(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self._current
        if current is not self.context:
            connection.context = current

    def reload(self) -> bool:
        """Load the files again; True when new connections now get them. On failure the
        previous certificate stays in service and one ``tls.reload_failed`` error is logged."""
        try:
            context = load_context(self.cert, self.key)
        except ConfigError as exc:
            self.reload_failures += 1
            log.error("tls.reload_failed", key=exc.key, error=exc.message)
            return False
        self._current = context
        self.reloads += 1
        log.info("tls.reloaded", cert=str(self.cert))
        return True
