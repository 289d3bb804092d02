"""The template repository in PostgreSQL: resolving references, includes, versions, reading, labels, metadata.

`resolve` turns a reference (`name`, `name@label`, `name@3`) into a version and the label that chose it;
`_resolve_includes` does the same for every `{% include %}` of a render, refusing cycles and deep nesting.
Versions are immutable and numbered: `create_template`, `update_template` (a new version only when the content
hash changes) and `rollback_to_version` add them. Labels move with a recorded history; metadata (description,
category, tags, owner, active) is not versioned. Every function takes the pool or an open connection first.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from core import db

from .content import _clean_tags, _prepare, _Prepared, _text, check_label, check_name, normalize_content
from .errors import IncludeError, InvalidTemplateInput, TemplateExists, TemplateNotFound
from .sandbox import _compile, _compile_all, _Compiled
from .types import (
    DEFAULT_LIMITS,
    REF_RE,
    Content,
    LabelEvent,
    RenderLimits,
    Resolved,
    Template,
    TemplatePage,
    TemplateVersion,
)

DB = Union[ConnectionPool, psycopg.Connection]


# ---------------------------------------------------------------------------------------------------------------
# Database helpers


@contextmanager
def _connection(pool: DB) -> Iterator[psycopg.Connection]:
    if isinstance(pool, psycopg.Connection):
        yield pool
    else:
        with pool.connection() as conn:
            yield conn


_VERSION_COLUMNS = """v.id, v.template_id, t.name, v.version, v.kind, COALESCE(v.messages, '[]'::jsonb) AS messages,
    v.text, v.params, v.input_schema, v.output_schema, v.variables, v.created_by, v.created_at,
    v.change_description, v.content_sha256, v.rollback_of, v.git_commit"""
_VERSION_FIELDS = tuple(TemplateVersion.__dataclass_fields__)


def _version(row: Mapping[str, Any]) -> TemplateVersion:
    return TemplateVersion(**{k: row[k] for k in _VERSION_FIELDS})


def _template_row(conn: psycopg.Connection, name: str, *, lock: bool = False) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT * FROM templates WHERE name = %s{' FOR UPDATE' if lock else ''}",
                          (name,)).fetchone()
    if row is None:
        raise TemplateNotFound(f"no template named {name!r}")
    return row


def _check_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidTemplateInput(f"version must be a whole number, got {version!r}")
    return version


def _version_of(conn: psycopg.Connection, template_id: int, version: int, name: str) -> TemplateVersion:
    _check_version(version)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                          "ON t.id = v.template_id "
                          "WHERE v.template_id = %s AND v.version = %s", (template_id, version)).fetchone()
    if row is None:
        raise TemplateNotFound(f"template {name!r} has no version {version}")
    return _version(row)


# ---------------------------------------------------------------------------------------------------------------
# References and includes


def _resolve(conn: psycopg.Connection, name: str, label: str | None = None,
             version: int | None = None) -> tuple[TemplateVersion, str | None, bool]:
    """(version, the label used, template active) for name + optional label or version."""
    if label is not None and version is not None:
        raise InvalidTemplateInput("give a label or a version, not both")
    base = f"SELECT {_VERSION_COLUMNS}, t.active AS template_active"
    if version is not None:
        _check_version(version)
        query = (f"{base}, NULL::text AS used_label FROM templates t JOIN template_versions v ON v.template_id = t.id "
                 "WHERE t.name = %s AND v.version = %s")
        args: tuple = (name, version)
    elif label is None:
        query = (f"{base}, CASE WHEN l.version_id IS NULL THEN 'latest' ELSE 'production' END AS used_label "
                 "FROM templates t LEFT JOIN template_labels l ON l.template_id = t.id AND l.label = 'production' "
                 "JOIN template_versions v ON v.template_id = t.id "
                 "AND (v.id = l.version_id OR (l.version_id IS NULL AND v.version = t.latest_version)) "
                 "WHERE t.name = %s")
        args = (name,)
    elif label == "latest":
        query = (f"{base}, 'latest' AS used_label FROM templates t JOIN template_versions v "
                 "ON v.template_id = t.id AND v.version = t.latest_version WHERE t.name = %s")
        args = (name,)
    else:
        query = (f"{base}, l.label AS used_label FROM templates t JOIN template_labels l "
                 "ON l.template_id = t.id AND l.label = %s JOIN template_versions v ON v.id = l.version_id "
                 "WHERE t.name = %s")
        args = (label, name)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query, args).fetchone()
    if row is None:
        meta_row = conn.execute("SELECT latest_version FROM templates WHERE name = %s", (name,)).fetchone()
        if meta_row is None:
            raise TemplateNotFound(f"no template named {name!r}")
        if version is not None:
            raise TemplateNotFound(f"template {name!r} has no version {version} (latest is {meta_row[0]})")
        raise TemplateNotFound(f"template {name!r} has no label {label!r}")
    return _version(row), row["used_label"], row["template_active"]


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """`name`, `name@label` or `name@3` -> (name, label, version); IncludeError (a TemplateError) when malformed."""
    if not isinstance(ref, str):
        raise IncludeError(f"{ref!r} is not a template reference (name, name@label or name@version)")
    match = REF_RE.fullmatch(ref.strip())
    if not match:
        raise IncludeError(f"{ref!r} is not a template reference (name, name@label or name@version)")
    selector = match.group("selector")
    if selector is None:
        return match.group("name"), None, None
    if selector.isdigit():
        return match.group("name"), None, int(selector)
    return match.group("name"), selector, None


def resolve(pool: DB, ref: str) -> Resolved:
    """What a reference names: `Resolved(version, label)`. A bare name gives its `production` version when that
    label is set (label 'production'), else its newest (label 'latest'); `name@label` gives that label's version;
    `name@3` version 3 (label None). Inactive templates resolve too. TemplateNotFound when the template, label or
    version does not exist; IncludeError (an InvalidInput) when ref is not a reference."""
    name, label, version = parse_ref(ref)
    with _connection(pool) as conn:
        tv, used_label, _ = _resolve(conn, name, label, version)
    return Resolved(tv, used_label)


def _resolve_includes(conn_factory: Any, roots: Sequence[_Compiled], root_key: str, limits: RenderLimits,
                      self_name: str | None = None, self_compiled: Sequence[_Compiled] = ()) -> dict[str, _Compiled]:
    """Resolve every include reference of roots (recursively) to a compiled version; refuse cycles and depth.

    When saving a new version of `self_name`, references to it by name or @latest resolve to the new content."""
    resolved: dict[str, tuple[str, _Compiled]] = {}
    conn_holder: list[psycopg.Connection] = []

    def fetch(ref: str) -> tuple[str, _Compiled] | None:
        if ref in resolved:
            return resolved[ref]
        name, label, version = parse_ref(ref)
        if self_name is not None and name == self_name and version is None and label in (None, "latest"):
            if len(self_compiled) != 1:
                raise IncludeError(f"include {ref!r}: a chat template cannot be included")
            resolved[ref] = (root_key, self_compiled[0])
            return resolved[ref]
        if not conn_holder:
            conn_holder.append(conn_factory())
        try:
            tv, _, _ = _resolve(conn_holder[0], name, label, version)
        except TemplateNotFound as exc:
            raise IncludeError(f"include {ref!r}: {exc}") from None
        if tv.kind != "text":
            raise IncludeError(f"include {ref!r}: {tv.ref} is a chat template; only text templates can be included")
        resolved[ref] = (tv.ref, _compile(tv.text or "", tv.ref))
        return resolved[ref]

    def visit(compiled: _Compiled, path: tuple[str, ...]) -> None:
        for ref in compiled.includes:
            try:
                key, child = fetch(ref)
            except IncludeError:
                if ref in compiled.optional_includes:
                    continue
                raise
            if key in path:
                raise IncludeError(f"include cycle: {' → '.join(path + (key,))}")
            if len(path) > limits.max_include_depth:
                raise IncludeError(f"includes nested deeper than {limits.max_include_depth}: "
                                   f"{' → '.join(path + (key,))}")
            visit(child, path + (key,))

    for root in roots:
        visit(root, (root_key,))
    return {ref: compiled for ref, (_, compiled) in resolved.items()}


class _LazyConnection:
    """Opens a pool connection only when an include needs the database."""

    def __init__(self, db: DB | None):
        self.db, self._cm, self.conn = db, None, None

    def __call__(self) -> psycopg.Connection:
        if self.db is None:
            raise IncludeError("templates can only be included when rendering from the template repository")
        if isinstance(self.db, psycopg.Connection):
            return self.db
        self._cm = self.db.connection()
        self.conn = self._cm.__enter__()
        return self.conn

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

# ---------------------------------------------------------------------------------------------------------------
# Creating and updating


def _check_includes(conn: psycopg.Connection, name: str, prepared: _Prepared) -> None:
    if not prepared.includes:
        return
    parts = _compile_all(prepared.kind, prepared.messages, prepared.text, f"{name}@new")
    roots = [c for _, c in parts]
    _resolve_includes(lambda: conn, roots, f"{name}@new", DEFAULT_LIMITS, self_name=name,
                      self_compiled=roots if prepared.kind == "text" else ())


def _insert_version(conn: psycopg.Connection, template_id: int, name: str, version: int, p: _Prepared,
                    created_by: str, change_description: str, rollback_of: int | None = None,
                    git_commit: str | None = None, created_at: datetime | None = None) -> TemplateVersion:
    row = conn.execute(
        """INSERT INTO template_versions (template_id, version, kind, messages, text, params, input_schema,
               output_schema, variables, content_sha256, created_by, change_description, rollback_of, git_commit,
               created_at)
           VALUES (%(template_id)s, %(version)s, %(kind)s, %(messages)s, %(text)s, %(params)s, %(input_schema)s,
               %(output_schema)s, %(variables)s, %(content_sha256)s, %(created_by)s, %(change_description)s,
               %(rollback_of)s, %(git_commit)s, COALESCE(%(created_at)s, clock_timestamp()))
           RETURNING id, created_at""",
        {"template_id": template_id, "version": version, "kind": p.kind,
         "messages": db.jsonb(p.messages, none_is_null=True), "text": p.text,
         "params": db.jsonb(p.params), "input_schema": db.jsonb(p.input_schema, none_is_null=True),
         "output_schema": db.jsonb(p.output_schema, none_is_null=True),
         "variables": p.variables, "content_sha256": p.sha256, "created_by": created_by or "",
         "change_description": change_description or "", "rollback_of": rollback_of, "git_commit": git_commit,
         "created_at": created_at}).fetchone()
    return TemplateVersion(id=row[0], template_id=template_id, name=name, version=version, kind=p.kind,
                           messages=list(p.messages or []), text=p.text, params=p.params, input_schema=p.input_schema,
                           output_schema=p.output_schema, variables=p.variables, created_by=created_by or "",
                           created_at=row[1], change_description=change_description or "", content_sha256=p.sha256,
                           rollback_of=rollback_of, git_commit=git_commit)


def create_template(pool: DB, name: str, content: Content, *, description: str = "", category: str = "",
                    tags: Iterable[str] = (), owner: str = "", created_by: str = "", params: Any = None,
                    input_schema: Any = None, output_schema: Any = None, change_description: str = "",
                    git_commit: str | None = None) -> TemplateVersion:
    """Create a template with its version 1; raise TemplateExists when the name is taken."""
    check_name(name)
    prepared = _prepare(content, params, input_schema, output_schema, f"{name}@1")
    with _connection(pool) as conn:
        _check_includes(conn, name, prepared)
        try:
            with conn.transaction():
                template_id = conn.execute(
                    """INSERT INTO templates (name, description, category, tags, owner, latest_version)
                       VALUES (%s, %s, %s, %s, %s, 1) RETURNING id""",
                    (name, _text(description, "description"), _text(category, "category").strip(),
                     _clean_tags(tags), _text(owner, "owner") or _text(created_by, "created_by")),
                ).fetchone()[0]
                return _insert_version(conn, template_id, name, 1, prepared, created_by,
                                       change_description or "Created", git_commit=git_commit)
        except psycopg.errors.UniqueViolation:
            raise TemplateExists(f"a template named {name!r} already exists") from None


def _new_version(conn: psycopg.Connection, tmpl: Mapping[str, Any], prepared: _Prepared, created_by: str,
                 change_description: str, rollback_of: int | None = None,
                 git_commit: str | None = None) -> tuple[TemplateVersion, bool]:
    latest = _version_of(conn, tmpl["id"], tmpl["latest_version"], tmpl["name"])
    if prepared.sha256 == latest.content_sha256:
        return latest, False
    number = tmpl["latest_version"] + 1
    tv = _insert_version(conn, tmpl["id"], tmpl["name"], number, prepared, created_by, change_description,
                         rollback_of, git_commit)
    conn.execute("UPDATE templates SET latest_version = %s, updated_at = clock_timestamp() WHERE id = %s",
                 (number, tmpl["id"]))
    return tv, True


def update_template(pool: DB, name: str, content: Content, *, created_by: str = "", change_description: str = "",
                    params: Any = None, input_schema: Any = None, output_schema: Any = None,
                    base_version: int | None = None, git_commit: str | None = None) -> tuple[TemplateVersion, bool]:
    """Save content as the next version; (version, created). Content identical to the newest version creates
    nothing and returns that version with False. params/schemas left None are taken from base_version (default:
    the newest); pass {} to clear a schema."""
    kind, messages, text = normalize_content(content)
    _compile_all(kind, messages, text, f"{name}@new")  # syntax errors before taking the lock
    with _connection(pool) as conn:
        if params is None or input_schema is None or output_schema is None:
            tmpl = _template_row(conn, name)
            base = _version_of(conn, tmpl["id"], base_version or tmpl["latest_version"], name)
            params = base.params if params is None else params
            input_schema = base.input_schema if input_schema is None else input_schema
            output_schema = base.output_schema if output_schema is None else output_schema
        elif base_version is not None:
            tmpl = _template_row(conn, name)
            _version_of(conn, tmpl["id"], base_version, name)
        prepared = _prepare(content, params, input_schema, output_schema, f"{name}@new")
        _check_includes(conn, name, prepared)
        with conn.transaction():
            tmpl = _template_row(conn, name, lock=True)
            return _new_version(conn, tmpl, prepared, created_by, change_description)


def rollback_to_version(pool: DB, name: str, version: int, *, created_by: str = "",
                        change_description: str = "") -> tuple[TemplateVersion, bool]:
    """Create a new version with version N's content, recorded as a rollback of N; (version, created)."""
    with _connection(pool) as conn, conn.transaction():
        tmpl = _template_row(conn, name, lock=True)
        target = _version_of(conn, tmpl["id"], version, name)
        prepared = _prepare(target.content, target.params, target.input_schema, target.output_schema,
                            f"{name}@new")
        return _new_version(conn, tmpl, prepared, created_by, change_description or f"Rollback to version {version}",
                            rollback_of=version)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def get_template(pool: DB, name: str) -> Template:
    """A template's metadata and labels."""
    with _connection(pool) as conn:
        row = _template_row(conn, name)
        labels = dict(conn.execute(
            """SELECT l.label, v.version FROM template_labels l JOIN template_versions v ON v.id = l.version_id
               WHERE l.template_id = %s ORDER BY l.label""", (row["id"],)).fetchall())
    return _template(row, labels)


