"""Ledger recording overhead: what writing one execution to the ledger costs, on the embedded PostgreSQL.

Prints p50/p95/p99 milliseconds of
  * a bare round trip (SELECT 1) on a pooled connection — the floor any write pays,
  * `executions.record()` as every generation calls it (one INSERT with JSON params, variables, messages, output,
    the model identified by the real backend, its registry id looked up in the same statement),
and, on real short generations, the ledger's share of the wall time (target: recording <= 2 ms p95).
Run: .venv/bin/python bench/ledger.py [--records 2000] [--generations 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from core import db, executions, models  # noqa: E402
from core.config import PROJECT_ROOT, load_settings  # noqa: E402
from core.executions import Origin  # noqa: E402
from core.llm import GenerationParams, LlamaBackend, Usage  # noqa: E402
from core.model_files import ensure_default_model  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are a support assistant for an online bookshop. Be brief and kind."},
            {"role": "user", "content": "Where is my order 48213? It was due on Monday and I need it for a gift."}]
OUTPUT = ("I'm sorry your order is late. Order 48213 left our warehouse on Friday and is with the courier; "
          "the tracking shows delivery tomorrow before noon. ") * 3


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 of samples (milliseconds)."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return pick(0.50), pick(0.95), pick(0.99)


def line(label: str, samples: list[float]) -> str:
    p50, p95, p99 = percentiles(samples)
    return f"{label:<34} p50 {p50:6.3f} ms   p95 {p95:6.3f} ms   p99 {p99:6.3f} ms   (n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--generations", type=int, default=20)
    args = parser.parse_args()
    settings = load_settings()
    path = settings.model_path or ensure_default_model(settings.models_dir)
    backend = LlamaBackend(path, n_ctx=2048, n_threads=settings.n_threads, n_batch=settings.n_batch)
    server = db.embedded_url(PROJECT_ROOT / "data" / "bench" / "postgres")
    name = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    db.create_database(server, name)
    url = db.with_database(server, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        pool = db.open_pool(url, max_size=4)
        models.register_model(pool, backend.name, path=path, n_ctx=2048, make_default=True)
        params = GenerationParams(max_tokens=64, seed=1234, temperature=0.7)
        usage = Usage(prompt_tokens=48, completion_tokens=64, ttft_s=0.031, total_s=0.9, finish_reason="length")
        origin = Origin("bench", user_id="bench", template_version_id=None, template_name="support-reply",
                        template_version=3, label="production", variables={"order": 48213, "customer": "Ann"})

        prompt = backend.format_messages(MESSAGES)

        def record_once() -> None:
            executions.record(pool, origin=origin, backend=backend, status="ok", params=params, messages=MESSAGES,
                              prompt=prompt, output=OUTPUT, usage=usage)

        for _ in range(50):  # warm: connections, plans, the model file hash
            record_once()
            with pool.connection() as conn:
                conn.execute("SELECT 1").fetchone()
        floor, recorded = [], []
        for _ in range(args.records):  # interleaved so both see the same machine load
            started = time.perf_counter()
            with pool.connection() as conn:
                conn.execute("SELECT 1").fetchone()
            floor.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            record_once()
            recorded.append((time.perf_counter() - started) * 1000)
        print(f"model: {path.name}  database: embedded PostgreSQL ({name}, dropped afterwards)")
        print(line("round trip (SELECT 1, baseline)", floor))
        print(line("executions.record()", recorded))
        p95 = percentiles(recorded)[1]
        print(f"record p95 / round-trip p95: {p95 / percentiles(floor)[1]:.2f}x   "
              f"target p95 <= 2 ms: {'met' if p95 <= 2.0 else 'NOT met'}")

        # Real generations through the ledger: how much of the wall time is the recording?
        shares, walls = [], []
        short = GenerationParams(max_tokens=16, seed=7, temperature=0.7)
        for _ in range(args.generations):
            started = time.perf_counter()
            run = executions.start(pool, backend, origin=Origin("bench"), params=short, messages=MESSAGES)
            run.read()
            wall = time.perf_counter() - started
            overhead = wall - run.usage.total_s
            walls.append(wall * 1000)
            shares.append(100 * overhead / wall)
        print(line("16-token generation + ledger", walls))
        print(f"ledger + bookkeeping share of a 16-token generation: median {statistics.median(shares):.2f} % "
              f"(max {max(shares):.2f} %)")
        pool.close()
    finally:
        db.close_all_pools()
        db.drop_database(server, name)


if __name__ == "__main__":
    main()
