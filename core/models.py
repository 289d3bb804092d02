"""The model registry: the models and backends the workbench knows, selectable per run.

A model is a GGUF file run in-process by llama.cpp (path, chat format, context size, file SHA-256) or a model on an
OpenAI-compatible server (base URL, remote model name and the *name* of the environment variable holding its key —
never the key itself). The model the settings configure is registered automatically and marked default.
Backends are loaded once per process and shared (the default one through `llm.get_backend`).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from core import llm
from core.config import CHAT_FORMATS, Settings, default_model_path
from core.model_files import check_gguf, file_sha256

IN_PROCESS, SERVER = "llama_cpp", "openai"  # a GGUF loaded in this process; an OpenAI-compatible server
MODEL_BACKENDS = (IN_PROCESS, SERVER)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,99}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_REGISTRY_LOCK_KEY = 7_346_221_010  # pg_advisory_xact_lock key: one registrar of the default model at a time


@dataclass(frozen=True)
class Model:
    """One registered model."""

    id: int
    name: str
    backend: str
    path: str | None
    base_url: str | None
    remote_model: str | None
    api_key_env: str | None
    chat_format: str
    n_ctx: int
    sha256: str | None
    is_default: bool
    created_at: datetime

    @property
    def location(self) -> str:
        """The GGUF path or `base URL · remote model`, for display."""
        return self.path if self.backend == "llama_cpp" else f"{self.base_url} · {self.remote_model}"


_SELECT = "SELECT id, name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx, sha256, " \
          "is_default, created_at FROM models"


def _check_fields(name: str, backend: str, path: str | Path | None, base_url: str | None,
                  remote_model: str | None, api_key_env: str | None, chat_format: str, n_ctx: int) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"model name must be 1-100 letters, digits or ._:/@+- (starting with a letter or digit), "
                         f"got {name!r}")
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(MODEL_BACKENDS)}, got {backend!r}")
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; choose one of {', '.join(CHAT_FORMATS)}")
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or not 128 <= n_ctx <= 1_048_576:
        raise ValueError(f"context size must be a whole number between 128 and 1048576, got {n_ctx!r}")
    if backend == "llama_cpp":
        if not path:
            raise ValueError("a llama_cpp model needs the path of its GGUF file")
        if base_url or remote_model or api_key_env:
            raise ValueError("a llama_cpp model takes a GGUF path, not a base URL, remote model or API key variable")
    else:
        if path:
            raise ValueError("an openai model takes a base URL and remote model, not a GGUF path")
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {base_url!r}")
        if not remote_model or not str(remote_model).strip():
            raise ValueError("an openai model needs the model name on the server (remote model)")
        if api_key_env and not _ENV_NAME.match(api_key_env):
            raise ValueError(f"API key variable must be an environment variable name (like OPENAI_API_KEY), "
                             f"got {api_key_env!r}; never give the key itself")


def register_model(pool: ConnectionPool, name: str, *, backend: str = "llama_cpp", path: str | Path | None = None,
                   base_url: str | None = None, remote_model: str | None = None, api_key_env: str | None = None,
                   chat_format: str = "auto", n_ctx: int = 4096, make_default: bool = False) -> Model:
    """Register a model: a GGUF file (checked, SHA-256 recorded) or a model on an OpenAI-compatible server."""
    name = name.strip() if isinstance(name, str) else name
    api_key_env = (api_key_env or "").strip() or None
    _check_fields(name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx)
    sha256 = None
    if backend == "llama_cpp":
        path = Path(path).expanduser().resolve()
        check_gguf(path)  # ModelFileError (a ValueError) names the file
        sha256 = file_sha256(path)
        path = str(path)
    else:
        base_url = str(base_url).rstrip("/")
        remote_model = str(remote_model).strip()
    with pool.connection() as conn, conn.transaction():
        if conn.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone():
            raise ValueError(f"a model named {name!r} is already registered")
        if make_default:
            conn.execute("UPDATE models SET is_default = false WHERE is_default")
        with conn.cursor(row_factory=class_row(Model)) as cur:
            try:
                return cur.execute(
                    "INSERT INTO models (name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx, "
                    "sha256, is_default) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id, name, backend, "
                    "path, base_url, remote_model, api_key_env, chat_format, n_ctx, sha256, is_default, created_at",
                    (name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx, sha256,
                     make_default)).fetchone()
            except psycopg.errors.UniqueViolation:
                raise ValueError(f"a model named {name!r} is already registered") from None


def list_models(pool: ConnectionPool) -> list[Model]:
    """Every registered model, the default first, then by name."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        return cur.execute(_SELECT + " ORDER BY is_default DESC, name").fetchall()


