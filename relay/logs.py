"""Logging: structlog configured once, for the relay and for the libraries it uses.

JSON lines (one object per line, ``event`` holding a stable dotted name such as
``webhook.accepted``) when stdout is not a terminal, as under systemd and journald; a readable
console format on a terminal. aiohttp's and aio-pika's standard-library loggers go through the
same processors, so every line has the same shape. A request id is bound through contextvars.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

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
        factory: Any = structlog.BytesLoggerFactory(stream.buffer)
    else:
        renderer = own_renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        factory = structlog.WriteLoggerFactory(stream)
    # Either factory writes each line in one write() (print() makes two: the text, then "\n"),
    # so the lines of several worker processes sharing stdout never run into each other.

    structlog.configure(
        processors=[*shared, own_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(stream)
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
