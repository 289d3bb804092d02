"""Settings: one frozen object read from PROMPTDEV_* environment variables and an optional TOML file."""

from __future__ import annotations

import os
import re
import stat
import tomllib
import urllib.parse
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import psycopg

from core import outbound
from core.errors import InvalidInput
from core.model_files import DEFAULT_MODEL_FILENAME

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "PROMPTDEV_"
CHAT_FORMATS = ("auto", "gguf", "gemma", "mistral-instruct", "chatml", "raw")
BACKENDS = ("llama_cpp", "openai")


class SettingsError(InvalidInput):
    """A configuration value is missing or invalid; the message names the key."""


# Sequences decoded together: from 8 tokens on, llama.cpp multiplies K-quant weights with other kernels, which would
# make a sequence's output depend on its batch (see core.llm.generate_many).
MAX_EVAL_BATCH = 6


def _setting(default: Any, help: str, *, repr: bool = True, **limits: Any) -> Any:
    """A settings field: its default and metadata: what it means (`help`) and what the validation accepts (`min`,
    `max`, `positive`, `choices`)."""
    return field(default=default, repr=repr, metadata={"help": help, **limits})


@dataclass(frozen=True)
class Settings:
    """Everything the workbench can be configured with: each field is PROMPTDEV_<NAME> (or `name` in the TOML file);
    its metadata holds its help text and limits."""

    data_dir: Path = _setting(PROJECT_ROOT / "data", "everything the workbench writes")
    database_url: str | None = _setting(None, "any PostgreSQL 13+; unset: the embedded PostgreSQL in data/postgres")
    model_path: Path | None = _setting(None, "the GGUF the in-process backend loads; unset: the default model")
    n_ctx: int = _setting(4096, "context window in tokens", min=128)
    n_threads: int = _setting(0, "CPU threads for the in-process model; 0: every CPU this process may use", min=0)
    n_batch: int = _setting(64, "prompt batch size (fixed so that cached prefixes never change an output)", min=8)
    eval_batch: int = _setting(4, "evaluation items the in-process model decodes together (1: one at a time)",
                               min=1, max=MAX_EVAL_BATCH)
    worker_grace_seconds: float = _setting(30.0, "seconds a stopping worker lets work in flight finish before handing "
                                                 "it back to the queue", min=0)
    max_loaded_models: int = _setting(2, "in-process models kept in memory; one more frees the least recently used",
                                      min=1)
    chat_format: str = _setting("auto", "how chat messages become a prompt", choices=CHAT_FORMATS)
    backend: str = _setting("llama_cpp", "llama_cpp (in-process) or openai (an OpenAI-compatible server)",
                            choices=BACKENDS)
    openai_base_url: str | None = _setting(None, "the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    openai_api_key: str | None = _setting(None, "the server's API key (never logged or stored)", repr=False)
    openai_model: str | None = _setting(None, "the model name on the OpenAI-compatible server")
    openai_timeout: float = _setting(120.0, "per-request timeout in seconds", positive=True)
    openai_max_retries: int = _setting(4, "retries on connection errors, 429 and 5xx", min=0)
    model_key_env_allow: str | None = _setting(
        "PROMPTDEV_KEY_*,OPENAI_API_KEY", "environment variables a registered model server may read its API key from: "
        "names, or prefixes ending in *, separated by commas; empty: none")
    default_template: str = _setting("companion", "the template conversations use unless an operator assigns another")
    retention_days: int = _setting(0, "conversations idle longer than this are deleted; 0: keep", min=0)
    metrics_port: int = _setting(0, "Prometheus endpoint port; 0: off", min=0, max=65535)
    pool_min_size: int = _setting(1, "connections the pool keeps open", min=0)
    pool_max_size: int = _setting(10, "connections the pool may open", min=1)
    address: str = _setting("127.0.0.1", "the address the app listens on; 0.0.0.0 or :: exposes it to the network")
    base_url: str | None = _setting(None, "the URL browsers reach the app at (e.g. behind a proxy); https makes the "
                                          "session cookie Secure")

    @property
    def postgres_dir(self) -> Path:
        """Where the embedded PostgreSQL cluster lives."""
        return self.data_dir / "postgres"

    @property
    def models_dir(self) -> Path:
        """Where model files live."""
        return self.data_dir / "models"

    @property
    def exports_dir(self) -> Path:
        """Where Parquet exports live."""
        return self.data_dir / "exports"

    @property
    def embedded_database(self) -> bool:
        """True when the workbench runs its own PostgreSQL under data/."""
        return not self.database_url


SETTINGS_FIELDS: dict[str, Field] = {f.name: f for f in fields(Settings)}


def env_name(key: str) -> str:
    """The environment variable of a settings key: PROMPTDEV_ + its upper-case name."""
    return ENV_PREFIX + key.upper()


def _convert(key: str, raw: Any) -> Any:
    env = env_name(key)
    kind = SETTINGS_FIELDS[key].type
    if kind == "int":
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{env}: expected a whole number, got {raw!r}") from None
        _check_limits(key, value)
        return value
    if kind == "float":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{env}: expected a number of seconds, got {raw!r}") from None
        _check_limits(key, value)
        return value
    if kind.startswith("Path"):
        return Path(str(raw)).expanduser() if str(raw).strip() else None
    value = str(raw).strip()
    return value or None


def _check_limits(key: str, value: float) -> None:
    """The `min`, `max` and `positive` limits in the field's metadata."""
    env, meta = env_name(key), SETTINGS_FIELDS[key].metadata
    if "min" in meta and value < meta["min"]:
        raise SettingsError(f"{env}: must be at least {meta['min']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise SettingsError(f"{env}: must be at most {meta['max']}, got {value}")
    if meta.get("positive") and value <= 0:
        raise SettingsError(f"{env}: must be positive, got {value}")


def load_settings(env: Mapping[str, str] | None = None, toml_path: str | Path | None = None) -> Settings:
    """Read settings from a TOML file (PROMPTDEV_CONFIG or promptdev.toml) overlaid by environment variables."""
    env = os.environ if env is None else env
    names = set(SETTINGS_FIELDS)
    values: dict[str, Any] = {}
    toml_path = toml_path or env.get(ENV_PREFIX + "CONFIG")
    if toml_path is None and (PROJECT_ROOT / "promptdev.toml").exists():
        toml_path = PROJECT_ROOT / "promptdev.toml"
    if toml_path is not None:
        path = Path(toml_path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"PROMPTDEV_CONFIG: no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"PROMPTDEV_CONFIG: {path} is not valid TOML: {exc}") from None
        for key, raw in doc.items():
            if key not in names:
                raise SettingsError(f"{path}: unknown setting {key!r}")
            values[key] = _convert(key, raw)
    for key in names:
        raw = env.get(env_name(key))
        if raw is not None:
            values[key] = _convert(key, raw)
    settings = replace(Settings(), **{k: v for k, v in values.items() if v is not None or k != "data_dir"})
    return validate(settings)


def validate(settings: Settings) -> Settings:
    """Check the choices (field metadata) and cross-field rules; raise SettingsError naming the key."""
    for key, f in SETTINGS_FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(settings, key) not in choices:
            raise SettingsError(f"{env_name(key)}: unknown {key.replace('_', ' ')} {getattr(settings, key)!r}; "
                                f"choose one of {', '.join(choices)}")
    if settings.backend == "openai":
        if not settings.openai_base_url:
            raise SettingsError("PROMPTDEV_OPENAI_BASE_URL: required when PROMPTDEV_BACKEND=openai")
        try:  # the checks of a registered server's URL; its addresses are checked at each request
            outbound.check_base_url(settings.openai_base_url, resolve=False)
        except outbound.URLRefused as exc:
            raise SettingsError(f"PROMPTDEV_OPENAI_BASE_URL: {exc}") from None
        if not settings.openai_model:
            raise SettingsError("PROMPTDEV_OPENAI_MODEL: required when PROMPTDEV_BACKEND=openai")
    if settings.database_url:
        _check_database_url(settings.database_url)
    for pattern in key_env_patterns(settings):
        if not _KEY_ENV_PATTERN.match(pattern):
            raise SettingsError(f"PROMPTDEV_MODEL_KEY_ENV_ALLOW: {pattern!r} is not a variable name or a prefix "
                                f"ending in * (like PROMPTDEV_KEY_*)")
    if not _ADDRESS.match(settings.address or ""):
        raise SettingsError(f"PROMPTDEV_ADDRESS: not an IP address or host name: {settings.address!r}")
    if settings.base_url:
        _check_base_url(settings.base_url)
    if settings.pool_min_size > settings.pool_max_size:
        raise SettingsError("PROMPTDEV_POOL_MIN_SIZE: must not exceed PROMPTDEV_POOL_MAX_SIZE")
    if settings.n_batch > settings.n_ctx:
        raise SettingsError("PROMPTDEV_N_BATCH: must not exceed PROMPTDEV_N_CTX")
    return settings


_KEY_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")


def key_env_patterns(settings: Settings) -> tuple[str, ...]:
    """The entries of PROMPTDEV_MODEL_KEY_ENV_ALLOW: variable names, or prefixes ending in `*`."""
    return tuple(p for p in (settings.model_key_env_allow or "").replace(",", " ").split() if p)


_ADDRESS = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45})$")


def _check_base_url(url: str) -> None:
    """An origin: http(s)://host[:port], with no user, path, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    try:
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError:
        raise SettingsError(f"PROMPTDEV_BASE_URL: bad port in {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SettingsError(f"PROMPTDEV_BASE_URL: must be http(s)://host[:port] with no path, got {url!r}")


def _check_database_url(url: str) -> None:
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        raise SettingsError("PROMPTDEV_DATABASE_URL: must be a postgresql:// URL or a libpq connection string")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unparseable"
        raise SettingsError(f"PROMPTDEV_DATABASE_URL: not a valid connection string: {first}") from None


# ---------------------------------------------------------------------------------------------- private files
# What the workbench writes (the database, exports of the ledger, models) is for this user only: directories it
# creates are 0700, files that hold data 0600. Directories that exist already, the data directory's parents above
# all, are never changed.

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def ensure_private_dir(path: str | Path, *, levels: int = 1) -> Path:
    """Create a directory only this user can use: `path` and the `levels - 1` directories above it (levels=2 for a
    subdirectory of the data directory: the data directory too) are created with mode 0700 when missing; missing
    directories above those are created with the default mode. No existing directory is changed (no chmod)."""
    path = Path(path)
    private = [path, *path.parents][:max(1, levels)]
    outer = private[-1].parent
    if not outer.is_dir():
        outer.mkdir(parents=True, exist_ok=True)
    for directory in reversed(private):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                if directory != path:
                    path.mkdir()  # the error the OS gives for the path itself: a parent is not a directory
                raise
        else:
            os.chmod(directory, PRIVATE_DIR_MODE)  # exactly 0700, whatever the umask
    return path


def create_private_file(path: str | Path) -> Path:
    """Create (or empty) a file only this user can read and write (0600), for a writer that keeps an existing
    file's mode (pyarrow's ParquetWriter, open(..., "w")) to fill: the data is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # an existing file, or a umask that took more
    finally:
        os.close(fd)
    return Path(path)


def grant_traverse(path: str | Path) -> None:
    """Let another user reach `path` through its parents, and nothing more: each parent that its group or others
    cannot search gets the search bits (g+x, o+x); none gets read (listing) or write, and a parent both can search
    already is left alone. Root starts the embedded PostgreSQL as its own user (keeping root's group, so the group
    bits apply to it where root's group owns a directory), which must reach the data directory."""
    search = stat.S_IXGRP | stat.S_IXOTH
    for parent in Path(path).parents:
        mode = parent.stat().st_mode
        if mode & search != search:
            os.chmod(parent, stat.S_IMODE(mode) | search)


def default_model_path(settings: Settings) -> Path:
    """The GGUF the in-process backend loads: PROMPTDEV_MODEL_PATH or the assembled default model."""
    return settings.model_path or settings.models_dir / DEFAULT_MODEL_FILENAME
