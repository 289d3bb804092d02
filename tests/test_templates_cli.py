"""`promptdev templates …` and `promptdev render`: the examples of the issue, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core import templates as tpl
from core.cli import main
from core.config import PROJECT_ROOT


@pytest.fixture
def cli(app_env, pool, capsys):
    """Run `promptdev ARGS…` in-process against the test database; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_the_issue_examples(cli, pool):
    code, out, _ = cli("templates", "create", "chatbot", "You are {{role}}. Help with {{topic}}.", "--created-by",
                       "admin")
    assert code == 0 and out == "created chatbot version 1 (variables: role, topic)\n"
    code, out, _ = cli("templates", "update", "chatbot", "You are {{role}}. Help kindly with {{topic}}.",
                       "--change", "why", "--created-by", "bob")
    assert code == 0 and out == "created chatbot version 2\n"
    tv = tpl.get_template_by_name(pool, "chatbot")
    assert (tv.version, tv.created_by, tv.change_description) == (2, "bob", "why")
    code, out, _ = cli("templates", "diff", "chatbot", "1", "2")
    assert code == 0
    assert "-You are {{role}}. Help with {{topic}}." in out and "+You are {{role}}. Help kindly with {{topic}}." in out
    code, out, _ = cli("templates", "rollback", "chatbot", "1")
    assert code == 0 and out == "created chatbot version 3: rollback to version 1\n"
    code, out, _ = cli("templates", "label", "chatbot", "production", "2", "--by", "ann")
    assert code == 0 and out == "production -> chatbot version 2\n"
    code, out, _ = cli("render", "chatbot", "role=a tutor", "topic=maths")
    assert code == 0 and out == "You are a tutor. Help kindly with maths.\n"  # production = 2
    code, out, _ = cli("render", "chatbot", "role=a tutor", "topic=maths", "--version", "1")
    assert out == "You are a tutor. Help with maths.\n"


def test_identical_update_says_so(cli):
    cli("templates", "create", "t", "same")
    code, out, _ = cli("templates", "update", "t", "same")
    assert code == 0 and out.startswith("no change: the content is identical to t version 1")


