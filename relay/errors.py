"""The few named exceptions of retm-relay.

Callers catch these narrow types; anything else is a bug and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
from typing import Any


class RelayError(Exception):
    """Base class of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is missing or invalid.

    ``key`` is the dotted TOML key (``amqp.publish_timeout``) so that the operator knows what to
    fix; the message never contains a secret's value.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class TopologyError(RelayError):
    """The broker's exchanges or queues disagree with what the relay needs (type, arguments, or
    missing in passive mode). Fatal at start-up; reported by readiness afterwards."""


class BrokerUnavailable(RelayError):
    """The event could not be made durable on the broker: no link, link blocked, channel closed,
    or no publisher confirm within ``amqp.publish_timeout``.

    ``reason`` is a short machine-readable word (``disconnected``, ``blocked``, ``timeout``,
    ``nacked``, ``channel_closed``, ``returned``) used in metrics, logs and 503 bodies.
    """

    def __init__(
        self, reason: str, detail: str = "", pending: asyncio.Future[Any] | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        #: after a ``timeout``, the confirmation still to come (a result: confirmed after all;
        #: an exception: not confirmed)
        self.pending = pending


class StoreUnavailable(RelayError):
    """A shared store (the Redis dedup store) cannot be reached."""
