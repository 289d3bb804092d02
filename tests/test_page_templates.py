"""The Templates page through AppTest: list and filters, create with live checks, edit, diff, rollback with
confirmation, labels, preview, activation, duplication — and errors shown as one line, never a traceback."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import templates as tpl
from tests import signin
from tests.conftest import APP_PATH

PAGE = "pages/templates.py"


def open_page(**state) -> AppTest:
    if "promptdev.user" in state:  # who is signed in (tests/signin.py), not a session-state value
        signin.sign_in_as(state.pop("promptdev.user"))
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def table_with(at: AppTest, column: str):
    """The first dataframe that has a column named `column`."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_empty_page_invites_to_create(app_env):
    at = open_page()
    assert at.title[0].value == "Templates"
    assert any("No templates yet" in t for t in texts(at.info))


def test_create_with_live_variables_and_syntax_errors(app_env, pool):
    at = open_page()
    at.radio(key="templates.mode").set_value("New template").run()
    at.text_input(key="templates.new.name").input("chatbot")
    at.text_area(key="templates.new.text").input("You are {{ role }}.\n{% if topic %}Help with {{ topic }")
    at.run()
    assert not at.exception
    assert any(e.startswith("syntax error at line 2:") for e in texts(at.error))
    at.text_area(key="templates.new.text").input("You are {{ role }}. Help with {{ topic }}.").run()
    assert not at.error
    assert any("`role`, `topic`" in c for c in texts(at.caption))
    at.button(key="templates.new.create").click().run()
    assert not at.exception
    assert "Created chatbot version 1" in texts(at.success)
    assert at.session_state["templates.open"] == "chatbot"
    tv = tpl.get_template_by_name(pool, "chatbot")
    assert (tv.version, tv.text, tv.created_by) == (1, "You are {{ role }}. Help with {{ topic }}.", "tester")
    # the new template is listed with its version and status
    table = at.dataframe[0].value
    assert list(table["Name"]) == ["chatbot"] and list(table["Version"]) == [1]
    assert list(table["Status"]) == ["🟢 active"]


def test_create_chat_template_with_params_and_bad_input(app_env, pool):
    at = open_page(**{"promptdev.user": "ann"})
    at.radio(key="templates.mode").set_value("New template").run()
    at.text_input(key="templates.new.name").input("Bad Name")
    at.radio(key="templates.new.kind").set_value("chat").run()
    at.text_area(key="templates.new.content.0").input("You are {{ role }}.")
    at.text_area(key="templates.new.content.1").input("{{ question }}")
    at.button(key="templates.new.create").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "invalid template name 'Bad Name'" in at.error[0].value
    at.text_input(key="templates.new.name").input("helper")
    at.text_area(key="templates.new.params").input("{not json")
    at.button(key="templates.new.create").click().run()
    assert not at.exception and at.error[0].value.startswith("Model parameters: not valid JSON")
    at.text_area(key="templates.new.params").input('{"temperature": 9}')
    at.button(key="templates.new.create").click().run()
    assert not at.exception and "temperature must be between 0 and 5" in at.error[0].value
    at.text_area(key="templates.new.params").input('{"temperature": 0.3}')
    at.button(key="templates.new.create").click().run()
    assert not at.exception and "Created helper version 1" in texts(at.success)
    tv = tpl.get_template_by_name(pool, "helper")
    assert tv.messages == [{"role": "system", "content": "You are {{ role }}."},
                           {"role": "user", "content": "{{ question }}"}]
    assert tv.params == {"temperature": 0.3} and tv.created_by == "ann"
    at.radio(key="templates.mode").set_value("New template").run()
    at.text_input(key="templates.new.name").input("helper")
    at.text_area(key="templates.new.text").input("x")
    at.button(key="templates.new.create").click().run()
    assert not at.exception and "already exists" in at.error[0].value


