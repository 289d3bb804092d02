"""`promptdev serve`: serve the workbench, as `make run` does: `streamlit run app.py` listening on PROMPTDEV_ADDRESS
(default 127.0.0.1: this machine only), so that the address comes from the same settings (environment or TOML file)
as everything else. Streamlit binds before it imports app.py: the app cannot choose its address itself."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from core.config import PROJECT_ROOT, Settings


def command(settings: Settings, port: int) -> list[str]:
    """The `streamlit run` command line that serves app.py on the configured address and this port."""
    return [sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "app.py"),
            "--server.address", settings.address, "--server.port", str(port), "--server.headless", "true"]


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    argv = command(settings, args.port)
    sys.stdout.flush()
    if args.own_process:
        os.execv(argv[0], argv)  # Streamlit takes over this process (signals, exit code)
    return subprocess.call(argv)


def register(subparsers: Any) -> None:
    """Add `serve` to the promptdev command line."""
    p = subparsers.add_parser("serve", help="serve the workbench on PROMPTDEV_ADDRESS (what `make run` does)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=_serve)
