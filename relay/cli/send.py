"""``retm-relay send``: post bodies to a running relay as RETM would, and print its answers.

The operator's smoke test. The URL defaults to the relay of the settings
(``http://<http.host>:<http.port><http.events_path>``, a wildcard host read as loopback;
``https://`` when the relay has ``http.tls_cert``, trusting exactly that certificate); the
Bearer token is the first of ``auth.tokens`` unless one is given. The token is sent in the
``Authorization`` header only: never printed, never sent on a redirect (redirects are not
followed) and never through a proxy from the environment.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO

from relay import __version__
from relay.errors import ConfigError
from relay.settings import Settings

WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapped away


def default_url(settings: Settings, path: str) -> str:
    """``http://host:port<path>`` of the relay described by ``settings`` (``https://`` with
    ``http.tls_cert``).

    Raises ConfigError("http.port") when the port is 0 (any free port: only the relay's log
    knows which), so the caller asks for ``--url``.
    """
    http = settings.http
    if http.port == 0:
        raise ConfigError("http.port", "is 0 (any free port); pass --url with the relay's address")
    host = WILDCARD_HOSTS.get(http.host, http.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if http.tls_cert is not None else "http"
    return f"{scheme}://{host}:{http.port}{path}"


def own_relay_context(settings: Settings) -> ssl.SSLContext | None:
    """For the default URL of a relay with ``http.tls_cert``: a context that trusts exactly the
    certificates in that file (the leaf itself is a trust anchor), and no others. The default
    URL names a loopback address, not the certificate's name, so the host name is not checked;
    the pinned certificate is what proves it is the relay. None without TLS.

    Raises ConfigError("http.tls_cert") when the file cannot be read as PEM certificates.
    """
    cert = settings.http.tls_cert
    if cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=cert)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("http.tls_cert", f"cannot use {cert} to check the relay: {exc}") from None
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def first_token(settings: Settings) -> str | None:
    """The first of ``auth.tokens``, or None when none is configured."""
    return settings.auth.tokens[0].token.value if settings.auth.tokens else None


@dataclass(frozen=True, slots=True)
class Answer:
    """The relay's answer: HTTP status and body bytes."""

    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        """True for a 2xx answer (the event is durable)."""
        return 200 <= self.status < 300

    def text(self) -> str:
        """The answer as one line: ``<status> <body>``."""
        body = self.body.decode("utf-8", "replace").strip().replace("\n", " ")
        return f"{self.status} {body}".rstrip()


class SendError(Exception):
    """The relay did not answer (connection refused, timeout, TLS failure); the message names
    the URL, never the token."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: object, **__: object) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _opener_with(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _NoRedirect(), urllib.request.HTTPSHandler(context=context)
    )


def post(
    url: str, body: bytes, token: str, timeout: float, context: ssl.SSLContext | None = None
) -> Answer:
    """POST ``body`` to ``url`` as ``application/json`` with ``Authorization: Bearer token``.

    timeout: seconds for the connection and the answer. context: the TLS context for an
    ``https://`` URL (default: the system's trusted CAs). Returns every HTTP answer (4xx and 5xx
    included); raises SendError when there is none.
    """
    try:
        request = urllib.request.Request(  # noqa: S310 - the operator's own relay URL
            url,
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "User-Agent": f"retm-relay-send/{__version__}",
            },
        )
        opener = _OPENER if context is None else _opener_with(context)
        with opener.open(request, timeout=timeout) as response:
            return Answer(response.status, response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, exc.read())
    except urllib.error.URLError as exc:
        raise SendError(f"the relay does not answer at {url}: {exc.reason}") from None
    except (TimeoutError, ConnectionError) as exc:
        raise SendError(f"the relay does not answer at {url}: {exc}") from None
    except (ValueError, http.client.HTTPException) as exc:  # a URL it cannot post to
        raise SendError(f"cannot post to {url}: {exc}") from None


def read_body(name: str, stdin: IO[bytes]) -> bytes:
    """The bytes of file ``name`` (``-``: standard input). Raises OSError."""
    if name == "-":
        return stdin.read()
    with open(name, "rb") as f:
        return f.read()
