"""Templates: named prompt templates with immutable numbered versions, labels, sandboxed Jinja2 rendering,
composition by reference, diff, export/import and registration of prompts kept in application code.

Every public function takes the pool (or an open connection) first. Errors are `TemplateError` subclasses
(a ValueError; `TemplateNotFound` is also a LookupError) whose message is one clear line.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import hashlib
import json
import math
import re
import string
import subprocess
import sys
import threading
import time
from collections import OrderedDict, abc
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import jinja2
import jsonschema
import psycopg
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

DB = Union[ConnectionPool, psycopg.Connection]
Content = Union[str, Sequence[Mapping[str, Any]]]

ROLES = ("system", "user", "assistant")
RESERVED_LABELS = ("latest",)
STANDARD_LABELS = ("production", "staging")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
LABEL_RE = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
REF_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,99})(?:@(?P<selector>[a-z0-9][a-z0-9._-]{0,62}))?$")
MAX_SOURCE_CHARS = 500_000
EXPORT_FORMAT = "promptdev-templates"
EXPORT_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Errors


class TemplateError(ValueError):
    """A template operation was refused; the message says why in one line."""


class TemplateNotFound(TemplateError, LookupError):
    """No such template, version or label."""


class TemplateExists(TemplateError):
    """A template with that name already exists."""


class TemplateInactive(TemplateError):
    """The template is deactivated and cannot be rendered by name."""


class TemplateSyntaxError(TemplateError):
    """Template source does not parse; `lineno` (1-based) and `message_index` (0-based, chat only) say where."""

    def __init__(self, message: str, *, lineno: int | None = None, message_index: int | None = None,
                 role: str | None = None, detail: str = ""):
        super().__init__(message)
        self.lineno, self.message_index, self.role, self.detail = lineno, message_index, role, detail or message


class IncludeError(TemplateError):
    """An include by reference cannot be resolved: unknown template, cycle or nesting too deep."""


class RenderError(TemplateError):
    """Rendering failed."""


class MissingVariables(RenderError):
    """Variables the template uses were not given; `names` lists every one."""

    def __init__(self, names: Iterable[str], problems: Iterable[str] = ()):
        self.names = sorted(set(names))
        self.problems = list(problems)
        parts = []
        if self.names:
            parts.append(f"missing variable{'s' if len(self.names) > 1 else ''}: {', '.join(self.names)}")
        parts.extend(self.problems)
        super().__init__("; ".join(parts) or "undefined value")


class InvalidVariables(RenderError):
    """The variables do not match the template's input JSON Schema; `errors` lists each problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("variables do not match the input schema: " + "; ".join(self.errors))


class RenderLimitExceeded(RenderError):
    """The template tried to use too much time, memory or recursion."""


class SandboxViolation(RenderError):
    """The template tried to reach something the sandbox forbids."""


# ---------------------------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class TemplateVersion:
    """One immutable version of a template."""

    id: int
    template_id: int
    name: str
    version: int
    kind: str  # 'chat' | 'text'
    messages: list[dict[str, str]]  # chat messages; [] for a text template
    text: str | None  # the prompt of a text template; None for chat
    params: dict[str, Any]
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    variables: list[str]
    created_by: str
    created_at: datetime
    change_description: str
    content_sha256: str
    rollback_of: int | None = None
    git_commit: str | None = None

    @property
    def content(self) -> Content:
        """The text prompt, or the list of chat messages."""
        return self.text if self.kind == "text" else [dict(m) for m in self.messages]

    @property
    def ref(self) -> str:
        """`name@version`, the exact reference of this version."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Template:
    """A template's metadata, its newest version number and its labels (label -> version)."""

    id: int
    name: str
    description: str
    category: str
    tags: list[str]
    owner: str
    active: bool
    latest_version: int
    created_at: datetime
    updated_at: datetime
    labels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplatePage:
    """One page of `list_templates`: the rows and the total number matching the filters."""

    items: list[Template]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class LabelEvent:
    """One move of a label: from_version None when it was created, to_version None when removed."""

    id: int
    template_id: int
    label: str
    from_version: int | None
    to_version: int | None
    moved_by: str
    moved_at: datetime


@dataclass(frozen=True)
class Rendered:
    """A rendered template version: the chat messages to send (a text template becomes one user message)."""

    template_version: TemplateVersion | None
    label: str | None
    messages: list[dict[str, str]]
    prompt: str | None
    variables: dict[str, Any]


@dataclass(frozen=True)
class DiffRow:
    """One line pair of a side-by-side diff; tag is equal, replace, delete or insert."""

    tag: str
    left_no: int | None
    left: str
    right_no: int | None
    right: str


@dataclass(frozen=True)
class VersionDiff:
    """Differences between two versions of one template."""

    name: str
    from_version: int
    to_version: int
    unified: str
    side_by_side: list[DiffRow]

    @property
    def changed(self) -> bool:
        """True when the two versions differ."""
        return any(row.tag != "equal" for row in self.side_by_side)


@dataclass(frozen=True)
class Analysis:
    """What the editor shows while typing: variables, includes, and the first error (None when valid)."""

    variables: list[str]
    includes: list[str]
    error: str | None = None
    lineno: int | None = None
    message_index: int | None = None


@dataclass(frozen=True)
class ImportReport:
    """What an import did, template by template."""

    created: list[str]
    extended: dict[str, int]
    unchanged: list[str]
    diverged: dict[str, int]
    labels_moved: int

    def summary(self) -> str:
        """One line for humans."""
        parts = [f"{len(self.created)} created", f"{len(self.extended)} extended", f"{len(self.unchanged)} unchanged"]
        if self.diverged:
            parts.append(f"{len(self.diverged)} diverged (their versions appended: {', '.join(sorted(self.diverged))})")
        if self.labels_moved:
            parts.append(f"{self.labels_moved} label moves")
        return "imported: " + ", ".join(parts)


@dataclass(frozen=True)
class RenderLimits:
    """Resource limits of one render."""

    max_output_chars: int = 1_000_000  # rendered text, any string built while rendering, any text a value becomes
    max_value_chars: int = 10_000_000  # the text size of any list or mapping built while rendering
    max_range: int = 100_000  # items in one range()
    max_steps: int = 1_000_000  # loop iterations, calls and filter applications
    max_seconds: float = 5.0
    max_call_depth: int = 50  # nested macro calls / recursive loops
    max_include_depth: int = 5
    max_int_bits: int = 10_000
    max_wrap_work: int = 10_000_000_000  # wordwrap: characters copied breaking long words (quadratic in textwrap)


DEFAULT_LIMITS = RenderLimits()


# ---------------------------------------------------------------------------------------------------------------
# The sandbox


class _Budget:
    """Counters of one render, reached through a context variable by the sandbox hooks."""

    __slots__ = ("limits", "steps", "deadline", "depth", "output", "missing", "problems", "weights", "visiting")

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.steps = 0
        self.deadline = time.monotonic() + limits.max_seconds
        self.depth = 0
        self.output = 0
        self.missing: set[str] = set()
        self.problems: list[str] = []
        self.weights: dict[int, tuple[Any, int]] = {}  # id -> (container, text weight); keeps the container alive
        self.visiting: set[int] = set()

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise RenderLimitExceeded(
                f"the template did more than {self.limits.max_steps:,} steps (loop iterations and calls)")
        if time.monotonic() > self.deadline:  # every step: one step may be costly (a comparison, a sort)
            raise RenderLimitExceeded(f"rendering took longer than {self.limits.max_seconds:g} s")

    def check_size(self, n: int, what: str = "text") -> None:
        if n > self.limits.max_output_chars:
            raise RenderLimitExceeded(f"{what} of {n:,} characters or items exceeds the limit of "
                                      f"{self.limits.max_output_chars:,}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("promptdev_template_budget", default=None)
_INCLUDES: contextvars.ContextVar[dict[str, "_Compiled"] | None] = contextvars.ContextVar(
    "promptdev_template_includes", default=None)


class _CompileTimeOnly(Exception):
    """Raised by guarded filters outside a render, so Jinja never folds them into constants at compile time."""


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise _CompileTimeOnly()
    return budget


class _CollectingUndefined(jinja2.Undefined):
    """An undefined value that records every use (so one error can name every missing variable) and renders empty;
    `is defined` and `default` work as usual."""

    __slots__ = ()

    def _record(self) -> None:
        budget = _BUDGET.get()
        if budget is None:
            jinja2.Undefined._fail_with_undefined_error(self)
        if self._undefined_obj is jinja2.utils.missing and self._undefined_name is not None:
            budget.missing.add(str(self._undefined_name))
        else:
            problem = self._undefined_message
            if problem not in budget.problems:
                budget.problems.append(problem)

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:  # arithmetic, calls, [], .attr
        self._record()
        return self

    def __getattr__(self, name: str) -> Any:
        if name[:2] == "__" and name[-2:] == "__":
            raise AttributeError(name)
        self._record()
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _fail_with_undefined_error
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _fail_with_undefined_error
    __pos__ = __neg__ = __call__ = __getitem__ = __pow__ = __rpow__ = _fail_with_undefined_error

    def __lt__(self, other: Any) -> bool:
        self._record()
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __str__(self) -> str:
        self._record()
        return ""

    def __len__(self) -> int:
        self._record()
        return 0

    def __iter__(self) -> Iterator[Any]:
        self._record()
        return iter(())

    def __bool__(self) -> bool:
        self._record()
        return False

    def __int__(self) -> int:
        self._record()
        return 0

    def __float__(self) -> float:
        self._record()
        return 0.0

    def __hash__(self) -> int:
        return id(type(self))

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other)

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)


# -- Sizes: what a value would weigh as text, computed without building the text ------------------------------------

_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


