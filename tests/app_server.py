"""The real app served for HTTP and browser tests: `streamlit run app.py` (the st.App with core/web.py in front) in a
subprocess on 127.0.0.1 and a free port, on a database of its own cloned from the migrated template."""

from __future__ import annotations

import http.client
import os
import subprocess
import time
import uuid
from pathlib import Path

from core import db
from core.cli.serve import command
from core.config import PROJECT_ROOT, Settings


class AppServer:
    """One served app; `url` is its base URL, `output()` what it printed so far."""

    def __init__(self, database_url: str, data_dir: Path, model_path: Path, port: int):
        self.database_url, self.port = database_url, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data_dir / "server.log"
        self.env = {**os.environ, "PROMPTDEV_DATABASE_URL": database_url, "PROMPTDEV_DATA_DIR": str(data_dir),
                    "PROMPTDEV_MODEL_PATH": str(model_path), "PROMPTDEV_ADDRESS": "127.0.0.1",
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("PROMPTDEV_BASE_URL", None)
        self.settings = Settings(data_dir=data_dir, database_url=database_url, model_path=model_path)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        """Start it and wait until /healthz answers and the start-up (migrations, setup link) is done."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command(self.settings, self.port), cwd=PROJECT_ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited at start:\n{self.output()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the app did not answer in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cloned_database(pg_server_url: str, template_db: str) -> tuple[str, str]:
    """A new database cloned from the migrated template: (its name, its URL); drop it with drop_database."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    db.create_database(pg_server_url, name, template=template_db)
    return name, db.with_database(pg_server_url, name)


def drop_database(pg_server_url: str, name: str, url: str) -> None:
    """Close this process's pool on it, then drop it."""
    db.close_pool(url)
    db.drop_database(pg_server_url, name)
