"""The error contract: each kind and its HTTP status, what a user is shown, and every core exception on it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import psycopg
import pytest

import core
from core.errors import (
    EXPECTED_ERRORS,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PromptDevError,
    RateLimited,
    TooLarge,
    Unavailable,
    is_expected,
    kind_of,
    status_of,
    user_message,
)


@pytest.mark.parametrize("exc, status", [
    (NotFound("no template named 'x'"), 404),
    (InvalidInput("bad name"), 422),
    (Conflict("exists already"), 409),
    (Forbidden("not allowed"), 403),
    (Unavailable("the model server is down"), 503),
    (TooLarge("too large"), 413),
    (RateLimited("slow down", retry_after=2.5), 429),
    (psycopg.OperationalError("connection refused"), 503),
    (KeyError("id"), 500),
    (RuntimeError("boom"), 500),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_each_kind_maps_to_its_status(exc, status):
    assert status_of(exc) == status
    assert is_expected(exc) == (status != 500)
    assert isinstance(exc, EXPECTED_ERRORS) == (status != 500)


@pytest.mark.parametrize("kind, builtin", [
    (NotFound, LookupError), (InvalidInput, ValueError), (Conflict, ValueError), (Forbidden, PermissionError),
    (Unavailable, RuntimeError), (TooLarge, ValueError), (RateLimited, ValueError),
])
def test_kinds_are_the_builtin_a_caller_expects(kind, builtin):
    assert issubclass(kind, builtin) and issubclass(kind, PromptDevError)
    assert kind_of(kind("x")) is kind


def test_rate_limited_says_when_to_come_back():
    assert RateLimited("slow down", retry_after=2.5).retry_after == 2.5
    assert RateLimited("slow down").retry_after == 1.0


def test_expected_error_shows_its_first_line():
    assert user_message(InvalidInput("dataset name must be 1-100 letters\n  details for a log")) == \
        "dataset name must be 1-100 letters"
    assert user_message(NotFound("")) == "Not found"  # no message: the kind's title


def test_database_down_is_one_line_naming_the_database():
    exc = psycopg.OperationalError('connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
                                   "\tIs the server running on that host and accepting TCP/IP connections?")
    message = user_message(exc)
    assert message.startswith("Database unavailable: ") and "Connection refused" in message and "\n" not in message


@pytest.mark.parametrize("exc", [KeyError("SELECT password FROM secrets"), RuntimeError("secret=hunter2 at /srv/x"),
                                 ZeroDivisionError("division by zero in core/llm.py line 12")])
def test_unexpected_error_message_does_not_leak_internals(exc):
    message = user_message(exc)
    assert type(exc).__name__ in message and "server log" in message
    for internal in ("password", "secret", "hunter2", "/srv", "core/llm.py"):
        assert internal not in message


def test_kind_of_a_foreign_exception_is_none():
    assert kind_of(ValueError("x")) is None and kind_of(psycopg.OperationalError("x")) is None


def _core_classes() -> list[tuple[str, type]]:
    """Every class defined in a module of the `core` package (imported by walking it; `__main__` runs a command)."""
    found = []
    for info in pkgutil.walk_packages(core.__path__, "core."):
        if info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                found.append((f"{module.__name__}.{name}", cls))
    return found


def test_every_public_core_exception_is_a_prompt_dev_error():
    """A user-caused error that is not a PromptDevError shows as "unexpected": every public exception class of core
    must be one (private control-flow exceptions, named with a leading underscore, may be anything)."""
    offenders = [name for name, cls in _core_classes()
                 if issubclass(cls, Exception) and not name.rsplit(".", 1)[1].startswith("_")
                 and not issubclass(cls, PromptDevError)]
    assert offenders == []


def test_a_not_found_or_conflict_answers_with_its_own_status():
    """`ConversationNotFound` is a ConversationError (an InvalidInput) and a NotFound: listed in the wrong order, it
    would answer 422. A class that is a NotFound or a Conflict carries that kind, and every class its kind's status."""
    wrong = []
    for name, cls in _core_classes():
        if not issubclass(cls, PromptDevError):
            continue
        kind = kind_of(cls)
        if kind is not None and cls.status != kind.status:
            wrong.append(f"{name}: status {cls.status}, kind {kind.__name__}")
        for specific in (NotFound, Conflict):
            if issubclass(cls, specific) and kind is not specific:
                wrong.append(f"{name}: {kind.__name__ if kind else 'no kind'} instead of {specific.__name__}")
    assert wrong == []
