"""`promptdev templates …` and `promptdev render NAME key=value …`: the command line of core.templates."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from core import db, untrusted
from core import templates as tpl
from core.cli._common import fail
from core.config import Settings
from core.templates import interchange


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers)
        return ""


class _MessageAction(argparse.Action):
    """--system/--user/--assistant TEXT, kept in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append({"role": option_string.lstrip("-"), "content": values})
        setattr(namespace, self.dest, items)


def _json_arg(value: str | None, what: str) -> Any:
    """Inline JSON, or @path to a JSON/YAML file."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        text = untrusted.read_file(Path(value[1:]).resolve(), interchange.MAX_IMPORT_BYTES, f"{what} ({value[1:]})")
        if value.lower().endswith((".yaml", ".yml")):
            return untrusted.load_yaml(text, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{what}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")


def _content_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("content", nargs="?", help="the prompt text (a text template)")
    p.add_argument("--file", help="read the content from a file: text, or JSON/YAML (a list of messages, or a "
                                  "mapping with messages or text, params, input_schema, output_schema)")
    for role in ("system", "user", "assistant"):
        p.add_argument(f"--{role}", dest="messages", action=_MessageAction, metavar="TEXT",
                       help=f"a {role} message of a chat template (repeatable, order kept)")
    p.add_argument("--params", help='default model parameters as JSON, e.g. \'{"temperature": 0.2}\' (or @file)')
    p.add_argument("--input-schema", help="JSON Schema of the input variables: JSON or @file ('{}' clears it)")
    p.add_argument("--output-schema", help="JSON Schema of the expected output: JSON or @file ('{}' clears it)")
    p.add_argument("--created-by", default=None, help="author recorded on the version (default: your login)")
    p.add_argument("--change", default="", help="change description recorded on the version")


def _read_content(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(content, extra) from the positional text, --system/--user/--assistant or --file."""
    given = [x for x in (args.content is not None, bool(args.messages), bool(args.file)) if x]
    if len(given) > 1:
        fail("give the prompt text, --system/--user/--assistant messages or --file, only one of them")
    if not given:
        fail("no content: give the prompt text, --system/--user/--assistant messages or --file")
    extra: dict[str, Any] = {}
    if args.messages:
        return args.messages, extra
    if args.content is not None:
        return args.content, extra
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        return text, extra
    doc = _json_arg("@" + str(path), "--file")
    if isinstance(doc, list):
        return doc, extra
    if isinstance(doc, dict):
        unknown = set(doc) - {"messages", "text", "params", "input_schema", "output_schema"}
        if unknown or ("messages" in doc) == ("text" in doc):
            fail(f"{path}: expected a list of messages or a mapping with messages or text "
                 f"(and params, input_schema, output_schema)")
        extra = {k: doc[k] for k in ("params", "input_schema", "output_schema") if k in doc}
        return doc.get("messages", doc.get("text")), extra
    fail(f"{path}: expected a list of messages or a mapping")
    raise AssertionError  # unreachable


