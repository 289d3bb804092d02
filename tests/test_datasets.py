"""Datasets: items and revisions, CSV/JSONL import (mapping, rejected rows, bad files) and export, grid edits."""

from __future__ import annotations

import json

import psycopg
import pytest

from core import datasets, executions
from core.datasets import make_item
from core.errors import InvalidInput
from core.executions import Origin


def test_create_list_update_and_delete_datasets(pool):
    ds = datasets.create_dataset(pool, "qa", description="questions", default_template="qa@production",
                                 created_by="ann")
    assert (ds.name, ds.description, ds.default_template, ds.created_by, ds.item_count) == (
        "qa", "questions", "qa@production", "ann", 0)
    with pytest.raises(ValueError, match="already exists"):
        datasets.create_dataset(pool, "qa")
    with pytest.raises(ValueError, match="dataset name"):
        datasets.create_dataset(pool, "bad name!")
    datasets.create_dataset(pool, "other")
    assert [d.name for d in datasets.list_datasets(pool, search="quest")] == ["qa"]
    ds = datasets.update_dataset(pool, "qa", description="Q&A", default_template=None, new_name="qa2")
    assert (ds.name, ds.description, ds.default_template) == ("qa2", "Q&A", None)
    with pytest.raises(LookupError, match="no dataset named 'qa'"):
        datasets.get_dataset(pool, "qa")
    datasets.delete_dataset(pool, "qa2")
    assert [d.name for d in datasets.list_datasets(pool)] == ["other"]


def test_items_validate_and_filter_by_tag(pool):
    datasets.create_dataset(pool, "d")
    ids = datasets.add_items(pool, "d", [
        {"input": {"city": "Paris", "n": 3}, "expected": "France", "tags": ["geo", "easy"]},
        make_item({"city": "Oslo"}, None, "geo; hard", {"source": "atlas"}),
        {"input": {"q": "2+2"}, "expected": 4},
    ])
    assert len(ids) == 3 and ids == sorted(ids)
    items = datasets.list_items(pool, "d")
    assert [i.input for i in items] == [{"city": "Paris", "n": 3}, {"city": "Oslo"}, {"q": "2+2"}]
    assert items[0].tags == ["geo", "easy"] and items[1].tags == ["geo", "hard"]
    assert items[1].metadata == {"source": "atlas"} and items[2].expected == "4"
    assert [i.id for i in datasets.list_items(pool, "d", tag="hard")] == [ids[1]]
    assert datasets.count_items(pool, "d", tag="geo") == 2
    assert datasets.dataset_tags(pool, "d") == ["easy", "geo", "hard"]
    assert datasets.dataset_variables(pool, "d") == ["city", "n", "q"]
    assert [i.id for i in datasets.list_items(pool, "d", search="oslo")] == [ids[1]]
    # Nothing is added when one item is bad.
    with pytest.raises(ValueError, match="item 2: input must be a JSON object"):
        datasets.add_items(pool, "d", [{"input": {"a": 1}}, {"input": ["not", "an", "object"]}])
    with pytest.raises(ValueError, match="tag may not contain"):
        make_item({}, tags=["a,b"])
    with pytest.raises(ValueError, match="item 1: evaluator 1: an evaluator needs a type"):
        datasets.add_items(pool, "d", [{"input": {}, "metadata": {"assert": [{"type": ""}]}}])
    assert datasets.count_items(pool, "d") == 3
    with pytest.raises(LookupError, match="no dataset named 'missing'"):
        datasets.add_items(pool, "missing", [{"input": {}}])
    datasets.add_items(pool, "created", [{"input": {}}], create=True)
    assert datasets.get_dataset(pool, "created").item_count == 1


def _mark_used(pool, item):
    """Make a run refer to the item's current revision (as evaluations.create_run does)."""
    from core import templates

    tv = templates.create_template(pool, f"t{item.id}", "Hello {{ city }}")
    with pool.connection() as conn, conn.transaction():
        run_id = conn.execute(
            "INSERT INTO eval_runs (dataset_id, model, model_key, definition) VALUES (%s, '{}', 'x', '{}') RETURNING id",
            (item.dataset_id,)).fetchone()[0]
        conn.execute("INSERT INTO eval_run_versions (run_id, position, ref, template_version_id, template_name, version)"
                     " VALUES (%s, 0, %s, %s, %s, 1)", (run_id, tv.name, tv.id, tv.name))
        conn.execute("INSERT INTO eval_work_items (run_id, position, seq, item_id, item_revision_id) "
                     "VALUES (%s, 0, 0, %s, %s)", (run_id, item.id, item.revision_id))


