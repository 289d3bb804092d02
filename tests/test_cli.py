"""The `promptdev` command: setup and status, with one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core import db

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
    assert f"external PostgreSQL" in out.stdout and f"{n} migrations applied" in out.stdout
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
