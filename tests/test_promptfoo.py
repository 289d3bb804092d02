"""promptfoo configs: prompts (inline, files split by ---, chat JSON), tests (inline, CSV with __expected), defaultTest,
assert lists with negation/threshold/weight, providers mapped, unsupported assertion types named and failed."""

from __future__ import annotations

import json
import textwrap

import pytest

from core import datasets, evaluations, promptfoo, templates


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path):
    write(tmp_path / "prompts" / "pair.txt", """
        Translate to {{ language }}: {{ text }}
        ---
        You are a translator. Give the {{ language }} for: {{ text }}
        """)
    (tmp_path / "prompts" / "chat.json").write_text(json.dumps([
        {"role": "system", "content": "Translate into {{ language }}."},
        {"role": "user", "content": "{{ text }}"}]), encoding="utf-8")
    write(tmp_path / "tests.csv", """
        language,text,__expected1,__expected2,__description,__prefix
        French,Hello,icontains: bonjour,not-contains: Hello,greeting,x
        German,Thank you,javascript: output.length > 2,,thanks,
        """)
    return write(tmp_path / "promptfooconfig.yaml", """
        description: Translation smoke test
        prompts:
          - file://prompts/pair.txt
          - file://prompts/chat.json
          - "Say {{ text }} in {{ language }}."
        providers:
          - openai:gpt-4o-mini
          - id: anthropic:messages:claude-3-5-haiku
            label: haiku
        defaultTest:
          vars:
            language: Spanish
          assert:
            - type: latency
              threshold: 600000
            - type: similar
              value: hola
              threshold: 0.8
            - type: levenshtein
              value: "{{ text }}"
              threshold: 1000
              weight: 2
              metric: closeness
        tests:
          - file://tests.csv
          - vars:
              text: [Good night, Good morning]
            assert:
              - type: not-icontains
                value: sorry
              - type: llm-rubric
                value: is a translation
                provider: openai:gpt-4
        outputPath: results.json
        """)


def test_load_reads_prompts_tests_and_defaults(config):
    suite = promptfoo.load(config)
    assert suite.name == "translation-smoke-test" and suite.description == "Translation smoke test"
    assert [p.label for p in suite.prompts] == ["pair-1", "pair-2", "chat", "prompt-3"]
    assert suite.prompts[0].content == "Translate to {{ language }}: {{ text }}"
    assert suite.prompts[2].content[0] == {"role": "system", "content": "Translate into {{ language }}."}
    assert suite.providers == ["openai:gpt-4o-mini", "haiku (anthropic:messages:claude-3-5-haiku)"]
    # CSV tests (with defaultTest vars beneath), then the inline test expanded per list value.
    assert [t.vars for t in suite.tests] == [
        {"language": "French", "text": "Hello"}, {"language": "German", "text": "Thank you"},
        {"language": "Spanish", "text": "Good night"}, {"language": "Spanish", "text": "Good morning"}]
    assert suite.tests[0].asserts == ["icontains: bonjour", "not-contains: Hello"]
    assert suite.tests[0].description == "greeting"
    assert len(suite.default_asserts) == 3
    assert any("__prefix" in n for n in suite.notes) and any("outputPath" in n for n in suite.notes)


def test_import_creates_templates_dataset_and_evaluators(pool, settings, config):
    imported = promptfoo.import_suite(pool, settings, promptfoo.load(config), created_by="ci")
    assert imported.template_refs == ["translation-smoke-test-pair-1@1", "translation-smoke-test-pair-2@1",
                                      "translation-smoke-test-chat@1", "translation-smoke-test-prompt-3@1"]
    chat = templates.get_template_by_name(pool, "translation-smoke-test-chat")
    assert chat.kind == "chat" and chat.variables == ["language", "text"]
    items = datasets.list_items(pool, "translation-smoke-test")
    assert [i.input["text"] for i in items] == ["Hello", "Thank you", "Good night", "Good morning"]
    assert items[0].metadata == {"assert": [{"type": "icontains", "value": "bonjour"},
                                            {"type": "not-contains", "value": "Hello"}], "description": "greeting"}
    assert items[1].metadata["assert"][0]["type"] == "javascript"
    assert items[2].metadata["assert"][1] == {"type": "llm-rubric", "value": "is a translation"}  # provider mapped
    assert [e["type"] for e in imported.evaluators] == ["latency", "similar", "levenshtein"]
    assert imported.evaluators[2] == {"type": "levenshtein", "value": "{{ text }}", "threshold": 1000.0,
                                      "weight": 2.0, "name": "closeness"}
    assert imported.unsupported == {"similar": 1, "javascript": 1}
    lines = imported.report_lines()
    assert f"provider openai:gpt-4o-mini → {imported.model} (configured model)" in lines
    assert "unsupported assertion type 'javascript' (1×): counted as not passed" in lines
    assert any("llm-rubric provider 'openai:gpt-4'" in line for line in lines)
    # Importing again changes nothing: same versions, same items (ids kept for pairing across runs).
    again = promptfoo.import_suite(pool, settings, promptfoo.load(config))
    assert again.template_refs == imported.template_refs
    assert [i.id for i in datasets.list_items(pool, "translation-smoke-test")] == [i.id for i in items]


