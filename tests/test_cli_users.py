"""`promptdev users` and `promptdev serve` as a shell user runs them (a subprocess): passwords from standard input or
a terminal prompt, never the command line; one-line errors; a setup link that works once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from core import accounts
from core.cli.serve import command
from core.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def promptdev(settings: Settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMPTDEV_DATABASE_URL": settings.database_url, "PROMPTDEV_DATA_DIR": str(settings.data_dir)}
    env.pop("PROMPTDEV_BASE_URL", None)
    return subprocess.run([sys.executable, "-m", "core.cli", "users", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, input=stdin, timeout=300)


def test_create_list_deactivate_activate_and_reset(settings, pool):
    made = promptdev(settings, "create", "Ann", "--admin", "--display-name", "Ann A.", "--password-stdin",
                     stdin="ann's first passphrase\n")
    assert made.returncode == 0 and made.stdout.strip() == "created ann (admin)", made.stderr
    assert "passphrase" not in made.stdout + made.stderr
    user = accounts.authenticate(pool, "ann", "ann's first passphrase")
    assert user.is_admin and user.display_name == "Ann A."
    promptdev(settings, "create", "bo", "--password-stdin", stdin="bo's first passphrase")
    listed = promptdev(settings, "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["USERNAME", "DISPLAY", "NAME", "ADMIN", "ACTIVE", "LAST", "LOGIN"]
    assert lines[1].split()[:4] == ["ann", "Ann", "A.", "yes"] and lines[2].split()[:2] == ["bo", "bo"]
    _, session = accounts.login(pool, "bo", "bo's first passphrase")
    assert promptdev(settings, "deactivate", "bo").returncode == 0
    assert accounts.user_for_session(pool, session) is None
    assert promptdev(settings, "activate", "bo").returncode == 0
    reset = promptdev(settings, "reset-password", "bo", "--password-stdin", stdin="bo's second passphrase\n")
    assert reset.returncode == 0 and "new password set for bo" in reset.stdout
    accounts.authenticate(pool, "bo", "bo's second passphrase")


def test_errors_are_one_line(settings, pool):
    short = promptdev(settings, "create", "cy", "--password-stdin", stdin="short\n")
    assert short.returncode == 1
    assert short.stderr == f"promptdev: A password needs at least {accounts.MIN_PASSWORD_LENGTH} characters.\n"
    no_tty = promptdev(settings, "create", "cy", stdin="")
    assert no_tty.returncode == 1 and "--password-stdin" in no_tty.stderr
    bad = promptdev(settings, "create", "no spaces allowed", "--password-stdin", stdin="long enough password\n")
    assert bad.returncode == 1 and bad.stderr.startswith("promptdev: A username has 1 to 64 characters")
    promptdev(settings, "create", "cy", "--password-stdin", stdin="long enough password\n")
    twice = promptdev(settings, "create", "CY", "--password-stdin", stdin="long enough password\n")
    assert twice.returncode == 1 and twice.stderr == "promptdev: A user named 'cy' exists already.\n"
    ghost = promptdev(settings, "reset-password", "ghost", "--password-stdin", stdin="long enough password\n")
    assert ghost.returncode == 1 and ghost.stderr == "promptdev: No user named 'ghost'.\n"
    last = promptdev(settings, "deactivate", "cy")
    assert last.returncode == 0
    with pool.connection() as conn:
        conn.execute("UPDATE users SET is_admin = true WHERE username = 'cy'")
    promptdev(settings, "activate", "cy")
    alone = promptdev(settings, "deactivate", "cy")
    assert alone.returncode == 1 and alone.stderr == "promptdev: 'cy' is the last active admin.\n"


def test_the_password_is_asked_on_the_terminal(settings, pool):
    """With a terminal, the password is asked twice, without echo (a pseudo-terminal stands in for one)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: promptdev on the terminal
        os.environ.update(PROMPTDEV_DATABASE_URL=settings.database_url, PROMPTDEV_DATA_DIR=str(settings.data_dir))
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "core.cli", "users", "create", "dee"])
    seen = b""
    for answer in (b"dee's typed passphrase\n", b"dee's typed passphrase\n"):
        while not seen.rstrip().endswith(b":"):
            seen += os.read(fd, 1024)
        os.write(fd, answer)
        seen += b"|"
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"typed passphrase" not in seen  # never echoed
    assert b"created dee" in seen
    accounts.authenticate(pool, "dee", "dee's typed passphrase")


def test_setup_link_creates_an_admin_once(settings, pool):
    out = promptdev(settings, "setup-link", "--port", "8599")
    match = re.fullmatch(r"http://127\.0\.0\.1:8599/setup/([A-Za-z0-9_-]{43})\n", out.stdout)
    assert out.returncode == 0 and match, out.stdout + out.stderr
    assert "valid once" in out.stderr
    token = match.group(1)
    accounts.create_admin_with_setup_token(pool, token, "first", "the first admin's passphrase")
    assert not accounts.setup_token_valid(pool, token)


def test_serve_listens_on_the_configured_address():
    argv = command(Settings(address="0.0.0.0"), 8502)
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("app.py")
    assert argv[argv.index("--server.address") + 1] == "0.0.0.0" and argv[argv.index("--server.port") + 1] == "8502"
    assert command(Settings(), 8501)[argv.index("--server.address") + 1] == "127.0.0.1"
