"""Guardrails: operator rules checked on chat input and output, and the record of every hit.

A rule is one detector — blocked words or phrases, a regular expression, a maximum length, or a PII detector
(e-mail address, phone number, payment card number with a Luhn check) — applied globally or to conversations on one
template, on input, output or both, with an action:

* ``block``  — the message goes no further; the user gets a safe reply;
* ``redact`` — the matches are replaced (before the text is stored or sent);
* ``flag``   — the message is allowed and marked for review;
* ``halt``   — the conversation is halted (as if an operator did it) and the user gets the paused reply.

`check()` is pure: it runs rules over a text and returns what to do. `record_hits()` stores the hits with the
message and execution they concern. A broken regular expression is refused when the rule is saved, with the reason,
and so is one that backtracks too much on hostile texts (`regexes.check_pattern`). Every detector runs on the
bounded engine of `core.regexes`: a rule scans the text in windows of MAX_SCAN_CHARS, all rules on one text share
CHECK_SECONDS of matching, and a rule that runs out of time counts as a hit (a redact rule then blocks: what it
would have removed is unknown) — a slow rule never lets a message through unchecked, nor stalls the process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from core import regexes, templates
from core.errors import Conflict, InvalidInput, NotFound

KINDS = {
    "words": "blocked words",
    "regex": "regular expression",
    "max_length": "maximum length",
    "email": "PII: e-mail address",
    "phone": "PII: phone number",
    "card": "PII: payment card",
}
DIRECTIONS = ("input", "output", "both")
ACTIONS = ("block", "redact", "flag", "halt")
DEFAULT_REPLACEMENTS = {"email": "[email]", "phone": "[phone]", "card": "[card]"}
MAX_PATTERN_LENGTH = regexes.MAX_PATTERN_CHARS
MAX_WORDS_CHARS = 10_000  # a words rule's words and phrases together
MAX_SCAN_CHARS = 20_000  # a rule scans a longer text in windows of this size ...
SCAN_OVERLAP = 1_000  # ... overlapping by this much, so a match across a window's end is still found
CHECK_SECONDS = 1.0  # seconds of matching for all rules on one text (each rule at most regexes.MATCH_SECONDS)
TIMED_OUT = "the rule took too long on this text"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,79}$")

EMAIL_RE = regexes.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
CARD_RE = regexes.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE_RE = regexes.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,5}"
                           r"(?:[\s.-]?\d{2,5}){1,5}(?!\w)")
_DATE_RE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


class GuardrailError(InvalidInput):
    """A rule cannot be saved as given; the message says why."""


class GuardrailExists(Conflict, GuardrailError):
    """A rule of that name exists already."""


class GuardrailNotFound(NotFound):
    """No guardrail rule of that name (a LookupError)."""


@dataclass(frozen=True)
class Rule:
    """One guardrail rule."""

    id: int
    name: str
    kind: str
    words: list[str] | None
    pattern: str | None
    max_length: int | None
    template_name: str | None
    direction: str
    action: str
    replacement: str
    enabled: bool
    created_by: str
    created_at: datetime

    def applies(self, direction: str, template_name: str | None) -> bool:
        """Whether the rule checks text going in `direction` in a conversation on `template_name`."""
        return (self.enabled and self.direction in (direction, "both")
                and (self.template_name is None or self.template_name == template_name))

    @property
    def scope(self) -> str:
        """'global' or 'template <name>'."""
        return "global" if self.template_name is None else f"template {self.template_name}"

    def describe(self) -> str:
        """What the rule detects, in a few words."""
        if self.kind == "words":
            return "words: " + ", ".join(self.words or [])
        if self.kind == "regex":
            return f"regex: {self.pattern}"
        if self.kind == "max_length":
            return f"longer than {self.max_length} characters"
        return KINDS[self.kind]


@dataclass(frozen=True)
class Hit:
    """One rule that matched a text."""

    rule_id: int
    rule_name: str
    kind: str
    direction: str
    action: str
    matches: int
    excerpt: str | None


@dataclass(frozen=True)
class Check:
    """The outcome of running rules over one text."""

    original: str
    text: str  # after redactions
    hits: tuple[Hit, ...]

    @property
    def blocked(self) -> bool:
        """A block rule matched."""
        return any(h.action == "block" for h in self.hits)

    @property
    def halted(self) -> bool:
        """A halt rule matched."""
        return any(h.action == "halt" for h in self.hits)

    @property
    def flagged(self) -> bool:
        """A flag rule matched: the message is allowed and marked for review."""
        return any(h.action == "flag" for h in self.hits)

    @property
    def redacted(self) -> bool:
        """The text was changed by a redact rule."""
        return self.text != self.original

    def reason(self) -> str:
        """The rules behind a block or halt, for the ledger and the audit trail."""
        names = [h.rule_name for h in self.hits if h.action in ("halt", "block")] or [h.rule_name for h in self.hits]
        return "guardrail " + ", ".join(f"'{n}'" for n in dict.fromkeys(names))


@dataclass(frozen=True)
class Event:
    """A recorded rule hit."""

    id: int
    rule_id: int | None
    rule_name: str
    kind: str
    direction: str
    action: str
    matches: int
    excerpt: str | None
    user_id: str | None
    conversation_id: int | None
    message_id: int | None
    execution_id: int | None
    created_at: datetime


# ---- detection ---------------------------------------------------------------------------------------------------

def luhn_valid(digits: str) -> bool:
    """True when a string of digits passes the Luhn checksum."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _card_spans(text: str, timeout: float = regexes.MATCH_SECONDS) -> list[tuple[int, int]]:
    spans = []
    for start, end in regexes.spans(CARD_RE, text, timeout=timeout):
        digits = _digits(text[start:end])
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            spans.append((start, end))
    return spans


