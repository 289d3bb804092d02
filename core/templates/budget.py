"""The budget of one render and the size estimates checked against it, before anything big is built.

`_Budget` counts the steps, time, call depth and output of one render; the sandbox's hooks reach it through a
context variable. The estimates say what a value would weigh as text (`_weight`), and what `%`-formatting,
`str.format`, `join`, `replace`, `translate`, `expandtabs` and `wordwrap` would produce, without building it; each
refuses with `RenderLimitExceeded` past the limits. Whole numbers are bounded too: no operand, argument or result may
pass `max_int_bits`, and `int()` of text, `round()` and `sum()` are estimated before they run, because one
arithmetic operation on a huge number is a single C call that holds the interpreter lock (no time limit can stop
it). No database import: this is part of the sandbox.
"""

from __future__ import annotations

import _string
import contextvars
import math
import re
import string
import time
from collections import abc
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jinja2

from .errors import RenderLimitExceeded
from .types import RenderLimits


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


class _CompileTimeOnly(Exception):
    """Raised by guarded filters outside a render, so Jinja never folds them into constants at compile time."""


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise _CompileTimeOnly()
    return budget


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


# -- Numbers: refused before they are built ------------------------------------------------------------------------


def _too_big_number(budget: _Budget) -> RenderLimitExceeded:
    return RenderLimitExceeded(f"number too large: whole numbers are limited to {budget.limits.max_int_bits:,} bits "
                               f"(about {budget.limits.max_int_bits * 3 // 10:,} digits)")


def _check_int(budget: _Budget, value: Any) -> None:
    """Refuse a whole number wider than max_int_bits (operands, arguments and results alike)."""
    if isinstance(value, int) and value.bit_length() > budget.limits.max_int_bits:
        raise _too_big_number(budget)


