"""Workers surviving faults, on real processes and a real PostgreSQL: a database connection broken mid-generation,
a result that cannot be written, SIGTERM (graceful stop within the grace period), kill -9 (claims taken over in
seconds through the liveness lock), the app's worker thread at interpreter exit. In each: nothing lost, nothing
doubled. The figures (reclaim time, exit times) are printed: run with -s to see them."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest

from core import datasets, evaluations, executions, liveness, models, templates, worker
from core.config import PROJECT_ROOT
from core.db import LockKey

STORY = [{"role": "system", "content": "You are a storyteller who never stops early."},
         {"role": "user", "content": "Tell a long, detailed story about {{ topic }}."}]
TOPICS = ["a lighthouse keeper", "a lost violin", "a desert train", "a clockmaker", "a river otter", "a glass city"]


def figure(name: str, value: object) -> None:
    print(f"\nFIGURE {name}: {value}", flush=True)


def story(pool, max_tokens: int):
    return templates.create_template(pool, "story", STORY, params={"max_tokens": max_tokens, "temperature": 0.0})


def story_run(pool, settings, n: int, max_tokens: int | None):
    """A run of the story template (created with max_tokens, unless None: it exists) over n topics."""
    if max_tokens is not None:
        story(pool, max_tokens)
    datasets.add_items(pool, "topics", [{"input": {"topic": t}, "expected": "the"} for t in TOPICS[:n]], create=True)
    return evaluations.create_run(pool, settings, dataset="topics", templates=["story"], evaluators=["contains: the"])


def one(pool, sql: str, *args):
    with pool.connection() as conn:
        row = conn.execute(sql, args).fetchone()
    return row[0] if row is not None else None


def wait(predicate, timeout: float = 120.0, every: float = 0.02, proc: subprocess.Popen | None = None) -> float:
    """Wait until predicate() is true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(every)
    raise AssertionError("timed out")


