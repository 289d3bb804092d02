"""Conversations: what the chat flow costs on top of a bare ledger generation, and how fast the database side is.

Prints (1) per-turn time of send_message vs executions.start with the same rendered messages and parameters
(interleaved, medians, ratio), (2) the model-free flow (halted conversation → paused reply) in messages/s, one
thread and 8 threads, against a bare executions.record baseline, (3) trimming a history past the window, (4) the
flow overhead of an output redact rule (buffered reply, redacted ledger output).
Uses a scratch database on the test server under data/test/postgres. Run: .venv/bin/python bench/conversations.py
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import conversations, db, executions, guardrails, llm  # noqa: E402
from core.config import PROJECT_ROOT, Settings, load_settings  # noqa: E402
from core.executions import Origin  # noqa: E402
from core.model_files import ensure_default_model  # noqa: E402

ROUNDS = 8
PARAMS = {"max_tokens": 8, "temperature": 0.0, "seed": 5}


def main() -> None:
    server = db.embedded_url(PROJECT_ROOT / "data" / "test" / "postgres")
    name = f"bench_conv_{uuid.uuid4().hex[:8]}"
    db.create_database(server, name)
    url = db.with_database(server, name)
    try:
        base = load_settings()
        settings = replace(Settings(), database_url=url,
                           model_path=base.model_path or ensure_default_model(base.models_dir))
        pool = db.get_pool(settings)
        backend = llm.get_backend(settings)
        run(pool, backend, settings)
    finally:
        db.close_all_pools()
        db.drop_database(server, name)


def run(pool, backend, settings) -> None:
    # (1) a chat turn: wall time of send_message vs the generation inside it (the ledger's total_ms)
    conversations.send_message(pool, backend, settings, "warm", "hello", params=PARAMS)  # creates the template
    walls, gens = [], []
    for i in range(ROUNDS):
        started = time.perf_counter()
        reply = conversations.send_message(pool, backend, settings, f"u{i}", "Tell me about the sea.", params=PARAMS)
        walls.append(time.perf_counter() - started)
        gens.append(executions.get_execution(pool, reply.execution_id).total_ms / 1000)
    w, g = statistics.median(walls), statistics.median(gens)
    overhead = statistics.median(a - b for a, b in zip(walls, gens))
    print(f"chat turn (max_tokens={PARAMS['max_tokens']}): send_message {w * 1000:.1f} ms, generation inside it "
          f"{g * 1000:.1f} ms -> ratio {w / g:.3f}; flow overhead (store, guardrails, context, render, reply) "
          f"{overhead * 1000:.1f} ms")

    # (2) the model-free path: halted conversations answer "paused" (store, check, record, store)
    users = [f"h{i}" for i in range(8)]
    for u in users:
        conversations.send_message(pool, backend, settings, u, "hi", params=PARAMS)
        conversations.halt_conversation(pool, u, "bench", "bench")
    n = 200
    started = time.perf_counter()
    for i in range(n):
        conversations.send_message(pool, backend, settings, users[0], f"m{i}")
    seq_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(n):
        executions.record(pool, origin=Origin("bench"), status="blocked", messages=[{"role": "user", "content": "x"}])
    base_rate = n / (time.perf_counter() - started)

    def burst(u: str) -> None:
        for i in range(n // 8):
            conversations.send_message(pool, backend, settings, u, f"m{i}")

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(burst, users))
    par_rate = (n // 8) * 8 / (time.perf_counter() - started)
    print(f"paused path: {seq_rate:.0f} messages/s (1 thread), {par_rate:.0f} messages/s (8 threads, 8 users); "
          f"baseline bare executions.record {base_rate:.0f}/s -> ratio {seq_rate / base_rate:.2f}")

    # (3) long conversations at the window's edge: strict "as much as fits" (the start slides every turn, so the
    # model re-reads the whole prompt) vs our trimming with a stable start (the cached prefix is reused)
    budget, turns = 700, 4
    results = {}
    for mode in ("strict", "stable"):
        user = f"long-{mode}"
        conversations.send_message(pool, backend, settings, user, "hi", params=PARAMS)
        for i in range(80):
            conversations.inject_message(pool, user, f"note {i}: the weather was mild and the sea was calm", "bench")
        saved = conversations.TRIM_TO
        if mode == "strict":
            conversations.TRIM_TO = 1.0
        times = []
        try:
            for t in range(turns + 1):
                if mode == "strict":
                    conversations._start_hints._hints.clear()
                conversations.inject_message(pool, user, f"turn {t}: still calm", "bench")
                started = time.perf_counter()
                reply = conversations.send_message(pool, backend, settings, user, "and?",
                                                   params={**PARAMS, "max_tokens": 1}, context_budget=budget)
                if t:  # the first turn is cold for both
                    times.append(time.perf_counter() - started)
        finally:
            conversations.TRIM_TO = saved
        results[mode] = statistics.median(times)
        print(f"history past the window ({budget}-token budget), {mode} trimming: "
              f"{results[mode] * 1000:.0f} ms per turn (median of {turns}, 1 token), {reply.context_messages} kept")
    print(f"stable-start trimming vs strict: ratio {results['stable'] / results['strict']:.2f} "
          f"({results['strict'] / results['stable']:.1f}x faster)")

    # (4) an output redact rule: the reply is checked before it is sent and the ledger keeps the redacted text
    def overhead(tag: str) -> float:
        extra = []
        for i in range(ROUNDS):
            started = time.perf_counter()
            reply = conversations.send_message(pool, backend, settings, f"{tag}{i}", "Write an e-mail address.",
                                               params=PARAMS)
            extra.append(time.perf_counter() - started
                         - executions.get_execution(pool, reply.execution_id).total_ms / 1000)
        return statistics.median(extra)

    plain = overhead("plain")
    guardrails.create_rule(pool, "bench emails", "email", direction="output", action="redact")
    redacting = overhead("redact")
    print(f"output redact rule: flow overhead {redacting * 1000:.1f} ms per turn vs {plain * 1000:.1f} ms without "
          f"(reply checked before sending, ledger output redacted)")


if __name__ == "__main__":
    main()