def _schemas(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(extra)
    for key, option in (("params", "--params"), ("input_schema", "--input-schema"),
                        ("output_schema", "--output-schema")):
        value = _json_arg(getattr(args, key), option)
        if value is not None:
            out[key] = value
    return out


def _show_version(tv: tpl.TemplateVersion, label: str | None = None) -> None:
    where = f" ({label})" if label else ""
    print(f"{tv.name} version {tv.version}{where} · {tv.kind} · by {tv.created_by or '-'} · "
          f"{tv.created_at:%Y-%m-%d %H:%M:%S}")
    if tv.change_description:
        print(f"change: {tv.change_description}")
    print(f"variables: {', '.join(tv.variables) or '-'}")
    if tv.params:
        print(f"params: {json.dumps(tv.params, sort_keys=True)}")
    if tv.input_schema:
        print(f"input schema: {json.dumps(tv.input_schema, sort_keys=True)}")
    if tv.output_schema:
        print(f"output schema: {json.dumps(tv.output_schema, sort_keys=True)}")
    print(f"sha256: {tv.content_sha256}")
    print("---")
    if tv.kind == "text":
        print(tv.text, end="" if (tv.text or "").endswith("\n") else "\n")
    else:
        for m in tv.messages:
            print(f"[{m['role']}]")
            print(m["content"])


def _version_dict(tv: tpl.TemplateVersion) -> dict[str, Any]:
    return {"id": tv.id, "name": tv.name, "version": tv.version, "kind": tv.kind,
            **({"messages": tv.messages} if tv.kind == "chat" else {"text": tv.text}),
            "params": tv.params, "input_schema": tv.input_schema, "output_schema": tv.output_schema,
            "variables": tv.variables, "created_by": tv.created_by, "created_at": tv.created_at.isoformat(),
            "change_description": tv.change_description, "content_sha256": tv.content_sha256,
            "rollback_of": tv.rollback_of, "git_commit": tv.git_commit}


def _create(args: argparse.Namespace, settings: Settings) -> None:
    content, extra = _read_content(args)
    tv = tpl.create_template(db.get_pool(settings), args.name, content, description=args.description,
                             category=args.category, tags=args.tag or (), owner=args.owner or "",
                             created_by=_author(args), change_description=args.change, **_schemas(args, extra))
    print(f"created {tv.name} version {tv.version} (variables: {', '.join(tv.variables) or '-'})")


def _author(args: argparse.Namespace) -> str:
    return args.created_by if args.created_by is not None else _whoami()


def _update(args: argparse.Namespace, settings: Settings) -> None:
    content, extra = _read_content(args)
    tv, created = tpl.update_template(db.get_pool(settings), args.name, content, created_by=_author(args),
                                      change_description=args.change, base_version=args.from_version,
                                      **_schemas(args, extra))
    if created:
        print(f"created {tv.name} version {tv.version}")
    else:
        print(f"no change: the content is identical to {tv.name} version {tv.version}; no version created")


def _list(args: argparse.Namespace, settings: Settings) -> None:
    active = {"active": True, "inactive": False, "all": None}[args.status]
    page = tpl.list_templates(db.get_pool(settings), search=args.search, category=args.category, tag=args.tag,
                              active=active, limit=args.limit, offset=args.offset, order=args.order)
    if args.json:
        print(json.dumps({"total": page.total, "templates": [
            {"name": t.name, "version": t.latest_version, "labels": t.labels, "active": t.active,
             "category": t.category, "tags": t.tags, "description": t.description,
             "updated_at": t.updated_at.isoformat()} for t in page.items]}, indent=2))
        return
    if not page.items:
        print("no templates match" if page.total == 0 else f"no templates on this page ({page.total} in all)")
        return
    width = max(len(t.name) for t in page.items)
    for t in page.items:
        labels = " ".join(f"{k}:{v}" for k, v in t.labels.items())
        status = "active" if t.active else "inactive"
        print(f"{t.name:<{width}}  v{t.latest_version:<4} {status:<8}  {t.updated_at:%Y-%m-%d %H:%M}  "
              f"{t.category or '-'}  {labels}".rstrip())
    shown = f"{page.offset + 1}-{page.offset + len(page.items)}"
    print(f"({shown} of {page.total})")


def _get(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    tv = tpl.get_template_by_name(pool, args.name, label=args.label, version=args.version)
    if args.json:
        print(json.dumps(_version_dict(tv), indent=2, ensure_ascii=False))
        return
    label = args.label
    if label is None and args.version is None:
        label = "production" if tpl.get_template(pool, args.name).labels.get("production") == tv.version else "latest"
    _show_version(tv, label)


def _history(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    labels = tpl.get_labels(pool, args.name)
    by_version: dict[int, list[str]] = {}
    for label, version in labels.items():
        by_version.setdefault(version, []).append(label)
    for tv in tpl.get_version_history(pool, args.name):
        tags = f" [{', '.join(sorted(by_version.get(tv.version, [])))}]" if tv.version in by_version else ""
        rollback = f" (rollback of {tv.rollback_of})" if tv.rollback_of else ""
        print(f"v{tv.version}{tags}  {tv.created_at:%Y-%m-%d %H:%M:%S}  {tv.created_by or '-'}  "
              f"{tv.change_description or '-'}{rollback}  {tv.content_sha256[:12]}")


def _diff(args: argparse.Namespace, settings: Settings) -> None:
    diff = tpl.diff_versions(db.get_pool(settings), args.name, args.a, args.b)
    if not diff.changed:
        print(f"versions {args.a} and {args.b} are identical")
        return
    if args.side_by_side:
        width = max([len(r.left) for r in diff.side_by_side] + [10])
        width = min(width, 80)
        marks = {"equal": " ", "replace": "|", "delete": "<", "insert": ">"}
        for r in diff.side_by_side:
            print(f"{r.left_no or '':>4} {r.left[:width]:<{width}} {marks[r.tag]} {r.right_no or '':>4} {r.right}")
    else:
        print(diff.unified)


def _rollback(args: argparse.Namespace, settings: Settings) -> None:
    tv, created = tpl.rollback_to_version(db.get_pool(settings), args.name, args.version, created_by=_author(args),
                                          change_description=args.change)
    if created:
        print(f"created {tv.name} version {tv.version}: rollback to version {args.version}")
    else:
        print(f"no change: version {args.version} is identical to the current version {tv.version}")


def _label(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    by = args.by if args.by is not None else _whoami()
    if args.label is None:
        for label, version in sorted(tpl.get_labels(pool, args.name).items()):
            print(f"{label}: {version}")
        for e in tpl.get_label_history(pool, args.name):
            print(f"{e.moved_at:%Y-%m-%d %H:%M:%S}  {e.label}: {e.from_version or '-'} -> {e.to_version or '-'}  "
                  f"by {e.moved_by or '-'}")
        return
    if args.remove:
        if args.version is not None:
            fail("give a version or --remove, not both")
        removed = tpl.remove_label(pool, args.name, args.label, moved_by=by)
        print(f"removed label {args.label}" if removed else f"{args.name} has no label {args.label}")
        return
    if args.version is None:
        fail("give the version to point the label at, e.g. `promptdev templates label NAME production 2`")
    moved = tpl.set_label(pool, args.name, args.label, args.version, moved_by=by)
    print(f"{args.label} -> {args.name} version {args.version}" if moved
          else f"{args.label} already points at version {args.version}")


def _activate(args: argparse.Namespace, settings: Settings) -> None:
    changed = tpl.set_active(db.get_pool(settings), args.name, args.active)
    state = "active" if args.active else "inactive"
    print(f"{args.name} is now {state}" if changed else f"{args.name} was already {state}")


def _duplicate(args: argparse.Namespace, settings: Settings) -> None:
    tv = tpl.duplicate_template(db.get_pool(settings), args.name, args.new_name, version=args.version,
                                created_by=_author(args))
    print(f"created {tv.name} version 1 ({tv.change_description})")


def _export(args: argparse.Namespace, settings: Settings) -> None:
    fmt = args.format or ("yaml" if args.file == "-" else tpl.format_for_path(args.file))
    data = tpl.export_templates(db.get_pool(settings), args.names or None)
    text = tpl.dump_export(data, fmt)
    if args.file == "-":
        sys.stdout.write(text)
        return
    tpl.write_export(args.file, text)
    print(f"exported {len(data['templates'])} templates to {args.file}")


def _import(args: argparse.Namespace, settings: Settings) -> None:
    by = args.by if args.by is not None else _whoami()
    if args.file == "-":
        data = sys.stdin.buffer.read(interchange.MAX_IMPORT_BYTES + 1)   # the cap and one byte more: TooLarge
        report = tpl.import_templates(db.get_pool(settings), tpl.load_export(data, args.format or "yaml"),
                                      imported_by=by)
    else:
        report = tpl.import_from_file(db.get_pool(settings), args.file, imported_by=by, fmt=args.format)
    print(report.summary())


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """key=value (a string) and key:=json (any JSON value) pairs as a dict."""
    out: dict[str, Any] = {}
    for item in items:
        eq = item.find("=")
        if eq <= 0:
            fail(f"expected key=value or key:=json, got {item!r}")
        if item[eq - 1] == ":":
            key, raw = item[:eq - 1], item[eq + 1:]
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError as exc:
                fail(f"{key}: not valid JSON: {exc.msg}")
        else:
            key, value = item[:eq], item[eq + 1:]
        key = key.strip()
        if not key.isidentifier():
            fail(f"{key!r} is not a variable name")
        out[key] = value
    return out


def _render(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    variables: dict[str, Any] = {}
    if args.vars:
        loaded = _json_arg("@" + args.vars, "--vars")
        if not isinstance(loaded, dict):
            fail("--vars: expected a mapping of variable names to values")
        variables.update(loaded)
    variables.update(parse_assignments(args.assignments))
    tv = tpl.get_template_by_name(pool, args.name, label=args.label, version=args.version)
    variables = tpl.coerce_variables(tv.input_schema, variables)
    rendered = tpl.render_template_by_name(pool, args.name, variables, label=args.label, version=args.version)
    if args.json:
        print(json.dumps({"name": tv.name, "version": rendered.template_version.version, "label": rendered.label,
                          "messages": rendered.messages, "prompt": rendered.prompt}, indent=2, ensure_ascii=False))
    elif rendered.prompt is not None:
        print(rendered.prompt, end="" if rendered.prompt.endswith("\n") else "\n")
    else:
        for m in rendered.messages:
            print(f"[{m['role']}]")
            print(m["content"])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `templates …` and `render` to the promptdev command line."""
    top = subparsers.add_parser("templates", help="manage versioned prompt templates")
    sub = top.add_subparsers(dest="templates_command", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="create a template (version 1)")
    p.add_argument("name")
    _content_options(p)
    p.add_argument("--description", default="")
    p.add_argument("--category", default="")
    p.add_argument("--tag", action="append", help="a tag (repeatable)")
    p.add_argument("--owner", default=None)
    p.set_defaults(func=_create)

    p = sub.add_parser("update", help="save new content as the next version")
    p.add_argument("name")
    _content_options(p)
    p.add_argument("--from-version", type=int, default=None,
                   help="the version the edit started from (params and schemas default to its own)")
    p.set_defaults(func=_update)

    p = sub.add_parser("list", help="list templates")
    p.add_argument("--search", default="", help="text in the name or description")
    p.add_argument("--category")
    p.add_argument("--tag")
    p.add_argument("--status", choices=("active", "inactive", "all"), default="all")
    p.add_argument("--order", choices=("updated", "name"), default="updated")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = sub.add_parser("get", help="show a version (default: production, else latest)")
    p.add_argument("name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label")
    g.add_argument("--version", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_get)

    p = sub.add_parser("history", help="list every version, newest first")
    p.add_argument("name")
    p.set_defaults(func=_history)

    p = sub.add_parser("diff", help="differences between two versions")
    p.add_argument("name")
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    p.add_argument("--side-by-side", action="store_true")
    p.set_defaults(func=_diff)

    p = sub.add_parser("rollback", help="create a new version with an older version's content")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--created-by", default=None)
    p.add_argument("--change", default="")
    p.set_defaults(func=_rollback)

    p = sub.add_parser("label", help="move a label (production, staging, …) to a version; without LABEL: show")
    p.add_argument("name")
    p.add_argument("label", nargs="?")
    p.add_argument("version", nargs="?", type=int)
    p.add_argument("--remove", action="store_true", help="remove the label")
    p.add_argument("--by", default=None, help="who moved it (default: your login)")
    p.set_defaults(func=_label)

    for action, active in (("activate", True), ("deactivate", False)):
        p = sub.add_parser(action, help=f"{action} a template")
        p.add_argument("name")
        p.set_defaults(func=_activate, active=active)

    p = sub.add_parser("duplicate", help="copy a template under a new name")
    p.add_argument("name")
    p.add_argument("new_name")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--created-by", default=None)
    p.set_defaults(func=_duplicate)

    p = sub.add_parser("export", help="write templates with all versions and labels to a YAML or JSON file")
    p.add_argument("file", help="output file (.yaml, .yml or .json), or - for standard output")
    p.add_argument("names", nargs="*", help="templates to export (default: all)")
    p.add_argument("--format", choices=("yaml", "json"))
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="import an export file (existing history is never rewritten)")
    p.add_argument("file", help="a file written by export, or - for standard input")
    p.add_argument("--format", choices=("yaml", "json"))
    p.add_argument("--by", default=None, help="who imports (recorded as the author of the imported versions and "
                                              "label moves; the file's authors are kept as imported notes)")
    p.set_defaults(func=_import)

    p = subparsers.add_parser("render", help="render a template: promptdev render NAME key=value key:=json …")
    p.add_argument("name")
    p.add_argument("assignments", nargs="*", default=[], metavar="key=value")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label")
    g.add_argument("--version", type=int)
    p.add_argument("--vars", help="a JSON or YAML file of variables")
    p.add_argument("--json", action="store_true", help="print the messages as JSON")
    p.set_defaults(func=_render)
