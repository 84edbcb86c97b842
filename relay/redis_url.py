"""``dedup.redis_url``: one Redis, a Redis Sentinel set, or a Redis Cluster (stdlib only, so
that the settings can check it without importing redis-py).

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path``: one
  server (redis-py's own ``from_url`` reads these).
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/DB]``: the sentinels
  (port 26379 by default) that monitor the master named SERVICE; the relay asks them for the
  master and follows it across a failover. The user and password are the master's; the
  sentinels are asked without them unless ``?sentinel_auth=true``.
- ``redis+cluster://[[user]:password@]host:port[,host:port...]``: some nodes of a Redis
  Cluster (port 6379 by default); the client learns the rest from them. Database 0 only.

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS, as ``rediss://`` does; the query
parameters ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``,
``optional``, ``required``) and ``ssl_check_hostname`` (``true``/``false``) set it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

SINGLE_SCHEMES = frozenset({"redis", "rediss", "unix"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
TLS_OPTIONS = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)


class RedisUrlError(ValueError):
    """A ``dedup.redis_url`` that cannot be used; the message never contains the password."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``dedup.redis_url``.

    kind: ``single`` (``url`` is for redis-py's ``from_url``), ``sentinel`` or ``cluster``.
    hosts: (host, port) of the sentinels or cluster nodes. service: the Sentinel master name.
    db: the database number. tls: whether to use TLS. options: the TLS query parameters.
    sentinel_auth: whether the sentinels get the username and password too.
    """

    kind: Literal["single", "sentinel", "cluster"]
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)
    sentinel_auth: bool = False

    @property
    def address(self) -> str:
        """Where the data lives, without credentials, for ``/health`` and logs:
        ``host:port/db``, the socket path, ``sentinel h1:26379,h2:26379/mymaster/0`` or
        ``cluster h1:7000,h2:7001``."""
        if self.kind == "single":
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return parts.path
            db = parts.path.lstrip("/") or "0"
            return f"{parts.hostname}:{parts.port or 6379}/{db}"
        nodes = ",".join(f"{host}:{port}" for host, port in self.hosts)
        if self.kind == "sentinel":
            return f"sentinel {nodes}/{self.service}/{self.db}"
        return f"cluster {nodes}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``dedup.redis_url`` (see the module docstring); raises RedisUrlError."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SINGLE_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 - what redis-py's from_url will read
        except ValueError:
            raise RedisUrlError(
                "is not a valid URL (check the host's brackets and the port)"
            ) from None
        return RedisTarget("single", url, tls=scheme == "rediss")
    if scheme not in SENTINEL_SCHEMES | CLUSTER_SCHEMES:
        raise RedisUrlError(
            "must start with redis://, rediss://, unix://, redis+sentinel://, "
            "rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )
    sentinel = scheme in SENTINEL_SCHEMES
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = 26379 if sentinel else 6379
    hosts = tuple(_host_port(part, default_port) for part in hostlist.split(",") if part)
    if not hosts:
        raise RedisUrlError("must name at least one host:port")
    options: dict[str, str] = {}
    sentinel_auth = False
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "sentinel_auth" and sentinel:
            sentinel_auth = value.lower() in {"1", "true", "yes", "on"}
        elif name in TLS_OPTIONS:
            options[name] = value
        else:
            raise RedisUrlError(f"unknown query parameter {name!r}")
    segments = [s for s in path.split("/") if s]
    if sentinel:
        if not segments or len(segments) > 2:
            raise RedisUrlError("must end with /SERVICE or /SERVICE/DB (the master's name)")
        service = unquote(segments[0])
        db = _db(segments[1] if len(segments) == 2 else "0")
    else:
        if len(segments) > 1 or (segments and segments[0] != "0"):
            raise RedisUrlError("a Redis Cluster has database 0 only: end with / or /0")
        service, db = "", 0
    return RedisTarget(
        "sentinel" if sentinel else "cluster",
        url,
        hosts,
        service,
        db,
        username,
        password,
        scheme.startswith("rediss"),
        options,
        sentinel_auth,
    )


def _host_port(part: str, default_port: int) -> tuple[str, int]:
    if part.startswith("["):  # [::1]:26379
        host, _, tail = part[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise RedisUrlError("a host is empty")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"invalid port {port_text!r} of {host}")
    return host, int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"the database must be a number, not {text!r}")
    return int(text)