def _template(row: Mapping[str, Any], labels: Mapping[str, int]) -> Template:
    return Template(id=row["id"], name=row["name"], description=row["description"], category=row["category"],
                    tags=list(row["tags"]), owner=row["owner"], active=row["active"],
                    latest_version=row["latest_version"], created_at=row["created_at"], updated_at=row["updated_at"],
                    labels=dict(labels))


def get_template_by_name(pool: DB, name: str, *, label: str | None = None,
                         version: int | None = None) -> TemplateVersion:
    """A version by name alone (its production label if set, else latest), by name + label, or name + version."""
    with _connection(pool) as conn:
        return _resolve(conn, name, label, version)[0]


def get_version(pool: DB, version_id: int) -> TemplateVersion:
    """A version by its id (template_versions.id)."""
    with _connection(pool) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                          "ON t.id = v.template_id WHERE v.id = %s", (version_id,)).fetchone()
    if row is None:
        raise TemplateNotFound(f"no template version with id {version_id}")
    return _version(row)


def get_version_history(pool: DB, name: str) -> list[TemplateVersion]:
    """Every version of a template, newest first."""
    with _connection(pool) as conn:
        tmpl = _template_row(conn, name)
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                               "ON t.id = v.template_id WHERE v.template_id = %s ORDER BY v.version DESC",
                               (tmpl["id"],)).fetchall()
    return [_version(r) for r in rows]


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_templates(pool: DB, *, search: str = "", category: str | None = None, tag: str | None = None,
                   active: bool | None = None, limit: int = 50, offset: int = 0,
                   order: str = "updated") -> TemplatePage:
    """One page of templates matching the filters (search in name and description), with the total count."""
    if order not in ("updated", "name"):
        raise InvalidTemplateInput("order must be 'updated' or 'name'")
    try:
        limit = max(1, min(int(limit), 1000))
        offset = max(0, int(offset))
    except (TypeError, ValueError):
        raise InvalidTemplateInput(f"limit and offset must be whole numbers, got {limit!r} and {offset!r}") from None
    conditions, args = [], []
    search = (search or "").strip()
    if search:
        conditions.append("(t.name ILIKE %s OR t.description ILIKE %s)")
        args += [_like(search), _like(search)]
    if category:
        conditions.append("t.category = %s")
        args.append(category)
    if tag:
        conditions.append("t.tags @> ARRAY[%s]::text[]")
        args.append(tag)
    if active is not None:
        conditions.append("t.active = %s")
        args.append(bool(active))
    where = "WHERE " + " AND ".join(conditions) if conditions else ""
    order_by = "t.updated_at DESC, t.id DESC" if order == "updated" else "t.name"
    query = f"""
        WITH page AS (
            SELECT t.*, count(*) OVER () AS total FROM templates t {where}
            ORDER BY {order_by} LIMIT %s OFFSET %s)
        SELECT t.*, COALESCE((SELECT jsonb_object_agg(l.label, v.version) FROM template_labels l
                              JOIN template_versions v ON v.id = l.version_id WHERE l.template_id = t.id), '{{}}')
                    AS labels
        FROM page t ORDER BY {order_by}"""
    with _connection(pool) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, (*args, limit, offset)).fetchall()
        if rows:
            total = rows[0]["total"]
        else:
            total = cur.execute(f"SELECT count(*) AS n FROM templates t {where}", args).fetchone()["n"]
    items = [_template(r, dict(sorted(r["labels"].items()))) for r in rows]
    return TemplatePage(items, total, limit, offset)


