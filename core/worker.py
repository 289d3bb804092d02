"""Background worker: polls the database for queued work, runs it, and stops without losing any.

What it runs is SOURCES: one *task source* per kind of work, a function `(pool, settings) -> bool` that claims
and runs at most one unit of it (with `FOR UPDATE SKIP LOCKED`, so any number of workers on any number of machines
can share the database) and returns True when it did something. The worker gives each source a turn, in that order,
and sleeps briefly when none had work.

Faults lose nothing and double nothing (core.liveness says how claims survive them):

- a broken database connection: no connection is held while a model generates; a result is written on a fresh one,
  tried again, and a unit whose result cannot be written goes back to the queue;
- a killed worker: its process's liveness lock is freed with it, so other workers take its claims over at once;
- stopping: on SIGTERM or SIGINT `promptdev worker` stops claiming, lets what is in flight finish for up to
  PROMPTDEV_WORKER_GRACE_SECONDS, hands the rest back to the queue (HAND_BACK; the attempt is not counted), gives up
  its liveness key and exits 0. A second signal ends the grace period at once. The worker threads of another process
  (the app's) do the same when its interpreter exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from psycopg_pool import ConnectionPool, PoolClosed

from core import conversations, db, evaluations, executions, liveness
from core.config import Settings

log = logging.getLogger(__name__)

TaskSource = Callable[[ConnectionPool, Settings], bool]

# Everything the worker runs, in the order each source gets its turn.
SOURCES: dict[str, TaskSource] = {
    "executions": executions.run_next_queued,  # submitted executions (submit_execution, promptdev run --submit)
    "evaluations": evaluations.run_next,  # evaluation items, PROMPTDEV_EVAL_BATCH at a time
    "conversations.retention": conversations.run_retention,  # PROMPTDEV_RETENTION_DAYS purge, hourly
}

# What a stopping worker process hands back to the queue: (pool, its liveness key) -> how many claims went back.
HAND_BACK: dict[str, Callable[[ConnectionPool, int], int]] = {
    "executions": executions.hand_back,
    "evaluations": evaluations.hand_back,
}


def run_once(pool: ConnectionPool, settings: Settings, stop: threading.Event | None = None) -> bool:
    """Give every source one chance to run a unit of work (none once stop is set); True when any did. Writes that
    failed earlier because the database was away are tried again first."""
    if liveness.deferred(pool):
        liveness.flush_deferred(pool)
    did = False
    for name, source in SOURCES.items():
        if stop is not None and stop.is_set():
            break
        try:
            did = source(pool, settings) or did
        except PoolClosed:
            raise
        except Exception:  # one bad unit must not kill the worker; the source records its own failure
            log.exception("task source %s failed", name)
    return did


def run_until(pool: ConnectionPool, settings: Settings, stop: threading.Event, idle_s: float = 0.5) -> None:
    """Work until stop is set, sleeping idle_s when there is nothing to do; a unit in flight when stop is set is
    finished first."""
    while not stop.is_set():
        try:
            busy = run_once(pool, settings, stop)
        except PoolClosed:  # the process is shutting down (or a test dropped its database): stop quietly
            return
        except Exception:
            log.exception("worker loop failed; retrying")
            busy = False
        if not busy:
            stop.wait(idle_s)


@dataclass
class _Started:
    thread: threading.Thread
    stop: threading.Event
    pool: ConnectionPool
    settings: Settings


_started: list[_Started] = []
_started_lock = threading.Lock()
_atexit_registered = False


def start_thread(pool: ConnectionPool, settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """Start a daemon worker thread in this process; set the returned event to stop it. When the interpreter exits,
    the threads still running stop as `promptdev worker` does (see the module)."""
    global _atexit_registered
    stop = threading.Event()
    thread = threading.Thread(target=run_until, args=(pool, settings, stop), name="promptdev-worker", daemon=True)
    with _started_lock:
        _started[:] = [s for s in _started if s.thread.is_alive()]
        _started.append(_Started(thread, stop, pool, settings))
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
    thread.start()
    return thread, stop


def stop_threads(threads: list[tuple[threading.Thread, threading.Event]], pools: list[ConnectionPool],
                 grace_s: float, hurry: threading.Event | None = None) -> tuple[int, int]:
    """Stop worker threads: no more claims; what they are running may finish for up to grace_s (until hurry is
    set); what this process still has running on the pools' databases then goes back to the queue, its attempt not
    counted, and the process's liveness keys are given up. Returns (threads still busy, units handed back)."""
    for _, stop in threads:
        stop.set()
    deadline = time.monotonic() + grace_s
    for thread, _ in threads:
        while thread.is_alive() and time.monotonic() < deadline and not (hurry is not None and hurry.is_set()):
            thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
    busy = sum(1 for thread, _ in threads if thread.is_alive())
    handed_back = 0
    for pool in {id(p): p for p in pools}.values():
        if pool.closed:
            continue
        liveness.flush_deferred(pool)
        key = liveness.held_key(pool)
        if key is None:
            continue
        for name, hand_back in HAND_BACK.items():
            try:
                handed_back += hand_back(pool, key)
            except Exception:  # the database is away: the claims are taken over once the key's lock is free
                log.exception("could not hand back unfinished %s", name)
        liveness.release(pool)
    return busy, handed_back


def _stop_at_exit() -> None:
    with _started_lock:
        running = [s for s in _started if s.thread.is_alive()]
        _started.clear()
    if not running:
        return
    grace_s = max(s.settings.worker_grace_seconds for s in running)
    busy, handed_back = stop_threads([(s.thread, s.stop) for s in running], [s.pool for s in running], grace_s)
    if busy or handed_back:
        log.warning("worker threads stopped at exit: %s still busy, %s unit(s) handed back to the queue", busy,
                    handed_back)


def run_forever(settings: Settings, concurrency: int = 1, quiet: bool = False) -> int:
    """The `promptdev worker` command: run worker threads until SIGTERM or SIGINT, then stop as the module says.
    Returns how many threads are still busy after the grace period (their work was handed back; the caller exits
    without waiting for them)."""
    pool = db.get_pool(settings)
    stopping, hurry = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stopping.is_set():
            hurry.set()  # a second signal: hand back at once
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    console = _console()
    try:
        liveness.key(pool)  # held from the start: every claim records it
        me = liveness.worker_id().rsplit(":", 1)[0]  # host:pid
        if not quiet:
            print(f"worker {me} started with {concurrency} thread(s); Ctrl-C or SIGTERM stops it", file=console,
                  flush=True)
        threads = [start_thread(pool, settings) for _ in range(max(1, concurrency))]
        while not stopping.wait(0.5):
            pass
        started = time.monotonic()
        grace_s = settings.worker_grace_seconds
        if not quiet:
            print(f"worker {me} stopping: work in flight may finish for up to {grace_s:g} s", file=console, flush=True)
        busy, handed_back = stop_threads(threads, [pool], grace_s, hurry)
        if not quiet:
            print(f"worker {me} stopped in {time.monotonic() - started:.1f} s; {handed_back} unit(s) handed back "
                  f"to the queue", file=console, flush=True)
        return busy
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if console is not sys.stdout:
            console.close()


def _console() -> TextIO:
    """Where the worker says what it does: a copy of stdout's file descriptor, which llama.cpp's model loading does
    not silence (it points descriptors 1 and 2 at /dev/null while it loads); stdout itself when it has none."""
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # not a file (a caller captures it)
        return sys.stdout
