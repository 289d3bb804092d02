"""Freezing the process through templates and evaluator values: huge whole numbers on every arithmetic path, tests
that did not count as steps, and sources too big to compile. Each class is tried with several payloads through the
Python API and a page or the CLI: refused with one clear line (no object reprs, no addresses), nothing stored, a
ticker thread never stalled more than 0.5 s, and the call over within its limit."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
from streamlit.testing.v1 import AppTest

from core import evaluators
from core import templates as tpl
from core.cli import main
from core.templates import sandbox
from tests.conftest import APP_PATH

MAX_STALL = 0.5


@contextmanager
def ticker(limit: float):
    """Measure the worst gap of a thread that wakes every 10 ms, and the time the block takes."""
    stop, worst = threading.Event(), [0.0]

    def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.01)
            now = time.monotonic()
            worst[0] = max(worst[0], now - last)
            last = now

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        thread.join()
    assert worst[0] <= MAX_STALL, f"another thread stalled {worst[0]:.2f} s"
    assert elapsed <= limit, f"took {elapsed:.2f} s (limit {limit} s)"


def one_plain_line(message: str) -> None:
    assert "\n" not in message and "0x" not in message and " object at " not in message, message
    assert "Traceback" not in message and "sys.set_int_max_str_digits" not in message, message


HEX = "{% set x = ('f' * 300000) | int(base=16) %}"
BIG = "{% set x = ('f' * 2400) | int(base=16) %}"  # 9,600 bits: just under the limit

NUMBER_BOMBS = [
    HEX + "{{ x // 7 }}",  # int() of hex text: linear in C, any size
    "{% set x = ('z' * 200000) | int(base=36) %}{{ x - 1 }}",
    "{% set x = ('1' * 9000) | int(base=2) %}{{ x }}" + "{% set y = ('9' * 4000) | int %}{{ y }}",
    "{% set x = ('7' * 5000) | int(base=0) %}{{ x }}",
    BIG + "{{ x * x }}",
    BIG + "{{ x * 2 ** 500 }}",
    BIG + "{% set y = x * 2 ** 399 %}{{ y + y + y + y }}",
    BIG + "{% set y = x * 2 ** 399 %}{{ -(y - -y) - y - y }}",
    "{{ 3 ** 100000 }}",
    "{{ 9 ** (9 ** 9) }}",
    BIG + "{{ x ** 2 }}",
    "{{ 5 | round(10000000, 'floor') }}",
    "{{ 5 | round(-10000000) }}",
    "{{ (1).to_bytes(1500000000, 'big') | length }}",
    "{{ (1).from_bytes(('x' * 100000).encode(), 'big') % 7 }}",
    BIG + "{% set y = x * 1.5 %}{{ y }}",
    BIG + "{{ (x * 4) | float }}",
    BIG + "{{ x | float * 10 }}",
    BIG + "{{ x | filesizeformat }}",
    "{{ range(10 ** 4000, 10 ** 4000 + 3) | list }}",
    "{{ ([[1]] * 100000) | sum(start=[]) | length }}",
    "{% set ns = namespace(v=[]) %}{{ ([[1] * 100] * 50000) | sum(start=ns.v) | length }}",
]


@pytest.mark.parametrize("source", NUMBER_BOMBS)
def test_huge_numbers_are_refused_before_they_are_built(source):
    with ticker(5.0), pytest.raises(tpl.RenderLimitExceeded) as caught:
        tpl.render_string(source)
    one_plain_line(str(caught.value))
    assert any(word in str(caught.value) for word in ("number too large", "precision", "exceeds the limit", "sum:"))


@pytest.mark.parametrize("source, variables", [
    ("{{ x // 3 }}", {"x": 10 ** 5000}),
    ("{{ x % 3 }}", {"x": -(10 ** 5000)}),
    ("{{ -x }}", {"x": 10 ** 5000}),
    ("{{ x }}", {"x": 10 ** 5000}),
    ("{{ x is divisibleby(7) }}", {"x": 10 ** 5000}),
    ("{{ 7 is divisibleby(x) }}", {"x": 10 ** 5000}),
    ("{{ x is odd }}", {"x": 7 ** 5000}),
    ("{{ [x] }}", {"x": 10 ** 5000}),
    ("{{ x | string }}", {"x": 10 ** 5000}),
])
def test_huge_numbers_given_as_variables_are_refused(source, variables):
    with ticker(5.0), pytest.raises(tpl.RenderLimitExceeded, match="number too large") as caught:
        tpl.render_string(source, variables)
    one_plain_line(str(caught.value))


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% if i is divisibleby(3) %}{% endif %}{% endfor %}",
    "{% for i in range(100000) %}{% if i is odd %}{% endif %}{% endfor %}",
    "{% for i in range(100000) %}{{ '' if i is eq(-1) }}{% endfor %}",
    "{% for i in range(100000) %}{% set x = -i // 3 - i %}{% endfor %}",
])
def test_tests_and_every_operator_count_as_steps(source):
    with ticker(5.0), pytest.raises(tpl.RenderLimitExceeded, match="steps"):
        tpl.render_string(source, limits=tpl.RenderLimits(max_steps=150_000))


def test_ordinary_arithmetic_still_works():
    out = tpl.render_string(
        "{{ 2 ** 100 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ -5 }} {{ +5 }} {{ 10 - 3 }} {{ 7 / 2 }} {{ 'ff' | int(base=16) }} "
        "{{ '12' | int }} {{ '3.9' | int }} {{ 3.14159 | round(2) }} {{ 1234 | round(-2) }} {{ [1, 2, 3] | sum }} "
        "{{ [[1], [2]] | sum(start=[]) }} {{ 6 is divisibleby 3 }} {{ '%d' % n }} {{ '{:,}'.format(n) }} "
        "{{ (255).to_bytes(2, 'big') | length }} {{ n | filesizeformat }}", {"n": 10 ** 12})
    assert out == ("1267650600228229401496703205376 3 1 -5 5 7 3.5 255 12 3 3.14 1200 6 [1, 2] True "
                   "1000000000000 1,000,000,000,000 2 1.0 TB")


@pytest.mark.parametrize("source", [
    "{{ dict(a=1)[joiner()] }}",
    "{{ joiner().x.y }}",
    "{{ [joiner()] | sum }}",
    "{{ cycler(1) + 1 }}",
    "{{ ''.__class__ }}",
])
def test_sandbox_errors_name_what_was_refused_without_internals(source):
    with pytest.raises(tpl.RenderError) as caught:
        tpl.render_string(source)
    one_plain_line(str(caught.value))


# -- compiling ---------------------------------------------------------------------------------------------------

COMPILE_BOMBS = [
    "{{a}}" * 19_999,  # 100 kB of output tags: used to compile for 18 s at 1 GB
    "{{ a|upper }}" * 7_000,
    "{% for x in a %}{{ x }}{% endfor %}" * 3_000,
    "{% set q = a %}" * 2_400,
    "{{ f(a, b, c, d) }}" * 1_500,
    "{{ [" + "a," * 20_000 + "a] }}",
    "{{a}}" * 2_400,  # few nodes, but more generated code than Python compiles in a quarter second
    "x" * 100_001,
]


@pytest.mark.parametrize("source", COMPILE_BOMBS, ids=lambda s: f"{s[:20]}…{len(s)}")
def test_sources_too_big_to_compile_are_refused_quickly(source, pool):
    with ticker(5.0), pytest.raises(tpl.TemplateSyntaxError) as caught:
        tpl.create_template(pool, "big", source)
    message = str(caught.value)
    one_plain_line(message)
    assert any(w in message for w in ("longer than", "more than", "too big to compile")), message
    assert tpl.list_templates(pool).total == 0
    with ticker(5.0):
        assert tpl.analyze(source).error == message


def test_the_limits_are_for_every_message_together(pool):
    messages = [{"role": "user", "content": "{{ a }}" * 1_000} for _ in range(30)]  # each fine, together too much
    with ticker(5.0), pytest.raises(tpl.TemplateSyntaxError, match=r"in message \d+ \(user\): .*(more than|too big)"):
        tpl.create_template(pool, "chatty", messages)
    assert tpl.list_templates(pool).total == 0
    assert "more than" in tpl.analyze(messages).error or "too big" in tpl.analyze(messages).error
    with ticker(5.0), pytest.raises(tpl.TemplateSyntaxError, match="longer than 100,000"):
        tpl.render_content(None, [{"role": "user", "content": "x" * 60_000}] * 2)


def test_big_but_reasonable_templates_still_compile(pool):
    text = ("You are {{ role }}.\n" + "Some instructions that go on for a while. " * 40 + "\n") * 40  # 70 kB of prose
    source = text + "{% for d in docs %}- {{ d.title }}: {{ d.body | truncate(80) }}\n{% endfor %}" * 50
    with ticker(5.0):
        tv = tpl.create_template(pool, "long", source)
    assert tv.variables == ["docs", "role"]


def test_the_compile_cache_is_bounded_in_bytes():
    for i in range(300):
        sandbox._compile(f"{i} " + "{{ a }} " * 1_000 + "x" * 50_000)
    assert sandbox._cache_used <= sandbox.CACHE_BYTES
    assert sum(weight for _, weight in sandbox._cache.values()) == sandbox._cache_used


def test_a_broken_source_is_not_parsed_again():
    source = "{{ a }}" * 1_500 + "{% if %}"
    with pytest.raises(tpl.TemplateSyntaxError) as first:
        sandbox._compile(source)
    assert isinstance(sandbox._cache_get(source), tpl.TemplateSyntaxError)
    started = time.perf_counter()
    with pytest.raises(tpl.TemplateSyntaxError) as second:
        sandbox._compile(source)
    assert str(second.value) == str(first.value) and time.perf_counter() - started < 0.01


# -- evaluator values render in the same sandbox ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "{{ 9**(9**9) }}",
    "{{ 'x' * 10**10 }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ (1).to_bytes(10**9, 'big') }}",
    "{{ ('f' * 300000) | int(base=16) // 3 }}",
    "{{ ''.__class__.__mro__ }}",
])
@pytest.mark.parametrize("kind", ["equals", "contains", "llm-rubric"])
def test_evaluator_values_render_under_the_template_limits(value, kind):
    ev = evaluators.parse({"type": kind, "value": value})
    with ticker(6.0):
        check = evaluators.run(ev, evaluators.Context(output="x", judge=lambda *a: evaluators.Judgement("pass")))
    assert not check.passed
    one_plain_line(check.reason)
    assert check.reason.startswith(f"{kind} failed: ")


# -- a page and the command line -------------------------------------------------------------------------------------


def test_the_editor_refuses_a_huge_template_in_one_line_and_compiles_once_per_change(app_env, pool):
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.switch_page("pages/templates.py")
    at.run()
    at.radio(key="templates.mode").set_value("New template").run()
    at.text_input(key="templates.new.name").input("bomb")
    with ticker(30.0):
        at.text_area(key="templates.new.text").input("{{a}}" * 19_999).run()
    assert not at.exception
    assert [e.value for e in at.error] and "more than 20,000 tokens" in at.error[0].value
    one_plain_line(at.error[0].value)
    analysis = at.session_state["templates.new.analysis"]
    at.run()  # a rerun without a change uses the analysis it has
    assert at.session_state["templates.new.analysis"] is analysis or \
        at.session_state["templates.new.analysis"] == analysis
    at.button(key="templates.new.create").click().run()
    assert not at.exception and tpl.list_templates(pool).total == 0
    with ticker(30.0):
        at.text_area(key="templates.new.text").input("{{ 9 ** (9 ** 9) }}").run()
    assert not at.exception  # it compiles; its live preview is refused in one line
    assert len(at.error) == 1 and "number too large" in at.error[0].value
    at.button(key="templates.new.create").click().run()
    assert tpl.list_templates(pool).total == 1  # it compiles; rendering it is what is refused


@pytest.mark.parametrize("source", [NUMBER_BOMBS[0], NUMBER_BOMBS[9], NUMBER_BOMBS[11], "{{a}}" * 19_999])
def test_the_cli_refuses_in_one_line(app_env, pool, capsys, source):
    with ticker(10.0):
        code = main(["templates", "create", "bomb", source])
    out, err = capsys.readouterr()
    if code == 0:  # it compiles: rendering it is refused
        with ticker(10.0):
            code = main(["render", "bomb", "a=1"])
        out, err = capsys.readouterr()
    assert code != 0 and err.count("\n") == 1, err
    one_plain_line(err.strip())


# -- widths hidden in nested format fields ---------------------------------------------------------------------------


def _format_in_child(source: str, conn) -> None:
    import os
    import resource

    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = mapped + 1_500_000_000
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    try:
        out = tpl.render_string(source)
        result = ("ok", f"{len(out)} characters")
    except tpl.TemplateError as exc:
        result = (type(exc).__name__, str(exc))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    conn.send((*result, time.monotonic() - started, grown))


def render_measured(source: str, timeout: float = 30) -> tuple[str, str, float, int]:
    """(exception class name or 'ok', message, seconds, bytes the peak memory grew) of a render in a child process
    capped at 1.5 GB more than it starts with."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_format_in_child, args=(source, child))
    proc.start()
    try:
        assert parent.poll(timeout), f"no answer in {timeout} s"
        return parent.recv()
    finally:
        proc.kill()
        proc.join()


