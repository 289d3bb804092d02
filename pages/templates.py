"""Templates: browse and search, create and edit with live checks, version history, diff, rollback with
confirmation, label moves, activate/deactivate, duplicate, export/import and a live preview. Every action calls
core.templates; expected errors are shown as one line."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import streamlit as st

from core import executions, untrusted
from core import templates as tpl
from core.errors import EXPECTED_ERRORS, InvalidInput
from core.templates import interchange
from pages import glue, widgets
from pages.widgets import code_span, md, safe_md

PAGE_SIZE = 50
MODE_BROWSE, MODE_NEW = "Browse", "New template"
STATUSES = {"All": None, "Active": True, "Inactive": False}
ANY = "Any"

# Session-state keys.
KEY_MODE = "templates.mode"
KEY_SEARCH = "templates.search"
KEY_CATEGORY = "templates.category"
KEY_TAG = "templates.tag"
KEY_STATUS = "templates.status"
KEY_PAGE = "templates.page"
KEY_OPEN = "templates.open"  # the open template's name
KEY_CONFIRM_ROLLBACK = "templates.confirm_rollback"  # (name, version) awaiting confirmation
KEY_EXPORT = "templates.export_text"
NEW_PREFIX = "templates.new"


def edit_prefix(name: str, base: int) -> str:
    """Widget-key prefix of the editor for template `name` starting from version `base`."""
    return f"templates.edit.{name}.v{base}"


def to_first_page() -> None:
    """Filters changed: back to page 1."""
    st.session_state[KEY_PAGE] = 1


def parse_json(text: str, label: str) -> Any:
    """JSON from a text area (None when empty); InvalidInput with a one-line message."""
    if not text or not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def pretty(value: Any) -> str:
    """JSON for a text area ('' for nothing)."""
    return json.dumps(value, indent=2, ensure_ascii=False) if value else ""


def preview(pool, prefix: str, render, names: list[str], schema: dict | None) -> None:
    """Live preview: fill the variables, see the rendered messages."""
    values, _ = widgets.variable_inputs(prefix, executions.variable_specs(names, None), columns=2)  # text boxes
    as_json = st.checkbox("Values are JSON", key=f"{prefix}.json",
                          help="Parse each value as JSON (lists, objects, numbers)")
    if as_json:
        parsed = {}
        for k, v in values.items():
            try:
                parsed[k] = json.loads(v)
            except json.JSONDecodeError:
                parsed[k] = v
        values = parsed
    values = tpl.coerce_variables(schema, values)
    try:
        rendered = render(values)
    except tpl.MissingVariables as exc:
        st.info(md("Fill in the variables to see the prompt — {}", exc))
        return
    except EXPECTED_ERRORS as exc:
        glue.show_error(exc)
        return
    widgets.show_messages(rendered.messages)
    st.caption(f"{sum(len(m['content']) for m in rendered.messages):,} characters")


def analyzed(prefix: str, content: Any) -> tpl.Analysis:
    """The editor's live checks, compiled once per change of the content, not on every rerun: kept by content
    hash in the session."""
    text = json.dumps(content, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    key = f"{prefix}.analysis"
    cached = st.session_state.get(key)
    if isinstance(cached, tuple) and cached[0] == digest:
        return cached[1]
    analysis = tpl.analyze(content)
    st.session_state[key] = (digest, analysis)
    return analysis


def editor(prefix: str, initial: tpl.TemplateVersion | None) -> dict[str, Any]:
    """Content, parameter and schema widgets with live variable detection and syntax errors; returns the values."""
    kinds = ("text", "chat")
    kind = st.radio("Kind", kinds, index=kinds.index(initial.kind) if initial else 0, key=f"{prefix}.kind",
                    horizontal=True, format_func={"text": "Text prompt", "chat": "Chat messages"}.get)
    if kind == "text":
        default = initial.text if initial is not None and initial.kind == "text" else ""
        content: Any = st.text_area("Prompt", value=default, key=f"{prefix}.text", height=200,
                                    placeholder="You are {{ role }}. Help with {{ topic }}.")
    else:
        messages = (initial.messages if initial is not None and initial.kind == "chat"
                    else [{"role": "system", "content": ""}, {"role": "user", "content": ""}])
        count = st.number_input("Messages", min_value=1, max_value=20, value=len(messages), key=f"{prefix}.count")
        content = []
        for i in range(int(count)):
            m = messages[i] if i < len(messages) else {"role": "user", "content": ""}
            left, right = st.columns([1, 5])
            role = left.selectbox("Role", tpl.ROLES, index=tpl.ROLES.index(m["role"]), key=f"{prefix}.role.{i}")
            text = right.text_area(f"Message {i + 1}", value=m["content"], key=f"{prefix}.content.{i}", height=110)
            content.append({"role": role, "content": text})
    analysis = analyzed(prefix, content)
    if analysis.error:
        st.error(safe_md(analysis.error))
    st.caption("Variables: " + (", ".join(code_span(v) for v in analysis.variables) or "none"))
    if analysis.includes:
        st.caption("Includes: " + ", ".join(code_span(r) for r in analysis.includes))
    with st.expander("Model parameters and JSON Schemas", expanded=bool(initial and (initial.params or
                                                                                     initial.input_schema))):
        params = st.text_area("Default model parameters (JSON)", value=pretty(initial.params if initial else None),
                              key=f"{prefix}.params", placeholder='{"temperature": 0.7, "max_tokens": 256}')
        input_schema = st.text_area("Input variables JSON Schema", key=f"{prefix}.input_schema",
                                    value=pretty(initial.input_schema if initial else None),
                                    placeholder='{"type": "object", "required": ["topic"]}')
        output_schema = st.text_area("Expected output JSON Schema", key=f"{prefix}.output_schema",
                                     value=pretty(initial.output_schema if initial else None))
    return {"content": content, "analysis": analysis, "params": params, "input_schema": input_schema,
            "output_schema": output_schema}


def parsed_fields(values: dict[str, Any]) -> dict[str, Any]:
    """params / input_schema / output_schema parsed from the editor's text areas ({} when empty)."""
    return {"params": parse_json(values["params"], "Model parameters") or {},
            "input_schema": parse_json(values["input_schema"], "Input schema") or {},
            "output_schema": parse_json(values["output_schema"], "Output schema") or {}}


