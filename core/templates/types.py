"""The rows templates are read as, the limits of a render, and the names and references they accept.

Plain data: nothing here touches the database or Jinja2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence, Union

Content = Union[str, Sequence[Mapping[str, Any]]]

ROLES = ("system", "user", "assistant")
RESERVED_LABELS = ("latest",)
STANDARD_LABELS = ("production", "staging")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
LABEL_RE = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
REF_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,99})(?:@(?P<selector>[a-z0-9][a-z0-9._-]{0,62}))?$")
MAX_SOURCE_CHARS = 100_000  # one version, every message together


@dataclass(frozen=True)
class TemplateVersion:
    """One immutable version of a template."""

    id: int
    template_id: int
    name: str
    version: int
    kind: str  # 'chat' | 'text'
    messages: list[dict[str, str]]  # chat messages; [] for a text template
    text: str | None  # the prompt of a text template; None for chat
    params: dict[str, Any]
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    variables: list[str]
    created_by: str
    created_at: datetime
    change_description: str
    content_sha256: str
    rollback_of: int | None = None
    git_commit: str | None = None

    @property
    def content(self) -> Content:
        """The text prompt, or the list of chat messages."""
        return self.text if self.kind == "text" else [dict(m) for m in self.messages]

    @property
    def ref(self) -> str:
        """`name@version`, the exact reference of this version."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Template:
    """A template's metadata, its newest version number and its labels (label -> version)."""

    id: int
    name: str
    description: str
    category: str
    tags: list[str]
    owner: str
    active: bool
    latest_version: int
    created_at: datetime
    updated_at: datetime
    labels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplatePage:
    """One page of `list_templates`: the rows and the total number matching the filters."""

    items: list[Template]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class LabelEvent:
    """One move of a label: from_version None when it was created, to_version None when removed."""

    id: int
    template_id: int
    label: str
    from_version: int | None
    to_version: int | None
    moved_by: str
    moved_at: datetime


@dataclass(frozen=True)
class Rendered:
    """A rendered template version: the chat messages to send (a text template becomes one user message)."""

    template_version: TemplateVersion | None
    label: str | None
    messages: list[dict[str, str]]
    prompt: str | None
    variables: dict[str, Any]


@dataclass(frozen=True)
class Resolved:
    """What a reference (`name`, `name@label`, `name@3`) resolved to: the version, and the label that chose it —
    the label named, `production` or `latest` for a bare name (production when that label is set), None when the
    reference named a version number."""

    version: TemplateVersion
    label: str | None


@dataclass(frozen=True)
class DiffRow:
    """One line pair of a side-by-side diff; tag is equal, replace, delete or insert."""

    tag: str
    left_no: int | None
    left: str
    right_no: int | None
    right: str


@dataclass(frozen=True)
class VersionDiff:
    """Differences between two versions of one template."""

    name: str
    from_version: int
    to_version: int
    unified: str
    side_by_side: list[DiffRow]

    @property
    def changed(self) -> bool:
        """True when the two versions differ."""
        return any(row.tag != "equal" for row in self.side_by_side)


@dataclass(frozen=True)
class Analysis:
    """What the editor shows while typing: variables, includes, and the first error (None when valid)."""

    variables: list[str]
    includes: list[str]
    error: str | None = None
    lineno: int | None = None
    message_index: int | None = None


@dataclass(frozen=True)
class ImportReport:
    """What an import did, template by template."""

    created: list[str]
    extended: dict[str, int]
    unchanged: list[str]
    diverged: dict[str, int]
    labels_moved: int

    def summary(self) -> str:
        """One line for humans."""
        parts = [f"{len(self.created)} created", f"{len(self.extended)} extended", f"{len(self.unchanged)} unchanged"]
        if self.diverged:
            parts.append(f"{len(self.diverged)} diverged (their versions appended: {', '.join(sorted(self.diverged))})")
        if self.labels_moved:
            parts.append(f"{self.labels_moved} label moves")
        return "imported: " + ", ".join(parts)


@dataclass(frozen=True)
class RenderLimits:
    """Resource limits of one render."""

    max_output_chars: int = 1_000_000  # rendered text, any string built while rendering, any text a value becomes
    max_value_chars: int = 10_000_000  # the text size of any list or mapping built while rendering
    max_range: int = 100_000  # items in one range()
    max_steps: int = 1_000_000  # loop iterations, calls and filter applications
    max_seconds: float = 5.0
    max_call_depth: int = 50  # nested macro calls / recursive loops
    max_include_depth: int = 5
    max_int_bits: int = 10_000
    max_wrap_work: int = 10_000_000_000  # wordwrap: characters copied breaking long words (quadratic in textwrap)


DEFAULT_LIMITS = RenderLimits()
