"""Regular expressions written by users, run with a time bound: guardrail rules, the `regex` evaluator, and the
`pattern` and `patternProperties` of JSON Schemas (templates' input and output schemas, the JSON evaluators).

A pattern such as `(a+)+$` or `(a|aa)+$` backtracks exponentially: on a 28-character text Python's `re` ran for
a minute, and since one match is one C call that holds the interpreter lock, every other thread of the process
stalled with it. Patterns here run on the `regex` package instead, which takes a timeout and releases the lock
while it matches a `str` (measured on 2 cores: a match stopped by its timeout never stalled a ticker thread more
than 25 ms; `re` stalled it for the whole match). Google's RE2 cannot backtrack at all, but it refuses
lookarounds and backreferences that existing rules and JSON Schemas use, and it holds the lock.

`regex` measures its timeout in CPU time of the process (C `clock()`), so on a busy machine a match may take a
few times its timeout in wall time: the timeouts here are small. A match that times out raises `RegexTooSlow`;
callers decide what that means (a guardrail treats it as a hit, an evaluator as a failed check, a schema as a
validation error). `check_pattern` is what a save runs: it compiles the pattern and tries it on hostile texts
built from its own characters (`self_test`), refusing one that is too slow on any of them.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Iterator, Mapping

import jsonschema
import regex
from jsonschema import ValidationError

from core.errors import InvalidInput

MAX_PATTERN_CHARS = 1000
MATCH_SECONDS = 0.25  # CPU seconds one search (or one scan for every match) may take
SELF_TEST_SECONDS = 3.0  # seconds (CPU and wall) the hostile texts of check_pattern may take together
SELF_TEST_CHARS = 2_000  # each hostile text: long enough for cubic and worse backtracking, while a
# quadratic pattern passes (on a whole chat message it then meets its timeout)


class RegexError(InvalidInput):
    """A regular expression cannot be used: it does not compile, is too long, or is too slow on some texts."""


class RegexTooSlow(RegexError):
    """A match took longer than its time bound."""


def _show(pattern: str, limit: int = 60) -> str:
    return repr(pattern if len(pattern) <= limit else pattern[:limit - 1] + "…")


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str, flags: int) -> regex.Pattern[str]:
    return regex.compile(pattern, flags | regex.VERSION0)


MAX_REPEATS = 10_000  # characters a pattern's counted repetitions add once expanded ({m} compiles into m copies)
_COUNT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_BRACED_ESCAPES = frozenset("pPNxuUgk")  # \p{L}, \N{name}, \x{41}, \g<1>: their braces are not counts


def _repeats(pattern: str) -> int:
    """How many atoms the counted repetitions (`{m}`, `{m,}`, `{m,n}`) of a pattern add when it is compiled: the
    `regex` engine lays out the m required copies of what is repeated, nested counts multiplying, so `a{4000000}`
    (44 characters) compiles into a gigabyte in one call that holds the interpreter lock. Read in one linear pass,
    before compiling; an estimate that never counts less than the engine lays out (alternatives add up)."""
    frames: list[list[int]] = [[0, 0]]  # per open group: [weight so far, weight of the last atom]
    extra = i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        frame = frames[-1]
        if c == "\\":
            j = i + 2
            if j - 1 < n and pattern[j - 1] in _BRACED_ESCAPES and j < n and pattern[j] in "{<":
                end = pattern.find("}" if pattern[j] == "{" else ">", j)
                j = n if end < 0 else end + 1
            frame[0] += 1
            frame[1] = 1
            i = j
            continue
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            frame[0] += 1
            frame[1] = 1
            i = j + 1
            continue
        if c == "(":
            frames.append([0, 0])
        elif c == ")" and len(frames) > 1:
            inner = frames.pop()[0]
            frames[-1][0] += inner
            frames[-1][1] = inner
        elif c == "{" and (count := _COUNT.match(pattern, i)) is not None and count.group(1):
            times = int(count.group(1)) if len(count.group(1)) <= 12 else 10 ** 12
            added = frame[1] * max(times - 1, 0)
            frame[0] += added
            frame[1] += added
            extra += added
            if extra > MAX_REPEATS * 10:
                return extra
            i = count.end()
            continue
        elif c in "|*+?":
            frame[1] = 0
        else:
            frame[0] += 1
            frame[1] = 1
        i += 1
    return extra


def compile(pattern: str, what: str = "regular expression", flags: int = 0,  # noqa: A001
            max_chars: int | None = MAX_PATTERN_CHARS) -> regex.Pattern[str]:
    """The compiled pattern (cached); RegexError naming the problem when it does not compile, is longer than
    max_chars (a pattern a user wrote or an evaluator rendered; None for one built here, e.g. from a words list,
    whose parts are capped where they are saved) or repeats too much."""
    if not isinstance(pattern, str):
        raise RegexError(f"the {what} must be text, got {type(pattern).__name__}")
    if max_chars is not None and len(pattern) > max_chars:
        raise RegexError(f"the {what} is longer than {max_chars:,} characters")
    if _repeats(pattern) > MAX_REPEATS:
        raise RegexError(f"the {what} {_show(pattern)} repeats too much: its counted repetitions ({{m}}) would add "
                         f"more than {MAX_REPEATS:,} characters to it")
    try:
        return _compiled(pattern, flags)
    except regex.error as exc:
        problem: Any = exc
        try:  # Python's own wording, which people know, when `re` refuses the pattern too (compiling never matches)
            re.compile(pattern, flags)
        except re.error as familiar:
            problem = familiar
        except Exception:  # noqa: BLE001 - regex's wording then
            pass
        where = f" at position {problem.pos}" if getattr(problem, "pos", None) is not None else ""
        raise RegexError(f"invalid {what} {_show(pattern)}: {getattr(problem, 'msg', problem)}{where}") from None
    except (OverflowError, RecursionError, MemoryError, ValueError) as exc:
        raise RegexError(f"invalid {what} {_show(pattern)}: {type(exc).__name__}") from None


def _too_slow(pattern: str, what: str) -> RegexTooSlow:
    return RegexTooSlow(f"the {what} {_show(pattern)} took too long on this text (it backtracks too much)")


def search(pattern: str | regex.Pattern[str], text: str, *, timeout: float = MATCH_SECONDS, flags: int = 0,
           what: str = "regular expression") -> regex.Match[str] | None:
    """The first match of pattern in text, like re.search, within timeout CPU seconds (else RegexTooSlow)."""
    compiled = pattern if isinstance(pattern, regex.Pattern) else compile(pattern, what, flags)
    try:
        return compiled.search(text, timeout=max(timeout, 0.001))
    except TimeoutError:
        raise _too_slow(compiled.pattern, what) from None


def spans(pattern: str | regex.Pattern[str], text: str, *, timeout: float = MATCH_SECONDS, flags: int = 0,
          what: str = "regular expression") -> list[tuple[int, int]]:
    """Spans of every non-empty match, like re.finditer, all within timeout CPU seconds (else RegexTooSlow)."""
    compiled = pattern if isinstance(pattern, regex.Pattern) else compile(pattern, what, flags)
    try:
        return [m.span() for m in compiled.finditer(text, timeout=max(timeout, 0.001)) if m.end() > m.start()]
    except TimeoutError:
        raise _too_slow(compiled.pattern, what) from None


class Clock:
    """Time left of a budget in both CPU time of the process (what `regex` measures) and wall time (what a
    waiting user sees: on a busy machine the process gets less than a core, and CPU time alone would let a
    budget last several times longer)."""

    __slots__ = ("seconds", "cpu", "wall")

    def __init__(self, seconds: float):
        self.seconds, self.cpu, self.wall = seconds, time.process_time(), time.monotonic()

    def left(self) -> float:
        return self.seconds - max(time.process_time() - self.cpu, time.monotonic() - self.wall)


# -- the self-test of a pattern before it is saved -------------------------------------------------------------------

_SYNTAX = set("\\()[]{}?*+|^$.")
_TAILS = ("\x00", "!", "")  # what ends each run: a character few patterns accept forces every alternative to be tried


_CLASSES = {"d": "1", "D": "a", "w": "a", "W": " ", "s": " ", "S": "a", "b": "", "B": "", "A": "", "Z": ""}


def _own_chars(pattern: str) -> Iterator[str]:
    """The characters a pattern names: literals, escaped punctuation, and one member of each class escape."""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            i += 2
            if nxt in _CLASSES:
                if _CLASSES[nxt]:
                    yield _CLASSES[nxt]
            elif not nxt.isalnum():
                yield nxt
            continue
        if c not in _SYNTAX and c.isprintable():
            yield c
        i += 1


def _probes(pattern: str, length: int) -> Iterator[tuple[str, str]]:
    """(description, text) of hostile texts for a pattern: long runs of each character it names (and of a letter, a
    digit, a space …), alternating pairs of them, and all of them in turn — each ended by a character that makes a
    match fail late, where backtracking explodes."""
    own = list(dict.fromkeys(_own_chars(pattern)))[:10]
    chars = list(dict.fromkeys([*own, "a", "1", " ", "x", "A", "_", "-", ".", "\n"]))
    for c in chars:
        for tail in _TAILS:
            yield f"{length:,} × {c!r}", c * length + tail
    pairs, short = chars[:6], length // 4  # shorter: enough for exponential and cubic work, cheap for the rest
    for i, a in enumerate(pairs):
        for b in pairs[i + 1:]:
            yield f"{short:,} × {a + b!r}", (a + b) * short + "\x00"
    for a in pairs:  # a run, then the character the pattern wants next, then a failure
        for b in pairs:
            if a != b:
                yield f"{short:,} × {a!r} then {b!r}", a * short + b + "\x00"
    every = "".join(chars)
    yield f"{every!r} repeated", every * (length // len(every)) + "\x00"


def self_test(pattern: str, what: str = "regular expression") -> None:
    """Refuse (RegexTooSlow) a pattern that takes more than MATCH_SECONDS on any hostile text of SELF_TEST_CHARS
    characters, or more than SELF_TEST_SECONDS on all of them together. The verdict is remembered per pattern."""
    problem = _verdict(pattern, what)
    if problem is not None:
        raise RegexTooSlow(problem)


@functools.lru_cache(maxsize=1024)
def _verdict(pattern: str, what: str) -> str | None:
    try:
        _self_test(pattern, what, SELF_TEST_CHARS, SELF_TEST_SECONDS)
    except RegexTooSlow as exc:
        return str(exc)
    return None


def _self_test(pattern: str, what: str, length: int, seconds: float) -> None:
    compiled = compile(pattern, what)
    clock = Clock(seconds)
    for description, text in _probes(pattern, length):
        left = clock.left()
        if left <= 0:
            raise RegexTooSlow(f"the {what} {_show(pattern)} is too slow on long texts; simplify it")
        try:
            for _ in compiled.finditer(text, timeout=min(MATCH_SECONDS, left)):
                pass
        except TimeoutError:
            raise RegexTooSlow(f"the {what} {_show(pattern)} takes too long on some texts (e.g. {description}): "
                               f"it backtracks too much; avoid nested or overlapping repetition such as (a+)+ or "
                               f"(a|aa)+") from None


def check_pattern(pattern: Any, what: str = "regular expression") -> regex.Pattern[str]:
    """What saving a pattern runs: text, at most MAX_PATTERN_CHARS, compiles, and passes the self-test."""
    if not isinstance(pattern, str):
        raise RegexError(f"the {what} must be text, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexError(f"the {what} is longer than {MAX_PATTERN_CHARS:,} characters")
    compiled = compile(pattern, what)
    self_test(pattern, what)
    return compiled


# -- JSON Schema: `pattern`, `patternProperties` and `additionalProperties` on the bounded engine --------------------


def _schema_patterns(schema: Any) -> Iterator[str]:
    """Every regular expression a schema holds: `pattern` values and `patternProperties` keys, at any depth."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if isinstance(node.get("pattern"), str):
                yield node["pattern"]
            if isinstance(node.get("patternProperties"), Mapping):
                yield from (k for k in node["patternProperties"] if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _has_key(schema: Any, key: str) -> bool:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if key in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def check_schema_patterns(schema: Any, what: str = "JSON Schema") -> None:
    """Refuse (RegexError) a schema with a pattern that does not compile on the bounded engine, is longer than
    MAX_PATTERN_CHARS, or fails the self-test; and patternProperties together with unevaluatedProperties, which
    jsonschema would match with Python's unbounded `re`."""
    for pattern in dict.fromkeys(_schema_patterns(schema)):
        check_pattern(pattern, f"pattern in the {what}")
    if _has_key(schema, "patternProperties") and _has_key(schema, "unevaluatedProperties"):
        raise RegexError(f"the {what} uses patternProperties together with unevaluatedProperties, which is not "
                         f"supported")


def _matches(pattern: str, text: str) -> bool | None:
    """Whether pattern is found in text; None when it took too long or does not compile."""
    try:
        return search(pattern, text, what="pattern") is not None
    except RegexError:
        return None


def _pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string"):
        found = _matches(patrn, instance)
        if found is None:
            yield ValidationError(f"the pattern {_show(patrn)} took too long or cannot be used on this value")
        elif not found:
            yield ValidationError(f"{_show(instance, 200)} does not match {patrn!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            found = _matches(pattern, key)
            if found is None:
                yield ValidationError(f"the pattern {_show(pattern)} took too long or cannot be used on the "
                                      f"property name {_show(key)}")
            elif found:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, ap: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """jsonschema's additionalProperties, with the patternProperties it skips matched on the bounded engine."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = []
    for key in instance:
        if key in properties:
            continue
        found = [_matches(p, key) for p in patterns]
        if None in found:
            yield ValidationError(f"a pattern of patternProperties took too long or cannot be used on the property "
                                  f"name {_show(key)}")
        elif not any(found):
            extras.append(key)
    if validator.is_type(ap, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], ap, path=extra)
    elif not ap and extras:
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras, key=str))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: "
                                  f"{', '.join(repr(p) for p in sorted(patterns))}")
        else:
            joined = ", ".join(repr(each) for each in sorted(extras, key=str))
            yield ValidationError(f"Additional properties are not allowed ({joined} "
                                  f"{'was' if len(extras) == 1 else 'were'} unexpected)")


def _unsupported_unevaluated(validator: Any, up: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    yield ValidationError("patternProperties together with unevaluatedProperties is not supported")


@functools.lru_cache(maxsize=32)
def _safe_class(cls: type, refuse_unevaluated: bool) -> type:
    keywords = {"pattern": _pattern, "patternProperties": _pattern_properties,
                "additionalProperties": _additional_properties}
    if refuse_unevaluated:
        keywords["unevaluatedProperties"] = _unsupported_unevaluated
    return jsonschema.validators.extend(cls, keywords)


def schema_validator(schema: Any) -> Any:
    """A jsonschema validator for schema (its own draft) whose regular expressions run on the bounded engine."""
    cls = jsonschema.validators.validator_for(schema)
    refuse = _has_key(schema, "patternProperties") and _has_key(schema, "unevaluatedProperties")
    return _safe_class(cls, refuse)(schema)
