"""Interchange: templates in and out of the repository as files, and prompts kept in application code.

`export_templates` gives templates with every version, label and label move as plain data (`dump_export` as YAML or
JSON); `import_templates` brings such data back in one transaction without ever rewriting a stored version.

An import file is someone else's claim, not history: every imported version and label move is recorded as made by
the importer at the time of the import. What the file says about a version's author, time, description and commit
is kept only as text marked as imported, in the change description (`imported: <description> [original: …]`).
The file's label history is not replayed. Files are read with a byte cap (`MAX_IMPORT_BYTES`) and YAML without
anchors or aliases (see core.untrusted).

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

from core import untrusted

from .content import _check_storable, _clean_tags, _prepare, _Prepared, _text, check_label, check_name
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
from .types import LABEL_RE, NAME_RE, ImportReport, TemplateVersion

EXPORT_FORMAT = "promptdev-templates"
EXPORT_FORMAT_VERSION = 1
MAX_IMPORT_BYTES = 16 * 1024 * 1024   # an import file (YAML or JSON); README "Limits"
MAX_NOTE_CHARS = 500                  # an imported change description, kept as text


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


def load_export(text: str | bytes, fmt: str = "yaml") -> dict[str, Any]:
    """Parse export text (YAML or JSON): at most MAX_IMPORT_BYTES (TooLarge), YAML without anchors or aliases."""
    if fmt not in ("json", "yaml", "yml"):
        raise InvalidTemplateInput(f"unknown export format {fmt!r}: use yaml or json")
    untrusted.check_text(text, MAX_IMPORT_BYTES, "the import file")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidTemplateInput(f"the import file is not UTF-8 text (byte {exc.start})") from None
    if fmt == "json":
        data = untrusted.load_json(text, "the import file", error=InvalidTemplateInput)
    else:
        data = untrusted.load_yaml(text, "the import file", error=InvalidTemplateInput)
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
    """Import an export file (at most MAX_IMPORT_BYTES, checked before it is read); see import_templates."""
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidTemplateInput(f"cannot read {path}: {exc}") from None
    data = untrusted.read_file(real, MAX_IMPORT_BYTES, f"{path}", error=InvalidTemplateInput)
    return import_templates(pool, load_export(data, fmt or format_for_path(path)), imported_by=imported_by)


def _ts(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidTemplateInput(f"{where}: invalid timestamp {str(value)[:40]!r}") from None


def _plain(value: Any, what: str) -> str:
    """Text from the file that is stored as it is: text, storable (no NUL, no lone surrogates)."""
    text = _text(value, what)
    _check_storable(text, what)
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")   # C0 and C1 controls: newlines, terminal escapes, …


def _one_line(value: Any, what: str, limit: int) -> str:
    """Text from the file kept only as a note: one line, control characters blanked, at most limit characters."""
    text = " ".join(_CONTROL.sub(" ", _plain(value, what)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _name(value: Any) -> str:
    """A template name by the rule names created here follow (the whole name: no trailing newline)."""
    name = check_name(value)
    if not NAME_RE.fullmatch(name):
        raise InvalidTemplateInput(f"invalid template name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    return name


def _label(value: Any, where: str) -> str:
    """A label by the same rule as labels moved in the UI (check_label), the whole name matching."""
    try:
        label = check_label(value)
        if not LABEL_RE.fullmatch(label):
            raise InvalidTemplateInput(f"invalid label {label!r}: use lowercase letters, digits, '.', '_' or '-', "
                                       f"starting with a letter")
    except TypeError:   # an unhashable key
        raise InvalidTemplateInput(f"invalid label {value!r}") from None
    except InvalidTemplateInput as exc:
        raise InvalidTemplateInput(f"{where}: {exc}") from None
    return label


def _imported_note(v: Mapping[str, Any], where: str) -> str:
    """The change description of an imported version: what the file claims, marked as imported."""
    desc = _one_line(v.get("change_description"), f"{where}: change_description", MAX_NOTE_CHARS)
    while desc.lower().startswith("imported:"):
        desc = desc[len("imported:"):].strip()
    original = [f"version {v['version']}"]
    author = _one_line(v.get("created_by"), f"{where}: created_by", 100)
    if author:
        original.append(f"by {author}")
    if v.get("created_at"):
        original.append(f"at {_ts(v['created_at'], where).isoformat()}")
    commit = _one_line(v.get("git_commit"), f"{where}: git_commit", 64)
    if commit:
        original.append(f"git {commit}")
    return f"imported: {desc + ' ' if desc else ''}[original: {', '.join(original)}]"


def _rollback_of(v: Mapping[str, Any], where: str) -> int | None:
    value = v.get("rollback_of")
    if value is None:
        return None
    if type(value) is not int or not 1 <= value < v["version"]:
        raise InvalidTemplateInput(f"{where}: rollback_of must be an earlier version number, got {value!r}")
    return value


def _imported_versions(item: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], _Prepared]]:
    name = item["name"]
    versions = item.get("versions") or []
    if not versions:
        raise InvalidTemplateInput(f"{name}: no versions")
    if not isinstance(versions, list):
        raise InvalidTemplateInput(f"{name}: versions must be a list")
    out = []
    for expected, v in enumerate(versions, 1):
        if not isinstance(v, Mapping) or type(v.get("version")) is not int or v.get("version") != expected:
            raise InvalidTemplateInput(f"{name}: versions must be numbered 1, 2, 3 … in order (expected {expected})")
        content = v.get("messages") if v.get("kind") == "chat" else v.get("text")
        try:
            prepared = _prepare(content, v.get("params"), v.get("input_schema"), v.get("output_schema"),
                                f"{name}@{expected}")
        except TemplateError as exc:
            raise InvalidTemplateInput(f"{name} version {expected}: {exc}") from None
        if v.get("content_sha256") and v["content_sha256"] != prepared.sha256:
            raise InvalidTemplateInput(f"{name} version {expected}: content does not match its content_sha256")
        where = f"{name} version {expected}"
        out.append(({"version": expected, "note": _imported_note(v, where), "rollback_of": _rollback_of(v, where)},
                    prepared))
    return out


def _labels(item: Mapping[str, Any]) -> dict[str, int]:
    """The file's labels as {label: version}, each label checked."""
    raw = item.get("labels") or {}
    if not isinstance(raw, Mapping):
        raise InvalidTemplateInput(f"{item['name']}: labels must be a mapping of label to version")
    out = {}
    for label, spec in raw.items():
        label = _label(label, item["name"])
        target = spec.get("version") if isinstance(spec, Mapping) else spec
        out[label] = target
    return out