def editor_preview(pool, prefix: str, values: dict[str, Any]) -> None:
    """Live preview of unsaved editor content."""
    if values["analysis"].error:
        return
    with st.expander("Live preview", expanded=False):
        try:
            schema = parse_json(values["input_schema"], "Input schema")
        except InvalidInput as exc:
            glue.show_error(exc)
            return
        names = values["analysis"].variables
        preview(pool, f"{prefix}.preview", lambda v: tpl.render_content(pool, values["content"], v,
                                                                        input_schema=schema), names, schema)


# ---------------------------------------------------------------------------------------------------------------


def new_template_form(pool) -> None:
    """Create a template (version 1)."""
    st.subheader("New template")
    name = st.text_input("Name", key=f"{NEW_PREFIX}.name", placeholder="support-reply",
                         help="A slug: lowercase letters, digits, '.', '_' or '-'")
    description = st.text_input("Description", key=f"{NEW_PREFIX}.description")
    a, b, c = st.columns(3)
    category = a.text_input("Category", key=f"{NEW_PREFIX}.category")
    tags = b.text_input("Tags", key=f"{NEW_PREFIX}.tags", placeholder="comma, separated")
    owner = c.text_input("Owner", key=f"{NEW_PREFIX}.owner", placeholder=glue.current_user())
    values = editor(NEW_PREFIX, None)
    editor_preview(pool, NEW_PREFIX, values)
    if st.button("Create template", key=f"{NEW_PREFIX}.create", type="primary"):
        with glue.reported():
            if values["analysis"].error:
                raise InvalidInput(values["analysis"].error)
            tv = tpl.create_template(pool, name.strip(), values["content"], description=description,
                                     category=category, tags=tags.split(","), owner=owner or glue.current_user(),
                                     created_by=glue.current_user(), **parsed_fields(values))
            widgets.flash("success", md("Created {} version 1", tv.name))
            clear = {k: None for k in list(st.session_state) if str(k).startswith(NEW_PREFIX + ".")}
            widgets.rerun_with(**clear, **{KEY_MODE: MODE_BROWSE, KEY_OPEN: tv.name})


