"""Status of the running workbench: database and model facts, warm-up, the Home page's activity figures."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
from psycopg_pool import ConnectionPool

from core import conversations, db, evaluations, executions
from core.config import Settings
from core.llm import Backend, GenerationParams

# The Home page's activity figures, in the order shown: each function gives {label: number} on one connection.
FIGURES: tuple[Callable[[psycopg.Connection], dict[str, int]], ...] = (
    executions.dashboard_figures,     # executions, in all and in the last 24 hours
    conversations.dashboard_figures,  # users, conversations, messages, halted conversations, guardrail events
    evaluations.dashboard_figures,    # datasets, evaluation runs, runs in progress
)


def database_status(pool: ConnectionPool, settings: Settings) -> dict[str, Any]:
    """Kind (embedded or external), server version, database, size and applied migrations."""
    with pool.connection() as conn:
        info = db.server_info(conn)
        migrations = len(db.applied_migrations(conn))
    return {
        "kind": "Embedded" if settings.embedded_database else "External",
        "location": str(settings.postgres_dir) if settings.embedded_database else "PROMPTDEV_DATABASE_URL",
        "migrations": migrations,
        **info,
    }


def model_status(backend: Backend) -> dict[str, Any]:
    """What the backend says about itself, plus `in_process` (a local GGUF rather than a server)."""
    return {**backend.describe(), "in_process": backend.kind == "llama_cpp"}


def warm_up(backend: Backend, max_tokens: int = 32) -> dict[str, Any]:
    """Run one short generation and report its speed."""
    gen = backend.generate([{"role": "user", "content": "Count from one to twenty in words."}],
                           params=GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=0))
    with gen:
        gen.read()
    usage = gen.usage
    return {"completion_tokens": usage.completion_tokens, "ttft_s": usage.ttft_s or 0.0,
            "total_s": usage.total_s, "tokens_per_second": usage.tokens_per_second or 0.0}


def dashboard_figures(pool: ConnectionPool) -> dict[str, int]:
    """The Home page's activity figures, {label: number}, in the order shown (FIGURES)."""
    figures: dict[str, int] = {}
    with pool.connection() as conn:
        for source in FIGURES:
            figures.update(source(conn))
    return figures
