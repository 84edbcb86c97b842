"""The command line: ``retm-relay <command>`` (also ``python -m relay <command>``).

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson

from relay import __version__
from relay.cli.args import Command, add_command, positive_float, positive_int, run_loop
from relay.cli.spool import add_spool_commands
from relay.errors import ConfigError
from relay.settings import Settings, describe, load_settings, resolve_config_path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the relay until SIGTERM or SIGINT; with ``http.workers`` > 1, run that many worker
    processes under a supervisor (relay/workers.py)."""
    import structlog  # noqa: PLC0415 - keep check-config light

    from relay.logs import configure_logging  # noqa: PLC0415
    from relay.service import StartupError, serve  # noqa: PLC0415
    from relay.workers import Supervisor, WorkerError, WorkerInfo, worker_command  # noqa: PLC0415

    configure_logging(settings.log.level, settings.log.format)
    try:
        worker = WorkerInfo.from_environ(os.environ)
        if worker is None and settings.http.workers > 1:
            supervisor = Supervisor(settings, worker_command(args.config), os.environ)
            supervised: int = asyncio.run(supervisor.run())  # no hot path here: plain asyncio
            return supervised
        if worker is not None:
            structlog.contextvars.bind_contextvars(worker=worker.index)
        code: int = run_loop(serve(settings, worker=worker))
    except (StartupError, WorkerError) as exc:
        structlog.get_logger("relay.service").error("relay.start_failed", error=str(exc))
        return EXIT_FAILURE
    return code