def import_templates(pool: DB, data: Mapping[str, Any], *, imported_by: str = "") -> ImportReport:
    """Import export data in one transaction (all of it or nothing). New templates arrive with every version and
    their current labels; existing ones are never rewritten: versions beyond theirs are appended when their history
    is a prefix of the file's (and labels moved to match); when histories diverged, the file's unknown contents
    are appended as new versions.

    Every version and label move written is the importer's (imported_by, or "import"), made now; the file's authors,
    times, descriptions and commits are kept only in each version's change description, marked `imported:`. The
    file's label history is not replayed: the label moves recorded are the import's own."""
    created, unchanged = [], []
    extended: dict[str, int] = {}
    diverged: dict[str, int] = {}
    labels_moved = 0
    items = data.get("templates") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise InvalidTemplateInput("export data has no 'templates' list")
    importer = _one_line(imported_by, "imported_by", 100) or "import"
    current = "?"
    try:
        with _connection(pool) as conn, conn.transaction():
            for item in items:
                if not isinstance(item, Mapping) or "name" not in item:
                    raise InvalidTemplateInput("every template in the file needs a name")
                name = _name(item["name"])
                current = name
                versions = _imported_versions(item)
                labels = _labels(item)
                exists = conn.execute("SELECT id FROM templates WHERE name = %s FOR UPDATE", (name,)).fetchone()
                if exists is None:
                    labels_moved += _import_new(conn, item, versions, labels, importer)
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
                        _insert_version(conn, tmpl["id"], name, v["version"], p, importer, v["note"],
                                        v["rollback_of"])
                        added += 1
                    if added:
                        conn.execute("UPDATE templates SET latest_version = %s, updated_at = clock_timestamp() "
                                     "WHERE id = %s", (len(versions), tmpl["id"]))
                        extended[name] = added
                    for label, target in labels.items():
                        if type(target) is not int or not 1 <= target <= len(versions):
                            raise InvalidTemplateInput(f"{name}: label {label!r} points at unknown version "
                                                       f"{target!r}")
                        if set_label(conn, name, label, target, moved_by=importer):
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
                        _new_version(conn, tmpl, p, importer, v["note"])
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


def _import_new(conn: psycopg.Connection, item: Mapping[str, Any], versions: list[tuple[Mapping[str, Any], _Prepared]],
                labels: Mapping[str, Any], importer: str) -> int:
    """Create an imported template (now, by the importer) with its versions and labels; the number of labels set."""
    name = item["name"]
    active = item.get("active", True)
    if not isinstance(active, bool):
        raise InvalidTemplateInput(f"{name}: active must be true or false, got {active!r}")
    template_id = conn.execute(
        """INSERT INTO templates (name, description, category, tags, owner, active, latest_version)
           VALUES (%(name)s, %(description)s, %(category)s, %(tags)s, %(owner)s, %(active)s, %(latest_version)s)
           RETURNING id""",
        {"name": name, "description": _plain(item.get("description"), "description"),
         "category": _plain(item.get("category"), "category"),
         "tags": [_plain(t, "tags") for t in _clean_tags(item.get("tags"))],
         "owner": _plain(item.get("owner"), "owner"), "active": active, "latest_version": len(versions)},
    ).fetchone()[0]
    ids = {}
    for v, p in versions:
        tv = _insert_version(conn, template_id, name, v["version"], p, importer, v["note"], v["rollback_of"])
        ids[tv.version] = tv.id
    for label, target in labels.items():
        if type(target) is not int or target not in ids:
            raise InvalidTemplateInput(f"{name}: label {label!r} points at unknown version {target!r}")
        conn.execute("""INSERT INTO template_labels (template_id, label, version_id, moved_by)
                        VALUES (%s, %s, %s, %s)""", (template_id, label, ids[target], importer))
        conn.execute("""INSERT INTO template_label_events (template_id, label, from_version, to_version, moved_by)
                        VALUES (%s, %s, NULL, %s, %s)""", (template_id, label, target, importer))
    return len(labels)


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
