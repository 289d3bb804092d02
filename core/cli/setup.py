"""`promptdev setup` and `promptdev status`: what `make` runs first (assemble the model, start the database,
migrate), and what is in use."""

from __future__ import annotations

import argparse
from typing import Any

from core import db, runtime, status
from core.config import Settings
from core.model_files import check_gguf, ensure_default_model


def _setup(args: argparse.Namespace, settings: Settings) -> None:
    if settings.backend == "openai":
        print(f"model: {settings.openai_model} at {settings.openai_base_url}")
    elif settings.model_path is None:
        path = ensure_default_model(settings.models_dir)
        print(f"model: {path}")
    else:
        check_gguf(settings.model_path)
        print(f"model: {settings.model_path}")
    info = status.database_status(runtime.database(settings), settings)  # starts and migrates
    print(f"database: {info['kind'].lower()} PostgreSQL {info['version']}, {info['migrations']} migrations applied")
    if args.verbose:
        print(f"url: {db._redact(db.database_url(settings))}")


def _status(args: argparse.Namespace, settings: Settings) -> None:
    info = status.database_status(runtime.database(settings), settings)
    print(f"database: {info['kind'].lower()} PostgreSQL {info['version']} ({info['size_bytes'] / 1e6:.1f} MB)")
    print(f"data dir: {settings.data_dir}")


def register(subparsers: Any) -> None:
    """Add `setup` and `status` to the promptdev command line."""
    p = subparsers.add_parser("setup", help="assemble the default model, start the database and apply migrations")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_setup)
    p = subparsers.add_parser("status", help="show the database and data directory in use")
    p.set_defaults(func=_status)
