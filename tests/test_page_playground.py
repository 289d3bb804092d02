"""AppTest of the Playground: run a template or a free-form prompt, compare columns, draft a template."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core import executions, models, templates
from tests.conftest import APP_PATH

GREET = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to {{ name }}."}]
SCHEMA = {"type": "object", "required": ["n"], "properties": {
    "n": {"type": "integer"}, "tone": {"enum": ["warm", "dry"], "default": "dry"}, "loud": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}}}}


@pytest.fixture
def greet(pool):
    templates.create_template(pool, "greet", GREET, params={"max_tokens": 4, "temperature": 0.5})
    return templates.update_template(pool, "greet", [GREET[0], {"role": "user", "content": "Wave at {{ name }}."}],
                                     params={"max_tokens": 3, "temperature": 0.9})[0]


def open_playground(backend, tab: str = "Run") -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/playground.py")
    at.session_state["playground.tab"] = tab  # only the open tab runs
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def frame(at: AppTest, column: str):
    """The first dataframe on the page with this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_run_a_template_streams_and_shows_everything(app_env, pool, backend, greet):
    at = open_playground(backend)
    assert at.selectbox(key="playground.run.template").value == "greet"
    assert at.selectbox(key="playground.run.version").value == "latest (v2)"
    assert at.number_input(key="playground.run.p.max_tokens").value == 3  # defaults from the version
    assert at.number_input(key="playground.run.p.temperature").value == 0.9
    assert "Never ran yet" in captions(at)
    at.selectbox(key="playground.run.version").set_value("v1").run()
    assert at.number_input(key="playground.run.p.max_tokens").value == 4  # follow the chosen version
    at.button(key="playground.run.go").click().run()  # the variable left empty is named, nothing runs
    assert not at.exception and errors(at) == ["missing variable: name"] and executions.list_executions(pool) == []
    at.text_area(key="playground.run.var.name").input("Ada")
    at.text_area(key="playground.run.user_message").input("Be quick.")
    at.number_input(key="playground.run.p.seed").set_value(11)
    at.button(key="playground.run.go").click().run()
    assert not at.exception and not errors(at)
    row = executions.list_executions(pool)[0]
    assert (row.source, row.template_name, row.template_version, row.label) == ("playground", "greet", 1, None)
    assert row.seed == 11 and row.params["max_tokens"] == 4 and row.params["temperature"] == 0.5
    assert row.messages == [GREET[0], {"role": "user", "content": "Say hello to Ada."},
                            {"role": "user", "content": "Be quick."}]
    assert row.model_id == models.default_model(pool).id
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prompt tokens"] == str(row.prompt_tokens) and metrics["Completion tokens"] == str(
        row.completion_tokens)
    assert {"TTFT", "Tokens/s", "Total"} <= set(metrics) and metrics["Finish"] == row.finish_reason
    assert metrics["TTFT"] == f"{row.ttft_ms:,.0f} ms" and metrics["Total"] == f"{row.total_ms / 1000:,.2f} s"
    shown = [c.value for c in at.code]
    assert row.prompt.rstrip("\n") in shown  # the exact prompt is shown
    assert "Say hello to Ada." in shown and "Be quick." in shown  # and each rendered message
    assert row.output and any(row.output.strip() in m.value for m in at.markdown)  # the streamed output
    assert any(c.startswith(f"Execution #{row.id} · ok") for c in captions(at))
    assert any(c.startswith("Ran 1 time · last ") for c in captions(at))  # usage follows from the ledger


def test_typed_variables_and_clear_errors(app_env, pool, backend):
    templates.create_template(pool, "typed", "n={{ n }} tone={{ tone }} loud={{ loud }} tags={{ tags | join(',') }}",
                              params={"max_tokens": 2}, input_schema=SCHEMA)
    at = open_playground(backend)
    at.button(key="playground.run.go").click().run()  # n left empty
    assert not at.exception and errors(at) == ["missing variable: n"]
    assert executions.list_executions(pool) == []
    at.text_area(key="playground.run.var.tags.array").input("[not json").run()
    assert len(errors(at)) == 1 and errors(at)[0].startswith("tags: not valid JSON")
    assert at.button(key="playground.run.go").disabled and at.number_input(key="playground.run.p.max_tokens").value == 2
    at.text_area(key="playground.run.var.tags.array").input('["a", "b"]')
    at.number_input(key="playground.run.var.n.integer").set_value(3)
    at.selectbox(key="playground.run.var.tone.string").set_value("warm")
    at.checkbox(key="playground.run.var.loud.boolean").check().run()
    at.button(key="playground.run.go").click().run()
    assert not at.exception and not errors(at)
    row = executions.list_executions(pool)[0]
    assert row.variables == {"n": 3, "tone": "warm", "loud": True, "tags": ["a", "b"]}
    assert row.messages == [{"role": "user", "content": "n=3 tone=warm loud=True tags=a,b"}]


def test_free_form_prompt(app_env, pool, backend):
    at = open_playground(backend)
    assert at.radio(key="playground.run.mode").value == "Free-form prompt"  # no templates yet
    at.button(key="playground.run.go").click().run()
    assert errors(at) == ["write a prompt to run"] and executions.list_executions(pool) == []
    at.text_area(key="playground.run.system").input("Answer in French.")
    at.text_area(key="playground.run.prompt").input("Hello!")
    at.number_input(key="playground.run.p.max_tokens").set_value(3)
    at.text_area(key="playground.run.p.stop").input("\\n")
    at.button(key="playground.run.go").click().run()
    assert not at.exception and not errors(at)
    row = executions.list_executions(pool)[0]
    assert row.template_name is None and row.messages[0] == {"role": "system", "content": "Answer in French."}
    assert row.params["stop"] == ["\n"] and row.params["max_tokens"] == 3
    at.checkbox(key="playground.run.raw").check()
    at.button(key="playground.run.go").click().run()
    row = executions.list_executions(pool)[0]
    assert row.messages is None and row.prompt == "Answer in French.\n\nHello!"


