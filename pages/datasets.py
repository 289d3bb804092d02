"""Datasets: list and create datasets, edit items in a grid (filtered by tag), import CSV/JSONL with a column mapping
and a preview (every rejected row listed with its line), export both formats. Every action calls core.datasets."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from core import datasets as ds
from core import templates as tpl
from core import untrusted
from core.errors import EXPECTED_ERRORS
from pages import glue, widgets
from pages.widgets import md, safe_md

PAGE_SIZE = 500
ALL_TAGS = "All items"
ROLE_LABELS = {
    "var": "variable", "json": "variable (JSON)", "expected": "expected output", "tags": "tags",
    "metadata": "metadata (JSON object)", "meta": "metadata field", "assert": "assertion (promptfoo shorthand)",
    "ignore": "ignore",
}
ENCODINGS = ["utf-8", "latin-1", "cp1252", "utf-16"]

# Session-state keys.
KEY_OPEN = "datasets.open"            # the open dataset's name
KEY_GRID_VERSION = "datasets.grid_version"  # bumped after a save so the grid starts from the stored items
KEY_TAG = "datasets.tag"
KEY_SEARCH = "datasets.search"
KEY_PAGE = "datasets.page"
KEY_REPORT = "datasets.import_report"  # the last import's report, shown until the next one
KEY_EXPORT = "datasets.export"         # format -> (dataset, tag, bytes) prepared for download


def open_dataset(name: str | None) -> None:
    """Rerun with this dataset open (None: the first), its grid starting from the stored items."""
    st.session_state[KEY_GRID_VERSION] = st.session_state.get(KEY_GRID_VERSION, 0) + 1
    widgets.rerun_with(**{KEY_OPEN: name})


def new_dataset_form(pool, templates: list[str]) -> None:
    """Create an empty dataset."""
    with st.form("datasets.new", clear_on_submit=True):
        st.markdown("**New dataset**")
        a, b = st.columns(2)
        name = a.text_input("Name", key="datasets.new.name", placeholder="e.g. support-questions")
        default = b.selectbox("Default template", ["(none)", *templates], key="datasets.new.template")
        description = st.text_input("Description", key="datasets.new.description")
        if st.form_submit_button("Create dataset"):
            with glue.reported():
                d = ds.create_dataset(pool, name.strip(), description=description,
                                      default_template=None if default == "(none)" else default,
                                      created_by=glue.current_user())
                widgets.flash("success", md("Created dataset {}.", d.name))
                open_dataset(d.name)


def items_tab(pool, name: str) -> None:
    """The grid: filter by tag or text, edit cells, add and delete rows, save in one transaction."""
    tags = ds.dataset_tags(pool, name)
    if st.session_state.get(KEY_TAG) not in [ALL_TAGS, *tags]:
        st.session_state.pop(KEY_TAG, None)
    a, b, c = st.columns([2, 2, 1])
    tag = a.selectbox("Tag", [ALL_TAGS, *tags], key=KEY_TAG)
    search = b.text_input("Search", key=KEY_SEARCH, placeholder="text in inputs or expected output")
    tag = None if tag == ALL_TAGS else tag
    total = ds.count_items(pool, name, tag=tag)
    pages = max(1, -(-total // PAGE_SIZE))
    page = int(c.number_input("Page", min_value=1, max_value=pages, step=1, key=KEY_PAGE)) if pages > 1 else 1
    items = ds.list_items(pool, name, tag=tag, search=search, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    variables = ds.dataset_variables(pool, name)
    rows = ds.grid_rows(items, variables)
    frame = pd.DataFrame(rows, columns=["id", *variables, "expected", "tags", "metadata", "revision"])
    config = {
        "id": st.column_config.NumberColumn("id", disabled=True, help="Item id"),
        "revision": st.column_config.NumberColumn("rev", disabled=True,
                                                  help="Revision: an item a run used gets a new one when edited"),
        "expected": st.column_config.TextColumn("expected output"),
        "tags": st.column_config.TextColumn("tags", help="Comma-separated"),
        "metadata": st.column_config.TextColumn("metadata", help="A JSON object; `assert` holds the item's own "
                                                "evaluators"),
        **{v: st.column_config.TextColumn(v, help="Input variable") for v in variables},
    }
    st.caption(f"{total:,} item(s)" + (md(" tagged {}", tag) if tag else "") + (f", page {page} of {pages}" if pages > 1
               else "") + ". Edit cells, add rows at the bottom, select rows and delete them, then save. "
               "Items an evaluation run used keep their old revision for that run.")
    new_var = st.text_input("Add a variable column", key="datasets.new_var", placeholder="variable name")
    if new_var.strip() and new_var.strip() not in frame.columns:
        frame.insert(len(variables) + 1, new_var.strip(), None)
        config[new_var.strip()] = st.column_config.TextColumn(new_var.strip(), help="Input variable")
        variables = [*variables, new_var.strip()]
    edited = st.data_editor(frame, key=f"datasets.grid.{name}.{st.session_state.get(KEY_GRID_VERSION, 0)}",
                            num_rows="dynamic", width="stretch", hide_index=True, column_config=config)
    if st.button("Save changes", key="datasets.save", type="primary"):
        with glue.reported():
            added, updated, deleted = ds.grid_changes(items, variables, edited.to_dict("records"))
            if not (added or updated or deleted):
                st.info("Nothing changed.")
            else:
                summary = ds.apply_edits(pool, name, added=added, updated=updated, deleted=deleted,
                                         edited_by=glue.current_user())
                parts = [f"{n} {what}" for n, what in ((summary.added, "added"), (summary.updated, "updated"),
                                                        (summary.revised, "revised (new revision)"),
                                                        (summary.deleted, "deleted"),
                                                        (summary.archived, "removed (kept for their runs)")) if n]
                widgets.flash("success", "Saved: " + ", ".join(parts) + ".")
                st.session_state[KEY_GRID_VERSION] = st.session_state.get(KEY_GRID_VERSION, 0) + 1
                st.rerun()
    with st.expander("Item history"):
        item_id = st.number_input("Item id", min_value=1, step=1, value=None, key="datasets.history_id")
        if item_id:
            with glue.reported():
                history = ds.item_history(pool, int(item_id))
                st.dataframe(pd.DataFrame([{
                    "revision": r.revision, "input": json.dumps(r.input, ensure_ascii=False), "expected": r.expected,
                    "tags": ", ".join(r.tags), "by": r.created_by, "at": r.created_at} for r in history]),
                    hide_index=True, width="stretch")


def import_tab(pool, name: str) -> None:
    """Upload, map columns, preview, import; every rejected row is listed with its line number."""
    upload = st.file_uploader("CSV or JSONL file", type=["csv", "tsv", "jsonl", "ndjson", "json", "txt"],
                              key="datasets.upload", max_upload_size=ds.MAX_IMPORT_BYTES // 2**20,
                              help=f"At most {ds.MAX_IMPORT_BYTES // 2**20} MB.")
    if upload is None:
        st.caption("Columns become input variables unless mapped otherwise: `expected` → expected output, `tags` → "
                   "tags, `metadata` → metadata, promptfoo's `__expected` → the item's own assertions.")
        report_panel()
        return
    a, b, c, d = st.columns(4)
    try:
        guessed = ds.format_for(upload.name)
    except ValueError:
        guessed = "csv"
    fmt = a.selectbox("Format", list(ds.FORMATS), index=list(ds.FORMATS).index(guessed), key="datasets.format")
    encoding = b.selectbox("Encoding", ENCODINGS, key="datasets.encoding")
    delimiter = c.selectbox("Separator", [",", ";", "tab", "|"], key="datasets.delimiter",
                            index=2 if upload.name.lower().endswith(".tsv") else 0, disabled=fmt != "csv")
    target = d.text_input("Import into", value=name, key=f"datasets.target.{name}",
                          help="An existing dataset, or a new name to create one")
    try:
        untrusted.check_size(upload.size, ds.MAX_IMPORT_BYTES, "the file")   # before reading it
    except EXPECTED_ERRORS as exc:
        glue.show_error(exc)
        return
    data = upload.getvalue()
    sep = "\t" if delimiter == "tab" else delimiter
    try:
        preview = ds.parse_file(data, fmt=fmt, encoding=encoding, delimiter=sep, limit=20)
    except EXPECTED_ERRORS as exc:
        glue.show_error(exc)
        return
    st.markdown("**Column mapping**")
    mapping: dict[str, str] = {}
    cols = st.columns(min(4, max(1, len(preview.columns))))
    for i, column in enumerate(preview.columns):
        default = preview.mapping[column]
        kind, _, arg = default.partition(":")
        with cols[i % len(cols)]:
            role = st.selectbox(safe_md(column), list(ROLE_LABELS), index=list(ROLE_LABELS).index(kind),
                                format_func=ROLE_LABELS.get, key=f"datasets.map.{column}")
            if role in ("var", "json", "meta"):
                label = "variable name" if role != "meta" else "metadata key"
                target_name = st.text_input(label, value=arg or column, key=f"datasets.map.{column}.name",
                                            label_visibility="collapsed")
                mapping[column] = f"{role}:{target_name.strip() or column}"
            else:
                mapping[column] = role
    try:
        preview = ds.parse_file(data, fmt=fmt, mapping=mapping, encoding=encoding, delimiter=sep, limit=20)
    except EXPECTED_ERRORS as exc:
        glue.show_error(exc)
        return
    st.markdown(f"**Preview** (first {preview.rows} row(s))")
    if preview.items:
        st.dataframe(pd.DataFrame([{"line": line, "input": json.dumps(i.input, ensure_ascii=False),
                                    "expected": i.expected, "tags": ", ".join(i.tags),
                                    "metadata": json.dumps(i.metadata, ensure_ascii=False) if i.metadata else ""}
                                   for line, i in zip(preview.lines, preview.items)]),
                     hide_index=True, width="stretch")
    if preview.rejected:
        st.warning(f"{len(preview.rejected)} of the first {preview.rows} row(s) would be rejected.")
    strict = st.checkbox("Import nothing if any row is rejected", key="datasets.strict")
    if st.button("Import", key="datasets.import", type="primary"):
        bar = st.progress(0.0, text="Reading the file…")
        with glue.reported():
            report = ds.import_file(pool, target.strip(), data, fmt=fmt, mapping=mapping, encoding=encoding,
                                    delimiter=sep, strict=strict, created_by=glue.current_user(),
                                    progress=lambda f, m: bar.progress(min(1.0, f), text=m))
            st.session_state[KEY_REPORT] = report
            widgets.flash("success", safe_md(report.summary().capitalize() + "."))
            open_dataset(report.dataset)
    report_panel()


def report_panel() -> None:
    """The last import's rejected rows."""
    report = st.session_state.get(KEY_REPORT)
    if report is None or not report.rejected:
        return
    st.warning(md("Last import into {}: {} row(s) rejected.", report.dataset, len(report.rejected)))
    st.dataframe(pd.DataFrame([{"line": r.line, "reason": r.reason} for r in report.rejected]), hide_index=True,
                 width="stretch")


