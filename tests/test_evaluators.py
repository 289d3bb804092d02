"""Evaluators: every type passing and failing, negation, weights, definitions refused, the judge's answer parsed."""

from __future__ import annotations

import pytest

from core import evaluators as ev
from core.evaluators import Context, Judgement


def check(spec, output="", **ctx):
    return ev.run(ev.parse(spec), Context(output=output, **ctx))


# (spec, output, context, expected pass)
CASES = [
    ({"type": "equals", "value": "Paris"}, "Paris", {}, True),
    ({"type": "equals", "value": "Paris"}, "Paris.", {}, False),
    ({"type": "equals"}, "Paris", {"expected": "Paris"}, True),
    ({"type": "equals", "value": {"a": 1}}, '{"a": 1}', {}, True),
    ({"type": "equals", "value": {"a": 1}}, '{"a": 2}', {}, False),
    ({"type": "contains", "value": "Par"}, "Paris", {}, True),
    ({"type": "contains", "value": "par"}, "Paris", {}, False),
    ({"type": "icontains", "value": "PAR"}, "Paris", {}, True),
    ({"type": "icontains", "value": "Lyon"}, "Paris", {}, False),
    ({"type": "contains-any", "value": ["Lyon", "Paris"]}, "Paris", {}, True),
    ({"type": "contains-any", "value": "Lyon, Nice"}, "Paris", {}, False),
    ({"type": "icontains-any", "value": ["paris"]}, "PARIS", {}, True),
    ({"type": "icontains-any", "value": ["rome"]}, "PARIS", {}, False),
    ({"type": "contains-all", "value": ["Pa", "ris"]}, "Paris", {}, True),
    ({"type": "contains-all", "value": ["Pa", "xx"]}, "Paris", {}, False),
    ({"type": "icontains-all", "value": ["pa", "RIS"]}, "Paris", {}, True),
    ({"type": "icontains-all", "value": ["pa", "zz"]}, "Paris", {}, False),
    ({"type": "starts-with", "value": "Par"}, "Paris", {}, True),
    ({"type": "starts-with", "value": "ris"}, "Paris", {}, False),
    ({"type": "regex", "value": r"^\d{3}-\d{4}$"}, "555-1234", {}, True),
    ({"type": "regex", "value": r"^\d{3}-\d{4}$"}, "call 555-1234", {}, False),
    ({"type": "is-json"}, '{"a": [1, 2]}', {}, True),
    ({"type": "is-json"}, "{'a': 1}", {}, False),
    ({"type": "is-json", "value": {"type": "object", "required": ["a"]}}, '{"a": 1}', {}, True),
    ({"type": "is-json", "value": {"type": "object", "required": ["a"]}}, '{"b": 1}', {}, False),
    ({"type": "contains-json"}, 'Sure! ```json\n{"a": 1}\n```', {}, True),
    ({"type": "contains-json"}, "no json here", {}, False),
    ({"type": "contains-json", "value": '{"type": "array"}'}, "x [1, 2] y", {}, True),
    ({"type": "json-schema"}, '{"n": 3}', {"output_schema": {"properties": {"n": {"type": "integer"}}}}, True),
    ({"type": "json-schema"}, '{"n": "3"}', {"output_schema": {"properties": {"n": {"type": "integer"}}}}, False),
    ({"type": "json-schema", "value": "type: array"}, "[1]", {}, True),  # YAML schema
    ({"type": "levenshtein", "value": "kitten"}, "sitting", {}, True),   # distance 3 <= default 5
    ({"type": "levenshtein", "value": "kitten", "threshold": 2}, "sitting", {}, False),
    ({"type": "similarity", "threshold": 0.5}, "kitten", {"expected": "sitting"}, True),  # 1 - 3/7 = 0.571
    ({"type": "similarity", "threshold": 0.6}, "kitten", {"expected": "sitting"}, False),
    ({"type": "rouge-l", "value": "the cat sat on the mat"}, "the cat was on the mat", {}, True),  # 5/6
    ({"type": "rouge-l", "value": "the cat sat on the mat", "threshold": 0.9}, "the cat was on the mat", {}, False),
    ({"type": "rouge-n", "value": "a b c d"}, "a b c x", {}, True),      # recall 3/4
    ({"type": "rouge-n", "value": "a b c d", "options": {"n": 2}}, "a b c x", {}, False),  # 2/3 < 0.75
    ({"type": "latency", "threshold": 500}, "x", {"latency_ms": 120.0}, True),
    ({"type": "latency", "threshold": 500}, "x", {"latency_ms": 900.0}, False),
    ({"type": "cost", "threshold": 0.01}, "x", {}, True),
    ({"type": "completion-tokens", "threshold": 16}, "x", {"completion_tokens": 16}, True),
    ({"type": "completion-tokens", "threshold": 16}, "x", {"completion_tokens": 17}, False),
    ({"type": "finish-reason", "value": "stop"}, "x", {"finish_reason": "stop"}, True),
    ({"type": "finish-reason", "value": "stop"}, "x", {"finish_reason": "length"}, False),
]


