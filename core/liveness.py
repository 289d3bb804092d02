"""Who claimed a piece of work, whether that worker is still alive, and how its results reach the database.

A worker is named `host:pid:thread` (`worker_id`), recorded on what it claims. A process that claims work (submitted
executions, evaluation items) also holds a *liveness key* for each database it works on, for as long as it lives: a
number drawn once from the `worker_keys` sequence, held as the session-level advisory lock (LockKey.WORKER, key) on
a connection of its own — not a pooled one, which would go back to others, while the lock must live exactly as long
as the process. Claims record the key. PostgreSQL frees the lock the moment the process dies (its connection closes),
so a claim whose key is not locked (`holder_gone_sql`) belongs to a worker that is gone and is taken over at once;
leases remain only as a fallback for claims made without a key.

When the key's connection breaks while the process lives (the server restarted, an administrator ended the session),
a keeper thread notices within a second and takes the same key again. Meanwhile another worker may take over the
process's claims; the claims' fencing tokens make that harmless: the first result is dropped, never doubled.

Results of claimed work are written with `write`: on a fresh pooled connection (nothing is held while a model
generates), tried again with backoff when the connection breaks (`retrying`, which also serves the reads a worker
makes before it generates). A write that still fails (the database is away) is kept by `write_later` and tried again
on each turn of the worker (`flush_deferred`).

This module imports nothing of core's domain, so every module may import it.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from core.db import LockKey

log = logging.getLogger(__name__)

T = TypeVar("T")

CHECK_S = 1.0            # how often the keeper makes sure its key is held (at once when its connection wakes up)
WRITE_TRIES = 5          # tries of one write before it is given up (or deferred)
WRITE_BACKOFF_S = 0.2    # wait after the first failed try; doubled after each (0.2 + 0.4 + 0.8 + 1.6 = 3 s in all)
WRITE_CONNECT_S = 10.0   # longest wait for a pooled connection per try


def worker_id() -> str:
    """host:pid:thread, recorded on claimed work."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def holder_gone_sql(column: str) -> str:
    """SQL that is true when the worker whose liveness key is in `column` is gone (nobody holds the key's lock);
    false for a NULL key, whose claim only its lease ends."""
    return (f"({column} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' "
            f"AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            f"AND l.classid = {int(LockKey.WORKER)} AND l.objid::bigint = {column} AND l.objsubid = 2 "
            f"AND l.granted))")


class _Holder:
    """The liveness key of this process for one database: its lock, its connection and the thread keeping it."""

    def __init__(self, pool: ConnectionPool):
        self.pool = pool
        self.key: int | None = None
        self.conn: psycopg.Connection | None = None
        self.mutex = threading.Lock()
        self.stopped = threading.Event()
        self._broken_since: float | None = None
        if not self._connect():  # a fresh key is never locked by anyone else
            raise psycopg.OperationalError(f"liveness key {self.key} is held by another session")
        self.thread = threading.Thread(target=self._keep, name="promptdev-liveness", daemon=True)
        self.thread.start()

    def _connect(self) -> bool:
        """Open a connection and take the key's lock on it (drawing the key the first time); True when held. False
        when the previous session of this process still holds it (it has not ended yet): tried again later."""
        conn = psycopg.connect(self.pool.conninfo, autocommit=True, connect_timeout=5,
                               application_name="promptdev liveness")
        try:
            if self.key is None:
                self.key = conn.execute("SELECT nextval('worker_keys')").fetchone()[0]
            held = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (int(LockKey.WORKER), self.key)).fetchone()[0]
        except BaseException:
            conn.close()
            raise
        if not held:
            conn.close()
            return False
        old, self.conn = self.conn, conn
        if old is not None:
            old.close()
        return True

    def check(self) -> None:
        """Make sure the key's lock is held: a quick query, and on a broken connection a new one taking it again."""
        with self.mutex:
            if self.stopped.is_set():
                return
            try:
                if self.conn is not None and not self.conn.closed:
                    self.conn.execute("SELECT 1")
                    return
            except psycopg.Error:
                pass
            try:
                held = self._connect()
            except psycopg.Error as exc:
                held, reason = False, " ".join(str(exc).split())
            else:
                reason = "the previous session still holds it"
            if held:
                if self._broken_since is not None:
                    log.warning("liveness key %s held again after %.1f s", self.key,
                                time.monotonic() - self._broken_since)
                self._broken_since = None
            elif self._broken_since is None:
                self._broken_since = time.monotonic()
                log.warning("liveness key %s lost (its connection broke) and not yet taken again: %s", self.key, reason)

    def _keep(self) -> None:
        while not self.stopped.is_set() and not self.pool.closed:
            conn = self.conn
            try:
                fd = conn.fileno() if conn is not None and not conn.closed else None
            except psycopg.Error:
                fd = None
            if fd is None:
                self.stopped.wait(CHECK_S)
            else:
                try:  # anything the server sends an idle session (its termination) wakes the keeper at once
                    select.select([fd], [], [], CHECK_S)
                except (OSError, ValueError):  # closed meanwhile
                    self.stopped.wait(0.1)
            if self.stopped.is_set() or self.pool.closed:
                break
            self.check()
        self.release()
        with _holders_lock:  # a closed pool's holder is forgotten (with the pool)
            if _holders.get(id(self.pool)) is self:
                del _holders[id(self.pool)]

    def release(self) -> None:
        """Give up the key: its lock is freed with its connection."""
        with self.mutex:
            self.stopped.set()
            if self.conn is not None:
                self.conn.close()
                self.conn = None