def export_tab(pool, name: str) -> None:
    """Both formats, optionally one tag."""
    tags = ds.dataset_tags(pool, name)
    tag = st.selectbox("Items", [ALL_TAGS, *tags], key="datasets.export_tag")
    tag = None if tag == ALL_TAGS else tag
    a, b = st.columns(2)
    for col, fmt, mime in ((a, "csv", "text/csv"), (b, "jsonl", "application/x-ndjson")):
        prepared = st.session_state.setdefault(KEY_EXPORT, {})
        if col.button(f"Prepare {fmt.upper()}", key=f"datasets.export.{fmt}"):
            with glue.reported():
                prepared[fmt] = (name, tag, ds.export_items(pool, name, fmt, tag=tag))
        if fmt in prepared and prepared[fmt][:2] == (name, tag):
            col.download_button(md("Download {}.{}", name, fmt), prepared[fmt][2], file_name=f"{name}.{fmt}", mime=mime,
                                key=f"datasets.download.{fmt}")
    st.caption("CSV: a column per variable (values as text), then expected, tags and metadata. JSONL keeps value "
               "types. Both import back unchanged.")


def settings_tab(pool, dataset: ds.Dataset, templates: list[str]) -> None:
    """Description, default template, name, deletion."""
    with st.form(f"datasets.settings.{dataset.name}"):
        new_name = st.text_input("Name", value=dataset.name)
        description = st.text_input("Description", value=dataset.description)
        options = ["(none)", *templates]
        if dataset.default_template and dataset.default_template not in options:
            options.append(dataset.default_template)
        default = st.selectbox("Default template", options,
                               index=options.index(dataset.default_template) if dataset.default_template else 0)
        if st.form_submit_button("Save settings"):
            with glue.reported():
                d = ds.update_dataset(pool, dataset.name, description=description, new_name=new_name.strip(),
                                      default_template=None if default == "(none)" else default)
                widgets.flash("success", "Settings saved.")
                open_dataset(d.name)
    st.markdown("**Delete**")
    with_runs = st.checkbox("Also delete the evaluation runs of this dataset", key="datasets.delete_runs")
    confirm = st.text_input("Type the dataset's name to confirm", key="datasets.delete_confirm")
    if st.button("Delete dataset", key="datasets.delete", disabled=confirm.strip() != dataset.name):
        with glue.reported():
            ds.delete_dataset(pool, dataset.name, with_runs=with_runs)
            widgets.flash("success", md("Deleted {}.", dataset.name))
            open_dataset(None)


