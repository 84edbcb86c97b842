"""Routing: which exchange and routing key an event is published with. Pure logic, no I/O.

The rule (docs/consumers.md, "Routing keys"):

- the routing key is the body's ``event`` lower-cased (``order.created``, ``customer.updated``);
- a missing or invalid ``event`` (not dotted words of ``[a-z0-9_-]``, or longer than 255 bytes)
  gives ``unrecognized``: the event is still published, never dropped;
- hooks without an ``event`` use fixed keys (``delivery.error``, ``app.installed``,
  ``loyalty.check_reward``, ``loyalty.redeem_reward``);
- an optional template appends ``{business}`` and ``{branch}`` segments, sanitised so that they
  can never add a ``.``, ``*``, ``#`` or an empty segment, within AMQP's 255-byte limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

UNRECOGNIZED = "unrecognized"
DELIVERY_ERROR = "delivery.error"
APP_INSTALLED = "app.installed"
LOYALTY_CHECK_REWARD = "loyalty.check_reward"
LOYALTY_REDEEM_REWARD = "loyalty.redeem_reward"

MAX_ROUTING_KEY_BYTES = 255
_EVENT_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_UNSAFE_SEGMENT_RE = re.compile(r"[^a-z0-9_-]")
MAX_SEGMENT_CHARS = 64
EMPTY_SEGMENT = "_"


def event_name(value: object) -> str | None:
    """The routing event for a body's ``event`` value, or ``None`` when it is unusable.

    ``value`` is whatever the JSON held (RETM sends a string such as ``"order.created"``, see
    docs/retm.md, "Telling the event type"). Upper case is folded (``Order.Created`` ->
    ``order.created``); anything that is not dotted words of ``[a-z0-9_-]``, or is longer than 255
    bytes, gives ``None``.
    """
    if not isinstance(value, str) or len(value) > MAX_ROUTING_KEY_BYTES or not value.isascii():
        return None  # non-ASCII never qualifies, even where lower() would make it ASCII (K)
    lowered = value.lower()
    return lowered if _EVENT_RE.fullmatch(lowered) else None


def segment(value: object) -> str:
    """A routing-key segment for a business or branch id: lower-cased, every character outside
    ``[a-z0-9_-]`` replaced by ``_``, at most 64 characters; ``_`` when missing or empty."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        return EMPTY_SEGMENT
    cleaned = _UNSAFE_SEGMENT_RE.sub("_", value.lower()[:MAX_SEGMENT_CHARS])
    return cleaned or EMPTY_SEGMENT


@dataclass(frozen=True, slots=True)
class Route:
    """Where one event goes: ``exchange`` name and ``routing_key`` (at most 255 bytes)."""

    exchange: str
    routing_key: str


class Router:
    """Turns an event name and the merchant's ids into a Route.

    template: ``amqp.routing_key_template``, such as ``{event}`` or ``{event}.{business}.{branch}``.
    exchange: the default exchange; exchanges: event family (first word) -> exchange name.
    """

    __slots__ = ("_cache", "_default", "_exchanges", "_plain", "_template")

    def __init__(self, template: str, exchange: str, exchanges: Mapping[str, str]) -> None:
        self._template = template
        self._plain = template == "{event}"
        self._default = exchange
        self._exchanges = dict(exchanges)
        self._cache: dict[str, Route] = {}

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every event exchange this router can choose, default first."""
        return (self._default, *sorted(set(self._exchanges.values()) - {self._default}))

    def exchange_for(self, event: str) -> str:
        """The exchange for ``event`` (its first word picks an entry of the exchange map)."""
        return self._exchanges.get(event.partition(".")[0], self._default)

    def route(self, event: str, business: object = None, branch: object = None) -> Route:
        """The Route for ``event`` (already a valid event name or a fixed key).

        business, branch: raw ids (RETM's ``business_refrence``/``branch_id``), sanitised here.
        When the filled template would exceed 255 bytes, the event alone is the routing key.
        """
        if self._plain:
            route = self._cache.get(event)
            if route is None:
                route = Route(self.exchange_for(event), event)
                if len(self._cache) < 4096:
                    self._cache[event] = route
            return route
        key = (
            self._template.replace("{event}", event)
            .replace("{business}", segment(business))
            .replace("{branch}", segment(branch))
        )
        if len(key) > MAX_ROUTING_KEY_BYTES:
            key = event
        return Route(self.exchange_for(event), key)