def test_edit_in_place_until_a_run_used_the_item_then_new_revision(pool):
    item = datasets.add_item(pool, "d", {"city": "Paris"}, "France", create=True)
    edited = datasets.update_item(pool, item.id, expected="FRANCE", edited_by="bob")
    assert (edited.revision, edited.revision_id, edited.expected) == (1, item.revision_id, "FRANCE")
    _mark_used(pool, edited)
    assert datasets.get_item(pool, item.id).used
    revised = datasets.update_item(pool, item.id, input={"city": "Lyon"}, tags=["fr"])
    assert revised.revision == 2 and revised.revision_id != item.revision_id and not revised.used
    assert (revised.input, revised.expected, revised.tags) == ({"city": "Lyon"}, "FRANCE", ["fr"])
    old = datasets.get_revision(pool, item.revision_id)
    assert (old.input, old.expected) == ({"city": "Paris"}, "FRANCE")  # what the run evaluated, unchanged
    assert [r.revision for r in datasets.item_history(pool, item.id)] == [2, 1]
    # An unchanged save makes no revision; the database itself refuses to change a used revision.
    assert datasets.update_item(pool, item.id, input={"city": "Lyon"}).revision == 2
    with pool.connection() as conn, pytest.raises(psycopg.errors.RaiseException, match="cannot change"):
        conn.execute("UPDATE dataset_item_revisions SET expected = 'x' WHERE id = %s", (item.revision_id,))
    # Deleting: a used item is archived (kept for its run), an unused one deleted.
    fresh = datasets.add_item(pool, "d", {"city": "Rome"})
    assert datasets.delete_items(pool, [item.id, fresh.id]) == 2
    assert datasets.list_items(pool, "d") == []
    assert datasets.get_revision(pool, item.revision_id).expected == "FRANCE"
    with pytest.raises(LookupError):
        datasets.get_item(pool, fresh.id)


def test_delete_dataset_with_runs_needs_consent(pool):
    item = datasets.add_item(pool, "d", {"city": "Paris"}, create=True)
    _mark_used(pool, item)
    with pytest.raises(ValueError, match="has 1 evaluation run"):
        datasets.delete_dataset(pool, "d")
    datasets.delete_dataset(pool, "d", with_runs=True)
    assert datasets.list_datasets(pool) == []


CSV = (
    "question,expected,tags,metadata,__expected\n"
    "What is 2+2?,4,\"math, easy\",\"{\"\"src\"\": \"\"book\"\"}\",contains: 4\n"
    "\"Multi\nline\",x,,,\n"
    "ragged,row\n"
    "Capital?,Paris,geo,{not json},\n"
    "\n"
    "Last,,,,not-icontains: no\n"
)


def test_csv_import_reports_every_rejected_row_with_its_line(pool):
    report = datasets.import_file(pool, "imp", CSV.encode(), fmt="csv")
    assert report.created and report.imported == 3 and report.rows == 5
    assert [(r.line, r.reason) for r in report.rejected] == [
        (5, "has 2 field(s), the header has 5"),
        (6, "column 'metadata': invalid JSON (Expecting property name enclosed in double quotes at character 2)"),
    ]
    items = datasets.list_items(pool, "imp")
    assert items[0].input == {"question": "What is 2+2?"} and items[0].expected == "4"
    assert items[0].tags == ["math", "easy"]
    assert items[0].metadata == {"src": "book", "assert": [{"type": "contains", "value": "4"}]}
    assert items[1].input == {"question": "Multi\nline"} and items[1].metadata == {}
    assert items[2].expected is None and items[2].metadata == {"assert": [{"type": "not-icontains", "value": "no"}]}


