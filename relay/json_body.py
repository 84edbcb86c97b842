"""Webhook bodies as JSON objects, by RFC 8259. Pure logic: no aiohttp, no I/O.

orjson reads almost every body, fast. Where it refuses one, Python's standard parser reads it
again before the relay decides, because RFC 8259 allows what orjson does not: lone surrogate
escapes (``"\\ud83d"``, a customer's name cut inside an emoji), numbers beyond a double
(``1e400``) and integers of any length. That parser is held to RFC 8259 where it is more
lenient: the text must be UTF-8 (§8.1), and ``NaN``, ``Infinity`` and ``-Infinity`` are
refused. Only the parsed values are touched (lone surrogates become U+FFFD, so that what is
read from them can be encoded); the body the relay publishes is always the bytes received.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

#: nesting limit (arrays and objects inside each other) of a body that only the tolerant
#: parser reads; orjson, the fast path, reads up to 1024 levels
MAX_DEPTH = 512
#: longest integer (digits) read as an int; longer ones are read as Decimal (Python's own
#: int-from-text limit is 4300 digits)
_MAX_INT_DIGITS = 4000


class BodyRefused(ValueError):
    """The body is not a JSON object: ``code`` (``invalid_json``, ``not_object``,
    ``too_deep``) and a short ``detail`` that never quotes the body."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (RFC 8259); raises BodyRefused ``invalid_json``,
    ``not_object`` or ``too_deep``.

    orjson first (fast); where it refuses, the standard library's parser, which also reads
    valid JSON that orjson does not: lone surrogate escapes (``"\\ud83d"``, a name cut inside
    an emoji), numbers beyond a double (``1e400``) and integers of any length. It is kept to
    RFC 8259: the text must be UTF-8, and ``NaN``, ``Infinity`` and ``-Infinity`` (which it
    would accept) are refused. Strings holding a lone surrogate are read with U+FFFD in its
    place (the body itself is published unchanged). Nesting limit: ``MAX_DEPTH`` levels for
    what only the second parser reads.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        body = _tolerant_loads(raw, exc.msg)
    if not isinstance(body, dict):
        raise BodyRefused("not_object", "the body must be a JSON object")
    return body


def _tolerant_loads(raw: bytes, first_error: str) -> Any:
    invalid = BodyRefused("invalid_json", f"the body is not valid JSON: {first_error}")
    too_deep = BodyRefused("too_deep", f"the body is nested deeper than {MAX_DEPTH} levels")
    try:
        text = raw.decode("utf-8")  # RFC 8259 §8.1: JSON exchanged between systems is UTF-8
    except UnicodeDecodeError:
        raise invalid from None
    try:
        try:
            value = json.loads(text, parse_constant=_not_json)
        except ValueError:  # perhaps only an integer beyond Python's 4300-digit limit
            value = json.loads(text, parse_constant=_not_json, parse_int=_integer)
    except RecursionError:  # the C scanner counts against the interpreter's recursion limit
        raise too_deep from None
    except ValueError:
        raise invalid from None
    if not _scrub(value):
        raise too_deep
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _integer(digits: str) -> int | Decimal:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else Decimal(digits)


def _scrub(value: Any) -> bool:
    """Replace, in place, every lone surrogate in the strings (keys too) of the parsed
    ``value`` by U+FFFD, so that what is read from it can be encoded as UTF-8 (headers,
    message_id, logs); False when it nests deeper than ``MAX_DEPTH``. Walks the containers
    with a stack of its own: no recursion, whatever the nesting."""
    stack: list[tuple[list[Any] | dict[Any, Any], int]] = []
    if isinstance(value, list | dict):
        stack.append((value, 1))
    while stack:
        container, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if type(container) is dict:
            if not all(key.isascii() for key in container):
                items = list(container.items())
                container.clear()
                container.update((_clean(key), item) for key, item in items)
            entries: Any = container.items()
        else:
            entries = enumerate(container)
        for slot, item in entries:  # type() rather than isinstance: json.loads makes no subclasses
            kind = type(item)
            if kind is str:
                if not item.isascii():
                    container[slot] = _clean(item)
            elif kind is list or kind is dict:
                stack.append((item, depth + 1))
    return True


def _clean(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (pairs are kept)."""
    if text.isascii():
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