def template_list(pool) -> None:
    """Search, filters, one page of rows and the template picker."""
    a, b, c, d = st.columns([3, 2, 2, 1.3])
    search = a.text_input("Search", key=KEY_SEARCH, placeholder="name or description", on_change=to_first_page)
    categories = [ANY, *tpl.list_categories(pool)]
    tags = [ANY, *tpl.list_tags(pool)]
    for key, options in ((KEY_CATEGORY, categories), (KEY_TAG, tags)):
        if st.session_state.get(key) not in options:
            st.session_state.pop(key, None)
    category = b.selectbox("Category", categories, key=KEY_CATEGORY, on_change=to_first_page)
    tag = c.selectbox("Tag", tags, key=KEY_TAG, on_change=to_first_page)
    status = d.selectbox("Status", list(STATUSES), key=KEY_STATUS, on_change=to_first_page)
    filters = {"search": search, "category": None if category == ANY else category, "tag": None if tag == ANY else tag,
               "active": STATUSES[status]}
    page_no = max(1, int(st.session_state.get(KEY_PAGE, 1)))
    page = tpl.list_templates(pool, limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE, **filters)
    pages = max(1, math.ceil(page.total / PAGE_SIZE))
    if page_no > pages:
        page_no = pages
        page = tpl.list_templates(pool, limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE, **filters)
    st.session_state[KEY_PAGE] = page_no
    if page.total == 0:
        st.info("No templates match." if any(filters.values()) or search else
                "No templates yet — create one with “New template”.")
    else:
        rows = [{"Name": t.name, "Version": t.latest_version,
                 "Labels": ", ".join(f"{k} → v{v}" for k, v in t.labels.items()),
                 "Status": "🟢 active" if t.active else "⚪ inactive",
                 "Updated": t.updated_at.strftime("%Y-%m-%d %H:%M"), "Category": t.category,
                 "Tags": ", ".join(t.tags)} for t in page.items]
        st.dataframe(rows, hide_index=True, key="templates.table")
    left, right = st.columns([1, 3])
    left.number_input("Page", min_value=1, max_value=pages, step=1, key=KEY_PAGE)
    first = page.offset + 1 if page.items else 0
    right.caption(f"Page {page_no} of {pages} · showing {first}–{page.offset + len(page.items)} of "
                  f"{page.total:,} templates")
    names = [t.name for t in page.items]
    current = st.session_state.get(KEY_OPEN)
    if current and current not in names:
        names = [current, *names]
    if names:
        st.selectbox("Open a template", names, index=None, key=KEY_OPEN, placeholder="Choose a template…")


def header(t: tpl.Template) -> None:
    """Name, status badge, labels and metadata."""
    badge = ":green-badge[active]" if t.active else ":gray-badge[inactive]"
    labels = " ".join(md(":blue-badge[{} → v{}]", k, v) for k, v in t.labels.items())
    st.subheader(safe_md(t.name))
    st.markdown(f"{badge} :violet-badge[latest → v{t.latest_version}] {labels}")
    facts = [safe_md(t.description or ""), f"category {code_span(t.category)}" if t.category else "",
             "tags " + ", ".join(code_span(x) for x in t.tags) if t.tags else "",
             md("owner {}", t.owner) if t.owner else "", f"updated {t.updated_at:%Y-%m-%d %H:%M}"]
    st.caption(" · ".join(f for f in facts if f))


def edit_tab(pool, t: tpl.Template, versions: list[int]) -> None:
    """Edit starting from any version; saving creates the next version (or says nothing changed)."""
    base = st.selectbox("Start from version", versions, key=f"templates.edit.{t.name}.base",
                        format_func=lambda v: f"v{v}" + (" (latest)" if v == t.latest_version else ""))
    base = base or t.latest_version
    tv = tpl.get_template_by_name(pool, t.name, version=base)
    prefix = edit_prefix(t.name, base)
    values = editor(prefix, tv)
    change = st.text_input("Change description", key=f"{prefix}.change", placeholder="what changed and why")
    editor_preview(pool, prefix, values)
    if st.button("Save new version", key=f"{prefix}.save", type="primary"):
        with glue.reported():
            if values["analysis"].error:
                raise InvalidInput(values["analysis"].error)
            saved, created = tpl.update_template(pool, t.name, values["content"], created_by=glue.current_user(),
                                                 change_description=change, base_version=base,
                                                 **parsed_fields(values))
            if created:
                widgets.flash("success", md("Saved {} version {}", t.name, saved.version))
            else:
                widgets.flash("info", f"No changes: the content is identical to version {saved.version}; "
                                      "nothing was saved")
            clear = {k: None for k in list(st.session_state) if str(k).startswith(prefix + ".")}
            widgets.rerun_with(**clear, **{f"templates.edit.{t.name}.base": None})