def test_a_promptfoo_suite_runs_and_unsupported_checks_fail(pool, settings, tmp_path):
    config = write(tmp_path / "cfg.yaml", """
        prompts: ["Repeat: {{ word }}"]
        providers:
          - id: openai:gpt-4o
            config: {temperature: 0, max_tokens: 4}
        defaultTest:
          assert:
            - type: completion-tokens
              threshold: 1000
        tests:
          - vars: {word: one}
          - vars: {word: two}
            assert:
              - type: python
                value: "len(output) > 0"
          - vars: {word: three}
            threshold: 0.7
            assert:
              - type: contains
                value: "zz-never-zz"
              - type: completion-tokens
                threshold: 1000
                weight: 2
          - vars: {word: four}
            threshold: 0.9
            assert:
              - type: contains
                value: "zz-never-zz"
              - type: completion-tokens
                threshold: 1000
                weight: 2
        """)
    run, imported = promptfoo.start(pool, settings, config, created_by="ci")
    assert run.source == "promptfoo" and imported.dataset == "cfg" and run.total == 4
    assert run.params == {"temperature": 0, "max_tokens": 4}   # from the provider's config
    assert "parameters from the provider config: max_tokens=4, temperature=0" in imported.report_lines()
    evaluations.work_on(pool, settings, run.id)
    results = {r.input["word"]: r for r in evaluations.list_results(pool, run.id)}
    assert results["one"].passed
    assert not results["two"].passed
    assert results["two"].checks[1]["reason"] == "assertion type 'python' is not supported by PromptDev"
    # A test's threshold: it passes when its weighted score (here (1 + 0 + 2) / 4 = 0.75) reaches it, as in promptfoo.
    assert [c["passed"] for c in results["three"].checks] == [True, False, True]
    assert results["three"].score == pytest.approx(0.75) and results["three"].passed
    assert results["four"].score == pytest.approx(0.75) and not results["four"].passed
    (summary,) = evaluations.summarize_run(pool, run.id)
    assert summary.pass_rate == 0.5


@pytest.mark.parametrize("body,files,message", [
    ("prompts: [", {}, "not valid YAML"),
    ("- a list", {}, "YAML mapping"),
    ("providers: [x]", {}, "has no prompts"),
    ("prompts: [file://missing.txt]", {}, "'file://missing.txt': no such file"),
    ("prompts: [file://p.py]", {"p.py": "def f(): pass"}, "prompt functions"),
    ("prompts: ['{{ x }}']\ntests: file://t.txt", {"t.txt": "x"}, "must come from a .csv"),
    ("prompts: ['{{ x }}']\ntests: file://t.csv", {"t.csv": "x\n1,2\n"}, "more fields than the header"),
    ("prompts: ['{{ x }}']\nscenarios: [{}]", {}, "scenarios are not supported"),
    ("prompts: [file://c.json]", {"c.json": '[{"role": "user"}]'}, "needs a role and content"),
    ("prompts: [x]\nproviders: [{id: a, config: {temperature: 99}}]", {}, "provider config: temperature"),
])
def test_bad_configs_fail_with_one_line(tmp_path, body, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    path = write(tmp_path / "promptfooconfig.yaml", body)
    with pytest.raises(promptfoo.PromptfooError, match=message) as raised:
        promptfoo.load(path)
    assert "\n" not in str(raised.value)
    with pytest.raises(promptfoo.PromptfooError, match=message):   # the same config uploaded with its files
        promptfoo.load_config(body, {name: text.encode() for name, text in files.items()})


def test_test_thresholds_from_yaml_csv_and_default_test(tmp_path):
    write(tmp_path / "t.csv", """
        x,__expected,__threshold
        1,contains: a,0.5
        2,contains: b,
        """)
    path = write(tmp_path / "promptfooconfig.yaml", """
        prompts: ["{{ x }}"]
        defaultTest:
          threshold: 0.25
        tests:
          - file://t.csv
          - vars: {x: 3}
            threshold: 0.8
        """)
    suite = promptfoo.load(path)
    assert [t.threshold for t in suite.tests] == [0.5, 0.25, 0.8]
    assert not any("threshold" in n for n in suite.notes)   # understood, not "ignored"
    bad = write(tmp_path / "bad.yaml", "prompts: [x]\ntests:\n  - vars: {x: 1}\n    threshold: 2\n")
    with pytest.raises(promptfoo.PromptfooError, match=r"tests\[1\]: threshold must be between 0 and 1"):
        promptfoo.load(bad)


def test_uploaded_files_without_folders_are_found_beside_the_config(tmp_path):
    (tmp_path / "pair.txt").write_text("A {{ x }}\n---\nB {{ x }}\n", encoding="utf-8")
    path = write(tmp_path / "promptfooconfig.yaml", "prompts: [file://prompts/pair.txt]\n")
    assert [p.content for p in promptfoo.load(path).prompts] == ["A {{ x }}", "B {{ x }}"]
    suite = promptfoo.load_config(b"prompts: [file://prompts/pair.txt]\n", {"pair.txt": b"A {{ x }}\n---\nB {{ x }}\n"})
    assert [p.content for p in suite.prompts] == ["A {{ x }}", "B {{ x }}"]


def test_an_uploaded_config_reads_like_the_same_config_on_disk(config):
    folder = config.parent
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
             and p != config}
    uploaded = promptfoo.load_config(config.read_bytes(), files, config_name="promptfooconfig.yaml")
    on_disk = promptfoo.load_config_path(config)
    assert [(p.label, p.content) for p in uploaded.prompts] == [(p.label, p.content) for p in on_disk.prompts]
    assert uploaded.tests == on_disk.tests and uploaded.name == on_disk.name == "translation-smoke-test"
    # uploads lose their folders: the same files without them are found by name
    flat = {name.rsplit("/", 1)[-1]: data for name, data in files.items()}
    assert promptfoo.load_config(config.read_bytes(), flat).tests == on_disk.tests