def _weight(budget: _Budget, value: Any, cap: int) -> int:
    """About len(str(value)), without building it: exact for strings, an estimate for other scalars, and for lists,
    tuples, dicts, sets and namespaces the sum of their parts. Containers are immutable in the sandbox, so their
    weights are remembered for the render; counting stops as soon as it passes cap, so the cost is bounded by cap
    whatever the value's shape (shared sub-lists nested 40 deep weigh 2**40, and are refused after ~cap steps)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, jinja2.Undefined):
        return 0
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return value.bit_length() * 3 // 10 + 2
    if isinstance(value, float):
        return 24
    if isinstance(value, (bytes, bytearray)):
        return len(value) + 3
    key = id(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        hit = budget.weights.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
    if key in budget.visiting:  # a namespace that holds itself prints as {...}
        return 8
    if isinstance(value, (list, tuple, set, frozenset)):
        parts: Iterable[Any] = value
    elif isinstance(value, dict):
        parts = (x for pair in value.items() for x in pair)
    elif isinstance(value, jinja2.utils.Namespace):
        parts = (x for pair in value._Namespace__attrs.items() for x in pair)  # type: ignore[attr-defined]
    elif isinstance(value, _DICT_VIEWS):
        return 14 + _weight(budget, value.mapping, cap)  # type: ignore[attr-defined]
    else:
        return 64  # other objects print as a short <...> representation
    total = 13 if isinstance(value, jinja2.utils.Namespace) else 2
    budget.visiting.add(key)
    try:
        for part in parts:
            total += _weight(budget, part, cap - total) + 2  # quotes, separators
            if total > cap:
                return total
    finally:
        budget.visiting.discard(key)
    if not isinstance(value, jinja2.utils.Namespace):  # a namespace's attributes can be reassigned
        budget.weights[key] = (value, total)
    return total


def _check_text(budget: _Budget, value: Any, what: str = "the text of a value") -> None:
    """Refuse to turn value into text when that text would pass the output limit."""
    if not isinstance(value, str):
        limit = budget.limits.max_output_chars
        if _weight(budget, value, limit) > limit:
            raise RenderLimitExceeded(f"{what} would be longer than the limit of {limit:,} characters")


def _too_big_value(limit: int) -> RenderLimitExceeded:
    return RenderLimitExceeded(f"a list or mapping whose text would be longer than {limit:,} characters "
                               f"exceeds the limit")


def _check_built(budget: _Budget, value: Any) -> None:
    """Refuse a list or mapping built while rendering whose text would pass max_value_chars."""
    limit = budget.limits.max_value_chars
    if _weight(budget, value, limit) > limit:
        raise _too_big_value(limit)


def _materialize(budget: _Budget, iterable: Iterable[Any]) -> list[Any]:
    """A lazy sequence (map, select, batch …) as a list, refused as soon as it grows past max_value_chars."""
    limit = budget.limits.max_value_chars
    items: list[Any] = []
    total = 2
    for item in iterable:
        budget.step()
        total += _weight(budget, item, limit) + 2
        if total > limit:
            raise _too_big_value(limit)
        items.append(item)
    return items


def _is_lazy(value: Any) -> bool:
    return isinstance(value, abc.Iterator) and not isinstance(value, (str, bytes))


# -- Formatting: %-style and str.format estimated before they run -------------------------------------------------

_FIELD_HEAD = re.compile(r"[^.\[]*")
_FORMATTER = string.Formatter()


def _percent_fields(fmt: str) -> Iterator[tuple[str | None, str | None, str | None, str]]:
    """(key, width, precision, conversion) of each %-field as CPython parses them, in one linear pass (a regex
    over '%(%(%(…' is quadratic); stops at a malformed field, which the formatting itself then reports."""
    i, n = 0, len(fmt)

    def number(i: int) -> tuple[str | None, int]:
        if i < n and fmt[i] == "*":
            return "*", i + 1
        j = i
        while j < n and "0" <= fmt[j] <= "9":
            j += 1
        return fmt[i:j] or None, j

    while True:
        i = fmt.find("%", i)
        if i < 0 or i + 1 >= n:
            return
        i += 1
        key = None
        if fmt[i] == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                depth += {"(": 1, ")": -1}.get(fmt[j], 0)
                j += 1
            if depth:
                return
            key, i = fmt[i + 1:j - 1], j
        while i < n and fmt[i] in "#0 +-":
            i += 1
        width, i = number(i)
        precision = None
        if i < n and fmt[i] == ".":
            precision, i = number(i + 1)
        while i < n and fmt[i] in "hlL":
            i += 1
        if i >= n:
            return
        yield key, width, precision, fmt[i]
        i += 1


def _size(budget: _Budget, digits: str | None) -> int:
    """A width or precision written in a format string; one above the output limit is refused."""
    if not digits:
        return 0
    limit = budget.limits.max_output_chars
    if len(digits) > 12 or int(digits) > limit:
        raise RenderLimitExceeded(f"format width {int(digits):,} exceeds the limit of {limit:,}" if len(digits) <= 12
                                  else f"format width exceeds the limit of {limit:,}")
    return int(digits)


def _estimate_percent(budget: _Budget, fmt: str, right: Any) -> None:
    """`fmt % right`: every field's width, precision and argument text added up before formatting."""
    limit = budget.limits.max_output_chars
    positional = right if isinstance(right, tuple) else (right,)
    index = 0

    def take() -> Any:
        nonlocal index
        index += 1
        return positional[index - 1] if index <= len(positional) else None

    total = len(fmt)
    for key, width, precision, conversion in _percent_fields(fmt):
        if conversion == "%":
            continue
        for size in (width, precision):
            if size == "*":
                value = take()
                total += abs(value) if isinstance(value, int) else 0
            else:
                total += _size(budget, size)
        if key is not None:
            try:
                value = right[key]
            except Exception:  # Python's own formatting reports it
                value = None
        else:
            value = take()
        total += _weight(budget, value, limit) * (4 if conversion in "ra" else 1)
        if total > limit:
            break
    budget.check_size(total, "formatted text")


