"""Templates: named prompt templates with immutable numbered versions, labels, sandboxed Jinja2 rendering,
composition by reference, diff, export/import and registration of prompts kept in application code.

The package is in parts, each owning one thing:

- `errors`: `TemplateError` and its subclasses, each of one kind of `core.errors` (`TemplateNotFound` a NotFound,
  `TemplateExists` and `TemplateInactive` a Conflict, the rest an InvalidInput).
- `types`: the rows templates are read as (`TemplateVersion`, `Template`, `Rendered`, `Resolved`, …), the render
  limits (`RenderLimits`) and the patterns names, labels and references must match.
- `budget`: the counters of one render and the size estimates checked against them before anything big is built.
- `sandbox`: the Jinja2 environment every template compiles and runs in, its guarded filters and hooks, and the
  cache of compiled sources; it never touches the database.
- `content`: normalising, checking and hashing what a version holds, and finding, typing and validating variables.
- `store`: the repository in PostgreSQL: resolving references (`resolve`) and includes, creating, updating and
  rolling back versions, reading, labels and metadata.
- `render`: rendering a saved version, unsaved content or free text into the messages to send.
- `diff`: unified and side-by-side differences between two versions.
- `interchange`: export and import of templates as YAML or JSON, and prompts registered from application code.

Every public function takes the pool (or an open connection) first. Errors are `TemplateError` subclasses (a
ValueError; `TemplateNotFound` is also a LookupError) whose message is one clear line. Everything public is
re-exported here: use `from core import templates; templates.create_template(pool, …)`.
"""

from __future__ import annotations

from .content import (
    analyze,
    canonical_content,
    check_label,
    check_name,
    coerce_variables,
    content_sha256,
    extract_variables,
    normalize_content,
    validate_output,
    validate_variables,
)
from .diff import diff_documents, diff_versions, version_document
from .errors import (
    IncludeError,
    InvalidTemplateInput,
    InvalidVariables,
    MissingVariables,
    RenderError,
    RenderLimitExceeded,
    SandboxViolation,
    TemplateError,
    TemplateExists,
    TemplateInactive,
    TemplateNotFound,
    TemplateSyntaxError,
)
from .interchange import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    dump_export,
    export_templates,
    export_to_file,
    format_for_path,
    git_commit_of,
    import_from_file,
    import_templates,
    load_export,
    register_code_prompts,
    write_export,
)
from .render import render_content, render_string, render_template, render_template_by_name, required_variables
from .sandbox import GLOBAL_NAMES
from .store import (
    DB,
    activate_template,
    create_template,
    deactivate_template,
    duplicate_template,
    get_label_history,
    get_labels,
    get_template,
    get_template_by_name,
    get_version,
    get_version_history,
    list_categories,
    list_tags,
    list_templates,
    parse_ref,
    remove_label,
    resolve,
    rollback_to_version,
    set_active,
    set_label,
    template_names,
    update_metadata,
    update_template,
)
from .types import (
    DEFAULT_LIMITS,
    LABEL_RE,
    MAX_SOURCE_CHARS,
    NAME_RE,
    REF_RE,
    RESERVED_LABELS,
    ROLES,
    STANDARD_LABELS,
    Analysis,
    Content,
    DiffRow,
    ImportReport,
    LabelEvent,
    Rendered,
    RenderLimits,
    Resolved,
    Template,
    TemplatePage,
    TemplateVersion,
    VersionDiff,
)

__all__ = [
    # errors
    "TemplateError", "InvalidTemplateInput", "TemplateNotFound", "TemplateExists", "TemplateInactive",
    "TemplateSyntaxError", "IncludeError", "RenderError", "MissingVariables", "InvalidVariables",
    "RenderLimitExceeded", "SandboxViolation",
    # types
    "Content", "ROLES", "RESERVED_LABELS", "STANDARD_LABELS", "NAME_RE", "LABEL_RE", "REF_RE", "MAX_SOURCE_CHARS",
    "TemplateVersion", "Template", "TemplatePage", "LabelEvent", "Rendered", "Resolved", "DiffRow", "VersionDiff",
    "Analysis", "ImportReport", "RenderLimits", "DEFAULT_LIMITS",
    # sandbox
    "GLOBAL_NAMES",
    # content
    "check_name", "check_label", "normalize_content", "canonical_content", "content_sha256", "extract_variables",
    "analyze", "coerce_variables", "validate_variables", "validate_output",
    # store
    "DB", "parse_ref", "resolve", "create_template", "update_template", "rollback_to_version", "get_template",
    "get_template_by_name", "get_version", "get_version_history", "list_templates", "list_categories", "list_tags",
    "template_names", "set_label", "remove_label", "get_labels", "get_label_history", "set_active",
    "activate_template", "deactivate_template", "update_metadata", "duplicate_template",
    # render
    "render_string", "render_content", "render_template", "render_template_by_name", "required_variables",
    # diff
    "version_document", "diff_documents", "diff_versions",
    # interchange
    "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "export_templates", "dump_export", "load_export", "format_for_path",
    "write_export", "export_to_file", "import_from_file", "import_templates", "git_commit_of",
    "register_code_prompts",
]
