"""Prometheus telemetry: counters and histograms of generations, tokens, latency, time to first token, errors,
guardrail hits and halts, labelled by template and model; served over HTTP when PROMPTDEV_METRICS_PORT is set
(off by default, bound to 127.0.0.1 unless told otherwise).

The figures are this process's since it started (Prometheus computes rates from them); the ledger and the
analytics exports hold the history. Observing never raises: telemetry must not break a generation.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from core.config import Settings
from core.errors import Unavailable

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_LABELS = ("template", "model")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

GENERATIONS = Counter("promptdev_generations", "Generations recorded in the ledger, by source and final status",
                      (*_LABELS, "source", "status"), registry=REGISTRY)
TOKENS = Counter("promptdev_tokens", "Tokens processed (kind: prompt or completion)", (*_LABELS, "kind"),
                 registry=REGISTRY)
ERRORS = Counter("promptdev_generation_errors", "Generations that ended in an error", _LABELS, registry=REGISTRY)
LATENCY = Histogram("promptdev_generation_latency_seconds", "Wall time of a generation, start to last token",
                    _LABELS, buckets=LATENCY_BUCKETS, registry=REGISTRY)
TTFT = Histogram("promptdev_time_to_first_token_seconds", "Time from the start of a generation to its first token",
                 _LABELS, buckets=TTFT_BUCKETS, registry=REGISTRY)
GUARDRAIL_HITS = Counter("promptdev_guardrail_hits", "Guardrail rule hits, by rule and action",
                         (*_LABELS, "rule", "action"), registry=REGISTRY)
HALTS = Counter("promptdev_halts", "Conversations halted (by: operator or guardrail)", (*_LABELS, "by"),
                registry=REGISTRY)


class MetricsError(Unavailable):
    """The metrics endpoint could not start; the message says why."""


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def observe_execution(*, template: str | None = None, model: str | None = None, source: str = "",
                      status: str = "ok", prompt_tokens: int | None = None, completion_tokens: int | None = None,
                      ttft_s: float | None = None, total_s: float | None = None) -> None:
    """Count one recorded generation: its status, tokens, latency and time to first token."""
    try:
        t, m = _label(template), _label(model)
        GENERATIONS.labels(t, m, _label(source), _label(status)).inc()
        if prompt_tokens:
            TOKENS.labels(t, m, "prompt").inc(prompt_tokens)
        if completion_tokens:
            TOKENS.labels(t, m, "completion").inc(completion_tokens)
        if status == "error":
            ERRORS.labels(t, m).inc()
        if status == "ok" and total_s is not None:
            LATENCY.labels(t, m).observe(total_s)
        if status == "ok" and ttft_s is not None:
            TTFT.labels(t, m).observe(ttft_s)
    except Exception:  # telemetry never breaks a generation
        log.exception("could not observe an execution")


def observe_guardrail_hit(*, template: str | None = None, model: str | None = None, rule: str = "",
                          action: str = "") -> None:
    """Count one guardrail rule hit."""
    try:
        GUARDRAIL_HITS.labels(_label(template), _label(model), _label(rule), _label(action)).inc()
    except Exception:
        log.exception("could not observe a guardrail hit")


def observe_halt(*, template: str | None = None, model: str | None = None, by: str = "operator") -> None:
    """Count one conversation halted (by an operator or a guardrail)."""
    try:
        HALTS.labels(_label(template), _label(model), _label(by)).inc()
    except Exception:
        log.exception("could not observe a halt")


def render() -> bytes:
    """The current metrics in Prometheus' text format."""
    return generate_latest(REGISTRY)


_lock = threading.Lock()
_server: tuple[Any, threading.Thread, int, str] | None = None


def start_metrics_server(settings: Settings, addr: str = "127.0.0.1") -> int | None:
    """Serve /metrics on settings.metrics_port (once per process; later calls return the same port); None when the
    port is 0 (off). MetricsError when the port cannot be bound."""
    global _server
    port = settings.metrics_port
    if not port:
        return None
    with _lock:
        if _server is not None:
            if (_server[2], _server[3]) != (port, addr):
                raise MetricsError(f"the metrics endpoint already runs on {_server[3]}:{_server[2]} in this process")
            return _server[2]
        try:
            httpd, thread = start_http_server(port, addr=addr, registry=REGISTRY)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
        _server = (httpd, thread, port, addr)
        log.info("metrics on http://%s:%s/metrics", addr, port)
        return port


def stop_metrics_server() -> None:
    """Stop the endpoint if this process runs one."""
    global _server
    with _lock:
        if _server is None:
            return
        httpd, thread, _, _ = _server
        _server = None
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)