def history_tab(pool, t: tpl.Template, history: list[tpl.TemplateVersion]) -> None:
    """Versions with author, time and change description; view one; roll back with confirmation."""
    by_version: dict[int, list[str]] = {}
    for label, v in {**t.labels, "latest": t.latest_version}.items():
        by_version.setdefault(v, []).append(label)
    st.dataframe([{"Version": v.version, "Labels": ", ".join(sorted(by_version.get(v.version, []))),
                   "Author": v.created_by, "Created": v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                   "Change": v.change_description, "Rollback of": v.rollback_of, "SHA-256": v.content_sha256[:12],
                   "Git commit": (v.git_commit or "")[:12]} for v in history], hide_index=True,
                 key=f"templates.history.{t.name}.table")
    numbers = [v.version for v in history]
    shown = st.selectbox("View version", numbers, key=f"templates.history.{t.name}.view",
                         format_func=lambda v: f"v{v}")
    tv = next(v for v in history if v.version == (shown or numbers[0]))
    st.code(tpl.version_document(tv), language=None, wrap_lines=True)
    older = [v for v in numbers if v != t.latest_version]
    if not older:
        return
    st.markdown("**Roll back**")
    left, right = st.columns([2, 1])
    target = left.selectbox("Roll back to version", older, key=f"templates.rollback.{t.name}.version",
                            format_func=lambda v: f"v{v}")
    if right.button("Roll back…", key=f"templates.rollback.{t.name}.ask"):
        st.session_state[KEY_CONFIRM_ROLLBACK] = (t.name, target)
    pending = st.session_state.get(KEY_CONFIRM_ROLLBACK)
    if pending and pending[0] == t.name:
        st.warning(md("Roll back {} to version {}? This creates version {} with version {}'s content; no version is "
                      "deleted.", t.name, pending[1], t.latest_version + 1, pending[1]))
        yes, no = st.columns(2)
        if yes.button("Confirm rollback", key=f"templates.rollback.{t.name}.confirm", type="primary"):
            st.session_state.pop(KEY_CONFIRM_ROLLBACK, None)
            with glue.reported():
                tv, created = tpl.rollback_to_version(pool, t.name, pending[1], created_by=glue.current_user())
                widgets.flash("success" if created else "info",
                      f"Rolled back: version {tv.version} has version {pending[1]}'s content" if created else
                      f"Nothing to roll back: version {pending[1]} is identical to the current version")
                widgets.rerun_with(**{f"templates.edit.{t.name}.base": None})
        if no.button("Cancel", key=f"templates.rollback.{t.name}.cancel"):
            st.session_state.pop(KEY_CONFIRM_ROLLBACK, None)
            st.rerun()


def diff_tab(pool, t: tpl.Template, versions: list[int]) -> None:
    """Differences between any two versions, unified or side by side."""
    if len(versions) < 2:
        st.info("Only one version so far: nothing to compare.")
        return
    a, b, c = st.columns([1, 1, 2])
    left = a.selectbox("From", versions, index=1, key=f"templates.diff.{t.name}.from", format_func=lambda v: f"v{v}")
    right = b.selectbox("To", versions, index=0, key=f"templates.diff.{t.name}.to", format_func=lambda v: f"v{v}")
    style = c.radio("Style", ("Unified", "Side by side"), horizontal=True, key=f"templates.diff.{t.name}.style")
    diff = tpl.diff_versions(pool, t.name, left, right)
    if not diff.changed:
        st.info(f"Versions {left} and {right} are identical.")
    elif style == "Unified":
        st.code(diff.unified, language="diff")
    else:
        marks = {"equal": "", "replace": "≠", "delete": "−", "insert": "+"}
        st.dataframe([{"#": r.left_no, f"v{left}": r.left, " ": marks[r.tag], "# ": r.right_no, f"v{right}": r.right}
                      for r in diff.side_by_side], hide_index=True, key=f"templates.diff.{t.name}.table")


