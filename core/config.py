"""Settings: one frozen object read from PROMPTDEV_* environment variables and an optional TOML file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "PROMPTDEV_"
CHAT_FORMATS = ("auto", "gguf", "gemma", "mistral-instruct", "chatml", "raw")
BACKENDS = ("llama_cpp", "openai")


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """Everything the workbench can be configured with."""

    data_dir: Path = PROJECT_ROOT / "data"
    database_url: str | None = None
    model_path: Path | None = None
    n_ctx: int = 4096
    n_threads: int = 0  # 0: let llama.cpp choose (physical cores)
    n_batch: int = 64
    eval_batch: int = 4  # evaluation items the in-process model decodes together (1: one at a time)
    chat_format: str = "auto"
    backend: str = "llama_cpp"
    openai_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    openai_model: str | None = None
    openai_timeout: float = 120.0
    openai_max_retries: int = 4
    default_template: str = "companion"
    retention_days: int = 0
    metrics_port: int = 0
    pool_min_size: int = 1
    pool_max_size: int = 10

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


# Sequences decoded together: from 8 tokens on, llama.cpp multiplies K-quant weights with other kernels, which would
# make a sequence's output depend on its batch (see core.llm.generate_many).
MAX_EVAL_BATCH = 6

_INT_KEYS = {"n_ctx": 128, "n_threads": 0, "n_batch": 8, "eval_batch": 1, "openai_max_retries": 0,
             "retention_days": 0, "metrics_port": 0, "pool_min_size": 0, "pool_max_size": 1}


def _convert(key: str, raw: Any) -> Any:
    env = ENV_PREFIX + key.upper()
    if key in _INT_KEYS:
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{env}: expected a whole number, got {raw!r}") from None
        if value < _INT_KEYS[key]:
            raise SettingsError(f"{env}: must be at least {_INT_KEYS[key]}, got {value}")
        if key == "metrics_port" and value > 65535:
            raise SettingsError(f"{env}: not a TCP port: {value}")
        return value
    if key == "openai_timeout":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{env}: expected a number of seconds, got {raw!r}") from None
        if value <= 0:
            raise SettingsError(f"{env}: must be positive, got {value}")
        return value
    if key in ("data_dir", "model_path"):
        return Path(str(raw)).expanduser() if str(raw).strip() else None
    value = str(raw).strip()
    return value or None


def load_settings(env: Mapping[str, str] | None = None, toml_path: str | Path | None = None) -> Settings:
    """Read settings from a TOML file (PROMPTDEV_CONFIG or promptdev.toml) overlaid by environment variables."""
    env = os.environ if env is None else env
    names = {f.name for f in fields(Settings)}
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
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            values[key] = _convert(key, raw)
    settings = replace(Settings(), **{k: v for k, v in values.items() if v is not None or k != "data_dir"})
    return validate(settings)


def validate(settings: Settings) -> Settings:
    """Check cross-field rules; raise SettingsError naming the key."""
    if settings.chat_format not in CHAT_FORMATS:
        raise SettingsError(
            f"PROMPTDEV_CHAT_FORMAT: unknown chat format {settings.chat_format!r}; choose one of {', '.join(CHAT_FORMATS)}")
    if settings.backend not in BACKENDS:
        raise SettingsError(f"PROMPTDEV_BACKEND: unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
    if settings.backend == "openai":
        if not settings.openai_base_url:
            raise SettingsError("PROMPTDEV_OPENAI_BASE_URL: required when PROMPTDEV_BACKEND=openai")
        if not settings.openai_base_url.startswith(("http://", "https://")):
            raise SettingsError(f"PROMPTDEV_OPENAI_BASE_URL: must start with http:// or https://, got {settings.openai_base_url!r}")
        if not settings.openai_model:
            raise SettingsError("PROMPTDEV_OPENAI_MODEL: required when PROMPTDEV_BACKEND=openai")
    if settings.database_url:
        _check_database_url(settings.database_url)
    if settings.pool_min_size > settings.pool_max_size:
        raise SettingsError("PROMPTDEV_POOL_MIN_SIZE: must not exceed PROMPTDEV_POOL_MAX_SIZE")
    if settings.n_batch > settings.n_ctx:
        raise SettingsError("PROMPTDEV_N_BATCH: must not exceed PROMPTDEV_N_CTX")
    if settings.eval_batch > MAX_EVAL_BATCH:
        raise SettingsError(f"PROMPTDEV_EVAL_BATCH: at most {MAX_EVAL_BATCH}, got {settings.eval_batch}")
    return settings


def _check_database_url(url: str) -> None:
    import psycopg

    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        raise SettingsError("PROMPTDEV_DATABASE_URL: must be a postgresql:// URL or a libpq connection string")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unparseable"
        raise SettingsError(f"PROMPTDEV_DATABASE_URL: not a valid connection string: {first}") from None


def default_model_path(settings: Settings) -> Path:
    """The GGUF the in-process backend loads: PROMPTDEV_MODEL_PATH or the assembled default model."""
    from core.model_files import DEFAULT_MODEL_FILENAME

    return settings.model_path or settings.models_dir / DEFAULT_MODEL_FILENAME
