"""The `promptdev` command: setup and status, with one-line errors; unexpected errors and a closed output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import db, templates
from core.cli import EXIT_CLOSED_OUTPUT, main

ROOT = Path(__file__).resolve().parent.parent


def promptdev(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_setup_migrates_and_reports(settings):
    env = {"PROMPTDEV_DATABASE_URL": settings.database_url, "PROMPTDEV_MODEL_PATH": str(settings.model_path),
           "PROMPTDEV_DATA_DIR": str(settings.data_dir)}
    out = promptdev("setup", env=env)
    assert out.returncode == 0, out.stderr
    n = len(db.load_migrations())
    assert "external PostgreSQL" in out.stdout and f"{n} migrations applied" in out.stdout
    status = promptdev("status", env=env)
    assert status.returncode == 0 and str(settings.data_dir) in status.stdout


def test_setup_names_a_missing_model(settings, tmp_path):
    out = promptdev("setup", env={"PROMPTDEV_DATABASE_URL": settings.database_url,
                                  "PROMPTDEV_MODEL_PATH": str(tmp_path / "absent.gguf")})
    assert out.returncode == 1
    assert out.stderr.strip() == f"promptdev: model file not found: {tmp_path / 'absent.gguf'}"


def test_unreachable_database_is_one_line_without_password():
    out = promptdev("status", env={"PROMPTDEV_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/x"})
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "could not connect" in out.stderr and "hunter2" not in out.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "promptdev: the following arguments are required: COMMAND (see: promptdev --help)"),
    (["executions", "list", "--bogus"], "promptdev: executions list: unrecognized arguments: --bogus"),
    (["conversations", "memory", "show"], "promptdev: conversations memory show: the following arguments are "
                                          "required: user"),
    (["eval", "show", "one"], "promptdev: eval show: argument run_id: invalid int value: 'one'"),
])
def test_usage_errors_are_one_line_in_every_command(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "" and err.startswith(message) and err.count("\n") == 1, err


def test_an_unexpected_error_prints_its_traceback_and_exits_1(app_env, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(templates, "list_templates", broken)
    assert main(["templates", "list"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("KeyError: 'surprise'") and "list_templates" in err


def closed_pipe_run(command: list[str], *, unbuffered: bool) -> subprocess.CompletedProcess:
    """Run a command whose standard output is a pipe nobody reads any more (as `promptdev … | head` once head
    has exited), its output buffered (the default) or not (PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                              timeout=300)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_help_into_a_closed_pipe_ends_quietly(unbuffered):
    done = closed_pipe_run([sys.executable, "-m", "core.cli", "--help"], unbuffered=unbuffered)
    # unbuffered, argparse itself ignores the failed write of the help and exits 0
    assert done.stderr == "" and done.returncode == (0 if unbuffered else EXIT_CLOSED_OUTPUT)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_command_into_a_closed_pipe_ends_quietly(app_env, pool, unbuffered):
    for n in range(3):
        templates.create_template(pool, f"t{n}", "Hello {{ name }}")
    done = closed_pipe_run([str(Path(sys.executable).with_name("promptdev")), "templates", "list"],
                           unbuffered=unbuffered)
    assert (done.returncode, done.stderr) == (EXIT_CLOSED_OUTPUT, "")