st.title("Datasets")
st.caption("Inputs and expected outputs to evaluate prompts on. Items a run has used are never edited in place.")
pool = glue.pool()
widgets.carry_over()
template_names = tpl.template_names(pool)
all_datasets = ds.list_datasets(pool)
names = [d.name for d in all_datasets]
if st.session_state.get(KEY_OPEN) not in names:
    st.session_state[KEY_OPEN] = names[0] if names else None

left, right = st.columns([3, 1])
with right:
    with st.expander("New dataset", expanded=not names):
        new_dataset_form(pool, template_names)
with left:
    if names:
        st.selectbox("Dataset", names, key=KEY_OPEN,
                     format_func=lambda n: f"{n} ({next(d.item_count for d in all_datasets if d.name == n):,} items)")
if all_datasets:
    st.dataframe(pd.DataFrame([{"dataset": d.name, "items": d.item_count, "description": d.description,
                                "default template": d.default_template or "", "updated": d.updated_at}
                               for d in all_datasets]), hide_index=True, width="stretch",
                 height=min(250, 38 + 35 * len(all_datasets)))

current = st.session_state.get(KEY_OPEN)
if current is None:
    st.info("No datasets yet: create one, or import a CSV/JSONL file below (the dataset is created for you).")
    import_tab(pool, "my-dataset")
else:
    dataset = next(d for d in all_datasets if d.name == current)
    st.subheader(safe_md(dataset.name))
    if dataset.description:
        st.caption(safe_md(dataset.description))
    items, importer, exporter, config = st.tabs(["Items", "Import", "Export", "Settings"])
    with items, glue.reported():   # e.g. the dataset deleted from another session meanwhile
        items_tab(pool, dataset.name)
    with importer, glue.reported():
        import_tab(pool, dataset.name)
    with exporter, glue.reported():
        export_tab(pool, dataset.name)
    with config, glue.reported():
        settings_tab(pool, dataset, template_names)