def _phone_spans(text: str, timeout: float = regexes.MATCH_SECONDS) -> list[tuple[int, int]]:
    spans = []
    for start, end in regexes.spans(PHONE_RE, text, timeout=timeout):
        s = text[start:end]
        digits = _digits(s)
        if _DATE_RE.match(s.strip()):
            continue
        if len(digits) >= 13 and luhn_valid(digits):
            continue  # a payment card number, the card detector's business
        international = s.lstrip().startswith("+") or "(" in s
        if (9 <= len(digits) <= 15) or (international and 7 <= len(digits) <= 15):
            spans.append((start, end))
    return spans


def _words_regex(words: Sequence[str]) -> Any:
    alternatives = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    parts = [r"\s+".join(re.escape(piece) for piece in w.split()) for w in alternatives]
    return regexes.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", flags=re.IGNORECASE,
                           max_chars=None)  # the words are capped (MAX_WORDS_CHARS), not this alternation


def _windows(text: str) -> list[tuple[int, str]]:
    """(offset, piece) of the windows a rule scans: the whole text when it is short."""
    if len(text) <= MAX_SCAN_CHARS:
        return [(0, text)]
    step = MAX_SCAN_CHARS - SCAN_OVERLAP
    return [(i, text[i:i + MAX_SCAN_CHARS]) for i in range(0, len(text) - SCAN_OVERLAP, step)]


def _find_in(rule: Rule, text: str, timeout: float) -> list[tuple[int, int]]:
    if rule.kind == "words":
        return regexes.spans(_words_regex(rule.words or []), text, timeout=timeout)
    if rule.kind == "regex":
        return regexes.spans(rule.pattern or "", text, timeout=timeout, what="rule's regular expression")
    if rule.kind == "email":
        return regexes.spans(EMAIL_RE, text, timeout=timeout)
    if rule.kind == "phone":
        return _phone_spans(text, timeout)
    if rule.kind == "card":
        return _card_spans(text, timeout)
    raise GuardrailError(f"unknown rule kind {rule.kind!r}")


