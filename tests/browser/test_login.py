"""One real browser (Debian's chromium, driven by Playwright through its executable path — no browser download) on
the served app: it is sent to the login form, signs in, sees the Templates page, signs out and is sent back to the
login form. `make test` installs chromium when it is missing; without it this test is skipped, saying why."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from core import accounts, db
from tests.app_server import AppServer, cloned_database, drop_database
from tests.conftest import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "walt's browser passphrase"

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    pytest.skip(f"{CHROMIUM} is missing and could not be installed (make test runs apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(pg_server_url, template_db, default_model_path, tmp_path_factory):
    name, url = cloned_database(pg_server_url, template_db)
    app = AppServer(url, tmp_path_factory.mktemp("browser") / "data", default_model_path, free_port())
    try:
        app.start()
        accounts.create_user(db.get_pool(app.settings), accounts.CONSOLE, "walt", PASSWORD, display_name="Walt")
        yield app
    finally:
        app.stop()
        drop_database(pg_server_url, name, url)


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_context().new_page()
        finally:
            browser.close()


def test_sign_in_see_templates_sign_out(server, page):
    expect = sync_api.expect
    page.goto(f"{server.url}/templates")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Ftemplates$"))
    page.fill("#username", "walt")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")

    expect(page).to_have_url(f"{server.url}/templates", timeout=30_000)
    expect(page.get_by_role("heading", name="Templates", level=1)).to_be_visible(timeout=60_000)
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text("Signed in as Walt (walt)")).to_be_visible()

    sidebar.get_by_role("link", name="Sign out").click()
    expect(page).to_have_url(f"{server.url}/logout", timeout=30_000)
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{server.url}/login", timeout=30_000)
    expect(page.locator("form[action='/login'] #username")).to_be_visible()

    page.goto(f"{server.url}/templates")  # the session is gone: back to the form
    expect(page).to_have_url(re.compile(r"/login\?next=%2Ftemplates$"))
