"""Freezing the process through regular expressions: guardrail rules, the `regex` evaluator and JSON Schema
`pattern`/`patternProperties` (templates' input and output schemas, the JSON evaluators). Patterns that backtrack
too much are refused when saved (one clear line, nothing stored); one that gets past that (saved before, or built
from an item's variables) is bounded in time, never stalls another thread more than 0.5 s, and fails closed."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from core import evaluators, guardrails, regexes
from core import templates as tpl
from core.cli import main
from tests.test_hostile_sandbox import one_plain_line, ticker

EVIL = [r"(a+)+$", r"(a|aa)+$", r"^(a|a)*$", r"(\w+\s?)+$", r"(x+x+)+y", r"^(([a-z])+.)+[A-Z]([a-z])+$",
        r"(.*,){10}X", r"(\d|\d\d)+\.$"]
TEXTS = ["a" * 28 + "!", "a" * 40 + "!", "word " * 12 + "!", "x" * 30, "a," * 40, "1" * 30 + "!"]


@pytest.mark.parametrize("pattern", EVIL)
def test_a_backtracking_rule_is_refused_when_saved(pool, pattern):
    with ticker(4.0), pytest.raises(guardrails.GuardrailError, match="takes too long") as caught:
        guardrails.create_rule(pool, "evil", "regex", pattern=pattern)
    one_plain_line(str(caught.value))
    assert guardrails.list_rules(pool) == []


def test_ordinary_rules_are_still_saved(pool):
    for i, pattern in enumerate([r"\b(password|secret)\b", r"\d{3}-\d{2}-\d{4}", r".*secret.*", r"\s+$",
                                 r"^(?=.*[A-Z])(?=.*\d).{8,}$", r"(\d+)\s*(usd|eur)", r"\p{Lu}{5,}"]):
        guardrails.create_rule(pool, f"r{i}", "regex", pattern=pattern)
    assert len(guardrails.list_rules(pool)) == 7


def _rule(pattern: str, action: str = "block", rule_id: int = 1) -> guardrails.Rule:
    """A rule as one saved before patterns were checked would come back from the database."""
    return guardrails.Rule(rule_id, f"r{rule_id}", "regex", None, pattern, None, None, "both", action, "[x]", True,
                           "", datetime.now())


@pytest.mark.parametrize("pattern", EVIL)
@pytest.mark.parametrize("action", ["block", "redact", "flag"])
def test_a_slow_rule_on_a_message_is_bounded_and_fails_closed(pattern, action):
    rules = [_rule(pattern, action, i) for i in range(1, 6)]  # several slow rules share one budget
    for text in TEXTS[:3]:
        with ticker(guardrails.CHECK_SECONDS * 4):
            check = guardrails.check(rules, text, "input")
        slow = [h for h in check.hits if h.excerpt == guardrails.TIMED_OUT]
        assert check.text == text
        if slow:
            assert check.blocked if action in ("block", "redact") else check.flagged


def test_long_texts_are_scanned_in_windows():
    text = "x" * 45_000 + " secret " + "y" * 30_000 + "secret"
    spans = guardrails.find(_rule(r"secret"), text)
    assert spans == [(45_001, 45_007), (75_008, 75_014)]
    assert guardrails.find(_rule(r"x{500}secret|secret"), "x" * 19_990 + "secret")[-1] == (19_490, 19_996)


def test_pii_detectors_on_hostile_text_are_bounded():
    rules = [guardrails.Rule(i, k, k, None, None, None, None, "both", "redact", "[x]", True, "", datetime.now())
             for i, k in enumerate(("email", "phone", "card"), 1)]
    for text in ("%" * 20_000, "1 " * 10_000, "a." * 10_000, "+1" * 10_000):
        with ticker(guardrails.CHECK_SECONDS * 4):
            guardrails.check(rules, text, "output")


def test_the_cli_refuses_a_slow_rule_in_one_line(app_env, pool, capsys):
    for pattern in EVIL[:3]:
        with ticker(6.0):
            code = main(["guardrails", "add", "evil", "--kind", "regex", "--pattern", pattern])
        _, err = capsys.readouterr()
        assert code != 0 and err.count("\n") == 1 and "takes too long" in err, err
        one_plain_line(err.strip())
    assert guardrails.list_rules(pool) == []


# -- evaluators ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", EVIL)
def test_a_backtracking_regex_evaluator_is_refused_when_defined(pattern):
    with ticker(4.0), pytest.raises(evaluators.EvaluatorError, match="takes too long"):
        evaluators.parse({"type": "regex", "value": pattern})
    imported = evaluators.parse({"type": "regex", "value": pattern}, allow_unsupported=True)
    check = evaluators.run(imported, evaluators.Context(output="a" * 30 + "!"))
    assert not check.passed and "takes too long" in check.reason


@pytest.mark.parametrize("pattern", EVIL)
def test_a_regex_built_from_variables_is_bounded_when_run(pattern):
    ev = evaluators.parse({"type": "regex", "value": "{{ p }}"})
    for text in TEXTS:
        with ticker(3.0):
            check = evaluators.run(ev, evaluators.Context(output=text, variables={"p": pattern}))
        one_plain_line(check.reason)
        assert check.passed or "took too long" in check.reason or "does not match" in check.reason


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^(a|aa)+$"},
    {"type": "object", "patternProperties": {"^(a|a)*$": {}}, "additionalProperties": False},
    {"type": "object", "properties": {"k": {"type": "array", "items": {"pattern": "(x+x+)+y"}}}},
    {"type": "object", "propertyNames": {"pattern": "(\\w+\\s?)+$"}},
])
def test_json_schemas_with_backtracking_patterns_are_refused(pool, schema):
    with ticker(4.0), pytest.raises(evaluators.EvaluatorError, match="takes too long"):
        evaluators.parse({"type": "json-schema", "value": schema})
    with ticker(4.0), pytest.raises(tpl.InvalidTemplateInput, match="takes too long") as caught:
        tpl.create_template(pool, "schemed", "{{ k }}", input_schema=schema)
    one_plain_line(str(caught.value))
    with pytest.raises(tpl.InvalidTemplateInput, match="takes too long"):
        tpl.create_template(pool, "schemed", "{{ k }}", output_schema=schema)
    with pytest.raises(tpl.InvalidTemplateInput, match="takes too long"):
        tpl.render_content(None, "{{ k }}", {"k": "a"}, input_schema=schema)
    assert tpl.list_templates(pool).total == 0


@pytest.mark.parametrize("schema, instance", [
    ({"type": "string", "pattern": "^(a|aa)+$"}, "a" * 40 + "!"),
    ({"type": "object", "patternProperties": {"^(a|a)*$": {}}, "additionalProperties": False}, {"a" * 40 + "!": 1}),
    ({"type": "object", "additionalProperties": {"type": "string", "pattern": "(x+x+)+y"}}, {"k": "x" * 40}),
    ({"type": "object", "patternProperties": {"(a+)+b": {"type": "integer"}}, "unevaluatedProperties": False,
      "$schema": "https://json-schema.org/draft/2020-12/schema"}, {"a" * 40: 1}),
])
def test_schema_patterns_saved_before_are_bounded_when_validating(schema, instance):
    """A schema stored before patterns were checked (or one built from an item's variables) validates in bounded
    time: a pattern that runs out of time is a validation error."""
    with ticker(3.0):
        errors = tpl.validate_variables(schema, instance) if isinstance(instance, dict) else \
            tpl.validate_variables({"type": "object", "properties": {"v": schema}}, {"v": instance})
    assert errors
    for error in errors:
        one_plain_line(error)
    ev = evaluators.parse({"type": "json-schema", "value": "{{ s }}"})
    with ticker(3.0):
        check = evaluators.run(ev, evaluators.Context(output=json.dumps(instance), variables={"s": json.dumps(schema)}))
    assert not check.passed


def test_ordinary_schema_patterns_still_validate():
    schema = {"type": "object", "properties": {"email": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"}},
              "patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False}
    assert tpl.validate_variables(schema, {"email": "a@b.c", "x-k": "v"}) == []
    assert tpl.validate_variables(schema, {"email": "nope"}) == [
        "email: 'nope' does not match '^[^@\\\\s]+@[^@\\\\s]+$'"]
    assert tpl.validate_variables(schema, {"other": 1}) == ["'other' does not match any of the regexes: '^x-'"]
    assert tpl.validate_variables({"additionalProperties": False}, {"other": 1}) == [
        "Additional properties are not allowed ('other' was unexpected)"]


def test_invalid_patterns_keep_pythons_wording():
    with pytest.raises(regexes.RegexError, match=r"missing \), unterminated subpattern at position 0"):
        regexes.check_pattern("(")
    with pytest.raises(regexes.RegexError, match="longer than 1,000"):
        regexes.check_pattern("a" * 1001)


# -- counted repetition that compiles into a huge program ------------------------------------------------------------


@pytest.mark.parametrize("pattern", [
    "a{4000000}",  # 44 characters that compiled into 1 GB, holding the interpreter lock for 1.2 s
    "(?:a{1000}){1000}",
    "[ab]{1000000,}",
    "(?:ab){2000}(?:cd){2000}(?:ef){2000}",
    "x|" * 10 + "a{100000}",
])
def test_counted_repetition_is_bounded_before_it_is_compiled(pattern):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(regexes.RegexError, match="repeats too much"):
        regexes.compile(pattern)
    with pytest.raises(regexes.RegexError, match="repeats too much"):
        regexes.search(pattern, "aaa")
    assert time.monotonic() - started < 0.2
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 20_000_000


def test_ordinary_counted_repetition_still_compiles():

    for pattern in (r"\d{4}-\d{2}-\d{2}", r"a{0,1000000}", r"(?:[A-Z]{2}\d{2}){1,50}", r"\{3\}x{2}", r"[{]{3}",
                    r"\p{L}{10}"):
        assert regexes.compile(pattern).pattern == pattern
    words = "|".join(f"word{i}" for i in range(3000))  # long, built from a words list: no counted repetition
    assert regexes.compile(words, max_chars=None).pattern == words


@pytest.mark.parametrize("pattern", ["ab" * 500_000, "|".join(["ab"] * 300_000), "(?:a)" * 150_000])
def test_a_pattern_longer_than_the_cap_is_refused_wherever_it_comes_from(pattern):
    """The 1,000-character cap holds for a pattern saved as it is, and for one an evaluator renders from an item's
    variables (a 600,000-character alternation took 6.5 s and 340 MB to compile for every item)."""
    with ticker(1.0), pytest.raises(evaluators.EvaluatorError, match="longer than 1,000 characters"):
        evaluators.parse({"type": "regex", "value": pattern})
    ev = evaluators.parse({"type": "regex", "value": "{{ p }}"})
    with ticker(1.0):
        check = evaluators.run(ev, evaluators.Context(output="ab", variables={"p": pattern}))
    assert not check.passed and "longer than 1,000 characters" in check.reason
    one_plain_line(check.reason)
    with ticker(1.0), pytest.raises(regexes.RegexError, match="longer than 1,000 characters"):
        regexes.search(pattern, "ab")


def test_blocked_words_beyond_the_pattern_cap_still_work():
    words = [f"word{i}" for i in range(900)]  # about 7,000 characters of words: one long alternation
    rule = guardrails.Rule(id=1, name="w", kind="words", words=words, pattern=None, max_length=None,
                           template_name=None, direction="both", action="block", replacement="", enabled=True,
                           created_by="me", created_at=datetime.now())
    assert guardrails.find(rule, "say word899 now") == [(4, 11)]
