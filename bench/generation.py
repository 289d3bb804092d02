"""Generation speed: our in-process backend against raw llama-cpp-python, same model, prompt and parameters.

Prints tokens per second of each and their ratio (target >= 0.97), then the same for the whole playground path:
template fetched and rendered from PostgreSQL + generation + ledger write (`executions.run_template`), timed wall
clock end to end, in a throw-away database on the embedded PostgreSQL. Run: .venv/bin/python bench/generation.py
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from core import db, executions, models, templates  # noqa: E402
from core.config import PROJECT_ROOT, load_settings  # noqa: E402
from core.llm import GenerationParams, LlamaBackend  # noqa: E402
from core.model_files import ensure_default_model  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5  # bench/generation.py [ROUNDS]
MAX_TOKENS = 128
MESSAGES = [
    {"role": "system", "content": "You are a storyteller who writes long, vivid stories."},
    {"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."},
]
TEMPLATE = [MESSAGES[0], {"role": "user", "content": "Tell me a long story about {{ subject }}."}]
VARIABLES = {"subject": "a lighthouse keeper and a storm"}


def main() -> None:
    from llama_cpp import Llama

    settings = load_settings()
    path = settings.model_path or ensure_default_model(settings.models_dir)
    ours = LlamaBackend(path, n_ctx=2048, n_threads=settings.n_threads, n_batch=settings.n_batch)
    raw = Llama(model_path=str(path), n_ctx=2048, n_batch=ours.n_batch, n_ubatch=ours.n_batch,
                n_threads=ours.n_threads, verbose=False)
    tokens = ours.tokenize_segments(ours.prompt_segments(MESSAGES))
    # Ignore end-of-turn so both sides generate exactly MAX_TOKENS: use a raw prompt continuation on both.
    prompt_text = ours.format_messages(MESSAGES)
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, top_k=40, seed=42,
                              repeat_penalty=1.1)

    def run_ours() -> tuple[int, float]:
        ours.llm.reset()
        gen = ours.generate(MESSAGES, params=params)
        gen.read()
        return gen.usage.completion_tokens, gen.usage.total_s

    def run_raw() -> tuple[int, float]:
        raw.reset()
        started = time.perf_counter()
        n = 0
        for _ in raw.create_completion(tokens, max_tokens=MAX_TOKENS, temperature=params.temperature,
                                       top_p=params.top_p, top_k=params.top_k, min_p=0.0,
                                       repeat_penalty=params.repeat_penalty, seed=params.seed, stream=True):
            n += 1
        return n, time.perf_counter() - started

    server = db.embedded_url(PROJECT_ROOT / "data" / "bench" / "postgres")
    dbname = f"bench_generation_{uuid.uuid4().hex[:8]}"
    db.create_database(server, dbname)
    url = db.with_database(server, dbname)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        pool = db.open_pool(url, max_size=4)
        models.register_model(pool, ours.name, path=path, n_ctx=2048, make_default=True)
        templates.create_template(pool, "bench-story", TEMPLATE, params=params.to_dict())

        overheads: list[float] = []

        def run_playground() -> tuple[int, float]:
            """The playground path, wall clock: fetch + render the template, generate, write the ledger row."""
            ours.llm.reset()
            started = time.perf_counter()
            run = executions.run_template(pool, ours, "bench-story", VARIABLES, source="bench")
            run.read()
            elapsed = time.perf_counter() - started
            assert run.execution_id is not None and run.messages == MESSAGES
            overheads.append(elapsed - run.usage.total_s)  # render + ledger + bookkeeping, outside the backend
            return run.usage.completion_tokens, elapsed

        run_ours(), run_raw(), run_playground()  # warm all three
        overheads.clear()
        ours_tps, raw_tps, play_tps = [], [], []
        for _ in range(ROUNDS):  # interleaved so all see the same machine load
            n, s = run_raw()
            raw_tps.append(n / s)
            n, s = run_ours()
            ours_tps.append(n / s)
            n, s = run_playground()
            play_tps.append(n / s)
        pool.close()
    finally:
        db.close_all_pools()
        db.drop_database(server, dbname)
    o, r, p = statistics.median(ours_tps), statistics.median(raw_tps), statistics.median(play_tps)
    print(f"model: {path.name}  prompt tokens: {len(tokens)}  max tokens: {MAX_TOKENS}  rounds: {ROUNDS}")
    print(f"prompt chars: {len(prompt_text)}")
    print(f"raw llama-cpp-python: {r:.1f} tokens/s (median)")
    print(f"promptdev backend:    {o:.1f} tokens/s (median)")
    print(f"ratio: {o / r:.3f} (target >= 0.97)")
    print(f"playground path (render + generation + ledger write, wall clock): {p:.1f} tokens/s (median)")
    print(f"playground ratio vs raw: {p / r:.3f} (target >= 0.97)")
    overhead_s = statistics.median(overheads)
    print(f"playground overhead outside the backend (render + ledger write): {overhead_s * 1000:.2f} ms median per "
          f"run; at the backend's speed that is a ratio of {(MAX_TOKENS / o) / (MAX_TOKENS / o + overhead_s):.4f} "
          f"to the backend, {(o / r) * (MAX_TOKENS / o) / (MAX_TOKENS / o + overhead_s):.3f} to raw")
    print(f"best rounds (least disturbed by other load): raw {max(raw_tps):.1f}, backend {max(ours_tps):.1f}, "
          f"playground {max(play_tps):.1f} tokens/s; playground/raw {max(play_tps) / max(raw_tps):.3f}")


if __name__ == "__main__":
    main()