def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    """Validate the configuration; print it (secrets masked) with ``--show``."""
    if args.show:
        sys.stdout.write(orjson.dumps(describe(settings), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    sys.stdout.write(f"configuration ok ({settings.source})\n")
    return EXIT_OK


def _fail(command: str, message: str, code: int = EXIT_FAILURE) -> int:
    sys.stderr.write(f"retm-relay {command}: {message}\n")
    return code


def _quiet_library_logs() -> None:
    """The operator commands report failures themselves: keep aio-pika's and aiormq's log
    records (Python's last-resort handler) off the terminal."""
    import logging  # noqa: PLC0415

    logging.getLogger().addHandler(logging.NullHandler())


def _quiet_broken_pipe() -> int:
    """stdout was closed by its reader (``| head``): stop quietly, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    """POST each FILE (``-``: stdin) to the relay with the configured token; print answers."""
    from tqdm import tqdm  # noqa: PLC0415 - keep the other commands light

    from relay.cli import send  # noqa: PLC0415

    if args.path is not None and not args.path.startswith("/"):
        return _fail("send", f"--path must start with /, not {args.path!r}", EXIT_USAGE)
    path = args.path or (settings.http.errors_path if args.errors else settings.http.events_path)
    try:
        url = args.url or send.default_url(settings, path)
        context = None if args.url else send.own_relay_context(settings)
    except ConfigError as exc:
        return _fail("send", f"configuration error: {exc}", EXIT_USAGE)
    token = args.token or send.first_token(settings)
    if not token:
        return _fail(
            "send",
            "no token: set auth.tokens (RELAY_AUTH_TOKENS or RELAY_AUTH_TOKENS_FILE) "
            "or pass --token",
            EXIT_USAGE,
        )
    bodies: list[tuple[str, bytes]] = []
    for name in args.files:
        try:
            bodies.append((name, send.read_body(name, sys.stdin.buffer)))
        except OSError as exc:
            return _fail("send", f"cannot read {name}: {exc.strerror}", EXIT_USAGE)
    failed = 0
    many = len(bodies) > 1
    with tqdm(
        total=len(bodies), unit=" bodies", file=sys.stderr, disable=None if many else True
    ) as bar:
        for name, body in bodies:
            try:
                answer = send.post(url, body, token, args.timeout, context)
            except send.SendError as exc:
                return _fail("send", str(exc))
            line = f"{name}: {answer.text()}" if many else answer.text()
            if bar.disable:
                sys.stdout.write(line + "\n")
            else:
                tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
            failed += not answer.ok
            bar.update(1)
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_tail(settings: Settings, args: argparse.Namespace) -> int:
    """Print the events published to the exchange(s), live, until Ctrl-C."""
    from relay.cli.tail import run  # noqa: PLC0415
    from relay.settings import is_binding_pattern  # noqa: PLC0415

    _quiet_library_logs()
    if args.queue is not None:
        return _tail_queue(settings, args)
    if args.ack:
        return _fail("tail", "--ack needs --queue", EXIT_USAGE)
    if not is_binding_pattern(args.pattern):
        return _fail(
            "tail",
            f"{args.pattern!r} is not a binding pattern (dotted words of [a-z0-9_-], '*', '#')",
            EXIT_USAGE,
        )
    return _run_tail(
        run(
            settings,
            args.pattern,
            exchange=settings.amqp.rejected_exchange if args.rejected else args.exchange,
            as_json=args.json,
            count=args.count,
            out=sys.stdout,
            err=sys.stderr,
        ),
        lambda printed: f"{printed} event{'' if printed == 1 else 's'}",
    )


def _run_tail(main: Coroutine[Any, Any, int], summary: Callable[[int], str]) -> int:
    """Run a tail coroutine (it returns how many messages it printed); its summary line on
    stderr and exit 0, or one line and exit 1 on TailError, quietly on a closed pipe."""
    from relay.cli.tail import TailError  # noqa: PLC0415

    try:
        printed: int = run_loop(main)
    except TailError as exc:
        return _fail("tail", str(exc))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    sys.stderr.write(f"retm-relay tail: {summary(printed)}\n")
    return EXIT_OK


def _tail_queue(settings: Settings, args: argparse.Namespace) -> int:
    """``tail --queue NAME``: print what waits on the queue, then exit."""
    from relay.cli.tail import read_queue  # noqa: PLC0415

    if args.exchange is not None or args.pattern != "#":
        return _fail(
            "tail", "--queue reads one queue: give no pattern and no --exchange", EXIT_USAGE
        )
    kept = "removed" if args.ack else "left on the queue"
    return _run_tail(
        read_queue(
            settings,
            args.queue,
            ack=args.ack,
            as_json=args.json,
            count=args.count,
            out=sys.stdout,
            err=sys.stderr,
        ),
        lambda printed: f"{printed} message{'' if printed == 1 else 's'} ({kept})",
    )


def cmd_declare(settings: Settings, args: argparse.Namespace) -> int:
    """Declare the relay's topology and the consumer queues; print what exists."""
    import dataclasses  # noqa: PLC0415

    from relay.amqp.topology import declare_all, format_table  # noqa: PLC0415
    from relay.errors import TopologyError  # noqa: PLC0415

    _quiet_library_logs()
    if args.passive:
        settings = dataclasses.replace(
            settings, amqp=dataclasses.replace(settings.amqp, passive=True)
        )
    try:
        rows = run_loop(declare_all(settings))
    except TopologyError as exc:
        return _fail("declare", str(exc))
    sys.stdout.write(format_table(rows))
    return EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Republish a window of the archive (relay/cli/replay.py)."""
    from relay.cli.replay import run  # noqa: PLC0415 - keep the other commands light

    _quiet_library_logs()
    return run(settings, args, out=sys.stdout, err=sys.stderr)


def cmd_tokens(settings: Settings, args: argparse.Namespace) -> int:
    """Manage the per-merchant token registry (``install.store``) while the daemon runs."""
    from relay.cli.tokens import run_tokens  # noqa: PLC0415 - keep other commands light

    code: int = run_loop(run_tokens(settings, args))
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        # No default at any level: a subcommand's parser would otherwise overwrite a
        # --config given before it (retm-relay --config PATH COMMAND) with its own None.
        default=argparse.SUPPRESS,
        help="TOML configuration (default: $RELAY_CONFIG, else /etc/retm-relay/relay.toml, "
        "else built-in defaults)",
    )
    parser = argparse.ArgumentParser(
        prog="retm-relay",
        description="Relay RETM webhooks to RabbitMQ topic exchanges.",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"retm-relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, help_text: str, example: str) -> argparse.ArgumentParser:
        return add_command(sub, name, func, help_text, example, [common])

    add(
        "serve",
        cmd_serve,
        "run the relay (until SIGTERM or SIGINT)",
        "retm-relay serve --config /etc/retm-relay/relay.toml",
    )
    check = add(
        "check-config",
        cmd_check_config,
        "validate the configuration and exit 0, or 2 with the bad key",
        "RELAY_AMQP_PUBLISH_TIMEOUT=3 retm-relay check-config --show",
    )
    check.add_argument("--show", action="store_true", help="print the settings, secrets masked")

    send_p = add(
        "send",
        cmd_send,
        "post bodies to a running relay with the configured token and print each answer "
        "(exit 0 when every answer is 2xx, 1 otherwise)",
        "retm-relay send tests/fixtures/order.created.json\n"
        "  retm-relay send --errors tests/fixtures/error.webhook.json\n"
        '  echo \'{"event":"order.created","reference":"r1"}\' | retm-relay send -',
    )
    send_p.add_argument("files", nargs="+", metavar="FILE", help="JSON body to post; - for stdin")
    target = send_p.add_mutually_exclusive_group()
    target.add_argument(
        "--url",
        help="full URL to post to (default: http://<http.host>:<http.port><http.events_path>)",
    )
    target.add_argument("--path", help="post to this path of the relay instead of events_path")
    target.add_argument(
        "--errors", action="store_true", help="post to http.errors_path (RETM's error webhook)"
    )
    send_p.add_argument(
        "--token",
        help="Bearer token (default: the first of auth.tokens; prefer RELAY_AUTH_TOKENS_FILE, "
        "as a command line is visible to other users)",
    )
    send_p.add_argument(
        "--timeout", type=positive_float, default=15.0, help="seconds to wait for each answer (15)"
    )

    tail_p = add(
        "tail",
        cmd_tail,
        "print the events the relay publishes, live, one line each (routing key, business, "
        "reference, summary), through a temporary exclusive queue; or, with --queue, what "
        "already waits on a queue",
        "retm-relay tail 'order.#'\n  retm-relay tail --json 'customer.*' | jq .body\n"
        "  retm-relay tail --queue retm.unrouted --count 20",
    )
    tail_p.add_argument(
        "pattern", nargs="?", default="#", help="binding pattern (default #: every event)"
    )
    tail_p.add_argument("--json", action="store_true", help="print each whole message as JSON")
    where = tail_p.add_mutually_exclusive_group()
    where.add_argument(
        "--exchange",
        help="bind to this exchange (default: the event exchange(s) the pattern needs; "
        "amqp.unrouted_exchange shows unrouted events)",
    )
    where.add_argument(
        "--rejected",
        action="store_true",
        help="watch the quarantine (amqp.rejected_exchange): authenticated bodies refused as "
        "not JSON objects, each with the reason it was refused",
    )
    tail_p.add_argument(
        "--count",
        type=positive_int,
        metavar="N",
        help="exit after N events (default: run until Ctrl-C)",
    )
    tail_p.add_argument(
        "--queue",
        metavar="NAME",
        help="instead of live events, print the messages already waiting on queue NAME (e.g. "
        "retm.unrouted, retm.rejected, a consumer's <queue>.dead) and exit when it holds no "
        "more; non-destructive: they are all given back to the queue at the end "
        "(requeued, flagged redelivered; a quorum queue counts it as a delivery)",
    )
    tail_p.add_argument(
        "--ack",
        action="store_true",
        help="with --queue: acknowledge each printed message, which removes it from the queue",
    )

    declare_p = add(
        "declare",
        cmd_declare,
        "declare the relay's exchanges and the consumer queues of consumers.queues (quorum "
        "queues with a dead-letter exchange), idempotently, and print what exists",
        "RELAY_CONSUMERS_QUEUES='erp.orders=order.#,crm.customers=customer.*' retm-relay declare",
    )
    declare_p.add_argument(
        "--passive",
        action="store_true",
        help="only check that everything exists (as amqp.passive does), declare nothing",
    )
    add_spool_commands(add, common)
    replay_p = add(
        "replay",
        cmd_replay,
        "republish the archived events (the stream archive.queue, every event answered 2xx) "
        "received in a time window to a queue or exchange, with publisher confirms and their "
        "original message_id; prints read, matched, published. Not `spool replay`, which "
        "forwards this host's spool to the broker",
        "retm-relay replay --since 2h --pattern 'order.#' --to-queue erp.orders.replay\n"
        "  retm-relay replay --since 2026-12-04T09:00:00Z --until 2026-12-04T09:30:00Z "
        "--business nakheel --to-exchange retm.events --dry-run",
    )
    from relay.cli.replay import add_arguments as add_replay_arguments  # noqa: PLC0415

    add_replay_arguments(replay_p)
    tokens = add(
        "tokens",
        cmd_tokens,
        "list, add, rotate or revoke per-merchant webhook tokens (works while the relay runs)",
        "retm-relay tokens rotate nakheelember --grace 3600",
    )
    from relay.cli.tokens import add_arguments  # noqa: PLC0415

    add_arguments(tokens, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``retm-relay`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):  # --config given nowhere (see build_parser)
        args.config = None
    try:
        settings = load_settings(resolve_config_path(args.config, os.environ), os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"retm-relay: configuration error: {exc}\n")
        return EXIT_USAGE
    try:
        result: int = args.func(settings, args)
    except BrokenPipeError:  # stdout's reader stopped early (| head): stop quietly
        return _quiet_broken_pipe()
    return result