def list_categories(pool: DB) -> list[str]:
    """Every category in use, sorted."""
    with _connection(pool) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT category FROM templates WHERE category <> '' ORDER BY 1")]


def list_tags(pool: DB) -> list[str]:
    """Every tag in use, sorted."""
    with _connection(pool) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT unnest(tags) FROM templates ORDER BY 1")]


def template_names(pool: DB) -> list[str]:
    """Every template name, sorted."""
    with _connection(pool) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM templates ORDER BY name")]


# ---------------------------------------------------------------------------------------------------------------
# Labels


def set_label(pool: DB, name: str, label: str, version: int, *, moved_by: str = "") -> bool:
    """Point label at version (recording the move); False when it already pointed there."""
    check_label(label)
    with _connection(pool) as conn, conn.transaction():
        tmpl = _template_row(conn, name, lock=True)
        target = _version_of(conn, tmpl["id"], version, name)
        current = conn.execute(
            """SELECT v.version FROM template_labels l JOIN template_versions v ON v.id = l.version_id
               WHERE l.template_id = %s AND l.label = %s""", (tmpl["id"], label)).fetchone()
        if current is not None and current[0] == version:
            return False
        conn.execute(
            """INSERT INTO template_labels (template_id, label, version_id, moved_by) VALUES (%s, %s, %s, %s)
               ON CONFLICT (template_id, label) DO UPDATE
               SET version_id = EXCLUDED.version_id, moved_by = EXCLUDED.moved_by, moved_at = clock_timestamp()""",
            (tmpl["id"], label, target.id, moved_by or ""))
        conn.execute(
            """INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by)
               VALUES (%s, %s, %s, %s, %s)""",
            (tmpl["id"], label, current[0] if current else None, version, moved_by or ""))
        conn.execute("UPDATE templates SET updated_at = clock_timestamp() WHERE id = %s", (tmpl["id"],))
    return True


