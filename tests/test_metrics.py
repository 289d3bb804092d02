"""The Prometheus endpoint: off by default, serves counters and histograms labelled by template and model."""

from __future__ import annotations

import socket
import urllib.request
import uuid
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import metrics
from core.config import Settings, load_settings
from tests.conftest import free_port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample served on 127.0.0.1:port/metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def endpoint():
    port = free_port()
    assert metrics.start_metrics_server(replace(Settings(), metrics_port=port)) == port
    yield port
    metrics.stop_metrics_server()


def test_off_by_default():
    assert load_settings(env={}).metrics_port == 0
    assert metrics.start_metrics_server(Settings()) is None


def test_endpoint_serves_generations_tokens_latency_errors_hits_and_halts(endpoint):
    t = f"tpl-{uuid.uuid4().hex[:8]}"
    base = {"template": t, "model": "gemma-3-270m"}
    metrics.observe_execution(template=t, model="gemma-3-270m", source="chat", status="ok", prompt_tokens=120,
                              completion_tokens=30, ttft_s=0.04, total_s=0.8)
    metrics.observe_execution(template=t, model="gemma-3-270m", source="chat", status="ok", prompt_tokens=80,
                              completion_tokens=10, ttft_s=0.2, total_s=3.0)
    metrics.observe_execution(template=t, model="gemma-3-270m", source="api", status="error", prompt_tokens=5)
    metrics.observe_guardrail_hit(template=t, model="gemma-3-270m", rule="no-pii", action="redact")
    metrics.observe_halt(template=t, model="gemma-3-270m", by="guardrail")
    samples = scrape(endpoint)

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted((base | labels).items())))]

    assert value("promptdev_generations_total", source="chat", status="ok") == 2
    assert value("promptdev_generations_total", source="api", status="error") == 1
    assert value("promptdev_tokens_total", kind="prompt") == 205
    assert value("promptdev_tokens_total", kind="completion") == 40
    assert value("promptdev_generation_errors_total") == 1
    assert value("promptdev_generation_latency_seconds_count") == 2
    assert value("promptdev_generation_latency_seconds_sum") == pytest.approx(3.8)
    assert value("promptdev_generation_latency_seconds_bucket", le="1.0") == 1
    assert value("promptdev_generation_latency_seconds_bucket", le="+Inf") == 2
    assert value("promptdev_time_to_first_token_seconds_bucket", le="0.05") == 1
    assert value("promptdev_time_to_first_token_seconds_count") == 2
    assert value("promptdev_guardrail_hits_total", rule="no-pii", action="redact") == 1
    assert value("promptdev_halts_total", by="guardrail") == 1
    metrics.observe_execution(template=t, model="gemma-3-270m", source="chat", status="ok", prompt_tokens=1)
    assert scrape(endpoint)[("promptdev_tokens_total", tuple(sorted((base | {"kind": "prompt"}).items())))] == 206
    assert b"promptdev_generations_total" in metrics.render()


def test_starting_twice_reuses_the_endpoint_and_a_busy_port_is_one_clear_error(endpoint):
    assert metrics.start_metrics_server(replace(Settings(), metrics_port=endpoint)) == endpoint
    metrics.stop_metrics_server()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(metrics.MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.start_metrics_server(replace(Settings(), metrics_port=port))


def test_observing_never_raises():
    metrics.observe_execution(template=None, model=None, prompt_tokens=-5)  # a counter refuses negatives: logged
    metrics.observe_guardrail_hit(rule=None, action=None)
    metrics.observe_halt()
