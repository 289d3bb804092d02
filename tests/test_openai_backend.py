"""The OpenAI-compatible backend against a real `python -m llama_cpp.server` on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from core import llm
from core.config import Settings
from core.errors import InvalidInput, Unavailable, kind_of
from core.llm import BackendUnavailable, GenerationError, GenerationParams, OpenAIBackend, Request
from tests.conftest import LlamaServer, free_port


def test_streams_chat_with_usage(llama_server):
    backend = OpenAIBackend(llama_server.base_url, "gemma-3-270m", timeout=60)
    gen = backend.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
                           params=GenerationParams(max_tokens=8, seed=1, temperature=0.0))
    chunks = list(gen)
    assert chunks and "".join(chunks) == gen.text
    assert gen.usage.completion_tokens >= 1 and gen.usage.ttft_s is not None
    assert gen.usage.finish_reason in ("stop", "length")


def test_raw_prompt_completion(llama_server):
    backend = OpenAIBackend(llama_server.base_url, "gemma-3-270m", timeout=60)
    gen = backend.generate(prompt="The capital of France is", params=GenerationParams(max_tokens=4, temperature=0.0))
    assert gen.read().strip()


def test_client_errors_are_clear_and_not_retried(llama_server):
    backend = OpenAIBackend(llama_server.base_url.replace("/v1", "/nope"), "gemma-3-270m", max_retries=3,
                            backoff_s=1.0)
    started = time.monotonic()
    with pytest.raises(GenerationError, match="HTTP 404"):
        backend.generate([{"role": "user", "content": "hi"}]).read()
    assert time.monotonic() - started < 1.0  # a 4xx is final: no backoff


def test_unreachable_server_fails_after_retries():
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff_s=0.05, timeout=2)
    with pytest.raises(BackendUnavailable, match="3 attempts"):
        backend.generate([{"role": "user", "content": "hi"}]).read()


def test_retries_until_a_restarted_server_answers(default_model_path):
    server = LlamaServer(default_model_path, free_port())
    server.start()
    try:
        backend = OpenAIBackend(server.base_url, "gemma-3-270m", max_retries=8, backoff_s=0.5, timeout=30)
        params = GenerationParams(max_tokens=4, temperature=0.0)
        first = backend.generate([{"role": "user", "content": "Name a fruit."}], params=params)
        first.read()
        assert first.usage.finish_reason in ("stop", "length")
        server.stop()
        restarter = threading.Timer(1.0, server.start)
        restarter.start()
        again = backend.generate([{"role": "user", "content": "Name a fruit."}], params=params)
        again.read()  # the first attempts hit a closed port; the retries reach the restarted server
        restarter.join()
        assert again.usage.finish_reason in ("stop", "length") and again.text == first.text
    finally:
        server.stop()


def test_describe_never_shows_the_key():
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(backend.describe())


def test_generate_many_runs_each_request_and_fails_each_alone(llama_server):
    backend = OpenAIBackend(llama_server.base_url, "gemma-3-270m", timeout=60, max_retries=0)
    params = GenerationParams(max_tokens=4, temperature=0.0, seed=3)
    gens = backend.generate_many([Request(prompt="The capital of France is", params=params),
                                  Request(messages=[], params=params)])
    assert gens[0].read().strip() and gens[0].usage.completion_tokens >= 1
    with pytest.raises(GenerationError, match="no messages"):
        gens[1].read()


def test_server_errors_are_of_the_contract_kinds(llama_server):
    down = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=0, timeout=2)
    with pytest.raises(BackendUnavailable) as unreachable:
        down.generate(prompt="hi").read()
    assert kind_of(unreachable.value) is Unavailable and unreachable.value.status == 503
    wrong_path = OpenAIBackend(llama_server.base_url.replace("/v1", "/nope"), "gemma-3-270m", max_retries=0)
    with pytest.raises(GenerationError) as refused:
        wrong_path.generate(prompt="hi").read()
    assert kind_of(refused.value) is Unavailable
    with pytest.raises(GenerationError) as empty:
        OpenAIBackend(llama_server.base_url, "gemma-3-270m").generate([])
    assert kind_of(empty.value) is InvalidInput


def test_the_registry_shares_one_server_backend_per_spec(llama_server):
    settings = replace(Settings(), backend="openai", openai_base_url=llama_server.base_url, openai_model="gemma-3-270m")
    backend = llm.get_backend(settings)
    try:
        assert isinstance(backend, OpenAIBackend) and llm.get_backend(replace(settings, eval_batch=1)) is backend
        assert llm.get_backend(replace(settings, openai_timeout=7.0)) is not backend
        assert backend.generate(prompt="The capital of France is",
                                params=GenerationParams(max_tokens=2, temperature=0.0)).read()
    finally:
        llm.unload(llm.ModelSpec.from_settings(settings))
        llm.unload(llm.ModelSpec.from_settings(replace(settings, openai_timeout=7.0)))