def remove_label(pool: DB, name: str, label: str, *, moved_by: str = "") -> bool:
    """Remove a label (recording it); False when the template had no such label."""
    check_label(label)
    with _connection(pool) as conn, conn.transaction():
        tmpl = _template_row(conn, name, lock=True)
        current = conn.execute(
            """DELETE FROM template_labels l USING template_versions v
               WHERE l.template_id = %s AND l.label = %s AND v.id = l.version_id RETURNING v.version""",
            (tmpl["id"], label)).fetchone()
        if current is None:
            return False
        conn.execute(
            """INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by)
               VALUES (%s, %s, %s, NULL, %s)""", (tmpl["id"], label, current[0], moved_by or ""))
        conn.execute("UPDATE templates SET updated_at = clock_timestamp() WHERE id = %s", (tmpl["id"],))
    return True


def get_labels(pool: DB, name: str) -> dict[str, int]:
    """Every label of a template (label -> version), `latest` included."""
    tmpl = get_template(pool, name)
    return {**tmpl.labels, "latest": tmpl.latest_version}


def get_label_history(pool: DB, name: str, label: str | None = None) -> list[LabelEvent]:
    """Every recorded label move of a template (optionally of one label), newest first."""
    with _connection(pool) as conn:
        tmpl = _template_row(conn, name)
        with conn.cursor(row_factory=class_row(LabelEvent)) as cur:
            return cur.execute(
                """SELECT id, template_id, label, from_version, to_version, moved_by, moved_at
                   FROM template_label_events WHERE template_id = %s AND (%s::text IS NULL OR label = %s)
                   ORDER BY id DESC""", (tmpl["id"], label, label)).fetchall()


