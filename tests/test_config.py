"""Settings: environment variables and TOML, with one clear line naming the key on bad input."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from core.config import Settings, SettingsError, env_name, load_settings


def test_defaults_use_embedded_database_and_data_dir():
    s = load_settings(env={})
    assert s.embedded_database and s.data_dir.name == "data"
    assert s.postgres_dir == s.data_dir / "postgres" and s.models_dir == s.data_dir / "models"


def test_environment_overrides(tmp_path):
    s = load_settings(env={"PROMPTDEV_DATA_DIR": str(tmp_path), "PROMPTDEV_N_CTX": "2048",
                           "PROMPTDEV_CHAT_FORMAT": "mistral-instruct",
                           "PROMPTDEV_DATABASE_URL": "postgresql://u@h/db"})
    assert s.data_dir == tmp_path and s.n_ctx == 2048 and s.chat_format == "mistral-instruct"
    assert not s.embedded_database


def test_toml_file_then_environment(tmp_path):
    path = tmp_path / "promptdev.toml"
    path.write_text('n_ctx = 1024\nchat_format = "chatml"\n')
    s = load_settings(env={"PROMPTDEV_CONFIG": str(path), "PROMPTDEV_N_CTX": "512"})
    assert s.n_ctx == 512 and s.chat_format == "chatml"


@pytest.mark.parametrize("env, key", [
    ({"PROMPTDEV_N_CTX": "lots"}, "PROMPTDEV_N_CTX"),
    ({"PROMPTDEV_N_CTX": "16"}, "PROMPTDEV_N_CTX"),
    ({"PROMPTDEV_CHAT_FORMAT": "klingon"}, "PROMPTDEV_CHAT_FORMAT"),
    ({"PROMPTDEV_BACKEND": "openai"}, "PROMPTDEV_OPENAI_BASE_URL"),
    ({"PROMPTDEV_BACKEND": "openai", "PROMPTDEV_OPENAI_BASE_URL": "ftp://x"}, "PROMPTDEV_OPENAI_BASE_URL"),
    ({"PROMPTDEV_BACKEND": "openai", "PROMPTDEV_OPENAI_BASE_URL": "http://x/v1"}, "PROMPTDEV_OPENAI_MODEL"),
    ({"PROMPTDEV_DATABASE_URL": "mysql://x"}, "PROMPTDEV_DATABASE_URL"),
    ({"PROMPTDEV_METRICS_PORT": "70000"}, "PROMPTDEV_METRICS_PORT"),
    ({"PROMPTDEV_EVAL_BATCH": "0"}, "PROMPTDEV_EVAL_BATCH"),
    ({"PROMPTDEV_EVAL_BATCH": "7"}, "PROMPTDEV_EVAL_BATCH"),
    ({"PROMPTDEV_CONFIG": "/nonexistent/promptdev.toml"}, "PROMPTDEV_CONFIG"),
])
def test_invalid_settings_name_the_key(env, key):
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    assert str(info.value).startswith(key) and "\n" not in str(info.value)


def test_unknown_toml_key_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="colour"):
        load_settings(env={"PROMPTDEV_CONFIG": str(path)})


def test_api_key_is_not_in_repr():
    s = load_settings(env={"PROMPTDEV_OPENAI_API_KEY": "sk-secret"})
    assert s.openai_api_key == "sk-secret" and "sk-secret" not in repr(s)


def test_cli_reports_bad_setting_in_one_line(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "core.cli", "status"], capture_output=True, text=True,
                         env={"PROMPTDEV_N_CTX": "abc", "PATH": "/usr/bin"}, cwd=Path(__file__).parent.parent)
    assert out.returncode == 2
    assert out.stderr.strip() == "promptdev: configuration error: PROMPTDEV_N_CTX: expected a whole number, got 'abc'"


def test_readme_configuration_table_lists_every_setting():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    listed = set(re.findall(r"`(PROMPTDEV_[A-Z0-9_]+)`", table))
    missing = sorted(env_name(f.name) for f in fields(Settings) if env_name(f.name) not in listed)
    assert missing == []


def test_every_setting_has_help_text():
    assert all(f.metadata.get("help") for f in fields(Settings))


LIMITED = [(f.name, f.metadata) for f in fields(Settings) if {"min", "max", "positive"} & set(f.metadata)]


@pytest.mark.parametrize("key, meta", LIMITED, ids=[key for key, _ in LIMITED])
def test_limits_in_field_metadata_are_enforced(key, meta):
    env = env_name(key)
    edges = [meta[k] for k in ("min", "max") if k in meta]
    for value in edges:  # the limits themselves are accepted
        assert getattr(load_settings(env={env: str(value)}), key) == value
    beyond = [meta["min"] - 1] if "min" in meta else []
    beyond += [meta["max"] + 1] if "max" in meta else []
    beyond += [0] if meta.get("positive") else []
    for value in beyond:
        with pytest.raises(SettingsError) as info:
            load_settings(env={env: str(value)})
        assert str(info.value).startswith(env)