def _estimate_brace(budget: _Budget, fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """`fmt.format(*args, **kwargs)`: every field's argument text and widths (nested ones too) added up."""
    limit = budget.limits.max_output_chars
    auto = 0

    def lookup(field: str) -> Any:
        nonlocal auto
        head = _FIELD_HEAD.match(field).group(0)  # type: ignore[union-attr]
        try:
            if head == "":
                auto += 1
                return args[auto - 1]
            return args[int(head)] if head.isdigit() else kwargs[head]
        except Exception:  # Python's own formatting reports it
            return None

    try:
        fields = list(_FORMATTER.parse(fmt))
    except ValueError:
        return
    total = 0
    for literal, field, spec, conversion in fields:
        total += len(literal)
        if field is None:
            continue
        total += _weight(budget, lookup(field), limit) * (4 if conversion in ("r", "a") else 1)
        if spec:
            total += sum(_size(budget, digits) for digits in re.findall(r"\d+", spec))
            try:
                nested = [f for _, f, _, _ in _FORMATTER.parse(spec) if f is not None]
            except ValueError:
                nested = []
            for inner in nested:
                size = lookup(inner)
                total += abs(size) if isinstance(size, int) and not isinstance(size, bool) else 0
        if total > limit:
            break
    budget.check_size(total, "formatted text")


def _check_args(budget: _Budget, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    """Whole-number arguments that size a result (widths, counts) must stay under the output limit."""
    limit = budget.limits.max_output_chars
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise RenderLimitExceeded(f"argument {value:,} exceeds the limit of {limit:,}"
                                      if value.bit_length() < 64 else f"argument exceeds the limit of {limit:,}")


def _check_result(budget: _Budget, result: Any) -> None:
    if isinstance(result, (str, bytes, bytearray)):
        budget.check_size(len(result), "a value")
    elif isinstance(result, (list, tuple, dict, set, frozenset)):
        _check_built(budget, result)


def _estimate_join(budget: _Budget, items: Any, sep: Any) -> None:
    if isinstance(items, abc.Collection) and not isinstance(items, (str, bytes, bytearray)):
        limit = budget.limits.max_output_chars
        total = len(sep) * max(len(items) - 1, 0) if isinstance(sep, (str, bytes, bytearray)) else 0
        for item in items:
            total += _weight(budget, item, limit)
            if total > limit:
                break
        budget.check_size(total, "joined text")


def _estimate_replace(budget: _Budget, s: Any, old: Any, new: Any, count: Any = -1) -> None:
    kinds = (str, bytes, bytearray)
    if isinstance(s, kinds) and isinstance(old, kinds) and isinstance(new, kinds):
        found = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        budget.check_size(len(s) + found * max(len(new) - len(old), 0), "replaced text")


def _estimate_translate(budget: _Budget, s: Any, table: Any) -> None:
    if isinstance(s, str):
        values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
        widest = max((len(v) for v in values if isinstance(v, str)), default=1)
        budget.check_size(len(s) * max(widest, 1), "translated text")


def _estimate_expandtabs(budget: _Budget, s: Any, size: Any) -> None:
    if isinstance(s, (str, bytes, bytearray)) and isinstance(size, int):
        tab = "\t" if isinstance(s, str) else b"\t"
        budget.check_size(len(s) + s.count(tab) * max(size, 0), "expanded text")


_WRAP_WORD = re.compile(r"[^\t\n\x0b\x0c\r ]+")


def _estimate_wordwrap(budget: _Budget, s: Any, width: Any, break_long_words: Any, wrapstring: Any) -> None:
    """textwrap breaks a long word by copying what is left of it for every line (quadratic): bound that work
    and the size of the result."""
    if not isinstance(s, str) or not isinstance(width, int) or width < 1:
        return
    if break_long_words and width < len(s):
        work = 0
        for match in _WRAP_WORD.finditer(s):  # words as textwrap sees them (it splits on ASCII whitespace only)
            size = match.end() - match.start()
            if size > width:
                work += size * size // width
        if work > budget.limits.max_wrap_work:
            raise RenderLimitExceeded(f"wordwrap: breaking words this long into lines of {width} characters is "
                                      f"too much work; use a larger width")
    lines = len(s) // width + s.count("\n") + 1
    budget.check_size(len(s) + lines * len(wrapstring if isinstance(wrapstring, str) else "\n"), "wrapped text")


# -- Filters --------------------------------------------------------------------------------------------------------

_SIZING_FILTERS = frozenset({"center", "indent", "truncate", "batch", "slice"})  # int arguments that size a result
_TEXT_FILTERS = frozenset({  # filters that turn their value into text
    "capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "pprint", "replace", "safe",
    "string", "striptags", "title", "tojson", "trim", "truncate", "upper", "urlencode", "urlize", "wordcount",
    "wordwrap", "xmlattr"})


def _guard_filter(name: str, func: Any) -> Any:
    skip = 2 if hasattr(func, "jinja_pass_arg") else 1

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if len(args) >= skip and _is_lazy(args[skip - 1]):  # map(), select() …: build it under the limits
            args = (*args[:skip - 1], _materialize(budget, args[skip - 1]), *args[skip:])
        value = args[skip - 1] if len(args) >= skip else None
        rest = args[skip:]
        if name in _SIZING_FILTERS:
            _check_args(budget, rest, kwargs)
        if name in _TEXT_FILTERS:
            _check_text(budget, value)
        if name == "join":
            _estimate_join(budget, value, rest[0] if rest else kwargs.get("d", ""))
        elif name == "replace" and len(rest) >= 2:
            _estimate_replace(budget, value, rest[0], rest[1], rest[2] if len(rest) > 2 else kwargs.get("count"))
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else 4
            budget.check_size(len(value) + (value.count("\n") + 1) * width, "indented text")
        elif name == "format" and isinstance(value, str):
            _estimate_percent(budget, value, kwargs if kwargs else tuple(rest))
        elif name == "wordwrap":
            _estimate_wordwrap(budget, value, rest[0] if rest else kwargs.get("width", 79),
                               rest[1] if len(rest) > 1 else kwargs.get("break_long_words", True),
                               rest[2] if len(rest) > 2 else kwargs.get("wrapstring"))
        result = func(*args, **kwargs)
        _check_result(budget, result)
        return result

    return guarded


class _Guards(Extension):
    """Hooks the compiled templates call: every loop iterates through `iterate`, every `~` goes through `concat`,
    list, tuple and dict literals through `built`, and `*args` through `spread`."""

    def iterate(self, iterable: Any) -> Iterator[Any]:
        budget = _budget()
        for item in iterable:
            budget.step()
            yield item

    def concat(self, *parts: Any) -> str:
        budget = _budget()
        limit = budget.limits.max_output_chars
        total = 0
        for part in parts:
            total += _weight(budget, part, limit)
            if total > limit:
                break
        budget.check_size(total, "joined text")
        return "".join([str(p) for p in parts])

    def built(self, value: Any) -> Any:
        budget = _budget()
        budget.step()
        _check_built(budget, value)
        return value

    def spread(self, value: Any) -> Any:
        return _materialize(_budget(), value) if _is_lazy(value) else value


_GUARDS_ID = _Guards.identifier


def _guard_call(method: str, arg: nodes.Expr, lineno: int) -> nodes.Call:
    return nodes.Call(nodes.ExtensionAttribute(_GUARDS_ID, method), [arg], [], None, None, lineno=lineno)


class _Transformer(NodeTransformer):
    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _guard_call("iterate", node.iter, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.ExtensionAttribute(_GUARDS_ID, "concat"), list(node.nodes), [], None, None,
                          lineno=node.lineno)

    def _literal(self, node: nodes.Expr, parts: Iterable[nodes.Node]) -> nodes.Node:
        self.generic_visit(node)
        if all(isinstance(p, nodes.Const) for p in parts):
            return node  # constants only: bounded by the source
        return _guard_call("built", node, node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return self._literal(node, list(node.items))

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        if node.ctx != "load":
            return node
        return self._literal(node, list(node.items))

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return self._literal(node, [x for pair in node.items for x in (pair.key, pair.value)])

    def _spread(self, node: nodes.Node) -> nodes.Node:
        self.generic_visit(node)
        if node.dyn_args is not None:  # type: ignore[attr-defined]
            node.dyn_args = _guard_call("spread", node.dyn_args, node.lineno)  # type: ignore[attr-defined]
        return node

    visit_Call = visit_Filter = visit_Test = _spread


def _capped_range(*args: Any) -> range:
    budget = _budget()
    budget.step()
    try:
        rng = range(*args)
        size = len(rng)
    except OverflowError:
        size = None
    if size is None or size > budget.limits.max_range:
        raise RenderLimitExceeded(f"range() of more than {budget.limits.max_range:,} items is not allowed")
    return rng


def _dict(**kwargs: Any) -> dict[str, Any]:
    return dict(kwargs)


def _finalize(value: Any) -> Any:
    """Every `{{ … }}` value passes here before it becomes text: refuse one whose text would pass the limit."""
    budget = _budget()
    if not isinstance(value, str):
        limit = budget.limits.max_output_chars
        if _weight(budget, value, limit) > limit:
            raise RenderLimitExceeded(f"the rendered prompt is longer than {limit:,} characters")
    return value


_STR_SIZING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with budgets: capped ranges, sizes, steps, time and call depth."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Joins the text of macros, blocks, `{% set %}…{% endset %}`, call and filter blocks: bounded."""
        budget = _BUDGET.get()
        if budget is None:
            return "".join(parts)
        limit = budget.limits.max_output_chars
        pieces, total = [], 0
        for piece in parts:
            total += len(piece)
            if total > limit:
                raise RenderLimitExceeded(f"a block of text longer than {limit:,} characters exceeds the limit")
            pieces.append(piece)
        return "".join(pieces)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        ints = isinstance(left, int) and isinstance(right, int)
        max_bits = budget.limits.max_int_bits
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple, bytes)) and isinstance(n, int) and not isinstance(n, bool):
                    budget.check_size(len(seq) * max(n, 0), "repeated text")
                    limit = budget.limits.max_value_chars
                    if isinstance(seq, (list, tuple)) and n > 1 and _weight(budget, seq, limit) * n > limit:
                        raise _too_big_value(limit)
            if ints and left.bit_length() + right.bit_length() > max_bits:
                raise RenderLimitExceeded("number too large")
        elif operator == "**":
            if ints and right > 0 and abs(left) > 1 and right * left.bit_length() > max_bits:
                raise RenderLimitExceeded("number too large")
            numbers = isinstance(right, (int, float)) and isinstance(left, (int, float))
            if numbers and abs(right) > 1e6 and abs(left) > 1:
                raise RenderLimitExceeded("number too large")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.check_size(len(left) + len(right), "joined text")
        elif operator == "%" and isinstance(left, str):
            _estimate_percent(budget, left, right)
        try:
            result = super().call_binop(context, operator, left, right)
        except OverflowError:
            raise RenderLimitExceeded("number too large") from None
        if operator in ("+", "*") and isinstance(result, (list, tuple)):
            _check_built(budget, result)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if getattr(__obj, "__self__", None) is _GUARDS:  # the hooks compiled in by _Transformer count themselves
            return __obj(*args)
        budget = _budget()
        budget.step()
        if not isinstance(__obj, (Macro, LoopContext)):
            target = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(target, "__self__", None)
            if isinstance(owner, (str, bytes, bytearray)):
                method = getattr(target, "__name__", "")
                if method in _STR_SIZING_METHODS:
                    _check_args(budget, args, kwargs)
                if method == "join" and args:
                    if _is_lazy(args[0]):
                        args = (_materialize(budget, args[0]), *args[1:])
                    _estimate_join(budget, args[0], owner)
                elif method == "replace" and len(args) >= 2:
                    _estimate_replace(budget, owner, args[0], args[1], args[2] if len(args) > 2 else -1)
                elif method == "expandtabs":
                    _estimate_expandtabs(budget, owner, args[0] if args else kwargs.get("tabsize", 8))
                elif method == "translate" and args:
                    _estimate_translate(budget, owner, args[0])
                elif method in ("format", "format_map") and isinstance(owner, str):
                    if method == "format":
                        _estimate_brace(budget, owner, args, kwargs)
                    elif args and isinstance(args[0], Mapping):
                        _estimate_brace(budget, owner, (), args[0])
            result = super().call(__context, __obj, *args, **kwargs)
            _check_result(budget, result)
            return result
        budget.depth += 1
        try:
            if budget.depth > budget.limits.max_call_depth:
                raise RenderLimitExceeded(f"recursion deeper than {budget.limits.max_call_depth} calls")
            return super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _RefLoader(jinja2.BaseLoader):
    """Serves included templates from the references resolved for the current render."""

    def load(self, environment: jinja2.Environment, name: str, globals: Any = None) -> jinja2.Template:
        resolved = _INCLUDES.get() or {}
        compiled = resolved.get(name)
        if compiled is None:
            raise jinja2.TemplateNotFound(name)
        return compiled.template


_ENV = _SandboxEnvironment(
    loader=_RefLoader(), undefined=_CollectingUndefined, autoescape=False, cache_size=0, auto_reload=False,
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, extensions=[_Guards], finalize=_finalize)
_ENV.globals.clear()
_ENV.globals.update(range=_capped_range, dict=_dict, namespace=jinja2.utils.Namespace, cycler=jinja2.utils.Cycler,
                    joiner=jinja2.utils.Joiner)
_ENV.filters = {name: _guard_filter(name, f) for name, f in _ENV.filters.items()}
_GUARDS = _ENV.extensions[_GUARDS_ID]
GLOBAL_NAMES = frozenset(_ENV.globals)


@dataclass(frozen=True)
class _Compiled:
    """A compiled source and what static analysis found in it."""

    template: jinja2.Template
    includes: tuple[str, ...]  # references, in order of appearance
    optional_includes: frozenset[str]  # `ignore missing`
    variables: frozenset[str]  # undeclared names, globals excluded
    stored: frozenset[str]  # names the template assigns (set, for, macro, import)
    guarded: frozenset[str]  # names tested with `is defined` / `is undefined` or given a `default`


_cache_lock = threading.Lock()
_cache: OrderedDict[str, _Compiled] = OrderedDict()
_CACHE_SIZE = 4096


def _syntax_message(detail: str, lineno: int | None, where: str = "") -> str:
    place = " ".join(x for x in (f"in {where}" if where else "", f"at line {lineno}" if lineno else "") if x)
    return f"syntax error{' ' + place if place else ''}: {detail}"


def _syntax_error(detail: str, lineno: int | None) -> TemplateSyntaxError:
    return TemplateSyntaxError(_syntax_message(detail, lineno), lineno=lineno, detail=detail)


def _compile(source: str, name: str = "<prompt>") -> _Compiled:
    """Parse, check and compile source (cached by source); raise TemplateSyntaxError with the line number."""
    key = source
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    if len(source) > MAX_SOURCE_CHARS:
        raise _syntax_error(f"template source is longer than {MAX_SOURCE_CHARS:,} characters", None)
    try:
        compiled = _build(source, name)
    except TemplateSyntaxError:
        raise
    except (RecursionError, MemoryError):  # the parser and Python's compiler recurse on nesting
        raise _syntax_error("the template is nested too deeply", None) from None
    except SyntaxError as exc:  # Python's limits on nested blocks (e.g. 20 nested loops)
        detail = str(exc.msg or exc)
        if "nested" in detail or "indentation" in detail:
            raise _syntax_error("the template is nested too deeply", None) from None
        raise _syntax_error(f"the template cannot be compiled: {detail}", None) from None
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "integer string conversion" in detail:
            detail = "a number in it is too long"
        raise _syntax_error(f"the template cannot be compiled: {detail}", None) from None
    with _cache_lock:
        _cache[key] = compiled
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


def _build(source: str, name: str) -> _Compiled:
    """Parse, analyse and compile source (no caching); jinja2 syntax errors become TemplateSyntaxError."""
    try:
        ast = _ENV.parse(source, name=name)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc.message or "invalid template", exc.lineno) from None
    for node in ast.find_all(nodes.Const):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise _syntax_error("a number in the template is too large", node.lineno)
    includes: list[str] = []
    optional: set[str] = set()
    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        target = node.template
        if not (isinstance(target, nodes.Const) and isinstance(target.value, str)):
            raise _syntax_error('templates are included by a literal name such as {% include "other@production" %}',
                                node.lineno)
        ref = target.value
        if not REF_RE.match(ref):
            raise _syntax_error(f"{ref!r} is not a template reference (name, name@label or name@version)",
                                node.lineno)
        if ref not in includes:
            includes.append(ref)
        if getattr(node, "ignore_missing", False):
            optional.add(ref)
    stored: set[str] = set()
    for node in ast.find_all(nodes.Name):
        if node.ctx in ("store", "param"):
            stored.add(node.name)
    for node in ast.find_all(nodes.Macro):
        stored.add(node.name)
    for node in ast.find_all(nodes.Import):
        stored.add(node.target)
    for node in ast.find_all(nodes.FromImport):
        for item in node.names:
            stored.add(item[1] if isinstance(item, tuple) else item)
    guarded: set[str] = set()
    for node in ast.find_all((nodes.Test, nodes.Filter)):
        if isinstance(node.node, nodes.Name) and node.name in (("defined", "undefined") if isinstance(node, nodes.Test)
                                                               else ("default", "d")):
            guarded.add(node.node.name)
    try:
        variables = meta.find_undeclared_variables(ast) - GLOBAL_NAMES
        _Transformer().visit(ast)
        ast.set_environment(_ENV)
        code = _ENV.compile(ast, name=name, filename=name)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc.message or "invalid template", exc.lineno) from None
    template = _ENV.template_class.from_code(_ENV, code, _ENV.make_globals(None))
    return _Compiled(template, tuple(includes), frozenset(optional), frozenset(variables), frozenset(stored),
                     frozenset(guarded))


