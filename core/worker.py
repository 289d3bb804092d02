"""Background worker: polls the database for queued work (submitted executions, evaluation items) and runs it.

Domain modules register a *task source*: a function `(pool, settings) -> bool` that claims and runs at most one
unit of work (with `FOR UPDATE SKIP LOCKED`, so any number of workers on any number of machines can share the
database) and returns True when it did something. The worker loops over the sources; it sleeps briefly when none
had work.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from psycopg_pool import ConnectionPool, PoolClosed

from core.config import Settings

log = logging.getLogger(__name__)

TaskSource = Callable[[ConnectionPool, Settings], bool]
_sources: dict[str, TaskSource] = {}
# Modules whose import registers task sources; missing ones are skipped.
SOURCE_MODULES = ("core.executions", "core.evaluations", "core.conversations")


def register_source(name: str, source: TaskSource) -> None:
    """Register (or replace) a named task source."""
    _sources[name] = source


def worker_id() -> str:
    """host:pid:thread, recorded on claimed work."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _load_sources() -> dict[str, TaskSource]:
    from core import import_optional

    import_optional(SOURCE_MODULES)
    return dict(_sources)


def run_once(pool: ConnectionPool, settings: Settings) -> bool:
    """Give every source one chance to run a unit of work; True when any did."""
    did = False
    for name, source in _load_sources().items():
        try:
            did = source(pool, settings) or did
        except PoolClosed:
            raise
        except Exception:  # one bad unit must not kill the worker; the source records its own failure
            log.exception("task source %s failed", name)
    return did


def run_until(pool: ConnectionPool, settings: Settings, stop: threading.Event, idle_s: float = 0.5) -> None:
    """Work until stop is set, sleeping idle_s when there is nothing to do."""
    while not stop.is_set():
        try:
            busy = run_once(pool, settings)
        except PoolClosed:  # the process is shutting down (or a test dropped its database): stop quietly
            return
        except Exception:
            log.exception("worker loop failed; retrying")
            busy = False
        if not busy:
            stop.wait(idle_s)


def start_thread(pool: ConnectionPool, settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """Start a daemon worker thread in this process; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=run_until, args=(pool, settings, stop), name="promptdev-worker", daemon=True)
    thread.start()
    return thread, stop


def run_forever(settings: Settings, concurrency: int = 1, quiet: bool = False) -> None:
    """The `promptdev worker` command: run worker threads until interrupted."""
    from core import db

    pool = db.get_pool(settings)
    if not quiet:
        print(f"worker {worker_id()} started with {concurrency} thread(s); Ctrl-C stops it", flush=True)
    threads = [start_thread(pool, settings) for _ in range(max(1, concurrency))]
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for _, stop in threads:
            stop.set()
        for thread, _ in threads:
            thread.join(timeout=30)