def test_edit_diff_and_rollback(app_env, pool):
    tpl.create_template(pool, "chatbot", "You are {{ role }}.\nHelp with {{ topic }}.", created_by="admin")
    at = open_page(**{"templates.open": "chatbot"})
    prefix = "templates.edit.chatbot.v1"
    at.text_area(key=f"{prefix}.text").input("You are {{ role }}.\nHelp kindly with {{ topic }}.")
    at.text_input(key=f"{prefix}.change").input("be kind")
    at.button(key=f"{prefix}.save").click().run()
    assert not at.exception
    assert "Saved chatbot version 2" in texts(at.success)
    assert tpl.get_template_by_name(pool, "chatbot").change_description == "be kind"
    # saving identical content says so and creates nothing
    at.button(key="templates.edit.chatbot.v2.save").click().run()
    assert not at.exception
    assert any("identical to version 2" in t for t in texts(at.info))
    assert tpl.get_template(pool, "chatbot").latest_version == 2
    # the history shows author, time and change description
    history = table_with(at, "Change")
    assert list(history["Version"]) == [2, 1] and list(history["Change"]) == ["be kind", "Created"]
    assert list(history["Author"]) == ["tester", "admin"]
    # the diff, unified and side by side
    unified = [c.value for c in at.code if c.language == "diff"]
    assert unified and "-Help with {{ topic }}." in unified[0] and "+Help kindly with {{ topic }}." in unified[0]
    at.radio(key="templates.diff.chatbot.style").set_value("Side by side").run()
    side = table_with(at, "v2")
    assert ("Help with {{ topic }}.", "Help kindly with {{ topic }}.") in list(zip(side["v1"], side["v2"]))
    # roll back with confirmation
    at.selectbox(key="templates.rollback.chatbot.version").set_value(1)
    at.button(key="templates.rollback.chatbot.ask").click().run()
    assert any("Roll back chatbot to version 1?" in w for w in texts(at.warning))
    assert tpl.get_template(pool, "chatbot").latest_version == 2  # nothing yet
    at.button(key="templates.rollback.chatbot.confirm").click().run()
    assert not at.exception
    assert "Rolled back: version 3 has version 1's content" in texts(at.success)
    tv = tpl.get_template_by_name(pool, "chatbot")
    assert (tv.version, tv.rollback_of, tv.text) == (3, 1, "You are {{ role }}.\nHelp with {{ topic }}.")
    # the editor now starts from version 3
    assert at.text_area(key="templates.edit.chatbot.v3.text").value == tv.text


def test_edit_from_an_older_version_and_cancel_rollback(app_env, pool):
    tpl.create_template(pool, "t", "one {{ a }}")
    tpl.update_template(pool, "t", "two {{ a }}")
    at = open_page(**{"templates.open": "t"})
    at.selectbox(key="templates.edit.t.base").set_value(1).run()
    assert at.text_area(key="templates.edit.t.v1.text").value == "one {{ a }}"
    at.text_area(key="templates.edit.t.v1.text").input("one, edited {{ a }} {{ b }}").run()
    assert any("`a`, `b`" in c for c in texts(at.caption))
    at.button(key="templates.edit.t.v1.save").click().run()
    assert "Saved t version 3" in texts(at.success)
    at.button(key="templates.rollback.t.ask").click().run()
    at.button(key="templates.rollback.t.cancel").click().run()
    assert not at.warning and tpl.get_template(pool, "t").latest_version == 3


def test_labels_preview_activation_and_duplicate(app_env, pool):
    tpl.create_template(pool, "greet", "Hello {{ name }}!", input_schema={
        "type": "object", "properties": {"name": {"type": "string", "minLength": 2}}})
    tpl.update_template(pool, "greet", "Hi {{ name }}!")
    at = open_page(**{"templates.open": "greet", "promptdev.user": "ops"})
    at.selectbox(key="templates.labels.greet.label").set_value("production")
    at.selectbox(key="templates.labels.greet.version").set_value(1)
    at.button(key="templates.labels.greet.move").click().run()
    assert not at.exception and "production → version 1" in texts(at.success)
    moves = table_with(at, "By")
    assert list(moves["Label"]) == ["production"] and list(moves["By"]) == ["ops"] and list(moves["To"]) == ["v1"]
    assert list(at.dataframe[0].value["Labels"]) == ["production → v1"]
    # preview renders the default (production) version live
    assert any("Fill in the variables" in i for i in texts(at.info))
    at.text_area(key="templates.preview.greet.var.name").input("Zoe").run()
    assert not at.exception
    assert "Hello Zoe!" in [c.value for c in at.code]
    at.text_area(key="templates.preview.greet.var.name").input("Z").run()
    assert any("variables do not match the input schema: name: 'Z' is too short" in e for e in texts(at.error))
    at.selectbox(key="templates.preview.greet.ref").set_value("v2")
    at.text_area(key="templates.preview.greet.var.name").input("Bo").run()
    assert "Hi Bo!" in [c.value for c in at.code]
    # deactivate / activate
    at.button(key="templates.manage.greet.deactivate").click().run()
    assert "greet is now inactive" in texts(at.success) and not tpl.get_template(pool, "greet").active
    assert list(at.dataframe[0].value["Status"]) == ["⚪ inactive"]
    at.button(key="templates.manage.greet.activate").click().run()
    assert tpl.get_template(pool, "greet").active
    # duplicate
    at.text_input(key="templates.manage.greet.new_name").input("greet-copy")
    at.button(key="templates.manage.greet.duplicate").click().run()
    assert not at.exception and "Created greet-copy from greet version 2" in texts(at.success)
    assert at.session_state["templates.open"] == "greet-copy"
    assert tpl.get_template_by_name(pool, "greet-copy").text == "Hi {{ name }}!"