def _sources(kind: str, messages: Sequence[Mapping[str, str]] | None, text: str | None) -> list[tuple[str, str]]:
    if kind == "text":
        return [("user", text or "")]
    return [(m["role"], m["content"]) for m in messages or ()]


def _where(kind: str, index: int, role: str) -> str:
    return f"message {index + 1} ({role})" if kind == "chat" else ""


def _compile_all(kind: str, messages: Any, text: Any, name: str) -> list[tuple[str, _Compiled]]:
    compiled = []
    for i, (role, source) in enumerate(_sources(kind, messages, text)):
        try:
            compiled.append((role, _compile(source, name)))
        except TemplateSyntaxError as exc:
            where = _where(kind, i, role)
            raise TemplateSyntaxError(_syntax_message(exc.detail, exc.lineno, where), lineno=exc.lineno,
                                      message_index=i if kind == "chat" else None, role=role,
                                      detail=exc.detail) from None
    return compiled


def _template_line(tb: Any, filename: str) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _run(compiled: _Compiled, variables: Mapping[str, Any], budget: _Budget, where: str) -> str:
    out: list[str] = []
    try:
        for chunk in compiled.template.generate(variables):
            budget.output += len(chunk)
            if budget.output > budget.limits.max_output_chars:
                raise RenderLimitExceeded(f"the rendered prompt is longer than {budget.limits.max_output_chars:,} "
                                          f"characters")
            out.append(chunk)
    except Exception as exc:  # whatever the template did, the user gets one line
        line = _template_line(exc.__traceback__, compiled.template.filename or "")
        place = ", ".join(x for x in (where, f"line {line}" if line else "") if x)
        prefix = f"{place}: " if place else ""
        if isinstance(exc, MissingVariables):
            raise
        if isinstance(exc, TemplateError):
            exc.args = (prefix + str(exc),)
            raise
        if isinstance(exc, SecurityError):
            raise SandboxViolation(f"{prefix}blocked by the sandbox: {exc}") from None
        if isinstance(exc, RecursionError):
            raise RenderLimitExceeded(f"{prefix}recursion too deep") from None
        if isinstance(exc, MemoryError):
            raise RenderLimitExceeded(f"{prefix}out of memory") from None
        if isinstance(exc, jinja2.TemplateNotFound):
            raise IncludeError(f"{prefix}template {exc.name!r} could not be included") from None
        message = exc.message if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
        raise RenderError(f"{prefix}{str(message).splitlines()[0] if message else type(exc).__name__}") from None
    return "".join(out)


def _required(roots: Sequence[_Compiled], tree: Mapping[str, _Compiled]) -> set[str]:
    """Variables a render needs: undeclared names of the roots and of every included template (minus names that
    an including template assigns), except names that are only used guarded by `is defined` or `default`."""
    required: set[str] = set()
    guarded: set[str] = set()

    def walk(compiled: _Compiled, assigned: frozenset[str], seen: tuple[str, ...]) -> None:
        required.update(compiled.variables - assigned)
        guarded.update(compiled.guarded)
        for ref in compiled.includes:
            child = tree.get(ref)
            if child is not None and ref not in seen:
                walk(child, assigned | compiled.stored, seen + (ref,))

    for root in roots:
        walk(root, frozenset(), ())
    return required - guarded


# ---------------------------------------------------------------------------------------------------------------
# Content: normalisation, validation, hashing


@dataclass(frozen=True)
class _Prepared:
    kind: str
    messages: list[dict[str, str]] | None
    text: str | None
    params: dict[str, Any]
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    variables: list[str]
    sha256: str
    includes: tuple[str, ...]


def check_name(name: str) -> str:
    """Return name if it is a valid template name (a slug), else raise TemplateError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TemplateError(f"invalid template name {name!r}: use lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit, at most 100 characters")
    return name


def check_label(label: str) -> str:
    """Return label if it can be set, else raise TemplateError."""
    if label in RESERVED_LABELS:
        raise TemplateError("'latest' always points at the newest version and cannot be moved")
    if not isinstance(label, str) or not LABEL_RE.match(label):
        raise TemplateError(f"invalid label {label!r}: use lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter")
    return label


def _check_storable(text: str, what: str) -> None:
    if "\x00" in text:
        raise TemplateError(f"{what} contains a NUL character (\\x00), which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TemplateError(f"{what} contains characters that are not valid Unicode (lone surrogates)") from None


def normalize_content(content: Content) -> tuple[str, list[dict[str, str]] | None, str | None]:
    """(kind, messages, text) of a text prompt or a list of chat messages; raise TemplateError when malformed."""
    if isinstance(content, str):
        if not content.strip():
            raise TemplateError("the prompt is empty")
        _check_storable(content, "the prompt")
        return "text", None, content
    if isinstance(content, Mapping) or not isinstance(content, Sequence):
        raise TemplateError("content must be a text prompt or a list of chat messages")
    if not content:
        raise TemplateError("a chat template needs at least one message")
    messages = []
    for i, message in enumerate(content, 1):
        if not isinstance(message, Mapping):
            raise TemplateError(f"message {i} must be a mapping with 'role' and 'content'")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise TemplateError(f"message {i} has unknown key(s): {', '.join(map(str, extra))}")
        role, text = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TemplateError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise TemplateError(f"message {i} ({role}) is empty")
        _check_storable(text, f"message {i} ({role})")
        messages.append({"role": role, "content": text})
    return "chat", messages, None


def _check_params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TemplateError("model parameters must be a mapping such as {\"temperature\": 0.7}")
    params = dict(params)
    if isinstance(params.get("stop"), tuple):
        params["stop"] = list(params["stop"])
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"model parameters must be plain JSON values: {exc}") from None
    from core.llm import GenerationParams

    try:
        GenerationParams.from_dict(params)
    except ValueError as exc:
        raise TemplateError(f"model parameters: {exc}") from None
    return params


def _check_schema(schema: Any, which: str) -> dict[str, Any] | None:
    if schema is None or schema == {}:
        return None
    if not isinstance(schema, Mapping):
        raise TemplateError(f"the {which} schema must be a JSON object")
    schema = json.loads(json.dumps(schema))
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise TemplateError(f"the {which} schema is not a valid JSON Schema: {exc.message}") from None
    return schema


def canonical_content(kind: str, messages: Any, text: str | None, params: Mapping[str, Any] | None,
                      input_schema: Mapping[str, Any] | None, output_schema: Mapping[str, Any] | None) -> str:
    """The canonical JSON of a version's content, whose SHA-256 identifies it."""
    doc = {"kind": kind, "messages": messages if kind == "chat" else None, "text": text if kind == "text" else None,
           "params": params or {}, "input_schema": input_schema or None, "output_schema": output_schema or None}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_sha256(kind: str, messages: Any, text: str | None, params: Mapping[str, Any] | None = None,
                   input_schema: Mapping[str, Any] | None = None,
                   output_schema: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (hex) of the canonical content."""
    return hashlib.sha256(canonical_content(kind, messages, text, params, input_schema, output_schema)
                          .encode("utf-8")).hexdigest()


def _prepare(content: Content, params: Any, input_schema: Any, output_schema: Any, name: str = "<prompt>") -> _Prepared:
    kind, messages, text = normalize_content(content)
    compiled = _compile_all(kind, messages, text, name)
    params = _check_params(params)
    input_schema = _check_schema(input_schema, "input")
    output_schema = _check_schema(output_schema, "output")
    variables = sorted(set().union(*(c.variables for _, c in compiled)))
    includes = tuple(dict.fromkeys(ref for _, c in compiled for ref in c.includes))
    sha = content_sha256(kind, messages, text, params, input_schema, output_schema)
    return _Prepared(kind, messages, text, params, input_schema, output_schema, variables, sha, includes)


def extract_variables(content: Content) -> list[str]:
    """Sorted names of the variables a text prompt or chat messages use; raise TemplateSyntaxError when invalid."""
    kind, messages, text = normalize_content(content)
    return sorted(set().union(*(c.variables for _, c in _compile_all(kind, messages, text, "<prompt>"))))


def analyze(content: Content) -> Analysis:
    """Variables, includes and the first syntax error of unsaved content, without raising (for editors, as the
    user types: empty or half-filled messages are skipped, not errors)."""
    if isinstance(content, str):
        kind, sources = "text", [("user", content)]
    else:
        kind = "chat"
        sources = [(str(m.get("role", "")), m.get("content")) for m in content or () if isinstance(m, Mapping)]
    variables: set[str] = set()
    includes: list[str] = []
    for i, (role, source) in enumerate(sources):
        if not isinstance(source, str) or not source.strip():
            continue
        try:
            compiled = _compile(source)
        except TemplateSyntaxError as exc:
            message = _syntax_message(exc.detail, exc.lineno, _where(kind, i, role))
            return Analysis(sorted(variables), includes, message, exc.lineno, i if kind == "chat" else None)
        variables |= compiled.variables
        includes += [r for r in compiled.includes if r not in includes]
    return Analysis(sorted(variables), includes)


def coerce_variables(schema: Mapping[str, Any] | None, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables typed per the input schema: strings given for integer, number, boolean, array or object
    properties are parsed as JSON (values from forms and the command line arrive as text)."""
    result = dict(variables)
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping):
        return result
    for key, value in variables.items():
        spec = props.get(key)
        if not isinstance(value, str) or not isinstance(spec, Mapping):
            continue
        types = spec.get("type")
        types = {types} if isinstance(types, str) else set(types or ())
        if types and not types & {"string"} and types & {"integer", "number", "boolean", "array", "object", "null"}:
            try:
                result[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return result


def validate_variables(schema: Mapping[str, Any] | None, variables: Mapping[str, Any]) -> list[str]:
    """Every way variables break the input JSON Schema (empty when they fit or there is no schema)."""
    if not schema:
        return []
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(dict(variables)),
                    key=lambda e: ([str(p) for p in e.path], e.message))
    return [f"{'.'.join(map(str, e.path))}: {e.message}" if e.path else e.message for e in errors]


