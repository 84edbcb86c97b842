"""Pieces every ``retm-relay`` command's argument parser shares: a subcommand with its
``--help`` example, and the positive-number argument types, and the event-loop runner."""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from relay.settings import Settings

#: what a command runs: (settings, parsed arguments) -> exit status
Command = Callable[[Settings, argparse.Namespace], int]


def add_command(
    sub: Any,
    name: str,
    func: Command,
    help_text: str,
    example: str,
    parents: Sequence[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``sub`` (from ``add_subparsers``): ``help_text`` in the
    command list and as its description, ``example`` under its ``--help``, and ``func`` as
    ``args.func``. Returns its parser, for its own arguments."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=list(parents),
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def run_loop(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, imported only when running
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
