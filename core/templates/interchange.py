"""Interchange: templates in and out of the repository as files, and prompts kept in application code.

`export_templates` gives templates with every version, label and label move as plain data (`dump_export` as YAML or
JSON); `import_templates` brings such data back in one transaction without ever rewriting a stored version.
`register_code_prompts` tracks prompts defined in code: a new version only when the content hash changes, with the
git commit of the caller's repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

import psycopg
import yaml
from psycopg.rows import dict_row

from .content import _clean_tags, _prepare, _Prepared, _text, check_label, check_name
from .errors import InvalidTemplateInput, TemplateError, TemplateNotFound
from .store import (
    _VERSION_COLUMNS,
    DB,
    _check_includes,
    _connection,
    _insert_version,
    _new_version,
    _template_row,
    set_label,
)
from .types import ImportReport, TemplateVersion

EXPORT_FORMAT = "promptdev-templates"
EXPORT_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Export and import


def _iso(value: datetime) -> str:
    return value.isoformat()


def export_templates(pool: DB, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Templates (default: all) with every version, label and label move, as plain data."""
    with _connection(pool) as conn, conn.cursor(row_factory=dict_row) as cur:
        wanted = sorted(set(names)) if names is not None else None
        rows = cur.execute("SELECT * FROM templates WHERE (%s::text[] IS NULL OR name = ANY(%s)) ORDER BY name",
                           (wanted, wanted)).fetchall()
        if wanted is not None:
            unknown = sorted(set(wanted) - {r["name"] for r in rows})
            if unknown:
                raise TemplateNotFound(f"no template named {unknown[0]!r}")
        out = []
        for t in rows:
            versions = cur.execute(f"SELECT {_VERSION_COLUMNS} FROM template_versions v JOIN templates t "
                                   "ON t.id = v.template_id WHERE v.template_id = %s ORDER BY v.version",
                                   (t["id"],)).fetchall()
            labels = cur.execute(
                """SELECT l.label, v.version, l.moved_by, l.moved_at FROM template_labels l
                   JOIN template_versions v ON v.id = l.version_id WHERE l.template_id = %s ORDER BY l.label""",
                (t["id"],)).fetchall()
            events = cur.execute(
                """SELECT label, from_version, to_version, moved_by, moved_at FROM template_label_events
                   WHERE template_id = %s ORDER BY id""", (t["id"],)).fetchall()
            out.append({
                "name": t["name"], "description": t["description"], "category": t["category"],
                "tags": list(t["tags"]), "owner": t["owner"], "active": t["active"],
                "created_at": _iso(t["created_at"]), "updated_at": _iso(t["updated_at"]),
                "versions": [{
                    "version": v["version"], "kind": v["kind"],
                    **({"messages": v["messages"]} if v["kind"] == "chat" else {"text": v["text"]}),
                    "params": v["params"], "input_schema": v["input_schema"], "output_schema": v["output_schema"],
                    "created_by": v["created_by"], "created_at": _iso(v["created_at"]),
                    "change_description": v["change_description"], "content_sha256": v["content_sha256"],
                    "rollback_of": v["rollback_of"], "git_commit": v["git_commit"],
                } for v in versions],
                "labels": {lab["label"]: {"version": lab["version"], "moved_by": lab["moved_by"],
                                        "moved_at": _iso(lab["moved_at"])} for lab in labels},
                "label_history": [{**e, "moved_at": _iso(e["moved_at"])} for e in events],
            })
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "templates": out}


