"""`promptdev worker`: more workers for submitted executions and evaluation runs (core.worker says what they run),
here or on another machine pointed at the same database. SIGTERM or SIGINT stops it: work in flight may finish for
up to PROMPTDEV_WORKER_GRACE_SECONDS, the rest goes back to the queue, and it exits 0."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from core import metrics, worker
from core.config import Settings


def _worker(args: argparse.Namespace, settings: Settings) -> None:
    metrics.start_metrics_server(settings)
    busy = worker.run_forever(settings, concurrency=args.concurrency, quiet=args.quiet)
    if busy and args.own_process:
        # Threads still in a generation after the grace period: their work is back in the queue and their results
        # would be refused; exit now rather than wait for them (or tear the model down under them).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def register(subparsers: Any) -> None:
    """Add `worker` to the promptdev command line."""
    p = subparsers.add_parser("worker", help="run a worker for submitted executions and evaluation runs")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_worker)