def validate_output(template_version: TemplateVersion, output: str | Any) -> list[str]:
    """Every way an output (JSON text or a parsed value) breaks the version's output schema; [] when it fits."""
    schema = template_version.output_schema
    if not schema:
        return []
    if isinstance(output, str):
        try:
            output = json.loads(output)
        except json.JSONDecodeError as exc:
            return [f"output is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(output), key=lambda e: ([str(p) for p in e.path], e.message))
    return [f"{'.'.join(map(str, e.path))}: {e.message}" if e.path else e.message for e in errors]


def _with_defaults(schema: Mapping[str, Any] | None, variables: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(variables)
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    for key, spec in (props.items() if isinstance(props, Mapping) else ()):
        if key not in result and isinstance(spec, Mapping) and "default" in spec:
            result[key] = spec["default"]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Database helpers


@contextmanager
def _connection(pool: DB) -> Iterator[psycopg.Connection]:
    if isinstance(pool, psycopg.Connection):
        yield pool
    else:
        with pool.connection() as conn:
            yield conn


_VERSION_COLUMNS = """v.id, v.template_id, t.name, v.version, v.kind, COALESCE(v.messages, '[]'::jsonb) AS messages,
    v.text, v.params, v.input_schema, v.output_schema, v.variables, v.created_by, v.created_at,
    v.change_description, v.content_sha256, v.rollback_of, v.git_commit"""
_VERSION_FIELDS = tuple(TemplateVersion.__dataclass_fields__)


def _version(row: Mapping[str, Any]) -> TemplateVersion:
    return TemplateVersion(**{k: row[k] for k in _VERSION_FIELDS})


def _template_row(conn: psycopg.Connection, name: str, *, lock: bool = False) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT * FROM templates WHERE name = %s{' FOR UPDATE' if lock else ''}",
                          (name,)).fetchone()
    if row is None:
        raise TemplateNotFound(f"no template named {name!r}")
    return row


def _check_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise TemplateError(f"version must be a whole number, got {version!r}")
    return version


def _version_of(conn: psycopg.Connection, template_id: int, version: int, name: str) -> TemplateVersion:
    _check_version(version)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                          "ON t.id = v.template_id "
                          "WHERE v.template_id = %s AND v.version = %s", (template_id, version)).fetchone()
    if row is None:
        raise TemplateNotFound(f"template {name!r} has no version {version}")
    return _version(row)


def _resolve(conn: psycopg.Connection, name: str, label: str | None = None,
             version: int | None = None) -> tuple[TemplateVersion, str | None, bool]:
    """(version, the label used, template active) for name + optional label or version."""
    if label is not None and version is not None:
        raise TemplateError("give a label or a version, not both")
    base = f"SELECT {_VERSION_COLUMNS}, t.active AS template_active"
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise TemplateError(f"version must be a whole number, got {version!r}")
        query = (f"{base}, NULL::text AS used_label FROM templates t JOIN template_versions v ON v.template_id = t.id "
                 "WHERE t.name = %s AND v.version = %s")
        args: tuple = (name, version)
    elif label is None:
        query = (f"{base}, CASE WHEN l.version_id IS NULL THEN 'latest' ELSE 'production' END AS used_label "
                 "FROM templates t LEFT JOIN template_labels l ON l.template_id = t.id AND l.label = 'production' "
                 "JOIN template_versions v ON v.template_id = t.id "
                 "AND (v.id = l.version_id OR (l.version_id IS NULL AND v.version = t.latest_version)) "
                 "WHERE t.name = %s")
        args = (name,)
    elif label == "latest":
        query = (f"{base}, 'latest' AS used_label FROM templates t JOIN template_versions v "
                 "ON v.template_id = t.id AND v.version = t.latest_version WHERE t.name = %s")
        args = (name,)
    else:
        query = (f"{base}, l.label AS used_label FROM templates t JOIN template_labels l "
                 "ON l.template_id = t.id AND l.label = %s JOIN template_versions v ON v.id = l.version_id "
                 "WHERE t.name = %s")
        args = (label, name)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query, args).fetchone()
    if row is None:
        meta_row = conn.execute("SELECT latest_version FROM templates WHERE name = %s", (name,)).fetchone()
        if meta_row is None:
            raise TemplateNotFound(f"no template named {name!r}")
        if version is not None:
            raise TemplateNotFound(f"template {name!r} has no version {version} (latest is {meta_row[0]})")
        raise TemplateNotFound(f"template {name!r} has no label {label!r}")
    return _version(row), row["used_label"], row["template_active"]


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """`name`, `name@label` or `name@3` -> (name, label, version); IncludeError (a TemplateError) when malformed."""
    if not isinstance(ref, str):
        raise IncludeError(f"{ref!r} is not a template reference (name, name@label or name@version)")
    match = REF_RE.match(ref.strip())
    if not match:
        raise IncludeError(f"{ref!r} is not a template reference (name, name@label or name@version)")
    selector = match.group("selector")
    if selector is None:
        return match.group("name"), None, None
    if selector.isdigit():
        return match.group("name"), None, int(selector)
    return match.group("name"), selector, None


def _resolve_includes(conn_factory: Any, roots: Sequence[_Compiled], root_key: str, limits: RenderLimits,
                      self_name: str | None = None, self_compiled: Sequence[_Compiled] = ()) -> dict[str, _Compiled]:
    """Resolve every include reference of roots (recursively) to a compiled version; refuse cycles and depth.

    When saving a new version of `self_name`, references to it by name or @latest resolve to the new content."""
    resolved: dict[str, tuple[str, _Compiled]] = {}
    conn_holder: list[psycopg.Connection] = []

    def fetch(ref: str) -> tuple[str, _Compiled] | None:
        if ref in resolved:
            return resolved[ref]
        name, label, version = parse_ref(ref)
        if self_name is not None and name == self_name and version is None and label in (None, "latest"):
            if len(self_compiled) != 1:
                raise IncludeError(f"include {ref!r}: a chat template cannot be included")
            resolved[ref] = (root_key, self_compiled[0])
            return resolved[ref]
        if not conn_holder:
            conn_holder.append(conn_factory())
        try:
            tv, _, _ = _resolve(conn_holder[0], name, label, version)
        except TemplateNotFound as exc:
            raise IncludeError(f"include {ref!r}: {exc}") from None
        if tv.kind != "text":
            raise IncludeError(f"include {ref!r}: {tv.ref} is a chat template; only text templates can be included")
        resolved[ref] = (tv.ref, _compile(tv.text or "", tv.ref))
        return resolved[ref]

    def visit(compiled: _Compiled, path: tuple[str, ...]) -> None:
        for ref in compiled.includes:
            try:
                key, child = fetch(ref)
            except IncludeError:
                if ref in compiled.optional_includes:
                    continue
                raise
            if key in path:
                raise IncludeError(f"include cycle: {' → '.join(path + (key,))}")
            if len(path) > limits.max_include_depth:
                raise IncludeError(f"includes nested deeper than {limits.max_include_depth}: "
                                   f"{' → '.join(path + (key,))}")
            visit(child, path + (key,))

    for root in roots:
        visit(root, (root_key,))
    return {ref: compiled for ref, (_, compiled) in resolved.items()}


class _LazyConnection:
    """Opens a pool connection only when an include needs the database."""

    def __init__(self, db: DB | None):
        self.db, self._cm, self.conn = db, None, None

    def __call__(self) -> psycopg.Connection:
        if self.db is None:
            raise IncludeError("templates can only be included when rendering from the template repository")
        if isinstance(self.db, psycopg.Connection):
            return self.db
        self._cm = self.db.connection()
        self.conn = self._cm.__enter__()
        return self.conn

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _render_parts(pool: DB | None, kind: str, parts: Sequence[tuple[str, _Compiled]], variables: Mapping[str, Any],
                  root_key: str, limits: RenderLimits, input_schema: Mapping[str, Any] | None) -> list[dict[str, str]]:
    if not isinstance(variables, Mapping):
        raise RenderError("variables must be a mapping of names to values")
    roots = [c for _, c in parts]
    tree: dict[str, _Compiled] = {}
    if any(c.includes for c in roots):
        lazy = _LazyConnection(pool)
        try:
            tree = _resolve_includes(lazy, roots, root_key, limits)
        finally:
            lazy.close()
    missing = _required(roots, tree) - set(variables)
    if missing:
        raise MissingVariables(missing)
    if input_schema:
        errors = validate_variables(input_schema, variables)
        if errors:
            raise InvalidVariables(errors)
    budget = _Budget(limits)
    token_b, token_i = _BUDGET.set(budget), _INCLUDES.set(tree)
    try:
        rendered = [{"role": role, "content": _run(c, variables, budget, _where(kind, i, role))}
                    for i, (role, c) in enumerate(parts)]
    finally:
        _BUDGET.reset(token_b)
        _INCLUDES.reset(token_i)
    if budget.missing or budget.problems:
        raise MissingVariables(budget.missing, budget.problems)
    return rendered


def render_string(source: str, variables: Mapping[str, Any] | None = None, *, pool: DB | None = None,
                  limits: RenderLimits = DEFAULT_LIMITS) -> str:
    """Render free-form template text in the sandbox (includes resolve only when pool is given)."""
    if not isinstance(source, str):
        raise RenderError("the template must be text")
    compiled = _compile(source)
    parts = _render_parts(pool, "text", [("user", compiled)], dict(variables or {}), "<prompt>", limits, None)
    return parts[0]["content"]


def render_content(pool: DB | None, content: Content, variables: Mapping[str, Any] | None = None, *,
                   params: Any = None, input_schema: Mapping[str, Any] | None = None,
                   limits: RenderLimits = DEFAULT_LIMITS) -> Rendered:
    """Render unsaved content (an editor's live preview) exactly as a saved version would render."""
    kind, messages, text = normalize_content(content)
    schema = _check_schema(input_schema, "input")
    parts = _compile_all(kind, messages, text, "<prompt>")
    variables = _with_defaults(schema, variables or {})
    rendered = _render_parts(pool, kind, parts, variables, "<unsaved>", limits, schema)
    return Rendered(None, None, rendered, rendered[0]["content"] if kind == "text" else None, variables)


def render_template(pool: DB | None, template_version: TemplateVersion, variables: Mapping[str, Any] | None = None, *,
                    label: str | None = None, limits: RenderLimits = DEFAULT_LIMITS) -> Rendered:
    """Render one version: defaults from the input schema, every missing variable named, schema checked."""
    tv = template_version
    parts = _compile_all(tv.kind, tv.messages, tv.text, tv.ref)
    variables = _with_defaults(tv.input_schema, variables or {})
    rendered = _render_parts(pool, tv.kind, parts, variables, tv.ref, limits, tv.input_schema)
    return Rendered(tv, label, rendered, rendered[0]["content"] if tv.kind == "text" else None, variables)


def render_template_by_name(pool: DB, name: str, variables: Mapping[str, Any] | None = None, *,
                            label: str | None = None, version: int | None = None,
                            limits: RenderLimits = DEFAULT_LIMITS) -> Rendered:
    """Render a template fetched by name (production, else latest), name + label, or name + version."""
    with _connection(pool) as conn:
        tv, used_label, active = _resolve(conn, name, label, version)
    if not active:
        raise TemplateInactive(f"template {name!r} is inactive; activate it to render it")
    return render_template(pool, tv, variables, label=used_label, limits=limits)


