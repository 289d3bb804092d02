"""Sandboxed rendering: variables, missing variables, syntax errors, sandbox escapes, resource exhaustion,
values that contain template syntax, composition by reference (cycles, depth) and JSON Schema validation."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core import templates as tpl
from core.templates import RenderLimits, render_string

# -- the language -------------------------------------------------------------------------------------------------


def test_variables_loops_conditionals_and_filters():
    source = ("{% for d in docs %}{{ loop.index }}. {{ d.title | upper }}{% if not loop.last %}, {% endif %}"
              "{% endfor %}{% if urgent %} (urgent){% endif %} {{ names | join(' & ') }} {{ n * 2 }}")
    out = render_string(source, {"docs": [{"title": "a"}, {"title": "b"}], "urgent": True, "names": ["x", "y"],
                                 "n": 21})
    assert out == "1. A, 2. B (urgent) x & y 42"


def test_macros_set_namespace_and_blocks_work():
    source = ("{% macro greet(who) %}Hi {{ who }}{% endmacro %}{% set ns = namespace(total=0) %}"
              "{% for i in range(4) %}{% set ns.total = ns.total + i %}{% endfor %}{{ greet(name) }} {{ ns.total }}"
              "{{ ' ' ~ dict(a=1)['a'] }}")
    assert render_string(source, {"name": "Bo"}) == "Hi Bo 6 1"


def test_trim_blocks_keep_prompts_tidy():
    source = "Rules:\n{% for r in rules %}\n- {{ r }}\n{% endfor %}\nEnd\n"
    assert render_string(source, {"rules": ["a", "b"]}) == "Rules:\n- a\n- b\nEnd\n"


@pytest.mark.parametrize("value", ["{{ secret }}", "{% for i in range(10**9) %}x{% endfor %}", "{# c #}",
                                   "{{ ''.__class__ }}", "{% include 'other' %}"])
def test_values_are_data_never_rendered(value):
    assert render_string("<{{ v }}>", {"v": value}) == f"<{value}>"
    assert render_string("{{ items | join(',') }}", {"items": [value, value]}) == f"{value},{value}"


def test_values_with_template_syntax_in_a_saved_template(pool):
    tpl.create_template(pool, "echo", [{"role": "system", "content": "Quote: {{ q }}"},
                                       {"role": "user", "content": "{{ q | upper }}"}])
    rendered = tpl.render_template_by_name(pool, "echo", {"q": "{{ 7 * 7 }}"})
    assert rendered.messages == [{"role": "system", "content": "Quote: {{ 7 * 7 }}"},
                                 {"role": "user", "content": "{{ 7 * 7 }}"}]
    assert rendered.prompt is None and rendered.variables == {"q": "{{ 7 * 7 }}"}


# -- missing variables and syntax errors --------------------------------------------------------------------------


def test_every_missing_variable_is_named_even_in_branches_not_taken():
    with pytest.raises(tpl.MissingVariables) as info:
        render_string("{{ a }} {% if b %}{{ c }}{% else %}{% for x in d %}{{ x }}{% endfor %}{% endif %}",
                      {"unrelated": 1})
    assert info.value.names == ["a", "b", "c", "d"]
    assert str(info.value) == "missing variables: a, b, c, d"


def test_missing_variables_of_a_chat_template_named_across_messages(pool):
    tpl.create_template(pool, "c", [{"role": "system", "content": "{{ role }}"},
                                    {"role": "user", "content": "{{ topic }} {{ role }}"}])
    with pytest.raises(tpl.MissingVariables, match="missing variables: role, topic"):
        tpl.render_template_by_name(pool, "c", {})
    with pytest.raises(tpl.MissingVariables, match="^missing variable: topic$"):
        tpl.render_template_by_name(pool, "c", {"role": "r"})


def test_optional_variables_with_is_defined_and_default():
    source = "{% if extra is defined %}[{{ extra }}]{% endif %}{{ tone | default('neutral') }}"
    assert render_string(source, {}) == "neutral"
    assert render_string(source, {"extra": "E", "tone": "warm"}) == "[E]warm"


def test_undefined_used_outside_its_guard_is_still_missing():
    with pytest.raises(tpl.MissingVariables, match="missing variable: x"):
        render_string("{% if x is defined %}ok{% endif %}{{ x }}", {})


def test_missing_attribute_is_an_error():
    with pytest.raises(tpl.MissingVariables, match="'dict object' has no attribute 'nme'"):
        render_string("{{ user.nme }}", {"user": {"name": "a"}})


@pytest.mark.parametrize("source, lineno, detail", [
    ("Hello {{ name ", 1, "unexpected end of template"),
    ("ok\nok\n{% for x in %}", 3, "Expected an expression"),
    ("a\n{% if x %}\nb", 3, "Unexpected end of template"),
    ("a\n{% endfor %}", 2, "Encountered unknown tag 'endfor'"),
    ("{{ x | no_such_filter }}", 1, "No filter named 'no_such_filter'"),
    ("{% include name_in_a_variable %}", 1, "literal name"),
    ("{% include '../etc/passwd' %}", 1, "is not a template reference"),
])
def test_syntax_errors_carry_line_number_and_message(source, lineno, detail):
    with pytest.raises(tpl.TemplateSyntaxError) as info:
        tpl.extract_variables(source)
    assert info.value.lineno == lineno and detail in str(info.value)
    assert str(info.value).startswith(f"syntax error at line {lineno}: ")
    analysis = tpl.analyze(source)
    assert analysis.lineno == lineno and detail in analysis.error


def test_analyze_reports_variables_and_includes_while_typing():
    ok = tpl.analyze([{"role": "system", "content": "{% include 'base@production' %} {{ a }}"},
                      {"role": "user", "content": "{% for i in items %}{{ i.x }}{% endfor %}{{ b }}"}])
    assert ok.error is None and ok.variables == ["a", "b", "items"] and ok.includes == ["base@production"]
    bad = tpl.analyze([{"role": "system", "content": "ok"}, {"role": "user", "content": "{{ a }}\n{% if %}"}])
    assert bad.message_index == 1 and bad.lineno == 2 and bad.error.startswith(
        "syntax error in message 2 (user) at line 2")
    assert tpl.analyze("") == tpl.Analysis([], [])
    assert tpl.analyze([{"role": "system", "content": "{{ a }}"}, {"role": "user", "content": ""}]).variables == ["a"]


def test_runtime_errors_are_one_line_with_the_line_number():
    with pytest.raises(tpl.RenderError, match=r"^line 3: ZeroDivisionError: division by zero$"):
        render_string("a\nb\n{{ 1 / 0 }}", {})
    with pytest.raises(tpl.RenderError, match="line 1"):
        render_string("{{ n + 'a' }}", {"n": 1})


# -- sandbox ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__['os'].environ }}",
    "{{ x.__class__.__base__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ x | attr('__class__') }}",
    "{{ '{0.__class__.__mro__}'.format(x) }}",
    "{{ '{0.__globals__}'.format_map({'0': cycler.__init__}) }}",
    "{{ range.__self__ }}",
    "{{ (x.items).__self__ }}",
    "{{ dict.mro()[1].__subclasses__() }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
])
def test_sandbox_escapes_are_blocked(source):
    with pytest.raises(tpl.RenderError) as info:
        render_string(source, {"x": {"a": 1}})
    assert isinstance(info.value, (tpl.SandboxViolation, tpl.MissingVariables))
    assert "is unsafe" in str(info.value) or "has no attribute" in str(info.value)


@pytest.mark.parametrize("source", ["{{ os.environ }}", "{{ config }}", "{{ request }}", "{{ lipsum() }}",
                                    "{{ __builtins__ }}", "{{ open('/etc/passwd').read() }}",
                                    "{{ import('os') }}"])
def test_python_internals_are_simply_not_there(source):
    with pytest.raises(tpl.MissingVariables):
        render_string(source, {})


def test_mutating_builtin_values_is_blocked():
    data = {"items": [1, 2]}
    with pytest.raises(tpl.SandboxViolation, match="unsafe"):
        render_string("{{ items.append(3) }}", data)
    assert data["items"] == [1, 2]


def test_unsafe_errors_name_the_attribute():
    with pytest.raises(tpl.SandboxViolation, match=r"^line 1: blocked by the sandbox: access to attribute "
                                                   r"'__class__' of 'str' object is unsafe$"):
        render_string("{{ ''.__class__ }}", {})


# -- resource exhaustion -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "range"),
    ("{{ range(10**30) | list }}", "range"),
    ("{{ 'a' * 10**9 }}", "exceeds the limit"),
    ("{{ [1, 2] * 10**9 }}", "exceeds the limit"),
    ("{{ 10 ** (10 ** 8) }}", "number too large"),
    ("{{ 'a'.ljust(10**9) }}", "exceeds the limit"),
    ("{{ 'a' | center(10**9) }}", "exceeds the limit"),
    ("{{ ('x\\n' * 100) | indent(999999) }}", "exceeds the limit"),
    ("{{ '%1000000000s' % 'a' }}", "format width"),
    ("{{ '%*s' % (10**9, 'a') }}", "exceeds the limit"),
    ("{{ '{:>1000000000}'.format('a') }}", "format width"),
    ("{{ '{:>{w}}'.format('a', w=10**9) }}", "exceeds the limit"),
    ("{{ ('aaaa' * 200000) | replace('a', 'bbbbbbbbbb') }}", "exceeds the limit"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "joined"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "joined"),
    ("{% set s = 'x' * 500000 %}{{ [s, s, s] | join }}", "joined"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for i in range(2000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered prompt is longer"),
    ("{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}", "recursion deeper than 50"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "steps"),
    ("{% for x in tree recursive %}{{ loop([x]) }}{% endfor %}", "recursion deeper than 50"),
])
def test_resource_exhaustion_is_cut_off_with_a_clear_error(source, message):
    limits = RenderLimits(max_steps=200_000)
    started = time.monotonic()
    with pytest.raises(tpl.RenderLimitExceeded, match=message):
        render_string(source, {"tree": [1]}, limits=limits)
    assert time.monotonic() - started < 5


def test_default_limits_stop_exponential_work_quickly():
    started = time.monotonic()
    with pytest.raises(tpl.RenderLimitExceeded):
        render_string("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}")
    assert time.monotonic() - started < 10


def test_time_limit():
    limits = RenderLimits(max_seconds=0.2, max_steps=10**9)
    started = time.monotonic()
    with pytest.raises(tpl.RenderLimitExceeded, match="longer than 0.2 s"):
        render_string("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      limits=limits)
    assert time.monotonic() - started < 3


def test_big_but_legal_work_is_fine():
    out = render_string("{% for i in range(50000) %}{{ i % 10 }}{% endfor %}{{ ('ab' * 1000) | length }}", {})
    assert len(out) == 50000 + 4
    assert render_string("{{ '%d' % n }} {{ 'a' ~ n }} {{ dict(n=n)['n'] }}", {"n": 10**12}) == \
        "1000000000000 a1000000000000 1000000000000"


def test_a_huge_value_is_refused_not_rendered():
    with pytest.raises(tpl.RenderLimitExceeded, match="rendered prompt is longer"):
        render_string("{{ doc }}", {"doc": "x" * 2_000_000})


# -- composition by reference -------------------------------------------------------------------------------------


def test_include_by_name_label_and_version(pool):
    tpl.create_template(pool, "persona", "You are {{ role }}, v1.")
    tpl.update_template(pool, "persona", "You are {{ role }}, v2.")
    tpl.update_template(pool, "persona", "You are {{ role }}, v3.")
    tpl.set_label(pool, "persona", "production", 2)
    tpl.create_template(pool, "main", [
        {"role": "system", "content": "{% include 'persona' %} | {% include 'persona@latest' %} | "
                                      "{% include 'persona@1' %} | {% include 'persona@production' %}"},
        {"role": "user", "content": "{{ question }}"}])
    rendered = tpl.render_template_by_name(pool, "main", {"role": "a pirate", "question": "why?"})
    assert rendered.messages[0]["content"] == ("You are a pirate, v2. | You are a pirate, v3. | "
                                               "You are a pirate, v1. | You are a pirate, v2.")
    tpl.set_label(pool, "persona", "production", 3)  # includes follow label moves
    rendered = tpl.render_template_by_name(pool, "main", {"role": "r", "question": "q"})
    assert rendered.messages[0]["content"].startswith("You are r, v3.")
    assert tpl.required_variables(pool, tpl.get_template_by_name(pool, "main")) == ["question", "role"]


def test_included_templates_see_loop_variables_and_macros_can_be_imported(pool):
    tpl.create_template(pool, "row", "- {{ item }}\n")
    tpl.create_template(pool, "macros", "{% macro shout(x) %}{{ x | upper }}!{% endmacro %}")
    tpl.create_template(pool, "list", "{% for item in items %}{% include 'row' %}{% endfor %}"
                                      "{% from 'macros' import shout %}{{ shout(title) }}")
    assert tpl.render_template_by_name(pool, "list", {"items": ["a", "b"], "title": "t"}).prompt == "- a\n- b\nT!"


def test_missing_variables_of_included_templates_are_named(pool):
    tpl.create_template(pool, "inner", "{{ deep }}")
    tpl.create_template(pool, "outer", "{{ top }}{% if never %}{% include 'inner' %}{% endif %}")
    with pytest.raises(tpl.MissingVariables, match="missing variables: deep, never, top"):
        tpl.render_template_by_name(pool, "outer", {})


def test_include_of_unknown_or_chat_template_is_refused_at_save(pool):
    with pytest.raises(tpl.IncludeError, match="include 'ghost': no template named 'ghost'"):
        tpl.create_template(pool, "x", "{% include 'ghost' %}")
    tpl.create_template(pool, "base", "b")
    with pytest.raises(tpl.IncludeError, match="no label 'staging'"):
        tpl.create_template(pool, "x", "{% include 'base@staging' %}")
    with pytest.raises(tpl.IncludeError, match="no version 4"):
        tpl.create_template(pool, "x", "{% include 'base@4' %}")
    tpl.create_template(pool, "chatty", [{"role": "user", "content": "hi"}])
    with pytest.raises(tpl.IncludeError, match="only text templates can be included"):
        tpl.create_template(pool, "x", "{% include 'chatty' %}")
    tpl.create_template(pool, "x", "{% include 'ghost' ignore missing %}ok")
    assert tpl.render_template_by_name(pool, "x", {}).prompt == "ok"


def test_include_cycles_are_refused(pool):
    with pytest.raises(tpl.IncludeError, match="include cycle: self@new → self@new"):
        tpl.create_template(pool, "self", "{% include 'self' %}")
    tpl.create_template(pool, "a", "A")
    tpl.create_template(pool, "c", "C {% include 'a' %}")
    with pytest.raises(tpl.IncludeError, match="include cycle: a@new → c@1 → a@new"):
        tpl.update_template(pool, "a", "A {% include 'c' %}")
    # a cycle made later by moving labels is refused at render time
    tpl.create_template(pool, "b", "B {% include 'a@1' %}")
    tpl.set_label(pool, "b", "production", 1)
    tpl.update_template(pool, "a", "A2 {% include 'b@production' %}")
    tpl.set_label(pool, "a", "production", 1)
    tpl.update_template(pool, "b", "B2 {% include 'a@production' %}")
    assert tpl.render_template_by_name(pool, "a", {}, version=2).prompt == "A2 B A"
    tpl.set_label(pool, "b", "production", 2)
    assert tpl.render_template_by_name(pool, "a", {}, version=2).prompt == "A2 B2 A"
    tpl.set_label(pool, "a", "production", 2)
    with pytest.raises(tpl.IncludeError, match="include cycle: a@2 → b@2 → a@2"):
        tpl.render_template_by_name(pool, "a", {})


def test_include_depth_is_limited(pool):
    tpl.create_template(pool, "l0", "end")
    for i in range(1, 6):
        tpl.create_template(pool, f"l{i}", f"{i} {{% include 'l{i - 1}' %}}")
    assert tpl.render_template_by_name(pool, "l5", {}).prompt == "5 4 3 2 1 end"
    with pytest.raises(tpl.IncludeError, match="nested deeper than 5"):
        tpl.create_template(pool, "l6", "6 {% include 'l5' %}")
    tpl.create_template(pool, "l6", "6 {% include 'l4' %}")
    tpl.update_template(pool, "l1", "1 {% include 'l0' %} more")
    # deepen an included template after the fact: refused at render
    tpl.create_template(pool, "z0", "z")
    tpl.update_template(pool, "l0", "end {% include 'z0' %}")
    chain = "l5@1 → l4@1 → l3@1 → l2@1 → l1@2 → l0@2 → z0@1"
    with pytest.raises(tpl.IncludeError, match=f"nested deeper than 5: {chain}"):
        tpl.render_template_by_name(pool, "l5", {})


def test_render_string_can_include_from_the_repository(pool):
    tpl.create_template(pool, "sig", "-- {{ who }}")
    assert render_string("Hi{% include 'sig' %}", {"who": "me"}, pool=pool) == "Hi-- me"
    with pytest.raises(tpl.IncludeError, match="only be included when rendering from the template repository"):
        render_string("Hi{% include 'sig' %}", {"who": "me"})


# -- JSON Schema ----------------------------------------------------------------------------------------------------


SCHEMA = {"type": "object", "required": ["topic", "level"], "properties": {
    "topic": {"type": "string", "minLength": 2}, "level": {"type": "integer", "minimum": 1},
    "tone": {"type": "string", "default": "friendly"}}}


def test_input_schema_is_checked_before_rendering(pool):
    tpl.create_template(pool, "s", "{{ topic }} at level {{ level }}, {{ tone }}", input_schema=SCHEMA)
    assert tpl.render_template_by_name(pool, "s", {"topic": "go", "level": 2}).prompt == "go at level 2, friendly"
    with pytest.raises(tpl.InvalidVariables) as info:
        tpl.render_template_by_name(pool, "s", {"topic": "g", "level": "high"})
    assert info.value.errors == ["level: 'high' is not of type 'integer'", "topic: 'g' is too short"]
    assert str(info.value).startswith("variables do not match the input schema: ")
    with pytest.raises(tpl.MissingVariables, match="missing variable: level"):
        tpl.render_template_by_name(pool, "s", {"topic": "go"})


def test_coerce_variables_from_text_inputs():
    got = tpl.coerce_variables(SCHEMA, {"topic": "42", "level": "3", "other": "7"})
    assert got == {"topic": "42", "level": 3, "other": "7"}
    assert tpl.coerce_variables(None, {"a": "1"}) == {"a": "1"}
    assert tpl.validate_variables(SCHEMA, got) == []


def test_output_schema_validation():
    tv = tpl.TemplateVersion(1, 1, "n", 1, "text", [], "x", {}, None, {"type": "object", "required": ["answer"]},
                             [], "", None, "", "0" * 64)
    assert tpl.validate_output(tv, '{"answer": 1}') == []
    assert tpl.validate_output(tv, '{"other": 1}') == ["'answer' is a required property"]
    assert tpl.validate_output(tv, "not json")[0].startswith("output is not JSON")


def test_render_content_previews_unsaved_edits(pool):
    tpl.create_template(pool, "base", "[base {{ x }}]")
    rendered = tpl.render_content(pool, [{"role": "system", "content": "{% include 'base' %}"},
                                         {"role": "user", "content": "{{ y }}"}], {"x": 1, "y": 2})
    assert rendered.messages == [{"role": "system", "content": "[base 1]"}, {"role": "user", "content": "2"}]
    assert rendered.template_version is None


def test_render_throughput_is_reasonable():
    source = "You are {{ role }}.\n{% for d in docs %}- {{ d.title }}: {{ d.body | truncate(80) }}\n{% endfor %}"
    variables = {"role": "helpful", "docs": [{"title": f"t{i}", "body": "lorem ipsum " * 20} for i in range(5)]}
    started = time.perf_counter()
    for _ in range(500):
        render_string(source, variables)
    assert (time.perf_counter() - started) / 500 < 0.01


# -- memory and CPU bombs found in review: each runs in a forked child with a memory cap, so a regression fails
# -- the test instead of exhausting the machine --------------------------------------------------------------------


def _render_in_child(source: str, variables: dict, conn) -> None:
    import os
    import resource

    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = mapped + 1_500_000_000  # 1.5 GB more than the (forked) test process already maps
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    started = time.monotonic()
    try:
        out = render_string(source, variables)
        conn.send(("ok", f"{len(out)} characters", time.monotonic() - started))
    except tpl.TemplateError as exc:
        conn.send((type(exc).__name__, str(exc), time.monotonic() - started))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send((type(exc).__name__, str(exc)[:200], time.monotonic() - started))


def render_isolated(source: str, variables: dict | None = None, timeout: float = 30) -> tuple[str, str, float]:
    """(exception class name or 'ok', message, seconds) of rendering source in a memory-capped child process."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_render_in_child, args=(source, variables or {}, child))
    proc.start()
    try:
        if not parent.poll(timeout):
            return "hang", f"no answer in {timeout} s", timeout
        return parent.recv()
    finally:
        proc.kill()
        proc.join()