def find(rule: Rule, text: str, timeout: float = regexes.MATCH_SECONDS) -> list[tuple[int, int]]:
    """Spans of text the rule matches (for max_length: the part beyond the limit), scanning windows of
    MAX_SCAN_CHARS within `timeout` CPU seconds in all; regexes.RegexTooSlow when that is not enough."""
    if rule.kind == "max_length":
        return [(rule.max_length, len(text))] if len(text) > (rule.max_length or 0) else []
    clock = regexes.Clock(timeout)
    found: set[tuple[int, int]] = set()
    for offset, piece in _windows(text):
        left = clock.left()
        if left <= 0:
            raise regexes.RegexTooSlow(TIMED_OUT)
        found.update((offset + start, offset + end) for start, end in _find_in(rule, piece, left))
    return sorted(found)


def _replace(text: str, spans: Sequence[tuple[int, int]], replacement: str, kind: str) -> str:
    if kind == "max_length":
        return text[: spans[0][0]]
    out, last = [], 0
    for start, end in sorted(spans):
        if start < last:
            continue
        out.append(text[last:start])
        out.append(replacement)
        last = end
    out.append(text[last:])
    return "".join(out)


def _excerpt(rule: Rule, text: str, spans: Sequence[tuple[int, int]]) -> str | None:
    if rule.action == "redact":
        return None  # what a redact rule removes is not kept anywhere
    if rule.kind == "max_length":
        return f"{len(text)} characters (limit {rule.max_length})"
    found = list(dict.fromkeys(text[s:e] for s, e in spans))
    return ", ".join(found)[:300]


def check(rules: Iterable[Rule], text: str, direction: str, template_name: str | None = None) -> Check:
    """Run the rules that apply to (direction, template) over text, in rule order; redactions apply cumulatively."""
    if direction not in ("input", "output"):
        raise GuardrailError(f"direction must be input or output, got {direction!r}")
    current, hits = text, []
    clock = regexes.Clock(CHECK_SECONDS)
    for rule in sorted(rules, key=lambda r: r.id):
        if not rule.applies(direction, template_name):
            continue
        left = clock.left()
        try:
            if left <= 0:
                raise regexes.RegexTooSlow(TIMED_OUT)
            spans = find(rule, current, min(regexes.MATCH_SECONDS, left))
        except regexes.RegexError:  # too slow (or a pattern saved before it was checked): counts as a hit
            action = "block" if rule.action == "redact" else rule.action
            hits.append(Hit(rule.id, rule.name, rule.kind, direction, action, 0, TIMED_OUT))
            continue
        if not spans:
            continue
        hits.append(Hit(rule.id, rule.name, rule.kind, direction, rule.action, len(spans),
                        _excerpt(rule, current, spans)))
        if rule.action == "redact":
            current = _replace(current, spans, rule.replacement, rule.kind)
    return Check(text, current, tuple(hits))


# ---- rules -------------------------------------------------------------------------------------------------------