def labels_tab(pool, t: tpl.Template, versions: list[int]) -> None:
    """Current labels, moving or removing one, and the recorded history of moves."""
    current = {**t.labels, "latest": t.latest_version}
    st.markdown(" ".join(f"{code_span(k)} → v{v}" for k, v in current.items()))
    choices = list(dict.fromkeys([*tpl.STANDARD_LABELS, *t.labels, "other…"]))
    a, b, c = st.columns([2, 2, 1])
    label = a.selectbox("Label", choices, key=f"templates.labels.{t.name}.label")
    if label == "other…":
        label = a.text_input("Custom label", key=f"templates.labels.{t.name}.custom", placeholder="canary").strip()
    version = b.selectbox("Version", versions, key=f"templates.labels.{t.name}.version", format_func=lambda v: f"v{v}")
    if c.button("Move label", key=f"templates.labels.{t.name}.move", type="primary"):
        with glue.reported():
            if not label:
                raise InvalidInput("Type a label name")
            moved = tpl.set_label(pool, t.name, label, version, moved_by=glue.current_user())
            widgets.flash("success" if moved else "info",
                  md("{} → version {}", label, version) if moved else
                  md("{} already points at version {}", label, version))
            st.rerun()
    if t.labels:
        d, e = st.columns([2, 1])
        gone = d.selectbox("Remove a label", list(t.labels), key=f"templates.labels.{t.name}.remove_which")
        if e.button("Remove label", key=f"templates.labels.{t.name}.remove"):
            with glue.reported():
                tpl.remove_label(pool, t.name, gone, moved_by=glue.current_user())
                widgets.flash("success", md("Removed label {}", gone))
                st.rerun()
    events = tpl.get_label_history(pool, t.name)
    if events:
        st.markdown("**History of label moves**")
        st.dataframe([{"When": e.moved_at.strftime("%Y-%m-%d %H:%M:%S"), "Label": e.label,
                       "From": f"v{e.from_version}" if e.from_version else "—",
                       "To": f"v{e.to_version}" if e.to_version else "removed", "By": e.moved_by} for e in events],
                     hide_index=True, key=f"templates.labels.{t.name}.history")


def preview_tab(pool, t: tpl.Template, versions: list[int]) -> None:
    """Fill the variables of a saved version and see its rendered messages."""
    refs = ["default", *[k for k in t.labels], *[f"v{v}" for v in versions]]
    which = st.selectbox("Version", refs, key=f"templates.preview.{t.name}.ref",
                         format_func=lambda r: "default (production, else latest)" if r == "default" else r)
    label = None if which in (None, "default") or which.startswith("v") else which
    version = int(which[1:]) if which and which.startswith("v") else None
    tv = tpl.get_template_by_name(pool, t.name, label=label, version=version)
    names = tpl.required_variables(pool, tv)
    st.caption(md("Rendering {} · variables: ", tv.ref) + (", ".join(code_span(n) for n in names) or "none"))
    preview(pool, f"templates.preview.{t.name}",
            lambda v: tpl.render_template(pool, tv, v), names, tv.input_schema)


