"""The sandbox: a Jinja2 environment whose compiled templates can neither reach outside nor run away.

Templates compile in an `ImmutableSandboxedEnvironment` rewritten so that every loop, `~`, list or dict literal,
`*args`, filter, binary operator and call passes a budget hook (see `budget`); undefined values are collected so one
error names every missing variable; includes are served only from references resolved before the render. Compiled
sources are cached by their text. `_run` renders one compiled source and turns whatever went wrong into one
`TemplateError` line. No database import: includes are resolved by the caller (`store`) and passed in.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import re
import sys
import threading
from collections import OrderedDict, abc
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from .budget import (
    _BUDGET,
    _Budget,
    _budget,
    _check_args,
    _check_binop,
    _check_built,
    _check_int,
    _check_ints,
    _check_result,
    _check_round,
    _check_text,
    _estimate_brace,
    _estimate_expandtabs,
    _estimate_int_text,
    _estimate_join,
    _estimate_json_indent,
    _estimate_percent,
    _estimate_replace,
    _estimate_sum,
    _estimate_translate,
    _estimate_wordwrap,
    _is_lazy,
    _materialize,
    _too_big_number,
    _too_big_value,
    _weight,
)
from .errors import (
    IncludeError,
    MissingVariables,
    RenderError,
    RenderLimitExceeded,
    SandboxViolation,
    TemplateError,
    TemplateSyntaxError,
)
from .types import DEFAULT_LIMITS, MAX_SOURCE_CHARS, REF_RE

_INCLUDES: contextvars.ContextVar[dict[str, "_Compiled"] | None] = contextvars.ContextVar(
    "promptdev_template_includes", default=None)


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
            problem = _plain(self._undefined_message)
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
        _check_ints(budget, args[skip - 1:])
        _check_ints(budget, kwargs.values())
        if name == "int":
            _estimate_int_text(budget, value, rest[1] if len(rest) > 1 else kwargs.get("base", 10))
        elif name == "round":
            _check_round(budget, rest[0] if rest else kwargs.get("precision", 0))
        elif name == "sum" and skip == 2:
            attribute = rest[0] if rest else kwargs.get("attribute")
            items = value
            if attribute is not None and isinstance(value, abc.Collection):
                getter = jinja2.filters.make_attrgetter(args[0], attribute)
                items = [getter(item) for item in value]
            _estimate_sum(budget, items, rest[1] if len(rest) > 1 else kwargs.get("start", 0))
        if name in _SIZING_FILTERS:
            _check_args(budget, rest, kwargs)
        if name in _TEXT_FILTERS:
            _check_text(budget, value)
        if name == "tojson":
            _estimate_json_indent(budget, value, rest[0] if rest else kwargs.get("indent"))
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
        try:
            result = func(*args, **kwargs)
        except OverflowError:  # float() of a big whole number, a float that became infinite
            raise _too_big_number(budget) from None
        _check_result(budget, result)
        return result

    return guarded


def _guard_test(func: Any) -> Any:
    """A test (`is divisibleby`, `is odd`, `is eq` …) counts as a step and takes no number wider than max_int_bits."""

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        _check_ints(budget, args)
        _check_ints(budget, kwargs.values())
        try:
            return func(*args, **kwargs)
        except OverflowError:
            raise _too_big_number(budget) from None

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
    _check_ints(budget, args)
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
        _check_int(budget, value)
        limit = budget.limits.max_output_chars
        if _weight(budget, value, limit) > limit:
            raise RenderLimitExceeded(f"the rendered prompt is longer than {limit:,} characters")
    return value


_STR_SIZING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _describe(obj: Any) -> str:
    """A callable named for a person: its name, never its repr (no addresses, no internals)."""
    name = getattr(obj, "__name__", None)
    return repr(name) if isinstance(name, str) and len(name) < 80 else f"a {type(obj).__name__!r} object"


def _check_number_method(budget: _Budget, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Methods of numbers that build something sized by an argument: `to_bytes(length)` and `from_bytes(data)`."""
    if method == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if isinstance(length, int):
            budget.check_size(length, "to_bytes: bytes")
    elif method == "from_bytes":
        data = args[0] if args else kwargs.get("bytes")
        if isinstance(data, abc.Sized) and len(data) * 8 > budget.limits.max_int_bits:
            raise _too_big_number(budget)


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with budgets: capped ranges, sizes, steps, time and call depth."""

    # Every arithmetic operator and unary sign: each is one step and takes no number wider than max_int_bits (and
    # none is folded into a constant at compile time).
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

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
        _check_binop(budget, operator, left, right)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple, bytes)) and isinstance(n, int) and not isinstance(n, bool):
                    budget.check_size(len(seq) * max(n, 0), "repeated text")
                    limit = budget.limits.max_value_chars
                    if isinstance(seq, (list, tuple)) and n > 1 and _weight(budget, seq, limit) * n > limit:
                        raise _too_big_value(limit)
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.check_size(len(left) + len(right), "joined text")
        elif operator == "%" and isinstance(left, str):
            _estimate_percent(budget, left, right)
        try:
            result = super().call_binop(context, operator, left, right)
        except OverflowError:
            raise _too_big_number(budget) from None
        _check_int(budget, result)  # a sum or difference may be one bit wider than its operands
        if operator in ("+", "*") and isinstance(result, (list, tuple)):
            _check_built(budget, result)
        return result

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        budget = _budget()
        budget.step()
        _check_int(budget, arg)
        return super().call_unop(context, operator, arg)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if getattr(__obj, "__self__", None) is _GUARDS:  # the hooks compiled in by _Transformer count themselves
            return __obj(*args)
        budget = _budget()
        budget.step()
        _check_ints(budget, args)
        _check_ints(budget, kwargs.values())
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"calling {_describe(__obj)} is not allowed")
        if not isinstance(__obj, (Macro, LoopContext)):
            target = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(target, "__self__", None)
            if owner is int or isinstance(owner, (int, float)):
                _check_number_method(budget, getattr(target, "__name__", ""), args, kwargs)
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
            try:
                result = super().call(__context, __obj, *args, **kwargs)
            except OverflowError:
                raise _too_big_number(budget) from None
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
_ENV.tests = {name: _guard_test(f) for name, f in _ENV.tests.items()}
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
    tokens: int = 0  # what compiling it cost, spent again from an allowance when it is served from the cache
    nodes: int = 0
    code_chars: int = 0


# What one template version (every message together) may cost to compile. Parsing and generating code are Python
# (other threads keep running), but Python's compile() of the generated module is one C call that holds the
# interpreter lock for about 1 µs per character of generated code: MAX_CODE_CHARS keeps that under ~0.25 s.
MAX_TOKENS = 20_000  # names, operators, literals and delimiters, counted by the lexer before anything is parsed
MAX_NODES = 5_000  # syntax tree nodes, counted after parsing, before code is generated
MAX_DEPTH = 200  # nesting of the syntax tree
MAX_CODE_CHARS = 200_000  # generated Python source, measured before Python compiles it

# The cache of compiled sources, sized by an estimate of the memory each entry holds (its source, and about three
# bytes per character of generated code for the code objects), not by a count of entries.
CACHE_BYTES = 64 * 1024 * 1024
_CACHE_ENTRIES = 4096
_cache_lock = threading.Lock()
_cache: OrderedDict[str, tuple[_Compiled | TemplateSyntaxError, int]] = OrderedDict()
_cache_used = 0


class _Allowance:
    """What is left to spend compiling one version: the limits are for all its messages together."""

    __slots__ = ("chars", "tokens", "nodes", "code_chars")

    def __init__(self) -> None:
        self.chars, self.tokens, self.nodes, self.code_chars = MAX_SOURCE_CHARS, MAX_TOKENS, MAX_NODES, MAX_CODE_CHARS

    def spend_chars(self, n: int) -> None:
        self.chars -= n
        if self.chars < 0:
            raise _too_large(f"the template is longer than {MAX_SOURCE_CHARS:,} characters")

    def spend_tokens(self, n: int) -> None:
        self.tokens -= n
        if self.tokens < 0:
            raise _too_large(f"the template has more than {MAX_TOKENS:,} tokens (names, operators, literals and "
                             f"delimiters); make it smaller or include parts of it by reference")

    def spend_nodes(self, n: int) -> None:
        self.nodes -= n
        if self.nodes < 0:
            raise _too_large(f"the template has more than {MAX_NODES:,} expressions, tags and text pieces; make it "
                             f"smaller or include parts of it by reference")

    def spend_code(self, n: int) -> None:
        self.code_chars -= n
        if self.code_chars < 0:
            raise _too_large("the template is too big to compile (it has too many expressions and tags); make it "
                             "smaller or include parts of it by reference")

    def spend(self, compiled: _Compiled, source: str) -> None:
        self.spend_chars(len(source))
        self.spend_tokens(compiled.tokens)
        self.spend_nodes(compiled.nodes)
        self.spend_code(compiled.code_chars)


def _syntax_message(detail: str, lineno: int | None, where: str = "") -> str:
    place = " ".join(x for x in (f"in {where}" if where else "", f"at line {lineno}" if lineno else "") if x)
    return f"syntax error{' ' + place if place else ''}: {detail}"


def _syntax_error(detail: str, lineno: int | None) -> TemplateSyntaxError:
    return TemplateSyntaxError(_syntax_message(detail, lineno), lineno=lineno, detail=detail)


class _TooLarge(Exception):
    """A source over what is left of an allowance; becomes a TemplateSyntaxError, and is not cached (it depends on
    what else the version holds)."""


def _too_large(detail: str) -> _TooLarge:
    return _TooLarge(detail)


def _cache_get(source: str) -> _Compiled | TemplateSyntaxError | None:
    with _cache_lock:
        hit = _cache.get(source)
        if hit is None:
            return None
        _cache.move_to_end(source)
        return hit[0]


def _cache_put(source: str, value: _Compiled | TemplateSyntaxError) -> None:
    global _cache_used
    code_chars = value.code_chars if isinstance(value, _Compiled) else 0
    weight = sys.getsizeof(source) + 3 * code_chars + 1024
    if weight > CACHE_BYTES // 4:
        return
    with _cache_lock:
        old = _cache.pop(source, None)
        if old is not None:
            _cache_used -= old[1]
        _cache[source] = (value, weight)
        _cache_used += weight
        while _cache and (_cache_used > CACHE_BYTES or len(_cache) > _CACHE_ENTRIES):
            _cache_used -= _cache.popitem(last=False)[1][1]


def _compile(source: str, name: str = "<prompt>", allowance: _Allowance | None = None) -> _Compiled:
    """Parse, check and compile source (cached by source); raise TemplateSyntaxError with the line number, also when
    the source would cost more than what is left of `allowance` (the limits above, for a lone source)."""
    allowance = allowance if allowance is not None else _Allowance()
    hit = _cache_get(source)
    if isinstance(hit, TemplateSyntaxError):
        raise TemplateSyntaxError(str(hit), lineno=hit.lineno, detail=hit.detail)
    try:
        if hit is not None:
            allowance.spend(hit, source)
            return hit
        allowance.spend_chars(len(source))
    except _TooLarge as exc:
        raise _syntax_error(str(exc), None) from None
    try:
        compiled = _build(source, name, allowance)
    except _TooLarge as exc:
        raise _syntax_error(str(exc), None) from None
    except Exception as exc:
        error = _compile_error(exc)
        _cache_put(source, error)  # a broken source is not parsed again on every render or rerun
        raise error from None
    _cache_put(source, compiled)
    return compiled


def _compile_error(exc: Exception) -> TemplateSyntaxError:
    """What went wrong compiling, as one line."""
    if isinstance(exc, TemplateSyntaxError):
        return exc
    if isinstance(exc, (RecursionError, MemoryError)):  # the parser and Python's compiler recurse on nesting
        return _syntax_error("the template is nested too deeply", None)
    if isinstance(exc, SyntaxError):  # Python's limits on nested blocks (e.g. 20 nested loops)
        detail = str(exc.msg or exc)
        if "nested" in detail or "indentation" in detail:
            return _syntax_error("the template is nested too deeply", None)
        return _syntax_error(f"the template cannot be compiled: {detail}", None)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "integer string conversion" in detail:
        detail = "a number in it is too long"
    return _syntax_error(f"the template cannot be compiled: {detail}", None)


def _walk(ast: nodes.Node) -> tuple[list[nodes.Node], int]:
    """Every node of a syntax tree (without recursion, which a deep tree would exhaust) and the tree's depth."""
    found: list[nodes.Node] = []
    stack = [(ast, 1)]
    depth = 0
    while stack:
        node, level = stack.pop()
        found.append(node)
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in node.iter_child_nodes())
    return found, depth


