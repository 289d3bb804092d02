"""What a Markdown renderer would make live in a string, for tests of untrusted text on pages.

Streamlit renders Markdown with CommonMark + GitHub extensions: `live_constructs(md)` parses with markdown-it-py
(CommonMark, tables, strikethrough) and lists links, images, autolinks and raw HTML, plus GitHub's autolink literals
(`http(s)://…`, `www.…`, `name@host.tld`), which remark finds in the text *after* escapes are resolved — as done here
on markdown-it's text tokens. `rendered_text(md)` is the text a reader sees (for assertions on content).

`markdown_bodies(at)` collects every string an AppTest run shows as Markdown: st.markdown/caption/write bodies,
alerts, headings, chat messages, and the labels and help texts of widgets, expanders, tabs and metrics.
"""

from __future__ import annotations

import html
import re
from typing import Any

from markdown_it import MarkdownIt

from core.text import WORD_JOINER

_PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"])
# mdast-util-gfm-autolink-literal's patterns (over text after escapes are resolved).
_URL = re.compile(r"(https?://|www(?=\.))[-.\w]+", re.IGNORECASE)
_EMAIL = re.compile(r"[-.\w+]+@[-\w]+(?:\.[-\w]+)+")
_LIVE_TYPES = {"link_open", "image", "html_inline", "html_block"}

PAYLOADS = {  # one value per class of attack; each carries the marker EVIL
    "link": "see [click me](http://evil.example/EVIL?q=1) now",
    "image": "![x](http://evil.example/EVIL.png?secret=1)",
    "autolink": "<http://evil.example/EVIL>",
    "html": '<img src="http://evil.example/EVIL.png"> <a href="http://evil.example">EVIL</a>',
    "reference": "[x][1]\n\n[1]: http://evil.example/EVIL",
    "bare url": "visit https://evil.example/EVIL today",
    "www": "www.evil.example/EVIL",
    "email": "mail EVIL@evil.example",
    "nested": "[![EVIL](http://evil.example/i.png)](http://evil.example/EVIL)",
    "entities": "&#x5B;EVIL&#x5D;&#40;http&#58;//evil.example&#41; &lt;img&gt;",
}


def live_constructs(md: str) -> list[str]:
    """What in `md` a CommonMark/GFM renderer would make a link, image, autolink or HTML ([] when inert)."""
    found = []
    for block in _PARSER.parse(md):
        if block.type in _LIVE_TYPES:
            found.append(f"{block.type}: {block.content!r}")
        for token in block.children or ():
            if token.type in _LIVE_TYPES:
                found.append(f"{token.type}: {token.attrs or token.content!r}")
            elif token.type == "text":
                found += [f"autolink literal: {m.group()!r}" for m in _URL.finditer(token.content)]
                found += [f"email autolink: {m.group()!r}" for m in _EMAIL.finditer(token.content)]
    return found


def rendered_text(md: str, strip: bool = True) -> str:
    """The text a reader sees in rendered `md` (lines joined by newlines, word joiners removed, no-break spaces as
    spaces)."""
    text = re.sub(r"<br\s*/?>\n?", "\n", _PARSER.render(md))
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace(WORD_JOINER, "").replace("\u00a0", " ")
    return text.strip() if strip else text


_MARKDOWN_FIELDS = ("body", "label", "help", "caption")
_PLAIN_BODIES = {"Text", "Code", "Json", "Metric", "Exception"}  # elements whose body is shown as plain text


def markdown_bodies(at: Any) -> list[str]:
    """Every Markdown string an AppTest shows: element bodies, labels and help texts (widgets, expanders, tabs,
    metrics, chat messages, alerts, headings, toasts)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None and hasattr(proto, "DESCRIPTOR"):
            plain_body = proto.DESCRIPTOR.name in _PLAIN_BODIES
            for field, value in proto.ListFields():
                if field.name == "body" and plain_body:
                    continue
                if field.name in _MARKDOWN_FIELDS and isinstance(value, str):
                    out.append(value)
                elif hasattr(value, "DESCRIPTOR"):  # a nested message: e.g. Block.expandable, Block.tab
                    for sub, sub_value in value.ListFields():
                        if sub.name in _MARKDOWN_FIELDS and isinstance(sub_value, str):
                            out.append(sub_value)
        for child in getattr(node, "children", {}).values() if isinstance(getattr(node, "children", None),
                                                                             dict) else ():
            walk(child)

    walk(at._tree)
    return out


def assert_no_live_constructs(at: Any, marker: str = "EVIL") -> int:
    """Fail when any Markdown an AppTest shows that carries a payload (names evil.example: the page's own Markdown,
    such as a sign-out link, is not the page's input) has a live link, image, autolink or HTML; returns how many
    bodies show the marker (so a test can check the payload was shown at all)."""
    shown = 0
    for body in markdown_bodies(at):
        if "evil" not in body.lower():
            continue
        live = live_constructs(body)
        assert not live, f"live Markdown in {body!r}: {live}"
        shown += marker in rendered_text(body)
    return shown
