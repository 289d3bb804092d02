"""AppTest of the Ledger page: filter the recorded executions, open one, re-run it exactly and say whether it
reproduces."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core import executions, templates
from tests.conftest import APP_PATH

GREET = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to {{ name }}."}]


@pytest.fixture
def greet(pool):
    templates.create_template(pool, "greet", GREET, params={"max_tokens": 4, "temperature": 0.5})
    return templates.update_template(pool, "greet", [GREET[0], {"role": "user", "content": "Wave at {{ name }}."}],
                                     params={"max_tokens": 3, "temperature": 0.9})[0]


def open_ledger() -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/ledger.py")
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def frame(at: AppTest, column: str):
    """The first dataframe on the page with this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_rerun_an_execution_from_the_ledger(app_env, pool, backend, greet):
    _, first = executions.execute(pool, backend, "greet", {"name": "Ada"}, params={"temperature": 1.0, "max_tokens": 8})
    executions.execute(pool, backend, "greet", {"name": "Bo"}, version=1, source="cli")
    at = open_ledger()
    at.selectbox(key="ledger.source").set_value("api").run()
    assert at.selectbox(key="ledger.open").value == first
    assert list(frame(at, "id")["id"]) == [first]
    at.button(key="ledger.rerun").click().run()
    assert not at.exception and not errors(at)
    new = executions.list_executions(pool, rerun_of=first)[0]
    assert [s.value for s in at.success] == [f"Identical output: execution #{new.id} reproduces #{first} exactly "
                                             f"(seed {new.seed})."]
    assert new.output == executions.get_execution(pool, first).output and new.source == "rerun"
    usage = frame(at, "runs")  # template usage follows from the ledger: two runs and the re-run
    assert usage[usage["template"] == "greet"]["runs"].tolist() == [3]
    # Filters: version and status narrow the list.
    at.selectbox(key="ledger.source").set_value("All")
    at.selectbox(key="ledger.version").set_value(1).run()
    assert list(frame(at, "id")["template"]) == ["greet@1"]
    at.selectbox(key="ledger.status").set_value("error").run()
    assert any("No executions match" in i.value for i in at.info)


def test_a_rerun_that_differs_says_so(app_env, pool, backend):
    from core.executions import Origin
    from core.llm import GenerationParams

    eid = executions.record(pool, origin=Origin("api"), status="ok", output="never", backend=backend,
                            params=GenerationParams(max_tokens=3, seed=1), messages=[{"role": "user", "content": "Hi"}])
    at = open_ledger()
    at.button(key="ledger.rerun").click().run()
    assert not at.exception
    assert any(f"does not reproduce #{eid}" in w.value for w in at.warning)


def test_a_rerun_that_fails_is_one_clear_line(app_env, pool, backend):
    from core.executions import Origin
    from core.llm import GenerationParams

    eid = executions.record(pool, origin=Origin("api"), status="ok", output="x", backend=backend,
                            params=GenerationParams(max_tokens=3, seed=1),
                            messages=[{"role": "user", "content": "word " * (backend.n_ctx + 10)}])
    at = open_ledger()
    at.button(key="ledger.rerun").click().run()
    assert not at.exception
    new = executions.list_executions(pool, rerun_of=eid)[0]
    assert new.status == "error" and "context holds" in new.error
    assert errors(at) == [f"Re-run #{new.id} failed, so it does not reproduce #{eid}: {new.error}"]