def terminate_other_backends(database_url: str) -> int:
    """pg_terminate_backend of every client session of the test database but this one: the pool's, the worker's,
    the liveness lock's (the server's own processes, such as an autovacuum worker, are not ours to end)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                            "AND backend_type = 'client backend' AND usename = current_user").fetchone()[0]


def item_states(pool, run_id: int) -> list[tuple]:
    with pool.connection() as conn:
        return conn.execute("SELECT w.id, w.status, w.attempts, w.claimed_by, (SELECT count(*) FROM eval_results e "
                            "WHERE e.work_item_id = w.id) FROM eval_work_items w WHERE w.run_id = %s ORDER BY w.id",
                            (run_id,)).fetchall()


def assert_each_result_once(pool, run_id: int, n: int) -> None:
    """Every item done with exactly one result (0 lost, 0 doubled), and no error."""
    states = item_states(pool, run_id)
    assert [(s[1], s[4]) for s in states] == [("done", 1)] * n, states
    assert one(pool, "SELECT count(*) FROM eval_results WHERE run_id = %s AND error IS NULL", run_id) == n


def ledger_rows(pool, run_id: int) -> int:
    return one(pool, "SELECT count(*) FROM executions WHERE source = 'evaluation' "
                     "AND variables ? 'topic' AND created_at >= (SELECT created_at FROM eval_runs WHERE id = %s)",
               run_id)


class WorkerProcess:
    """A real `promptdev worker` subprocess on the test's database."""

    def __init__(self, settings, **env: str):
        self.env = {**os.environ, "PROMPTDEV_DATABASE_URL": settings.database_url,
                    "PROMPTDEV_DATA_DIR": str(settings.data_dir), "PROMPTDEV_MODEL_PATH": str(settings.model_path),
                    **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "core.cli", "worker"], cwd=PROJECT_ROOT, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.tag = f":{self.proc.pid}:"   # in the worker name (host:pid:thread) of its claims
        self.lines: list[str] = []

    def wait_for_line(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            ready = select.select([self.proc.stdout], [], [], 0.2)[0]
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    self.lines.append(line)
            if self.proc.poll() is not None and not ready:
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
        raise AssertionError(f"no line with {text!r}: {self.lines}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> tuple[int, float]:
        """Send sig and wait for the exit: (exit code, seconds to exit)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def output(self) -> str:
        out, err = self.proc.communicate(timeout=10)
        return "".join(self.lines) + out + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes():
    started: list[WorkerProcess] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def worker_thread(pool, settings):
    """Start one in-process worker thread (call it), stopped at the end."""
    threads = []

    def start():
        threads.append(worker.start_thread(pool, settings))

    yield start
    for _, stop in threads:
        stop.set()
    for thread, _ in threads:
        thread.join(60)


# ---- writes that survive a broken connection ----------------------------------------------------------------------

def test_a_write_is_tried_again_on_a_fresh_connection_when_its_connection_breaks(pool):
    backends = []

    def write(conn):
        backends.append(conn.info.backend_pid)
        if len(backends) == 1:
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")   # the connection breaks mid-write
        return conn.execute("SELECT 42").fetchone()[0]

    assert liveness.write(pool, write) == 42
    assert len(backends) == 2 and backends[0] != backends[1]


def test_the_liveness_key_is_held_and_taken_again_when_its_connection_breaks(pool, database_url):
    key = liveness.key(pool)
    assert key is not None and liveness.key(pool) == key == liveness.held_key(pool)
    gone = f"SELECT {liveness.holder_gone_sql('%s::integer')}"
    with pool.connection() as conn:
        free_key = conn.execute("SELECT nextval('worker_keys')").fetchone()[0]
        assert conn.execute(gone.replace("%s", "%(k)s"), {"k": key}).fetchone()[0] is False
        assert conn.execute(gone.replace("%s", "%(k)s"), {"k": free_key}).fetchone()[0] is True
    holder = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND objsubid = 2 "
              "AND granted")
    first = one(pool, holder, int(LockKey.WORKER), key)
    assert terminate_other_backends(database_url) >= 1
    # Gone for a moment; the keeper takes the same key again, on a new session, within a second or so.
    took = wait(lambda: one(pool, holder, int(LockKey.WORKER), key) not in (None, first), timeout=10)
    figure("liveness key held again after its connection was terminated (s)", f"{took:.2f}")
    assert liveness.key(pool) == key


def test_a_connection_broken_mid_generation_loses_and_doubles_nothing(pool, settings, backend, database_url,
                                                                      worker_thread):
    """The worker holds no connection while it generates: terminating every session of the database (the pool's,
    the liveness lock's) mid-generation changes nothing; each result is written once, on a fresh connection."""
    models.ensure_default_model_registered(pool, settings)
    story(pool, max_tokens=24)
    eid = executions.submit_execution(pool, "story", {"topic": "a broken wire"}, params={"seed": 3})
    run = story_run(pool, settings, n=3, max_tokens=None)
    worker_thread()
    wait(lambda: executions.get_execution(pool, eid).status == "running")
    killed = [terminate_other_backends(database_url)]
    done = executions.wait_for_execution(pool, eid, timeout=180)
    wait(lambda: one(pool, "SELECT count(*) FROM eval_work_items WHERE run_id = %s AND status = 'running'",
                     run.id) > 0, timeout=120)
    killed.append(terminate_other_backends(database_url))
    wait(lambda: evaluations.progress(pool, run.id).status == "done", timeout=240)
    assert done.status == "ok" and done.attempts == 1 and done.output and done.worker_key is None
    same, _ = executions.execute(pool, backend, "story", {"topic": "a broken wire"}, params={"seed": 3})
    assert done.output == same   # the finished output was stored, not lost or cut
    assert one(pool, "SELECT count(*) FROM executions WHERE variables->>'topic' = 'a broken wire'") == 2  # + `same`
    assert_each_result_once(pool, run.id, 3)
    assert [s[2] for s in item_states(pool, run.id)] == [1, 1, 1]   # none had to be tried again
    assert ledger_rows(pool, run.id) == 3
    figure("sessions terminated mid-execution, mid-evaluation", killed)
    figure("broken connection: lost / doubled (execution, evaluation items)", "0 / 0, 0 / 0")


def test_an_item_whose_result_cannot_be_written_goes_back_to_the_queue_and_is_run_again(
        pool, settings, database_url, worker_thread):
    """A result write that keeps failing (lock_timeout on a row another session holds: a real OperationalError)
    is tried again, then the item is handed back, its attempt counted; the next claim writes it once."""
    run = story_run(pool, settings, n=1, max_tokens=32)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET lock_timeout = '200ms'")
    terminate_other_backends(database_url)   # the pool's sessions start again with the setting
    blocker = psycopg.connect(database_url)
    try:
        worker_thread()
        wait(lambda: evaluations.progress(pool, run.id).status == "running" and
             one(pool, "SELECT count(*) FROM eval_work_items WHERE run_id = %s AND status = 'running'", run.id))
        blocker.execute("SELECT 1 FROM eval_runs WHERE id = %s FOR UPDATE", (run.id,))   # _finish needs this lock
        handed_back = wait(lambda: one(pool, "SELECT attempts > 1 OR status = 'queued' FROM eval_work_items "
                                             "WHERE run_id = %s", run.id), timeout=120)
        blocker.rollback()
    finally:
        blocker.close()
    wait(lambda: evaluations.progress(pool, run.id).status == "done", timeout=120)
    assert_each_result_once(pool, run.id, 1)
    assert [s[2] for s in item_states(pool, run.id)] == [2]   # handed back once (counted), then written
    assert ledger_rows(pool, run.id) == 2   # generated twice, each generation in the ledger once
    figure("unwritable result: handed back after (s)", f"{handed_back:.1f}")


# ---- SIGTERM: graceful stop -------------------------------------------------------------------------------------

def test_sigterm_mid_execution_lets_it_finish_and_exits_0(pool, settings, processes):
    models.ensure_default_model_registered(pool, settings)
    story(pool, max_tokens=24)
    eid = executions.submit_execution(pool, "story", {"topic": "a quiet harbour"}, params={"seed": 5})
    w = WorkerProcess(settings)
    processes.append(w)
    wait(lambda: w.tag in (executions.get_execution(pool, eid).worker or ""), proc=w.proc)
    code, took = w.stop(signal.SIGTERM)
    out = w.output()
    row = executions.get_execution(pool, eid)
    assert code == 0, out
    assert (row.status, row.attempts, row.worker_key) == ("ok", 1, None) and row.output, out   # finished in grace
    assert "stopped in" in out and "0 unit(s) handed back" in out
    assert one(pool, "SELECT count(*) FROM executions") == 1
    figure("SIGTERM mid-execution (grace 30 s): exit code, seconds to exit", (code, round(took, 2)))


def test_sigterm_mid_evaluation_batch_hands_it_back_after_the_grace_period_and_another_worker_finishes_it(
        pool, settings, processes, worker_thread):
    run = story_run(pool, settings, n=4, max_tokens=48)
    w = WorkerProcess(settings, PROMPTDEV_EVAL_BATCH="4", PROMPTDEV_WORKER_GRACE_SECONDS="1")
    processes.append(w)
    wait(lambda: sum(w.tag in (s[3] or "") for s in item_states(pool, run.id)) == 4, proc=w.proc)
    code, took = w.stop(signal.SIGTERM)
    out = w.output()
    assert code == 0, out
    states = item_states(pool, run.id)
    assert all(s[1] in ("done", "queued") for s in states), states   # never left running
    back = [s for s in states if s[1] == "queued"]
    assert back and all(s[2] == 0 and s[3] is None for s in back), states   # the attempt is not counted
    assert f"{len(back)} unit(s) handed back" in out
    assert took < 15, out
    figure("SIGTERM mid-evaluation batch (grace 1 s): exit code, seconds to exit, items handed back",
           (code, round(took, 2), len(back)))
    worker_thread()   # a second worker finishes them
    wait(lambda: evaluations.progress(pool, run.id).status == "done", timeout=300)
    assert_each_result_once(pool, run.id, 4)
    assert all(s[2] == 1 for s in item_states(pool, run.id) if s[0] in {b[0] for b in back})


def test_the_apps_worker_thread_finishes_its_work_when_the_interpreter_exits(pool, settings):
    models.ensure_default_model_registered(pool, settings)
    story(pool, max_tokens=24)
    eid = executions.submit_execution(pool, "story", {"topic": "a paper boat"}, params={"seed": 9})
    script = textwrap.dedent(f"""
        import time
        from core import db, executions, worker
        from core.config import load_settings
        settings = load_settings()
        pool = db.get_pool(settings)
        worker.start_thread(pool, settings)
        while executions.get_execution(pool, {eid}).status == "queued":
            time.sleep(0.02)
        print("claimed", flush=True)
        """)   # the main thread ends here, mid-generation: the interpreter exits
    env = {**os.environ, "PROMPTDEV_DATABASE_URL": settings.database_url,
           "PROMPTDEV_DATA_DIR": str(settings.data_dir), "PROMPTDEV_MODEL_PATH": str(settings.model_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "claimed" in done.stdout, done.stderr
    row = executions.get_execution(pool, eid)
    assert (row.status, row.attempts) == ("ok", 1) and row.output, done.stderr


# ---- kill -9: claims taken over in seconds ------------------------------------------------------------------------

def test_a_killed_workers_claims_are_taken_over_in_seconds(pool, settings, processes):
    run = story_run(pool, settings, n=2, max_tokens=32)
    evaluations.cancel_run(pool, run.id)   # nobody claims it until both workers are up
    pair = [WorkerProcess(settings), WorkerProcess(settings)]
    processes.extend(pair)
    for w in pair:
        w.wait_for_line("started")
    evaluations.resume_run(pool, run.id)
    wait(lambda: [s[1] for s in item_states(pool, run.id)] == ["running", "running"])
    first = next(w for w in pair if w.tag in item_states(pool, run.id)[0][3])
    second = next(w for w in pair if w is not first)
    held = [s for s in item_states(pool, run.id) if first.tag in s[3]]
    killed_at = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(30)
    wait(lambda: any(second.tag in (s[3] or "") for s in item_states(pool, run.id) if s[0] == held[0][0]),
         timeout=60, every=0.01)
    reclaim_s = time.monotonic() - killed_at
    figure("kill -9: seconds until another worker took over a claim", f"{reclaim_s:.2f}")
    assert reclaim_s < 10
    wait(lambda: evaluations.progress(pool, run.id).status == "done", timeout=300, proc=second.proc)
    assert_each_result_once(pool, run.id, 2)
    states = {s[0]: s for s in item_states(pool, run.id)}
    assert all(states[s[0]][2] == 2 and second.tag in states[s[0]][3] for s in held)   # taken over, counted once
    code, took = second.stop(signal.SIGTERM)
    assert code == 0
    figure("kill -9: lost / doubled", "0 / 0")
    figure("SIGTERM of an idle worker: exit code, seconds to exit", (code, round(took, 2)))


def test_stopping_with_nothing_in_flight_hands_nothing_back_and_gives_up_the_liveness_key(pool):
    key = liveness.key(pool)
    thread = threading.Thread(target=lambda: None)
    thread.start()
    assert worker.stop_threads([(thread, threading.Event())], [pool], grace_s=1) == (0, 0)
    assert liveness.held_key(pool) is None and liveness.key(pool) != key