def test_chat_templates_from_options_and_files(cli, pool, tmp_path):
    code, out, err = cli("templates", "create", "chat", "--system", "You are {{ role }}.", "--user", "{{ q }}",
                         "--assistant", "Sure.", "--user", "More: {{ more }}", "--params", '{"temperature": 0.1}',
                         "--category", "demo", "--tag", "a", "--tag", "b", "--description", "d")
    assert code == 0, err
    tv = tpl.get_template_by_name(pool, "chat")
    assert [m["role"] for m in tv.messages] == ["system", "user", "assistant", "user"]
    assert tv.params == {"temperature": 0.1} and tpl.get_template(pool, "chat").tags == ["a", "b"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"messages": [{"role": "user", "content": "{{ x }}"}],
                                    "input_schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}))
    code, out, err = cli("templates", "update", "chat", "--file", str(spec), "--change", "from file")
    assert code == 0, err
    tv = tpl.get_template_by_name(pool, "chat")
    assert tv.messages == [{"role": "user", "content": "{{ x }}"}] and tv.input_schema["type"] == "object"
    assert tv.params == {"temperature": 0.1}  # inherited
    code, out, _ = cli("render", "chat", "x=41", "--json")
    assert json.loads(out)["messages"] == [{"role": "user", "content": "41"}]  # coerced to an integer, rendered
    code, out, err = cli("render", "chat", "x=forty")
    assert code == 1 and "'forty' is not of type 'integer'" in err
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Plain {{ text }}\n")
    code, out, err = cli("templates", "create", "plain", "--file", str(prompt))
    assert code == 0 and tpl.get_template_by_name(pool, "plain").text == "Plain {{ text }}\n"


def test_get_list_history_and_labels(cli, pool):
    cli("templates", "create", "a", "A {{ x }}", "--category", "c1", "--created-by", "ann")
    cli("templates", "update", "a", "A2 {{ x }}", "--change", "second")
    cli("templates", "create", "b", "B", "--category", "c2")
    code, out, _ = cli("templates", "get", "a")
    assert code == 0 and "a version 2 (latest)" in out and out.rstrip().endswith("A2 {{ x }}")
    assert "variables: x" in out
    code, out, _ = cli("templates", "get", "a", "--version", "1", "--json")
    assert json.loads(out)["text"] == "A {{ x }}" and json.loads(out)["created_by"] == "ann"
    code, out, _ = cli("templates", "list")
    assert code == 0 and out.splitlines()[0].startswith("b ") and "(1-2 of 2)" in out
    code, out, _ = cli("templates", "list", "--category", "c1", "--json")
    assert [t["name"] for t in json.loads(out)["templates"]] == ["a"]
    code, out, _ = cli("templates", "history", "a")
    lines = out.splitlines()
    assert lines[0].startswith("v2 [latest]") and "second" in lines[0] and lines[1].startswith("v1")
    cli("templates", "label", "a", "staging", "1", "--by", "ops")
    code, out, _ = cli("templates", "label", "a")
    assert "staging: 1" in out and "latest: 2" in out and "staging: - -> 1  by ops" in out
    code, out, _ = cli("templates", "label", "a", "staging", "--remove", "--by", "ops")
    assert out == "removed label staging\n" and tpl.get_template(pool, "a").labels == {}
    code, out, _ = cli("templates", "diff", "a", "1", "2", "--side-by-side")
    assert code == 0 and "|" in out
    code, out, _ = cli("templates", "diff", "a", "2", "2")
    assert out == "versions 2 and 2 are identical\n"


def test_activate_deactivate_and_duplicate(cli, pool):
    cli("templates", "create", "t", "hello")
    code, out, _ = cli("templates", "deactivate", "t")
    assert out == "t is now inactive\n"
    code, out, err = cli("render", "t")
    assert code == 1 and err == "promptdev: template 't' is inactive; activate it to render it\n"
    code, out, _ = cli("templates", "list", "--status", "inactive")
    assert "t " in out and "inactive" in out
    code, out, _ = cli("templates", "activate", "t")
    assert out == "t is now active\n"
    code, out, _ = cli("templates", "duplicate", "t", "t2")
    assert code == 0 and tpl.get_template_by_name(pool, "t2").text == "hello"


def test_export_import_round_trip(cli, pool, tmp_path):
    cli("templates", "create", "a", "A {{ x }}")
    cli("templates", "update", "a", "A2 {{ x }}")
    cli("templates", "label", "a", "production", "1")
    path = tmp_path / "all.json"
    code, out, _ = cli("templates", "export", str(path))
    assert code == 0 and out == f"exported 1 templates to {path}\n"
    assert json.loads(path.read_text())["templates"][0]["labels"]["production"]["version"] == 1
    code, out, _ = cli("templates", "import", str(path))
    assert code == 0 and out == "imported: 0 created, 0 extended, 1 unchanged\n"
    code, out, _ = cli("templates", "export", "-", "a")
    assert yaml.safe_load(out)["templates"][0]["name"] == "a"


@pytest.mark.parametrize("args, message", [
    (("templates", "create", "Bad Name", "x"), "invalid template name 'Bad Name'"),
    (("templates", "create", "x", "{% if a %}"), "syntax error at line 1"),
    (("templates", "create", "x"), "no content"),
    (("templates", "create", "x", "text", "--user", "y"), "only one of them"),
    (("templates", "create", "x", "y", "--params", "{bad"), "--params: not valid JSON"),
    (("templates", "create", "x", "y", "--input-schema", "@/nonexistent.json"), "cannot read"),
    (("templates", "get", "ghost"), "no template named 'ghost'"),
    (("templates", "update", "ghost", "x"), "no template named 'ghost'"),
    (("templates", "label", "ghost", "production", "1"), "no template named 'ghost'"),
    (("templates", "diff", "ghost", "1", "2"), "no template named 'ghost'"),
    (("templates", "rollback", "ghost", "1"), "no template named 'ghost'"),
    (("templates", "import", "/nonexistent.yaml"), "cannot read"),
    (("templates", "export", "/nonexistent/dir/all.yaml"), "cannot write /nonexistent/dir/all.yaml"),
    (("templates", "rollback", "ghost", "1", "--change", "x"), "no template named 'ghost'"),
    (("templates", "activate", "ghost"), "no template named 'ghost'"),
    (("templates", "duplicate", "ghost", "copy"), "no template named 'ghost'"),
    (("templates", "history", "ghost"), "no template named 'ghost'"),
    (("render", "ghost"), "no template named 'ghost'"),
    (("render", "x", "novalue"), "expected key=value"),
])
def test_errors_are_one_line_with_a_non_zero_exit(cli, args, message):
    code, out, err = cli(*args)
    assert code != 0 and out == ""
    assert err.startswith("promptdev: ") and message in err and err.count("\n") == 1


def test_render_errors(cli):
    cli("templates", "create", "t", "{{ a }} {{ b }}")
    code, _, err = cli("render", "t")
    assert code == 1 and err == "promptdev: missing variables: a, b\n"
    code, _, err = cli("templates", "label", "t", "latest", "1")
    assert code == 1 and "'latest' always points at the newest version" in err
    code, out, _ = cli("render", "t", "a:=[1, 2]", "b=x=y")
    assert code == 0 and out == "[1, 2] x=y\n"


def test_render_variables_from_a_file(cli, tmp_path):
    cli("templates", "create", "t", "{% for d in docs %}{{ d }};{% endfor %}")
    path = tmp_path / "vars.json"
    path.write_text(json.dumps({"docs": ["a", "b"]}))
    code, out, _ = cli("render", "t", "--vars", str(path))
    assert code == 0 and out == "a;b;\n"


def test_console_script_exit_codes(app_env):
    script = Path(sys.executable).with_name("promptdev")
    env = {**os.environ}
    ok = subprocess.run([str(script), "templates", "create", "sub", "Hi {{ x }}", "--created-by", "admin"],
                        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([str(script), "render", "sub"], capture_output=True, text=True, env=env,
                         cwd=PROJECT_ROOT, timeout=120)
    assert bad.returncode == 1 and bad.stderr == "promptdev: missing variable: x\n"


def test_the_issue_examples_verbatim(cli, pool, monkeypatch):
    monkeypatch.setattr("core.cli.templates._whoami", lambda: "login-name")
    assert cli("templates", "create", "chatbot", "You are {{role}}. Help with {{topic}}.", "--created-by",
               "admin")[0] == 0
    code, out, err = cli("templates", "update", "chatbot", "You are {{role}}. Help with {{topic}}, briefly.",
                         "--change", "why")
    assert (code, out, err) == (0, "created chatbot version 2\n", "")
    tv = tpl.get_template_by_name(pool, "chatbot")
    assert (tv.created_by, tv.change_description) == ("login-name", "why")  # the login when not given
    code, out, _ = cli("templates", "diff", "chatbot", "1", "2")
    assert code == 0 and out.splitlines()[:2] == ["--- chatbot@1", "+++ chatbot@2"]
    code, out, _ = cli("templates", "rollback", "chatbot", "1")
    assert out == "created chatbot version 3: rollback to version 1\n"
    code, out, _ = cli("templates", "label", "chatbot", "production", "2")
    assert out == "production -> chatbot version 2\n"
    code, out, _ = cli("templates", "label", "chatbot")
    assert "production: 2" in out and "production: - -> 2  by login-name" in out
    code, out, _ = cli("render", "chatbot", "role=a tutor", "topic=maths")
    assert (code, out) == (0, "You are a tutor. Help with maths, briefly.\n")


@pytest.mark.parametrize("args, message", [
    (("templates", "diff", "chatbot", "one", "2"), "templates diff: argument a: invalid int value: 'one'"),
    (("templates",), "templates: the following arguments are required: ACTION"),
    (("templates", "frobnicate"), "templates: argument ACTION: invalid choice: 'frobnicate'"),
    (("templates", "get", "chatbot", "--bogus"), "templates get: unrecognized arguments: --bogus"),
    (("templates", "rollback", "chatbot"), "templates rollback: the following arguments are required: version"),
    (("render",), "render: the following arguments are required: name"),
    (("render", "chatbot", "a=1", "--nope"), "render: unrecognized arguments: --nope"),
])
def test_usage_errors_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.startswith(f"promptdev: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    (("templates", "create", "deep", "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"), "nested too deeply"),
    (("templates", "create", "nul", "a\x01b {{ x }}\x00"), "NUL character"),
])
def test_content_errors_are_one_line(cli, args, message):
    code, out, err = cli(*args)
    assert code == 1 and out == "" and err.startswith("promptdev: ") and message in err and err.count("\n") == 1


def test_malformed_import_file_is_one_line_and_writes_nothing(cli, pool, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"format": "promptdev-templates", "format_version": 1, "templates": [
        {"name": "fine", "versions": [{"version": 1, "kind": "text", "text": "ok"}]},
        {"name": "bad", "tags": 7, "versions": [{"version": 1, "kind": "text", "text": "ok"}]}]}))
    code, out, err = cli("templates", "import", str(path))
    assert code == 1 and out == "" and err.startswith("promptdev: bad: tags must be a list of text") and \
        err.count("\n") == 1
    assert tpl.list_templates(pool).total == 0