def required_variables(pool: DB | None, template_version: TemplateVersion) -> list[str]:
    """Variables a render of this version needs, including those of the templates it includes."""
    tv = template_version
    roots = [c for _, c in _compile_all(tv.kind, tv.messages, tv.text, tv.ref)]
    tree: dict[str, _Compiled] = {}
    if any(c.includes for c in roots):
        lazy = _LazyConnection(pool)
        try:
            tree = _resolve_includes(lazy, roots, tv.ref, DEFAULT_LIMITS)
        finally:
            lazy.close()
    all_vars: set[str] = set()
    seen: set[int] = set()
    for c in [*roots, *tree.values()]:
        if id(c) not in seen:
            seen.add(id(c))
            all_vars |= c.variables
    assigned = set().union(*(c.stored for c in roots)) if roots else set()
    return sorted(set(tv.variables) | (all_vars - assigned))


# ---------------------------------------------------------------------------------------------------------------
# Creating and updating


def _check_includes(conn: psycopg.Connection, name: str, prepared: _Prepared) -> None:
    if not prepared.includes:
        return
    parts = _compile_all(prepared.kind, prepared.messages, prepared.text, f"{name}@new")
    roots = [c for _, c in parts]
    _resolve_includes(lambda: conn, roots, f"{name}@new", DEFAULT_LIMITS, self_name=name,
                      self_compiled=roots if prepared.kind == "text" else ())


def _insert_version(conn: psycopg.Connection, template_id: int, name: str, version: int, p: _Prepared,
                    created_by: str, change_description: str, rollback_of: int | None = None,
                    git_commit: str | None = None, created_at: datetime | None = None) -> TemplateVersion:
    row = conn.execute(
        """INSERT INTO template_versions (template_id, version, kind, messages, text, params, input_schema,
               output_schema, variables, content_sha256, created_by, change_description, rollback_of, git_commit,
               created_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s, clock_timestamp()))
           RETURNING id, created_at""",
        (template_id, version, p.kind, Jsonb(p.messages) if p.messages is not None else None, p.text, Jsonb(p.params),
         Jsonb(p.input_schema) if p.input_schema is not None else None,
         Jsonb(p.output_schema) if p.output_schema is not None else None, p.variables, p.sha256, created_by or "",
         change_description or "", rollback_of, git_commit, created_at)).fetchone()
    return TemplateVersion(id=row[0], template_id=template_id, name=name, version=version, kind=p.kind,
                           messages=list(p.messages or []), text=p.text, params=p.params, input_schema=p.input_schema,
                           output_schema=p.output_schema, variables=p.variables, created_by=created_by or "",
                           created_at=row[1], change_description=change_description or "", content_sha256=p.sha256,
                           rollback_of=rollback_of, git_commit=git_commit)


def _clean_tags(tags: Iterable[str] | str | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = tags.split(",")
    items = list(tags) if isinstance(tags, Iterable) and not isinstance(tags, Mapping) else None
    if items is None or not all(isinstance(t, str) for t in items):
        raise TemplateError("tags must be a list of text (or one comma-separated text)")
    return list(dict.fromkeys(t.strip() for t in items if t and t.strip()))


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TemplateError(f"{what} must be text, got {type(value).__name__}")
    return value


def create_template(pool: DB, name: str, content: Content, *, description: str = "", category: str = "",
                    tags: Iterable[str] = (), owner: str = "", created_by: str = "", params: Any = None,
                    input_schema: Any = None, output_schema: Any = None, change_description: str = "",
                    git_commit: str | None = None) -> TemplateVersion:
    """Create a template with its version 1; raise TemplateExists when the name is taken."""
    check_name(name)
    prepared = _prepare(content, params, input_schema, output_schema, f"{name}@1")
    with _connection(pool) as conn:
        _check_includes(conn, name, prepared)
        try:
            with conn.transaction():
                template_id = conn.execute(
                    """INSERT INTO templates (name, description, category, tags, owner, latest_version)
                       VALUES (%s, %s, %s, %s, %s, 1) RETURNING id""",
                    (name, _text(description, "description"), _text(category, "category").strip(),
                     _clean_tags(tags), _text(owner, "owner") or _text(created_by, "created_by")),
                ).fetchone()[0]
                return _insert_version(conn, template_id, name, 1, prepared, created_by,
                                       change_description or "Created", git_commit=git_commit)
        except psycopg.errors.UniqueViolation:
            raise TemplateExists(f"a template named {name!r} already exists") from None


def _new_version(conn: psycopg.Connection, tmpl: Mapping[str, Any], prepared: _Prepared, created_by: str,
                 change_description: str, rollback_of: int | None = None,
                 git_commit: str | None = None) -> tuple[TemplateVersion, bool]:
    latest = _version_of(conn, tmpl["id"], tmpl["latest_version"], tmpl["name"])
    if prepared.sha256 == latest.content_sha256:
        return latest, False
    number = tmpl["latest_version"] + 1
    tv = _insert_version(conn, tmpl["id"], tmpl["name"], number, prepared, created_by, change_description,
                         rollback_of, git_commit)
    conn.execute("UPDATE templates SET latest_version = %s, updated_at = clock_timestamp() WHERE id = %s",
                 (number, tmpl["id"]))
    return tv, True


def update_template(pool: DB, name: str, content: Content, *, created_by: str = "", change_description: str = "",
                    params: Any = None, input_schema: Any = None, output_schema: Any = None,
                    base_version: int | None = None, git_commit: str | None = None) -> tuple[TemplateVersion, bool]:
    """Save content as the next version; (version, created). Content identical to the newest version creates
    nothing and returns that version with False. params/schemas left None are taken from base_version (default:
    the newest); pass {} to clear a schema."""
    kind, messages, text = normalize_content(content)
    _compile_all(kind, messages, text, f"{name}@new")  # syntax errors before taking the lock
    with _connection(pool) as conn:
        if params is None or input_schema is None or output_schema is None:
            tmpl = _template_row(conn, name)
            base = _version_of(conn, tmpl["id"], base_version or tmpl["latest_version"], name)
            params = base.params if params is None else params
            input_schema = base.input_schema if input_schema is None else input_schema
            output_schema = base.output_schema if output_schema is None else output_schema
        elif base_version is not None:
            tmpl = _template_row(conn, name)
            _version_of(conn, tmpl["id"], base_version, name)
        prepared = _prepare(content, params, input_schema, output_schema, f"{name}@new")
        _check_includes(conn, name, prepared)
        with conn.transaction():
            tmpl = _template_row(conn, name, lock=True)
            return _new_version(conn, tmpl, prepared, created_by, change_description)


def rollback_to_version(pool: DB, name: str, version: int, *, created_by: str = "",
                        change_description: str = "") -> tuple[TemplateVersion, bool]:
    """Create a new version with version N's content, recorded as a rollback of N; (version, created)."""
    with _connection(pool) as conn, conn.transaction():
        tmpl = _template_row(conn, name, lock=True)
        target = _version_of(conn, tmpl["id"], version, name)
        prepared = _prepare(target.content, target.params, target.input_schema, target.output_schema,
                            f"{name}@new")
        return _new_version(conn, tmpl, prepared, created_by, change_description or f"Rollback to version {version}",
                            rollback_of=version)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def get_template(pool: DB, name: str) -> Template:
    """A template's metadata and labels."""
    with _connection(pool) as conn:
        row = _template_row(conn, name)
        labels = dict(conn.execute(
            """SELECT l.label, v.version FROM template_labels l JOIN template_versions v ON v.id = l.version_id
               WHERE l.template_id = %s ORDER BY l.label""", (row["id"],)).fetchall())
    return _template(row, labels)


def _template(row: Mapping[str, Any], labels: Mapping[str, int]) -> Template:
    return Template(id=row["id"], name=row["name"], description=row["description"], category=row["category"],
                    tags=list(row["tags"]), owner=row["owner"], active=row["active"],
                    latest_version=row["latest_version"], created_at=row["created_at"], updated_at=row["updated_at"],
                    labels=dict(labels))


def get_template_by_name(pool: DB, name: str, *, label: str | None = None,
                         version: int | None = None) -> TemplateVersion:
    """A version by name alone (its production label if set, else latest), by name + label, or name + version."""
    with _connection(pool) as conn:
        return _resolve(conn, name, label, version)[0]


def get_version(pool: DB, version_id: int) -> TemplateVersion:
    """A version by its id (template_versions.id)."""
    with _connection(pool) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                          "ON t.id = v.template_id WHERE v.id = %s", (version_id,)).fetchone()
    if row is None:
        raise TemplateNotFound(f"no template version with id {version_id}")
    return _version(row)


def get_version_history(pool: DB, name: str) -> list[TemplateVersion]:
    """Every version of a template, newest first."""
    with _connection(pool) as conn:
        tmpl = _template_row(conn, name)
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                               "ON t.id = v.template_id WHERE v.template_id = %s ORDER BY v.version DESC",
                               (tmpl["id"],)).fetchall()
    return [_version(r) for r in rows]


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_templates(pool: DB, *, search: str = "", category: str | None = None, tag: str | None = None,
                   active: bool | None = None, limit: int = 50, offset: int = 0,
                   order: str = "updated") -> TemplatePage:
    """One page of templates matching the filters (search in name and description), with the total count."""
    if order not in ("updated", "name"):
        raise TemplateError("order must be 'updated' or 'name'")
    try:
        limit = max(1, min(int(limit), 1000))
        offset = max(0, int(offset))
    except (TypeError, ValueError):
        raise TemplateError(f"limit and offset must be whole numbers, got {limit!r} and {offset!r}") from None
    conditions, args = [], []
    search = (search or "").strip()
    if search:
        conditions.append("(t.name ILIKE %s OR t.description ILIKE %s)")
        args += [_like(search), _like(search)]
    if category:
        conditions.append("t.category = %s")
        args.append(category)
    if tag:
        conditions.append("t.tags @> ARRAY[%s]::text[]")
        args.append(tag)
    if active is not None:
        conditions.append("t.active = %s")
        args.append(bool(active))
    where = "WHERE " + " AND ".join(conditions) if conditions else ""
    order_by = "t.updated_at DESC, t.id DESC" if order == "updated" else "t.name"
    query = f"""
        WITH page AS (
            SELECT t.*, count(*) OVER () AS total FROM templates t {where}
            ORDER BY {order_by} LIMIT %s OFFSET %s)
        SELECT t.*, COALESCE((SELECT jsonb_object_agg(l.label, v.version) FROM template_labels l
                              JOIN template_versions v ON v.id = l.version_id WHERE l.template_id = t.id), '{{}}')
                    AS labels
        FROM page t ORDER BY {order_by}"""
    with _connection(pool) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, (*args, limit, offset)).fetchall()
        if rows:
            total = rows[0]["total"]
        else:
            total = cur.execute(f"SELECT count(*) AS n FROM templates t {where}", args).fetchone()["n"]
    items = [_template(r, dict(sorted(r["labels"].items()))) for r in rows]
    return TemplatePage(items, total, limit, offset)


