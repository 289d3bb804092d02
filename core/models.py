"""The model registry: the models and backends the workbench knows, selectable per run.

A model is a GGUF file run in-process by llama.cpp (path, chat format, context size, file SHA-256) or a model on an
OpenAI-compatible server (base URL, remote model name and the *name* of the environment variable holding its key —
never the key itself). The model the settings configure is registered automatically and marked default.

What a registration may point at is limited, since whoever registers a model need not be whoever runs the machine:

- a GGUF file must lie inside the models directory (`settings.models_dir`), symbolic links and `..` resolved; any
  other path is refused with one message that does not depend on whether it exists (the file the settings name,
  PROMPTDEV_MODEL_PATH, is configuration and may be anywhere). Only files there get a `.sha256` side-car.
- a server's base URL is checked by `core.outbound` (http or https, no user name or password, no link-local or cloud
  metadata address, every address its name resolves to): at registration, and again at each request.
- the API key variable must be on the administrator's allow-list, PROMPTDEV_MODEL_KEY_ENV_ALLOW (names, or prefixes
  ending in `*`): at registration, and again when the key is read. The settings' own key variable is allowed for
  the server the settings name.
Backends come from the process's one registry in `core.llm`, keyed by `model_spec(model, settings)` (the default
model's by `llm.ModelSpec.from_settings`); removing a model unloads its backend.

Errors: an unknown model is `ModelNotFound` (NotFound), a name taken `ModelExists` (Conflict), a removal the state
forbids `ModelInUse` (Conflict), a bad registration (a path, URL or key variable refused above among them)
`InvalidModel` (InvalidInput).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from core import db, llm, outbound
from core.config import CHAT_FORMATS, Settings, default_model_path, key_env_patterns, load_settings
from core.errors import Conflict, InvalidInput, NotFound
from core.model_files import ModelFileError, check_gguf, file_sha256, is_inside

IN_PROCESS, SERVER = llm.IN_PROCESS, llm.SERVER  # a GGUF loaded in this process; an OpenAI-compatible server
MODEL_BACKENDS = (IN_PROCESS, SERVER)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,99}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class ModelNotFound(NotFound):
    """No such registered model (a LookupError)."""


class ModelExists(Conflict):
    """A model of that name is registered already."""


class ModelInUse(Conflict):
    """The model cannot be removed: it is the default, or the ledger refers to it."""


class InvalidModel(InvalidInput):
    """A registration that cannot be accepted (name, backend, path, URL, chat format, context size), or a model whose
    API key variable is not set; the message names the field."""


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
        raise InvalidModel(f"model name must be 1-100 letters, digits or ._:/@+- (starting with a letter or digit), "
                         f"got {name!r}")
    if backend not in MODEL_BACKENDS:
        raise InvalidModel(f"backend must be one of {', '.join(MODEL_BACKENDS)}, got {backend!r}")
    if chat_format not in CHAT_FORMATS:
        raise InvalidModel(f"unknown chat format {chat_format!r}; choose one of {', '.join(CHAT_FORMATS)}")
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or not 128 <= n_ctx <= 1_048_576:
        raise InvalidModel(f"context size must be a whole number between 128 and 1048576, got {n_ctx!r}")
    if backend == "llama_cpp":
        if not path:
            raise InvalidModel("a llama_cpp model needs the path of its GGUF file")
        if base_url or remote_model or api_key_env:
            raise InvalidModel("a llama_cpp model takes a GGUF path, not a base URL, remote model or API key variable")
    else:
        if path:
            raise InvalidModel("an openai model takes a base URL and remote model, not a GGUF path")
        try:  # its form; its addresses once the other fields are fine (register_model)
            outbound.check_base_url(base_url, resolve=False)
        except outbound.URLRefused as exc:
            raise InvalidModel(str(exc)) from None
        if not remote_model or not str(remote_model).strip():
            raise InvalidModel("an openai model needs the model name on the server (remote model)")
        if api_key_env and not _ENV_NAME.match(api_key_env):  # not repeated: it may be the key itself
            raise InvalidModel("API key variable must be an environment variable name (like PROMPTDEV_KEY_MYSERVER); "
                               "never give the key itself")


def key_env_allowed(name: str, settings: Settings, base_url: str | None = None) -> bool:
    """True when a model server may read its API key from the variable `name`: it is on the allow-list
    (PROMPTDEV_MODEL_KEY_ENV_ALLOW: names, or prefixes ending in `*`), or it is the settings' own key variable and
    base_url is the server the settings name."""
    for pattern in key_env_patterns(settings):
        if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
            return True
    if settings.openai_base_url and base_url == settings.openai_base_url.rstrip("/"):
        return name in ("PROMPTDEV_OPENAI_API_KEY", "OPENAI_API_KEY")
    return False


def _refused_key_env(settings: Settings, name: str = "") -> str:
    """Why a key variable is refused; the name only when it comes from the registry (what a user types may be a
    key that looks like a name)."""
    allowed = ", ".join(key_env_patterns(settings)) or "none"
    return (f"API key variable {name or 'given'} is not one models may read (PROMPTDEV_MODEL_KEY_ENV_ALLOW allows: "
            f"{allowed}); put the key in an allowed variable")


def _gguf_path(path: str | Path, settings: Settings) -> str:
    """The real path of a GGUF a user names: a file name or path inside the models directory (relative paths are
    taken from there), or the file the settings name. Anything else is refused with one message, decided before
    the path is looked at outside the models directory, so it says nothing about what exists there."""
    models_dir = os.path.abspath(settings.models_dir)
    refused = InvalidModel(f"the GGUF file must be inside the models directory {models_dir}: give its name there or "
                           f"a path inside it (without ..)")
    raw = os.fspath(path) if isinstance(path, (str, Path)) else ""
    if not raw or "\0" in raw:
        raise refused
    normal = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(models_dir, raw))
    configured = default_model_path(settings)
    if normal in (os.path.normpath(os.path.abspath(configured)), os.path.realpath(configured)):
        return os.path.realpath(configured)  # configuration, not user input: anywhere
    if ".." in Path(raw).parts:
        raise refused
    roots = {models_dir, os.path.realpath(models_dir)}
    if not any(normal.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise refused  # decided on the text alone: nothing outside was looked at
    if not is_inside(normal, models_dir):  # a symbolic link inside that leads out
        raise refused
    return os.path.realpath(normal)


def register_model(pool: ConnectionPool, name: str, *, backend: str = "llama_cpp", path: str | Path | None = None,
                   base_url: str | None = None, remote_model: str | None = None, api_key_env: str | None = None,
                   chat_format: str = "auto", n_ctx: int = 4096, make_default: bool = False,
                   settings: Settings | None = None) -> Model:
    """Register a model: a GGUF file inside the models directory (checked, SHA-256 recorded) or a model on an
    OpenAI-compatible server (URL and key variable checked: see the module). `settings` gives the models
    directory and the key allow-list (default: the process's settings, `load_settings()`)."""
    settings = load_settings() if settings is None else settings
    name = name.strip() if isinstance(name, str) else name
    api_key_env = (api_key_env or "").strip() or None
    _check_fields(name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx)
    sha256 = None
    if backend == "llama_cpp":
        path = _gguf_path(path, settings)
        try:
            check_gguf(Path(path))
        except ModelFileError as exc:  # names the file, which is inside the models directory
            raise InvalidModel(str(exc)) from None
        sha256 = file_sha256(Path(path), settings.models_dir)
    else:
        base_url = str(base_url).rstrip("/")
        remote_model = str(remote_model).strip()
        if api_key_env and not key_env_allowed(api_key_env, settings, base_url):
            raise InvalidModel(_refused_key_env(settings))
        try:
            outbound.check_base_url(base_url)  # every address the host resolves to
        except outbound.URLRefused as exc:
            raise InvalidModel(str(exc)) from None
    with pool.connection() as conn, conn.transaction():
        if conn.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone():
            raise ModelExists(f"a model named {name!r} is already registered")
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
                raise ModelExists(f"a model named {name!r} is already registered") from None


def list_models(pool: ConnectionPool) -> list[Model]:
    """Every registered model, the default first, then by name."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        return cur.execute(_SELECT + " ORDER BY is_default DESC, name").fetchall()


def get_model(pool: ConnectionPool, name: str) -> Model:
    """A registered model by name; ModelNotFound (a LookupError) when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        row = cur.execute(_SELECT + " WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise ModelNotFound(f"no model named {name!r} is registered")
    return row


def get_model_by_id(pool: ConnectionPool, model_id: int) -> Model:
    """A registered model by id; ModelNotFound (a LookupError) when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        row = cur.execute(_SELECT + " WHERE id = %s", (model_id,)).fetchone()
    if row is None:
        raise ModelNotFound(f"no model with id {model_id} is registered")
    return row


def default_model(pool: ConnectionPool) -> Model | None:
    """The registered default model, if any."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Model)) as cur:
        return cur.execute(_SELECT + " WHERE is_default").fetchone()


def delete_model(pool: ConnectionPool, name: str) -> None:
    """Remove a model from the registry and unload its backend (with any settings it was loaded with); refused for
    the default model and for a model the ledger refers to."""
    with pool.connection() as conn, conn.transaction():
        with conn.cursor(row_factory=class_row(Model)) as cur:
            model = cur.execute(_SELECT + " WHERE name = %s FOR UPDATE", (name,)).fetchone()
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is registered")
        if model.is_default:
            raise ModelInUse(f"{name!r} is the default model (from the settings); it cannot be removed")
        uses = conn.execute("SELECT count(*) FROM executions WHERE model_id = %s", (model.id,)).fetchone()[0]
        if uses:
            raise ModelInUse(f"{name!r} produced {uses} recorded execution(s); it stays registered so they can be "
                             f"re-run")
        conn.execute("DELETE FROM models WHERE id = %s", (model.id,))
    for spec in llm.cached_specs():
        if is_spec_of(spec, model):
            llm.unload(spec)


def model_spec(model: Model, settings: Settings) -> llm.ModelSpec:
    """The backend spec of a registered model: its file, context and chat format (or server, remote model and key
    variable) with the settings' threads, batch sizes, timeout and retries. InvalidModel when its key variable is
    named but not set, or not (any more) one models may read (`key_env_allowed`)."""
    if model.backend == IN_PROCESS:
        return llm.ModelSpec.in_process(model.path, settings, name=model.name, n_ctx=model.n_ctx,
                                        chat_format=model.chat_format)
    api_key = None
    if model.api_key_env:
        if not key_env_allowed(model.api_key_env, settings, model.base_url):
            raise InvalidModel(f"model {model.name!r}: {_refused_key_env(settings, model.api_key_env)}")
        api_key = os.environ.get(model.api_key_env)
        if not api_key:
            raise InvalidModel(f"model {model.name!r} reads its API key from ${model.api_key_env}, which is not set")
    return llm.ModelSpec.server(model.base_url, model.remote_model, settings, name=model.name, n_ctx=model.n_ctx,
                                api_key_env=model.api_key_env, api_key=api_key)


def is_spec_of(spec: llm.ModelSpec, model: Model) -> bool:
    """True when a spec was built from this registered model (whatever settings it was built with)."""
    if (spec.kind, spec.name, spec.n_ctx) != (model.backend, model.name, model.n_ctx):
        return False
    if model.backend == IN_PROCESS:
        return (spec.path, spec.chat_format) == (model.path, model.chat_format)
    return (spec.base_url, spec.model, spec.api_key_env) == (model.base_url, model.remote_model, model.api_key_env)


def _default_entry(settings: Settings) -> dict[str, Any]:
    """The registry row of the model the settings configure (without loading it)."""
    spec = llm.ModelSpec.from_settings(settings)
    sha256 = None
    if spec.kind == IN_PROCESS:
        try:
            check_gguf(Path(spec.path))
        except ModelFileError as exc:  # the configured model is not there: the model is unavailable
            raise llm.ModelFileUnavailable(str(exc)) from None
        sha256 = file_sha256(Path(spec.path), settings.models_dir)
    else:  # the admin's URL: no allow-list for its key, but no link-local or metadata address either
        try:
            outbound.check_base_url(spec.base_url, unresolvable_ok=True)
        except outbound.URLRefused as exc:
            raise llm.ServerForbidden(f"PROMPTDEV_OPENAI_BASE_URL: {exc}") from None
    return {"backend": spec.kind, "name": spec.name, "path": spec.path, "base_url": spec.base_url,
            "remote_model": spec.model, "api_key_env": spec.api_key_env, "chat_format": settings.chat_format,
            "n_ctx": settings.n_ctx, "sha256": sha256}


def ensure_default_model_registered(pool: ConnectionPool, settings: Settings) -> Model:
    """Register the model the settings configure (if it is not yet) and make it the default; return it."""
    entry = _default_entry(settings)
    if entry["backend"] == "llama_cpp":
        match, args = "backend = 'llama_cpp' AND path = %s AND sha256 = %s", (entry["path"], entry["sha256"])
    else:
        match, args = "backend = 'openai' AND base_url = %s AND remote_model = %s", (entry["base_url"],
                                                                                    entry["remote_model"])
    with pool.connection() as conn:
        with conn.cursor(row_factory=class_row(Model)) as cur:  # the common case: already registered and default
            found = cur.execute(_SELECT + f" WHERE is_default AND {match}", args).fetchone()
        if found is not None:
            return found
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (int(db.LockKey.MODEL_REGISTRY),))
            with conn.cursor(row_factory=class_row(Model)) as cur:
                found = cur.execute(_SELECT + f" WHERE {match} ORDER BY (name = %s) DESC, id LIMIT 1",
                                    (*args, entry["name"])).fetchone()
            conn.execute("UPDATE models SET is_default = false WHERE is_default")
            if found is not None:
                model_id = found.id
                conn.execute("UPDATE models SET is_default = true WHERE id = %s", (model_id,))
            else:
                name = entry["name"]
                if conn.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone():
                    name = f"{name}-{(entry['sha256'] or os.urandom(4).hex())[:8]}"
                model_id = conn.execute(
                    "INSERT INTO models (name, backend, path, base_url, remote_model, api_key_env, chat_format, n_ctx, "
                    "sha256, is_default) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, true) RETURNING id",
                    (name, entry["backend"], entry["path"], entry["base_url"], entry["remote_model"],
                     entry["api_key_env"], entry["chat_format"], entry["n_ctx"], entry["sha256"])).fetchone()[0]
    return get_model_by_id(pool, model_id)


def backend_for_model(model: Model, settings: Settings) -> llm.Backend:
    """The process-wide backend of a registered (non-default) model: loaded on first use, then shared."""
    return llm.backend_for_spec(model_spec(model, settings), max_loaded_models=settings.max_loaded_models)


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
        raise ModelNotFound(f"execution {execution.id} ran on {execution.model_name!r}, which is not in the model "
                            f"registry; register it to re-run")
    if model.backend == "llama_cpp" and execution.model_sha256 and model.sha256 != execution.model_sha256:
        raise ModelNotFound(f"execution {execution.id} ran on a model file with SHA-256 "
                            f"{execution.model_sha256[:12]}…; {model.name!r} now has {str(model.sha256)[:12]}…, "
                            f"so it cannot be re-run exactly")
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
        except ModelNotFound:
            pass
    return execution.model_name