_holders: dict[int, _Holder] = {}
_holders_lock = threading.Lock()


def key(pool: ConnectionPool) -> int | None:
    """This process's liveness key for the pool's database, taken on first use and held while the process lives;
    None when it cannot be taken now (claims made then rely on their lease)."""
    with _holders_lock:
        holder = _holders.get(id(pool))
        if holder is not None and holder.pool is pool and not holder.stopped.is_set():
            return holder.key
        if pool.closed:
            return None
        try:
            holder = _Holder(pool)
        except psycopg.Error as exc:
            log.warning("no liveness key (claims fall back on their lease): %s", " ".join(str(exc).split()))
            return None
        _holders[id(pool)] = holder
        return holder.key


def held_key(pool: ConnectionPool) -> int | None:
    """The liveness key this process holds for the pool's database, if it took one (none is taken here)."""
    with _holders_lock:
        holder = _holders.get(id(pool))
    return holder.key if holder is not None and holder.pool is pool and not holder.stopped.is_set() else None


def release(pool: ConnectionPool) -> None:
    """Give up this process's liveness key for the pool's database (its claims then look abandoned: hand them back
    first)."""
    with _holders_lock:
        holder = _holders.pop(id(pool), None)
    if holder is not None and holder.pool is pool:
        holder.release()


def retrying(fn: Callable[[], T], *, what: str, pool: ConnectionPool | None = None) -> T:
    """fn(), tried again with backoff (WRITE_TRIES in all) when the database connection breaks or the database is
    away (psycopg.OperationalError, raised after the last try, or at once once the pool is closed). fn must be safe
    to repeat: a try whose commit was lost with its connection may have been applied."""
    delay = WRITE_BACKOFF_S
    for attempt in range(1, WRITE_TRIES + 1):
        try:
            return fn()
        except psycopg.OperationalError as exc:
            if attempt == WRITE_TRIES or (pool is not None and pool.closed):
                raise
            log.warning("%s failed (%s); trying again in %.1f s", what, " ".join(str(exc).split()), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def write(pool: ConnectionPool, fn: Callable[[psycopg.Connection], T], *, what: str = "writing a result") -> T:
    """fn(conn) on a fresh pooled connection, tried again on another when it breaks (see `retrying`)."""
    def once() -> T:
        with pool.connection(timeout=WRITE_CONNECT_S) as conn:
            return fn(conn)

    return retrying(once, what=what, pool=pool)


_unanswered: set[str] = set()
_unanswered_lock = threading.Lock()


@contextmanager
def claiming(worker: str) -> Iterator[bool]:
    """Around a claim by a worker name: yields True when that worker's previous claim failed with its connection —
    its commit may have been applied, leaving claims nobody works on, so the claim should take back the ones still
    running under that name (a worker claims only once it is done with its previous claims)."""
    with _unanswered_lock:
        again = worker in _unanswered
    try:
        yield again
    except psycopg.OperationalError:
        with _unanswered_lock:
            _unanswered.add(worker)
        raise
    with _unanswered_lock:
        _unanswered.discard(worker)


_deferred: list[tuple[ConnectionPool, Callable[[psycopg.Connection], object], str]] = []
_deferred_lock = threading.Lock()


def write_later(pool: ConnectionPool, fn: Callable[[psycopg.Connection], object], *, what: str) -> bool:
    """`write` fn now, or when the database is away, keep it for `flush_deferred`; True when written now."""
    try:
        write(pool, fn, what=what)
        return True
    except psycopg.OperationalError as exc:
        if pool.closed:
            log.error("%s failed and is given up: the pool is closed (%s)", what, " ".join(str(exc).split()))
            return False
        log.error("%s failed (%s); it is tried again on the worker's next turn", what,
                  " ".join(str(exc).split()))
        with _deferred_lock:
            _deferred.append((pool, fn, what))
        return False


def deferred(pool: ConnectionPool) -> int:
    """How many writes to the pool's database wait to be tried again."""
    with _deferred_lock:
        return sum(1 for p, _, _ in _deferred if p is pool)


def flush_deferred(pool: ConnectionPool) -> int:
    """Try again the deferred writes to the pool's database, each once; how many are still waiting."""
    with _deferred_lock:
        mine = [d for d in _deferred if d[0] is pool]
        _deferred[:] = [d for d in _deferred if d[0] is not pool]
    left = []
    for entry in mine:
        _, fn, what = entry
        try:
            with pool.connection(timeout=WRITE_CONNECT_S) as conn:
                fn(conn)
            log.warning("%s: done after all", what)
        except psycopg.OperationalError:
            if not pool.closed:
                left.append(entry)
    if left:
        with _deferred_lock:
            _deferred[:0] = left
    return len(left)