def get_model(pool: ConnectionPool, name: str) -> Model:
    """A registered model by name; LookupError when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        row = cur.execute(_SELECT + " WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise LookupError(f"no model named {name!r} is registered")
    return row


def get_model_by_id(pool: ConnectionPool, model_id: int) -> Model:
    """A registered model by id; LookupError when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        row = cur.execute(_SELECT + " WHERE id = %s", (model_id,)).fetchone()
    if row is None:
        raise LookupError(f"no model with id {model_id} is registered")
    return row


def default_model(pool: ConnectionPool) -> Model | None:
    """The registered default model, if any."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        return cur.execute(_SELECT + " WHERE is_default").fetchone()


def delete_model(pool: ConnectionPool, name: str) -> None:
    """Remove a model from the registry; refused for the default model and for a model the ledger refers to."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT id, is_default FROM models WHERE name = %s FOR UPDATE", (name,)).fetchone()
        if row is None:
            raise LookupError(f"no model named {name!r} is registered")
        model_id, is_default = row
        if is_default:
            raise ValueError(f"{name!r} is the default model (from the settings); it cannot be removed")
        uses = conn.execute("SELECT count(*) FROM executions WHERE model_id = %s", (model_id,)).fetchone()[0]
        if uses:
            raise ValueError(f"{name!r} produced {uses} recorded execution(s); it stays registered so they can be "
                             f"re-run")
        conn.execute("DELETE FROM models WHERE id = %s", (model_id,))


def _default_spec(settings: Settings) -> dict[str, Any]:
    """What the settings say the default model is (without loading it)."""
    if settings.backend == "openai":
        return {"backend": "openai", "name": settings.openai_model, "path": None,
                "base_url": settings.openai_base_url.rstrip("/"), "remote_model": settings.openai_model,
                "api_key_env": "OPENAI_API_KEY" if not settings.openai_api_key else "PROMPTDEV_OPENAI_API_KEY",
                "chat_format": settings.chat_format, "n_ctx": settings.n_ctx, "sha256": None}
    path = Path(default_model_path(settings)).resolve()
    check_gguf(path)
    return {"backend": "llama_cpp", "name": path.stem, "path": str(path), "base_url": None, "remote_model": None,
            "api_key_env": None, "chat_format": settings.chat_format, "n_ctx": settings.n_ctx,
            "sha256": file_sha256(path)}


def ensure_default_model_registered(pool: ConnectionPool, settings: Settings) -> Model:
    """Register the model the settings configure (if it is not yet) and make it the default; return it."""
    spec = _default_spec(settings)
    if spec["backend"] == "llama_cpp":
        match, args = "backend = 'llama_cpp' AND path = %s AND sha256 = %s", (spec["path"], spec["sha256"])
    else:
        match, args = "backend = 'openai' AND base_url = %s AND remote_model = %s", (spec["base_url"],
                                                                                    spec["remote_model"])
    with pool.connection() as conn:
        with conn.cursor(row_factory=class_row(Model)) as cur:  # the common case: already registered and default
            found = cur.execute(_SELECT + f" WHERE is_default AND {match}", args).fetchone()
        if found is not None:
            return found
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK_KEY,))
            with conn.cursor(row_factory=class_row(Model)) as cur:
                found = cur.execute(_SELECT + f" WHERE {match} ORDER BY (name = %s) DESC, id LIMIT 1",
                                    (*args, spec["name"])).fetchone()
            conn.execute("UPDATE models SET is_default = false WHERE is_default")
            if found is not None:
                model_id = found.id
                conn.execute("UPDATE models SET is_default = true WHERE id = %s", (model_id,))
            else:
                name = spec["name"]
                if conn.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone():
                    name = f"{name}-{(spec['sha256'] or os.urandom(4).hex())[:8]}"
                model_id = conn.execute(
                    "INSERT INTO models (name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx, "
                    "sha256, is_default) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, true) RETURNING id",
                    (name, spec["backend"], spec["path"], spec["base_url"], spec["remote_model"], spec["api_key_env"],
                     spec["chat_format"], spec["n_ctx"], spec["sha256"])).fetchone()[0]
    return get_model_by_id(pool, model_id)


_backends: dict[tuple, llm.Backend] = {}
_backends_lock = threading.Lock()


def _cached(key: tuple, factory: Callable[[], llm.Backend]) -> llm.Backend:
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = factory()
        return backend