# ---------------------------------------------------------------------------------------------------------------
# Metadata, activation, duplication


def set_active(pool: DB, name: str, active: bool) -> bool:
    """Activate or deactivate a template; False when it already was."""
    with _connection(pool) as conn:
        row = conn.execute("UPDATE templates SET active = %s, updated_at = clock_timestamp() "
                           "WHERE name = %s AND active <> %s RETURNING id", (active, name, active)).fetchone()
        if row is None:
            _template_row(conn, name)
            return False
    return True


def activate_template(pool: DB, name: str) -> bool:
    """Make a template active again; False when it already was."""
    return set_active(pool, name, True)


def deactivate_template(pool: DB, name: str) -> bool:
    """Retire a template (it stays in history but cannot be rendered by name); False when it already was."""
    return set_active(pool, name, False)


def update_metadata(pool: DB, name: str, *, description: str | None = None, category: str | None = None,
                    tags: Iterable[str] | str | None = None, owner: str | None = None) -> Template:
    """Change description, category, tags or owner (not versioned); return the template."""
    with _connection(pool) as conn:
        row = conn.execute(
            """UPDATE templates SET description = COALESCE(%s, description), category = COALESCE(%s, category),
                   tags = COALESCE(%s, tags), owner = COALESCE(%s, owner), updated_at = clock_timestamp()
               WHERE name = %s RETURNING id""",
            (None if description is None else _text(description, "description"),
             None if category is None else _text(category, "category").strip(),
             _clean_tags(tags) if tags is not None else None, None if owner is None else _text(owner, "owner"),
             name)).fetchone()
        if row is None:
            raise TemplateNotFound(f"no template named {name!r}")
        return get_template(conn, name)


def duplicate_template(pool: DB, name: str, new_name: str, *, version: int | None = None,
                       created_by: str = "") -> TemplateVersion:
    """A new template whose version 1 is a copy of name's version (default: latest), metadata included."""
    check_name(new_name)
    with _connection(pool) as conn:
        tmpl = get_template(conn, name)
        source = _version_of(conn, tmpl.id, version or tmpl.latest_version, name)
        content: Content = source.content
        if source.kind == "text":
            content = source.text or ""
        return create_template(conn, new_name, content, description=tmpl.description, category=tmpl.category,
                               tags=tmpl.tags, owner=created_by or tmpl.owner, created_by=created_by,
                               params=source.params, input_schema=source.input_schema,
                               output_schema=source.output_schema,
                               change_description=f"Duplicated from {source.ref}")