S = "{% set s = 'x' * 1000000 %}"
DAG = "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
DDAG = "{% set ns = namespace(d={}) %}{% for i in range(40) %}{% set ns.d = {'a': ns.d, 'b': ns.d} %}{% endfor %}"


@pytest.mark.parametrize("source, message", [
    # textwrap breaks a long word in quadratic time: this one used to run for minutes
    ("{{ ('a' * 999999) | wordwrap(1) }}", "wordwrap"),
    ("{{ ('a' * 500000) | wordwrap(1, wrapstring='xxxxxxxxxxxxxxxxxxxx') }}", "wordwrap"),
    ("{{ ('a\xa0' * 200000) | wordwrap(1) }}", "wordwrap"),  # textwrap does not split on non-ASCII spaces
    # a short list of long strings, turned into text (used to allocate gigabytes)
    (S + "{{ [s] * 1000 }}", "list or mapping"),
    (S + "{{ [s, s, s, s, s, s, s, s, s, s, s] | string | length }}", "list or mapping"),
    (S + "{% set l = [s, s, s] %}{{ l | string | length }}", "text of a value would be longer"),
    (S + "{% set l = [s, s, s] %}{{ l | tojson | length }}", "text of a value would be longer"),
    (S + "{% set l = [s, s, s] %}{{ l | pprint | length }}", "text of a value would be longer"),
    (S + "{% set l = [s, s, s] %}{{ (l ~ '') | length }}", "joined text"),
    (S + "{% set l = [s, s, s] %}{{ [l, l] | join | length }}", "joined text"),
    (S + "{% set l = [s, s, s] %}{{ l }}", "rendered prompt is longer"),
    # one argument used by many fields of a format string
    (S + "{{ ('%(a)s' * 1000) % {'a': s} }}", "formatted text"),
    (S + "{{ ('{0}' * 1000).format(s) | length }}", "formatted text"),
    (S + "{{ ('{a}' * 1000).format_map({'a': s}) | length }}", "formatted text"),
    (S + "{{ ('%(a)s' * 1000) | format(a=s) | length }}", "formatted text"),
    ("{{ ('%999999s' * 1000) | format(*range(1000)) | length }}", "formatted text"),
    ("{{ ('{:>{w}}' * 1000).format(*range(1000), w=999999) | length }}", "formatted text"),
    # other multiplying string methods
    ("{% set s = 'x' * 100000 %}{{ ('a' * 100000).translate({97: s}) | length }}", "translated text"),
    ("{% set s = 'x' * 100000 %}{{ ('a' * 100000).translate(''.maketrans({'a': s})) | length }}", "translated text"),
    ("{{ ('\t' * 8000).expandtabs(999999) | length }}", "expanded text"),
    ("{% set b = ('a' * 100000).encode() %}{{ b.replace('a'.encode(), b) | length }}", "replaced text"),
    # shared sub-lists nested 40 deep: 2**40 items as text, in comparisons, hashing, JSON (used to hang)
    (DAG + "{{ ns.l | string | length }}", "list or mapping"),
    (DAG + "{{ ns.l == ns.l[0] }}", "list or mapping"),
    (DAG + "{{ ns.l | tojson | length }}", "list or mapping"),
    (DDAG + "{{ ns.d | xmlattr | length }}", "list or mapping"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = dict(a=ns.l, b=ns.l) %}{% endfor %}",
     "list or mapping"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = [ns.l] * 2 %}{% endfor %}",
     "list or mapping"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = [0, 0] | map('default', ns.l, true)"
     " | list %}{% endfor %}", "list or mapping"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = {}.fromkeys([1, 2], ns.l) %}"
     "{% endfor %}", "list or mapping"),
    # text buffered by macros, blocks and {% set %} blocks (never went through the output limit)
    (S + "{% macro m() %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}{{ m() | length }}",
     "block of text"),
    ("{% macro m() %}{% for i in range(100000) %}" + "y" * 10000 + "{% endfor %}{% endmacro %}{{ m() | length }}",
     "block of text"),
    ("{% set ns = namespace(s='a' * 500000) %}{% for i in range(30) %}{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}"
     "{% set ns.s = t %}{% endfor %}", "block of text"),
    ("{% if false %}{% block b %}{% for i in range(100000) %}" + "y" * 10000 + "{% endfor %}{% endblock %}"
     "{% endif %}{{ self.b() | length }}", "block of text"),
    # lazy sequences (map, select, batch …) materialised by a filter or by *args
    ("{{ range(100000) | map('center', 999999) | join | length }}", "list or mapping"),
    ("{{ range(100000) | map('center', 999999) | list | length }}", "list or mapping"),
    ("{{ ', '.join(range(100000) | map('center', 999999)) | length }}", "list or mapping"),
    ("{{ cycler(*(range(100000) | map('center', 999999))) }}", "list or mapping"),
    ("{{ ('a' * 2) | slice(999999, 'x' * 999999) | list | length }}", "list or mapping"),
])
def test_memory_and_cpu_bombs_are_cut_off(source, message):
    kind, text, seconds = render_isolated(source)
    assert kind == "RenderLimitExceeded", (kind, text)
    assert message in text and seconds < 10, (text, seconds)


