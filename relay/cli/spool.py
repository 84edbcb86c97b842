"""``retm-relay spool stats|list|replay|purge``: inspect and manage the local spool.

``stats`` and ``list`` only read (safe while the relay runs: SQLite's WAL lets readers in).
``replay`` and ``purge`` change the spool and so take its lock: they refuse while a relay uses
that file. The file is ``state.dir/spool.file`` unless ``--file NAME`` names another one in
``state.dir`` (a worker's ``spool-<worker>.db``).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from relay.cli.args import Command, add_command, positive_int, run_loop
from relay.errors import RelayError
from relay.settings import Settings
from relay.spool.store import SpoolLock, read_events, read_stats

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROGRESS_EVERY = 1.0  # seconds between progress lines of ``replay``

AddCommand = Callable[..., argparse.ArgumentParser]


def spool_path(settings: Settings, args: argparse.Namespace) -> Path:
    """The spool file the command works on."""
    return settings.state.dir / (args.file or settings.spool.file)


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    sys.stderr.write(f"retm-relay spool: {message}\n")
    return code


def _open_readonly(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise RelayError(f"no spool at {path} (check state.dir and spool.file)")
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise RelayError(f"cannot read the spool {path}: {exc}") from None


def _in_use(path: Path) -> bool:
    lock = SpoolLock(path)
    try:
        lock.acquire()
    except RelayError:
        return True
    lock.release()
    return False


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _shown(value: object) -> str:
    """A stats value for a person: ``-`` for nothing (never ``None``), ``yes``/``no``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    """Print the spool's totals."""
    path = spool_path(settings, args)
    try:
        conn = _open_readonly(path)
        stats = read_stats(conn)
        conn.close()
    except (RelayError, sqlite3.Error) as exc:
        return _fail(str(exc))
    now = time.time()
    data: dict[str, Any] = {
        "path": str(path),
        "events": stats.events,
        "bytes": stats.bytes,
        "oldest_spooled_at": _iso(stats.oldest_at) if stats.oldest_at else None,
        "oldest_age_seconds": round(now - stats.oldest_at, 3) if stats.oldest_at else 0,
        "dedup_keys": stats.dedup_keys,
        "max_events": settings.spool.max_events,
        "max_bytes": settings.spool.max_bytes,
        "in_use": _in_use(path),
    }
    if args.json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            sys.stdout.write(f"{key:<{width}}  {_shown(value)}\n")
    return EXIT_OK


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    """Print spooled events, oldest first (``--newest``: newest first)."""
    path = spool_path(settings, args)
    try:
        conn = _open_readonly(path)
        rows = read_events(conn, args.limit, newest=args.newest)
        conn.close()
    except (RelayError, sqlite3.Error) as exc:
        return _fail(str(exc))
    if args.json:
        for row in rows:
            e = row.envelope
            item = {
                "seq": row.seq,
                "spooled_at": _iso(row.spooled_at),
                "reason": row.reason,
                "exchange": e.route.exchange,
                "routing_key": e.route.routing_key,
                "message_id": e.message_id,
                "bytes": len(e.body),
            }
            sys.stdout.write(orjson.dumps(item).decode() + "\n")
        return EXIT_OK
    sys.stdout.write(f"{'SEQ':>8}  {'SPOOLED AT':<20}  {'REASON':<14}  {'BYTES':>7}  ROUTING KEY\n")
    for row in rows:
        e = row.envelope
        sys.stdout.write(
            f"{row.seq:>8}  {_iso(row.spooled_at):<20}  {row.reason:<14}  {len(e.body):>7}  "
            f"{e.route.routing_key}  {e.message_id}\n"
        )
    return EXIT_OK


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Delete every spooled event (after a confirmation, or ``--yes``)."""
    path = spool_path(settings, args)
    lock = SpoolLock(path)
    try:
        conn = _open_readonly(path)
        stats = read_stats(conn)
        conn.close()
        lock.acquire()
    except (RelayError, sqlite3.Error) as exc:
        hint = "; stop the relay before purging" if "in use" in str(exc) else ""
        return _fail(f"{exc}{hint}")
    try:
        if stats.events == 0:
            sys.stdout.write(f"the spool {path} is empty; nothing to purge\n")
            return EXIT_OK
        if not args.yes:
            sys.stdout.write(
                f"Delete {stats.events} spooled events ({stats.bytes} bytes) from {path}? "
                "They will never reach RabbitMQ. Type 'yes' to confirm: "
            )
            sys.stdout.flush()
            if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
                return _fail("not confirmed; nothing was deleted")
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        conn.execute("PRAGMA synchronous=FULL")
        deleted = conn.execute("DELETE FROM events").rowcount
        conn.close()
    except sqlite3.Error as exc:
        return _fail(f"cannot purge {path}: {exc}")
    finally:
        lock.release()
    sys.stdout.write(f"purged {deleted} events from {path}\n")
    return EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Publish spooled events to the broker now, oldest first, deleting each after its
    confirm; progress on stderr."""
    from relay.logs import configure_logging  # noqa: PLC0415

    path = spool_path(settings, args)
    if not path.exists():
        return _fail(f"no spool at {path} (check state.dir and spool.file)")
    configure_logging("warning", "console", stream=sys.stderr)
    try:
        code: int = run_loop(_replay(settings, path, args.limit))
    except RelayError as exc:
        return _fail(str(exc))
    return code


