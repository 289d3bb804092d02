"""Generation speed: our in-process backend against raw llama-cpp-python, same model, prompt and parameters.

Prints tokens per second of each and their ratio (target >= 0.97). Run: .venv/bin/python bench/generation.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import load_settings  # noqa: E402
from core.llm import GenerationParams, LlamaBackend  # noqa: E402
from core.model_files import ensure_default_model  # noqa: E402

ROUNDS = 5
MAX_TOKENS = 128
MESSAGES = [
    {"role": "system", "content": "You are a storyteller who writes long, vivid stories."},
    {"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."},
]


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

    run_ours(), run_raw()  # warm both
    ours_tps, raw_tps = [], []
    for _ in range(ROUNDS):  # interleaved so both see the same machine load
        n, s = run_raw()
        raw_tps.append(n / s)
        n, s = run_ours()
        ours_tps.append(n / s)
    o, r = statistics.median(ours_tps), statistics.median(raw_tps)
    print(f"model: {path.name}  prompt tokens: {len(tokens)}  max tokens: {MAX_TOKENS}  rounds: {ROUNDS}")
    print(f"prompt chars: {len(prompt_text)}")
    print(f"raw llama-cpp-python: {r:.1f} tokens/s (median)")
    print(f"promptdev backend:    {o:.1f} tokens/s (median)")
    print(f"ratio: {o / r:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