def test_a_cyclic_namespace_renders_without_hanging():
    assert render_string("{% set ns = namespace(n=1) %}{% set ns.me = ns %}{{ ns.n }}") == "1"
    assert "Namespace" in render_string("{% set ns = namespace(n=1) %}{% set ns.me = ns %}{{ ns }}")


def test_large_but_legal_values_still_render():
    body = "lorem ipsum " * 75_000  # 900,000 characters
    assert len(render_string("{{ '{}: {}'.format(title, body) }}", {"title": "T", "body": body})) == 900_003
    assert len(render_string("{{ '%s: %s' % (title, body) }}", {"title": "T", "body": body})) == 900_003
    assert len(render_string("{{ items | join(',') }}", {"items": list(range(100_000))})) == 588_889
    assert render_string("{{ '{:,}'.format(n) }} {{ '%d tokens' | format(n) }} {{ x | default(5000000) }}",
                         {"n": 12_000_000}) == "12,000,000 12000000 tokens 5000000"
    assert render_string("{{ ('a' * 1000) | wordwrap(10) | length }}") == "1099"
    started = time.monotonic()  # the check of wordwrap's work is itself linear (a regex here once took minutes)
    assert render_string("{{ s | wordwrap(450000) | length }}", {"s": "a" * 400_000 + " " + "a" * 400_000}) \
        == "800001"
    assert time.monotonic() - started < 3
    assert render_string("{{ docs | selectattr('keep') | map(attribute='t') | join('+') }}",
                         {"docs": [{"t": "a", "keep": True}, {"t": "b", "keep": False}, {"t": "c", "keep": 1}]}) \
        == "a+c"
    assert render_string("{% macro m() %}[{{ caller() }}]{% endmacro %}{% call m() %}x{% endcall %}") == "[x]"
    assert render_string("{{ (a, b) | join('-') }} {{ dict(k=[a]) }}", {"a": 1, "b": 2}) == "1-2 {'k': [1]}"