def test_column_mapping_and_preview(pool):
    data = "q,answer,n,src\nhi,yo,\"[1, 2]\",web\nbye,ciao,oops,app\n".encode()
    preview = datasets.parse_file(data, fmt="csv", limit=1)
    assert preview.columns == ["q", "answer", "n", "src"] and preview.rows == 1
    assert preview.mapping == {"q": "var", "answer": "expected", "n": "var", "src": "var"}
    mapping = {"q": "var:question", "answer": "ignore", "n": "json:numbers", "src": "meta:source"}
    parsed = datasets.parse_file(data, fmt="csv", mapping=mapping)
    assert parsed.items[0] == make_item({"question": "hi", "numbers": [1, 2]}, None, (), {"source": "web"})
    assert [(r.line, r.reason.split(" (")[0]) for r in parsed.rejected] == [(3, "column 'n': invalid JSON")]
    with pytest.raises(ValueError, match="does not have: 'nope'"):
        datasets.parse_file(data, fmt="csv", mapping={"nope": "var"})
    with pytest.raises(ValueError, match="both map to variable 'q'"):
        datasets.parse_file(data, fmt="csv", mapping={"src": "var:q"})
    with pytest.raises(ValueError, match="unknown role"):
        datasets.parse_file(data, fmt="csv", mapping={"src": "whatever"})
    report = datasets.import_file(pool, "m", data, fmt="csv", mapping=mapping)
    assert report.imported == 1 and len(report.rejected) == 1
    with pytest.raises(ValueError, match="1 row\\(s\\) rejected .* nothing was imported"):
        datasets.import_file(pool, "m", data, fmt="csv", mapping=mapping, strict=True)
    assert datasets.count_items(pool, "m") == 1


def test_unreadable_files_import_nothing(pool):
    bad = "q,expected\ncafé,ok\n".encode("latin-1")
    with pytest.raises(ValueError, match="not valid utf-8 text: byte 0xe9 on line 2"):
        datasets.import_file(pool, "enc", bad, fmt="csv")
    assert [d.name for d in datasets.list_datasets(pool)] == []
    report = datasets.import_file(pool, "enc", bad, fmt="csv", encoding="latin-1")
    assert datasets.list_items(pool, "enc")[0].input == {"q": "café"} and report.imported == 1
    with pytest.raises(ValueError, match="empty"):
        datasets.import_file(pool, "e2", b"", fmt="csv")
    with pytest.raises(ValueError, match="column 'a' appears twice"):
        datasets.import_file(pool, "e2", b"a,a\n1,2\n", fmt="csv")
    with pytest.raises(ValueError, match="no JSON lines"):
        datasets.import_file(pool, "e2", b"\n\n", fmt="jsonl")
    # A UTF-8 byte-order mark is not part of the first column's name.
    datasets.import_file(pool, "bom", "\ufeffq\nx\n".encode("utf-8"), fmt="csv")
    assert datasets.list_items(pool, "bom")[0].input == {"q": "x"}


