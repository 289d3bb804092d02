"""AppTest of the Evaluations page: start a run (the app's background worker runs it), follow it, read results,
compare versions with significance tests, cancel and resume, import a promptfoo config, one-line errors."""

from __future__ import annotations

import json
import re
import time

from streamlit.testing.v1 import AppTest

from core import datasets, evaluations, templates
from tests.conftest import APP_PATH


def open_page(view: str | None = None):
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/evaluations.py")
    at.run()
    assert not at.exception
    if view:
        at.radio(key="evaluations.view").set_value(view)
        at.run()
        assert not at.exception
    return at


def setup(pool, n=3, max_tokens=3):
    templates.create_template(pool, "qa", [{"role": "system", "content": "Answer with one word."},
                                           {"role": "user", "content": "{{ q }}"}],
                              params={"max_tokens": max_tokens, "temperature": 0})
    templates.update_template(pool, "qa", [{"role": "user", "content": "One word: {{ q }}"}])
    words = ["Sky colour?", "Grass colour?", "Snow colour?", "Sun colour?"]
    datasets.add_items(pool, "colours", [{"input": {"q": words[i % 4]}, "expected": "blue"} for i in range(n)],
                       create=True)


def wait_done(pool, run_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if evaluations.progress(pool, run_id).finished:
            return
        time.sleep(0.2)
    raise AssertionError("the background worker did not finish the run")


def texts(elements):
    """The elements' text, Markdown escapes (`\\:`, `\\-`, …) and word joiners (that stop autolinks) removed."""
    return re.sub(r"\\(.)", r"\1", " ".join(e.value for e in elements)).replace("\u2060", "")


def test_start_a_run_follow_it_and_compare(app_env, pool):
    setup(pool)
    at = open_page()
    assert "No evaluation runs yet" in texts(at.info)
    at.radio(key="evaluations.view").set_value("New run")
    at.run()
    at.multiselect(key="evaluations.new.templates").set_value(["qa@1", "qa@2"])
    at.text_area(key="evaluations.new.yaml").set_value("- type: completion-tokens\n  threshold: 1000\n"
                                                       "- type: icontains\n")
    at.run()
    at.button(key="evaluations.new.start").click()
    at.run()
    assert not at.exception
    assert "Run #1 queued: 6 item(s)" in texts(at.success)
    assert at.radio(key="evaluations.view").value == "Runs"
    run = evaluations.get_run(pool, 1)
    assert [v.title for v in run.versions] == ["qa@1", "qa@2"] and run.source == "ui"
    wait_done(pool, 1)   # leaving the page does not matter: the app's worker runs it
    at.run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Status"] == "done"
    assert "Results per version" in [s.value for s in at.subheader]
    summary = at.dataframe[0].value
    assert list(summary["version"]) == ["qa@1", "qa@2"] and list(summary["items"]) == [3, 3]
    frames = [d.value for d in at.dataframe]
    results = next(f for f in frames if "diff" in f.columns)
    assert len(results) == 6 and set(results["version"]) == {"qa@1", "qa@2"}
    assert any({"name", "passed", "reason"} <= set(f.columns) for f in frames)   # one result's checks
    # Charts with one row per version are sized per row: a fixed pixel height drew every version on one line.
    specs = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        title = spec.get("title")
        specs[title.get("text") if isinstance(title, dict) else title] = spec
    assert specs["Pass rate (95% Wilson interval)"]["height"] == {"step": 32}
    assert specs["Latency"]["height"] == {"step": 32}
    at.checkbox(key="evaluations.results.failed").check()
    at.run()
    assert not at.exception

    at.radio(key="evaluations.view").set_value("Compare")
    at.run()
    assert not at.exception
    assert "Is the difference real?" in [s.value for s in at.subheader]
    assert "Pass/fail:" in texts(at.success) + texts(at.info)
    labels = [m.label for m in at.metric]
    assert "McNemar exact p" in labels and "Bootstrap p" in labels
    titles = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        titles[spec["title"]["text"] if isinstance(spec.get("title"), dict) else spec.get("title")] = spec["height"]
    assert titles["Pass rate (95% Wilson interval)"] == titles["Mean score (95% bootstrap interval)"] == {"step": 32}
    at.checkbox(key="evaluations.compare.disagree").check()
    at.run()
    assert not at.exception and any("of 3 item(s)" in c.value for c in at.caption)


def test_cancel_resume_and_delete(app_env, pool, settings):
    setup(pool, n=40, max_tokens=12)
    at = open_page()
    run = evaluations.create_run(pool, settings, dataset="colours", templates=["qa@1"], evaluators=["is-json"])
    at.run()
    assert not at.exception
    at.button(key="evaluations.cancel").click()
    at.run()
    assert not at.exception and "Run #1 cancelled" in texts(at.info)
    assert evaluations.get_run(pool, run.id).status == "cancelled"
    at.button(key="evaluations.resume").click()
    at.run()
    assert "queued again" in texts(at.success)
    assert evaluations.get_run(pool, run.id).status in ("running", "done")
    evaluations.cancel_run(pool, run.id)
    at.run()
    at.button(key="evaluations.delete").click()
    at.run()
    assert not at.exception and "Run #1 deleted." in texts(at.info)
    assert evaluations.list_runs(pool) == []


def test_a_bad_run_definition_is_one_line(app_env, pool):
    setup(pool)
    at = open_page("New run")
    at.multiselect(key="evaluations.new.templates").set_value(["qa@latest"])
    at.text_area(key="evaluations.new.yaml").set_value("- type: regex\n  value: '('\n")
    at.run()
    at.button(key="evaluations.new.start").click()
    at.run()
    assert not at.exception
    assert any("evaluator 1: regex: invalid regular expression" in e.value for e in at.error)
    at.text_area(key="evaluations.new.yaml").set_value("type: [unclosed")
    at.button(key="evaluations.new.start").click()
    at.run()
    assert not at.exception and len(at.error) == 1
    assert evaluations.list_runs(pool) == []


def test_import_a_promptfoo_config(app_env, pool):
    at = open_page("Import promptfoo")
    config = (b"description: Colours\nprompts: [file://prompts.txt]\n"
              b"providers:\n  - id: openai:gpt-4o-mini\n    config: {max_tokens: 2}\n"
              b"defaultTest:\n  assert:\n    - type: javascript\n      value: 'true'\n"
              b"tests:\n  - vars: {thing: sky}\n")
    at.file_uploader(key="evaluations.promptfoo.files").set_value([
        ("promptfooconfig.yaml", config, "application/yaml"),
        ("prompts.txt", b"Colour of the {{ thing }}?\n---\nWhat colour is the {{ thing }}?\n", "text/plain")])
    at.run()
    at.button(key="evaluations.promptfoo.start").click()
    at.run()
    assert not at.exception
    assert "Run #1 queued: 2 item(s)" in texts(at.success)
    assert "provider openai:gpt-4o-mini →" in texts(at.info)
    assert "unsupported assertion type 'javascript' (1×): counted as not passed" in texts(at.warning)
    assert [v.ref for v in evaluations.get_run(pool, 1).versions] == ["colours-prompts-1@1", "colours-prompts-2@1"]


def table_counts(pool) -> dict[str, int]:
    with pool.connection() as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in sorted(tables)}