def dump_export(data: Mapping[str, Any], fmt: str = "yaml") -> str:
    """Serialise export data as YAML or JSON text."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt in ("yaml", "yml"):
        return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=120)
    raise InvalidTemplateInput(f"unknown export format {fmt!r}: use yaml or json")


def load_export(text: str, fmt: str = "yaml") -> dict[str, Any]:
    """Parse export text (YAML or JSON)."""
    try:
        if fmt == "json":
            data = json.loads(text)
        elif fmt in ("yaml", "yml"):
            data = yaml.safe_load(text)
        else:
            raise InvalidTemplateInput(f"unknown export format {fmt!r}: use yaml or json")
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, TemplateError):
            raise
        raise InvalidTemplateInput(f"not valid {fmt.upper()}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # yaml.YAMLError
        raise InvalidTemplateInput(f"not valid {fmt.upper()}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise InvalidTemplateInput(f"not a PromptDev templates export (expected format: {EXPORT_FORMAT})")
    if data.get("format_version") != EXPORT_FORMAT_VERSION:
        raise InvalidTemplateInput(f"unsupported export format version {data.get('format_version')!r}")
    if not isinstance(data.get("templates"), list):
        raise InvalidTemplateInput("export has no 'templates' list")
    return data


def format_for_path(path: str | Path) -> str:
    """'json' for .json files, else 'yaml'."""
    return "json" if str(path).lower().endswith(".json") else "yaml"


def write_export(path: str | Path, text: str) -> None:
    """Write export text to path whole or not at all (a temporary file renamed over it); TemplateError on failure."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        raise InvalidTemplateInput(f"cannot write {path}: {exc.strerror or exc}") from None


def export_to_file(pool: DB, path: str | Path, names: Iterable[str] | None = None, fmt: str | None = None) -> int:
    """Write an export file (format from the extension unless given); return the number of templates."""
    data = export_templates(pool, names)
    write_export(path, dump_export(data, fmt or format_for_path(path)))
    return len(data["templates"])