@pytest.mark.parametrize("spec,output,ctx,passed", CASES, ids=[f"{c[0]['type']}-{'pass' if c[3] else 'fail'}-{i}"
                                                                for i, c in enumerate(CASES)])
def test_every_evaluator_passes_and_fails(spec, output, ctx, passed):
    result = check(spec, output, **ctx)
    assert result.passed is passed, result.reason
    assert 0.0 <= result.score <= 1.0 and result.reason
    negated = check({**spec, "type": "not-" + spec["type"]}, output, **ctx)
    assert negated.passed is (not passed) and negated.type == "not-" + spec["type"]
    assert negated.score == pytest.approx(1 - result.score) and negated.reason.startswith("not: ")


# Checks that cannot be made at all: they fail, and negating them must not turn them into a pass.
UNUSABLE = [
    ({"type": "json-schema"}, '{"n": 3}', {}, "no JSON Schema given"),
    ({"type": "latency", "threshold": 500}, "x", {}, "no latency was measured"),
    ({"type": "completion-tokens", "threshold": 5}, "x", {}, "no token count"),
    ({"type": "contains"}, "anything", {}, "no expected output"),
    ({"type": "starts-with"}, "anything", {}, "no expected output"),
    ({"type": "contains", "value": "{{ missing.attr.deeper }}"}, "x", {}, "failed"),
    ({"type": "llm-rubric", "value": "polite"}, "x", {}, "no judge model"),
    ({"type": "llm-rubric", "value": "polite"}, "x", {"judge": lambda *a: Judgement("purple monkey", 7)},
     "not understood"),
]


@pytest.mark.parametrize("spec,output,ctx,why", UNUSABLE, ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(UNUSABLE)])
def test_checks_that_cannot_be_made_fail_even_when_negated(spec, output, ctx, why):
    result = check(spec, output, **ctx)
    assert not result.passed and result.score == 0.0 and why in result.reason
    negated = check({**spec, "type": "not-" + spec["type"]}, output, **ctx)
    assert not negated.passed and negated.score == 0.0 and why in negated.reason, negated.reason
    assert negated.type == "not-" + spec["type"]


def test_contains_json_passes_when_any_json_in_the_output_matches_the_schema():
    schema = {"type": "object", "required": ["answer"]}
    out = 'Steps: [1, 2]. Result: {"answer": 42} and {"other": 1}'
    assert ev.extract_all_json(out) == [[1, 2], {"answer": 42}, {"other": 1}]
    assert check({"type": "contains-json", "value": schema}, out).passed
    assert not check({"type": "contains-json", "value": schema}, 'x {"other": 1} [3]').passed
    assert check({"type": "not-contains-json", "value": schema}, 'x {"other": 1} [3]').passed
    # Nested values are part of the outer one, not separate candidates.
    assert ev.extract_all_json('{"a": {"answer": 1}}') == [{"a": {"answer": 1}}]


