"""AppTest of the Models page: the registry, registering a server (a clash refused in one line), removing a model."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import models
from tests.conftest import APP_PATH


def open_models() -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/models.py")
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_models_page_registers_and_removes(app_env, pool, backend, default_model_path):
    at = open_models()
    assert at.dataframe[-1].value["name"].tolist() == [default_model_path.stem]
    at.text_input(key="models.name").input("remote")
    at.radio(key="models.kind").set_value("OpenAI-compatible server")
    at.text_input(key="models.base_url").input("http://127.0.0.1:9/v1")
    at.text_input(key="models.remote_model").input("m")
    at.button(key="FormSubmitter:models.form-Register").click().run()
    assert not at.exception and any("Registered remote" in s.value for s in at.success)
    assert [m.name for m in models.list_models(pool)] == [default_model_path.stem, "remote"]
    at.button(key="FormSubmitter:models.form-Register").click().run()
    assert "a model named 'remote' is already registered" in errors(at)
    at.switch_page("pages/playground.py").run()  # the Playground offers the new model
    assert "remote" in at.selectbox(key="playground.run.model").options
    at.switch_page("pages/models.py").run()
    at.button(key="models.remove").click().run()
    assert [m.name for m in models.list_models(pool)] == [default_model_path.stem]
