"""Evaluation runs on the real model: definition, prefix ordering, results and the ledger, cancel/resume, leases,
a worker process killed mid-run, two workers on one run, re-runs, comparison with significance tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from core import datasets, evaluations, executions, templates
from core.config import PROJECT_ROOT
from core.llm import GenerationParams

SYSTEM = "You are a terse assistant. Reply with a single word. " * 4


def make_template(pool, name="qa", system=SYSTEM, max_tokens=4, **kw):
    return templates.create_template(pool, name, [{"role": "system", "content": system},
                                                  {"role": "user", "content": "{{ q }}"}],
                                     params={"max_tokens": max_tokens, "temperature": 0.0}, **kw)


def make_dataset(pool, n=4, name="d"):
    questions = ["Capital of France?", "Two plus two?", "Colour of the sky?", "Opposite of hot?", "A fruit?",
                 "A pet?", "Day after Monday?", "Ice is?", "Sun rises in the?", "A metal?", "Bird that hoots?",
                 "Cats say?"]
    expected = ["Paris", "Four", "Blue", "Cold", "Apple", "Dog", "Tuesday", "Cold", "East", "Iron", "Owl", "Meow"]
    return datasets.add_items(pool, name, [{"input": {"q": questions[i % 12]}, "expected": expected[i % 12]}
                                           for i in range(n)], create=True)


def run_all(pool, settings, run_id=None):
    while evaluations.run_next(pool, settings, run_id=run_id):
        pass


def count(pool, sql, *args):
    with pool.connection() as conn:
        return conn.execute(sql, args).fetchone()[0]


def test_a_bad_definition_writes_nothing(pool, settings):
    make_template(pool)
    make_dataset(pool, 2)
    datasets.create_dataset(pool, "empty")
    ok = dict(dataset="d", templates=["qa"], evaluators=[{"type": "contains", "value": "a"}])
    for change, message in [
        ({"dataset": "nope"}, "no dataset named 'nope'"),
        ({"dataset": "empty"}, "has no items"),
        ({"tag": "absent"}, "has no items tagged 'absent'"),
        ({"templates": ["missing"]}, "no template named 'missing'"),
        ({"templates": ["qa@staging"]}, "has no label 'staging'"),
        ({"templates": ["qa@9"]}, "has no version 9"),
        ({"templates": ["qa", "qa@1"]}, "same version"),
        ({"templates": ["Bad Ref"]}, "not a template reference"),
        ({"templates": []}, "at least one template"),
        ({"evaluators": [{"type": "bogus"}]}, "evaluator 1: unknown evaluator type"),
        ({"evaluators": []}, "no evaluators"),
        ({"params": {"temperature": 9}}, "temperature must be between"),
        ({"params": {"colour": 1}}, "unknown parameter"),
        ({"model": "unregistered"}, "no model named 'unregistered'"),
        ({"evaluators": [{"type": "llm-rubric", "value": "polite", "provider": "gpt-9"}]},
         "the judge model 'gpt-9' is not registered"),
    ]:
        with pytest.raises((ValueError, LookupError), match=message):
            evaluations.create_run(pool, settings, **{**ok, **change})
    assert count(pool, "SELECT count(*) FROM eval_runs") == 0


def test_run_resolves_labels_orders_by_prefix_and_records_results(pool, settings, backend):
    v1 = make_template(pool)
    v2, _ = templates.update_template(pool, "qa", [{"role": "system", "content": "Answer briefly. " * 6},
                                                   {"role": "user", "content": "{{ q }}"}])
    templates.set_label(pool, "qa", "production", 1)
    ids = make_dataset(pool, 4)
    datasets.add_item(pool, "d", {"other": "x"}, "?")  # cannot render: recorded as an error result
    datasets.update_item(pool, ids[0], metadata={"assert": [{"type": "completion-tokens", "threshold": 4}]})
    run = evaluations.create_run(
        pool, settings, dataset="d", templates=["qa@production", "qa@latest"], name="labels", created_by="ann",
        evaluators=[{"type": "icontains"}, {"type": "latency", "threshold": 600000}, {"type": "regex", "value": "."}])
    assert [(v.template_version_id, v.label, v.ref) for v in run.versions] == [
        (v1.id, "production", "qa@production"), (v2.id, "latest", "qa@latest")]
    assert run.status == "queued" and run.total == 10 and run.model_name == backend.name
    # Work items are ordered by rendered prompt: each system prompt's items run one after another.
    with pool.connection() as conn:
        order = conn.execute("SELECT position, messages, render_error FROM eval_work_items WHERE run_id = %s "
                             "ORDER BY seq", (run.id,)).fetchall()
    keys = [evaluations._sort_key(m) for _, m, _ in order]
    assert keys == sorted(keys)
    assert [e is not None for _, _, e in order][:2] == [True, True]   # unrenderable items first (nothing to share)
    positions = [p for p, m, _ in order if m is not None]
    assert positions in ([1] * 4 + [0] * 4, [0] * 4 + [1] * 4)

    run_all(pool, settings)
    prog = evaluations.progress(pool, run.id)
    assert (prog.status, prog.done, prog.total, prog.running, prog.queued) == ("done", 10, 10, 0, 0)
    assert prog.errors == 2 and prog.finished and prog.elapsed_s > 0 and prog.eta_s is None
    results = evaluations.list_results(pool, run.id)
    assert len(results) == 10 and len({r.work_item_id for r in results}) == 10
    ok = [r for r in results if r.error is None]
    assert len(ok) == 8
    for r in ok:
        row = executions.get_execution(pool, r.execution_id)
        assert row.source == "evaluation" and row.output == r.output and row.user_id == "ann"
        assert row.template_version_id == run.versions[r.position].template_version_id
        assert row.variables == r.input and row.params["max_tokens"] == 4 and row.seed == 0
        assert r.completion_tokens == row.completion_tokens <= 4 and r.latency_ms > 0
        names = [c["name"] for c in r.checks]
        assert names[:3] == ["icontains", "latency", "regex"]
        assert r.checks[1]["passed"] and r.passed == all(c["passed"] for c in r.checks)
        if r.item_id == ids[0]:
            assert names[3:] == ["completion-tokens"] and r.checks[3]["origin"] == "item" and r.checks[3]["passed"]
    failed = [r for r in results if r.error is not None]
    assert all("missing variable" in r.error and not r.passed and r.execution_id is None for r in failed)

    summaries = evaluations.summarize_run(pool, run.id)
    assert [s.title for s in summaries] == ["qa@1 (production)", "qa@2"]
    for s in summaries:
        mine = [r for r in results if r.position == s.position]
        assert s.n == 5 and s.errors == 1 and s.passed == sum(r.passed for r in mine)
        assert s.pass_ci[0] <= s.pass_rate <= s.pass_ci[1]
        by_name = {e.name: e for e in s.evaluators}
        assert by_name["latency"].n == 4 and by_name["latency"].pass_rate == 1.0
        assert by_name["completion-tokens"].origin == "item" and by_name["completion-tokens"].n == 1
    table = evaluations.summary_table(summaries)
    assert "qa@1 (production)" in table and "pass rate" in table

    # An edit after the run makes a new revision; the run still shows what it evaluated.
    datasets.update_item(pool, ids[1], expected="FOUR!")
    again = {r.item_id: r for r in evaluations.list_results(pool, run.id, position=0)}
    assert again[ids[1]].expected == "Four" and again[ids[1]].revision == 1
    assert datasets.get_item(pool, ids[1]).revision == 2


def test_every_output_is_byte_identical_to_a_cold_run(pool, settings, backend):
    # A shared prefix of several n_batch blocks; items are claimed and decoded PROMPTDEV_EVAL_BATCH at a time.
    assert settings.eval_batch > 1
    make_template(pool, system=SYSTEM * 5, max_tokens=8)
    make_dataset(pool, 6)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["is-json"],
                                 params={"temperature": 0.9, "seed": 7})
    run_all(pool, settings)
    results = evaluations.list_results(pool, run.id)
    assert len(results) == 6 and results[0].prompt_tokens > 2 * backend.n_batch
    for r in results:
        row = executions.get_execution(pool, r.execution_id)
        backend.llm.reset()
        with backend.generate(row.messages, params=GenerationParams.from_dict(row.params)) as gen:
            assert gen.read() == r.output


def test_cancel_and_resume(pool, settings):
    make_template(pool)
    make_dataset(pool, 3)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    assert evaluations.run_next(pool, replace(settings, eval_batch=1))   # one item, then the run is cancelled
    assert evaluations.cancel_run(pool, run.id)
    prog = evaluations.progress(pool, run.id)
    assert (prog.status, prog.done, prog.cancelled, prog.queued) == ("cancelled", 1, 2, 0)
    assert not evaluations.run_next(pool, settings)       # nothing is claimed from a cancelled run
    assert not evaluations.cancel_run(pool, run.id)
    assert evaluations.resume_run(pool, run.id) == 2
    with pytest.raises(ValueError, match="only a cancelled run"):
        evaluations.resume_run(pool, run.id)
    run_all(pool, settings)
    prog = evaluations.progress(pool, run.id)
    assert (prog.status, prog.done, prog.cancelled) == ("done", 3, 0)
    with pytest.raises(LookupError):
        evaluations.cancel_run(pool, 424242)


def test_items_are_claimed_together_in_prefix_order_and_their_leases_kept(pool, settings):
    make_template(pool)
    make_dataset(pool, 5)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    works = evaluations.claim_many(pool, "w1", run_id=run.id, limit=3, lease_s=30)
    assert [w.seq for w in works] == sorted(w.seq for w in works) and len(works) == 3
    assert {w.id for w in evaluations.claim_many(pool, "w2", limit=10)}.isdisjoint(w.id for w in works)
    with pool.connection() as conn:
        conn.execute("UPDATE eval_work_items SET lease_until = now() WHERE run_id = %s", (run.id,))
    with evaluations._Heartbeat(pool, works, lease_s=30, every_s=0.05):
        time.sleep(0.3)
    with pool.connection() as conn:
        kept = conn.execute("SELECT count(*) FROM eval_work_items WHERE id = ANY(%s) AND lease_until > now() + "
                            "interval '20 seconds'", ([w.id for w in works],)).fetchone()[0]
    assert kept == 3
    assert evaluations.process_many(pool, settings, works, "w1") == 3


def test_an_expired_lease_is_claimed_again_and_the_old_claim_cannot_write(pool, settings):
    make_template(pool)
    make_dataset(pool, 2)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    stale = evaluations.claim(pool, "dead-worker", lease_s=60)
    assert stale is not None and stale.attempts == 1
    # While the lease holds, nobody else takes the item.
    other = evaluations.claim(pool, "w2", lease_s=60)
    assert other is not None and other.id != stale.id
    evaluations.process(pool, settings, other, "w2")
    assert evaluations.claim(pool, "w3") is None
    with pool.connection() as conn:  # time passes: the lease runs out
        conn.execute("UPDATE eval_work_items SET lease_until = now() - interval '1 second' WHERE id = %s", (stale.id,))
    again = evaluations.claim(pool, "w3")
    assert again.id == stale.id and again.attempts == 2
    assert evaluations.process(pool, settings, again, "w3")
    # The first worker wakes up: its claim is fenced off, its result is dropped.
    assert not evaluations.process(pool, settings, stale, "dead-worker")
    results = evaluations.list_results(pool, run.id)
    assert sorted(r.worker for r in results) == ["w2", "w3"]
    assert evaluations.progress(pool, run.id).status == "done"


def test_cancelling_a_run_whose_worker_died_finishes_it(pool, settings):
    make_template(pool)
    make_dataset(pool, 2)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    assert evaluations.claim(pool, "died", lease_s=0) is not None
    time.sleep(0.01)
    evaluations.cancel_run(pool, run.id)
    prog = evaluations.progress(pool, run.id)
    assert prog.finished and (prog.cancelled, prog.running, prog.queued) == (2, 0, 0)
    assert evaluations.work_on(pool, settings, run.id).status == "cancelled"   # returns at once


def test_an_item_whose_workers_keep_dying_fails_after_max_attempts(pool, settings):
    make_template(pool)
    make_dataset(pool, 1)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    for _ in range(evaluations.MAX_ATTEMPTS):
        assert evaluations.claim(pool, "crashy", lease_s=0) is not None
        time.sleep(0.01)
    assert evaluations.run_next(pool, settings)
    (result,) = evaluations.list_results(pool, run.id)
    assert not result.passed and "gave up after 3 attempts" in result.error


def test_items_claimed_again_are_claimed_alone_so_a_crashing_item_spends_only_its_own_attempts(pool, settings):
    make_template(pool)
    make_dataset(pool, 5)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    batch = evaluations.claim_many(pool, "crashy", run_id=run.id, limit=3, lease_s=0)   # its worker dies on them
    assert [w.attempts for w in batch] == [1, 1, 1]
    time.sleep(0.01)
    for crashed in batch:   # each is taken over alone, before the items nobody has tried yet
        assert [(w.id, w.attempts) for w in evaluations.claim_many(pool, "w2", limit=3)] == [(crashed.id, 2)]
    fresh = evaluations.claim_many(pool, "w2", limit=3)
    assert len(fresh) == 2 and {w.attempts for w in fresh} == {1} and not {w.id for w in fresh} & {w.id for w in batch}
    # An item that keeps killing its workers gives up alone; the items once claimed with it are evaluated.
    with pool.connection() as conn:
        conn.execute("UPDATE eval_work_items SET lease_until = now() - interval '1 second' WHERE id = %s "
                     "OR id = %s", (batch[0].id, batch[1].id))
    for _ in range(evaluations.MAX_ATTEMPTS - 1):
        assert [w.id for w in evaluations.claim_many(pool, "crashy", limit=3, lease_s=0)] == [batch[0].id]
        time.sleep(0.01)
    with pool.connection() as conn:
        conn.execute("UPDATE eval_work_items SET lease_until = now() - interval '1 second' WHERE run_id = %s "
                     "AND status = 'running'", (run.id,))
    run_all(pool, settings)
    results = {r.item_id: r for r in evaluations.list_results(pool, run.id)}
    assert len(results) == 5
    assert [r.item_id for r in results.values() if r.error] == [batch[0].item_id]
    assert "gave up after 3 attempts" in results[batch[0].item_id].error


def _worker_process(settings):
    env = {**os.environ, "PROMPTDEV_DATABASE_URL": settings.database_url, "PROMPTDEV_DATA_DIR": str(settings.data_dir),
           "PROMPTDEV_MODEL_PATH": str(settings.model_path)}
    return subprocess.Popen([sys.executable, "-m", "core.cli", "worker", "--quiet"], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(predicate, timeout=180.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_worker_process_killed_mid_run_resumes_without_loss_or_duplicates(pool, settings):
    make_template(pool, max_tokens=6)
    make_dataset(pool, 6)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    proc = _worker_process(settings)
    try:
        _wait(lambda: count(pool, "SELECT count(*) FROM eval_results WHERE run_id = %s", run.id) >= 1 and
              count(pool, "SELECT count(*) FROM eval_work_items WHERE run_id = %s AND status = 'running'", run.id) >= 1,
              proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The killed worker's liveness lock went with it: its claims count as queued at once, with no lease to wait out
    # (their leases still hold), and this worker takes them over.
    _wait(lambda: evaluations.progress(pool, run.id).running == 0, timeout=10)
    prog = evaluations.progress(pool, run.id)
    assert prog.status == "running" and 1 <= prog.done < 6 and prog.queued == 6 - prog.done
    assert count(pool, "SELECT count(*) FROM eval_work_items WHERE run_id = %s AND status = 'running' "
                       "AND lease_until > now()", run.id) >= 1
    evaluations.work_on(pool, settings, run.id)
    prog = evaluations.progress(pool, run.id)
    assert (prog.status, prog.done, prog.total) == ("done", 6, 6)
    assert count(pool, "SELECT count(*) FROM eval_results WHERE run_id = %s", run.id) == 6
    assert count(pool, "SELECT max(attempts) FROM eval_work_items WHERE run_id = %s", run.id) == 2


def test_two_workers_share_one_run_and_evaluate_no_item_twice(pool, settings):
    make_template(pool, max_tokens=3)
    make_dataset(pool, 12)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=["contains: e"])
    proc = _worker_process(settings)
    try:
        _wait(lambda: count(pool, "SELECT count(*) FROM eval_work_items WHERE run_id = %s AND status <> 'queued'",
                            run.id) >= 1, proc=proc)
        seen = []
        evaluations.work_on(pool, settings, run.id, on_progress=seen.append)
        assert seen and seen[-1].done == 12
    finally:
        proc.terminate()
        proc.wait(30)
    workers = {r.worker for r in evaluations.list_results(pool, run.id)}
    assert len(workers) == 2
    assert count(pool, "SELECT count(*) FROM eval_results WHERE run_id = %s", run.id) == 12
    assert count(pool, "SELECT max(attempts) FROM eval_work_items WHERE run_id = %s", run.id) == 1
    assert count(pool, "SELECT count(*) FROM executions WHERE source = 'evaluation'") == 12


def test_rerun_keeps_versions_or_follows_labels(pool, settings):
    make_template(pool)
    make_dataset(pool, 2)
    templates.set_label(pool, "qa", "production", 1)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa@production"], evaluators=["is-json"],
                                 params={"max_tokens": 2})
    v2, _ = templates.update_template(pool, "qa", [{"role": "user", "content": "Say {{ q }}"}])
    templates.set_label(pool, "qa", "production", 2)
    same = evaluations.rerun(pool, settings, run.id)
    assert same.versions[0].template_version_id == run.versions[0].template_version_id
    assert same.rerun_of == run.id and same.source == "rerun" and same.params == {"max_tokens": 2}
    moved = evaluations.rerun(pool, settings, run.id, resolve_labels=True)
    assert moved.versions[0].template_version_id == v2.id and moved.versions[0].label == "production"
    assert [r.id for r in evaluations.list_runs(pool, dataset="d")] == [moved.id, same.id, run.id]
    evaluations.delete_run(pool, moved.id)
    with pytest.raises(LookupError):
        evaluations.get_run(pool, moved.id)


def test_compare_two_versions_with_paired_tests(pool, settings):
    # v1 may write at most 1 token, v2 up to 4: "completion-tokens <= 1" separates them.
    make_template(pool, max_tokens=1)
    templates.update_template(pool, "qa", [{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": "{{ q }}"}],
                              params={"max_tokens": 4, "temperature": 0.0})
    make_dataset(pool, 4)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa@1", "qa@2"],
                                 evaluators=[{"type": "completion-tokens", "threshold": 1}, {"type": "icontains"}])
    run_all(pool, settings)
    comparison = evaluations.compare(pool, run.id)
    assert comparison.titles == ["qa@1", "qa@2"] and len(comparison.rows) == 4
    (test,) = comparison.tests
    a = {r.item_id: r for r in evaluations.list_results(pool, run.id, position=0)}
    b = {r.item_id: r for r in evaluations.list_results(pool, run.id, position=1)}
    assert all(r.checks[0]["passed"] and r.completion_tokens <= 1 for r in a.values())
    only_a = sum(1 for i in a if a[i].passed and not b[i].passed)
    only_b = sum(1 for i in a if b[i].passed and not a[i].passed)
    assert (test.mcnemar.b, test.mcnemar.c, test.n_pairs) == (only_a, only_b, 4)
    assert test.bootstrap.mean_diff == pytest.approx(sum(b[i].score - a[i].score for i in a) / 4)
    assert test.pass_verdict and test.score_verdict
    disagree = {r["item_id"] for r in comparison.disagreements()}
    assert disagree == {i for i in a if a[i].passed != b[i].passed}
    row = comparison.rows[0]
    assert set(row) >= {"item_id", "input", "expected", "output 1", "output 2", "passed 1", "score 2", "disagree"}
    with pytest.raises(ValueError, match="at least two"):
        evaluations.compare(pool, [(run.id, 0)])
    # Across runs over the same dataset, versions pair up by item.
    other = evaluations.create_run(pool, settings, dataset="d", templates=["qa@2"], evaluators=run.evaluators)
    run_all(pool, settings)
    across = evaluations.compare(pool, [(run.id, 1), (other.id, 0)])
    assert across.titles == ["qa@2 · run 1", "qa@2 · run 2"]
    assert across.tests[0].n_pairs == 4 and across.tests[0].mcnemar.n_discordant == 0  # same version, same seed
    assert all(r["same output"] for r in across.rows)


def test_llm_judge_generation_is_recorded_as_judge(pool, settings):
    make_template(pool, max_tokens=4)
    make_dataset(pool, 1)
    run = evaluations.create_run(pool, settings, dataset="d", templates=["qa"], evaluators=[
        {"type": "llm-rubric", "value": "The answer is a single word.", "options": {"max_tokens": 16}}])
    run_all(pool, settings)
    (result,) = evaluations.list_results(pool, run.id)
    (check,) = result.checks
    judged = executions.get_execution(pool, check["execution_id"])
    assert judged.source == "judge" and judged.variables["output"] == result.output
    assert "The answer is a single word." in judged.messages[1]["content"] and judged.params["max_tokens"] == 16
    assert check["reason"]  # pass or fail, the judge's reason (or why its answer was not understood) is kept


def test_diffs():
    assert evaluations.inline_diff("the cat sat", "the dog sat") == "the [-cat-]{+dog+} sat"
    assert evaluations.inline_diff(None, "x") == "{+x+}"
    text = evaluations.unified_diff("a\nb", "a\nc")
    assert "-b" in text and "+c" in text and text.startswith("--- expected")
    assert evaluations.format_duration(75) == "1 min 15 s" and evaluations.format_duration(None) == "—"
