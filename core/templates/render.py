"""Rendering: a saved version, unsaved content (an editor's preview) or free text, into the messages to send.

Before anything runs, the includes are resolved (a database connection is opened only when there are some), every
missing variable is named in one error and the variables are checked against the input schema; then each message
renders in the sandbox under one budget.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .budget import _BUDGET, _Budget
from .content import _check_schema, _with_defaults, normalize_content, validate_variables
from .errors import InvalidVariables, MissingVariables, RenderError, TemplateInactive
from .sandbox import _INCLUDES, _compile, _compile_all, _Compiled, _required, _run, _where
from .store import DB, _connection, _LazyConnection, _resolve, _resolve_includes
from .types import DEFAULT_LIMITS, Content, Rendered, RenderLimits, TemplateVersion


def _render_parts(pool: DB | None, kind: str, parts: Sequence[tuple[str, _Compiled]], variables: Mapping[str, Any],
                  root_key: str, limits: RenderLimits, input_schema: Mapping[str, Any] | None) -> list[dict[str, str]]:
    if not isinstance(variables, Mapping):
        raise RenderError("variables must be a mapping of names to values")
    roots = [c for _, c in parts]
    tree: dict[str, _Compiled] = {}
    if any(c.includes for c in roots):
        lazy = _LazyConnection(pool)
        try:
            tree = _resolve_includes(lazy, roots, root_key, limits)
        finally:
            lazy.close()
    missing = _required(roots, tree) - set(variables)
    if missing:
        raise MissingVariables(missing)
    if input_schema:
        errors = validate_variables(input_schema, variables)
        if errors:
            raise InvalidVariables(errors)
    budget = _Budget(limits)
    token_b, token_i = _BUDGET.set(budget), _INCLUDES.set(tree)
    try:
        rendered = [{"role": role, "content": _run(c, variables, budget, _where(kind, i, role))}
                    for i, (role, c) in enumerate(parts)]
    finally:
        _BUDGET.reset(token_b)
        _INCLUDES.reset(token_i)
    if budget.missing or budget.problems:
        raise MissingVariables(budget.missing, budget.problems)
    return rendered


def render_string(source: str, variables: Mapping[str, Any] | None = None, *, pool: DB | None = None,
                  limits: RenderLimits = DEFAULT_LIMITS) -> str:
    """Render free-form template text in the sandbox (includes resolve only when pool is given)."""
    if not isinstance(source, str):
        raise RenderError("the template must be text")
    compiled = _compile(source)
    parts = _render_parts(pool, "text", [("user", compiled)], dict(variables or {}), "<prompt>", limits, None)
    return parts[0]["content"]


def render_content(pool: DB | None, content: Content, variables: Mapping[str, Any] | None = None, *,
                   params: Any = None, input_schema: Mapping[str, Any] | None = None,
                   limits: RenderLimits = DEFAULT_LIMITS) -> Rendered:
    """Render unsaved content (an editor's live preview) exactly as a saved version would render."""
    kind, messages, text = normalize_content(content)
    schema = _check_schema(input_schema, "input")
    parts = _compile_all(kind, messages, text, "<prompt>")
    variables = _with_defaults(schema, variables or {})
    rendered = _render_parts(pool, kind, parts, variables, "<unsaved>", limits, schema)
    return Rendered(None, None, rendered, rendered[0]["content"] if kind == "text" else None, variables)


def render_template(pool: DB | None, template_version: TemplateVersion, variables: Mapping[str, Any] | None = None, *,
                    label: str | None = None, limits: RenderLimits = DEFAULT_LIMITS) -> Rendered:
    """Render one version: defaults from the input schema, every missing variable named, schema checked."""
    tv = template_version
    parts = _compile_all(tv.kind, tv.messages, tv.text, tv.ref)
    variables = _with_defaults(tv.input_schema, variables or {})
    rendered = _render_parts(pool, tv.kind, parts, variables, tv.ref, limits, tv.input_schema)
    return Rendered(tv, label, rendered, rendered[0]["content"] if tv.kind == "text" else None, variables)


def render_template_by_name(pool: DB, name: str, variables: Mapping[str, Any] | None = None, *,
                            label: str | None = None, version: int | None = None,
                            limits: RenderLimits = DEFAULT_LIMITS) -> Rendered:
    """Render a template fetched by name (production, else latest), name + label, or name + version."""
    with _connection(pool) as conn:
        tv, used_label, active = _resolve(conn, name, label, version)
    if not active:
        raise TemplateInactive(f"template {name!r} is inactive; activate it to render it")
    return render_template(pool, tv, variables, label=used_label, limits=limits)


def required_variables(pool: DB | None, template_version: TemplateVersion) -> list[str]:
    """Variables a render of this version needs, including those of the templates it includes."""
    tv = template_version
    roots = [c for _, c in _compile_all(tv.kind, tv.messages, tv.text, tv.ref)]
    tree: dict[str, _Compiled] = {}
    if any(c.includes for c in roots):
        lazy = _LazyConnection(pool)
        try:
            tree = _resolve_includes(lazy, roots, tv.ref, DEFAULT_LIMITS)
        finally:
            lazy.close()
    all_vars: set[str] = set()
    seen: set[int] = set()
    for c in [*roots, *tree.values()]:
        if id(c) not in seen:
            seen.add(id(c))
            all_vars |= c.variables
    assigned = set().union(*(c.stored for c in roots)) if roots else set()
    return sorted(set(tv.variables) | (all_vars - assigned))
