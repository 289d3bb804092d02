"""AppTest of the Monitor page: the overview, the conversation view, halt / resume / inject, memory edits, the audit
trail, guardrail rules (a broken regex refused with its reason), flagged messages and retention."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import conversations, executions, guardrails
from tests import signin
from tests.conftest import APP_PATH

TINY = {"max_tokens": 2, "temperature": 0.0, "seed": 1}


def open_monitor(tab: str = "Conversations") -> AppTest:
    signin.sign_in_as("olivia")
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/monitor.py")
    at.session_state["monitor.tab"] = tab  # only the open tab runs
    at.run()
    assert not at.exception, at.exception
    return at


def text_of(at: AppTest) -> str:
    parts = [e.value for e in (*at.markdown, *at.caption, *at.text, *at.warning, *at.info)]
    return "\n".join(str(p) for p in parts)


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, at.exception
    return at


def audit(at: AppTest):
    frames = [d.value for d in at.dataframe if "Operator" in d.value.columns and "Action" in d.value.columns]
    return frames[0] if frames else None


def test_overview_filters_and_conversation_view(app_env, pool, backend, settings):
    at = open_monitor()
    assert any("No conversations yet" in i.value for i in at.info)
    conversations.send_message(pool, backend, settings, "amy", "hello from amy", params=TINY)
    conversations.send_message(pool, backend, settings, "bob", "hello from bob", params=TINY)
    conversations.halt_conversation(pool, "amy", "too loud", "ops")
    guardrails.create_rule(pool, "greetings", "words", words=["hello"], direction="input", action="flag")
    conversations.send_message(pool, backend, settings, "bob", "hello again", params=TINY)
    conversations.inject_message(pool, "bob", "Mention the sale.", "ops")

    at = open_monitor()
    overview = at.dataframe[0].value
    assert list(overview["User"]) == ["bob", "amy"]  # most recent activity first
    bob = overview[overview["User"] == "bob"].iloc[0]
    assert (bob["Messages"], bob["Flagged"], bob["Guardrail events"]) == (5, 1, 1)
    assert bob["State"] == "🟢 active" and bob["Template"] == "companion v1"
    assert overview[overview["User"] == "amy"].iloc[0]["State"] == "🛑 halted"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Users"] == "2" and metrics["Halted conversations"] == "1" and metrics["Guardrail events"] == "1"

    # the conversation view of the most recent user marks the injection and the guardrail event
    assert at.selectbox(key="monitor.user").value == "bob"
    shown = text_of(at)
    assert "Operator injection" in shown and "Mention the sale." in shown
    assert "guardrail **greetings** · input · flag" in shown and "🚩 flagged" in shown

    at.selectbox(key="monitor.state").select("halted").run()
    assert list(at.dataframe[0].value["User"]) == ["amy"]
    at.selectbox(key="monitor.state").select("All").run()
    at.text_input(key="monitor.search").input("zzz").run()
    assert any("No conversation matches" in i.value for i in at.info)
    at.text_input(key="monitor.search").input("").run()
    at.selectbox(key="monitor.sort").select("User id").run()
    assert list(at.dataframe[0].value["User"]) == ["amy", "bob"]
    at.selectbox(key="monitor.user").select("amy").run()
    assert "Halted by ops" in text_of(at) and "too loud" in text_of(at)


def test_halt_resume_inject_and_audit_trail(app_env, pool, backend, settings):
    conversations.send_message(pool, backend, settings, "cat", "hi", params=TINY)
    at = open_monitor()
    click(at, "monitor.halt")  # no reason: refused, nothing changes
    assert at.error and "reason" in at.error[0].value
    assert not conversations.get_conversation(pool, "cat").halted

    at.text_input(key="monitor.halt_reason").input("needs a human").run()
    click(at, "monitor.halt")
    conv = conversations.get_conversation(pool, "cat")
    assert conv.halted and conv.halted_by == "olivia" and conv.halted_reason == "needs a human"
    assert at.success and "Halted cat" in at.success[0].value
    assert "monitor.halt" not in [b.key for b in at.button]  # halted: Resume is offered instead
    trail = audit(at)
    assert list(trail["Action"]) == ["halt"] and list(trail["Operator"]) == ["olivia"]
    assert list(trail["Reason"]) == ["needs a human"]
    # the very next user message is paused, without the model
    paused = conversations.send_message(pool, backend, settings, "cat", "hello?", params=TINY)
    assert paused.paused and executions.get_execution(pool, paused.execution_id).model_name == "none"

    at.run()
    click(at, "monitor.resume")
    assert not conversations.get_conversation(pool, "cat").halted
    assert at.text_input(key="monitor.halt_reason").value == ""  # cleared after use
    at.text_area(key="monitor.inject_text").input("The user prefers French.").run()
    click(at, "monitor.inject")
    assert list(audit(at)["Action"]) == ["halt", "resume", "inject"]
    assert "Operator injection" in text_of(at) and "The user prefers French." in text_of(at)
    reply = conversations.send_message(pool, backend, settings, "cat", "bonjour", params=TINY)
    context = executions.get_execution(pool, reply.execution_id).messages[0]["content"]
    assert "Operator: The user prefers French." in context


def test_memory_view_set_and_delete(app_env, pool, backend, settings):
    conversations.send_message(pool, backend, settings, "dan", "hi", params=TINY)
    at = open_monitor()
    assert "No memory yet." in text_of(at)
    at.text_input(key="monitor.memory_key").input("name").run()
    at.text_input(key="monitor.memory_value").input("Dan").run()  # not JSON: refused with the reason
    click(at, "monitor.memory_set")
    assert at.error and "must be JSON" in at.error[0].value
    assert conversations.get_memory(pool, "dan") == {}

    at.text_input(key="monitor.memory_key").input("name").run()
    at.text_input(key="monitor.memory_value").input('"Dan"').run()
    click(at, "monitor.memory_set")
    at.text_input(key="monitor.memory_key").input("likes").run()
    at.text_input(key="monitor.memory_value").input('["tea", 2]').run()
    click(at, "monitor.memory_set")
    assert conversations.get_memory(pool, "dan") == {"likes": ["tea", 2], "name": "Dan"}
    memory = next(d.value for d in at.dataframe if list(d.value.columns) == ["Key", "Value"])
    assert dict(zip(memory["Key"], memory["Value"])) == {"likes": '["tea", 2]', "name": '"Dan"'}

    at.selectbox(key="monitor.memory_delete_key").select("likes").run()
    click(at, "monitor.memory_delete")
    assert conversations.get_memory(pool, "dan") == {"name": "Dan"}
    assert list(audit(at)["Action"]) == ["set_memory", "set_memory", "delete_memory"]


def test_guardrail_rules_are_managed_and_a_broken_regex_is_refused(app_env, pool):
    at = open_monitor("Guardrails")
    at.text_input(key="monitor.rule_name").input("bad regex").run()
    at.selectbox(key="monitor.rule_kind").select("regex").run()
    at.text_input(key="monitor.rule_pattern").input("(unclosed").run()
    click(at, "monitor.rule_add")
    assert at.error and "invalid regular expression" in at.error[0].value and "missing )" in at.error[0].value
    assert guardrails.list_rules(pool) == []

    at.text_input(key="monitor.rule_pattern").input(r"(?i)\bcancel\b").run()
    at.selectbox(key="monitor.rule_action").select("flag").run()
    click(at, "monitor.rule_add")
    assert not at.error
    [rule] = guardrails.list_rules(pool)
    assert (rule.name, rule.kind, rule.action, rule.direction, rule.created_by) == (
        "bad regex", "regex", "flag", "both", "olivia")
    rules = next(d.value for d in at.dataframe if "Detects" in d.value.columns)
    assert list(rules["Name"]) == ["bad regex"] and list(rules["Detects"]) == [r"regex: (?i)\bcancel\b"]

    at.text_input(key="monitor.rule_name").input("no cards").run()
    at.selectbox(key="monitor.rule_kind").select("card").run()
    at.selectbox(key="monitor.rule_action").select("redact").run()
    at.selectbox(key="monitor.rule_direction").select("input").run()
    click(at, "monitor.rule_add")
    assert guardrails.get_rule(pool, "no cards").replacement == "[card]"

    at.selectbox(key="monitor.rule_select").select("no cards").run()
    click(at, "monitor.rule_toggle")
    assert guardrails.get_rule(pool, "no cards").enabled is False
    click(at, "monitor.rule_delete")
    assert [r.name for r in guardrails.list_rules(pool)] == ["bad regex"]


def test_flagged_messages_are_reviewed_and_retention_purges(app_env, pool, backend, settings):
    guardrails.create_rule(pool, "emails", "email", action="flag")
    conversations.send_message(pool, backend, settings, "eve", "write to eve@example.com", params=TINY)
    at = open_monitor("Flagged")
    flagged = next(d.value for d in at.dataframe if "Rules" in d.value.columns)
    assert list(flagged["User"]) == ["eve"] and list(flagged["Rules"]) == ["emails"]
    click(at, "monitor.review")
    assert conversations.flagged_messages(pool) == []
    assert any("No flagged messages" in i.value for i in at.info)

    with pool.connection() as conn:
        conn.execute("UPDATE conversations SET last_activity = now() - interval '40 days'")
    at.session_state["monitor.tab"] = "Retention"
    at.run()
    at.number_input(key="monitor.purge_days").set_value(30).run()
    click(at, "monitor.purge")  # not confirmed: refused
    assert at.error and "confirmation" in at.error[0].value
    assert conversations.find_conversation(pool, "eve") is not None
    at.checkbox(key="monitor.purge_confirm").check().run()
    click(at, "monitor.purge")
    assert at.success and "Deleted 1 conversation(s), 2 message(s)" in at.success[0].value
    assert conversations.find_conversation(pool, "eve") is None
    assert at.checkbox(key="monitor.purge_confirm").value is False


def test_live_refresh_can_be_paused_and_a_purged_selection_is_not_an_error(app_env, pool, backend, settings):
    conversations.send_message(pool, backend, settings, "fin", "hi", params=TINY)
    at = open_monitor()
    assert at.toggle(key="monitor.live").value is True  # refreshing itself by default
    at.toggle(key="monitor.live").set_value(False).run()
    assert not at.exception and at.selectbox(key="monitor.user").value == "fin"
    with pool.connection() as conn:
        conn.execute("UPDATE conversations SET last_activity = now() - interval '40 days'")
    conversations.purge_conversations(pool, 30, operator="ops")
    at.run()
    assert not at.exception and not at.error
    assert any("No conversations yet" in i.value for i in at.info)


def test_only_the_open_tab_queries(app_env, pool, monkeypatch):
    asked = []
    monkeypatch.setattr(conversations, "flagged_messages", lambda *a, **k: asked.append("flagged") or [])
    monkeypatch.setattr(guardrails, "list_rules", lambda *a, **k: asked.append("rules") or [])
    monkeypatch.setattr(conversations, "list_purges", lambda *a, **k: asked.append("purges") or [])
    at = open_monitor()
    assert asked == []
    for tab, query in (("Flagged", "flagged"), ("Guardrails", "rules"), ("Retention", "purges")):
        asked.clear()
        at.session_state["monitor.tab"] = tab
        at.run()
        assert not at.exception and query in asked and set(asked) == {query}
