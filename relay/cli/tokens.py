"""``retm-relay tokens``: the per-merchant token registry from the command line.

Works on the store the daemon uses (``install.store``: SQLite in ``state.dir``, or Redis) while
the daemon runs; the daemon notices a change within about a second. Nothing here prints a full
token except the one ``add`` or ``rotate`` has just created (the registry holds only digests);
tokens are named by their fingerprint, the first 8 hex characters of their SHA-256. ``list`` also
shows the tokens of the settings (``auth.tokens``, source ``settings``), masked the same way; those
change only with the configuration, not with ``add``, ``rotate`` or ``revoke``.

    retm-relay tokens list [--json]
    retm-relay tokens add BUSINESS             # an extra token; the others stay valid
    retm-relay tokens rotate BUSINESS [--grace SECONDS]
    retm-relay tokens revoke FINGERPRINT|BUSINESS
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

import orjson

from relay.errors import StoreUnavailable
from relay.http.auth import token_digest
from relay.retm.tokens import (
    BUSINESS_RE,
    TokenRecord,
    TokenStoreError,
    make_token,
    open_store,
    select,
)
from relay.settings import Settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_arguments(
    parser: argparse.ArgumentParser, common: argparse.ArgumentParser | None = None
) -> None:
    """The ``tokens`` sub-commands and their arguments; ``common``: the options every command
    takes (``--config``), so that they may also follow the action."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    parents = [common] if common is not None else []
    listing = actions.add_parser(
        "list",
        parents=parents,
        help="show every token, of the settings (auth.tokens) and of the registry, by "
        "fingerprint (never the token)",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add = actions.add_parser(
        "add", parents=parents, help="create an extra token for BUSINESS and print it"
    )
    add.add_argument("business", help="RETM business_id")
    rotate = actions.add_parser(
        "rotate",
        parents=parents,
        help="create a new token for BUSINESS; its older ones expire after --grace",
    )
    rotate.add_argument("business", help="RETM business_id")
    rotate.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="seconds the older tokens stay valid (default: install.token_grace)",
    )
    revoke = actions.add_parser(
        "revoke",
        parents=parents,
        help="refuse a token (a running relay polls once a second): by fingerprint, or every "
        "token of a business",
    )
    revoke.add_argument("selector", metavar="FINGERPRINT|BUSINESS")


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def settings_records(settings: Settings) -> list[TokenRecord]:
    """The tokens of ``auth.tokens`` as registry-like records (source ``settings``, no creation
    time, business ``-`` when the token is not bound to one), for ``list``."""
    return [
        TokenRecord(token_digest(spec.token.value), spec.business or "-", 0.0, None, "settings")
        for spec in settings.auth.tokens
    ]


def _state(record: TokenRecord, now: float) -> str:
    if record.expires_at is None:
        return "active"
    return "grace" if record.active(now) else "expired"


async def run_tokens(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``tokens`` action; returns the exit code (0 ok, 1 store failure or unknown
    token, 2 bad arguments)."""
    business = getattr(args, "business", None)
    if business is not None and not BUSINESS_RE.fullmatch(business):
        sys.stderr.write("retm-relay: a business is 1-64 letters, digits, '_', '.', '-'\n")
        return EXIT_USAGE
    grace = getattr(args, "grace", None)
    if grace is not None and grace < 0:
        sys.stderr.write("retm-relay: --grace must not be negative\n")
        return EXIT_USAGE
    s = settings.install
    store = open_store(s.store, settings.state.dir, settings.dedup.redis_url.value, s.redis_key)
    now = time.time()
    out = sys.stdout
    try:
        if args.action == "list":
            records = settings_records(settings) + await store.load()
            if args.json:
                for r in records:
                    line = {"fingerprint": r.fingerprint, **r.as_json(), "state": _state(r, now)}
                    if r.source == "settings":
                        line.update(business=None if r.business == "-" else r.business)
                        line.update(created_at=None)
                    out.write(orjson.dumps(line).decode() + "\n")
            else:
                out.write(f"{'FINGERPRINT':<12}{'BUSINESS':<26}{'SOURCE':<9}{'CREATED':<22}STATE\n")
                for r in records:
                    state = _state(r, now)
                    if r.expires_at is not None:
                        state += f" until {_iso(r.expires_at)}"
                    out.write(
                        f"{r.fingerprint:<12}{r.business:<26}{r.source:<9}"
                        f"{_iso(None if r.source == 'settings' else r.created_at):<22}{state}\n"
                    )
        elif args.action in {"add", "rotate"}:
            token, record = make_token(args.business, "cli", now)
            until = None
            if args.action == "rotate":
                until = now + (s.token_grace if grace is None else grace)
            changed = await store.add(record, until)
            out.write(token + "\n")
            sys.stderr.write(f"retm-relay: token {record.fingerprint} added for {args.business}")
            if changed:
                sys.stderr.write(f"; {len(changed)} older token(s) valid until {_iso(until)}")
            sys.stderr.write("\n")
        else:
            chosen = select(await store.load(), args.selector)
            await store.remove(r.digest for r in chosen)
            for r in chosen:
                out.write(f"revoked {r.fingerprint} ({r.business})\n")
    except (StoreUnavailable, TokenStoreError) as exc:
        sys.stderr.write(f"retm-relay: {exc}\n")
        return EXIT_FAILURE
    finally:
        await store.close()
    return EXIT_OK
