"""What can go wrong with templates: `TemplateError` and its subclasses, each of one kind of `core.errors`.

    class                 kind          when
    TemplateNotFound      NotFound      no such template, version or label
    TemplateExists        Conflict      the name is taken
    TemplateInactive      Conflict      the template is deactivated and cannot be rendered by name
    InvalidTemplateInput  InvalidInput  a bad name, label, content, parameter, schema, filter or file
    TemplateSyntaxError   InvalidInput  the source does not parse
    IncludeError          InvalidInput  an include by reference cannot be resolved
    RenderError           InvalidInput  rendering failed (and its subclasses below)
    MissingVariables      InvalidInput  variables the template uses were not given
    InvalidVariables      InvalidInput  the variables do not match the input schema
    RenderLimitExceeded   InvalidInput  the template used too much time, memory, output or recursion
    SandboxViolation      InvalidInput  the template reached for something the sandbox forbids

Every `TemplateError` is also a `ValueError` (as before the contract), so `except ValueError` keeps catching them;
`TemplateNotFound` is also a `LookupError` through `NotFound`. `RenderLimitExceeded` stays a `RenderError` (callers
catch render failures as one), so its kind is InvalidInput rather than TooLarge: it covers time and recursion
as well as size.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from core.errors import Conflict, InvalidInput, NotFound, PromptDevError


class TemplateError(PromptDevError, ValueError):
    """A template operation was refused; the message says why in one line. Raised only as a subclass."""


class InvalidTemplateInput(TemplateError, InvalidInput):
    """The input of a template operation cannot be accepted: a bad name, label, content, parameter or file."""


class TemplateNotFound(TemplateError, NotFound):
    """No such template, version or label."""


class TemplateExists(TemplateError, Conflict):
    """A template with that name already exists."""


class TemplateInactive(TemplateError, Conflict):
    """The template is deactivated and cannot be rendered by name."""


class TemplateSyntaxError(TemplateError, InvalidInput):
    """Template source does not parse; `lineno` (1-based) and `message_index` (0-based, chat only) say where."""

    def __init__(self, message: str, *, lineno: int | None = None, message_index: int | None = None,
                 role: str | None = None, detail: str = ""):
        super().__init__(message)
        self.lineno, self.message_index, self.role, self.detail = lineno, message_index, role, detail or message


class IncludeError(TemplateError, InvalidInput):
    """An include by reference cannot be resolved: unknown template, cycle or nesting too deep."""


class RenderError(TemplateError, InvalidInput):
    """Rendering failed."""


class MissingVariables(RenderError):
    """Variables the template uses were not given; `names` lists every one."""

    def __init__(self, names: Iterable[str], problems: Iterable[str] = ()):
        self.names = sorted(set(names))
        self.problems = list(problems)
        parts = []
        if self.names:
            parts.append(f"missing variable{'s' if len(self.names) > 1 else ''}: {', '.join(self.names)}")
        parts.extend(self.problems)
        super().__init__("; ".join(parts) or "undefined value")


class InvalidVariables(RenderError):
    """The variables do not match the template's input JSON Schema; `errors` lists each problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("variables do not match the input schema: " + "; ".join(self.errors))


class RenderLimitExceeded(RenderError):
    """The template tried to use too much time, memory or recursion."""


class SandboxViolation(RenderError):
    """The template tried to reach something the sandbox forbids."""
