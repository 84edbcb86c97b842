"""The spool: a local, fsynced store of events the broker could not confirm in time.

An event goes to the spool when the broker is unreachable, blocked, nacks, or does not confirm
within ``amqp.publish_timeout``; and while the spool holds events, every new event queues behind
them, so the forwarder (``relay.forward``) publishes in spool order. The 2xx is sent only after
the event's row is committed with ``synchronous=FULL`` (the WAL is fsynced).

Storage is one SQLite database in WAL mode (``state.dir/spool.file``) with two tables: ``events``
(one row per spooled event: the envelope, why and when it was spooled) and ``dedup_log``
(delivered dedup keys as 16-byte digests with their expiry, so that RETM's retries after a
restart are still absorbed). ``dedup_log`` is append-only in commit order, without an index: an
insert writes the last page only, expired keys are cut from the front by rowid, and the relay
reads the whole log once, at start-up; a key committed twice appears twice (the later wins).
Every SQLite call runs on one dedicated writer thread that empties its queue into a single
transaction per round (group commit): a burst of N spooled events costs one fsync, not N.
Results reach the event loop with ``loop.call_soon_threadsafe``. Deletes of forwarded rows
commit with ``synchronous=FULL`` too (group-committed): a confirmed row never comes back, not
after a crash, nor after a power loss. Writes that only persist dedup keys commit with
``synchronous=NORMAL`` (a process crash loses nothing). Before the forwarder publishes rows it
appends their seqs to ``<file>.sent`` (``SentLog``): after a crash, the rows still spooled that
are in it may already be at the broker, and forwarding them again is counted
(``relay_spool_redelivered_total``). An emptied spool gives its space back (``compact``).

An exclusive ``flock`` on ``<file>.lock`` keeps a second process off the same spool.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from relay.amqp.publish import Envelope
from relay.dedup.memory import digest as key_digest
from relay.errors import BrokerUnavailable, RelayError
from relay.routing import Route
from relay.statefiles import private_database, private_file

log = structlog.get_logger("relay.spool")

MAX_BATCH = 2048  # operations per transaction
#: bytes the WAL file is cut back to after a checkpoint (it grows beyond while a burst is
#: being written); an emptied spool truncates it to zero (``compact``)
WAL_SIZE_LIMIT = 4 * 1024 * 1024
AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
ROW_OVERHEAD = 64  # bytes counted per row besides body, headers and ids
PRUNE_INTERVAL = 60.0  # seconds between sweeps of expired dedup keys
RESUME_FRACTION = 0.9  # a full spool accepts again below 90 % of both limits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    event TEXT NOT NULL,
    received_at REAL NOT NULL,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    spooled_at REAL NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup_log (
    expiry INTEGER NOT NULL,
    digest BLOB NOT NULL
);
"""
_COLUMNS = (
    "seq, message_id, exchange, routing_key, event, received_at, headers, body, spooled_at, "
    "reason, size"
)

OpKind = Literal["durable", "write", "read"]
#: what the writer thread hands over once the file is open: totals, persisted dedup keys
#: (digest, expiry), and the seqs marked sent but not deleted
_Opened = tuple["SpoolStats", list[tuple[bytes, int]], list[int]]


class SpoolError(RelayError):
    """The spool file cannot be opened (in use by another process, unreadable, corrupt)."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """One row of the spool: ``seq`` (spool order), the envelope to publish, ``spooled_at``
    (Unix time), ``reason`` it was spooled (``disconnected``, ``timeout``, ``queued`` ...) and
    ``size`` in bytes as counted against ``spool.max_bytes``."""

    seq: int
    envelope: Envelope
    spooled_at: float
    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Totals of a spool file: events, bytes, the oldest event's spool time (or None) and the
    number of persisted dedup keys."""

    events: int
    bytes: int
    oldest_at: float | None
    dedup_keys: int


def event_size(envelope: Envelope, headers_json: bytes) -> int:
    """Bytes an envelope counts against ``spool.max_bytes``."""
    return (
        len(envelope.body)
        + len(headers_json)
        + len(envelope.message_id)
        + len(envelope.route.routing_key)
        + ROW_OVERHEAD
    )