def test_a_promptfoo_upload_reads_only_the_uploaded_files_and_refuses_bombs(app_env, pool):
    at = open_page("Import promptfoo")
    assert not [t for t in at.text_input if t.key == "evaluations.promptfoo.path"]   # no path on this machine
    before = table_counts(pool)
    prompts = ("prompts.txt", b"Colour of the {{ x }}?", "text/plain")
    ten = ", ".join("abcdefghij")
    for files, message in [
        ([("promptfooconfig.yaml", b"prompts: [file:///etc/passwd]\n", "application/yaml")],
         "file reference 'file:///etc/passwd' is refused: absolute paths are not allowed"),
        ([("promptfooconfig.yaml", b"prompts: [file://prompts.txt]\ntests:\n  - vars: {x: file://../../../etc/hostname}\n",
           "application/yaml"), prompts],
         "file reference 'file://../../../etc/hostname' is refused: '..' would leave the config's folder"),
        ([("promptfooconfig.yaml", b"prompts: [file://prompts.txt]\ndefaultTest:\n  vars: {x: 'file://~/.ssh/id_rsa'}\n",
           "application/yaml"), prompts],
         "file reference 'file://~/.ssh/id_rsa' is refused"),
        ([("promptfooconfig.yaml", b"a: &a [x, x]\nb: [*a, *a]\nprompts: [file://prompts.txt]\n", "application/yaml"),
          prompts], "YAML anchors (&a) are not accepted"),
        ([("promptfooconfig.yaml", ("prompts: [file://prompts.txt]\ntests:\n  - vars: {"
                                    + ", ".join(f"v{i}: [{ten}]" for i in range(7)) + "}\n").encode(),
           "application/yaml"), prompts], "the tests expand into more than 10,000"),
        ([("promptfooconfig.yaml", b"prompts: [file://prompts.txt]\ntests: file://big.csv\n", "application/yaml"),
          prompts, ("big.csv", b"x\n" * (8 * 1024 * 1024 + 1), "text/csv")],
         "'big.csv' is 16,777,218 bytes, more than the 16 MiB allowed"),
    ]:
        at.file_uploader(key="evaluations.promptfoo.files").set_value(files)
        at.run()
        at.button(key="evaluations.promptfoo.start").click()
        at.run()
        assert not at.exception
        assert len(at.error) == 1 and message in texts(at.error), (message, texts(at.error))
    assert table_counts(pool) == before
