"""Shared fixtures: a real embedded PostgreSQL, a migrated template database cloned per test, the real model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from core import db
from core.config import PROJECT_ROOT, Settings, load_settings
from core.model_files import ensure_default_model
from tests import signin

TEST_DATA_DIR = PROJECT_ROOT / "data" / "test"
TEMPLATE_DB = "promptdev_test_template"
TEST_ROLE = "promptdev_test_app"  # like the app's role: no superuser; owns the template and each test's database
APP_PATH = str(PROJECT_ROOT / "app.py")  # for AppTest.from_file(APP_PATH)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the maintenance database of a real embedded PostgreSQL kept under data/test/postgres."""
    external = os.environ.get("PROMPTDEV_TEST_DATABASE_URL")
    if external:
        return external
    TEST_DATA_DIR.mkdir(parents=True, exist_ok=True)
    return db.embedded_url(TEST_DATA_DIR / "postgres")


@pytest.fixture(scope="session")
def unprivileged_role(pg_server_url: str) -> str | None:
    """The unprivileged role tests connect as (TEST_ROLE, made by the server's superuser), or None when the server
    URL is no superuser's (an external test server): then its own role."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
            return None
        db.ensure_app_role(conn, TEST_ROLE)
    return TEST_ROLE


@pytest.fixture(scope="session")
def template_db(pg_server_url: str, unprivileged_role: str | None) -> str:
    """A freshly migrated database that each test's database is cloned from, migrated by (and owned by) the
    unprivileged test role, as the app's database is."""
    name = f"{TEMPLATE_DB}_{os.getpid()}"
    db.drop_database(pg_server_url, name)
    db.create_database(pg_server_url, name, owner=unprivileged_role)
    url = db.with_database(pg_server_url, name)
    with psycopg.connect(db.with_role(url, unprivileged_role) if unprivileged_role else url, autocommit=True) as conn:
        db.migrate(conn)
    yield name
    db.drop_database(pg_server_url, name)


@pytest.fixture
def database_url(pg_server_url: str, template_db: str, unprivileged_role: str | None) -> str:
    """URL of a fresh database cloned from the migrated template, dropped after the test; it connects as the
    unprivileged test role, which owns it and everything in it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    db.create_database(pg_server_url, name, template=template_db, owner=unprivileged_role)
    url = db.with_database(pg_server_url, name)
    if unprivileged_role:
        url = db.with_role(url, unprivileged_role)
    yield url
    db.close_pool(url)
    db.drop_database(pg_server_url, name)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The assembled default model (Gemma 3 270M), assembled on first use."""
    return ensure_default_model(load_settings(env={}).models_dir)


@pytest.fixture
def settings(database_url: str, default_model_path: Path, tmp_path: Path) -> Settings:
    """Settings for one test: its own database and data directory, the default model."""
    return replace(Settings(), data_dir=tmp_path / "data", database_url=database_url, model_path=default_model_path)


@pytest.fixture
def pool(settings: Settings):
    """The process pool for this test's database (migrated)."""
    return db.get_pool(settings)


@pytest.fixture(scope="session")
def backend(default_model_path: Path):
    """The in-process llama.cpp backend on the default model, loaded once for the session."""
    from core import llm

    return llm.get_backend(replace(Settings(), model_path=default_model_path))


def stop_app_workers(only_orphaned: bool) -> None:
    """Stop the worker threads the app starts (glue.start_worker), or only those whose pool is already closed."""
    for thread in threading.enumerate():
        args = getattr(thread, "_args", ())
        if thread.name == "promptdev-worker" and len(args) == 3 and isinstance(args[2], threading.Event):
            if not only_orphaned or getattr(args[0], "closed", False):
                args[2].set()
                thread.join(10)


@pytest.fixture
def deep_link_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Environment for AppTest as a server's first visitor sees it (Streamlit's pages/ folder mode still on).

    The app starts a background worker per database. One left polling the closed pool of an earlier test's database
    logs tracebacks, and formatting them (traceback carets call ast.parse) races Streamlit's ast.parse of the page on
    CPython 3.11 ("AST constructor recursion depth mismatch"): such workers are stopped before the test, and this
    test's worker before its database goes.

    The browser is signed in as the user `tester` (tests/signin.py; `signin.sign_in_as(NAME)` switches).
    """
    monkeypatch.setenv("PROMPTDEV_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PROMPTDEV_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("PROMPTDEV_MODEL_PATH", str(settings.model_path))
    signin.install(monkeypatch, settings)
    signin.sign_in_as(signin.DEFAULT_USER)
    stop_app_workers(only_orphaned=True)
    yield settings
    stop_app_workers(only_orphaned=False)


@pytest.fixture
def app_env(deep_link_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Environment for AppTest: the app reads its settings from PROMPTDEV_* variables, and every run goes through
    app.py's st.navigation, as in production (pages/routing.py says why that needs help)."""
    from pages import routing

    routing.stay_in_navigation_mode(monkeypatch)
    return deep_link_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A real `python -m llama_cpp.server` on 127.0.0.1 serving the default model."""

    def __init__(self, model_path: Path, port: int):
        self.model_path, self.port = model_path, port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        """Start the server and wait until it answers."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "2048", "--model_alias", "gemma-3-270m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("llama_cpp.server exited at start")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("llama_cpp.server did not answer in time")

    def stop(self) -> None:
        """Stop the server."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def llama_server(default_model_path: Path):
    """A real OpenAI-compatible llama.cpp server on loopback, for the session."""
    server = LlamaServer(default_model_path, free_port())
    server.start()
    yield server
    server.stop()


MODEL_FIXTURES = {"backend", "llama_server"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that loads or serves the real model `model`, so `-m "not model"` runs the rest quickly."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