def test_a_generation_error_is_one_clear_line_and_recorded(app_env, pool, backend):
    at = open_playground(backend)
    at.text_area(key="playground.run.prompt").input("word " * (backend.n_ctx + 10))
    at.button(key="playground.run.go").click().run()
    assert not at.exception
    row = executions.list_executions(pool)[0]
    assert row.status == "error" and "context holds" in row.error and row.output is None
    shown = f"Execution #{row.id} · error · {row.model_name} · seed {row.seed} — {row.error}"
    assert [e.value for e in at.tabs[0].error] == [shown]  # once in the Run tab (the Ledger page shows it too)


def test_compare_two_columns(app_env, pool, backend, greet):
    at = open_playground(backend, "Side by side")
    at.selectbox(key="playground.cmp.0.version").set_value("v1")
    at.selectbox(key="playground.cmp.1.version").set_value("v2").run()
    at.number_input(key="playground.cmp.1.p.temperature").set_value(0.0)
    at.text_area(key="playground.cmp.var.name").input("Grace")
    at.button(key="playground.cmp.go").click().run()
    assert not at.exception and not errors(at)
    first, second = executions.list_executions(pool)[::-1]
    assert (first.template_version, second.template_version) == (1, 2)
    assert first.params["temperature"] == 0.5 and second.params["temperature"] == 0.0
    assert first.variables == second.variables == {"name": "Grace"}
    assert "Say hello to Grace." in first.messages[-1]["content"] and "Wave at Grace." in second.messages[-1]["content"]
    table = frame(at, "execution")
    assert list(table["execution"]) == [first.id, second.id] and list(table["template"]) == ["greet@1", "greet@2"]
    # What the user sees: each column's output, its status line and its figures.
    assert [m.value for m in at.markdown if m.value.startswith("**greet@")] == [
        f"**greet@1** · {first.model_name}", f"**greet@2** · {second.model_name}"]
    for e in (first, second):
        assert e.status == "ok" and any(c.startswith(f"Execution #{e.id} · ok") for c in captions(at))
        assert e.output and any(e.output.strip() in m.value for m in at.markdown)
    completion = [m.value for m in at.metric if m.label == "Completion tokens"]
    assert str(first.completion_tokens) in completion and str(second.completion_tokens) in completion
    # Four columns: the other two follow the first template's defaults.
    at.radio(key="playground.cmp.n").set_value(4).run()
    assert not at.exception and at.selectbox(key="playground.cmp.3.template").value == "greet"


def test_a_failing_column_does_not_stop_the_others(app_env, pool, backend, greet, monkeypatch):
    monkeypatch.setenv("PROMPTDEV_OPENAI_MAX_RETRIES", "0")
    models.register_model(pool, "down", backend="openai", base_url="http://127.0.0.1:9/v1", remote_model="m")
    at = open_playground(backend, "Side by side")
    at.selectbox(key="playground.cmp.0.model").set_value("down")
    at.text_area(key="playground.cmp.var.name").input("Ada")
    at.button(key="playground.cmp.go").click().run()
    assert not at.exception
    failed, ok = executions.list_executions(pool)[::-1]
    assert (failed.status, failed.model_name, ok.status) == ("error", "down", "ok")
    assert [e for e in errors(at) if "did not answer" in e and f"#{failed.id}" in e]
    assert list(frame(at, "finish")["finish"]) == ["error", ok.finish_reason]


def test_generate_a_template_with_the_model_and_save_it(app_env, pool, backend):
    at = open_playground(backend, "Generate a template")
    at.button(key="playground.draft.go").click().run()
    assert errors(at) == ["describe what the prompt should do"]
    at.text_area(key="playground.draft.task").input("Summarise a support email")
    at.text_area(key="playground.draft.inputs").input("email: the customer's email\ntone")
    at.number_input(key="playground.draft.max_tokens").set_value(16)
    at.button(key="playground.draft.go").click().run()
    assert not at.exception and not errors(at)
    user = at.text_area(key="playground.draft.user").value
    assert "{{ email }}" in user and "{{ tone }}" in user
    assert at.text_input(key="playground.draft.name").value == "summarise-a-support-email"
    at.text_input(key="playground.draft.name").input("Bad Name")
    at.button(key="playground.draft.save").click().run()
    assert errors(at) and "Bad Name" in errors(at)[0]
    at.text_input(key="playground.draft.name").input("support-summary")
    at.text_area(key="playground.draft.user").input("Summarise: {{ email }} in a {{ tone }} tone")
    at.button(key="playground.draft.save").click().run()
    assert not at.exception and any("support-summary@1" in s.value for s in at.success)
    tv = templates.get_template_by_name(pool, "support-summary")
    assert tv.variables == ["email", "tone"]
    assert tv.messages[-1]["content"] == "Summarise: {{ email }} in a {{ tone }} tone"
    assert executions.list_executions(pool)[0].source == "playground"  # the draft itself is in the ledger
