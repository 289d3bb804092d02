"""Diff: two versions of a template as readable documents, compared as a unified diff and side by side."""

from __future__ import annotations

import difflib
import json

from .store import DB, _connection, _template_row, _version_of
from .types import DiffRow, TemplateVersion, VersionDiff


def version_document(template_version: TemplateVersion) -> str:
    """A version as readable text (messages, parameters, schemas), the input of diffs."""
    tv = template_version
    lines: list[str] = []
    if tv.kind == "text":
        lines += ["[text]", *(tv.text or "").splitlines()]
    else:
        for m in tv.messages:
            lines += [f"[{m['role']}]", *m["content"].splitlines()]
    for title, value in (("params", tv.params or None), ("input schema", tv.input_schema),
                         ("output schema", tv.output_schema)):
        if value:
            lines += [f"[{title}]", *json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()]
    return "\n".join(lines) + "\n"


def diff_documents(left: str, right: str, left_title: str = "a", right_title: str = "b",
                   context: int = 3) -> tuple[str, list[DiffRow]]:
    """(unified diff, side-by-side rows) of two texts."""
    a, b = left.splitlines(), right.splitlines()
    unified = "\n".join(difflib.unified_diff(a, b, left_title, right_title, n=context, lineterm=""))
    rows: list[DiffRow] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            rows += [DiffRow("equal", i + 1, a[i], j + 1, b[j]) for i, j in zip(range(i1, i2), range(j1, j2))]
        else:
            for k in range(max(i2 - i1, j2 - j1)):
                li, rj = i1 + k, j1 + k
                rows.append(DiffRow(tag if li < i2 and rj < j2 else ("delete" if li < i2 else "insert"),
                                    li + 1 if li < i2 else None, a[li] if li < i2 else "",
                                    rj + 1 if rj < j2 else None, b[rj] if rj < j2 else ""))
    return unified, rows


def diff_versions(pool: DB, name: str, from_version: int, to_version: int, *, context: int = 3) -> VersionDiff:
    """Unified and side-by-side differences between two versions of a template."""
    with _connection(pool) as conn:
        tmpl = _template_row(conn, name)
        left = _version_of(conn, tmpl["id"], from_version, name)
        right = _version_of(conn, tmpl["id"], to_version, name)
    unified, rows = diff_documents(version_document(left), version_document(right), left.ref, right.ref, context)
    return VersionDiff(name, from_version, to_version, unified, rows)