def test_measures_against_known_values():
    assert ev.levenshtein("kitten", "sitting") == 3 and ev.levenshtein("", "abc") == 3 and ev.levenshtein("a", "a") == 0
    assert ev.similarity_ratio("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ev.similarity_ratio("", "") == 1.0
    # LCS("the cat was on the mat", "the cat sat on the mat") = 5 words of 6 and 6: F1 = 10/12.
    assert ev.rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(10 / 12)
    assert ev.rouge_l("", "") == 1.0 and ev.rouge_l("x", "") == 0.0
    assert ev.rouge_n("a b c x", "a b c d", 2) == pytest.approx(2 / 3)
    assert ev.extract_json('text {"a": {"b": [1]}} tail') == (True, {"a": {"b": [1]}})


def test_values_use_item_variables_in_a_sandbox():
    ok = check({"type": "contains", "value": "{{ city | upper }}"}, "PARIS!", variables={"city": "paris"})
    assert ok.passed
    ref = check({"type": "equals", "value": "{{ expected }}!"}, "hi!", expected="hi")
    assert ref.passed
    escape = check({"type": "contains", "value": "{{ ''.__class__.__mro__ }}"}, "x")
    assert not escape.passed and "failed" in escape.reason


def test_missing_reference_fails_with_reason():
    result = check({"type": "contains"}, "anything")
    assert not result.passed and "no expected output" in result.reason


def test_weights_and_summary():
    checks = [
        ev.run(ev.parse({"type": "contains", "value": "a", "weight": 3}), Context("abc")),
        ev.run(ev.parse({"type": "contains", "value": "z", "weight": 1}), Context("abc")),
        ev.run(ev.parse({"type": "contains", "value": "z", "weight": 0}), Context("abc")),
    ]
    passed, score = ev.summarize(checks)
    assert not passed and score == pytest.approx(0.75)
    # As in promptfoo, a failing weight-0 check still fails the output; it only does not move the score.
    assert ev.summarize(checks[:1] + checks[2:]) == (False, 1.0)
    assert ev.summarize(checks[:1]) == (True, 1.0)
    assert ev.summarize(checks[2:]) == (False, 0.0)   # every weight 0: score 0
    assert ev.summarize([]) == (True, None)
    # A threshold (promptfoo's test-level one) judges the weighted score instead of every check.
    assert ev.summarize(checks, threshold=0.75) == (True, pytest.approx(0.75))
    assert ev.summarize(checks, threshold=0.8) == (False, pytest.approx(0.75))
    assert ev.summarize(checks[:1] + checks[2:], threshold=0.9) == (True, 1.0)   # outweighs the weight-0 failure
    assert ev.summarize(checks, threshold=0) == (False, pytest.approx(0.75))    # 0: no threshold, as in promptfoo
    assert ev.item_threshold({"threshold": 0.5}) == 0.5 and ev.item_threshold({"threshold": "0.5"}) == 0.5
    assert ev.item_threshold({}) is None and ev.item_threshold(None) is None
    assert ev.item_threshold({"threshold": 7}) is None and ev.item_threshold({"threshold": "high"}) is None


@pytest.mark.parametrize("spec,message", [
    ({"value": "x"}, "needs a type"),
    ({"type": "containz", "value": "x"}, "unknown evaluator type 'containz'"),
    ({"type": "regex", "value": "("}, "invalid regular expression"),
    ({"type": "regex"}, "needs a value"),
    ({"type": "latency"}, "needs a threshold"),
    ({"type": "similarity", "threshold": 2}, "between 0 and 1"),
    ({"type": "contains", "value": "x", "weight": -1}, "must not be negative"),
    ({"type": "contains", "value": "x", "threshold": "high"}, "must be a number"),
    ({"type": "is-json", "value": {"type": "nope"}}, "invalid JSON Schema"),
    ({"type": "contains", "value": "x", "transform": "output.trim()"}, "unsupported option(s) transform"),
    ({"type": "llm-rubric"}, "needs a value"),
    ({"type": "rouge-n", "options": {"n": 9}}, "options.n"),
])
def test_bad_definitions_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ev.parse(spec)


def test_unsupported_types_from_imports_fail_and_say_why():
    e = ev.parse({"type": "javascript", "value": "output.length > 3"}, allow_unsupported=True)
    assert e.type == ev.UNSUPPORTED and e.full_type == "javascript"
    result = ev.run(e, Context("long enough"))
    assert not result.passed and "'javascript' is not supported" in result.reason
    negated = ev.run(ev.parse({"type": "not-similar", "value": "x"}, allow_unsupported=True), Context("y"))
    assert not negated.passed and negated.type == "not-similar"  # negation never turns "unsupported" into a pass
    transformed = ev.parse({"type": "contains", "value": "x", "transform": "t"}, allow_unsupported=True)
    assert not ev.run(transformed, Context("x")).passed
    assert ev.parse(e.to_dict()) == e   # stored definitions read back the same


def test_promptfoo_csv_shorthand():
    assert ev.parse_shorthand("contains: Paris") == ev.parse({"type": "contains", "value": "Paris"})
    assert ev.parse_shorthand("not-icontains:x").negate
    assert ev.parse_shorthand("is-json").type == "is-json"
    assert ev.parse_shorthand("latency: 300").threshold == 300
    assert ev.parse_shorthand("levenshtein(2): kitten").threshold == 2
    assert ev.parse_shorthand("grade: is polite").type == "llm-rubric"
    assert ev.parse_shorthand("Just text: with a colon").type == "equals"
    assert ev.parse_shorthand("Paris") == ev.Evaluator(type="equals", value="Paris")
    assert ev.parse_shorthand("javascript: 1", allow_unsupported=True).type == ev.UNSUPPORTED
    assert ev.parse("contains-any: a, b").value == ["a", "b"]


def test_unique_names_number_repeats():
    named = ev.unique_names(ev.parse_all([{"type": "contains", "value": "a"}, {"type": "contains", "value": "b"},
                                          {"type": "regex", "value": "x", "name": "format"}]))
    assert [e.label for e in named] == ["contains", "contains #2", "format"]
    with pytest.raises(ValueError, match="evaluator 2: unknown"):
        ev.parse_all([{"type": "contains", "value": "a"}, {"type": "bogus"}])


@pytest.mark.parametrize("text,expected", [
    ('{"reason": "polite and short", "pass": true, "score": 0.9}', (True, 0.9, "polite and short")),
    ('Here you go:\n```json\n{"pass": "no", "score": 2, "reason": "rude"}\n```', (False, 0.2, "rude")),
    ('{"score": 8/10}  PASS', (True, 0.8, None)),
    ("The output FAILS the rubric. Score: 0.1", (False, 0.1, None)),
    ("Yes, it meets the rubric.", (True, 1.0, None)),
    ("I like turtles", (None, None, "")),
    ("", (None, None, "")),
])
def test_judge_answers_are_read_robustly(text, expected):
    passed, score, reason = ev.parse_judgement(text)
    assert passed is expected[0]
    assert score == (pytest.approx(expected[1]) if expected[1] is not None else None)
    if expected[2] is not None:
        assert reason == expected[2]


def test_llm_rubric_uses_the_judge_and_its_threshold():
    asked = []

    def judge(evaluator, rubric, output, variables):
        asked.append((rubric, output))
        return Judgement('{"pass": true, "score": 0.6, "reason": "fine"}', execution_id=42)

    spec = {"type": "llm-rubric", "value": "is about {{ topic }}"}
    result = ev.run(ev.parse(spec), Context("text", variables={"topic": "cats"}, judge=judge))
    assert result.passed and result.score == 0.6 and result.execution_id == 42 and result.reason == "fine"
    assert asked == [("is about cats", "text")]
    strict = ev.run(ev.parse({**spec, "threshold": 0.8}), Context("text", variables={"topic": "c"}, judge=judge))
    assert not strict.passed
    lenient = ev.run(ev.parse({**spec, "threshold": 0.5}), Context("text", variables={"topic": "c"}, judge=judge))
    assert lenient.passed and lenient.score == 0.6
    # As promptfoo: with a threshold the judge must still pass it, a high score alone is not enough.
    failed_high = ev.run(ev.parse({**spec, "threshold": 0.5}), Context(
        "t", judge=lambda *a: Judgement('{"pass": false, "score": 0.9, "reason": "off topic"}')))
    assert not failed_high.passed and failed_high.reason == "off topic"
    garbled = ev.run(ev.parse(spec), Context("t", variables={"topic": "c"},
                                             judge=lambda *a: Judgement("purple monkey", None)))
    assert not garbled.passed and "not understood" in garbled.reason
    assert not ev.run(ev.parse(spec), Context("t", variables={"topic": "c"})).passed  # no judge
    messages = ev.judge_messages("be kind", "hello")
    assert messages[0]["role"] == "system" and "be kind" in messages[1]["content"] and "hello" in messages[1]["content"]