@pytest.mark.parametrize("source", [
    "{{ '{:{}}'.format('a', '999999999') }}",  # a width given as text
    "{{ '{0:{1}}'.format('a', '>999999999') }}",
    "{{ '{:{}{}{}}'.format('a', 9, 9999, 9999) }}",  # small numbers that write one big one side by side
    "{{ '{:{}9999}'.format('a', 99999) }}",
    "{{ '{:{:9<9}}'.format('a', 9) }}",  # a nested field formatted with a digit as its fill
    "{{ '{0:{1[0]}}'.format('a', ['999999999']) }}",  # an item of an argument
    "{{ '{0:{1[w]}}'.format('a', {'w': '999999999'}) }}",
    "{{ '{a:{w}}'.format_map({'a': 'a', 'w': '999999999'}) }}",
    "{{ '{:.{}f}'.format(1.5, '999999999') }}",  # a precision
])
def test_widths_written_by_nested_format_fields_are_refused_before_formatting(source):
    kind, message, seconds, grown = render_measured(source)
    assert kind == "RenderLimitExceeded" and "format" in message, (kind, message)
    one_plain_line(message)
    assert seconds < 2 and grown < 50_000_000, (seconds, grown)


def test_nested_format_fields_still_work():
    assert tpl.render_string("{{ '{:{}}|'.format('a', 5) }}{{ '{:>{w}.{p}f}'.format(3.14159, w=8, p=2) }}"
                             "{{ '{0:{1[0]}}'.format('b', ['^5']) }}{{ '{:{:0>2}}|'.format('c', 3) }}") \
        == "a    |    3.14  b  c00|"


