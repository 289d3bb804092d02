"""The process's shared resources: one connection pool per database, one model per spec (from core.llm's registry),
the background worker and the metrics endpoint. The UI and the CLI get them here."""

from __future__ import annotations

import logging
import threading

from psycopg_pool import ConnectionPool

from core import db, llm, metrics, worker
from core.config import Settings

log = logging.getLogger(__name__)


def database(settings: Settings) -> ConnectionPool:
    """The process-wide pool for the configured database, started and migrated on first use."""
    return db.get_pool(settings)


def model(settings: Settings) -> llm.Backend:
    """The process-wide model backend for these settings, loaded once and shared (at most
    PROMPTDEV_MAX_LOADED_MODELS in-process models stay in memory; see core.llm)."""
    return llm.get_backend(settings)


def model_spec(settings: Settings) -> llm.ModelSpec:
    """What identifies the backend these settings load: equal specs, one backend."""
    return llm.ModelSpec.from_settings(settings)


def model_loaded(settings: Settings) -> bool:
    """True when the backend these settings load is ready to use without loading a model file first."""
    spec = model_spec(settings)
    return spec.kind != llm.IN_PROCESS or spec in llm.resident_specs()


def start_worker(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """Start a background worker thread on the configured database (submitted executions, evaluation runs)."""
    return worker.start_thread(database(settings), settings)


def start_metrics(settings: Settings) -> int | None:
    """Serve Prometheus metrics when PROMPTDEV_METRICS_PORT is set; the port, or None when off or not possible."""
    if not settings.metrics_port:
        return None
    try:
        return metrics.start_metrics_server(settings)
    except metrics.MetricsError as exc:
        log.warning("metrics endpoint not started: %s", exc)
        return None
