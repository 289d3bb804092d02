"""Errors on the pages follow core.errors: an expected one is one line; anything else is a bug, shown as Streamlit's
error box with its traceback and logged with it on the server."""

from __future__ import annotations

import logging

import pytest
from streamlit.testing.v1 import AppTest

from core import datasets, templates
from tests.conftest import APP_PATH


def broken(*args, **kwargs):
    raise KeyError("latest_version")


@pytest.mark.parametrize("module, function, page", [
    (templates, "list_templates", "pages/templates.py"),  # inside a block the page reports errors of
    (datasets, "list_datasets", "pages/datasets.py"),  # anywhere else on a page
])
def test_an_unexpected_error_is_shown_with_its_traceback_and_logged(app_env, pool, monkeypatch, caplog,
                                                                     module, function, page):
    monkeypatch.setattr(module, function, broken)
    caplog.set_level(logging.INFO, logger="promptdev.ui")
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.switch_page(page)
    at.run()
    assert [e.proto.type for e in at.exception] == ["KeyError"]  # Streamlit's error box, with the traceback
    assert any("broken" in line for line in at.exception[0].stack_trace)
    assert not [e.value for e in at.error if "KeyError" in e.value or "latest_version" in e.value]  # not one line
    [record] = [r for r in caplog.records if r.name == "promptdev.ui" and r.exc_info]
    assert record.levelno == logging.ERROR and record.exc_info[0] is KeyError
    assert "Traceback (most recent call last)" in caplog.text and "in broken" in caplog.text


def test_an_expected_error_is_one_line(app_env, pool, monkeypatch):
    from core.errors import NotFound

    def gone(*args, **kwargs):
        raise NotFound("no dataset named 'x'\nwith details below")

    monkeypatch.setattr(datasets, "list_datasets", gone)
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.switch_page("pages/datasets.py")
    at.run()
    assert not at.exception and [e.value for e in at.error] == ["no dataset named 'x'"]


def test_an_unexpected_error_in_an_action_is_shown_with_its_traceback_and_logged(app_env, pool, backend, settings,
                                                                                 monkeypatch, caplog):
    from core import conversations

    conversations.send_message(pool, backend, settings, "kim", "hi", params={"max_tokens": 2, "seed": 1})
    monkeypatch.setattr(conversations, "halt_conversation", broken)
    caplog.set_level(logging.INFO, logger="promptdev.ui")
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.switch_page("pages/monitor.py")
    at.run()
    at.text_input(key="monitor.halt_reason").input("why").run()
    at.button(key="monitor.halt").click().run()  # a widget callback: shown on the run it triggers
    assert [e.proto.type for e in at.exception] == ["KeyError"] and not at.error
    [record] = [r for r in caplog.records if r.name == "promptdev.ui" and r.exc_info]
    assert record.levelno == logging.ERROR and record.exc_info[0] is KeyError