def list_categories(pool: DB) -> list[str]:
    """Every category in use, sorted."""
    with _connection(pool) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT category FROM templates WHERE category <> '' ORDER BY 1")]


def list_tags(pool: DB) -> list[str]:
    """Every tag in use, sorted."""
    with _connection(pool) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT unnest(tags) FROM templates ORDER BY 1")]


def template_names(pool: DB) -> list[str]:
    """Every template name, sorted."""
    with _connection(pool) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM templates ORDER BY name")]


# ---------------------------------------------------------------------------------------------------------------
# Labels


def set_label(pool: DB, name: str, label: str, version: int, *, moved_by: str = "") -> bool:
    """Point label at version (recording the move); False when it already pointed there."""
    check_label(label)
    with _connection(pool) as conn, conn.transaction():
        tmpl = _template_row(conn, name, lock=True)
        target = _version_of(conn, tmpl["id"], version, name)
        current = conn.execute(
            """SELECT v.version FROM template_labels l JOIN template_versions v ON v.id = l.version_id
               WHERE l.template_id = %s AND l.label = %s""", (tmpl["id"], label)).fetchone()
        if current is not None and current[0] == version:
            return False
        conn.execute(
            """INSERT INTO template_labels (template_id, label, version_id, moved_by) VALUES (%s, %s, %s, %s)
               ON CONFLICT (template_id, label) DO UPDATE
               SET version_id = EXCLUDED.version_id, moved_by = EXCLUDED.moved_by, moved_at = clock_timestamp()""",
            (tmpl["id"], label, target.id, moved_by or ""))
        conn.execute(
            """INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by)
               VALUES (%s, %s, %s, %s, %s)""",
            (tmpl["id"], label, current[0] if current else None, version, moved_by or ""))
        conn.execute("UPDATE templates SET updated_at = clock_timestamp() WHERE id = %s", (tmpl["id"],))
    return True


def remove_label(pool: DB, name: str, label: str, *, moved_by: str = "") -> bool:
    """Remove a label (recording it); False when the template had no such label."""
    check_label(label)
    with _connection(pool) as conn, conn.transaction():
        tmpl = _template_row(conn, name, lock=True)
        current = conn.execute(
            """DELETE FROM template_labels l USING template_versions v
               WHERE l.template_id = %s AND l.label = %s AND v.id = l.version_id RETURNING v.version""",
            (tmpl["id"], label)).fetchone()
        if current is None:
            return False
        conn.execute(
            """INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by)
               VALUES (%s, %s, %s, NULL, %s)""", (tmpl["id"], label, current[0], moved_by or ""))
        conn.execute("UPDATE templates SET updated_at = clock_timestamp() WHERE id = %s", (tmpl["id"],))
    return True


def get_labels(pool: DB, name: str) -> dict[str, int]:
    """Every label of a template (label -> version), `latest` included."""
    tmpl = get_template(pool, name)
    return {**tmpl.labels, "latest": tmpl.latest_version}


def get_label_history(pool: DB, name: str, label: str | None = None) -> list[LabelEvent]:
    """Every recorded label move of a template (optionally of one label), newest first."""
    with _connection(pool) as conn:
        tmpl = _template_row(conn, name)
        with conn.cursor(row_factory=class_row(LabelEvent)) as cur:
            return cur.execute(
                """SELECT id, template_id, label, from_version, to_version, moved_by, moved_at
                   FROM template_label_events WHERE template_id = %s AND (%s::text IS NULL OR label = %s)
                   ORDER BY id DESC""", (tmpl["id"], label, label)).fetchall()


# ---------------------------------------------------------------------------------------------------------------
# Metadata, activation, duplication


def set_active(pool: DB, name: str, active: bool) -> bool:
    """Activate or deactivate a template; False when it already was."""
    with _connection(pool) as conn:
        row = conn.execute("UPDATE templates SET active = %s, updated_at = clock_timestamp() "
                           "WHERE name = %s AND active <> %s RETURNING id", (active, name, active)).fetchone()
        if row is None:
            _template_row(conn, name)
            return False
    return True


def activate_template(pool: DB, name: str) -> bool:
    """Make a template active again; False when it already was."""
    return set_active(pool, name, True)


def deactivate_template(pool: DB, name: str) -> bool:
    """Retire a template (it stays in history but cannot be rendered by name); False when it already was."""
    return set_active(pool, name, False)


def update_metadata(pool: DB, name: str, *, description: str | None = None, category: str | None = None,
                    tags: Iterable[str] | str | None = None, owner: str | None = None) -> Template:
    """Change description, category, tags or owner (not versioned); return the template."""
    with _connection(pool) as conn:
        row = conn.execute(
            """UPDATE templates SET description = COALESCE(%s, description), category = COALESCE(%s, category),
                   tags = COALESCE(%s, tags), owner = COALESCE(%s, owner), updated_at = clock_timestamp()
               WHERE name = %s RETURNING id""",
            (None if description is None else _text(description, "description"),
             None if category is None else _text(category, "category").strip(),
             _clean_tags(tags) if tags is not None else None, None if owner is None else _text(owner, "owner"),
             name)).fetchone()
        if row is None:
            raise TemplateNotFound(f"no template named {name!r}")
        return get_template(conn, name)


def duplicate_template(pool: DB, name: str, new_name: str, *, version: int | None = None,
                       created_by: str = "") -> TemplateVersion:
    """A new template whose version 1 is a copy of name's version (default: latest), metadata included."""
    check_name(new_name)
    with _connection(pool) as conn:
        tmpl = get_template(conn, name)
        source = _version_of(conn, tmpl.id, version or tmpl.latest_version, name)
        content: Content = source.content
        if source.kind == "text":
            content = source.text or ""
        return create_template(conn, new_name, content, description=tmpl.description, category=tmpl.category,
                               tags=tmpl.tags, owner=created_by or tmpl.owner, created_by=created_by,
                               params=source.params, input_schema=source.input_schema,
                               output_schema=source.output_schema,
                               change_description=f"Duplicated from {source.ref}")


# ---------------------------------------------------------------------------------------------------------------
# Diff


def version_document(template_version: TemplateVersion) -> str:
    """A version as readable text (messages, parameters, schemas), the input of diffs."""
    tv = template_version
    lines: list[str] = []
    if tv.kind == "text":
        lines += ["[text]", *(tv.text or "").splitlines()]
    else:
        for m in tv.messages:
            lines += [f"[{m['role']}]", *m["content"].splitlines()]
    for title, value in (("params", tv.params or None), ("input schema", tv.input_schema),
                         ("output schema", tv.output_schema)):
        if value:
            lines += [f"[{title}]", *json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()]
    return "\n".join(lines) + "\n"


def diff_documents(left: str, right: str, left_title: str = "a", right_title: str = "b",
                   context: int = 3) -> tuple[str, list[DiffRow]]:
    """(unified diff, side-by-side rows) of two texts."""
    a, b = left.splitlines(), right.splitlines()
    unified = "\n".join(difflib.unified_diff(a, b, left_title, right_title, n=context, lineterm=""))
    rows: list[DiffRow] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            rows += [DiffRow("equal", i + 1, a[i], j + 1, b[j]) for i, j in zip(range(i1, i2), range(j1, j2))]
        else:
            for k in range(max(i2 - i1, j2 - j1)):
                li, rj = i1 + k, j1 + k
                rows.append(DiffRow(tag if li < i2 and rj < j2 else ("delete" if li < i2 else "insert"),
                                    li + 1 if li < i2 else None, a[li] if li < i2 else "",
                                    rj + 1 if rj < j2 else None, b[rj] if rj < j2 else ""))
    return unified, rows


def diff_versions(pool: DB, name: str, from_version: int, to_version: int, *, context: int = 3) -> VersionDiff:
    """Unified and side-by-side differences between two versions of a template."""
    with _connection(pool) as conn:
        tmpl = _template_row(conn, name)
        left = _version_of(conn, tmpl["id"], from_version, name)
        right = _version_of(conn, tmpl["id"], to_version, name)
    unified, rows = diff_documents(version_document(left), version_document(right), left.ref, right.ref, context)
    return VersionDiff(name, from_version, to_version, unified, rows)


# ---------------------------------------------------------------------------------------------------------------
# Export and import


def _iso(value: datetime) -> str:
    return value.isoformat()


def export_templates(pool: DB, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Templates (default: all) with every version, label and label move, as plain data."""
    with _connection(pool) as conn, conn.cursor(row_factory=dict_row) as cur:
        wanted = sorted(set(names)) if names is not None else None
        rows = cur.execute("SELECT * FROM templates WHERE (%s::text[] IS NULL OR name = ANY(%s)) ORDER BY name",
                           (wanted, wanted)).fetchall()
        if wanted is not None:
            unknown = sorted(set(wanted) - {r["name"] for r in rows})
            if unknown:
                raise TemplateNotFound(f"no template named {unknown[0]!r}")
        out = []
        for t in rows:
            versions = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                                   "ON t.id = v.template_id WHERE v.template_id = %s ORDER BY v.version",
                                   (t["id"],)).fetchall()
            labels = cur.execute(
                """SELECT l.label, v.version, l.moved_by, l.moved_at FROM template_labels l
                   JOIN template_versions v ON v.id = l.version_id WHERE l.template_id = %s ORDER BY l.label""",
                (t["id"],)).fetchall()
            events = cur.execute(
                """SELECT label, from_version, to_version, moved_by, moved_at FROM template_label_events
                   WHERE template_id = %s ORDER BY id""", (t["id"],)).fetchall()
            out.append({
                "name": t["name"], "description": t["description"], "category": t["category"],
                "tags": list(t["tags"]), "owner": t["owner"], "active": t["active"],
                "created_at": _iso(t["created_at"]), "updated_at": _iso(t["updated_at"]),
                "versions": [{
                    "version": v["version"], "kind": v["kind"],
                    **({"messages": v["messages"]} if v["kind"] == "chat" else {"text": v["text"]}),
                    "params": v["params"], "input_schema": v["input_schema"], "output_schema": v["output_schema"],
                    "created_by": v["created_by"], "created_at": _iso(v["created_at"]),
                    "change_description": v["change_description"], "content_sha256": v["content_sha256"],
                    "rollback_of": v["rollback_of"], "git_commit": v["git_commit"],
                } for v in versions],
                "labels": {l["label"]: {"version": l["version"], "moved_by": l["moved_by"],
                                        "moved_at": _iso(l["moved_at"])} for l in labels},
                "label_history": [{**e, "moved_at": _iso(e["moved_at"])} for e in events],
            })
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "templates": out}


def dump_export(data: Mapping[str, Any], fmt: str = "yaml") -> str:
    """Serialise export data as YAML or JSON text."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt in ("yaml", "yml"):
        import yaml

        return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=120)
    raise TemplateError(f"unknown export format {fmt!r}: use yaml or json")