def backend_for_model(model: Model, settings: Settings) -> llm.Backend:
    """The process-wide backend of a registered (non-default) model: loaded on first use, then shared."""
    if model.backend == "llama_cpp":
        key = ("llama_cpp", model.name, model.path, model.n_ctx, settings.n_threads, settings.n_batch,
               model.chat_format, settings.eval_batch)
        return _cached(key, lambda: llm.LlamaBackend(
            Path(model.path), n_ctx=model.n_ctx, n_threads=settings.n_threads,
            n_batch=min(settings.n_batch, model.n_ctx), chat_format=model.chat_format, name=model.name,
            max_batch=settings.eval_batch))
    api_key = None
    if model.api_key_env:
        api_key = os.environ.get(model.api_key_env)
        if not api_key:
            raise ValueError(f"model {model.name!r} reads its API key from ${model.api_key_env}, which is not set")
    key = ("openai", model.name, model.base_url, model.remote_model, model.api_key_env, model.n_ctx,
           settings.openai_timeout, settings.openai_max_retries)
    return _cached(key, lambda: llm.OpenAIBackend(
        model.base_url, model.remote_model, api_key=api_key, timeout=settings.openai_timeout,
        max_retries=settings.openai_max_retries, n_ctx=model.n_ctx, name=model.name))


def backend_for(pool: ConnectionPool, settings: Settings, model_name: str | None = None) -> llm.Backend:
    """The backend for a registered model by name (None: the default model the settings configure)."""
    default = ensure_default_model_registered(pool, settings)
    if model_name is None or model_name == default.name:
        return llm.get_backend(settings)
    return backend_for_model(get_model(pool, model_name), settings)


def model_for_backend(pool: ConnectionPool, backend: llm.Backend) -> Model | None:
    """The registered model a backend runs (matched by name and file hash or server), if it is registered."""
    info = backend.describe()
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        if info["backend"] == "llama_cpp":
            return cur.execute(_SELECT + " WHERE backend = 'llama_cpp' AND sha256 = %s "
                               "ORDER BY (name = %s) DESC, is_default DESC, id LIMIT 1",
                               (info.get("sha256"), info.get("name"))).fetchone()
        return cur.execute(_SELECT + " WHERE backend = 'openai' AND base_url = %s AND remote_model = %s "
                           "ORDER BY (name = %s) DESC, is_default DESC, id LIMIT 1",
                           (info.get("base_url"), info.get("model"), info.get("name"))).fetchone()


def backend_for_execution(pool: ConnectionPool, settings: Settings, execution: Any) -> llm.Backend:
    """The backend that re-runs a recorded execution exactly: the same registered model (same file hash)."""
    default = ensure_default_model_registered(pool, settings)
    model: Model | None = None
    if execution.model_id is not None:
        model = get_model_by_id(pool, execution.model_id)
    else:
        with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
            if execution.backend == "llama_cpp" and execution.model_sha256:
                model = cur.execute(_SELECT + " WHERE backend = 'llama_cpp' AND sha256 = %s "
                                    "ORDER BY is_default DESC, (name = %s) DESC, id LIMIT 1",
                                    (execution.model_sha256, execution.model_name)).fetchone()
            elif execution.backend == "openai":
                model = cur.execute(_SELECT + " WHERE backend = 'openai' AND base_url = %s "
                                    "ORDER BY (name = %s) DESC, is_default DESC, id LIMIT 1",
                                    (execution.base_url, execution.model_name)).fetchone()
    if model is None:
        raise LookupError(f"execution {execution.id} ran on {execution.model_name!r}, which is not in the model "
                          f"registry; register it to re-run")
    if model.backend == "llama_cpp" and execution.model_sha256 and model.sha256 != execution.model_sha256:
        raise LookupError(f"execution {execution.id} ran on a model file with SHA-256 {execution.model_sha256[:12]}…; "
                          f"{model.name!r} now has {str(model.sha256)[:12]}…, so it cannot be re-run exactly")
    if model.id == default.id:
        return llm.get_backend(settings)
    return backend_for_model(model, settings)


def served_model_name(pool: ConnectionPool, execution: Any) -> str | None:
    """The model name on the server an OpenAI-compatible execution ran on (from the registry entry it refers to;
    entries the ledger refers to cannot be removed), or None."""
    if execution.backend != "openai":
        return None
    if execution.model_id is not None:
        try:
            return get_model_by_id(pool, execution.model_id).remote_model
        except LookupError:
            pass
    return execution.model_name
