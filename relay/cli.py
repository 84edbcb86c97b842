"""The command line: ``retm-relay <command>`` (also ``python -m relay <command>``).

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from relay import __version__
from relay.errors import ConfigError
from relay.settings import Settings, describe, load_settings, resolve_config_path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _run(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, imported only when running
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cmd_serve(settings: Settings, _: argparse.Namespace) -> int:
    """Run the relay until SIGTERM or SIGINT."""
    from relay.logs import configure_logging  # noqa: PLC0415 - keep check-config light
    from relay.service import StartupError, serve  # noqa: PLC0415

    configure_logging(settings.log.level, settings.log.format)
    try:
        code: int = _run(serve(settings))
    except StartupError as exc:
        import structlog  # noqa: PLC0415

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


def cmd_tokens(settings: Settings, args: argparse.Namespace) -> int:
    """Manage the per-merchant token registry (``install.store``) while the daemon runs."""
    from relay.tokens_cli import run_tokens  # noqa: PLC0415 - keep other commands light

    code: int = _run(run_tokens(settings, args))
    return code


Command = Callable[[Settings, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
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
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

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
    tokens = add(
        "tokens",
        cmd_tokens,
        "list, add, rotate or revoke per-merchant webhook tokens (works while the relay runs)",
        "retm-relay tokens rotate nakheelember --grace 3600",
    )
    from relay.tokens_cli import add_arguments  # noqa: PLC0415

    add_arguments(tokens)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``retm-relay`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(resolve_config_path(args.config, os.environ), os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"retm-relay: configuration error: {exc}\n")
        return EXIT_USAGE
    result: int = args.func(settings, args)
    return result