def _check_ints(budget: _Budget, values: Iterable[Any]) -> None:
    for value in values:
        _check_int(budget, value)


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Operands of an arithmetic operator, and for `*` and `**` the size of the result, against max_int_bits."""
    _check_int(budget, left)
    _check_int(budget, right)
    max_bits = budget.limits.max_int_bits
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*" and ints and left.bit_length() + right.bit_length() > max_bits:
        raise _too_big_number(budget)
    if operator == "**":
        if ints and right > 0 and abs(left) > 1 and right * left.bit_length() > max_bits:
            raise _too_big_number(budget)
        numbers = isinstance(right, (int, float)) and isinstance(left, (int, float))
        if numbers and abs(right) > 1e6 and abs(left) > 1:
            raise _too_big_number(budget)


def _estimate_int_text(budget: _Budget, text: Any, base: Any) -> None:
    """`int(text, base)` (the `int` filter): a number of more than max_int_bits is refused before it is parsed (base 16
    is parsed in linear time into any size, base 10 in quadratic time up to Python's digit limit)."""
    if isinstance(text, (str, bytes, bytearray)):
        radix = base if isinstance(base, int) and 2 <= base <= 36 else 36  # base 0: the prefix decides; the worst
        if (len(text.strip()) - 1) * math.log2(radix) > budget.limits.max_int_bits:
            raise _too_big_number(budget)


MAX_ROUND_DIGITS = 400  # beyond a float's range: round() would only build a power of ten of that many digits


def _check_round(budget: _Budget, precision: Any) -> None:
    if isinstance(precision, int) and abs(precision) > MAX_ROUND_DIGITS:
        raise RenderLimitExceeded(f"round: a precision of more than {MAX_ROUND_DIGITS} digits is not allowed")


def _estimate_sum(budget: _Budget, items: Any, start: Any) -> None:
    """`sum(items, start)` of lists, tuples or text copies the growing result once per item (quadratic work in one C
    call): refuse it when that copying would pass max_value_chars."""
    if isinstance(start, (int, float, bool)) or not isinstance(items, abc.Collection):
        return
    limit = budget.limits.max_value_chars
    length = len(start) if isinstance(start, abc.Sized) else 0
    work = 0
    for item in items:
        length += len(item) if isinstance(item, abc.Sized) else 1
        work += length
        if work > limit:
            raise RenderLimitExceeded(f"sum: adding up these lists or texts would copy more than {limit:,} items")


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


class _Unknown:
    """A nested format field whose value the estimate cannot know (it names an attribute)."""


def _field_value(field: str, args: Sequence[Any], kwargs: Mapping[str, Any], auto: list[int]) -> Any:
    """What a format field names: the argument, then its items (`{0[w]}`); None when Python's own formatting will
    report a problem, _Unknown for an attribute (`{0.w}`). `auto` counts the automatically numbered fields."""
    try:
        head, rest = _string.formatter_field_name_split(field)
        if head == "":
            auto[0] += 1
            value = args[auto[0] - 1]
        else:
            value = args[head] if isinstance(head, int) else kwargs[head]
        for is_attribute, key in rest:
            if is_attribute or not isinstance(value, (Mapping, Sequence)):
                return _Unknown
            value = value[key]
        return value
    except Exception:  # Python's own formatting reports it
        return None


def _nested_spec(budget: _Budget, spec: str, args: Sequence[Any], kwargs: Mapping[str, Any], auto: list[int]
                 ) -> str | None:
    """A field's format spec as Python will apply it: each nested field (`{}`, `{w}`, `{0[1]}`, `{:9<9}`) replaced
    by its text, so a width written as text, or pieced together from small numbers, is seen whole. None when
    Python's own formatting will report a problem."""
    try:
        parts = list(_FORMATTER.parse(spec))
    except ValueError:
        return None
    limit = budget.limits.max_output_chars
    pieces = []
    for literal, field, inner, conversion in parts:
        pieces.append(literal)
        if field is None:
            continue
        value = _field_value(field, args, kwargs, auto)
        if value is _Unknown:
            raise RenderLimitExceeded("format: a width or precision taken from an attribute cannot be checked; "
                                      "pass it as an argument")
        for digits in re.findall(r"\d+", inner or ""):
            _size(budget, digits)
        if _weight(budget, value, limit) * (10 if conversion in ("r", "a") else 1) > limit:
            raise RenderLimitExceeded(f"format: a width or precision longer than {limit:,} characters")
        try:
            value = repr(value) if conversion == "r" else ascii(value) if conversion == "a" else \
                str(value) if conversion == "s" else value
            pieces.append(format(value, inner or ""))
        except Exception:  # Python's own formatting reports it
            return None
    return "".join(pieces)


def _estimate_brace(budget: _Budget, fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """`fmt.format(*args, **kwargs)`: every field's argument text and its widths and precisions added up, the
    spec read as Python will apply it (nested fields replaced by their text)."""
    limit = budget.limits.max_output_chars
    auto = [0]

    try:
        fields = list(_FORMATTER.parse(fmt))
    except ValueError:
        return
    total = 0
    for literal, field, spec, conversion in fields:
        total += len(literal)
        if field is None:
            continue
        value = _field_value(field, args, kwargs, auto)
        if value is _Unknown:  # an attribute of an argument: the argument as a whole
            value = _field_value(_FIELD_HEAD.match(field).group(0), args, kwargs, [auto[0] - 1])  # type: ignore
        total += _weight(budget, value, limit) * (4 if conversion in ("r", "a") else 1)
        if spec:
            applied = _nested_spec(budget, spec, args, kwargs, auto)
            if applied is None:
                return
            total += sum(_size(budget, digits) for digits in re.findall(r"\d+", applied))
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
    if isinstance(result, int):
        _check_int(budget, result)
    elif isinstance(result, (str, bytes, bytearray)):
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


def _estimate_json_indent(budget: _Budget, value: Any, indent: Any) -> None:
    """`tojson(indent=…)` writes every item and key on a line of its own, indented by its depth: that indentation
    is counted before the JSON is written (a list of 1,000 numbers with an indent of 999,999 is a gigabyte)."""
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if isinstance(indent, bool) or width <= 0:
        return
    limit = budget.limits.max_output_chars
    total = 0
    stack = [(value, 1)]
    while stack and total <= limit:  # every list or mapping adds at least one character per item: bounded by limit
        node, depth = stack.pop()
        children: Any = list(node.values()) if isinstance(node, Mapping) else \
            node if isinstance(node, (list, tuple)) else None
        if children is None:
            continue
        total += (len(children) + 1) * depth * width
        stack.extend((child, depth + 1) for child in children)
    budget.check_size(total, "indented JSON text")


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
