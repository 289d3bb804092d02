"""The `promptdev` command line: setup, status, worker, and the subcommands each domain module registers."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from core import import_optional
from core.config import Settings, SettingsError, load_settings

# Domain modules that add subcommands with a `register(subparsers)` function; missing ones are skipped.
COMMAND_MODULES = (
    "core.cli_templates",
    "core.cli_executions",
    "core.cli_conversations",
    "core.cli_evaluations",
    "core.cli_analytics",
)


class CLIError(Exception):
    """An error to print as one line and exit non-zero."""


def fail(message: str) -> None:
    """Raise a CLIError: one clear line, exit code 1."""
    raise CLIError(message)


def progress(iterable, total: int | None = None, label: str = "", stream=None):
    """Yield from iterable while drawing a one-line progress bar on stderr (when it is a terminal or forced)."""
    stream = stream or sys.stderr
    count = 0
    for item in iterable:
        yield item
        count += 1
        if total:
            width = 30
            filled = int(width * count / total)
            stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {count}/{total}")
        else:
            stream.write(f"\r{label} {count}")
        stream.flush()
    stream.write("\n")
    stream.flush()


def _setup(args: argparse.Namespace, settings: Settings) -> None:
    from core import db, runtime, status
    from core.model_files import ensure_default_model

    from core.model_files import check_gguf

    if settings.backend == "openai":
        print(f"model: {settings.openai_model} at {settings.openai_base_url}")
    elif settings.model_path is None:
        path = ensure_default_model(settings.models_dir)
        print(f"model: {path}")
    else:
        check_gguf(settings.model_path)
        print(f"model: {settings.model_path}")
    info = status.database_status(runtime.database(settings), settings)  # starts and migrates
    print(f"database: {info['kind'].lower()} PostgreSQL {info['version']}, {info['migrations']} migrations applied")
    if args.verbose:
        print(f"url: {db._redact(db.database_url(settings))}")


def _status(args: argparse.Namespace, settings: Settings) -> None:
    from core import runtime, status

    info = status.database_status(runtime.database(settings), settings)
    print(f"database: {info['kind'].lower()} PostgreSQL {info['version']} ({info['size_bytes'] / 1e6:.1f} MB)")
    print(f"data dir: {settings.data_dir}")


def _worker(args: argparse.Namespace, settings: Settings) -> None:
    from core import metrics, worker

    metrics.start_metrics_server(settings)
    worker.run_forever(settings, concurrency=args.concurrency, quiet=args.quiet)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and a hint), not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = _Parser(prog="promptdev", description="PromptDev prompt engineering workbench")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("setup", help="assemble the default model, start the database and apply migrations")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_setup)
    p = sub.add_parser("status", help="show the database and data directory in use")
    p.set_defaults(func=_status)
    p = sub.add_parser("worker", help="run a worker for submitted executions and evaluation runs")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_worker)
    for module in import_optional(COMMAND_MODULES):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `promptdev` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        func: Callable[[argparse.Namespace, Settings], int | None] = args.func
        return int(func(args, settings) or 0)
    except SettingsError as exc:
        print(f"promptdev: configuration error: {exc}", file=sys.stderr)
        return 2
    except CLIError as exc:
        print(f"promptdev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("promptdev: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a user never sees a traceback; the type and message say enough
        from core.errors import is_expected, user_message

        if not is_expected(exc):
            raise
        print(f"promptdev: {user_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the imported module's main, so command modules and this one share one CLIError class.
    from core.cli import main as _main

    sys.exit(_main())