def load_export(text: str, fmt: str = "yaml") -> dict[str, Any]:
    """Parse export text (YAML or JSON)."""
    try:
        if fmt == "json":
            data = json.loads(text)
        elif fmt in ("yaml", "yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise TemplateError(f"unknown export format {fmt!r}: use yaml or json")
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, TemplateError):
            raise
        raise TemplateError(f"not valid {fmt.upper()}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # yaml.YAMLError
        raise TemplateError(f"not valid {fmt.upper()}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise TemplateError(f"not a PromptDev templates export (expected format: {EXPORT_FORMAT})")
    if data.get("format_version") != EXPORT_FORMAT_VERSION:
        raise TemplateError(f"unsupported export format version {data.get('format_version')!r}")
    if not isinstance(data.get("templates"), list):
        raise TemplateError("export has no 'templates' list")
    return data


def format_for_path(path: str | Path) -> str:
    """'json' for .json files, else 'yaml'."""
    return "json" if str(path).lower().endswith(".json") else "yaml"


def write_export(path: str | Path, text: str) -> None:
    """Write export text to path whole or not at all (a temporary file renamed over it); TemplateError on failure."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        raise TemplateError(f"cannot write {path}: {exc.strerror or exc}") from None


def export_to_file(pool: DB, path: str | Path, names: Iterable[str] | None = None, fmt: str | None = None) -> int:
    """Write an export file (format from the extension unless given); return the number of templates."""
    data = export_templates(pool, names)
    write_export(path, dump_export(data, fmt or format_for_path(path)))
    return len(data["templates"])


def import_from_file(pool: DB, path: str | Path, *, imported_by: str = "", fmt: str | None = None) -> ImportReport:
    """Import an export file; see import_templates."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read {path}: {exc.strerror or exc}") from None
    return import_templates(pool, load_export(text, fmt or format_for_path(path)), imported_by=imported_by)


def _ts(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise TemplateError(f"{where}: invalid timestamp {value!r}") from None


def _imported_versions(item: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], _Prepared]]:
    name = item["name"]
    versions = item.get("versions") or []
    if not versions:
        raise TemplateError(f"{name}: no versions")
    out = []
    for expected, v in enumerate(versions, 1):
        if not isinstance(v, Mapping) or v.get("version") != expected:
            raise TemplateError(f"{name}: versions must be numbered 1, 2, 3 … in order (expected {expected})")
        content = v.get("messages") if v.get("kind") == "chat" else v.get("text")
        try:
            prepared = _prepare(content, v.get("params"), v.get("input_schema"), v.get("output_schema"),
                                f"{name}@{expected}")
        except TemplateError as exc:
            raise TemplateError(f"{name} version {expected}: {exc}") from None
        if v.get("content_sha256") and v["content_sha256"] != prepared.sha256:
            raise TemplateError(f"{name} version {expected}: content does not match its content_sha256")
        out.append((v, prepared))
    return out


def import_templates(pool: DB, data: Mapping[str, Any], *, imported_by: str = "") -> ImportReport:
    """Import export data in one transaction. New templates arrive with their full history, labels and label
    moves as recorded. Existing ones are never rewritten: versions beyond theirs are appended when their history
    is a prefix of the file's (and labels moved to match); when histories diverged, the file's unknown contents
    are appended as new versions."""
    created, unchanged = [], []
    extended: dict[str, int] = {}
    diverged: dict[str, int] = {}
    labels_moved = 0
    items = data.get("templates") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise TemplateError("export data has no 'templates' list")
    current = "?"
    try:
        with _connection(pool) as conn, conn.transaction():
            for item in items:
                if not isinstance(item, Mapping) or "name" not in item:
                    raise TemplateError("every template in the file needs a name")
                name = check_name(item["name"])
                current = name
                versions = _imported_versions(item)
                exists = conn.execute("SELECT id FROM templates WHERE name = %s FOR UPDATE", (name,)).fetchone()
                if exists is None:
                    _import_new(conn, item, versions)
                    created.append(name)
                    continue
                tmpl = _template_row(conn, name, lock=True)
                have = dict(conn.execute(
                    "SELECT version, content_sha256 FROM template_versions WHERE template_id = %s",
                    (tmpl["id"],)).fetchall())
                prefix = all(have.get(v["version"]) == p.sha256 for v, p in versions[:len(have)]) and \
                    len(versions) >= len(have)
                if prefix:
                    added = 0
                    for v, p in versions[len(have):]:
                        _insert_version(conn, tmpl["id"], name, v["version"], p, v.get("created_by") or "",
                                        v.get("change_description") or "", v.get("rollback_of"), v.get("git_commit"),
                                        _ts(v.get("created_at"), f"{name} version {v['version']}")
                                        if v.get("created_at") else None)
                        added += 1
                    if added:
                        conn.execute("UPDATE templates SET latest_version = %s, updated_at = clock_timestamp() "
                                     "WHERE id = %s", (len(versions), tmpl["id"]))
                        extended[name] = added
                    for label, spec in (item.get("labels") or {}).items():
                        target = spec["version"] if isinstance(spec, Mapping) else spec
                        if set_label(conn, name, label, int(target), moved_by=imported_by or "import"):
                            labels_moved += 1
                    if not added:
                        unchanged.append(name)
                else:
                    known = set(have.values())
                    appended = 0
                    for v, p in versions:
                        if p.sha256 in known:
                            continue
                        tmpl = _template_row(conn, name, lock=True)
                        desc = (v.get("change_description") or "").strip()
                        _new_version(conn, tmpl, p, v.get("created_by") or imported_by or "",
                                     f"{desc + ' ' if desc else ''}(imported: was version {v['version']})")
                        known.add(p.sha256)
                        appended += 1
                    if appended:
                        diverged[name] = appended
                    else:
                        unchanged.append(name)
    except TemplateError as exc:
        if current != "?" and not str(exc).startswith(current):
            exc.args = (f"{current}: {exc}",)
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:  # a malformed file
        what = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else \
            (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TemplateError(f"{current}: malformed export data: {what}") from None
    return ImportReport(created, extended, unchanged, diverged, labels_moved)


def _import_new(conn: psycopg.Connection, item: Mapping[str, Any],
                versions: list[tuple[Mapping[str, Any], _Prepared]]) -> None:
    name = item["name"]
    now = datetime.now().astimezone()
    created_at = _ts(item["created_at"], name) if item.get("created_at") else now
    updated_at = _ts(item["updated_at"], name) if item.get("updated_at") else now
    template_id = conn.execute(
        """INSERT INTO templates (name, description, category, tags, owner, active, latest_version, created_at,
               updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (name, _text(item.get("description"), "description"), _text(item.get("category"), "category"),
         _clean_tags(item.get("tags")), _text(item.get("owner"), "owner"), bool(item.get("active", True)),
         len(versions), created_at, updated_at),
    ).fetchone()[0]
    ids = {}
    for v, p in versions:
        tv = _insert_version(conn, template_id, name, v["version"], p, v.get("created_by") or "",
                             v.get("change_description") or "", v.get("rollback_of"), v.get("git_commit"),
                             _ts(v["created_at"], name) if v.get("created_at") else None)
        ids[tv.version] = tv.id
    for label, spec in (item.get("labels") or {}).items():
        check_label(label)
        spec = spec if isinstance(spec, Mapping) else {"version": spec}
        if spec.get("version") not in ids:
            raise TemplateError(f"{name}: label {label!r} points at unknown version {spec.get('version')!r}")
        conn.execute("""INSERT INTO template_labels (template_id, label, version_id, moved_by, moved_at)
                        VALUES (%s, %s, %s, %s, COALESCE(%s, clock_timestamp()))""",
                     (template_id, label, ids[spec["version"]], spec.get("moved_by") or "",
                      _ts(spec["moved_at"], name) if spec.get("moved_at") else None))
    for e in item.get("label_history") or []:
        conn.execute("""INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by,
                            moved_at) VALUES (%s, %s, %s, %s, %s, COALESCE(%s, clock_timestamp()))""",
                     (template_id, e["label"], e.get("from_version"), e.get("to_version"), e.get("moved_by") or "",
                      _ts(e["moved_at"], name) if e.get("moved_at") else None))


# ---------------------------------------------------------------------------------------------------------------
# Prompts kept in application code


def git_commit_of(path: str | Path) -> str | None:
    """HEAD commit of the git repository containing path, or None outside a repository."""
    directory = Path(path)
    if not directory.is_dir():
        directory = directory.parent
    try:
        result = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def register_code_prompts(pool: DB, prompts: Mapping[str, Any], *, created_by: str = "code", category: str = "code",
                          git_commit: str | None = None, caller_path: str | Path | None = None
                          ) -> dict[str, tuple[TemplateVersion, bool]]:
    """Track prompts kept in code: {name: content or {content, params, input_schema, output_schema, description,
    tags}}. Creates each template the first time and a new version only when its content hash changes, recording
    the git commit of the caller's repository when there is one. Returns {name: (version, created)}."""
    if caller_path is None:
        caller_path = sys._getframe(1).f_code.co_filename
    commit = git_commit or git_commit_of(caller_path)
    where = Path(caller_path).name
    if not isinstance(prompts, Mapping):
        raise TemplateError("prompts must be a mapping of template names to contents")
    prepared: dict[str, tuple[Mapping[str, Any], _Prepared]] = {}
    for name, spec in prompts.items():  # everything is checked before anything is written
        check_name(name)
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"content", "params", "input_schema", "output_schema", "description", "tags"}
            if unknown:
                raise TemplateError(f"{name}: unknown key(s) {', '.join(sorted(unknown))}")
            content = spec.get("content")
        else:
            spec, content = {}, spec
        try:
            prepared[name] = (spec, _prepare(content, spec.get("params"), spec.get("input_schema"),
                                             spec.get("output_schema"), f"{name}@new"))
        except TemplateError as exc:
            exc.args = (f"{name}: {exc}",)
            raise
    change = f"Registered from code ({where}{' @ ' + commit[:12] if commit else ''})"
    results: dict[str, tuple[TemplateVersion, bool]] = {}
    with _connection(pool) as conn, conn.transaction():  # all or nothing; names in order, so no deadlock
        for name in sorted(prepared):
            spec, p = prepared[name]
            row = conn.execute(
                """INSERT INTO templates (name, description, category, tags, owner, latest_version)
                   VALUES (%s, %s, %s, %s, %s, 1) ON CONFLICT (name) DO NOTHING RETURNING id""",
                (name, spec.get("description") or "", category or "", _clean_tags(spec.get("tags")),
                 created_by or "")).fetchone()
            if row is not None:
                results[name] = (_insert_version(conn, row[0], name, 1, p, created_by, change, git_commit=commit),
                                 True)
            else:
                tmpl = _template_row(conn, name, lock=True)
                results[name] = _new_version(conn, tmpl, p, created_by, change, git_commit=commit)
        for name in sorted(prepared):  # includes may point at prompts registered together
            _check_includes(conn, name, prepared[name][1])
    return {name: results[name] for name in prompts}