def _row_event(row: tuple[Any, ...]) -> SpooledEvent:
    seq, message_id, exchange, routing_key, event, received_at, headers, body = row[:8]
    envelope = Envelope(
        bytes(body),
        Route(exchange, routing_key),
        message_id,
        event,
        received_at,
        orjson.loads(headers),
    )
    return SpooledEvent(seq, envelope, row[8], row[9], row[10])


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a spool database at ``path``: WAL mode, the schema, a 5 s busy
    timeout, autocommit (transactions are explicit). Raises SpoolError."""
    try:
        private_database(path)  # 0600 whatever the umask (relay/statefiles.py)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        # Before the first table: a new spool frees pages incrementally (see ``compact``).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as exc:
        raise SpoolError(f"cannot open the spool {path}: {exc}") from None
    return conn


def compact(conn: sqlite3.Connection) -> None:
    """Give the space of an emptied spool back to the file system: free pages are cut from
    the end of the file (``incremental_vacuum``) and the WAL is checkpointed and truncated to
    zero bytes. A spool made before auto_vacuum was set is rewritten once (``VACUUM``) to turn
    it on. Outside a transaction; cheap on an empty spool."""
    (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
    if mode != AUTO_VACUUM_INCREMENTAL:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
    conn.executescript("PRAGMA incremental_vacuum;")  # (execute would free one page only)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()


def read_stats(conn: sqlite3.Connection) -> SpoolStats:
    """Totals of the spool behind ``conn``."""
    events, size, oldest = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0), min(spooled_at) FROM events"
    ).fetchone()
    (keys,) = conn.execute("SELECT count(*) FROM dedup_log").fetchone()
    return SpoolStats(events, size, oldest, keys)


def read_events(
    conn: sqlite3.Connection, limit: int, after: int = 0, *, newest: bool = False
) -> list[SpooledEvent]:
    """Up to ``limit`` spooled events with ``seq > after``, oldest first (newest first with
    ``newest``)."""
    order = "DESC" if newest else "ASC"
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq {order} LIMIT ?",  # noqa: S608
        (after, limit),
    ).fetchall()
    return [_row_event(r) for r in rows]


def delete_events(conn: sqlite3.Connection, seqs: Iterable[int]) -> tuple[int, int]:
    """Delete the rows ``seqs`` (inside the caller's transaction); returns (events, bytes)
    actually deleted."""
    count = size = 0
    seq_list = list(seqs)
    for start in range(0, len(seq_list), 500):
        chunk = seq_list[start : start + 500]
        marks = ",".join("?" * len(chunk))
        n, s = conn.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM events WHERE seq IN ({marks})",  # noqa: S608
            chunk,
        ).fetchone()
        conn.execute(f"DELETE FROM events WHERE seq IN ({marks})", chunk)  # noqa: S608
        count, size = count + n, size + s
    return count, size


class SpoolLock:
    """An exclusive ``flock`` on ``<spool file>.lock``, held while a process uses the spool.
    ``acquire`` raises SpoolError when another process holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SpoolError naming the file."""
        private_file(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"the spool {self.path.with_suffix('')} is in use by another process "
                "(a running relay: stop it first, or, for a second relay, give it another "
                "state.dir or spool.file)"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SentLog:
    """``<spool file>.sent``: the seqs of spooled rows the forwarder is about to publish,
    appended as 8-byte integers before each publish goes out (one ``write``, no fsync: a
    process crash keeps it, a power loss may not, which only loses a count).

    At the next start, the rows still spooled whose seq is in the log were published before
    the stop or crash without their delete being committed: the broker may have them, and
    forwarding them again is a possible duplicate, counted in
    ``relay_spool_redelivered_total``. The log is emptied whenever the spool empties.
    Failures to write it (a full disk) are logged once and otherwise ignored: forwarding
    never waits for it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._failing = False

    def survivors(self, conn: sqlite3.Connection) -> list[int]:
        """Open the log; the logged seqs still in the spool behind ``conn`` (the log keeps
        only those). Raises OSError or sqlite3.Error."""
        private_file(self.path)
        logged = array.array("q", self.path.read_bytes()[: self.path.stat().st_size // 8 * 8])
        alive: list[int] = []
        if logged:
            wanted = set(logged)
            alive = [
                seq
                for (seq,) in conn.execute("SELECT seq FROM events WHERE seq >= ?", (min(wanted),))
                if seq in wanted
            ]
        self.path.write_bytes(array.array("q", alive).tobytes())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return alive

    def append(self, seqs: list[int]) -> None:
        """Log ``seqs`` (best effort)."""
        if self._fd is None or not seqs:
            return
        try:
            os.write(self._fd, array.array("q", seqs).tobytes())
        except OSError as exc:
            if not self._failing:
                log.warning("spool.sent_log_failed", path=str(self.path), error=str(exc))
            self._failing = True
        else:
            self._failing = False

    def clear(self) -> None:
        """Empty the log (the spool is empty: nothing logged can come back)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)

    def close(self) -> None:
        """Close the log file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(slots=True)
class _Op:
    run: Callable[[sqlite3.Connection], Any]
    kind: OpKind
    future: asyncio.Future[Any] | None


_STOP = object()
_FLUSH_KEYS = object()  # wakes the writer for delivered keys waiting in Spool._keys
KEY_FLUSH_INTERVAL = 0.25  # seconds delivered keys may wait for the writer's next transaction
KEY_FLUSH_BACKLOG = 8192  # ... unless this many are waiting


class Spool:
    """The spool of one relay process (see the module docstring).

    path: the SQLite file. max_bytes, max_events: capacity (``spool.*``). dedup_ttl: seconds a
    spooled event's dedup key is persisted for; dedup_max_entries: most persisted keys kept.
    on_write: called with the seconds each spooled event took to become durable (a metric).

    Counters ``depth`` and ``bytes`` include events whose write is still under way, so that a
    new event sees a non-empty spool as soon as an earlier one was handed to it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_events: int,
        dedup_ttl: float,
        dedup_max_entries: int,
        on_write: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_events = max_events
        self.dedup_ttl = dedup_ttl
        self.dedup_max_entries = dedup_max_entries
        self.depth = 0
        self.bytes = 0
        self.oldest_at: float | None = None
        self.full = False
        self.opened = asyncio.Event()
        #: set whenever the forwarder may have new work (an event spooled, a hold released)
        self.changed = asyncio.Event()
        #: seq -> the publish (timed out) that may still be confirmed; not forwarded meanwhile
        self.held: dict[int, asyncio.Future[Any]] = {}
        #: seqs being deleted (confirmed); never forwarded again
        self.deleting: set[int] = set()
        #: one set per read under way: seqs deleted meanwhile (see ``_forget``)
        self._reads: list[set[int]] = []
        #: confirmed seqs whose delete failed (say the disk is full): they stay in
        #: ``deleting`` and are deleted with the next delete that gets written
        self.undeleted: set[int] = set()
        #: seqs whose earlier publish was left unconfirmed (a forward may duplicate them):
        #: by a lost link, or by a stop or crash (marked ``sent`` in the file before it)
        self.maybe_sent: set[int] = set()
        #: rows marked sent but not deleted when the spool was opened
        self.sent_before_start = 0
        self.late_confirms = 0
        #: why the last spool write failed (disk full, I/O error), until one succeeds
        self.write_error: str | None = None
        self.spooled_total = 0
        #: transactions committed by the writer thread (group commit: fewer than writes)
        self.commits = 0
        #: times an emptied spool gave its space back (``compact``)
        self.compactions = 0
        #: set on the writer thread by a delete that emptied the spool
        self._compact_after_commit = False
        self._on_write = on_write
        self._clock = clock
        self._lock = SpoolLock(path)
        self._sent_log = SentLog(path.with_name(path.name + ".sent"))
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        #: delivered dedup keys (digest, expiry) waiting for the writer's next transaction;
        #: appended on the event loop, swapped out by the writer thread
        #: (flat: expiry, digest, expiry, digest ... so one ``extend`` appends a pair at once)
        self._keys: list[int | bytes] = []
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="relay-spool-reader")
        self._reader_conn: sqlite3.Connection | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> list[tuple[bytes, int]]:
        """Lock and open the spool file, start the writer thread; returns the persisted dedup
        keys still valid, as (digest, expiry) pairs in commit order. Raises SpoolError."""
        loop = self._loop = asyncio.get_running_loop()
        self._lock.acquire()
        ready: asyncio.Future[_Opened] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._writer, args=(ready,), name="relay-spool-writer", daemon=True
        )
        self._thread.start()
        try:
            stats, keys, sent = await ready
        except SpoolError:
            self._lock.release()
            raise
        self.depth, self.bytes, self.oldest_at = stats.events, stats.bytes, stats.oldest_at
        # published before the last stop or crash, never confirmed: may reach consumers twice
        self.maybe_sent.update(sent)
        self.sent_before_start = len(sent)
        self.opened.set()
        if self.depth:
            self.changed.set()
        log.info(
            "spool.opened",
            path=str(self.path),
            events=self.depth,
            bytes=self.bytes,
            dedup_keys=len(keys),
            sent_unconfirmed=len(sent),
        )
        return keys

    async def close(self) -> None:
        """Commit what is queued, stop the writer thread, close the file and release the lock.
        Spooled events stay in the file for the next start."""
        if self._thread is None or self._stopped is None:
            return
        self._queue.put(_STOP)
        await asyncio.shield(self._stopped)
        self._thread = None
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=False)
        self._sent_log.close()
        self._lock.release()
        self.opened.clear()
        log.info("spool.closed", events=self.depth, bytes=self.bytes)

    # -- the event loop's side ---------------------------------------------------------------

    def capacity_left(self, size: int) -> bool:
        """Whether one more event of ``size`` bytes fits."""
        return self.depth + 1 <= self.max_events and self.bytes + size <= self.max_bytes

    async def put(
        self, envelope: Envelope, reason: str, pending: asyncio.Future[Any] | None = None
    ) -> int:
        """Write ``envelope`` and fsync it; returns its seq. Its dedup key is persisted in the
        same transaction. ``pending``: a publish of it that timed out and may still be
        confirmed: the row is held (not forwarded) until that publish settles, and deleted
        without forwarding if it was confirmed after all (a late confirm).

        Raises BrokerUnavailable(``spool_full``) when full, (``spool_error``) when the write
        failed (disk full, I/O error).
        """
        if not self.opened.is_set():
            raise BrokerUnavailable("spool_error", "the spool is not open")
        headers = orjson.dumps(envelope.headers)
        size = event_size(envelope, headers)
        if self.full or not self.capacity_left(size):
            if self.depth:  # an empty spool can only be short of room for this one event
                self._set_full(True)
            raise BrokerUnavailable(
                "spool_full",
                f"the spool holds {self.depth} events, {self.bytes} bytes "
                f"(spool.max_events {self.max_events}, spool.max_bytes {self.max_bytes})",
            )
        now = self._clock()
        digest = key_digest(envelope.message_id)
        expiry = int(now + self.dedup_ttl) + 1
        row = (
            envelope.message_id,
            envelope.route.exchange,
            envelope.route.routing_key,
            envelope.event,
            envelope.received_at,
            headers,
            envelope.body,
            now,
            reason,
            size,
        )

        def insert(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO events (message_id, exchange, routing_key, event, received_at, "
                "headers, body, spooled_at, reason, size) VALUES (?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            conn.execute("INSERT INTO dedup_log (expiry, digest) VALUES (?, ?)", (expiry, digest))
            seq = cursor.lastrowid
            assert seq is not None
            return seq

        self.depth += 1
        self.bytes += size
        started = time.perf_counter()
        try:
            seq: int = await self._submit(insert, "durable")
        except BaseException:
            self.depth -= 1
            self.bytes -= size
            raise
        finally:
            if self._on_write is not None:
                self._on_write(time.perf_counter() - started)
        self.spooled_total += 1
        if self.oldest_at is None:
            self.oldest_at = now
        if pending is not None:
            self.hold(seq, pending)
        self.changed.set()
        return seq

    def hold(self, seq: int, pending: asyncio.Future[Any]) -> None:
        """Keep row ``seq`` from being forwarded until ``pending`` (its timed-out publish)
        settles: confirmed -> the row is deleted (a late confirm, not a second copy); failed
        or cancelled -> the row is released to the forwarder."""
        if pending.done():
            self._settle_hold(seq, pending)
            return
        self.held[seq] = pending
        pending.add_done_callback(lambda task: self._settle_hold(seq, task))

    def _settle_hold(self, seq: int, task: asyncio.Future[Any]) -> None:
        self.held.pop(seq, None)
        confirmed = not task.cancelled() and task.exception() is None
        if confirmed and self.opened.is_set():
            # Marked now, not when the delete task below starts: a forwarder reading the row
            # in between (even a read already under way) must skip it, or it publishes a
            # second copy.
            self._forget([seq])
            self.late_confirms += 1
            log.info("spool.late_confirm", seq=seq)
            task_ = asyncio.ensure_future(self.delete([seq]))
            task_.add_done_callback(_log_failure)
        else:
            self.maybe_sent.add(seq)
        self.changed.set()

    async def delete(self, seqs: list[int]) -> None:
        """Delete forwarded (or late-confirmed) rows; they are never forwarded again, even
        while the delete is being committed, nor when it fails: then they stay in ``deleting``
        and go with the next delete (a restart may forward them once more, with the same
        message_id). Raises BrokerUnavailable(``spool_error``)."""
        seqs = [*seqs, *self.undeleted]
        self.undeleted.clear()
        self._forget(seqs)

        def run(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
            count, size = delete_events(conn, seqs)
            head = conn.execute("SELECT spooled_at FROM events ORDER BY seq LIMIT 1").fetchone()
            if head is None and count:
                self._compact_after_commit = True  # the spool is empty: give the space back
            return count, size, head[0] if head else None

        try:
            # fsynced: a confirmed row must not come back after a crash, nor a power loss
            count, size, oldest = await self._submit(run, "durable")
        except (BrokerUnavailable, asyncio.CancelledError):
            self.undeleted.update(seqs)
            raise
        self.deleting.difference_update(seqs)
        self.maybe_sent.difference_update(seqs)
        self.depth -= count
        if not self.depth:
            self._sent_log.clear()
        self.bytes -= size
        self.oldest_at = oldest if self.depth else None
        if self.full and (
            self.depth <= self.max_events * RESUME_FRACTION
            and self.bytes <= self.max_bytes * RESUME_FRACTION
        ):
            self._set_full(False)

    @property
    def to_forward(self) -> int:
        """Spooled events not confirmed yet: ``depth`` less the rows being deleted, whose
        delete may have failed (a full disk) and waits for the next one. A new event may pass
        confirmed rows without changing the order consumers see."""
        return max(0, self.depth - len(self.deleting))

    def mark_sent(self, seqs: list[int]) -> None:
        """Record that rows ``seqs`` are about to be published (the forwarder calls this
        before it publishes them): a row still spooled at the next start may have reached the
        broker, and forwarding it then counts as a redelivery
        (``relay_spool_redelivered_total``). See ``SentLog``."""
        self._sent_log.append(seqs)

    def _forget(self, seqs: Iterable[int]) -> None:
        """Rows about to be deleted: never forwarded again, not even by a read already under
        way (its snapshot may still hold them)."""
        self.deleting.update(seqs)
        for gone in self._reads:
            gone.update(seqs)

    async def peek(self, limit: int, after: int = 0) -> list[SpooledEvent]:
        """The oldest ``limit`` spooled events with ``seq > after``, less any deleted (or being
        deleted) while the read ran. Read on a reader thread with its own connection (WAL lets
        it read while the writer commits), so reads never wait behind an fsync."""
        assert self._loop is not None
        gone: set[int] = set()
        self._reads.append(gone)
        try:
            rows = await self._loop.run_in_executor(self._reader, self._read, limit, after)
        finally:
            self._reads.remove(gone)
        return [r for r in rows if r.seq not in gone and r.seq not in self.deleting]

    def _read(self, limit: int, after: int) -> list[SpooledEvent]:
        conn = self._reader_conn
        if conn is None:
            conn = self._reader_conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5
            )
        try:
            return read_events(conn, limit, after)
        except sqlite3.Error as exc:
            raise BrokerUnavailable("spool_error", f"the spool read failed: {exc}") from None

    def remember_key(self, digest: bytes, expiry: int) -> None:
        """Persist a delivered dedup key (the MemoryDedupStore ``on_commit`` hook): committed
        in one ``executemany`` with the writer's next transaction, at most
        ``KEY_FLUSH_INTERVAL`` seconds later, ``synchronous=NORMAL``, never awaited. (A crash in
        that window forgets the key: RETM's retry is then published again, with the same
        message_id.) On the hot path this is one list extend: no wake-up of the writer thread
        per event, which would contend for the GIL with the event loop."""
        if self.opened.is_set():
            keys = self._keys
            keys.extend((expiry, digest))
            if len(keys) == 2 * KEY_FLUSH_BACKLOG:
                self._queue.put(_FLUSH_KEYS)

    def status(self) -> dict[str, Any]:
        """The spool's state for /health."""
        return {
            "path": str(self.path),
            "open": self.opened.is_set(),
            "events": self.depth,
            "bytes": self.bytes,
            "oldest_age_seconds": self.oldest_age(),
            "max_events": self.max_events,
            "max_bytes": self.max_bytes,
            "full": self.full,
            "held": len(self.held),
            "late_confirms": self.late_confirms,
        }

    def oldest_age(self) -> float:
        """Seconds since the oldest spooled event was written (0 when empty)."""
        return max(0.0, self._clock() - self.oldest_at) if self.oldest_at is not None else 0.0

    def readiness(self) -> str | None:
        """None when the spool can take events, else the reason."""
        if not self.opened.is_set():
            return "spool not open"
        if self.write_error is not None:
            return f"spool writes failing: {self.write_error}"
        if self.full:
            return (
                f"spool full: {self.depth} events, {self.bytes} bytes "
                f"(spool.max_events {self.max_events}, spool.max_bytes {self.max_bytes})"
            )
        return None

    def _close_reader(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None

    def _set_full(self, full: bool) -> None:
        if full == self.full:
            return
        self.full = full
        if full:
            log.warning("spool.full", events=self.depth, bytes=self.bytes)
        else:
            log.info("spool.accepting", events=self.depth, bytes=self.bytes)

    def _submit(self, run: Callable[[sqlite3.Connection], Any], kind: OpKind) -> Any:
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Op(run, kind, future))
        return future

    # -- the writer thread -----------------------------------------------------------------

    def _writer(self, ready: asyncio.Future[_Opened]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = connect(self.path)
            _fsync_dir(self.path.parent)
            self._prune(conn)
            stats = read_stats(conn)
            sent = self._sent_log.survivors(conn)
            keys = [
                (bytes(d), e)
                for d, e in conn.execute(
                    "SELECT digest, expiry FROM dedup_log WHERE expiry > ? ORDER BY rowid",
                    (int(self._clock()),),
                )
            ]
        except (SpoolError, sqlite3.Error, OSError) as exc:
            error = exc if isinstance(exc, SpoolError) else SpoolError(str(exc))
            loop.call_soon_threadsafe(_settle, ready, None, error)
            loop.call_soon_threadsafe(_settle, self._stopped, None, None)
            return
        loop.call_soon_threadsafe(_settle, ready, (stats, keys, sent), None)
        mode = "FULL"
        last_prune = time.monotonic()
        try:
            while True:
                try:
                    # Always a timeout: keys appended while this thread waits do not wake it
                    # (remember_key does not signal), so an unbounded wait would leave them
                    # unwritten until some other spool write came along.
                    first = self._queue.get(timeout=KEY_FLUSH_INTERVAL)
                except queue.Empty:
                    first = _FLUSH_KEYS
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                ops = [op for op in batch if isinstance(op, _Op)]  # (_FLUSH_KEYS only wakes)
                if time.monotonic() - last_prune > PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    ops.append(_Op(self._prune, "write", None))
                mode = self._commit(conn, ops, mode)
                if stop:
                    return
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            loop.call_soon_threadsafe(_settle, self._stopped, None, None)

    def _commit(self, conn: sqlite3.Connection, ops: list[_Op], mode: str) -> str:
        """Run the write ops of one round and the delivered keys waiting in ``_keys`` in one
        transaction, then the reads; hand the results to the event loop in one callback.
        Returns the synchronous mode now in force."""
        writes = [op for op in ops if op.kind != "read"]
        keys, self._keys = self._keys, []  # appends after the swap go to the next round
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        if writes or keys:
            want = "FULL" if any(op.kind == "durable" for op in writes) else "NORMAL"
            try:
                if want != mode:
                    conn.execute(f"PRAGMA synchronous={want}")
                    mode = want
                conn.execute("BEGIN IMMEDIATE")
                values = [op.run(conn) for op in writes]
                if keys:
                    pairs = iter(keys)
                    conn.executemany(
                        "INSERT INTO dedup_log (expiry, digest) VALUES (?, ?)",
                        zip(pairs, pairs, strict=True),
                    )
                conn.execute("COMMIT")
                self.commits += 1
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self._compact_after_commit = False  # (the delete did not happen)
                error = BrokerUnavailable("spool_error", f"the spool write failed: {exc}")
                results += [(op.future, None, error) for op in writes]
                if self.write_error is None:  # one line per change of state, not per write
                    log.error("spool.write_failed", error=str(exc), operations=len(writes))
                self.write_error = str(exc)
            else:
                results += [(op.future, v, None) for op, v in zip(writes, values, strict=True)]
                if self.write_error is not None:
                    log.info("spool.write_recovered", error=self.write_error)
                    self.write_error = None
        for op in ops:
            if op.kind == "read":
                try:
                    results.append((op.future, op.run(conn), None))
                except sqlite3.Error as exc:
                    error = BrokerUnavailable("spool_error", f"the spool read failed: {exc}")
                    results.append((op.future, None, error))
        assert self._loop is not None
        if results:  # (a round of delivered keys alone wakes nobody on the event loop)
            self._loop.call_soon_threadsafe(_settle_all, results)
        if self._compact_after_commit:  # (after the answers: nobody waits for it)
            self._compact(conn)
        return mode

    def _compact(self, conn: sqlite3.Connection) -> None:
        """``compact`` after a delete emptied the spool (on the writer thread). A failure is
        logged and left for the next time the spool empties."""
        self._compact_after_commit = False
        try:
            compact(conn)
        except sqlite3.Error as exc:
            log.warning("spool.compact_failed", error=str(exc))
            return
        self.compactions += 1

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Cut expired keys, and the oldest beyond ``dedup_max_entries``, from the front of the
        log (keys are in commit order, so both are a rowid range)."""
        first_live = conn.execute(
            "SELECT rowid FROM dedup_log WHERE expiry > ? ORDER BY rowid LIMIT 1",
            (int(self._clock()),),
        ).fetchone()
        (last,) = conn.execute("SELECT coalesce(max(rowid), 0) FROM dedup_log").fetchone()
        cut = min(
            last + 1 if first_live is None else first_live[0], last - self.dedup_max_entries + 1
        )
        conn.execute("DELETE FROM dedup_log WHERE rowid < ?", (cut,))


def _settle(future: asyncio.Future[Any] | None, value: Any, error: BaseException | None) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _settle_all(
    results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]],
) -> None:
    for future, value, error in results:
        _settle(future, value, error)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("spool.delete_failed", error=str(task.exception()))