def test_list_filters_and_pagination(app_env, pool):
    for i in range(120):
        tpl.create_template(pool, f"p-{i:03d}", f"prompt {i}", category="odd" if i % 2 else "even",
                            tags=["five"] if i % 5 == 0 else [])
    tpl.deactivate_template(pool, "p-007")
    at = open_page()
    assert len(at.dataframe[0].value) == 50
    assert any("showing 1–50 of 120 templates" in c for c in texts(at.caption))
    at.number_input(key="templates.page").set_value(3).run()
    assert len(at.dataframe[0].value) == 20
    at.text_input(key="templates.search").input("p-01").run()
    assert at.number_input(key="templates.page").value == 1
    assert sorted(at.dataframe[0].value["Name"]) == [f"p-{i:03d}" for i in range(10, 20)]
    at.text_input(key="templates.search").input("").run()
    at.selectbox(key="templates.category").set_value("odd").run()
    at.selectbox(key="templates.tag").set_value("five").run()
    assert sorted(at.dataframe[0].value["Name"]) == [f"p-{i:03d}" for i in range(5, 120, 10)]
    at.selectbox(key="templates.tag").set_value("Any")
    at.selectbox(key="templates.status").set_value("Inactive").run()
    assert list(at.dataframe[0].value["Name"]) == ["p-007"]
    at.selectbox(key="templates.open").set_value("p-007").run()
    assert not at.exception and at.subheader[0].value == "p-007"
    at.text_input(key="templates.search").input("zzz").run()
    assert any("No templates match" in i for i in texts(at.info))


def test_missing_template_is_a_one_line_error(app_env):
    at = open_page(**{"templates.open": "ghost"})
    assert not at.exception
    assert any("no template named 'ghost'" in e for e in texts(at.error))


def test_editor_live_preview_and_custom_label_and_export(app_env, pool):
    at = open_page()
    at.radio(key="templates.mode").set_value("New template").run()
    at.radio(key="templates.new.kind").set_value("chat").run()
    at.number_input(key="templates.new.count").set_value(3).run()
    at.text_area(key="templates.new.content.0").input("You are {{ role }}.")
    at.text_area(key="templates.new.content.1").input("{{ q }}")
    at.selectbox(key="templates.new.role.2").set_value("assistant")
    at.text_area(key="templates.new.content.2").input("Sure, {{ q | upper }}!")
    at.run()
    assert any("`q`, `role`" in c for c in texts(at.caption))
    at.text_area(key="templates.new.preview.var.role").input("a bot")
    at.text_area(key="templates.new.preview.var.q").input("{{ not rendered }}").run()
    assert not at.exception
    shown = [c.value for c in at.code]
    assert "You are a bot." in shown and "{{ not rendered }}" in shown and "Sure, {{ NOT RENDERED }}!" in shown
    at.text_input(key="templates.new.name").input("three")
    at.button(key="templates.new.create").click().run()
    assert [m["role"] for m in tpl.get_template_by_name(pool, "three").messages] == ["system", "user", "assistant"]
    # a custom label
    at.selectbox(key="templates.labels.three.label").set_value("other…").run()
    at.text_input(key="templates.labels.three.custom").input("canary")
    at.button(key="templates.labels.three.move").click().run()
    assert not at.exception and "canary → version 1" in texts(at.success)
    assert tpl.get_template(pool, "three").labels == {"canary": 1}
    at.text_input(key="templates.labels.three.custom").input("Not Valid")
    at.button(key="templates.labels.three.move").click().run()
    assert not at.exception and "invalid label 'Not Valid'" in at.error[0].value
    # export of every template, prepared on demand
    at.button(key="templates.export.prepare").click().run()
    assert not at.exception
    assert at.session_state["templates.export_text"][1].startswith("format: promptdev-templates")