def compile_pattern(pattern: str) -> Any:
    """Compile a rule's regular expression; GuardrailError with the reason when it is broken, matches nothing, or
    backtracks too much on hostile texts (it would make every message wait for its timeout)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise GuardrailError("a regex rule needs a pattern")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise GuardrailError(f"the pattern is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = regexes.check_pattern(pattern)
    except regexes.RegexError as exc:
        raise GuardrailError(str(exc)) from None
    if compiled.fullmatch(""):
        raise GuardrailError(f"the regular expression {pattern!r} matches empty text, so it would match everywhere")
    return compiled


def _parse_words(words: str | Sequence[str] | None) -> list[str]:
    if words is None:
        return []
    if isinstance(words, str):
        words = re.split(r"[,\n]", words)
    cleaned = [" ".join(str(w).split()) for w in words]
    return list(dict.fromkeys(w for w in cleaned if w))


def validate(name: str, kind: str, *, words: str | Sequence[str] | None = None, pattern: str | None = None,
             max_length: int | None = None, direction: str = "both", action: str = "block") -> dict[str, Any]:
    """Check a rule's fields; return the normalised column values or raise GuardrailError naming the problem."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise GuardrailError("a rule name is 1-80 letters, digits, spaces, '.', '_' or '-', starting with a letter "
                             "or digit")
    if kind not in KINDS:
        raise GuardrailError(f"unknown rule kind {kind!r}; choose one of {', '.join(KINDS)}")
    if direction not in DIRECTIONS:
        raise GuardrailError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    if action not in ACTIONS:
        raise GuardrailError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
    values: dict[str, Any] = {"name": name, "kind": kind, "words": None, "pattern": None, "max_length": None,
                              "direction": direction, "action": action}
    if kind == "words":
        parsed = _parse_words(words)
        if not parsed:
            raise GuardrailError("a words rule needs at least one word or phrase")
        if sum(len(w) + 1 for w in parsed) > MAX_WORDS_CHARS:
            raise GuardrailError(f"the words and phrases of a rule are longer than {MAX_WORDS_CHARS:,} characters "
                                 f"together")
        values["words"] = parsed
    elif words:
        raise GuardrailError(f"words only apply to a words rule, not {kind}")
    if kind == "regex":
        compile_pattern(pattern or "")
        values["pattern"] = pattern
    elif pattern:
        raise GuardrailError(f"a pattern only applies to a regex rule, not {kind}")
    if kind == "max_length":
        try:
            limit = int(max_length) if max_length is not None else None
        except (TypeError, ValueError):
            raise GuardrailError(f"max length must be a whole number, got {max_length!r}") from None
        if limit is None or limit < 1:
            raise GuardrailError("a max_length rule needs a maximum length of at least 1 character")
        values["max_length"] = limit
    elif max_length is not None:
        raise GuardrailError(f"a maximum length only applies to a max_length rule, not {kind}")
    return values


_RULE_COLUMNS = ("id, name, kind, words, pattern, max_length, template_name, direction, action, replacement, enabled, "
                 "created_by, created_at")


def create_rule(pool: ConnectionPool, name: str, kind: str, *, words: str | Sequence[str] | None = None,
                pattern: str | None = None, max_length: int | None = None, template_name: str | None = None,
                direction: str = "both", action: str = "block", replacement: str | None = None,
                created_by: str = "") -> Rule:
    """Save a new rule (global unless template_name is given); GuardrailError when it is invalid, GuardrailExists
    when the name is taken."""
    values = validate(name, kind, words=words, pattern=pattern, max_length=max_length, direction=direction,
                      action=action)
    template_name = (template_name or "").strip() or None
    if template_name is not None:
        templates.get_template_by_name(pool, template_name)  # TemplateNotFound when there is no such template
    if replacement is None:
        replacement = DEFAULT_REPLACEMENTS.get(kind, "[redacted]")
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Rule)) as cur:
        try:
            return cur.execute(
                f"""INSERT INTO guardrail_rules (name, kind, words, pattern, max_length, template_name, direction,
                                                 action, replacement, created_by)
                    VALUES (%(name)s, %(kind)s, %(words)s, %(pattern)s, %(max_length)s, %(template_name)s,
                            %(direction)s, %(action)s, %(replacement)s, %(created_by)s) RETURNING {_RULE_COLUMNS}""",
                {"name": values["name"], "kind": kind, "words": values["words"], "pattern": values["pattern"],
                 "max_length": values["max_length"], "template_name": template_name, "direction": direction,
                 "action": action, "replacement": replacement, "created_by": created_by}).fetchone()
        except psycopg.errors.UniqueViolation:
            raise GuardrailExists(f"a guardrail rule named {values['name']!r} already exists") from None