async def _replay(settings: Settings, path: Path, limit: int | None) -> int:
    from relay.amqp.publish import Publisher  # noqa: PLC0415
    from relay.metrics import Metrics  # noqa: PLC0415
    from relay.routing import Router  # noqa: PLC0415
    from relay.spool.forward import Forwarder  # noqa: PLC0415 - aio-pika only for this command
    from relay.spool.store import Spool  # noqa: PLC0415

    spool = Spool(
        path,
        max_bytes=settings.spool.max_bytes,
        max_events=settings.spool.max_events,
        dedup_ttl=settings.dedup.ttl,
        dedup_max_entries=settings.dedup.max_entries,
    )
    await spool.open()
    amqp = settings.amqp
    router = Router(amqp.routing_key_template, amqp.exchange, amqp.exchanges)
    publisher = Publisher(amqp, router, Metrics(), settings.archive)
    try:
        await publisher.start()
        if not publisher.connected.is_set():
            return _fail(f"cannot reach the broker at {publisher.address}: {publisher.last_error}")
        total = spool.depth if limit is None else min(limit, spool.depth)
        started = time.monotonic()
        last = [started]

        def report(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY or done >= total:
                last[0] = now
                rate = done / max(now - started, 1e-6)
                sys.stderr.write(f"replayed {done}/{total} events ({rate:.0f}/s)\n")

        ok, done = await Forwarder(spool, publisher).drain(total, report)
        if not ok:
            return _fail(
                f"the broker did not confirm every event ({publisher.last_error or 'nack'}); "
                f"{spool.depth} events stay in the spool"
            )
        sys.stdout.write(f"replayed {done} events; {spool.depth} left in {path}\n")
        return EXIT_OK
    finally:
        await publisher.close()
        await spool.close()


def add_spool_commands(add: AddCommand, common: argparse.ArgumentParser) -> None:
    """Register ``spool`` and its subcommands with the command line's ``add`` helper."""
    spool = add(
        "spool",
        cmd_stats,
        "inspect and manage the local spool (events waiting for the broker)",
        "retm-relay spool stats",
    )
    file_opt = argparse.ArgumentParser(add_help=False)
    file_opt.add_argument(
        "--file",
        metavar="NAME",
        help="spool file name in state.dir (default: spool.file, e.g. spool.db)",
    )
    sub = spool.add_subparsers(dest="spool_command", metavar="SUBCOMMAND", required=True)

    def add_sub(name: str, func: Command, text: str, example: str) -> argparse.ArgumentParser:
        return add_command(sub, name, func, text, example, [common, file_opt])

    stats = add_sub(
        "stats",
        cmd_stats,
        "print the spool's totals: events, bytes, oldest event's age, persisted dedup keys",
        "retm-relay spool stats --json",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object")
    listing = add_sub(
        "list",
        cmd_list,
        "list spooled events, oldest first (safe while the relay runs)",
        "retm-relay spool list --limit 50 --newest",
    )
    listing.add_argument("--limit", type=positive_int, default=20, help="at most N (default 20)")
    listing.add_argument("--newest", action="store_true", help="newest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = add_sub(
        "replay",
        cmd_replay,
        "publish this host's spooled events (never yet on the broker) to the broker now, "
        "oldest first, deleting each after its confirm (the relay must be stopped; progress "
        "on stderr). To republish events already delivered, from the archive, see "
        "`retm-relay replay`",
        "systemctl stop retm-relay && retm-relay spool replay --config /etc/retm-relay/relay.toml",
    )
    replay.add_argument("--limit", type=positive_int, help="replay at most N events")
    purge = add_sub(
        "purge",
        cmd_purge,
        "delete every spooled event, which then never reaches RabbitMQ (asks to confirm; the "
        "relay must be stopped)",
        "retm-relay spool purge --yes",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