def manage_tab(pool, t: tpl.Template) -> None:
    """Details, activate/deactivate, duplicate, export."""
    with st.container(border=True):
        st.markdown("**Details** (not versioned)")
        description = st.text_input("Description", value=t.description, key=f"templates.manage.{t.name}.description")
        a, b, c = st.columns(3)
        category = a.text_input("Category", value=t.category, key=f"templates.manage.{t.name}.category")
        tags = b.text_input("Tags", value=", ".join(t.tags), key=f"templates.manage.{t.name}.tags")
        owner = c.text_input("Owner", value=t.owner, key=f"templates.manage.{t.name}.owner")
        if st.button("Save details", key=f"templates.manage.{t.name}.save"):
            with glue.reported():
                tpl.update_metadata(pool, t.name, description=description, category=category, tags=tags, owner=owner)
                widgets.flash("success", md("Saved the details of {}", t.name))
                st.rerun()
    a, b = st.columns(2)
    with a.container(border=True):
        st.markdown("**Status**")
        caption, action, switch, done = (
            ("Active: can be rendered by name.", "Deactivate", tpl.deactivate_template, "is now inactive")
            if t.active else
            ("Inactive: kept with its history, but cannot be rendered by name.", "Activate", tpl.activate_template,
             "is active again"))
        st.caption(caption)
        if st.button(action, key=f"templates.manage.{t.name}.{action.lower()}"):
            with glue.reported():
                switch(pool, t.name)
                widgets.flash("success", md("{} {}", t.name, done))
                st.rerun()
    with b.container(border=True):
        st.markdown("**Duplicate**")
        new_name = st.text_input("New name", key=f"templates.manage.{t.name}.new_name", placeholder=f"{t.name}-copy")
        if st.button("Duplicate", key=f"templates.manage.{t.name}.duplicate"):
            with glue.reported():
                tv = tpl.duplicate_template(pool, t.name, new_name.strip(), created_by=glue.current_user())
                widgets.flash("success", md("Created {} from {} version {}", tv.name, t.name, t.latest_version))
                widgets.rerun_with(**{KEY_OPEN: tv.name, f"templates.manage.{t.name}.new_name": None})
    text = tpl.dump_export(tpl.export_templates(pool, [t.name]), "yaml")
    st.download_button("Export as YAML", text, file_name=f"{t.name}.yaml", mime="application/yaml",
                       key=f"templates.manage.{t.name}.export")


def template_detail(pool, name: str) -> None:
    """The open template: header and tabs."""
    t = tpl.get_template(pool, name)
    history = tpl.get_version_history(pool, name)
    versions = [v.version for v in history]
    st.divider()
    header(t)
    tabs = st.tabs(["Edit", "History", "Diff", "Labels", "Preview", "Manage"])
    with tabs[0]:
        edit_tab(pool, t, versions)
    with tabs[1]:
        history_tab(pool, t, history)
    with tabs[2]:
        diff_tab(pool, t, versions)
    with tabs[3]:
        labels_tab(pool, t, versions)
    with tabs[4]:
        with glue.reported():
            preview_tab(pool, t, versions)
    with tabs[5]:
        manage_tab(pool, t)


def import_export(pool) -> None:
    """Export every template, import a file."""
    with st.expander("Import / export"):
        a, b = st.columns(2)
        with a:
            fmt = st.radio("Format", ("yaml", "json"), horizontal=True, key="templates.export.format")
            if st.button("Prepare export of all templates", key="templates.export.prepare"):
                with glue.reported():
                    st.session_state[KEY_EXPORT] = (fmt, tpl.dump_export(tpl.export_templates(pool), fmt))
            prepared = st.session_state.get(KEY_EXPORT)
            if prepared:
                st.download_button(f"Download templates.{prepared[0]}", prepared[1],
                                   file_name=f"templates.{prepared[0]}", key="templates.export.download")
        with b:
            cap = interchange.MAX_IMPORT_BYTES
            upload = st.file_uploader("Import a file", type=["yaml", "yml", "json"], key="templates.import.file",
                                      max_upload_size=cap // 2**20, help=f"At most {cap // 2**20} MB.")
            if upload is not None and st.button("Import", key="templates.import.run"):
                with glue.reported():
                    untrusted.check_size(upload.size, cap, "the import file")   # before reading it
                    fmt = tpl.format_for_path(upload.name)
                    report = tpl.import_templates(pool, tpl.load_export(upload.getvalue(), fmt),
                                                  imported_by=glue.current_user())
                    widgets.flash("success", safe_md(report.summary()))
                    st.rerun()


# ---------------------------------------------------------------------------------------------------------------

st.title("Templates")
pool = glue.pool()
widgets.carry_over()

mode = st.radio("Mode", (MODE_BROWSE, MODE_NEW), key=KEY_MODE, horizontal=True, label_visibility="collapsed")
if mode == MODE_NEW:
    new_template_form(pool)
else:
    with glue.reported():
        template_list(pool)
    import_export(pool)
    selected = st.session_state.get(KEY_OPEN)
    if selected:
        with glue.reported():
            template_detail(pool, selected)