def list_rules(pool_or_conn: ConnectionPool | psycopg.Connection, *, enabled_only: bool = False) -> list[Rule]:
    """Every rule, oldest first."""
    query = f"SELECT {_RULE_COLUMNS} FROM guardrail_rules" + (" WHERE enabled" if enabled_only else "") + " ORDER BY id"
    if isinstance(pool_or_conn, psycopg.Connection):
        with pool_or_conn.cursor(row_factory=class_row(Rule)) as cur:
            return cur.execute(query).fetchall()
    with pool_or_conn.connection() as conn, conn.cursor(row_factory=class_row(Rule)) as cur:
        return cur.execute(query).fetchall()


def rules_for(conn: psycopg.Connection, template_name: str | None) -> list[Rule]:
    """The enabled rules that apply to a conversation on template_name (global ones and that template's)."""
    with conn.cursor(row_factory=class_row(Rule)) as cur:
        return cur.execute(
            f"SELECT {_RULE_COLUMNS} FROM guardrail_rules "
            "WHERE enabled AND (template_name IS NULL OR template_name = %s)"
            " ORDER BY id", (template_name,)).fetchall()


def get_rule(pool: ConnectionPool, name: str) -> Rule:
    """One rule by name; GuardrailNotFound (a LookupError) when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Rule)) as cur:
        row = cur.execute(f"SELECT {_RULE_COLUMNS} FROM guardrail_rules WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise GuardrailNotFound(f"no guardrail rule named {name!r}")
    return row


def delete_rule(pool: ConnectionPool, name: str) -> None:
    """Delete a rule; its recorded events stay (they keep the rule's name)."""
    with pool.connection() as conn:
        if conn.execute("DELETE FROM guardrail_rules WHERE name = %s", (name,)).rowcount == 0:
            raise GuardrailNotFound(f"no guardrail rule named {name!r}")


def set_enabled(pool: ConnectionPool, name: str, enabled: bool) -> Rule:
    """Switch a rule on or off."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Rule)) as cur:
        row = cur.execute(f"UPDATE guardrail_rules SET enabled = %s WHERE name = %s RETURNING {_RULE_COLUMNS}",
                          (bool(enabled), name)).fetchone()
    if row is None:
        raise GuardrailNotFound(f"no guardrail rule named {name!r}")
    return row


# ---- events ------------------------------------------------------------------------------------------------------

def record_hits(conn: psycopg.Connection, hits: Sequence[Hit], *, user_id: str | None = None,
                conversation_id: int | None = None, message_id: int | None = None,
                execution_id: int | None = None) -> list[int]:
    """Store rule hits with the message and execution they concern (inside the caller's transaction)."""
    ids = []
    for h in hits:
        ids.append(conn.execute(
            """INSERT INTO guardrail_events (rule_id, rule_name, kind, direction, action, matches, excerpt, user_id,
                                             conversation_id, message_id, execution_id)
               VALUES ((SELECT id FROM guardrail_rules WHERE id = %(rule_id)s), %(rule_name)s, %(kind)s,
                       %(direction)s, %(action)s, %(matches)s, %(excerpt)s, %(user_id)s, %(conversation_id)s,
                       %(message_id)s, %(execution_id)s)
               RETURNING id""",
            {"rule_id": h.rule_id, "rule_name": h.rule_name, "kind": h.kind, "direction": h.direction,
             "action": h.action, "matches": h.matches, "excerpt": h.excerpt, "user_id": user_id,
             "conversation_id": conversation_id, "message_id": message_id, "execution_id": execution_id}
        ).fetchone()[0])
    return ids


def list_events(pool: ConnectionPool, *, user_id: str | None = None, rule_name: str | None = None,
                action: str | None = None, limit: int = 200) -> list[Event]:
    """Recorded rule hits, newest first."""
    where, args = [], []
    for column, value in (("user_id", user_id), ("rule_name", rule_name), ("action", action)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    query = ("SELECT id, rule_id, rule_name, kind, direction, action, matches, excerpt, user_id, conversation_id, "
             "message_id, execution_id, created_at FROM guardrail_events"
             + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT %s")
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Event)) as cur:
        return cur.execute(query, (*args, limit)).fetchall()
