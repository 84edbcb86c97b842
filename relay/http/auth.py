"""Authentication of RETM's webhook calls: ``Authorization: Bearer <token>``.

RETM sends the token the receiver issued at install time as a Bearer token on every webhook
(docs/retm.md, "Authentication"); there is no signature, so the token and TLS are the only
protection.

Tokens are never kept or compared as text: each accepted token is stored under its SHA-256
digest, the presented token is hashed the same way, looked up, and the digests are compared with
``hmac.compare_digest``. Timing therefore depends only on a hash of the secret, and thousands of
tokens (one per merchant) cost one dict lookup. No token is ever logged; a principal carries a
short fingerprint instead.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from relay.settings import TokenSpec

AuthFailure = Literal["missing", "malformed", "invalid"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is speaking.

    id: the dedup principal, ``business`` when the token is bound to one, else ``token-<8 hex>``
    (a fingerprint of the token, safe to log and to put in a message_id).
    business: the RETM business the token belongs to, if known.
    fingerprint: 8 hex characters of the token's SHA-256, for logs.
    """

    id: str
    business: str | None
    fingerprint: str


def token_digest(token: str | bytes) -> bytes:
    """SHA-256 of a token's UTF-8 bytes."""
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def principal_for(digest: bytes, business: str | None) -> Principal:
    """The Principal of a token given its digest and optional business."""
    fingerprint = digest.hex()[:8]
    return Principal(business or f"token-{fingerprint}", business, fingerprint)


class TokenAuthenticator:
    """Checks Bearer tokens against the configured set (and any added at run time).

    tokens: the ``auth.tokens`` settings. ``add_digest``/``remove_digest`` let a token registry
    (per-merchant tokens from the install flow) change the set while the relay runs.
    clock: wall-clock seconds (``time.time``), against which a token's ``expires_at`` is checked.
    """

    __slots__ = ("_by_digest", "_clock")

    def __init__(
        self, tokens: Iterable[TokenSpec] = (), *, clock: Callable[[], float] = time.time
    ) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Principal, float | None]] = {}
        self._clock = clock
        for spec in tokens:
            self.add_digest(token_digest(spec.token.value), spec.business)

    def __len__(self) -> int:
        return len(self._by_digest)

    def add_digest(
        self, digest: bytes, business: str | None, expires_at: float | None = None
    ) -> Principal:
        """Accept the token whose SHA-256 is ``digest``; returns its principal.

        expires_at: Unix time from which the token is refused (a rotated token's end of
        grace), or ``None`` for no end."""
        principal = principal_for(digest, business)
        self._by_digest[digest] = (digest, principal, expires_at)
        return principal

    def remove_digest(self, digest: bytes) -> None:
        """Stop accepting the token whose SHA-256 is ``digest`` (no error if unknown)."""
        self._by_digest.pop(digest, None)

    def authenticate(self, header: str | None) -> Principal | AuthFailure:
        """The Principal for an ``Authorization`` header value, or why it failed:
        ``missing`` (no header), ``malformed`` (not ``Bearer <token>``), ``invalid`` (unknown)."""
        if not header:
            return "missing"
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return "malformed"
        digest = token_digest(token)
        entry = self._by_digest.get(digest)
        if entry is None:
            return "invalid"
        stored, principal, expires_at = entry
        if expires_at is not None and self._clock() >= expires_at:
            return "invalid"
        # Final check on bytes in constant time, whatever the dict lookup did.
        return principal if hmac.compare_digest(stored, digest) else "invalid"