# -- sources the parser or Python's compiler cannot take: one clear syntax error, never a crash ------------------


@pytest.mark.parametrize("source, detail", [
    ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "nested too deeply"),
    ("{{ " + "[" * 3000 + "1" + "]" * 3000 + " }}", "nested too deeply"),
    ("{% if a %}" * 2000 + "x" + "{% endif %}" * 2000, "nested too deeply"),
    ("{% for a in b %}" * 30 + "x" + "{% endfor %}" * 30, "nested too deeply"),
    ("{{ a" + " | upper" * 5000 + " }}", "nested too deeply"),
    ("{{ " + "not " * 5000 + "a }}", "nested too deeply"),
    ("{% macro m() %}" * 300 + "{% endmacro %}" * 300, "nested too deeply"),
    ("{{ " + "9" * 5000 + " }}", "a number in it is too long"),
    ("{{ 0x" + "f" * 3000 + " }}", "a number in the template is too large"),
    ("{{ 1e999999 }}", "a number in the template is too large"),
])
def test_sources_too_deep_or_too_big_are_syntax_errors(source, detail):
    with pytest.raises(tpl.TemplateSyntaxError, match=detail):
        tpl.extract_variables(source)
    analysis = tpl.analyze(source)
    assert analysis.error.startswith("syntax error") and detail in analysis.error
    with pytest.raises(tpl.TemplateSyntaxError, match=detail):
        render_string(source, {"a": 1, "b": []})


