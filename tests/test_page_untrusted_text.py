"""Untrusted text on every page is shown as text: a link, image, autolink, HTML, reference-style link or bare URL in
a user id, a message, model output, a ledger row, a template, a dataset, an evaluation run, a guardrail rule or an
audit entry never becomes a live link or image (an exfiltration channel for prompt-injected output).

Each test fills the database with the payloads of tests/markdown_check.py, opens the page with AppTest, and checks
every Markdown string the page shows (bodies, labels, help texts) with a CommonMark parser plus GitHub's autolink
literals; and that the payloads were shown at all.
"""

from __future__ import annotations

import time

from streamlit.testing.v1 import AppTest

from core import conversations, datasets, evaluations, executions, guardrails, templates
from core.executions import Origin
from tests.conftest import APP_PATH
from tests.markdown_check import PAYLOADS, assert_no_live_constructs, markdown_bodies, rendered_text

TINY = {"max_tokens": 2, "temperature": 0.0, "seed": 1}
EVERYTHING = "\n".join(PAYLOADS.values())  # every class of attack, in one multi-line text
ONE_LINE = " ".join(v for v in PAYLOADS.values() if "\n" not in v)  # for fields that hold one line
USER_ID = ("[u](http://evil.example/EVIL) ![i](http://evil.example/EVIL.png) <http://evil.example/EVIL> "
           "www.evil.example https://evil.example EVIL@evil.example")  # a user id: at most 200 characters
SLUG = "www.evil.example"  # a valid template / dataset / label / rule name that GitHub would autolink
TAG = "![t](http://evil.example/EVIL.png)"  # a tag: at most 100 characters


def open_page(page: str, *, state: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=180)
    at.session_state["promptdev.user"] = USER_ID
    at.run()
    at.switch_page(page)
    for key, value in (state or {}).items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def assert_inert(at: AppTest, at_least: int = 1) -> None:
    shown = assert_no_live_constructs(at)
    assert shown >= at_least, [b for b in markdown_bodies(at)]


def shows(at: AppTest, text: str) -> bool:
    """Whether some Markdown on the page reads `text` (rendered: escapes resolved, word joiners dropped)."""
    return any(text in rendered_text(b) for b in markdown_bodies(at))


def add_message(pool, user_id: str, role: str, content: str, **kw) -> None:
    """A stored conversation message with exactly this content (as the model or the user left it)."""
    with pool.connection() as conn, conn.transaction():
        conv = conversations._lock(conn, user_id, create=True)
        conversations._append(conn, conv.id, role=role, kind=kw.pop("kind", "message" if role == "user" else "reply"),
                              content=content, **kw)


def test_streamed_model_output_is_escaped_even_across_chunks():
    def app():
        from pages.widgets import write_stream_text

        chunks = ["see [x](http:", "//evil.example/EVIL) ![i](https", "://evil.example/EVIL.png) www", ".evil.",
                  "example <http://evil.example/EVIL>\n\n[r][1]\n\n[1]: http://evil.example/EVIL"]
        write_stream_text(iter(chunks))

    at = AppTest.from_function(app)
    at.run()
    assert not at.exception
    assert_inert(at)
    assert "www.evil.example" in rendered_text(at.markdown[0].value)


def test_chat_history_and_user_id(app_env, pool):
    add_message(pool, USER_ID, "user", EVERYTHING)
    add_message(pool, USER_ID, "assistant", EVERYTHING)
    add_message(pool, USER_ID, "assistant", EVERYTHING, kind="error", status="error")
    at = AppTest.from_file(APP_PATH, default_timeout=180)
    at.run()
    at.switch_page("pages/chat.py")
    at.run()
    at.text_input(key="chat.user_id").input(USER_ID).run()
    assert not at.exception, at.exception
    assert len(at.chat_message) == 3
    assert_inert(at, at_least=3)
    assert rendered_text(at.chat_message[1].markdown[0].value) == EVERYTHING.replace("\n\n", "\n")

    fresh = AppTest.from_file(APP_PATH, default_timeout=180)  # a new user: the greeting names them
    fresh.run()
    fresh.switch_page("pages/chat.py")
    fresh.run()
    fresh.text_input(key="chat.user_id").input(USER_ID + " new").run()
    assert_inert(fresh)


def test_monitor_conversation_audit_and_guardrails(app_env, pool, backend, settings):
    guardrails.create_rule(pool, SLUG, "words", words=["EVIL"], direction="both", action="flag")
    conversations.send_message(pool, backend, settings, USER_ID, ONE_LINE, params=TINY)
    add_message(pool, USER_ID, "assistant", EVERYTHING)
    conversations.inject_message(pool, USER_ID, EVERYTHING, USER_ID)
    conversations.halt_conversation(pool, USER_ID, EVERYTHING, USER_ID)
    at = open_page("pages/monitor.py", state={"monitor.tab": "Conversations", "monitor.live": False})
    assert_inert(at, at_least=3)  # the subheader, the halt notice, the operator, the guardrail excerpt
    for tab in ("Flagged", "Guardrails"):
        at = open_page("pages/monitor.py", state={"monitor.tab": tab, "monitor.live": False})
        assert_no_live_constructs(at)
    # An operator action's message names the rule.
    at = open_page("pages/monitor.py", state={"monitor.tab": "Guardrails", "monitor.live": False})
    at.button(key="monitor.rule_toggle").click().run()
    assert not at.exception
    assert_no_live_constructs(at)
    assert shows(at, f"Rule '{SLUG}' disabled.")


