"""Background worker: polls the database for queued work and runs it.

What it runs is `sources()`: one *task source* per kind of work, a function `(pool, settings) -> bool` that claims
and runs at most one unit of it (with `FOR UPDATE SKIP LOCKED`, so any number of workers on any number of machines
can share the database) and returns True when it did something. The worker gives each source a turn, in that order,
and sleeps briefly when none had work.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from psycopg_pool import ConnectionPool, PoolClosed

from core import db
from core.config import Settings

log = logging.getLogger(__name__)

TaskSource = Callable[[ConnectionPool, Settings], bool]


def sources() -> dict[str, TaskSource]:
    """Everything the worker runs, in the order each source gets its turn."""
    # Imported here, not at the top: each of these modules imports this one at its top (worker_id, register_source).
    from core import conversations, evaluations, executions

    return {
        "executions": executions.run_next_queued,  # submitted executions (submit_execution, promptdev run --submit)
        "evaluations": evaluations.run_next,  # evaluation items, PROMPTDEV_EVAL_BATCH at a time
        "conversations.retention": conversations._retention_source,  # PROMPTDEV_RETENTION_DAYS purge, hourly
    }


# What the source modules announce with register_source when imported. Nothing runs from it: sources() is the list.
_sources: dict[str, TaskSource] = {}


def register_source(name: str, source: TaskSource) -> None:
    """Kept for the source modules, which still announce their source when imported; the worker runs sources()."""
    _sources[name] = source


def worker_id() -> str:
    """host:pid:thread, recorded on claimed work."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def run_once(pool: ConnectionPool, settings: Settings) -> bool:
    """Give every source one chance to run a unit of work; True when any did."""
    did = False
    for name, source in sources().items():
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