def import_from_file(pool: DB, path: str | Path, *, imported_by: str = "", fmt: str | None = None) -> ImportReport:
    """Import an export file; see import_templates."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidTemplateInput(f"cannot read {path}: {exc.strerror or exc}") from None
    return import_templates(pool, load_export(text, fmt or format_for_path(path)), imported_by=imported_by)


def _ts(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidTemplateInput(f"{where}: invalid timestamp {value!r}") from None


def _imported_versions(item: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], _Prepared]]:
    name = item["name"]
    versions = item.get("versions") or []
    if not versions:
        raise InvalidTemplateInput(f"{name}: no versions")
    out = []
    for expected, v in enumerate(versions, 1):
        if not isinstance(v, Mapping) or v.get("version") != expected:
            raise InvalidTemplateInput(f"{name}: versions must be numbered 1, 2, 3 … in order (expected {expected})")
        content = v.get("messages") if v.get("kind") == "chat" else v.get("text")
        try:
            prepared = _prepare(content, v.get("params"), v.get("input_schema"), v.get("output_schema"),
                                f"{name}@{expected}")
        except TemplateError as exc:
            raise InvalidTemplateInput(f"{name} version {expected}: {exc}") from None
        if v.get("content_sha256") and v["content_sha256"] != prepared.sha256:
            raise InvalidTemplateInput(f"{name} version {expected}: content does not match its content_sha256")
        out.append((v, prepared))
    return out


def import_templates(pool: DB, data: Mapping[str, Any], *, imported_by: str = "") -> ImportReport:
    """Import export data in one transaction. New templates arrive with their full history, labels and label
    moves as recorded. Existing ones are never rewritten: versions beyond theirs are appended when their history
    is a prefix of the file's (and labels moved to match); when histories diverged, the file's unknown contents
    are appended as new versions."""
    created, unchanged = [], []
    extended: dict[str, int] = {}
    diverged: dict[str, int] = {}
    labels_moved = 0
    items = data.get("templates") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise InvalidTemplateInput("export data has no 'templates' list")
    current = "?"
    try:
        with _connection(pool) as conn, conn.transaction():
            for item in items:
                if not isinstance(item, Mapping) or "name" not in item:
                    raise InvalidTemplateInput("every template in the file needs a name")
                name = check_name(item["name"])
                current = name
                versions = _imported_versions(item)
                exists = conn.execute("SELECT id FROM templates WHERE name = %s FOR UPDATE", (name,)).fetchone()
                if exists is None:
                    _import_new(conn, item, versions)
                    created.append(name)
                    continue
                tmpl = _template_row(conn, name, lock=True)
                have = dict(conn.execute(
                    "SELECT version, content_sha256 FROM template_versions WHERE template_id = %s",
                    (tmpl["id"],)).fetchall())
                prefix = all(have.get(v["version"]) == p.sha256 for v, p in versions[:len(have)]) and \
                    len(versions) >= len(have)
                if prefix:
                    added = 0
                    for v, p in versions[len(have):]:
                        _insert_version(conn, tmpl["id"], name, v["version"], p, v.get("created_by") or "",
                                        v.get("change_description") or "", v.get("rollback_of"), v.get("git_commit"),
                                        _ts(v.get("created_at"), f"{name} version {v['version']}")
                                        if v.get("created_at") else None)
                        added += 1
                    if added:
                        conn.execute("UPDATE templates SET latest_version = %s, updated_at = clock_timestamp() "
                                     "WHERE id = %s", (len(versions), tmpl["id"]))
                        extended[name] = added
                    for label, spec in (item.get("labels") or {}).items():
                        target = spec["version"] if isinstance(spec, Mapping) else spec
                        if set_label(conn, name, label, int(target), moved_by=imported_by or "import"):
                            labels_moved += 1
                    if not added:
                        unchanged.append(name)
                else:
                    known = set(have.values())
                    appended = 0
                    for v, p in versions:
                        if p.sha256 in known:
                            continue
                        tmpl = _template_row(conn, name, lock=True)
                        desc = (v.get("change_description") or "").strip()
                        _new_version(conn, tmpl, p, v.get("created_by") or imported_by or "",
                                     f"{desc + ' ' if desc else ''}(imported: was version {v['version']})")
                        known.add(p.sha256)
                        appended += 1
                    if appended:
                        diverged[name] = appended
                    else:
                        unchanged.append(name)
    except TemplateError as exc:
        if current != "?" and not str(exc).startswith(current):
            exc.args = (f"{current}: {exc}",)
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:  # a malformed file
        what = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else \
            (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InvalidTemplateInput(f"{current}: malformed export data: {what}") from None
    return ImportReport(created, extended, unchanged, diverged, labels_moved)


def _import_new(conn: psycopg.Connection, item: Mapping[str, Any],
                versions: list[tuple[Mapping[str, Any], _Prepared]]) -> None:
    name = item["name"]
    now = datetime.now().astimezone()
    created_at = _ts(item["created_at"], name) if item.get("created_at") else now
    updated_at = _ts(item["updated_at"], name) if item.get("updated_at") else now
    template_id = conn.execute(
        """INSERT INTO templates (name, description, category, tags, owner, active, latest_version, created_at,
               updated_at)
           VALUES (%(name)s, %(description)s, %(category)s, %(tags)s, %(owner)s, %(active)s, %(latest_version)s,
               %(created_at)s, %(updated_at)s)
           RETURNING id""",
        {"name": name, "description": _text(item.get("description"), "description"),
         "category": _text(item.get("category"), "category"), "tags": _clean_tags(item.get("tags")),
         "owner": _text(item.get("owner"), "owner"), "active": bool(item.get("active", True)),
         "latest_version": len(versions), "created_at": created_at, "updated_at": updated_at},
    ).fetchone()[0]
    ids = {}
    for v, p in versions:
        tv = _insert_version(conn, template_id, name, v["version"], p, v.get("created_by") or "",
                             v.get("change_description") or "", v.get("rollback_of"), v.get("git_commit"),
                             _ts(v["created_at"], name) if v.get("created_at") else None)
        ids[tv.version] = tv.id
    for label, spec in (item.get("labels") or {}).items():
        check_label(label)
        spec = spec if isinstance(spec, Mapping) else {"version": spec}
        if spec.get("version") not in ids:
            raise InvalidTemplateInput(f"{name}: label {label!r} points at unknown version {spec.get('version')!r}")
        conn.execute("""INSERT INTO template_labels (template_id, label, version_id, moved_by, moved_at)
                        VALUES (%s, %s, %s, %s, COALESCE(%s, clock_timestamp()))""",
                     (template_id, label, ids[spec["version"]], spec.get("moved_by") or "",
                      _ts(spec["moved_at"], name) if spec.get("moved_at") else None))
    for e in item.get("label_history") or []:
        conn.execute("""INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by,
                            moved_at)
                        VALUES (%(template_id)s, %(label)s, %(from_version)s, %(to_version)s, %(moved_by)s,
                            COALESCE(%(moved_at)s, clock_timestamp()))""",
                     {"template_id": template_id, "label": e["label"], "from_version": e.get("from_version"),
                      "to_version": e.get("to_version"), "moved_by": e.get("moved_by") or "",
                      "moved_at": _ts(e["moved_at"], name) if e.get("moved_at") else None})


# ---------------------------------------------------------------------------------------------------------------
# Prompts kept in application code


def git_commit_of(path: str | Path) -> str | None:
    """HEAD commit of the git repository containing path, or None outside a repository."""
    directory = Path(path)
    if not directory.is_dir():
        directory = directory.parent
    try:
        result = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def register_code_prompts(pool: DB, prompts: Mapping[str, Any], *, created_by: str = "code", category: str = "code",
                          git_commit: str | None = None, caller_path: str | Path | None = None
                          ) -> dict[str, tuple[TemplateVersion, bool]]:
    """Track prompts kept in code: {name: content or {content, params, input_schema, output_schema, description,
    tags}}. Creates each template the first time and a new version only when its content hash changes, recording
    the git commit of the caller's repository when there is one. Returns {name: (version, created)}."""
    if caller_path is None:
        caller_path = sys._getframe(1).f_code.co_filename
    commit = git_commit or git_commit_of(caller_path)
    where = Path(caller_path).name
    if not isinstance(prompts, Mapping):
        raise InvalidTemplateInput("prompts must be a mapping of template names to contents")
    prepared: dict[str, tuple[Mapping[str, Any], _Prepared]] = {}
    for name, spec in prompts.items():  # everything is checked before anything is written
        check_name(name)
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"content", "params", "input_schema", "output_schema", "description", "tags"}
            if unknown:
                raise InvalidTemplateInput(f"{name}: unknown key(s) {', '.join(sorted(unknown))}")
            content = spec.get("content")
        else:
            spec, content = {}, spec
        try:
            prepared[name] = (spec, _prepare(content, spec.get("params"), spec.get("input_schema"),
                                             spec.get("output_schema"), f"{name}@new"))
        except TemplateError as exc:
            exc.args = (f"{name}: {exc}",)
            raise
    change = f"Registered from code ({where}{' @ ' + commit[:12] if commit else ''})"
    results: dict[str, tuple[TemplateVersion, bool]] = {}
    with _connection(pool) as conn, conn.transaction():  # all or nothing; names in order, so no deadlock
        for name in sorted(prepared):
            spec, p = prepared[name]
            row = conn.execute(
                """INSERT INTO templates (name, description, category, tags, owner, latest_version)
                   VALUES (%s, %s, %s, %s, %s, 1) ON CONFLICT (name) DO NOTHING RETURNING id""",
                (name, spec.get("description") or "", category or "", _clean_tags(spec.get("tags")),
                 created_by or "")).fetchone()
            if row is not None:
                results[name] = (_insert_version(conn, row[0], name, 1, p, created_by, change, git_commit=commit),
                                 True)
            else:
                tmpl = _template_row(conn, name, lock=True)
                results[name] = _new_version(conn, tmpl, p, created_by, change, git_commit=commit)
        for name in sorted(prepared):  # includes may point at prompts registered together
            _check_includes(conn, name, prepared[name][1])
    return {name: results[name] for name in prompts}