def test_ledger_row_output_error_and_user(app_env, pool):
    executions.record(pool, origin=Origin("api", user_id=USER_ID), status="ok", output=EVERYTHING,
                      model={"model_name": SLUG, "backend": "none", "model_sha256": None, "base_url": None})
    executions.record(pool, origin=Origin("api", user_id=USER_ID), status="error", error=EVERYTHING)
    at = open_page("pages/ledger.py")
    assert_inert(at)  # the error's status line
    at.selectbox(key="ledger.open").set_value(at.selectbox(key="ledger.open").options[-1]).run()
    assert not at.exception
    assert_inert(at)  # the user and the model name in the facts


def test_playground_run_result(app_env, pool):
    eid = executions.record(pool, origin=Origin("playground", user_id=USER_ID), status="ok", output=EVERYTHING,
                            model={"model_name": SLUG, "backend": "none", "model_sha256": None, "base_url": None})
    at = open_page("pages/playground.py", state={"playground.run.result": eid, "playground.run.mode":
                                                 "Free-form prompt"})
    assert_inert(at)
    assert any(rendered_text(b) == EVERYTHING.replace("\n\n", "\n") for b in markdown_bodies(at))


def test_templates_name_metadata_labels_and_errors(app_env, pool):
    templates.create_template(pool, SLUG, [{"role": "user", "content": EVERYTHING + " {{ x }}"}],
                              description=ONE_LINE, category=ONE_LINE, tags=[ONE_LINE, "t"], owner=USER_ID,
                              created_by=USER_ID)
    templates.update_template(pool, SLUG, [{"role": "user", "content": "v2 {{ x }}"}], created_by=USER_ID,
                              change_description=EVERYTHING)
    templates.set_label(pool, SLUG, "production", 1, moved_by=USER_ID)
    at = open_page("pages/templates.py", state={"templates.open": SLUG})
    assert_inert(at)  # the description
    assert shows(at, SLUG)  # the header
    missing = open_page("pages/templates.py", state={"templates.open": "[x](http://evil.example/EVIL)"})
    assert missing.error and missing.error[0].value  # the error names it, escaped
    assert_inert(missing)


def test_datasets_description_tags_and_export_button(app_env, pool):
    datasets.create_dataset(pool, SLUG, description=EVERYTHING)
    datasets.add_items(pool, SLUG, [{"input": {"q": EVERYTHING}, "expected": EVERYTHING, "tags": [TAG]}])
    at = open_page("pages/datasets.py")
    assert_inert(at, at_least=1)
    at.selectbox(key="datasets.tag").set_value(TAG).run()
    assert not at.exception
    assert_inert(at, at_least=2)


def test_evaluation_run_caption_and_comparison(app_env, pool):
    templates.create_template(pool, SLUG, [{"role": "user", "content": "One word: {{ q }}"}],
                              params={"max_tokens": 2, "temperature": 0})
    templates.update_template(pool, SLUG, [{"role": "user", "content": "A word: {{ q }}"}])
    datasets.add_items(pool, "evil", [{"input": {"q": ONE_LINE}, "expected": EVERYTHING}], create=True)
    at = open_page("pages/evaluations.py")
    run = evaluations.create_run(pool, app_env, dataset="evil", templates=[f"{SLUG}@1", f"{SLUG}@2"],
                                 evaluators=[{"type": "icontains", "value": "x"}], created_by=USER_ID)
    deadline = time.monotonic() + 240
    while evaluations.get_run(pool, run.id).status not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.5)
    at = open_page("pages/evaluations.py", state={"evaluations.run": run.id})
    assert_inert(at)  # the caption names who started it
    at.radio(key="evaluations.view").set_value("Compare").run()
    assert not at.exception
    assert_no_live_constructs(at)  # version titles carry the template's name


def test_analytics_label_input(app_env, pool):
    at = open_page("pages/analytics.py", state={"analytics.tab": "Versions"})
    at.text_input(key="analytics.versions.label").input(ONE_LINE).run()
    assert not at.exception, at.exception
    assert_inert(at)


def test_flash_messages_quote_names_escaped(app_env, pool):
    """An action's outcome (shown on the next run) quotes what it acted on."""
    guardrails.create_rule(pool, SLUG, "words", words=["x"], direction="input", action="flag")
    at = open_page("pages/monitor.py", state={"monitor.tab": "Guardrails", "monitor.live": False})
    at.button(key="monitor.rule_delete").click().run()
    assert not at.exception
    assert shows(at, f"Rule '{SLUG}' deleted")
    assert_no_live_constructs(at)