def test_jsonl_import_with_invalid_lines(pool):
    lines = [
        json.dumps({"input": {"city": "Paris", "n": 1}, "expected": "France", "tags": ["geo"],
                    "metadata": {"k": [1]}}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"vars": {"city": "Oslo"}, "assert": [{"type": "icontains", "value": "norway"}]}),
        "",
        json.dumps({"city": "Rome", "expected_output": "Italy", "metadata": "oops"}),
        json.dumps({"input": "x"}),
    ]
    report = datasets.import_file(pool, "j", "\n".join(lines).encode(), fmt="jsonl")
    assert report.imported == 2
    assert [(r.line, r.reason) for r in report.rejected] == [
        (2, "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        (3, "not a JSON object (a list)"),
        (6, "column 'metadata': invalid JSON (Expecting value at character 1)"),
        (7, "'input' must be a JSON object of variables"),
    ]
    items = datasets.list_items(pool, "j")
    assert items[0].input == {"city": "Paris", "n": 1} and items[0].metadata == {"k": [1]}
    assert items[1].metadata == {"assert": [{"type": "icontains", "value": "norway"}]}


def test_export_round_trips_through_both_formats(pool):
    datasets.add_items(pool, "src", [
        {"input": {"a": "x, \"quoted\"\nnewline", "b": "2"}, "expected": "out", "tags": ["t1", "t2"],
         "metadata": {"m": 1, "assert": [{"type": "contains", "value": "o"}]}},
        {"input": {"a": "only a", "b": ""}, "expected": None},  # CSV: every variable is text
    ], create=True)
    original = [i.content for i in datasets.list_items(pool, "src")]
    for fmt in ("csv", "jsonl"):
        data = datasets.export_items(pool, "src", fmt)
        datasets.import_file(pool, f"copy-{fmt}", data, fmt=fmt)
        assert [i.content for i in datasets.list_items(pool, f"copy-{fmt}")] == original
    header = datasets.export_items(pool, "src", "csv").decode().splitlines()[0]
    assert header == "a,b,expected,tags,metadata"
    # JSONL keeps value types; CSV values are text.
    datasets.add_items(pool, "typed", [{"input": {"n": 3, "l": [1]}}], create=True)
    assert json.loads(datasets.export_items(pool, "typed", "jsonl"))["input"] == {"n": 3, "l": [1]}


def test_bulk_writes_keep_every_character(pool):
    nasty = 'back\\slash \\N tab\there\r\nnew "quoted" {brace} ünïcödé 🙂'
    item = make_item({"x": nasty, "n": None}, nasty, ['q"uote', "back\\slash", "{b}"], {"m": nasty})
    datasets.add_items(pool, "raw", [item], create=True)
    assert datasets.list_items(pool, "raw")[0].content == item
    line = json.dumps({"input": {"x": nasty}, "expected": nasty, "tags": ['q"uote'], "metadata": {"m": nasty}})
    datasets.import_file(pool, "raw2", line.encode(), fmt="jsonl")
    got = datasets.list_items(pool, "raw2")[0]
    assert (got.input, got.expected, got.tags, got.metadata) == ({"x": nasty}, nasty, ['q"uote'], {"m": nasty})


def test_add_item_from_execution(pool):
    eid = executions.record(pool, origin=Origin("playground", user_id="ann", variables={"city": "Paris"},
                                                template_name="capitals", template_version=2),
                            status="ok", output="France", model={"model_name": "m", "backend": "x",
                                                                  "model_sha256": None, "base_url": None})
    item = datasets.add_item_from_execution(pool, "saved", eid)
    assert (item.input, item.expected) == ({"city": "Paris"}, "France")
    assert item.metadata == {"execution_id": eid, "template": "capitals", "template_version": 2}
    ds = datasets.get_dataset(pool, "saved")
    assert ds.default_template == "capitals" and ds.item_count == 1 and ds.created_by == "ann"
    datasets.add_item_from_execution(pool, "saved", eid)
    assert datasets.count_items(pool, "saved") == 2
    with pytest.raises(LookupError, match="no dataset named 'absent'"):
        datasets.add_item_from_execution(pool, "absent", eid, create=False)
    failed = executions.record(pool, origin=Origin("playground"), status="error", error="boom")
    with pytest.raises(ValueError, match="has no output"):
        datasets.add_item_from_execution(pool, "saved", failed)


def test_grid_changes_become_one_transaction(pool):
    datasets.add_items(pool, "g", [{"input": {"q": "a", "n": 1}, "expected": "A"},
                                   {"input": {"q": "b"}, "tags": ["x"]},
                                   {"input": {"q": "c"}}], create=True)
    items = datasets.list_items(pool, "g")
    variables = datasets.dataset_variables(pool, "g")
    rows = datasets.grid_rows(items, variables)
    assert rows[0] == {"id": items[0].id, "q": "a", "n": "1", "expected": "A", "tags": "", "metadata": "",
                       "revision": 1}
    rows[0]["n"] = "2"          # a number stays a number
    rows[1]["tags"] = "x, y"
    del rows[2]                  # deleted
    rows.append({"id": None, "q": "d", "n": None, "expected": "D", "tags": None, "metadata": '{"k": 1}'})
    rows.append({"id": None, "q": None, "n": None, "expected": None, "tags": None, "metadata": None})  # empty
    added, updated, deleted = datasets.grid_changes(items, variables, rows)
    assert added == [make_item({"q": "d"}, "D", (), {"k": 1})]
    assert updated == {items[0].id: make_item({"q": "a", "n": 2}, "A"), items[1].id: make_item({"q": "b"}, None, "x,y")}
    assert deleted == [items[2].id]
    summary = datasets.apply_edits(pool, "g", added=added, updated=updated, deleted=deleted)
    assert (summary.added, summary.updated, summary.deleted) == (1, 2, 1)
    assert [i.input for i in datasets.list_items(pool, "g")] == [{"q": "a", "n": 2}, {"q": "b"}, {"q": "d"}]
    # A bad cell names its row and changes nothing.
    rows = datasets.grid_rows(datasets.list_items(pool, "g"), variables)
    rows[1]["metadata"] = "{bad"
    with pytest.raises(ValueError, match="row 2: metadata is not valid JSON"):
        datasets.grid_changes(datasets.list_items(pool, "g"), variables, rows)


def test_jsonl_lines_end_at_newlines_only(pool):
    # JSON allows U+2028, U+2029 and U+0085 unescaped inside strings: they must not split a line (and shift the
    # line numbers of every rejected row after them).
    data = '{"q": "a\u2028b\u0085c"}\r\n{"q": "d\u2029"}\nnot json\n\n{"q": 4}\n'.encode()
    parsed = datasets.parse_file(data, fmt="jsonl")
    assert [i.input for i in parsed.items] == [{"q": "a\u2028b\u0085c"}, {"q": "d\u2029"}, {"q": 4}]
    assert parsed.lines == [1, 2, 5]
    assert [(r.line, r.reason.split(":")[0]) for r in parsed.rejected] == [(3, "invalid JSON")]
    report = datasets.import_file(pool, "seps", data, fmt="jsonl")
    assert report.imported == 3 and [r.line for r in report.rejected] == [3]
    assert datasets.list_items(pool, "seps")[0].input == {"q": "a\u2028b\u0085c"}


def test_csv_long_cells_import_and_a_broken_row_does_not_drop_the_rest(pool, monkeypatch):
    import csv

    long_cell = "x" * 200_000   # over Python's default CSV field limit of 128 KiB
    data = f'q,expected\na,b\n"{long_cell}",c\nd,e\n'.encode()
    parsed = datasets.parse_file(data, fmt="csv")
    assert parsed.lines == [2, 3, 4] and not parsed.rejected and parsed.items[1].input == {"q": long_cell}
    # A row the CSV reader cannot read is rejected with its line, and the rows after it are still read.
    old = csv.field_size_limit()
    monkeypatch.setattr(datasets, "CSV_FIELD_LIMIT", 100)
    try:
        csv.field_size_limit(100)
        parsed = datasets.parse_file(f'q,expected\na,b\n"{"y" * 300}",c\nd,e\nf,g\n'.encode(), fmt="csv")
    finally:
        csv.field_size_limit(old)
    assert parsed.lines == [2, 4, 5]
    assert [(r.line, "field larger than field limit" in r.reason) for r in parsed.rejected] == [(3, True)]


# ---- NUL characters ------------------------------------------------------------------------------------------------

def nul_line(what: str, where: str = "") -> str:
    return f"{what} contains a NUL character (\\x00){' at ' + where if where else ''}, which cannot be stored"


def test_nul_characters_are_refused_in_items_wherever_they_hide(pool):
    """PostgreSQL stores no NUL in text or jsonb ("unsupported Unicode escape sequence" for a \\u0000 in jsonb):
    refused with one clear line, in values and keys, nested or not, before anything is written."""
    datasets.create_dataset(pool, "nul")
    for args, message in [
        (({"q": "a\x00b"},), nul_line("the input", '["q"]')),
        (({"q\x00": "ab"},), nul_line("the input", '["q\\u0000"] (a key)')),
        (({"q": {"deep": ["ok", {"k": "v\x00"}]}},), nul_line("the input", '["q"]["deep"][1]["k"]')),
        (({"q": {"de\x00ep": 1}},), nul_line("the input", '["q"]["de\\u0000ep"] (a key)')),
        (({"q": "ok"}, "exp\x00ected"), nul_line("the expected output")),
        (({"q": "ok"}, None, ["fine", "t\x00g"]), nul_line("tag 't\\x00g'")),
        (({"q": "ok"}, None, (), {"src": {"p\x00": 1}}), nul_line("the metadata", '["src"]["p\\u0000"] (a key)')),
    ]:
        with pytest.raises(datasets.DatasetError) as info:
            datasets.add_item(pool, "nul", *args)
        assert str(info.value) == message and isinstance(info.value, InvalidInput)
        assert "\x00" not in str(info.value)  # the line itself is printable
    with pytest.raises(datasets.DatasetError, match=r"item 2: the input contains a NUL character \(\\x00\) at"):
        datasets.add_items(pool, "nul", [{"input": {"q": "fine"}}, {"input": {"q": "bad\x00"}}])
    item = datasets.add_item(pool, "nul", {"q": "fine"})
    with pytest.raises(datasets.DatasetError, match=r"the input contains a NUL character"):
        datasets.update_item(pool, item.id, input={"q": "edited\x00"})
    assert [i.input for i in datasets.list_items(pool, "nul")] == [{"q": "fine"}]
    # a backslash followed by u0000 is six ordinary characters: kept
    kept = datasets.add_item(pool, "nul", {"q": "back\\u0000slash"}, "\\u0000")
    assert (kept.input, kept.expected) == ({"q": "back\\u0000slash"}, "\\u0000")


NUL_CSV = b"q,expected,tags\nfine,ok,a\nbad\x00q,ok,a\nq2,exp\x00,a\nq3,ok,t\x00g\n"
NUL_JSONL = "\n".join(json.dumps(record) for record in [
    {"q": "ok"}, {"q": "a\x00"}, {"input": {"k\x00": 1}}, {"q": {"deep": ["x", "y\x00"]}},
    {"q": "ok2", "metadata": {"m": "z\x00"}}]).encode()  # json.dumps writes each NUL as \u0000


def test_imports_reject_rows_with_nul_characters_by_line(pool):
    report = datasets.import_file(pool, "csv-nul", NUL_CSV, fmt="csv")
    assert report.imported == 1 and [(r.line, r.reason) for r in report.rejected] == [
        (3, nul_line("the input", '["q"]')), (4, nul_line("the expected output")), (5, nul_line("tag 't\\x00g'"))]
    assert [i.input for i in datasets.list_items(pool, "csv-nul")] == [{"q": "fine"}]
    header = datasets.parse_file(b"q\x00x,expected\nv,ok\n", fmt="csv")  # a NUL in a column name: every row
    assert [(r.line, r.reason) for r in header.rejected] == [(2, nul_line("the input", '["q\\u0000x"] (a key)'))]

    assert b"\\u0000" in NUL_JSONL and b"\x00" not in NUL_JSONL
    report = datasets.import_file(pool, "jsonl-nul", NUL_JSONL, fmt="jsonl")
    assert report.imported == 1 and [(r.line, r.reason) for r in report.rejected] == [
        (2, nul_line("the input", '["q"]')), (3, nul_line("the input", '["k\\u0000"] (a key)')),
        (4, nul_line("the input", '["q"]["deep"][1]')), (5, nul_line("the metadata", '["m"]'))]
    with pytest.raises(datasets.DatasetError, match=r"4 row\(s\) rejected \(first: line 2: the input contains a NUL"):
        datasets.import_file(pool, "strict-nul", NUL_JSONL, fmt="jsonl", strict=True)
    assert [d.name for d in datasets.list_datasets(pool)] == ["jsonl-nul", "csv-nul"]


def test_cli_import_of_files_with_nul_characters(app_env, pool, tmp_path, capsys):
    from core import cli

    def promptdev(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    (tmp_path / "nul.csv").write_bytes(NUL_CSV)
    (tmp_path / "nul.jsonl").write_bytes(NUL_JSONL)
    in_q = nul_line("the input", '["q"]')
    code, out, err = promptdev("datasets", "import", "c", tmp_path / "nul.csv")
    assert code == 0 and err == ""
    assert out.splitlines() == [f"line 3: {in_q}", f"line 4: {nul_line('the expected output')}",
                                "line 5: tag 't\\x00g' contains a NUL character (\\x00), which cannot be stored",
                                "imported 1 of 4 row(s) into 'c'; 3 rejected"]
    code, out, err = promptdev("datasets", "import", "j", tmp_path / "nul.jsonl", "--strict")
    assert code == 1 and out == ""
    assert err == f"promptdev: 4 row(s) rejected (first: line 2: {in_q}); nothing was imported\n"
    assert "j" not in [d.name for d in datasets.list_datasets(pool)]
