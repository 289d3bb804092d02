"""The in-process backend on the real default model: streaming, usage, determinism, prefix reuse, locking."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from core import llm, runtime, templates
from core.config import PROJECT_ROOT, Settings
from core.errors import InvalidInput, TooLarge, Unavailable, kind_of
from core.llm import GenerationParams
from core.model_files import ModelFileError

SHARED_SYSTEM = "You are a helpful assistant for a bakery. " * 30  # about 300 tokens


def ask(question: str) -> list[dict]:
    return [{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": question}]


def test_backend_is_loaded_once_per_process(backend, default_model_path):
    again = llm.get_backend(replace(Settings(), model_path=default_model_path))
    assert again is backend
    facts = backend.describe()
    assert facts["architecture"] == "gemma3" and facts["chat_format"] == "gemma"
    assert facts["n_batch"] == 64 and len(facts["sha256"]) == 64


def test_streams_chunks_and_reports_usage(backend):
    gen = backend.generate([{"role": "user", "content": "Name three fruits."}],
                           params=GenerationParams(max_tokens=12, seed=1, temperature=0.7))
    chunks = list(gen)
    assert len(chunks) >= 2 and "".join(chunks) == gen.text
    u = gen.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 12
    assert 0 < u.ttft_s <= u.total_s and u.finish_reason in ("stop", "length")


def test_max_tokens_gives_length_finish(backend):
    gen = backend.generate([{"role": "user", "content": "Write a long story about a dragon."}],
                           params=GenerationParams(max_tokens=5, seed=3, temperature=0.0))
    gen.read()
    assert gen.usage.completion_tokens == 5 and gen.usage.finish_reason == "length"


def test_stop_sequence_cuts_output(backend):
    params = GenerationParams(max_tokens=40, seed=5, temperature=0.0)
    full = backend.generate([{"role": "user", "content": "Count: one, two, three, four, five, six"}], params=params).read()
    assert "," in full
    cut = backend.generate([{"role": "user", "content": "Count: one, two, three, four, five, six"}],
                           params=replace(params, stop=(",",)))
    text = cut.read()
    assert "," not in text and full.startswith(text) and cut.usage.finish_reason == "stop"


def test_same_seed_same_bytes_whatever_ran_before(backend):
    params = GenerationParams(max_tokens=24, seed=1234, temperature=0.9)
    backend.llm.reset()
    cold = backend.generate(ask("What bread do you recommend?"), params=params).read()
    # Something else shares the long system prompt, so its prefix sits in the KV cache...
    backend.generate(ask("Are you open on Sunday?"), params=replace(params, seed=7)).read()
    warm = backend.generate(ask("What bread do you recommend?"), params=params).read()
    # ...and something with no shared prefix at all.
    backend.generate([{"role": "user", "content": "Say a random word."}], params=params).read()
    again = backend.generate(ask("What bread do you recommend?"), params=params).read()
    assert cold == warm == again and cold


def test_prefix_reuse_is_block_aligned_and_faster(backend):
    params = GenerationParams(max_tokens=1, seed=0, temperature=0.0)
    backend.generate(ask("first"), params=params).read()
    tokens = backend.tokenize_segments(backend.prompt_segments(ask("second")))
    kept = backend._aligned_prefix(tokens)
    assert kept > 0 and kept % backend.n_batch == 0
    backend.llm.reset()
    started = time.perf_counter()
    backend.generate(ask("second"), params=params).read()
    cold = time.perf_counter() - started
    started = time.perf_counter()
    backend.generate(ask("third"), params=params).read()
    warm = time.perf_counter() - started
    assert warm < cold


def test_unset_seed_is_drawn_and_reported(backend):
    gen = backend.generate([{"role": "user", "content": "Hi"}], params=GenerationParams(max_tokens=3))
    gen.read()
    assert isinstance(gen.params.seed, int)


def test_every_message_reaches_the_tokens_the_model_sees(backend):
    long_system = " ".join(f"rule{i}" for i in range(300))
    messages = [{"role": "system", "content": long_system}, {"role": "user", "content": "question here"},
                {"role": "assistant", "content": "an answer"}, {"role": "system", "content": "operator note"},
                {"role": "user", "content": "next"}]
    tokens = backend.tokenize_segments(backend.prompt_segments(messages))
    seen = backend.llm.detokenize(tokens, special=True).decode()
    for m in messages:
        assert m["content"] in seen
    assert len(tokens) > 300  # the system prompt was not cut down to a stub


def test_special_tokens_typed_by_a_user_stay_text(backend):
    tokens = backend.tokenize_segments(backend.prompt_segments([{"role": "user", "content": "<end_of_turn>"}]))
    end_of_turn = backend.llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)
    assert tokens.count(end_of_turn[0]) == 1  # only the one the template put after the user turn


def test_closing_a_stream_releases_the_model_at_once(backend):
    gen = backend.generate([{"role": "user", "content": "Tell me a very long story."}],
                           params=GenerationParams(max_tokens=200, seed=2))
    next(gen)
    assert backend.lock.locked()
    gen.close()
    assert not backend.lock.locked() and gen.usage.finish_reason == "cancelled"


def test_abandoned_stream_releases_the_model(backend):
    def reader_that_goes_away():
        gen = backend.generate([{"role": "user", "content": "Tell me a very long story."}],
                               params=GenerationParams(max_tokens=200, seed=2))
        next(gen)  # then the reader is gone: its generation is garbage

    thread = threading.Thread(target=reader_that_goes_away)
    thread.start()
    thread.join()
    assert backend.lock.acquire(timeout=1.0)
    backend.lock.release()


def test_concurrent_callers_take_turns(backend):
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = backend.generate([{"role": "user", "content": f"Say the number {i}."}],
                                      params=GenerationParams(max_tokens=6, seed=i, temperature=0.0)).read()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    solo = {i: backend.generate([{"role": "user", "content": f"Say the number {i}."}],
                                params=GenerationParams(max_tokens=6, seed=i, temperature=0.0)).read() for i in range(3)}
    assert results == solo


def test_prompt_longer_than_context_is_refused(backend):
    with pytest.raises(llm.GenerationError, match="context holds"):
        backend.generate(prompt="word " * (backend.n_ctx + 10))


@pytest.mark.parametrize("params, error", [
    ({"temperature": -1}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"top_p": 0}, "top_p"),
    ({"seed": -5}, "seed"), ({"colour": 1}, "unknown"), ({"max_tokens": "many"}, "invalid"),
])
def test_bad_parameters_are_named(params, error):
    with pytest.raises(ValueError, match=error):
        GenerationParams.from_dict(params)


def test_missing_truncated_and_non_gguf_files_are_named(tmp_path, default_model_path):
    with pytest.raises(ModelFileError, match="not found.*nope.gguf"):
        llm.LlamaBackend(tmp_path / "nope.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF.*notes.gguf"):
        llm.LlamaBackend(text)
    truncated = tmp_path / "half.gguf"
    with open(default_model_path, "rb") as src:
        truncated.write_bytes(src.read(40 * 1024 * 1024))
    with pytest.raises(ModelFileError, match="half.gguf"):
        llm.LlamaBackend(truncated)


def _lone(backend, req):
    backend.llm.reset()   # a fresh model state: nothing cached
    with backend.generate(req.messages, prompt=req.prompt, params=req.params) as gen:
        return gen.read(), gen.usage.finish_reason, gen.usage.completion_tokens, gen.prompt


def test_batched_generation_gives_each_request_its_lone_bytes(backend):
    """Sequences decoded together (more requests than slots, so slots are refilled) match lone cold runs."""
    questions = ["What bread do you sell?", "Are you open on Sunday?", "Do you bake cakes to order?",
                 "Is there gluten-free bread?", "How much is a baguette?", "Can I pay by card?", "Where are you?"]
    requests = [llm.Request(messages=ask(q), params=GenerationParams(
        max_tokens=6 + 4 * (i % 3), temperature=0.0 if i % 3 == 0 else 0.9, seed=40 + i,
        stop=("\n",) if i % 2 else ())) for i, q in enumerate(questions)]
    requests.append(llm.Request(prompt="Once upon a time", params=GenerationParams(max_tokens=5, seed=1)))
    assert len(requests) > backend.max_batch > 1
    first = backend.generate_many(requests)
    again = backend.generate_many(list(reversed(requests)))[::-1]   # what the batch context cached changes nothing
    for req, a, b in zip(requests, first, again):
        lone = _lone(backend, req)
        assert (a.read(), a.usage.finish_reason, a.usage.completion_tokens, a.prompt) == lone
        assert b.read() == lone[0]
        assert a.usage.prompt_tokens > 0 and a.usage.ttft_s is not None and a.usage.total_s >= a.usage.ttft_s
    assert any(g.usage.finish_reason == "length" for g in first)


def test_a_failing_request_fails_alone_in_a_batch(backend):
    ok = llm.Request(messages=ask("Hello?"), params=GenerationParams(max_tokens=3, seed=5))
    too_long = llm.Request(prompt="bread " * 5000, params=GenerationParams(max_tokens=3, seed=5))
    empty = llm.Request(messages=[], params=GenerationParams(max_tokens=3, seed=5))
    gens = backend.generate_many([ok, too_long, ok, empty])
    assert gens[0].read() == gens[2].read() == _lone(backend, ok)[0]
    with pytest.raises(llm.GenerationError, match="context holds"):
        gens[1].read()
    with pytest.raises(llm.GenerationError, match="no messages"):
        gens[3].read()


def test_a_prompt_too_long_for_a_batch_slot_runs_alone_with_the_same_bytes(backend):
    long_system = "The bakery's full price list follows. " * 260   # about 2,100 tokens: more than a batch slot holds
    reqs = [llm.Request(messages=[{"role": "system", "content": long_system}, {"role": "user", "content": q}],
                        params=GenerationParams(max_tokens=4, seed=9)) for q in ("Rye?", "Spelt?")]
    reqs.append(llm.Request(messages=ask("Rye?"), params=GenerationParams(max_tokens=4, seed=9)))
    gens = backend.generate_many(reqs)
    assert [g.usage.prompt_tokens > llm.BATCH_SLOT_CTX for g in gens] == [True, True, False]
    for req, gen in zip(reqs, gens):
        assert gen.read() == _lone(backend, req)[0]


def test_batch_size_is_bounded(default_model_path):
    with pytest.raises(ValueError, match="max_batch must be between 1 and 6"):
        llm.LlamaBackend(default_model_path, max_batch=llm.MAX_BATCH + 1)


def test_generated_tokens_are_never_reused_as_a_prompt_prefix(backend):
    """A prompt that runs on into what the model generated before (a conversation's next turn) must not reuse the KV
    of those generated tokens: they were evaluated one at a time, a cold run evaluates them in an n_batch block."""
    prompt = "The bakery on the corner sells bread, cakes and pastries. " * 9
    first = llm.Request(prompt=prompt, params=GenerationParams(max_tokens=40, seed=1, temperature=0.0))
    other = llm.Request(prompt="Zebra " * 3, params=GenerationParams(max_tokens=4, seed=9))
    backend.llm.reset()
    said = backend.generate(prompt=prompt, params=first.params).read()
    follow = llm.Request(prompt=prompt + said + " And then", params=GenerationParams(max_tokens=8, seed=2))
    # Not vacuous: the follow-up shares a whole n_batch block with the cache that ends in generated tokens.
    cached, tokens = list(backend.llm.input_ids[: backend.llm.n_tokens]), backend.tokenize_prompt(follow.prompt)
    common = next(i for i, (a, b) in enumerate(zip(cached + [-1], tokens)) if a != b)
    assert len(backend.tokenize_prompt(prompt)) < 2 * backend.n_batch <= common
    warm = backend.generate(prompt=follow.prompt, params=follow.params).read()
    lone = _lone(backend, follow)[0]
    assert warm == lone
    assert backend.generate_many([first, other])[0].read() == said   # `first` runs in batch slot 0...
    assert backend.generate_many([follow, other])[0].read() == lone   # ...and `follow` after it


def test_batch_slots_keep_exact_state_across_edge_cases(backend):
    """A shared held prefix, a prompt that is a prefix of it, a prompt of exactly 2 x n_batch tokens, identical
    prompts, budget 1, stop sequences, a short and a long prompt decoded together; then the slots are reused."""
    base = "Note:" + " The bakery sells rye bread." * 20                       # 123 tokens
    exact = base + " bread" * 5
    assert len(backend.tokenize_prompt(exact)) == 2 * backend.n_batch
    p = lambda **kw: GenerationParams(**{"max_tokens": 6, "seed": 3, "temperature": 0.9, **kw})
    shared = [llm.Request(prompt=base + " Rye?", params=p()),
              llm.Request(prompt=base + " Rye?", params=p(seed=4)),                   # identical prompt
              llm.Request(prompt="Note:" + " The bakery sells rye bread." * 12, params=p()),   # prefix of what is held
              llm.Request(prompt=exact, params=p(max_tokens=1)),
              llm.Request(prompt=exact, params=p(stop=("e",))),
              llm.Request(prompt=base + " Spelt?", params=p(temperature=0.0))]
    mixed = [llm.Request(prompt="Hi", params=p(max_tokens=10)),
             llm.Request(messages=ask("Do you sell rye?" * 20), params=p(max_tokens=10)),
             llm.Request(prompt=exact + " And", params=p())]
    for requests in (shared, mixed, shared[::-1], mixed + shared):
        gens = backend.generate_many(requests)
        for req, gen in zip(requests, gens):
            assert (gen.read(), gen.usage.finish_reason, gen.usage.completion_tokens) == _lone(backend, req)[:3]


def test_a_failure_mid_batch_fails_only_unfinished_requests_and_resets_the_batch_state(backend, monkeypatch):
    requests = [llm.Request(prompt=f"Question {i}:", params=GenerationParams(max_tokens=1 if i == 0 else 5, seed=i))
                for i in range(3)]
    decode, calls = llm._BatchState._decode, []

    def failing(self, entries):
        calls.append(len(entries))
        if len(calls) == 3:   # the third request's prompt: the first one has finished, the second is decoding
            raise llm.GenerationError("batched decoding failed (llama_decode returned 1)")
        return decode(self, entries)

    monkeypatch.setattr(llm._BatchState, "_decode", failing)
    gens = backend.generate_many(requests)
    assert backend._batch is None and not backend.lock.locked()
    assert gens[0].read() == _lone(backend, requests[0])[0] and gens[0].usage.finish_reason == "length"
    for gen in gens[1:]:
        with pytest.raises(llm.GenerationError, match="llama_decode returned 1"):
            gen.read()
    monkeypatch.setattr(llm._BatchState, "_decode", lambda self, entries: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        backend.generate_many(requests)
    assert backend._batch is None and not backend.lock.locked()
    monkeypatch.setattr(llm._BatchState, "_decode", decode)
    for req, gen in zip(requests, backend.generate_many(requests)):
        assert gen.read() == _lone(backend, req)[0]


# --- the model registry: one backend per spec, at most N in-process models resident, unload ---------------------


@pytest.fixture
def registry(default_model_path):
    """Specs of the default file that differ from the session backend's; unloaded after the test, which then
    restores the default limit of resident models."""
    base = replace(Settings(), model_path=default_model_path)
    specs: list[llm.ModelSpec] = []

    def spec(**changes) -> llm.ModelSpec:
        specs.append(llm.ModelSpec.from_settings(replace(base, **changes)))
        return specs[-1]

    yield spec
    for s in specs:
        llm.unload(s)
    llm.get_backend(base)   # the limit is the last one given: back to the default


def test_the_same_spec_gives_the_same_backend(backend, default_model_path):
    settings = replace(Settings(), model_path=default_model_path)
    spec = llm.ModelSpec.from_settings(settings)
    assert spec == llm.ModelSpec.from_settings(replace(settings)) and hash(spec) == hash(replace(spec))
    assert llm.backend_for_spec(spec) is llm.backend_for_spec(replace(spec)) is llm.get_backend(settings) is backend
    assert spec in llm.cached_specs()
    assert runtime.model_spec(settings) == spec and runtime.model(settings) is backend


def test_settings_differing_only_in_eval_batch_give_different_backends(backend, registry, default_model_path):
    spec = registry(eval_batch=2)
    assert spec != llm.ModelSpec.from_settings(replace(Settings(), model_path=default_model_path))
    other = llm.backend_for_spec(spec)
    assert other is not backend and other.max_batch == 2 and backend.max_batch == 4


def test_a_server_spec_ignores_in_process_settings():
    s = replace(Settings(), backend="openai", openai_base_url="http://127.0.0.1:9/v1/", openai_model="m")
    spec = llm.ModelSpec.from_settings(s)
    assert spec.kind == "openai" and spec.base_url == "http://127.0.0.1:9/v1" and spec.path is None
    assert llm.ModelSpec.from_settings(replace(s, eval_batch=2, n_threads=3, n_batch=32)) == spec
    assert llm.ModelSpec.from_settings(replace(s, openai_timeout=5.0)) != spec
    keyed = llm.ModelSpec.from_settings(replace(s, openai_api_key="sk-secret"))
    assert "sk-secret" not in repr(keyed) and keyed.api_key_env == "PROMPTDEV_OPENAI_API_KEY"
    assert llm.backend_for_spec(keyed)._api_key == "sk-secret"
    llm.unload(keyed)


def test_with_one_resident_model_loading_another_frees_the_least_recently_used(backend, registry):
    first = llm.backend_for_spec(registry(n_ctx=512, max_loaded_models=1), max_loaded_models=1)
    assert not backend.resident   # the session backend was idle: released too
    first.generate_many([llm.Request(prompt=p, params=GenerationParams(max_tokens=2, seed=1)) for p in ("a", "b")])
    weights, batch_ctx = first._llm, first._batch.ctx   # the batch context exists and is freed with the weights
    assert weights._model.model is not None and batch_ctx.ctx is not None
    second = llm.backend_for_spec(registry(n_ctx=768, max_loaded_models=1), max_loaded_models=1)
    assert not first.resident and second.resident and first._batch is None
    assert weights._model.model is None and batch_ctx.ctx is None
    assert llm.resident_specs() == [llm.ModelSpec.from_settings(replace(Settings(), model_path=first.model_path,
                                                                        n_ctx=768, max_loaded_models=1))]
    # A released backend keeps its identity: the next use loads it again (and releases the other one).
    params = GenerationParams(max_tokens=4, seed=2)
    assert first.generate(prompt="Once", params=params).read() and first.loads == 2
    assert first.resident and not second.resident


def test_a_backend_in_use_is_not_freed_under_its_generation(registry):
    params = GenerationParams(max_tokens=24, seed=4, temperature=0.7)
    busy = llm.backend_for_spec(registry(n_ctx=512), max_loaded_models=1)
    lone = busy.generate(prompt="Once upon a time", params=params).read()
    gen = busy.generate(prompt="Once upon a time", params=params)
    next(gen)
    assert busy.in_use
    other = llm.backend_for_spec(registry(n_ctx=768), max_loaded_models=1)   # over the limit while busy is in use
    assert busy.resident and other.resident
    assert gen.read() == lone   # the generation ran to its end on its own memory
    assert not busy.in_use and not busy.resident and other.resident   # released once idle: least recently used
    # Unloading a backend in use frees it when its generation ends; it is not used again.
    gen = other.generate(prompt="Once upon a time", params=params)
    next(gen)
    llm.unload(registry(n_ctx=768))
    assert other.resident and other.closed
    gen.read()
    assert not other.resident
    with pytest.raises(llm.BackendUnavailable, match="was unloaded"):
        other.generate(prompt="Again", params=params).read()
    assert llm.backend_for_spec(registry(n_ctx=768)) is not other   # a new backend for the spec


def test_model_errors_are_of_the_contract_kinds(backend, tmp_path):
    with pytest.raises(llm.GenerationError) as too_long:
        backend.generate(prompt="word " * (backend.n_ctx + 10))
    assert kind_of(too_long.value) is TooLarge and too_long.value.status == 413
    with pytest.raises(llm.GenerationError) as empty:
        backend.generate([])
    assert kind_of(empty.value) is InvalidInput
    with pytest.raises(ModelFileError) as missing:
        llm.LlamaBackend(tmp_path / "gone.gguf")
    assert kind_of(missing.value) is Unavailable and isinstance(missing.value, llm.BackendUnavailable)
    with pytest.raises(ValueError) as bad:
        GenerationParams.from_dict({"top_p": 7})
    assert kind_of(bad.value) is InvalidInput


def test_llama_cpp_log_lines_never_reach_a_cli_user(settings, pool):
    """llama.cpp prints to stderr itself (e.g. "llama_kv_cache_iswa: using full-size SWA cache" when a context is
    made); they go to Python logging at DEBUG instead."""
    templates.create_template(pool, "hello", [{"role": "user", "content": "Say hello to {{ name }}."}],
                              params={"max_tokens": 4})
    env = {**os.environ, "PROMPTDEV_DATABASE_URL": settings.database_url, "PROMPTDEV_DATA_DIR": str(settings.data_dir),
           "PROMPTDEV_MODEL_PATH": str(settings.model_path)}
    out = subprocess.run([sys.executable, "-m", "core.cli", "run", "hello", "name=Ada", "--seed", "1", "-q"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "llama_" not in out.stderr and out.stderr == ""
