"""`promptdev run`, `promptdev executions …` and `promptdev models …` on the real database and model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core import executions, models, templates, worker
from core.cli import main
from core.config import PROJECT_ROOT


@pytest.fixture
def cli(app_env, capsys):
    """Run `promptdev ARGS` in-process against the test database; return (exit code, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def greet(pool):
    return templates.create_template(pool, "greet", [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Say hello to {{ name }}."}],
                                     params={"max_tokens": 6})


def test_run_prints_the_output_and_figures_and_records_it(cli, pool, greet, backend):
    code, out, err = cli("run", "greet", "name=Ada", "--seed", "3", "--user", "dee")
    assert code == 0
    row = executions.list_executions(pool)[0]
    assert out == row.output + ("" if row.output.endswith("\n") else "\n")
    assert f"execution {row.id} · ok · greet@1 (latest)" in err and "prompt +" in err and "seed 3" in err
    assert row.source == "cli" and row.user_id == "dee" and row.variables == {"name": "Ada"} and row.seed == 3
    assert row.params["max_tokens"] == 6 and row.model_id == models.default_model(pool).id


def test_run_with_a_user_message_and_params(cli, pool, greet, backend):
    code, out, err = cli("run", "greet", "And to Grace, please: 2+2=4?", "name=Ada", "--param", "temperature=0.2",
                         "--param", 'stop=["\\n"]', "--max-tokens", "4", "--seed", "1", "-q")
    assert code == 0 and err == ""
    row = executions.list_executions(pool)[0]
    assert row.messages[-1] == {"role": "user", "content": "And to Grace, please: 2+2=4?"}
    assert row.params["temperature"] == 0.2 and row.params["stop"] == ["\n"] and row.params["max_tokens"] == 4


@pytest.mark.parametrize("argv, message", [
    (["run", "nope"], "promptdev: no template named 'nope'"),
    (["run", "greet"], "promptdev: missing variable: name"),
    (["run", "greet", "name=A", "--param", "warmth=3"], "promptdev: unknown parameter(s): warmth"),
    (["run", "greet", "name=A", "--param", "noequals"], "promptdev: --param takes key=value"),
    (["run", "greet", "one message", "another message", "name=A"], "promptdev: more than one user message"),
    (["run", "greet", "name:={oops"], "promptdev: name: not valid JSON"),
    (["run", "greet", "name=A", "name=B"], "promptdev: variable 'name' is given twice"),
    (["run", "greet", "name=A", "--model", "ghost"], "promptdev: no model named 'ghost' is registered"),
    (["run", "greet", "name=A", "--version", "9"], "promptdev: template 'greet' has no version 9"),
    (["executions", "show", "987654"], "promptdev: no execution with id 987654"),
    (["executions", "list", "--status", "great"], "promptdev: unknown status 'great'"),
    (["executions", "list", "--since", "last tuesday"], "promptdev: not a time: 'last tuesday'"),
    (["models", "add", "m", "--path", "/nowhere.gguf"], "promptdev: the GGUF file must be inside the models "),
    (["models", "add", "m", "--path", "nowhere.gguf"], "promptdev: model file not found: "),
    (["models", "remove", "ghost"], "promptdev: no model named 'ghost' is registered"),
])
def test_errors_are_one_line_and_record_nothing(cli, pool, greet, argv, message):
    code, out, err = cli(*argv)
    assert code == 1 and out == "" and err.startswith(message) and err.count("\n") == 1
    assert executions.list_executions(pool) == []


def test_json_variables_and_a_message_from_stdin(cli, pool, backend, monkeypatch):
    import io

    templates.create_template(pool, "listing", "{% for x in items %}{{ x }};{% endfor %} {{ n }}",
                              params={"max_tokens": 2})
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    code, _, err = cli("run", "listing", 'items:=["a", 2]', "n:=3", "-", "-q")
    assert code == 0, err
    row = executions.list_executions(pool)[0]
    assert row.variables == {"items": ["a", 2], "n": 3}
    assert row.messages == [{"role": "user", "content": "a;2; 3"}, {"role": "user", "content": "from stdin"}]


def test_list_show_and_rerun(cli, pool, greet, backend):
    cli("run", "greet", "name=Ada", "--temperature", "1.0", "-q")
    cli("run", "greet", "name=Bo", "--max-tokens", "2", "-q")
    first, second = executions.list_executions(pool)[::-1]

    code, out, _ = cli("executions", "list", "--template", "greet")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["ID", "CREATED", "STATUS", "SOURCE"]
    assert [line.split()[0] for line in lines[1:]] == [str(second.id), str(first.id)]
    code, out, _ = cli("executions", "list", "--json", "--limit", "1", "--since", "1h", "--source", "cli")
    assert [e["id"] for e in json.loads(out)] == [second.id]
    code, out, err = cli("executions", "list", "--status", "error")
    assert out == "" and "no executions match" in err

    code, out, _ = cli("executions", "show", str(first.id))
    assert code == 0 and "--- messages ---" in out and "Say hello to Ada." in out and first.prompt in out
    assert f"sha256 {backend.sha256}" in out and '"name": "Ada"' in out
    code, out, _ = cli("executions", "show", str(first.id), "--json")
    assert json.loads(out)["output"] == first.output

    code, out, err = cli("executions", "rerun", str(first.id), "--check")
    assert code == 0 and f"identical to execution {first.id}" in err
    rerun = executions.list_executions(pool, rerun_of=first.id)[0]
    assert rerun.output == first.output and out.rstrip("\n") == first.output.rstrip("\n")


def test_rerun_check_fails_when_the_output_differs(cli, pool, settings, backend):
    from core.executions import Origin
    from core.llm import GenerationParams

    models.ensure_default_model_registered(pool, settings)
    eid = executions.record(pool, origin=Origin("api"), status="ok", output="not this", backend=backend,
                            params=GenerationParams(max_tokens=3, seed=2), messages=[{"role": "user", "content": "Hi"}])
    code, _, err = cli("executions", "rerun", str(eid), "--check", "-q")
    assert code == 3 and f"DIFFERS from execution {eid}" in err


def test_submit_prints_the_id_at_once_then_show_waits(cli, pool, greet, settings, backend):
    code, out, err = cli("run", "greet", "name=Ada", "--submit")
    eid = int(out)
    assert code == 0 and "queued as execution" in err and executions.get_execution(pool, eid).status == "queued"
    code, out, err = cli("executions", "cancel", str(eid))
    assert code == 0 and executions.get_execution(pool, eid).status == "cancelled"
    assert cli("executions", "cancel", str(eid))[0] == 1

    code, out, _ = cli("run", "greet", "name=Bo", "--submit")
    eid = int(out)
    code, out, err = cli("executions", "show", str(eid), "--wait", "0.2")
    assert code == 1 and err == f"promptdev: execution {eid} is still queued after 0.2 s\n"
    thread, stop = worker.start_thread(pool, settings)
    try:
        code, out, _ = cli("executions", "show", str(eid), "--wait", "120", "--json")
    finally:
        stop.set()
        thread.join(30)
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "ok" and shown["source"] == "cli" and shown["worker"]


def test_models_list_add_remove(cli, pool, default_model_path):
    code, out, _ = cli("models", "list")
    assert code == 0 and default_model_path.stem in out and "*" in out
    code, out, _ = cli("models", "add", "remote", "--base-url", "http://127.0.0.1:9/v1", "--remote-model", "m",
                       "--api-key-env", "PROMPTDEV_KEY_REMOTE")
    assert code == 0 and "registered remote: openai" in out
    code, out, _ = cli("models", "list", "--json")
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed["remote"]["api_key_env"] == "PROMPTDEV_KEY_REMOTE"
    assert listed[default_model_path.stem]["is_default"]
    assert cli("models", "remove", "remote")[0] == 0
    assert [m.name for m in models.list_models(pool)] == [default_model_path.stem]


def test_the_console_command_streams_and_fails_cleanly(app_env, pool, greet):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-m", "core.cli", "run", "greet", "name=Ada", "--max-tokens", "3",
                           "--seed", "1"], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    row = executions.list_executions(pool)[0]
    assert done.stdout.rstrip("\n") == row.output.rstrip("\n") and f"execution {row.id} · ok" in done.stderr
    done = subprocess.run([sys.executable, "-m", "core.cli", "run", "greet"], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 1 and done.stderr == "promptdev: missing variable: name\n" and "Traceback" not in done.stderr


def test_a_generation_failure_is_one_line_and_recorded(cli, pool, settings, backend):
    models.ensure_default_model_registered(pool, settings)
    templates.create_template(pool, "long", "{{ text }}")
    code, out, err = cli("run", "long", "text=" + "word " * (backend.n_ctx + 10))
    row = executions.list_executions(pool)[0]
    assert code == 1 and out == "" and row.status == "error" and "context holds" in row.error
    assert err == f"promptdev: {row.error} (recorded as execution {row.id})\n"
    code, out, err = cli("executions", "rerun", str(row.id))  # a re-run that fails says so the same way
    new = executions.list_executions(pool, rerun_of=row.id)[0]
    assert code == 1 and out == "" and new.status == "error"
    assert err == f"promptdev: {new.error} (recorded as execution {new.id})\n"


def test_template_usage(cli, pool, greet, backend):
    templates.create_template(pool, "idle", "Nothing to see")
    for name in ("Ada", "Bo"):
        cli("run", "greet", f"name={name}", "--max-tokens", "1", "-q")
    last = executions.list_executions(pool)[0].created_at
    code, out, _ = cli("executions", "usage")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [["TEMPLATE", "RUNS"], ["greet", "2"],
                                                                             ["idle", "0"]]
    assert out.splitlines()[2].split()[-1] == "never"
    code, out, _ = cli("executions", "usage", "--template", "greet", "--json")
    assert json.loads(out) == [{"template": "greet", "uses": 2, "last_used": last.isoformat()}]
    code, out, err = cli("executions", "usage", "--template", "ghost")
    assert code == 1 and err == "promptdev: no template named 'ghost'\n"


def test_show_names_the_model_on_the_server(cli, pool):
    remote = models.register_model(pool, "remote", backend="openai", base_url="http://127.0.0.1:9/v1",
                                   remote_model="served-name")
    eid = executions.record(pool, origin=executions.Origin("api", model_id=remote.id), status="error",
                            error="down", model={"model_name": "remote", "backend": "openai", "model_sha256": None,
                                                 "base_url": remote.base_url})
    code, out, _ = cli("executions", "show", str(eid))
    assert code == 0 and "model:     remote at http://127.0.0.1:9/v1 (model served-name there)" in out
