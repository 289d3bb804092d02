"""AppTest of the Datasets page: create, grid edits saved in one go, import with preview and rejected rows, export."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import datasets
from tests.conftest import APP_PATH


def open_page():
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/datasets.py")
    at.run()
    assert not at.exception
    return at


def test_create_a_dataset(app_env, pool):
    at = open_page()
    assert any("No datasets yet" in i.value for i in at.info)
    at.text_input(key="datasets.new.name").set_value("support")
    at.text_input(key="datasets.new.description").set_value("customer questions")
    at.button[0].click()  # the form's submit button
    at.run()
    assert not at.exception
    assert any("Created dataset support" in s.value for s in at.success)
    assert at.selectbox(key="datasets.open").value == "support"
    assert datasets.get_dataset(pool, "support").description == "customer questions"
    # A bad name is one clear line.
    at.text_input(key="datasets.new.name").set_value("bad name!")
    at.button[0].click()
    at.run()
    assert not at.exception and any("dataset name must be" in e.value for e in at.error)


def test_grid_edits_are_saved_together(app_env, pool):
    datasets.add_items(pool, "qa", [{"input": {"q": "one"}, "expected": "1", "tags": ["num"]},
                                    {"input": {"q": "two"}, "expected": "2"},
                                    {"input": {"q": "three"}}], create=True)
    at = open_page()
    (editor,) = at.data_editor
    assert list(editor.value["q"]) == ["one", "two", "three"]
    at.session_state[editor.key] = {"edited_rows": {0: {"expected": "ONE"}}, "deleted_rows": [2],
                                    "added_rows": [{"q": "four", "expected": "4", "tags": "num, new"}]}
    at.button(key="datasets.save").click()
    at.run()
    assert not at.exception
    assert any("Saved: 1 added, 1 updated, 1 deleted." in s.value for s in at.success)
    items = datasets.list_items(pool, "qa")
    assert [(i.input["q"], i.expected, i.tags) for i in items] == [
        ("one", "ONE", ["num"]), ("two", "2", []), ("four", "4", ["num", "new"])]
    # Filter by tag.
    at.selectbox(key="datasets.tag").set_value("new")
    at.run()
    assert list(at.data_editor[0].value["q"]) == ["four"]
    # An invalid cell is one line, and nothing is saved.
    editor = at.data_editor[0]
    at.session_state[editor.key] = {"edited_rows": {0: {"metadata": "{oops"}}, "deleted_rows": [], "added_rows": []}
    at.button(key="datasets.save").click()
    at.run()
    assert not at.exception and any("row 1: metadata is not valid JSON" in e.value for e in at.error)
    assert datasets.list_items(pool, "qa", tag="new")[0].metadata == {}


def test_import_with_mapping_preview_and_rejected_rows(app_env, pool):
    datasets.create_dataset(pool, "target")
    at = open_page()
    csv = b"question,answer,note\nHi?,Hello,a\nragged\nBye?,Goodbye,b\n"
    at.file_uploader(key="datasets.upload").set_value(("qa.csv", csv, "text/csv"))
    at.run()
    assert not at.exception
    assert at.selectbox(key="datasets.map.answer").value == "expected"   # from the column name
    at.selectbox(key="datasets.map.note").set_value("ignore")
    at.run()
    assert any("1 of the first 3 row(s) would be rejected" in w.value for w in at.warning)
    at.button(key="datasets.import").click()
    at.run()
    assert not at.exception
    assert any("Imported 2 of 3 row(s) into 'target'; 1 rejected." in s.value for s in at.success)
    rejected = at.dataframe[-1].value
    assert list(rejected["line"]) == [3] and "has 1 field(s), the header has 3" in rejected["reason"][0]
    assert [(i.input, i.expected) for i in datasets.list_items(pool, "target")] == [
        ({"question": "Hi?"}, "Hello"), ({"question": "Bye?"}, "Goodbye")]


def test_unreadable_file_is_one_error_and_imports_nothing(app_env, pool):
    datasets.create_dataset(pool, "target")
    at = open_page()
    at.file_uploader(key="datasets.upload").set_value(("x.csv", "q\ncafé\n".encode("latin-1"), "text/csv"))
    at.run()
    assert not at.exception
    assert any("not valid utf-8 text: byte 0xe9 on line 2" in e.value for e in at.error)
    assert not [b for b in at.button if b.key == "datasets.import"]
    at.selectbox(key="datasets.encoding").set_value("latin-1")
    at.run()
    at.button(key="datasets.import").click()
    at.run()
    assert datasets.list_items(pool, "target")[0].input == {"q": "café"}


def test_export_both_formats(app_env, pool):
    datasets.add_items(pool, "out", [{"input": {"q": "x"}, "expected": "y"}], create=True)
    at = open_page()
    at.button(key="datasets.export.csv").click()
    at.run()
    assert not at.exception
    (download,) = [d for d in at.download_button if d.key == "datasets.download.csv"]
    assert download.label == "Download out.csv"
    at.button(key="datasets.export.jsonl").click()
    at.run()
    assert [d.key for d in at.download_button] == ["datasets.download.csv", "datasets.download.jsonl"]