def test_diff_between_any_two_versions_in_both_styles(app_env, pool):
    tpl.create_template(pool, "d", "alpha\nbeta")
    tpl.update_template(pool, "d", "alpha\nBETA")
    tpl.update_template(pool, "d", "alpha\nBETA\ngamma", params={"temperature": 0.5})
    at = open_page(**{"templates.open": "d"})
    at.selectbox(key="templates.diff.d.from").set_value(1)
    at.selectbox(key="templates.diff.d.to").set_value(3).run()
    assert not at.exception
    unified = next(c.value for c in at.code if c.language == "diff")
    assert unified.splitlines()[:2] == ["--- d@1", "+++ d@3"]
    assert "-beta" in unified and "+BETA" in unified and "+gamma" in unified and '+  "temperature": 0.5' in unified
    at.radio(key="templates.diff.d.style").set_value("Side by side").run()
    side = table_with(at, "v3")
    rows = list(zip(side["v1"], side[" "], side["v3"]))
    assert ("alpha", "", "alpha") in rows and ("beta", "≠", "BETA") in rows and ("", "+", "gamma") in rows
    at.selectbox(key="templates.diff.d.from").set_value(3).run()  # a version against itself
    assert "Versions 3 and 3 are identical." in texts(at.info)


def test_source_too_deep_for_the_parser_is_one_line_while_typing_and_at_save(app_env, pool):
    at = open_page()
    at.radio(key="templates.mode").set_value("New template").run()
    at.text_input(key="templates.new.name").input("deep")
    at.text_area(key="templates.new.text").input("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}").run()
    assert not at.exception
    assert "syntax error: the template is nested too deeply" in texts(at.error)
    at.button(key="templates.new.create").click().run()
    assert not at.exception and "syntax error: the template is nested too deeply" in texts(at.error)
    assert tpl.list_templates(pool).total == 0


def test_preview_errors_are_one_line(app_env, pool):
    at = open_page()
    at.radio(key="templates.mode").set_value("New template").run()
    at.text_area(key="templates.new.text").input("{{ text | wordwrap(1) }}").run()
    at.text_area(key="templates.new.preview.var.text").input("a" * 300_000).run()
    assert not at.exception
    assert any(e.startswith("line 1: wordwrap: breaking words this long") for e in texts(at.error))
    at.text_area(key="templates.new.input_schema").input("[1, 2]").run()  # JSON, but not a schema
    assert not at.exception
    assert "the input schema must be a JSON object" in texts(at.error)


def test_label_moves_show_who_when_from_and_to(app_env, pool):
    tpl.create_template(pool, "lm", "one")
    tpl.update_template(pool, "lm", "two")
    at = open_page(**{"templates.open": "lm", "promptdev.user": "ann"})
    at.selectbox(key="templates.labels.lm.label").set_value("production")
    at.selectbox(key="templates.labels.lm.version").set_value(1)
    at.button(key="templates.labels.lm.move").click().run()
    signin.sign_in_as("bob")
    at.selectbox(key="templates.labels.lm.version").set_value(2)
    at.button(key="templates.labels.lm.move").click().run()
    assert not at.exception and "production → version 2" in texts(at.success)
    moves = table_with(at, "By")
    assert [(r["Label"], r["From"], r["To"], r["By"]) for _, r in moves.iterrows()] == [
        ("production", "v1", "v2", "bob"), ("production", "—", "v1", "ann")]
    events = tpl.get_label_history(pool, "lm")
    assert list(moves["When"]) == [e.moved_at.strftime("%Y-%m-%d %H:%M:%S") for e in events]
    assert any(":blue-badge[production → v2]" in m.value for m in at.markdown)  # the header shows where it is now
    at.button(key="templates.labels.lm.remove").click().run()
    assert "Removed label production" in texts(at.success)
    assert table_with(at, "By").iloc[0].to_dict() | {"When": ""} == {"When": "", "Label": "production",
                                                                        "From": "v2", "To": "removed", "By": "bob"}
