"""Access: who may call the relay, how often, and who they really are behind a proxy.

- **Trusted proxies** (``http.trusted_proxies``): when the peer is one of them, the client is
  read from ``X-Forwarded-For`` (right to left, skipping further trusted proxies, as nginx's
  ``real_ip_recursive``) and the scheme from ``X-Forwarded-Proto``. From any other peer these
  headers are ignored. The handlers then see the client in ``request.remote``.
- **Allow-list** (``http.allow_sources``): sources outside it get 403 ``source_not_allowed``.
- **Rate limit** (``http.rate_limit``, ``http.rate_burst``): a token bucket per source (an IPv6
  source counts per /64); over it, 429 ``rate_limited`` with ``Retry-After``.
- **Expect: 100-continue**: the webhook routes' ``expect_handler`` answers 401 (or 403/429)
  before the client sends the body, and closes the connection, instead of aiohttp's default
  ``100 Continue``.

The monitoring routes (``/healthz``, ``/readyz``, ``/health``, ``/metrics``, ``/``) and the
consumer contract (``/asyncapi.yaml``) are exempt: they carry no secrets and monitors call them
from elsewhere. Every other route, including ones added later, is guarded. Each refusal is
counted in ``relay_rejected_total{reason}``; a 403 logs one line, a rate-limited source logs one
line when it starts being limited (a flood must not become a flood of log lines).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from relay.http.auth import TokenAuthenticator
from relay.http.ratelimit import RateLimiter, retry_after
from relay.ingest import Rejection, check_token, error_response
from relay.metrics import Metrics
from relay.settings import HttpSettings

log = structlog.get_logger("relay.access")

MONITORING_PATHS = frozenset({"/", "/healthz", "/readyz", "/health", "/metrics", "/asyncapi.yaml"})
_CACHE_LIMIT = 4096

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

# (client address, scheme from X-Forwarded-Proto or None), kept on the request once checked
_ADMITTED: web.RequestKey[tuple[str, str | None]] = web.RequestKey("admitted")


def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address, IPv4-mapped IPv6 (``::ffff:192.0.2.1``) as IPv4; None when
    it is not an address (``unknown``, a hostname, ``1.2.3.4:80``)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Networks:
    """A fixed set of IP networks (``"10.0.0.0/8"``, ``"2001:db8::/32"``, ``"192.0.2.7"``).

    ``address in networks`` for an address string; answers are cached for up to 4096
    addresses. Raises ValueError at construction for an entry that is not an address or CIDR.
    """

    __slots__ = ("_cache", "networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        hit = self._cache.get(address)
        if hit is None:
            ip = parse_ip(address)
            hit = ip is not None and any(
                ip.version == net.version and ip in net for net in self.networks
            )
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[address] = hit
        return hit


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Networks) -> str:
    """The client's address: ``peer``, or when ``peer`` is a trusted proxy, the right-most
    ``X-Forwarded-For`` entry that is not a trusted proxy (the left-most when all are). A
    malformed entry stops the walk at the last good address. ``""`` when there is no peer."""
    if peer is None:
        return ""
    peer_ip = parse_ip(peer)
    client = str(peer_ip) if peer_ip is not None else peer
    if client not in trusted:
        return client
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        ip = parse_ip(hop)
        if ip is None:
            break
        client = str(ip)
        if client not in trusted:
            break
    return client


def forwarded_scheme(values: Iterable[str]) -> str | None:
    """``http`` or ``https`` from ``X-Forwarded-Proto`` (the last value), else None."""
    last = None
    for value in values:
        last = value.rsplit(",", 1)[-1].strip().lower()
    return last if last in ("http", "https") else None


def rate_key(client: str) -> str:
    """The rate-limit bucket of a client: the address, or its /64 for IPv6 (one host usually
    holds a whole /64)."""
    if ":" not in client:
        return client
    try:
        return str(ipaddress.ip_network(f"{client}/64", strict=False))
    except ValueError:
        return client


class Access:
    """The access rules of ``http`` settings and their aiohttp hooks.

    ``active`` is False when no rule is configured; then ``middleware`` need not be installed
    (the hot path stays free of it). ``expect_handler(...)`` is needed on every route either way.
    clock: monotonic seconds, for the rate limiter.
    """

    def __init__(
        self,
        http: HttpSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.max_body_bytes = http.max_body_bytes
        self.trusted = Networks(http.trusted_proxies)
        self.allowed = Networks(http.allow_sources)
        self.limiter = (
            RateLimiter(http.rate_limit, http.rate_burst, clock=clock)
            if http.rate_limit > 0
            else None
        )
        self.active = bool(self.trusted or self.allowed) or self.limiter is not None

    def admit(self, request: web.BaseRequest) -> tuple[str, str | None] | web.Response:
        """(client, forwarded scheme or None) when the request may go on, else the 403 or 429
        answer (already counted and logged)."""
        client = request.remote or ""
        scheme = None
        if self.trusted and client in self.trusted:
            headers = request.headers
            client = client_address(client, headers.getall("X-Forwarded-For", ()), self.trusted)
            scheme = forwarded_scheme(headers.getall("X-Forwarded-Proto", ()))
        if self.allowed and client not in self.allowed:
            self.metrics.rejected("source_not_allowed")
            log.warning("access.source_not_allowed", remote=client, path=request.path)
            return error_response(
                403, "source_not_allowed", "this source address may not call the relay"
            )
        if self.limiter is not None:
            key = rate_key(client)
            wait = self.limiter.acquire(key)
            if wait > 0:
                self.metrics.rejected("rate_limited")
                if self.limiter.refusals(key) == 1:
                    log.warning("access.rate_limited", remote=client, source=key)
                seconds = retry_after(wait)
                return error_response(
                    429,
                    "rate_limited",
                    f"too many requests from this source; retry in {seconds} s",
                    {hdrs.RETRY_AFTER: seconds},
                )
        return client, scheme

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Apply the rules to every route but the monitoring ones; hand the handler a request
        whose ``remote`` (and ``scheme``) are the client's."""
        if request.path in MONITORING_PATHS:
            return await handler(request)
        admitted = request.get(_ADMITTED)
        if admitted is None:
            result = self.admit(request)
            if isinstance(result, web.Response):
                return result
            admitted = result
        client, scheme = admitted
        if scheme is not None:
            request = request.clone(remote=client, scheme=scheme)
        elif client != request.remote:
            request = request.clone(remote=client)
        return await handler(request)

    def _check_length(self, request: web.BaseRequest) -> None:
        """Raise Rejection 413 when ``Content-Length`` announces more than the limit."""
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Rejection(413, "payload_too_large", f"the body must be at most {limit} bytes")

    def expect_handler(self, authenticator: TokenAuthenticator, route_name: str) -> ExpectHandler:
        """An ``expect_handler`` for a Bearer-token route: ``Expect: 100-continue`` gets
        ``100 Continue`` only when the access rules and the token pass; otherwise the final
        answer (401 with ``WWW-Authenticate``, 403, 429, or 413 for a ``Content-Length`` over
        ``http.max_body_bytes``) comes before the body and the connection closes. Any other
        expectation gets 417, as aiohttp does."""

        async def expect(request: web.Request) -> web.StreamResponse | None:
            if request.version != HttpVersion11:
                return None
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                return error_response(
                    417, "expectation_failed", "only Expect: 100-continue is supported"
                )
            remote = request.remote
            if self.active:
                result = self.admit(request)
                if isinstance(result, web.Response):
                    result.force_close()
                    return result
                request[_ADMITTED] = result
                remote = result[0]
            try:
                check_token(authenticator, request)
                self._check_length(request)
            except Rejection as rej:
                self.metrics.rejected(rej.code)
                log.warning(
                    "webhook.rejected",
                    route=route_name,
                    status=rej.status,
                    reason=rej.code,
                    detail=rej.detail,
                    remote=remote,
                    expect="100-continue",
                )
                response = error_response(rej.status, rej.code, rej.detail, rej.headers)
                response.force_close()
                return response
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
            return None

        return expect
