"""The error contract: what can go wrong in `core`, what it is called, and which HTTP status says it.

Every failure a user caused or can act on is a `PromptDevError` of one of a handful of kinds. Each kind carries
the HTTP status an API answers with and a short title; the exception's first line is the message a person sees.

    kind              status  when
    NotFound          404     the named thing does not exist (template, dataset, run, conversation, model, …)
    InvalidInput      422     the input cannot be accepted as given (bad name, bad template, bad file, …)
    Conflict          409     the input is fine but clashes with the current state (exists already, busy, halted)
    Forbidden         403     the caller may not do this
    Unavailable       503     a service the request needs is down: the database, the model, a model server
    TooLarge          413     the input exceeds a size limit
    RateLimited       429     too many requests; `retry_after` says when to come back

Domain modules subclass these (`templates.TemplateNotFound` is a `NotFound`, `datasets.DatasetError` an
`InvalidInput`, …). The kinds also subclass the builtin exception a Python caller would expect (`NotFound` is a
`LookupError`, `InvalidInput` a `ValueError`, `Forbidden` a `PermissionError`), so `except ValueError` keeps
working in callers written before the contract. Anything that is not a `PromptDevError` — a `KeyError`, a SQL
typo — is a bug: the UI shows it as an unexpected error and logs its traceback, the CLI prints the traceback and
exits 1, the HTTP API answers 500 without internals. The one foreign exception treated as expected is
`psycopg.OperationalError` (the database is down or unreachable): it is `Unavailable`.

This module imports nothing else of `core`, so every module may import it.
"""

from __future__ import annotations

import psycopg


class PromptDevError(Exception):
    """A failure a user caused or can act on; `status` is its HTTP status, the first line of str() its message."""

    status: int = 500
    title: str = "Error"


class NotFound(PromptDevError, LookupError):
    """The named thing does not exist."""

    status, title = 404, "Not found"


class InvalidInput(PromptDevError, ValueError):
    """The input cannot be accepted as given."""

    status, title = 422, "Invalid input"


class Conflict(PromptDevError, ValueError):
    """The input clashes with the current state (exists already, busy, in the wrong state)."""

    status, title = 409, "Conflict"


class Forbidden(PromptDevError, PermissionError):
    """The caller may not do this."""

    status, title = 403, "Forbidden"


class Unavailable(PromptDevError, RuntimeError):
    """A service the request needs is down or unreachable: the database, the model, a model server."""

    status, title = 503, "Service unavailable"


class LimitExceeded(PromptDevError, ValueError):
    """A limit was exceeded (size or rate); see TooLarge and RateLimited."""

    status, title = 413, "Limit exceeded"


class TooLarge(LimitExceeded):
    """The input exceeds a size limit."""

    status, title = 413, "Too large"


class RateLimited(LimitExceeded):
    """Too many requests; come back after `retry_after` seconds."""

    status, title = 429, "Too many requests"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


# The kinds, most specific first: what `kind_of` answers and what the API's table of statuses lists.
KINDS: tuple[type[PromptDevError], ...] = (
    NotFound, InvalidInput, Conflict, Forbidden, Unavailable, TooLarge, RateLimited, LimitExceeded)


def kind_of(exc: BaseException | type[BaseException]) -> type[PromptDevError] | None:
    """The kind of an error (or error class): the first of KINDS in its method resolution order; None for a foreign
    exception. A domain class that names two kinds (`ConversationNotFound` is a `ConversationError`, an
    `InvalidInput`, and a `NotFound`) is of the one it lists first, whose `status` it carries."""
    cls = exc if isinstance(exc, type) else type(exc)
    return next((k for k in cls.__mro__ if k in KINDS), None)


def is_expected(exc: BaseException) -> bool:
    """True for an error a user caused or can fix (bad input, unreachable database, missing model, …)."""
    return isinstance(exc, (PromptDevError, psycopg.OperationalError))


def status_of(exc: BaseException) -> int:
    """The HTTP status for an exception: its kind's, 503 for an unreachable database, 500 for anything else."""
    if isinstance(exc, PromptDevError):
        return exc.status
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable.status
    return 500


def user_message(exc: BaseException) -> str:
    """One line for an expected exception, without internals (a database that is down says so)."""
    if isinstance(exc, psycopg.Error):
        diag = getattr(exc, "diag", None)
        primary = diag.message_primary if diag is not None and diag.message_primary else str(exc)
        lines = primary.strip().splitlines()
        prefix = "Database unavailable" if isinstance(exc, psycopg.OperationalError) else "Database error"
        return f"{prefix}: {lines[0] if lines else type(exc).__name__}"
    if not is_expected(exc):
        return f"Unexpected error ({type(exc).__name__}); the details are in the server log."
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.title


# What the UI and the CLI show as one line (anything else is unexpected: traceback logged).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (PromptDevError, psycopg.OperationalError)
