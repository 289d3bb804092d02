"""AppTest of the app shell and Home: live database and model facts, warm-up."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from tests.conftest import APP_PATH


def test_home_shows_database_and_model_and_warms_up(app_env, backend):
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    assert not at.exception
    markdown = " ".join(m.value for m in at.markdown)
    assert "Embedded" in markdown or "External" in markdown
    assert "PostgreSQL 1" in markdown
    assert "gemma-3-270m" in markdown
    labels = {m.label: m.value for m in at.metric}
    assert labels["Context"] == "4,096" and labels["Migrations"] != "0"
    assert labels["File size"].endswith("MB")
    for figure in ("Users", "Conversations active today", "Messages", "Halted conversations", "Guardrail events",
                   "Executions", "Evaluation runs"):
        assert labels[figure] == "0"
    at.button(key="home.warmup").click().run()
    assert not at.exception
    assert not at.error
    assert at.success and "tokens/s" in at.success[0].value


def test_bad_configuration_is_one_clear_error(app_env, monkeypatch):
    monkeypatch.setenv("PROMPTDEV_N_CTX", "huge")
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.run()
    assert not at.exception
    assert at.error and "PROMPTDEV_N_CTX" in at.error[0].value


def test_missing_model_file_is_one_clear_error(app_env, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTDEV_MODEL_PATH", str(tmp_path / "missing.gguf"))
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.run()
    assert not at.exception
    assert any("missing.gguf" in e.value for e in at.error)


def test_app_serves_prometheus_metrics_when_a_port_is_set(app_env, monkeypatch):
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    monkeypatch.setenv("PROMPTDEV_METRICS_PORT", str(port))
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.run()
    assert not at.exception
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "# TYPE promptdev_generations_total counter" in body and "promptdev_generation_latency_seconds" in body
