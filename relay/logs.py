"""Logging: structlog configured once, for the relay and for the libraries it uses.

JSON lines (one object per line, ``event`` holding a stable dotted name such as
``webhook.accepted``) when stdout is not a terminal, as under systemd and journald; a readable
console format on a terminal. aiohttp's and aio-pika's standard-library loggers go through the
same processors, so every line has the same shape. A request id is bound through contextvars.

JSON lines are written in batches (``LineWriter``): a line at INFO or below waits at most
``FLUSH_DELAY`` seconds in memory, and every line waiting goes out in writes of at most
``PIPE_BUF`` bytes, whole lines each. One write per webhook was a blocking system call on the
event loop for each event; a WARNING or worse, a line written outside the event loop's thread,
and the process's exit flush at once. A SIGKILL loses at most the last ``FLUSH_DELAY`` seconds
of INFO lines.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import select
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal, TextIO

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_iso_second: list[Any] = [-1, ""]

#: seconds an INFO line may wait for the next batch write
FLUSH_DELAY = 0.1
#: the largest write: up to this size a write to a pipe is atomic, so the lines of several
#: worker processes sharing one pipe never run into each other
PIPE_BUF = select.PIPE_BUF


class LineWriter:
    """A structlog logger (and stdlib logging stream) writing lines to ``raw`` in batches.

    ``msg`` (debug and info) keeps the line and, from the event loop's thread, schedules a
    flush ``FLUSH_DELAY`` seconds later; a batch of ``PIPE_BUF`` bytes flushes at once.
    ``warning``, ``error`` and the like, and a line logged where no event loop runs, flush at
    once, after the lines before them. Thread-safe; the process's exit flushes what waits.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        """Queue one line (without its newline)."""
        line = message + b"\n"
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            if self._size < PIPE_BUF and self._timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    pass
                else:
                    self._timer = loop.call_later(FLUSH_DELAY, self.flush)
                    return
            elif self._size < PIPE_BUF:
                return
            self._write()

    def now(self, message: bytes) -> None:
        """Write one line (without its newline) at once, after the lines waiting."""
        with self._lock:
            self._lines.append(message + b"\n")
            self._write()

    debug = info = msg
    log = warn = warning = fatal = failure = err = error = critical = exception = now

    def flush(self) -> None:
        """Write every line waiting."""
        with self._lock:
            self._write()

    def write(self, text: str) -> None:
        """The stdlib logging stream side: ``text`` goes out at once, after the lines waiting
        (standard-library records are warnings and errors of libraries, and rare)."""
        with self._lock:
            self._lines.append(text.encode())
            self._write()

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > PIPE_BUF:
                self._raw.write(b"".join(chunk))
                self._raw.flush()  # one write() per chunk, never two chunks in one
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._raw.write(b"".join(chunk))
        self._raw.flush()


class _LineWriterFactory:
    def __init__(self, writer: LineWriter) -> None:
        self.writer = writer

    def __call__(self, *_: Any) -> LineWriter:
        return self.writer


def iso_utc_millis(ts: float) -> str:
    """``2026-11-30T10:04:25.672Z`` for Unix time ``ts`` (the per-second part is cached: this
    runs for every log line and every message header)."""
    second = int(ts)
    if second != _iso_second[0]:
        _iso_second[0] = second
        _iso_second[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_iso_second[1]}.{int((ts - second) * 1000):03d}Z"  # milliseconds, truncated


def _timestamp(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["timestamp"] = iso_utc_millis(time.time())
    return event_dict


def _orjson_text(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _orjson_bytes(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=str)


class BadRequestFilter(logging.Filter):
    """For the ``aiohttp.server`` logger: a request its HTTP parser refuses (bad request
    line, header or chunk, a line too long: an ``HttpProcessingError``) is logged by aiohttp
    at ERROR with a traceback and an excerpt of the offending line, which can hold a Bearer
    token. It becomes one WARNING line ``http.bad_request`` with ``remote`` (the client's
    address), ``reason`` (the parser's error class) and ``status`` (400), nothing else, and
    ``on_bad_request`` (set by ``count_bad_requests``) is called once for it."""

    def __init__(self) -> None:
        super().__init__()
        self.on_bad_request: Callable[[], None] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite such a record in place; let every other record through unchanged."""
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            if self.on_bad_request is not None:
                self.on_bad_request()
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg, record.args = "http.bad_request", ()
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.remote, record.reason, record.status = remote, type(error).__name__, error.code
        return True


def count_bad_requests(callback: Callable[[], None]) -> None:
    """Call ``callback`` once per request aiohttp's HTTP parser refuses (see BadRequestFilter;
    the relay counts them as ``relay_rejected_total{reason="bad_http"}``). One callback per
    process: the last one set wins."""
    _bad_request_filter().on_bad_request = callback


def _bad_request_filter() -> BadRequestFilter:
    """The BadRequestFilter of the ``aiohttp.server`` logger (added when missing)."""
    server = logging.getLogger("aiohttp.server")
    for existing in server.filters:
        if isinstance(existing, BadRequestFilter):
            return existing
    added = BadRequestFilter()
    server.addFilter(added)
    return added


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard library's logging (once, at start-up).

    level: ``debug``, ``info``, ``warning`` or ``error``. fmt: ``json``, ``console``, or
    ``auto`` (JSON unless ``stream`` is a terminal). stream: default ``sys.stdout``.
    """
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    level_no = LEVELS[level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,  # ISO 8601 UTC with milliseconds, like structlog's TimeStamper but cached
    ]
    if as_json:
        # Tracebacks as data, never with local variables: locals can hold tokens and bodies.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer: Any = structlog.processors.JSONRenderer(serializer=_orjson_text)
        # The relay's own lines (one per webhook) skip the bytes -> str -> bytes round trip.
        own_renderer: Any = structlog.processors.JSONRenderer(serializer=_orjson_bytes)
        writer = LineWriter(stream.buffer)
        factory: Any = _LineWriterFactory(writer)
        target: Any = writer
    else:
        renderer = own_renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        factory = structlog.WriteLoggerFactory(stream)
        target = stream
    # Each line goes out whole in one write() (print() makes two: the text, then "\n"), so
    # the lines of several worker processes sharing stdout never run into each other.

    structlog.configure(
        processors=[*shared, own_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(target)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                _logger_name,
                structlog.stdlib.ExtraAdder(allow=("remote", "reason", "status")),
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_no)
    _bad_request_filter()
    # One line per webhook is written by the relay itself; the access log would double it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiormq reports every reconnect attempt (at WARNING, and "error when creating transport"
    # at ERROR); the relay logs each change of a link once (broker.unreachable ...).
    logging.getLogger("aiormq.connection").addFilter(_not_a_reconnect_attempt)
    logging.getLogger("aiormq").setLevel(max(level_no, logging.ERROR))
    logging.getLogger("aio_pika").setLevel(max(level_no, logging.ERROR))


def _not_a_reconnect_attempt(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("error when creating transport")


def _logger_name(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger"] = record.name
    return event_dict
