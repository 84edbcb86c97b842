"""Settings: one frozen tree, loaded once.

``load_settings(path, environ)`` builds it from built-in defaults, then the TOML file, then
``RELAY_<SECTION>_<KEY>`` environment variables, and validates it. Nothing reads ``os.environ``
after start-up. A secret setting may also come from a file named by ``RELAY_<SECTION>_<KEY>_FILE``
(for systemd credentials or a mounted secret), and secrets are masked in ``repr``.

The key names are part of the public contract; every key is documented with its default in
``config/relay.example.toml`` and, with its environment variable and meaning, in
``docs/configuration.md`` (``tests/test_docs.py`` fails when a key is missing there).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import SplitResult, urlsplit

import orjson

from relay.errors import ConfigError
from relay.redis_url import RedisUrlError, parse_redis_url

DEFAULT_CONFIG_PATH = Path("/etc/retm-relay/relay.toml")
ENV_PREFIX = "RELAY_"
_BUSINESS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string (token, password, URL with credentials). ``repr`` and ``str`` mask it."""

    value: str

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """One webhook Bearer token, optionally bound to a RETM business (``business_id`` from the
    install callback: docs/retm.md, "Install callback"). A bound token makes that business the
    principal of every event it authenticates."""

    token: Secret
    business: str | None = None


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP listener. ``max_body_bytes`` bounds the body both as received and after gzip or
    deflate decompression; ``shutdown_timeout`` (seconds) bounds the graceful stop.

    ``workers`` > 1 runs that many processes sharing ``port`` (SO_REUSEPORT, relay/workers.py);
    worker n also listens alone on ``worker_port_base + n`` so that its own ``/metrics`` and
    ``/health`` can be scraped (``worker_port_base = 0``: ``port + 1``, or any free ports when
    ``port`` is 0).

    Security (``relay.tls``, ``relay.access``): ``tls_cert`` (PEM certificate chain) and
    ``tls_key`` (its unencrypted PEM private key) turn on HTTPS, reloaded on SIGHUP.
    ``trusted_proxies`` (IP addresses or CIDRs) are the reverse proxies whose
    ``X-Forwarded-For``/``X-Forwarded-Proto`` are believed. ``allow_sources`` (CIDRs; empty:
    any) and ``rate_limit`` (requests per second per source, 0: off) with ``rate_burst``
    (requests) guard every route but the monitoring ones. Plain HTTP on an address other than
    loopback needs ``trusted_proxies`` (TLS terminated in front of the relay).

    Slow and idle clients (``relay.http.limits``): ``read_timeout`` (seconds) bounds a
    request's headers and body, counted from its first byte (RETM itself gives up after 10 s);
    ``keepalive_timeout`` (seconds) closes a connection idle between requests (keep it above a
    reverse proxy's own upstream keep-alive timeout, 60 s in nginx); ``max_connections`` caps
    open connections (at the cap the longest-idle one is closed for a new one).
    ``max_inflight_bytes`` bounds the request bodies held at once (bytes); beyond it a webhook
    is answered 503 with Retry-After before its body is read."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    events_path: str = "/retm/events"
    errors_path: str = "/retm/errors"
    shutdown_timeout: float = 20.0
    workers: int = 1
    worker_port_base: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    trusted_proxies: tuple[str, ...] = ()
    allow_sources: tuple[str, ...] = ()
    rate_limit: float = 0.0
    rate_burst: int = 20
    read_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 4096
    max_inflight_bytes: int = 8_388_608


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Bearer tokens accepted on the webhook routes. Several at once allow rotation; none means
    every webhook answers 401. Environment form: ``RELAY_AUTH_TOKENS="tok1,business:tok2"``."""

    tokens: tuple[TokenSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    """The broker link and the topology the relay publishes to.

    ``url`` names one broker node, or the nodes of a RabbitMQ cluster in the order the links
    try them (a TOML array, or comma-separated in ``RELAY_AMQP_URL``; kept as one masked
    secret, ``urls()`` splits it). ``exchanges`` maps an event family (the routing key's first
    word, ``order``) to its own exchange; other events go to ``exchange``. ``passive`` only
    checks that the exchanges and the relay's own queues exist, for a broker user without the
    configure permission. ``fast_publish`` false forces aiormq's public ``basic_publish``
    instead of the relay's own frame writer (relay/amqp/senders.py). Times in seconds.
    """

    url: Secret = Secret("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = "retm.events"
    exchanges: dict[str, str] = field(default_factory=dict)
    unrouted_exchange: str = "retm.unrouted"
    rejected_exchange: str = "retm.rejected"
    routing_key_template: str = "{event}"
    publish_timeout: float = 5.0
    connect_timeout: float = 5.0
    heartbeat: int = 10
    passive: bool = False
    fast_publish: bool = True

    def urls(self) -> tuple[str, ...]:
        """The broker nodes' URLs, in the configured order (at least one after validation)."""
        return split_urls(self.url.value)


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list (spaces and empty parts dropped). A comma inside a
    password must be written ``%2C``."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class DedupSettings:
    """The dedup cache: ``ttl`` in seconds, at most ``max_entries`` delivered keys kept.
    ``key_fields`` are the body fields tried in order for the event's identity (the first
    non-empty one wins; otherwise the body's SHA-256).

    With ``backend = "redis"`` (relay/dedup/redis.py) keys live under ``redis_prefix`` in the
    Redis at ``redis_url``; ``redis_timeout`` (seconds) bounds connecting and each command, and
    ``on_store_failure`` says what happens while Redis cannot be reached: ``reject`` answers 503
    with Retry-After, ``local`` falls back to the in-memory store of this process.

    ``hash_ttl`` (seconds; ``ttl`` when that is shorter) is how long a key made from the body's
    SHA-256 (an event without a reference, a quarantined body) is remembered: long enough to
    absorb RETM's retries of one delivery (three attempts, each given 10 s, retried within
    minutes), short enough that the same body sent again later as a new event is published
    again.
    """

    backend: Literal["memory", "redis"] = "memory"
    ttl: float = 86_400.0
    hash_ttl: float = 3_600.0
    max_entries: int = 1_000_000
    redis_url: Secret = Secret("redis://127.0.0.1:6379/0")
    key_fields: tuple[str, ...] = ("reference",)
    on_store_failure: Literal["reject", "local"] = "reject"
    redis_prefix: str = "retm-relay:dedup:"
    redis_timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where the relay keeps state on disk: ``$STATE_DIRECTORY`` (systemd), else ``./var``."""

    dir: Path = Path("var")


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """The local spool (store and forward) in ``state.dir``: events the broker could not confirm
    in time are written and fsynced there before the 2xx, and forwarded once it is back.

    ``file``: the SQLite file's name inside ``state.dir`` (one per relay process).
    ``max_bytes``, ``max_events``: when either is reached, webhooks answer 503 and readiness
    fails until the forwarder has drained the spool below 90 % of both.
    """

    file: str = "spool.db"
    max_bytes: int = 1_073_741_824
    max_events: int = 1_000_000


@dataclass(frozen=True, slots=True)
class InstallSettings:
    """RETM's app-install callback (docs/retm.md, "Install callback") and the per-merchant
    token registry.

    enabled: the install route exists only when true. path: where RETM posts the callback; make
    it unguessable (``/retm/install/<random>``), since whoever reaches it can mint a token.
    require_data: keys and values the callback's ``data`` must hold (your own query parameters
    from the authorization link, such as a ``state`` secret); a mismatch answers 403.
    settings_url: the ``url`` of the answer (your app's settings page; empty: no ``url``).
    token_grace: seconds an older token of a merchant stays valid after a new install rotates it.
    store: where the registry lives: ``state`` (SQLite in ``state.dir``) or ``redis``
    (``dedup.redis_url``, shared by every relay instance). redis_key: the key prefix there.
    """

    enabled: bool = False
    path: str = field(default="/retm/install", repr=False)
    require_data: dict[str, str] = field(default_factory=dict, repr=False)
    settings_url: str = ""
    token_grace: float = 86_400.0
    store: Literal["state", "redis"] = "state"
    redis_key: str = "retm-relay:tokens"


@dataclass(frozen=True, slots=True)
class LoyaltySettings:
    """RETM's synchronous loyalty hooks (docs/retm.md, "Check Reward", "Redeem Reward"),
    answered over RabbitMQ RPC (direct reply-to).

    enabled: the two routes and the RPC link exist only when true.
    timeout: seconds to wait for a responder's reply (below RETM's 10 s).
    fallback_status, fallback_body: the answer when no responder is bound, none replies in time,
    or the link is down; by default RETM's "invalid reward" shape (400, ``message``, ``errors``).
    cache_max_entries: most redeem answers kept in memory (for ``dedup.ttl``) to answer RETM's
    retries. With ``dedup.backend = "redis"`` they are kept in Redis under ``redis_key``.
    """

    enabled: bool = True
    check_reward_path: str = "/retm/loyalty/check-reward"
    redeem_reward_path: str = "/retm/loyalty/redeem-reward"
    timeout: float = 5.0
    fallback_status: int = 400
    fallback_body: str = (
        '{"data":[],"message":"The reward cannot be checked right now, please try again.",'
        '"errors":["loyalty system unavailable"]}'
    )
    cache_max_entries: int = 100_000
    redis_key: str = "retm-relay:loyalty"


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Log level and format: ``auto`` is JSON lines unless stdout is a terminal."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True, slots=True)
class ArchiveSettings:
    """The archive (docs/replay.md): every event answered 2xx is also published, with its
    original body, properties and headers, to the fanout exchange ``queue``, bound to the
    RabbitMQ stream of the same name, from which ``retm-relay replay`` republishes a window.

    enabled: declare and publish to the archive (an event is then answered 2xx only once the
    archive confirmed it too). max_age: the stream's ``x-max-age``, a number and one unit of
    ``Y`` (years), ``M`` (months), ``D`` (days), ``h``, ``m``, ``s`` (``7D``). max_bytes: its
    ``x-max-length-bytes``. RabbitMQ applies both limits by deleting whole segment files
    (500 MB by default), so the archive holds at least this much, a little more."""

    enabled: bool = True
    queue: str = "retm.archive"
    max_age: str = "7D"
    max_bytes: int = 10_000_000_000


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One consumer queue that ``retm-relay declare`` creates: a durable quorum queue ``name``,
    bound with each topic pattern of ``bindings`` (``order.#``, ``customer.*``) to ``exchange``,
    by default to every event exchange that can carry matching routing keys. Messages a consumer
    rejects (or that expire) are dead-lettered to the queue ``<name>.dead``."""

    name: str
    bindings: tuple[str, ...]
    exchange: str | None = None


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """The consumer queues ``retm-relay declare`` creates, and the dead-letter exchange (direct)
    their rejected messages go through; empty means ``<amqp.exchange>.dlx``. The relay itself
    never declares these: consumers own their queues, this only sets them up the standard way.
    Environment form: ``RELAY_CONSUMERS_QUEUES="erp.orders=order.#,crm.customers=customer.*"``
    (a name repeated adds a binding)."""

    queues: tuple[QueueSpec, ...] = ()
    dead_letter_exchange: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration. ``source`` says where it came from (a path, or ``defaults``)."""

    http: HttpSettings = field(default_factory=HttpSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    amqp: AmqpSettings = field(default_factory=AmqpSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    state: StateSettings = field(default_factory=StateSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    log: LogSettings = field(default_factory=LogSettings)
    install: InstallSettings = field(default_factory=InstallSettings)
    loyalty: LoyaltySettings = field(default_factory=LoyaltySettings)
    consumers: ConsumerSettings = field(default_factory=ConsumerSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    source: str = "defaults"


_SECRET_KEYS = frozenset(
    {"auth.tokens", "amqp.url", "dedup.redis_url", "install.path", "install.require_data"}
)


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path | None:
    """The configuration file to read: ``--config``, else ``$RELAY_CONFIG``, else
    ``/etc/retm-relay/relay.toml`` when it exists, else ``None`` (built-in defaults)."""
    if cli_path:
        return Path(cli_path)
    if environ.get("RELAY_CONFIG"):
        return Path(environ["RELAY_CONFIG"])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Build and validate the settings: defaults < TOML file at ``path`` < ``RELAY_*`` variables.

    Raises ConfigError naming the key (``amqp.publish_timeout``) for an unknown key, a value of
    the wrong type or out of range, or an unreadable file.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {path}") from None
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
        source = str(path)

    sections: dict[str, Any] = {}
    for section_field in dataclasses.fields(Settings):
        if section_field.name == "source":
            continue
        section_cls = _hints(Settings)[section_field.name]
        table = raw.pop(section_field.name, {})
        if not isinstance(table, dict):
            raise ConfigError(section_field.name, "must be a table")
        sections[section_field.name] = _build_section(
            section_field.name, section_cls, table, environ
        )
    if raw:
        raise ConfigError(sorted(raw)[0], "unknown section")
    _check_environ(environ)
    settings = Settings(**sections, source=source)
    validate(settings)
    return settings


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(name: str, cls: type, table: dict[str, Any], environ: Mapping[str, str]) -> Any:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        env_name = f"{ENV_PREFIX}{name}_{f.name}".upper()
        in_toml = f.name in table
        toml_value = table.pop(f.name, None)
        if env_name in environ:
            values[f.name] = _from_env(key, hints[f.name], environ[env_name])
        elif f"{env_name}_FILE" in environ and key in _SECRET_KEYS:
            file_path = Path(environ[f"{env_name}_FILE"])
            try:
                text = file_path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(key, f"cannot read {env_name}_FILE: {exc.strerror}") from None
            values[f.name] = _from_env(key, hints[f.name], text.strip(), multiline=True)
        elif in_toml:
            values[f.name] = _from_toml(key, hints[f.name], toml_value)
    if table:
        raise ConfigError(f"{name}.{sorted(table)[0]}", "unknown key")
    if name == "state" and "dir" not in values and environ.get("STATE_DIRECTORY"):
        values["dir"] = Path(environ["STATE_DIRECTORY"].split(":")[0])
    return cls(**values)


def _check_environ(environ: Mapping[str, str]) -> None:
    """A misspelt ``RELAY_AMQP_URLL`` would silently do nothing: refuse it instead."""
    known = set()
    for section_field in dataclasses.fields(Settings):
        if section_field.name == "source":
            continue
        for f in dataclasses.fields(_hints(Settings)[section_field.name]):
            name = f"{ENV_PREFIX}{section_field.name}_{f.name}".upper()
            known.update({name, f"{name}_FILE"})
    sections = {
        f"{ENV_PREFIX}{f.name}_".upper() for f in dataclasses.fields(Settings) if f.name != "source"
    }
    for name in environ:
        if any(name.startswith(prefix) for prefix in sections) and name not in known:
            raise ConfigError(name, "unknown environment variable for a relay setting")


def _from_toml(key: str, tp: Any, value: Any) -> Any:
    if key == "amqp.url" and isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(key, "must be a URL or a non-empty list of URLs")
        return Secret(",".join(v.strip() for v in value))
    if tp is Secret or _is_optional_of(tp, Secret):
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        return Secret(value)
    if key == "auth.tokens":
        if not isinstance(value, list):
            raise ConfigError(key, "must be a list of tokens or {token, business} tables")
        return tuple(_token_from_toml(key, item) for item in value)
    if key == "consumers.queues":
        return _queues_from_toml(key, value)
    return _coerce(key, tp, value)


def _token_from_toml(key: str, item: Any) -> TokenSpec:
    if isinstance(item, str):
        return TokenSpec(Secret(item))
    if isinstance(item, dict) and set(item) <= {"token", "business"} and "token" in item:
        token, business = item["token"], item.get("business")
        if isinstance(token, str) and (business is None or isinstance(business, str)):
            return TokenSpec(Secret(token), business)
    raise ConfigError(key, "each entry must be a string or a {token, business} table")


def _queues_from_toml(key: str, value: Any) -> tuple[QueueSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, "must be a list of {name, bindings, exchange} tables")
    queues = []
    for item in value:
        if not isinstance(item, dict) or not {"name", "bindings"} <= set(item):
            raise ConfigError(key, "each entry must be a table with name and bindings")
        if not set(item) <= {"name", "bindings", "exchange"}:
            unknown = sorted(set(item) - {"name", "bindings", "exchange"})[0]
            raise ConfigError(f"{key}.{unknown}", "unknown key")
        name, bindings, exchange = item["name"], item["bindings"], item.get("exchange")
        if isinstance(bindings, str):
            bindings = [bindings]
        if not isinstance(name, str) or not isinstance(exchange, str | None):
            raise ConfigError(key, "name and exchange must be strings")
        if not isinstance(bindings, list) or not all(isinstance(b, str) for b in bindings):
            raise ConfigError(f"{key}.bindings", "must be a list of binding patterns")
        queues.append(QueueSpec(name, tuple(bindings), exchange))
    return tuple(queues)


def _queues_from_env(key: str, text: str) -> tuple[QueueSpec, ...]:
    bindings: dict[str, list[str]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, pattern = part.partition("=")
        if not sep:
            raise ConfigError(key, "must be queue=pattern pairs separated by commas")
        bindings.setdefault(name.strip(), []).append(pattern.strip())
    return tuple(QueueSpec(name, tuple(patterns)) for name, patterns in bindings.items())


def _from_env(key: str, tp: Any, text: str, *, multiline: bool = False) -> Any:
    if key == "auth.tokens":
        parts = re.split(r"[,\n]" if multiline else ",", text)
        tokens = []
        for part in (p.strip() for p in parts):
            if not part or part.startswith("#"):
                continue
            business, sep, token = part.partition(":")
            if sep and _BUSINESS_RE.fullmatch(business):
                tokens.append(TokenSpec(Secret(token), business))
            else:
                tokens.append(TokenSpec(Secret(part)))
        return tuple(tokens)
    if key == "consumers.queues":
        return _queues_from_env(key, text)
    if tp is Secret:
        return Secret(text)
    origin = get_origin(tp)
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(key, f"must be true or false, not {text!r}")
    if origin is tuple:
        return tuple(p.strip() for p in text.split(",") if p.strip())
    if origin is dict:
        mapping: dict[str, str] = {}
        for part in (p.strip() for p in re.split(r"[,\n]" if multiline else ",", text)):
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(key, "must be name=value pairs separated by commas")
            mapping[name.strip()] = value.strip()
        return mapping
    if tp is int or tp is float or _is_optional_of(tp, int) or _is_optional_of(tp, float):
        number_type = int if (tp is int or _is_optional_of(tp, int)) else float
        if not text.strip() and _is_optional(tp):
            return None
        try:
            number = number_type(text)
        except ValueError:
            raise ConfigError(key, f"must be a number, not {text!r}") from None
        if not math.isfinite(number):  # float("inf"), float("nan"), float("1e400")
            raise ConfigError(key, "must be a finite number")
        return number
    if _is_optional(tp) and not text.strip():
        return None
    return _coerce(key, tp, text)


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _is_optional_of(tp: Any, inner: type) -> bool:
    return _is_optional(tp) and inner in get_args(tp)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check a TOML value against the annotation ``tp``; convert where TOML has no such type."""
    origin = get_origin(tp)
    if _is_optional(tp):
        if value is None:
            return None
        inner = next(a for a in get_args(tp) if a is not type(None))
        return _coerce(key, inner, value)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}, not {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, "must be a number")
        if not math.isfinite(value):  # TOML and the environment both spell inf and nan
            raise ConfigError(key, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "must be a path")
        return Path(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of strings")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(key, "must be a table of strings")
        return dict(value)
    raise ConfigError(key, f"unsupported setting type {tp!r}")  # pragma: no cover


_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
_TEMPLATE_FIELDS = frozenset({"event", "business", "branch"})


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(s: Settings) -> None:
    """Range and shape checks across the tree; raises ConfigError naming the first bad key."""
    _check(0 <= s.http.port <= 65535, "http.port", "must be between 0 and 65535")
    _check(bool(s.http.host), "http.host", "must not be empty")
    _check(
        1024 <= s.http.max_body_bytes <= 64 * 1024 * 1024,
        "http.max_body_bytes",
        "must be between 1024 and 67108864",
    )
    for key, path in (
        ("http.events_path", s.http.events_path),
        ("http.errors_path", s.http.errors_path),
    ):
        _check(path.startswith("/") and " " not in path, key, "must be a path starting with /")
    _check(
        s.http.events_path != s.http.errors_path, "http.errors_path", "must differ from events_path"
    )
    _check(0 < s.http.shutdown_timeout <= 600, "http.shutdown_timeout", "must be in (0, 600]")
    _check(0 < s.http.read_timeout <= 600, "http.read_timeout", "must be in (0, 600]")
    _check(0 < s.http.keepalive_timeout <= 3600, "http.keepalive_timeout", "must be in (0, 3600]")
    _check(
        16 <= s.http.max_connections <= 1_000_000,
        "http.max_connections",
        "must be between 16 and 1000000",
    )
    _check(
        s.http.max_body_bytes <= s.http.max_inflight_bytes <= 1 << 40,
        "http.max_inflight_bytes",
        "must be at least http.max_body_bytes (room for the largest body)",
    )
    _check(1 <= s.http.workers <= 64, "http.workers", "must be between 1 and 64")
    _check(
        s.http.workers == 1 or s.dedup.backend != "memory",
        "http.workers",
        'more than one worker needs a shared dedup store: set dedup.backend = "redis"',
    )
    _check(
        s.http.worker_port_base == 0 or 1 <= s.http.worker_port_base <= 65536 - s.http.workers,
        "http.worker_port_base",
        "must be 0 (http.port + 1) or a port leaving room for one port per worker",
    )
    _check(
        s.http.workers == 1
        or s.http.worker_port_base != 0
        or s.http.port + s.http.workers <= 65535,
        "http.port",
        "must leave room above it for one port per worker (or set http.worker_port_base)",
    )
    _validate_http_security(s.http)

    for spec in s.auth.tokens:
        _check(bool(spec.token.value.strip()), "auth.tokens", "a token must not be empty")
        _check(
            not any(c.isspace() or c == "," for c in spec.token.value),
            "auth.tokens",
            "a token must not contain spaces or commas",
        )
        _check(
            spec.business is None or bool(_BUSINESS_RE.fullmatch(spec.business)),
            "auth.tokens",
            "a business must be 1-64 characters of letters, digits, '_', '.', '-'",
        )

    _validate_amqp_urls(s.amqp)
    for key, name in (
        ("amqp.exchange", s.amqp.exchange),
        ("amqp.unrouted_exchange", s.amqp.unrouted_exchange),
        ("amqp.rejected_exchange", s.amqp.rejected_exchange),
        *((f"amqp.exchanges.{k}", v) for k, v in s.amqp.exchanges.items()),
    ):
        _check(bool(_NAME_RE.fullmatch(name)), key, "must be 1-255 of letters, digits, '_.:-'")
        _check(not name.startswith("amq."), key, "must not start with 'amq.' (reserved)")
    _check(
        s.amqp.unrouted_exchange not in {s.amqp.exchange, *s.amqp.exchanges.values()},
        "amqp.unrouted_exchange",
        "must differ from the event exchanges",
    )
    _check(
        s.amqp.rejected_exchange
        not in {s.amqp.exchange, *s.amqp.exchanges.values(), s.amqp.unrouted_exchange},
        "amqp.rejected_exchange",
        "must differ from the event exchanges and amqp.unrouted_exchange",
    )
    fields = set(re.findall(r"\{([^{}]*)\}", s.amqp.routing_key_template))
    _check(
        fields <= _TEMPLATE_FIELDS and "event" in fields,
        "amqp.routing_key_template",
        "must contain {event} and may add {business} and {branch}, separated by dots",
    )
    _check(
        all(
            (seg.startswith("{") and seg.endswith("}")) or re.fullmatch(r"[a-z0-9_-]+", seg)
            for seg in s.amqp.routing_key_template.split(".")
        ),
        "amqp.routing_key_template",
        "segments must be {event}, {business}, {branch} or fixed words of [a-z0-9_-]",
    )
    _check(0 < s.amqp.publish_timeout < 10, "amqp.publish_timeout", "must be in (0, 10) seconds")
    _check(0 < s.amqp.connect_timeout <= 60, "amqp.connect_timeout", "must be in (0, 60] seconds")
    _check(0 <= s.amqp.heartbeat <= 600, "amqp.heartbeat", "must be in [0, 600] seconds")

    _check(s.dedup.ttl > 0, "dedup.ttl", "must be positive")
    _check(s.dedup.hash_ttl > 0, "dedup.hash_ttl", "must be positive")
    _check(s.dedup.max_entries >= 1, "dedup.max_entries", "must be at least 1")
    try:
        parse_redis_url(s.dedup.redis_url.value)
    except RedisUrlError as exc:
        raise ConfigError("dedup.redis_url", str(exc)) from None
    _check(bool(s.dedup.key_fields), "dedup.key_fields", "must name at least one field")
    _check(
        0 < len(s.dedup.redis_prefix) <= 100 and not any(c.isspace() for c in s.dedup.redis_prefix),
        "dedup.redis_prefix",
        "must be 1-100 characters without spaces",
    )
    _check(0 < s.dedup.redis_timeout <= 5, "dedup.redis_timeout", "must be in (0, 5] seconds")
    _check(
        bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", s.spool.file)) and s.spool.file[0] != ".",
        "spool.file",
        "must be a file name (letters, digits, '_.-'), not a path",
    )
    _check(
        s.spool.max_bytes >= s.http.max_body_bytes + 65536,
        "spool.max_bytes",
        "must be at least http.max_body_bytes + 65536 (room for the largest event)",
    )
    _check(s.spool.max_events >= 1, "spool.max_events", "must be at least 1")
    _validate_flows(s)
    _validate_consumers(s)
    _validate_archive(s)


_MAX_AGE_RE = re.compile(r"[1-9][0-9]{0,8}[YMDhms]")


def _validate_archive(s: Settings) -> None:
    a = s.archive
    _check(
        bool(_NAME_RE.fullmatch(a.queue)) and not a.queue.startswith("amq."),
        "archive.queue",
        "must be 1-255 of letters, digits, '_.:-', not starting with 'amq.'",
    )
    _check(
        a.queue not in {s.amqp.exchange, *s.amqp.exchanges.values(), s.amqp.unrouted_exchange},
        "archive.queue",
        "must differ from the event exchanges and amqp.unrouted_exchange",
    )
    _check(
        a.queue not in {q.name for q in s.consumers.queues},
        "archive.queue",
        "must differ from the consumer queues",
    )
    _check(
        bool(_MAX_AGE_RE.fullmatch(a.max_age)),
        "archive.max_age",
        f"must be a number and one unit of Y, M, D, h, m, s (such as 7D), not {a.max_age!r}",
    )
    _check(a.max_bytes >= 1_000_000, "archive.max_bytes", "must be at least 1000000")


def _split_url(value: str, key: str, which: str = "") -> SplitResult:
    """``urlsplit(value)``; raises ConfigError (naming ``key``, never the URL, which may hold
    a password) for what ``urlsplit`` refuses, such as an unclosed IPv6 bracket."""
    try:
        return urlsplit(value)
    except ValueError:
        raise ConfigError(key, f"{which}is not a valid URL (check the host's brackets)") from None


def _validate_amqp_urls(amqp: AmqpSettings) -> None:
    """Each node of ``amqp.url``: amqp:// or amqps://, a host, a valid port; no node twice.
    The message names the node by position (``node 2``), never its credentials."""
    urls = amqp.urls()
    _check(bool(urls), "amqp.url", "must name at least one broker node")
    seen: set[tuple[str, int, str]] = set()
    for n, value in enumerate(urls, 1):
        which = "" if len(urls) == 1 else f"node {n} of the list: "
        url = _split_url(value, "amqp.url", which)
        _check(
            url.scheme in {"amqp", "amqps"},
            "amqp.url",
            f"{which}must start with amqp:// or amqps://",
        )
        _check(bool(url.hostname), "amqp.url", f"{which}must name a host")
        try:
            port = url.port or (5671 if url.scheme == "amqps" else 5672)
        except ValueError:
            raise ConfigError("amqp.url", f"{which}has an invalid port") from None
        node = (url.hostname or "", port, url.path)
        _check(node not in seen, "amqp.url", f"{which}names the same node as an earlier one")
        seen.add(node)


_PATTERN_RE = re.compile(r"(?:[a-z0-9_-]+|\*|#)(?:\.(?:[a-z0-9_-]+|\*|#))*")


def is_binding_pattern(pattern: str) -> bool:
    """True when ``pattern`` is a topic binding pattern that can match the relay's routing
    keys: dotted words of ``[a-z0-9_-]``, ``*`` (one word) or ``#`` (any number of words)."""
    return len(pattern) <= 255 and bool(_PATTERN_RE.fullmatch(pattern))


def dead_letter_exchange(s: Settings) -> str:
    """The dead-letter exchange of the consumer queues: ``consumers.dead_letter_exchange``, else
    ``<amqp.exchange>.dlx``."""
    return s.consumers.dead_letter_exchange or f"{s.amqp.exchange}.dlx"


def _validate_consumers(s: Settings) -> None:
    key = "consumers.queues"
    relay_exchanges = {
        s.amqp.exchange,
        *s.amqp.exchanges.values(),
        s.amqp.unrouted_exchange,
        s.amqp.rejected_exchange,
    }
    dlx = dead_letter_exchange(s)
    _check(
        bool(_NAME_RE.fullmatch(dlx)) and not dlx.startswith("amq."),
        "consumers.dead_letter_exchange",
        "must be 1-255 of letters, digits, '_.:-', not starting with 'amq.'",
    )
    _check(
        dlx not in relay_exchanges,
        "consumers.dead_letter_exchange",
        "must differ from the relay's exchanges",
    )
    names: set[str] = set()
    for queue in s.consumers.queues:
        for name in (queue.name, f"{queue.name}.dead"):
            _check(
                len(name) <= 255 and bool(_NAME_RE.fullmatch(name)),
                key,
                f"queue name {name!r} must be 1-255 of letters, digits, '_.:-'",
            )
            _check(not name.startswith("amq."), key, f"queue name {name!r} is reserved (amq.)")
            _check(name not in names, key, f"queue {name!r} is listed twice")
            _check(
                name != s.amqp.unrouted_exchange,
                key,
                f"queue {name!r} is the relay's unrouted queue",
            )
            _check(
                name != s.amqp.rejected_exchange,
                key,
                f"queue {name!r} is the relay's quarantine queue",
            )
            names.add(name)
        _check(bool(queue.bindings), key, f"queue {queue.name!r} needs at least one binding")
        for pattern in queue.bindings:
            _check(
                is_binding_pattern(pattern),
                key,
                f"binding {pattern!r} of {queue.name!r} must be dotted words of [a-z0-9_-], "
                "'*' or '#'",
            )
        _check(
            queue.exchange is None or queue.exchange in relay_exchanges,
            key,
            f"exchange {queue.exchange!r} of {queue.name!r} is not one of the relay's exchanges",
        )


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_host(host: str) -> bool:
    """Whether ``http.host`` names only loopback: 127.0.0.0/8, ::1 or ``localhost``. Any other
    name or address (``0.0.0.0``, ``::``, a public IP, a hostname) counts as reachable."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _networks(key: str, values: tuple[str, ...]) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not an IP address or CIDR") from None


def _readable(key: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _validate_http_security(h: HttpSettings) -> None:
    _check(
        (h.tls_cert is None) == (h.tls_key is None),
        "http.tls_key" if h.tls_key is None else "http.tls_cert",
        "http.tls_cert and http.tls_key go together: set both or neither",
    )
    if h.tls_cert is not None and h.tls_key is not None:
        _readable("http.tls_cert", h.tls_cert)
        _readable("http.tls_key", h.tls_key)
    _networks("http.trusted_proxies", h.trusted_proxies)
    _networks("http.allow_sources", h.allow_sources)
    _check(0 <= h.rate_limit <= 1_000_000, "http.rate_limit", "must be in [0, 1000000]")
    _check(1 <= h.rate_burst <= 1_000_000, "http.rate_burst", "must be in [1, 1000000]")
    _check(
        h.tls_cert is not None or bool(h.trusted_proxies) or is_loopback_host(h.host),
        "http.host",
        f"{h.host} is not a loopback address and the relay would serve plain HTTP, which would "
        "carry RETM's Bearer tokens in clear text: set http.tls_cert and http.tls_key, or set "
        "http.trusted_proxies to the reverse proxy that terminates TLS, or listen on 127.0.0.1",
    )


def _mask_url(value: str) -> str:
    """A URL with its password masked (``amqp://guest:********@host/``), each URL of a
    comma-separated list alike; other secrets fully."""
    parts_of_list = split_urls(value)
    if len(parts_of_list) > 1 and all("://" in part for part in parts_of_list):
        return ",".join(_mask_url(part) for part in parts_of_list)
    parts = urlsplit(value)
    if not parts.scheme or "://" not in value:
        return "********"
    if parts.password is None:
        return value
    netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
    return parts._replace(netloc=netloc).geturl()


def _validate_flows(s: Settings) -> None:
    """The install and loyalty sections: paths distinct from the webhook paths, sane times."""
    _check(
        not s.install.enabled
        or any(re.fullmatch(r"[A-Za-z0-9_-]{16,}", seg) for seg in s.install.path.split("/")),
        "install.path",
        "with install.enabled the path must be unguessable: it needs a random segment of at "
        "least 16 letters, digits, '-' or '_', such as /retm/install/<python3 -c 'import "
        "secrets; print(secrets.token_urlsafe(24))'> (whoever reaches the route can mint tokens)",
    )
    taken = {s.http.events_path: "http.events_path", s.http.errors_path: "http.errors_path"}
    for key, path, enabled in (
        ("install.path", s.install.path, s.install.enabled),
        ("loyalty.check_reward_path", s.loyalty.check_reward_path, s.loyalty.enabled),
        ("loyalty.redeem_reward_path", s.loyalty.redeem_reward_path, s.loyalty.enabled),
    ):
        _check(path.startswith("/") and " " not in path, key, "must be a path starting with /")
        if enabled:
            _check(path not in taken, key, f"must differ from {taken.get(path)}")
            taken[path] = key
    for name, value in s.install.require_data.items():
        _check(bool(name) and bool(value), "install.require_data", "keys and values must be set")
    url = _split_url(s.install.settings_url, "install.settings_url")
    _check(
        not s.install.settings_url or (url.scheme in {"http", "https"} and bool(url.hostname)),
        "install.settings_url",
        "must be an http:// or https:// URL, or empty",
    )
    _check(0 <= s.install.token_grace <= 90 * 86_400, "install.token_grace", "must be 0-90 days")
    _check(
        bool(re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", s.install.redis_key)),
        "install.redis_key",
        "must be 1-100 of letters, digits, '_.:-'",
    )
    _check(0 < s.loyalty.timeout <= 9, "loyalty.timeout", "must be in (0, 9] seconds")
    _check(
        200 <= s.loyalty.fallback_status <= 599,
        "loyalty.fallback_status",
        "must be an HTTP status (200-599)",
    )
    try:
        orjson.loads(s.loyalty.fallback_body)
    except orjson.JSONDecodeError:
        raise ConfigError("loyalty.fallback_body", "must be valid JSON") from None
    _check(s.loyalty.cache_max_entries >= 1, "loyalty.cache_max_entries", "must be at least 1")
    _check(
        bool(re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", s.loyalty.redis_key)),
        "loyalty.redis_key",
        "must be 1-100 of letters, digits, '_.:-'",
    )


def describe(s: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked, for ``check-config`` and logs."""

    def plain(value: Any) -> Any:
        if isinstance(value, Secret):
            return _mask_url(value.value)
        if isinstance(value, TokenSpec):
            return {"token": "********", "business": value.business}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    result: dict[str, Any] = plain(s)
    # The install path and its required data are capabilities: show their shape, not value.
    result["install"]["path"] = s.install.path.rsplit("/", 1)[0] + "/********"
    result["install"]["require_data"] = dict.fromkeys(s.install.require_data, "********")
    return result
