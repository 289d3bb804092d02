"""The execution ledger core: every generation recorded with what reproduces it."""

from __future__ import annotations

import uuid

import pytest

from core import executions, llm
from core.executions import Origin
from core.llm import GenerationParams


def test_a_run_streams_and_is_recorded(pool, backend):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    run = executions.start(pool, backend, origin=Origin("api", user_id="ann", variables={"x": 1}),
                           params=GenerationParams(max_tokens=8, seed=11), messages=messages)
    chunks = list(run)
    assert run.execution_id is not None and run.status == "ok"
    row = executions.get_execution(pool, run.execution_id)
    assert row.output == "".join(chunks) == run.output
    assert row.status == "ok" and row.source == "api" and row.user_id == "ann"
    assert row.seed == 11 and row.params["max_tokens"] == 8 and row.variables == {"x": 1}
    assert row.messages == messages and "Name a colour." in row.prompt
    assert row.model_name == backend.name and row.model_sha256 == backend.sha256
    assert row.prompt_tokens > 5 and row.completion_tokens >= 1 and row.total_ms >= row.ttft_ms > 0
    assert row.created_at <= row.finished_at


def test_a_closed_run_is_recorded_as_cancelled(pool, backend):
    run = executions.start(pool, backend, origin=Origin("playground"),
                           params=GenerationParams(max_tokens=50, seed=1), prompt="Once upon a time")
    next(run)
    run.close()
    assert not backend.lock.locked()
    assert executions.get_execution(pool, run.execution_id).status == "cancelled"


def test_a_failed_run_is_recorded_as_error(pool, backend):
    run = executions.start(pool, backend, origin=Origin("cli"), prompt="word " * (backend.n_ctx + 5))
    with pytest.raises(Exception, match="context holds"):
        run.read()
    row = executions.get_execution(pool, run.execution_id)
    assert row.status == "error" and "context holds" in row.error and row.output is None


def test_blocked_generation_recorded_without_model(pool):
    eid = executions.record(pool, origin=Origin("chat", user_id="u1"), status="blocked",
                            messages=[{"role": "user", "content": "bad words"}], error="blocked by rule 'no-swearing'")
    row = executions.get_execution(pool, eid)
    assert row.status == "blocked" and row.model_name == "none" and row.completion_tokens is None


def test_filters_and_unknown_id(pool):
    executions.record(pool, origin=Origin("api"), status="ok", output="a", model={"model_name": "m1", "backend": "x",
                      "model_sha256": None, "base_url": None})
    executions.record(pool, origin=Origin("cli"), status="error", error="e", model={"model_name": "m2", "backend": "x",
                      "model_sha256": None, "base_url": None})
    assert [e.source for e in executions.list_executions(pool, status="error")] == ["cli"]
    assert [e.model_name for e in executions.list_executions(pool, source="api")] == ["m1"]
    with pytest.raises(LookupError, match="no execution with id 999999"):
        executions.get_execution(pool, 999999)
    with pytest.raises(ValueError, match="source"):
        executions.record(pool, origin=Origin("nowhere"), status="ok")


def test_an_interrupted_run_is_recorded_as_cancelled(pool, backend, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) inside the generation: the model is released and the run recorded, cancelled."""
    real = backend.generate

    def interrupted(*args, **kwargs):
        gen = real(*args, **kwargs)

        def chunks():
            with gen:
                for chunk in gen:
                    yield chunk
                    raise KeyboardInterrupt

        return llm.Generation(chunks(), gen.prompt, gen.params, gen.usage)

    monkeypatch.setattr(backend, "generate", interrupted)
    run = executions.start(pool, backend, origin=Origin("cli"), params=GenerationParams(max_tokens=20, seed=1),
                           prompt="Once upon a time")
    with pytest.raises(KeyboardInterrupt):
        run.read()
    assert not backend.lock.locked()
    row = executions.get_execution(pool, run.execution_id)
    assert row.status == "cancelled" and row.output == run.output and row.output


def test_recorded_executions_feed_the_metrics(pool, backend):
    from core import metrics

    template = f"tpl-{uuid.uuid4().hex[:8]}"
    labels = {"template": template, "model": backend.name}
    run = executions.start(pool, backend, origin=Origin("api", template_name=template),
                           params=GenerationParams(max_tokens=3, seed=1), prompt="Hello")
    run.read()
    executions.record(pool, origin=Origin("chat", template_name=template), status="blocked", error="x",
                      backend=backend)
    row = executions.get_execution(pool, run.execution_id)
    sample = metrics.REGISTRY.get_sample_value
    assert sample("promptdev_generations_total", {**labels, "source": "api", "status": "ok"}) == 1
    assert sample("promptdev_generations_total", {**labels, "source": "chat", "status": "blocked"}) == 1
    assert sample("promptdev_tokens_total", {**labels, "kind": "completion"}) == row.completion_tokens
    assert sample("promptdev_generation_latency_seconds_count", labels) == 1
