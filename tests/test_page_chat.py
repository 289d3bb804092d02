"""AppTest of the Chat page: identify, chat with a streamed reply, history from the database, paused notice."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import conversations, guardrails, templates
from tests.conftest import APP_PATH
from tests.markdown_check import rendered_text

FAST_TEMPLATE = [{"role": "system", "content": "Be brief.\n{{ conversation_history }}"},
                 {"role": "user", "content": "{{ message }}"}]


def open_chat(user: str | None = None) -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/chat.py")
    at.run()
    assert not at.exception
    if user is not None:
        at.text_input(key="chat.user_id").input(user).run()
        assert not at.exception
    return at


def bubbles(at: AppTest) -> list[tuple[str, str]]:
    """Each chat bubble's sender and the text a reader sees in it (messages are escaped Markdown)."""
    return [(c.name, " ".join(rendered_text(m.value) for m in c.markdown)) for c in at.chat_message]


def test_chat_streams_a_reply_and_history_survives_a_reload(app_env, pool, backend):
    templates.create_template(pool, "companion", FAST_TEMPLATE, params={"max_tokens": 4, "temperature": 0, "seed": 1})
    at = open_chat()
    assert any("Enter a user id" in i.value for i in at.info)
    at.text_input(key="chat.user_id").input("alice").run()
    at.chat_input(key="chat.input").set_value("Hello there").run()
    assert not at.exception
    stored = conversations.list_messages(pool, "alice")
    assert [(m.role, m.kind) for m in stored] == [("user", "message"), ("assistant", "reply")]
    shown = bubbles(at)
    assert shown[0] == ("user", "Hello there") and shown[1][0] == "assistant"

    again = open_chat("alice")  # a fresh session: the history comes from the database
    assert bubbles(again)[:2] == [("user", "Hello there"), ("assistant", stored[1].content.strip())]
    assert [c for c in again.chat_message] and not again.exception


def test_a_halted_conversation_answers_paused_and_injections_stay_hidden(app_env, pool, backend, settings):
    templates.create_template(pool, "companion", FAST_TEMPLATE, params={"max_tokens": 3, "temperature": 0, "seed": 1})
    conversations.send_message(pool, backend, settings, "bob", "hi")
    conversations.inject_message(pool, "bob", "SECRET operator note", "ops")
    conversations.halt_conversation(pool, "bob", "review", "ops")
    at = open_chat("bob")
    assert "SECRET" not in str(bubbles(at))
    at.chat_input(key="chat.input").set_value("anyone?").run()
    assert not at.exception
    assert conversations.PAUSED_REPLY in bubbles(at)[-1][1]
    assert any("paused" in c.value for c in at.caption)
    assert conversations.list_messages(pool, "bob")[-1].kind == "paused"


def test_a_bad_user_id_is_one_clear_error(app_env):
    at = open_chat("x" * 300)
    assert not at.exception
    assert at.error and "at most 200" in at.error[0].value


def test_the_user_id_is_kept_in_the_address_so_a_reload_returns_to_the_conversation(app_env, pool, backend, settings):
    templates.create_template(pool, "companion", FAST_TEMPLATE, params={"max_tokens": 3, "temperature": 0, "seed": 1})
    conversations.send_message(pool, backend, settings, "carol", "I like tea")
    at = open_chat("carol")
    assert at.query_params["user"] in ("carol", ["carol"])
    reloaded = AppTest.from_file(APP_PATH, default_timeout=120)  # a browser reload: new session, same address
    reloaded.query_params["user"] = "carol"
    reloaded.run()
    reloaded.switch_page("pages/chat.py")
    reloaded.query_params["user"] = "carol"
    reloaded.run()
    assert not reloaded.exception
    assert reloaded.text_input(key="chat.user_id").value == "carol"
    assert bubbles(reloaded)[0] == ("user", "I like tea")


def test_the_user_sees_their_message_as_stored_after_redaction(app_env, pool):
    templates.create_template(pool, "companion", FAST_TEMPLATE, params={"max_tokens": 3, "temperature": 0, "seed": 1})
    guardrails.create_rule(pool, "emails", "email", direction="input", action="redact")
    at = open_chat("dave")
    at.chat_input(key="chat.input").set_value("write to dave@example.com").run()
    assert not at.exception
    assert bubbles(at)[0] == ("user", "write to [email]")
    assert conversations.list_messages(pool, "dave")[0].content == "write to [email]"


def test_a_failed_reply_is_one_clear_line_not_a_traceback(app_env, pool):
    templates.create_template(pool, "broken", [{"role": "user", "content": "{{ message | length > 'x' }}"}])
    conversations.assign_template(pool, "erin", "broken", operator="ops")
    at = open_chat("erin")
    at.chat_input(key="chat.input").set_value("hello").run()
    assert not at.exception
    assert conversations.ERROR_REPLY in bubbles(at)[-1][1]
    assert any("The reply failed" in c.value for c in at.caption)
    assert [m.kind for m in conversations.list_messages(pool, "erin")] == ["message", "error"]
