"""The process's shared resources: one connection pool per database, one model per configuration, the background
worker and the metrics endpoint. The UI and the CLI get them here."""

from __future__ import annotations

import logging
import threading

from psycopg_pool import ConnectionPool

from core import db, llm
from core.config import Settings

log = logging.getLogger(__name__)


def database(settings: Settings) -> ConnectionPool:
    """The process-wide pool for the configured database, started and migrated on first use."""
    return db.get_pool(settings)


def model(settings: Settings) -> llm.Backend:
    """The process-wide model backend for these settings, loaded once and shared."""
    return llm.get_backend(settings)


def model_key(settings: Settings) -> tuple:
    """What identifies the backend a configuration loads (for caches keyed by it)."""
    return (settings.backend, str(settings.model_path), settings.n_ctx, settings.n_threads, settings.n_batch,
            settings.chat_format, settings.openai_base_url, settings.openai_model)


def start_worker(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """Start a background worker thread on the configured database (submitted executions, evaluation runs)."""
    from core import worker

    return worker.start_thread(database(settings), settings)


def start_metrics(settings: Settings) -> int | None:
    """Serve Prometheus metrics when PROMPTDEV_METRICS_PORT is set; the port, or None when off or not possible."""
    from core import metrics

    if not settings.metrics_port:
        return None
    try:
        return metrics.start_metrics_server(settings)
    except metrics.MetricsError as exc:
        log.warning("metrics endpoint not started: %s", exc)
        return None