# -- evaluators that compare two long texts cell by cell ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["levenshtein", "similarity", "rouge-l"])
def test_comparisons_of_two_long_texts_fail_instead_of_running_for_hours(kind):
    """Edit distance and ROUGE-L fill a table of len(output) × len(value) cells in Python: two texts of 20,000
    characters (or words) ran for minutes in a worker. Beyond MAX_COMPARE_CELLS the check fails and says why."""
    long = "a " * 20_000 if kind == "rouge-l" else "a" * 20_000
    ev = evaluators.parse({"type": kind, "value": long.replace("a", "b"), "threshold": 0.5 if kind != "levenshtein"
                           else 5})
    with ticker(2.0):
        check = evaluators.run(ev, evaluators.Context(output=long))
    assert not check.passed and "too long to compare" in check.reason, check.reason
    one_plain_line(check.reason)
    short = evaluators.run(ev, evaluators.Context(output=long[:400]))  # 400 × 20,000 cells still compare
    assert "too long" not in short.reason


@pytest.mark.parametrize("source", [
    "{{ range(1000) | list | tojson(indent=999999) | length }}",  # built 1 GB (2 GB peak) before it was refused
    "{{ range(1000) | list | tojson(indent='x' * 999999) | length }}",
    "{{ {'a': range(1000) | list} | tojson(99999) | length }}",
    "{{ [[[[[[1]]]]]] | tojson(indent=999999) | length }}",
])
def test_indented_json_is_sized_before_it_is_written(source):
    kind, message, seconds, grown = render_measured(source)
    assert kind == "RenderLimitExceeded" and "JSON text" in message, (kind, message)
    one_plain_line(message)
    assert seconds < 2 and grown < 50_000_000, (seconds, grown)
    assert tpl.render_string("{{ {'a': [1, 2]} | tojson(indent=2) }}") == '{\n  "a": [\n    1,\n    2\n  ]\n}'


@pytest.mark.parametrize("depth", [65, 300, 5000])
def test_a_schema_nested_too_deep_is_one_line_not_a_recursion_error(depth):
    """jsonschema walks a schema recursively: depth is refused before it does."""
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(tpl.TemplateError, match="nested more than 64 levels deep"):
        tpl.render_content(None, "{{ x }}", {"x": {}}, input_schema=schema)