def test_too_deep_source_is_refused_at_save(pool):
    with pytest.raises(tpl.TemplateSyntaxError, match=r"in message 2 \(user\): the template is nested too deeply"):
        tpl.create_template(pool, "deep", [{"role": "system", "content": "ok"},
                                           {"role": "user", "content": "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"}])
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_template(pool, "deep")


def test_coerce_variables_ignores_a_schema_that_is_not_an_object():
    assert tpl.coerce_variables([1, 2], {"a": "1"}) == {"a": "1"}  # type: ignore[arg-type]
    assert tpl.coerce_variables({"properties": [1]}, {"a": "1"}) == {"a": "1"}
    with pytest.raises(tpl.TemplateError, match="input schema must be a JSON object"):
        tpl.render_content(None, "{{ a }}", {"a": 1}, input_schema=[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("source", [
    "{{ ('%(' * 500000) % {} }}",  # each unclosed key used to be scanned to the end: hours
    "{{ ('%(' * 500000) | format(a=1) }}",
    "{{ ('{' ~ ':' * 999990).format() }}",
    "{{ ('%.' * 500000) % () }}",
])
def test_format_strings_are_checked_in_linear_time(source):
    kind, text, seconds = render_isolated(source)
    assert kind == "RenderError" and seconds < 5, (kind, text, seconds)
    assert text.startswith("line 1: ") and "format" in text


# -- the sandbox stands alone: no database import ------------------------------------------------------------------


def test_the_sandbox_modules_import_nothing_of_the_database():
    package = Path(tpl.__file__).parent
    for part in ("sandbox", "budget", "types", "errors"):  # the sandbox and the modules it is built on
        tree = ast.parse((package / f"{part}.py").read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {"." * node.level + (node.module or "") for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        database = {m for m in imported if m.split(".")[0] in ("psycopg", "psycopg_pool") or m == "core.db"
                    or m.lstrip(".") in ("store", "render", "interchange", "diff", "content")}
        assert not database, (part, database)


def test_the_sandbox_renders_without_the_database_modules():
    """Loaded without the package's __init__ (which re-exports the store), the sandbox compiles and renders, and
    neither psycopg_pool, core.db nor the store is imported. (psycopg itself is loaded by core.errors, the error
    contract every module shares, for its OperationalError.)"""
    code = textwrap.dedent("""
        import json, sys, types
        from pathlib import Path
        import core
        package = types.ModuleType("core.templates")  # the package without its __init__
        package.__path__ = [str(Path(core.__file__).parent / "templates")]
        sys.modules["core.templates"] = package
        from core.templates import budget, sandbox
        from core.templates.types import RenderLimits
        b = budget._Budget(RenderLimits())
        budget._BUDGET.set(b)
        print(json.dumps([sandbox._run(sandbox._compile("Hi {{ name }}"), {"name": "Ada"}, b, ""),
                          sorted(m for m in sys.modules if m.startswith(("psycopg_pool", "core.")))]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    rendered, loaded = json.loads(result.stdout)
    assert rendered == "Hi Ada"
    assert not [m for m in loaded if m.startswith("psycopg_pool") or m in ("core.db", "core.templates.store")], loaded


@pytest.mark.parametrize("check, value", [
    (tpl.check_name, "greet\n"), (tpl.check_name, "greet\r\n"), (tpl.check_label, "production\n"),
])
def test_names_and_labels_with_a_trailing_newline_are_refused_as_invalid_input(check, value):
    """`$` also matches before a final newline: the whole text must match."""
    with pytest.raises(tpl.TemplateError) as caught:
        check(value)
    assert caught.value.status == 422

