"""What every command module shares: the parser (one way to report usage errors), the error a command stops with,
and the table the listing commands print."""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn, Sequence

from core.errors import InvalidInput


class CLIError(InvalidInput):
    """A command refuses its input: `promptdev: <message>` on stderr, exit code 1."""


def fail(message: str) -> NoReturn:
    """Stop the command with one clear line and exit code 1."""
    raise CLIError(message)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit code 2, like every promptdev error:
    `promptdev: templates get: unrecognized arguments: --bogus (see: promptdev templates get --help)`.

    Subcommand parsers are of this class too (argparse creates them with the parent's class), and each refuses the
    arguments it does not know itself, so the line names the command they were given to."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        self.exit(2, f"promptdev: {command + ': ' if command else ''}{message} (see: {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, rule: bool = False) -> str:
    """Columns padded to their widest cell (None shows empty); `rule` underlines the header with dashes."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def json_or_text(text: str) -> Any:
    """A command-line value: JSON when it parses as JSON (42, true, ["a"]), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
