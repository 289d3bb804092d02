"""The `promptdev` command line. `main` runs one command; each command group is a module of this package that adds
its commands with `register(subparsers)`, listed in COMMAND_GROUPS; `_common` holds what they share.

Exit codes: 0 done; 1 an expected error (core.errors.is_expected: bad input, an unknown template, an unreachable
database, …), printed as one line `promptdev: <message>` on stderr; 2 a usage or configuration error, one line too;
130 interrupted; 141 the reader of the output went away (`promptdev … | head`), quietly, like `yes | head`. Anything
else is a bug: its traceback on stderr and exit code 1. A command may have codes of its own (`executions rerun
--check` exits 3 when the output differs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable, Sequence

from core.cli import analytics, conversations, evaluations, executions, serve, setup, templates, users, worker
from core.cli._common import Parser
from core.config import Settings, SettingsError, load_settings
from core.errors import is_expected, user_message

# The command groups, in the order `promptdev --help` lists their commands.
COMMAND_GROUPS = (setup, serve, worker, users, templates, executions, conversations, evaluations, analytics)

EXIT_CLOSED_OUTPUT = 128 + 13  # what a shell reports for a command that SIGPIPE ended


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command."""
    parser = Parser(prog="promptdev", description="PromptDev prompt engineering workbench")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `promptdev` console script and of `python -m core.cli` (argv None: this process is the
    command); returns the exit code. Usage errors and --help exit from argparse (SystemExit)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            args = build_parser().parse_args(argv)
            args.own_process = argv is None
            return _run(args)
        finally:
            sys.stdout.flush()  # a reader that went away shows here, not as a traceback at interpreter exit
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_CLOSED_OUTPUT


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command: its exit code, expected errors as one line."""
    func: Callable[[argparse.Namespace, Settings], int | None] = args.func
    try:
        return int(func(args, load_settings()) or 0)
    except SettingsError as exc:
        print(f"promptdev: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptdev: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader of the output went away: main ends quietly
    except Exception as exc:
        if is_expected(exc):
            print(f"promptdev: {user_message(exc)}", file=sys.stderr)
        else:  # a bug: everything there is to find it
            traceback.print_exc()
        return 1


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered for the reader that went away is dropped at exit
    instead of failing again (what the Python documentation recommends for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a caller captures it): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
