"""`promptdev worker`: more workers for submitted executions and evaluation runs (core.worker says what they run),
here or on another machine pointed at the same database."""

from __future__ import annotations

import argparse
from typing import Any

from core import metrics, worker
from core.config import Settings


def _worker(args: argparse.Namespace, settings: Settings) -> None:
    metrics.start_metrics_server(settings)
    worker.run_forever(settings, concurrency=args.concurrency, quiet=args.quiet)


def register(subparsers: Any) -> None:
    """Add `worker` to the promptdev command line."""
    p = subparsers.add_parser("worker", help="run a worker for submitted executions and evaluation runs")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_worker)
