"""Errors a user can act on: which exceptions are expected, and how to say them in one line."""

from __future__ import annotations

import psycopg

from core.config import SettingsError
from core.db import DatabaseError
from core.llm import GenerationError
from core.model_files import ModelFileError

# Expected failures: shown to users as one line (UI, CLI), never as a traceback. Template, dataset, evaluation
# and conversation errors subclass ValueError or LookupError.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, LookupError, PermissionError, psycopg.Error, DatabaseError, GenerationError, ModelFileError,
    SettingsError)


def is_expected(exc: BaseException) -> bool:
    """True for an error a user caused or can fix (bad input, unreachable database, missing model, …)."""
    return isinstance(exc, EXPECTED_ERRORS)


def user_message(exc: BaseException) -> str:
    """One line for an exception, without internals; database errors keep only PostgreSQL's primary message."""
    if isinstance(exc, psycopg.Error):
        diag = getattr(exc, "diag", None)
        primary = diag.message_primary if diag is not None and diag.message_primary else str(exc)
        lines = primary.strip().splitlines()
        return f"Database error: {lines[0] if lines else type(exc).__name__}"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