def _build(source: str, name: str, allowance: _Allowance) -> _Compiled:
    """Parse, analyse and compile source (no caching); jinja2 syntax errors become TemplateSyntaxError; a source that
    would cost more than the allowance is refused (_TooLarge) before the costly step it would overrun."""
    try:
        meaningful = (token for token in _ENV.lex(source, name=name) if token[1] != "whitespace")
        tokens = sum(1 for _ in itertools.islice(meaningful, allowance.tokens + 1))
        allowance.spend_tokens(tokens)
        ast = _ENV.parse(source, name=name)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc.message or "invalid template", exc.lineno) from None
    every, depth = _walk(ast)
    if depth > MAX_DEPTH:
        raise _syntax_error("the template is nested too deeply", None)
    allowance.spend_nodes(len(every))
    max_bits = DEFAULT_LIMITS.max_int_bits
    for node in every:
        if isinstance(node, nodes.Const) and (
                (isinstance(node.value, float) and not math.isfinite(node.value))
                or (isinstance(node.value, int) and node.value.bit_length() > max_bits)):
            raise _syntax_error("a number in the template is too large", node.lineno)
    includes: list[str] = []
    optional: set[str] = set()
    for node in every:
        if not isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            continue
        target = node.template
        if not (isinstance(target, nodes.Const) and isinstance(target.value, str)):
            raise _syntax_error('templates are included by a literal name such as {% include "other@production" %}',
                                node.lineno)
        ref = target.value
        if not REF_RE.fullmatch(ref):
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
        code = _ENV.compile(ast, name=name, filename=name, raw=True)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc.message or "invalid template", exc.lineno) from None
    allowance.spend_code(len(code))
    template = _ENV.template_class.from_code(_ENV, compile(code, name, "exec"), _ENV.make_globals(None))
    return _Compiled(template, tuple(includes), frozenset(optional), frozenset(variables), frozenset(stored),
                     frozenset(guarded), tokens, len(every), len(code))


def _sources(kind: str, messages: Sequence[Mapping[str, str]] | None, text: str | None) -> list[tuple[str, str]]:
    if kind == "text":
        return [("user", text or "")]
    return [(m["role"], m["content"]) for m in messages or ()]


def _where(kind: str, index: int, role: str) -> str:
    return f"message {index + 1} ({role})" if kind == "chat" else ""


def _compile_all(kind: str, messages: Any, text: Any, name: str) -> list[tuple[str, _Compiled]]:
    """Every message of a version compiled, under one allowance for them all."""
    compiled = []
    allowance = _Allowance()
    for i, (role, source) in enumerate(_sources(kind, messages, text)):
        try:
            compiled.append((role, _compile(source, name, allowance)))
        except TemplateSyntaxError as exc:
            where = _where(kind, i, role)
            raise TemplateSyntaxError(_syntax_message(exc.detail, exc.lineno, where), lineno=exc.lineno,
                                      message_index=i if kind == "chat" else None, role=role,
                                      detail=exc.detail) from None
    return compiled


_REPR = re.compile(r"<[^<>]{0,300}?(?: object| at 0x[0-9a-fA-F]+|built-in |function |method |class |module )"
                   r"[^<>]{0,300}>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
MAX_MESSAGE_CHARS = 300


def _plain(message: str) -> str:
    """An error's first line for a person: Python object reprs and memory addresses replaced, length bounded."""
    lines = message.strip().splitlines()
    line = _ADDRESS.sub("", _REPR.sub("<object>", lines[0] if lines else ""))
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 1] + "…"


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
            raise SandboxViolation(f"{prefix}blocked by the sandbox: {_plain(str(exc))}") from None
        if isinstance(exc, RecursionError):
            raise RenderLimitExceeded(f"{prefix}recursion too deep") from None
        if isinstance(exc, MemoryError):
            raise RenderLimitExceeded(f"{prefix}out of memory") from None
        if isinstance(exc, OverflowError) or (isinstance(exc, ValueError) and "integer string conversion" in str(exc)):
            raise RenderLimitExceeded(f"{prefix}number too large") from None
        if isinstance(exc, jinja2.TemplateNotFound):
            raise IncludeError(f"{prefix}template {_plain(str(exc.name))} could not be included") from None
        message = exc.message if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
        raise RenderError(f"{prefix}{_plain(str(message)) if message else type(exc).__name__}") from None
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
