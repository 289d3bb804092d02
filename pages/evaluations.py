"""Evaluations: start runs (dataset × template versions × model × evaluators), follow them live, read results and
aggregates, compare versions with significance tests, import promptfoo configs. Runs execute in background workers:
leaving the page does not stop them. Every action calls core.evaluations / core.promptfoo."""

from __future__ import annotations

import json
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from core import datasets as ds
from core import evaluations as ev
from core import evaluators, promptfoo, untrusted
from core.errors import InvalidInput
from pages import glue, widgets
from pages.widgets import code_span, md, safe_md

VIEWS = ("Runs", "New run", "Compare", "Import promptfoo")
EVALUATOR_TYPES = sorted(evaluators.TYPES)
NONE = "(none)"

# Session-state keys.
KEY_VIEW = "evaluations.view"
KEY_RUN = "evaluations.run"               # the open run's id
KEY_COMPARE_RUN = "evaluations.compare.run"
KEY_DISAGREE = "evaluations.compare.disagree"
KEY_FAILED_ONLY = "evaluations.results.failed"


def run_label(run: ev.Run) -> str:
    """`#12 name · dataset · versions · status` for pickers."""
    versions = ", ".join(v.title for v in run.versions)
    return f"#{run.id}{' ' + run.name if run.name else ''} · {run.dataset_name} · {versions} · {run.status}"


def pct(x: float | None) -> str:
    """0.5 -> '50.0%'."""
    return "—" if x is None else f"{x:.1%}"


# ------------------------------------------------------------------------------------------------------ new run

def evaluator_list(text: str) -> list:
    """Evaluators typed as YAML (a promptfoo assert list)."""
    specs = untrusted.load_yaml(text, "The evaluators")
    if not isinstance(specs, list):
        raise InvalidInput("The YAML must be a list of evaluators (- type: ...)")
    return specs


def new_run_view(pool, settings) -> None:
    """Define a run and queue it."""
    all_datasets = ds.list_datasets(pool)
    if not all_datasets:
        st.info("No datasets yet: create or import one on the Datasets page first.")
        return
    refs = ev.template_choices(pool)
    if not refs:
        st.info("No templates yet: create one on the Templates page first.")
        return
    model_names = [m.name for m in glue.model_registry(pool, settings)]
    a, b = st.columns(2)
    names = [d.name for d in all_datasets]
    dataset_name = a.selectbox("Dataset", names, key="evaluations.new.dataset")
    dataset = next(d for d in all_datasets if d.name == dataset_name)
    tags = ds.dataset_tags(pool, dataset_name)
    tag = b.selectbox("Items", ["All items", *tags], key="evaluations.new.tag")
    default_refs = []
    if dataset.default_template:
        wanted = dataset.default_template if "@" in dataset.default_template else f"{dataset.default_template}@latest"
        default_refs = [wanted] if wanted in refs else []
    chosen = st.multiselect("Template versions", refs, default=default_refs, key="evaluations.new.templates",
                            help="A label (production, staging) is resolved to its exact version when the run starts")
    c, d = st.columns(2)
    model = c.selectbox("Model", model_names, key="evaluations.new.model")
    name = d.text_input("Run name", key="evaluations.new.name", placeholder="optional")
    override = st.checkbox("Override the versions' parameters", key="evaluations.new.override",
                           help="Otherwise each version runs with its own default parameters (and seed 0)")
    params = {}
    if override:
        p1, p2, p3, p4 = st.columns(4)
        params = {"temperature": p1.number_input("temperature", 0.0, 5.0, 0.0, 0.1, key="evaluations.new.temp"),
                  "max_tokens": int(p2.number_input("max_tokens", 1, 32768, 256, key="evaluations.new.max_tokens")),
                  "seed": int(p3.number_input("seed", 0, 2**32 - 1, 0, key="evaluations.new.seed")),
                  "top_p": p4.number_input("top_p", 0.01, 1.0, 0.95, 0.05, key="evaluations.new.top_p")}
    st.markdown("**Evaluators**")
    st.caption("promptfoo assertion types. A reference evaluator without a value compares with the item's expected "
               "output; values may use the item's variables ({{ name }}). Items may also carry their own `assert` "
               "(and a `threshold`: the item passes when its weighted score reaches it) in their metadata.")
    grid = st.data_editor(
        pd.DataFrame([{"type": "icontains", "negate": False, "value": None, "threshold": None, "weight": 1.0,
                       "name": None, "provider": None}]),
        key="evaluations.new.evaluators", num_rows="dynamic", hide_index=True, width="stretch",
        column_config={
            "type": st.column_config.SelectboxColumn("type", options=EVALUATOR_TYPES, required=True),
            "negate": st.column_config.CheckboxColumn("not", help="Pass when the check fails"),
            "value": st.column_config.TextColumn("value", help="Text, list (a, b), regex, JSON Schema or rubric"),
            "threshold": st.column_config.NumberColumn("threshold"),
            "weight": st.column_config.NumberColumn(
                "weight", min_value=0.0,
                help="How much the check counts in the item's score; any failed check still fails the item"),
            "name": st.column_config.TextColumn("name"),
            "provider": st.column_config.TextColumn("judge model", help="llm-rubric: a registered model"),
        })
    as_yaml = st.text_area("…or as YAML (a promptfoo assert list; used instead of the table when filled)",
                           key="evaluations.new.yaml", height=120,
                           placeholder="- type: icontains\n  value: '{{ city }}'\n- type: latency\n  threshold: 2000")
    if st.button("Start run", key="evaluations.new.start", type="primary", disabled=not chosen):
        with glue.reported():
            specs = (evaluator_list(as_yaml) if as_yaml.strip() else
                     [s for s in (evaluators.spec_from_row(r) for r in grid.to_dict("records")) if s])
            run = ev.create_run(pool, settings, dataset=dataset_name, templates=chosen, evaluators=specs,
                                model=model, params=params, tag=None if tag == "All items" else tag, name=name,
                                created_by=glue.current_user(), source="ui")
            widgets.flash("success", f"Run #{run.id} queued: {run.total} item(s). Workers run it in the "
                                     f"background — leaving this page does not stop it.")
            widgets.rerun_with(**{KEY_VIEW: "Runs", KEY_RUN: run.id})


# ---------------------------------------------------------------------------------------------------------- runs

def progress_panel(pool, run_id: int) -> ev.Progress:
    """The progress bar and its figures."""
    p = ev.progress(pool, run_id)
    text = f"{p.done} / {p.total} done" + (f" · {p.running} running" if p.running else "")
    st.progress(p.fraction, text=text)
    a, b, c, d = st.columns(4)
    a.metric("Status", p.status)
    b.metric("Pass rate so far", pct(p.pass_rate))
    c.metric("Elapsed", ev.format_duration(p.elapsed_s))
    d.metric("Time left", ev.format_duration(p.eta_s) if p.status == "running" else "—")
    return p


@st.fragment(run_every=2)
def live_progress(pool, run_id: int) -> None:
    """Refreshes every two seconds while the run is active; the whole page refreshes when it ends."""
    p = progress_panel(pool, run_id)
    if p.finished:
        st.rerun()


def summary_frame(summaries: list[ev.VersionSummary]) -> pd.DataFrame:
    """Per-version aggregates for a table."""
    return pd.DataFrame([{
        "version": s.title, "items": s.n, "passed": s.passed, "pass rate": pct(s.pass_rate),
        "95% CI": f"{s.pass_ci[0]:.0%} – {s.pass_ci[1]:.0%}",
        "mean score": None if s.mean_score is None else round(s.mean_score, 3),
        "score 95% CI": "—" if s.mean_score is None else f"{s.score_ci[0]:.3f} – {s.score_ci[1]:.3f}",
        "latency ms": None if s.mean_latency_ms is None else round(s.mean_latency_ms),
        "tokens in": None if s.mean_prompt_tokens is None else round(s.mean_prompt_tokens, 1),
        "tokens out": None if s.mean_completion_tokens is None else round(s.mean_completion_tokens, 1),
        "errors": s.errors} for s in summaries])


def pass_rate_chart(titles: list[str], summaries: list[ev.VersionSummary]) -> alt.Chart:
    """Pass rate per version with its Wilson interval."""
    data = pd.DataFrame([{"version": t, "pass rate": s.pass_rate, "low": s.pass_ci[0], "high": s.pass_ci[1],
                          "n": s.n} for t, s in zip(titles, summaries)])
    base = alt.Chart(data).encode(y=alt.Y("version:N", sort=None, title=None))
    bars = base.mark_bar().encode(x=alt.X("pass rate:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"),
                                          title="pass rate"),
                                  tooltip=["version", alt.Tooltip("pass rate:Q", format=".1%"), "n"])
    whiskers = base.mark_rule(strokeWidth=2, color="black").encode(x="low:Q", x2="high:Q")
    # A step per version (a fixed pixel height squeezed every row onto one line under Streamlit's autosize).
    return (bars + whiskers).properties(title="Pass rate (95% Wilson interval)", height=alt.Step(32))


def evaluator_chart(summaries: list[ev.VersionSummary], titles: list[str]) -> alt.Chart | None:
    """Pass rate of each evaluator, versions side by side."""
    rows = [{"evaluator": e.name + (" (item)" if e.origin == "item" else ""), "version": t, "pass rate": e.pass_rate,
             "n": e.n} for s, t in zip(summaries, titles) for e in s.evaluators]
    if not rows:
        return None
    return alt.Chart(pd.DataFrame(rows)).mark_bar().encode(
        x=alt.X("evaluator:N", title=None), xOffset="version:N",
        y=alt.Y("pass rate:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.Color("version:N", sort=None), tooltip=["evaluator", "version", alt.Tooltip("pass rate:Q",
                                                                                             format=".1%"), "n"],
    ).properties(title="Pass rate per evaluator", height=260)


def latency_chart(results: list[ev.Result], titles: dict[int, str]) -> alt.Chart | None:
    """Latency distribution per version."""
    data = pd.DataFrame([{"version": titles[r.position], "latency ms": r.latency_ms} for r in results
                         if r.latency_ms is not None])
    if data.empty:
        return None
    return alt.Chart(data).mark_boxplot().encode(x=alt.X("latency ms:Q"), y=alt.Y("version:N", sort=None, title=None)
                                                 ).properties(title="Latency", height=alt.Step(32))


def run_view(pool, settings) -> None:
    """Every run, and the open one: live progress, actions, aggregates, charts, results."""
    runs = ev.list_runs(pool, limit=200)
    if not runs:
        st.info("No evaluation runs yet: start one under New run, or import a promptfoo config.")
        return
    ids = [r.id for r in runs]
    if st.session_state.get(KEY_RUN) not in ids:
        st.session_state[KEY_RUN] = ids[0]
    by_id = {r.id: r for r in runs}
    st.selectbox("Run", ids, key=KEY_RUN, format_func=lambda i: run_label(by_id[i]))
    run = ev.get_run(pool, st.session_state[KEY_RUN])
    st.caption(md("Model {} · parameters {} · {} evaluator(s) · started by {} via {}", run.model_name,
                  json.dumps(run.params) if run.params else "of each version", len(run.evaluators),
                  run.created_by or "anonymous", run.source)
               + (f" · re-run of #{run.rerun_of}" if run.rerun_of else ""))
    active = run.status in ("queued", "running")
    if active:
        live_progress(pool, run.id)
    else:
        progress_panel(pool, run.id)
    a, b, c, d = st.columns(4)
    if active and a.button("Cancel run", key="evaluations.cancel"):
        with glue.reported():
            ev.cancel_run(pool, run.id)
            widgets.flash("info", f"Run #{run.id} cancelled; items being generated finish.")
            st.rerun()
    if run.status == "cancelled" and a.button("Resume", key="evaluations.resume"):
        with glue.reported():
            n = ev.resume_run(pool, run.id)
            widgets.flash("success", f"Run #{run.id}: {n} item(s) queued again.")
            st.rerun()
    resolve = c.checkbox("Follow labels", key="evaluations.rerun_labels",
                         help="Re-run with what the labels point at now instead of the same exact versions")
    if b.button("Re-run", key="evaluations.rerun"):
        with glue.reported():
            new = ev.rerun(pool, settings, run.id, resolve_labels=resolve, created_by=glue.current_user())
            widgets.flash("success", f"Run #{new.id} queued (re-run of #{run.id}).")
            widgets.rerun_with(**{KEY_RUN: new.id})
    if not active and d.button("Delete run", key="evaluations.delete"):
        with glue.reported():
            ev.delete_run(pool, run.id)
            widgets.flash("info", f"Run #{run.id} deleted.")
            widgets.rerun_with(**{KEY_RUN: None})
    summaries = ev.summarize_run(pool, run.id)
    if not any(s.n for s in summaries):
        return
    st.subheader("Results per version")
    st.dataframe(summary_frame(summaries), hide_index=True, width="stretch")
    titles = [s.title for s in summaries]
    left, right = st.columns(2)
    left.altair_chart(pass_rate_chart(titles, summaries), width="stretch")
    chart = evaluator_chart(summaries, titles)
    if chart is not None:
        right.altair_chart(chart, width="stretch")
    results = ev.list_results(pool, run.id, failed_only=st.session_state.get(KEY_FAILED_ONLY, False))
    chart = latency_chart(results, {s.position: s.title for s in summaries})
    if chart is not None:
        st.altair_chart(chart, width="stretch")
    if len(summaries) > 1:
        st.caption("Compare these versions with significance tests under Compare.")
    st.subheader("Items")
    st.checkbox("Only failures", key=KEY_FAILED_ONLY)
    titles_by_pos = {s.position: s.title for s in summaries}
    st.dataframe(pd.DataFrame([{
        "item": r.item_id, "version": titles_by_pos[r.position], "passed": r.passed,
        "score": None if r.score is None else round(r.score, 3), "output": r.output if r.error is None else None,
        "expected": r.expected, "diff": ev.inline_diff(r.expected, r.output) if r.expected is not None else "",
        "failed checks": "; ".join(f"{c['name']}: {c['reason']}" for c in r.checks if not c["passed"]),
        "error": r.error, "latency ms": None if r.latency_ms is None else round(r.latency_ms),
        "tokens": r.completion_tokens, "execution": r.execution_id} for r in results]),
        hide_index=True, width="stretch")
    if results:
        labels = {f"item {r.item_id} · {titles_by_pos[r.position]}": r for r in results}
        pick = st.selectbox("Look at one result", list(labels), key="evaluations.result")
        r = labels[pick]
        st.markdown(f"**Input** {code_span(json.dumps(r.input, ensure_ascii=False))} · revision {r.revision}"
                    + (f" · execution #{r.execution_id}" if r.execution_id else ""))
        if r.checks:
            st.dataframe(pd.DataFrame([{k: c[k] for k in ("name", "origin", "passed", "score", "weight", "reason")}
                                       for c in r.checks]), hide_index=True, width="stretch")
        if r.error:
            st.error(safe_md(r.error))
        elif r.expected is not None:
            st.code(ev.unified_diff(r.expected, r.output) or "(output equals the expected output)", language="diff")
        else:
            st.code(r.output or "", language=None)


# ------------------------------------------------------------------------------------------------------- compare

def compare_view(pool) -> None:
    """Versions side by side with intervals, paired tests, and the items they disagree on."""
    runs = [r for r in ev.list_runs(pool, limit=200) if any(True for _ in r.versions)]
    if not runs:
        st.info("No evaluation runs to compare yet.")
        return
    by_id = {r.id: r for r in runs}
    ids = [r.id for r in runs]
    if st.session_state.get(KEY_COMPARE_RUN) not in ids:
        st.session_state[KEY_COMPARE_RUN] = next((r.id for r in runs if len(r.versions) > 1), ids[0])
    st.selectbox("Run", ids, key=KEY_COMPARE_RUN, format_func=lambda i: run_label(by_id[i]))
    run = by_id[st.session_state[KEY_COMPARE_RUN]]
    own = [(run.id, v.position) for v in run.versions]
    others = {f"#{r.id} · {v.title}": (r.id, v.position) for r in runs if r.id != run.id
              and r.dataset_id == run.dataset_id for v in r.versions}
    extra = st.multiselect("Add versions from other runs over the same dataset", list(others),
                           key="evaluations.compare.extra")
    arms = own + [others[e] for e in extra]
    if len(arms) < 2:
        st.info("This run has one version: add a version from another run over the same dataset to compare.")
        return
    with glue.reported():
        comparison = ev.compare(pool, arms)
        show_comparison(comparison)


def show_comparison(c: ev.Comparison) -> None:
    """Render a comparison."""
    st.dataframe(summary_frame(c.summaries).assign(version=c.titles), hide_index=True, width="stretch")
    left, right = st.columns(2)
    left.altair_chart(pass_rate_chart(c.titles, c.summaries), width="stretch")
    scores = pd.DataFrame([{"version": t, "mean score": s.mean_score, "low": s.score_ci[0], "high": s.score_ci[1]}
                           for t, s in zip(c.titles, c.summaries) if s.mean_score is not None])
    if not scores.empty:
        base = alt.Chart(scores).encode(y=alt.Y("version:N", sort=None, title=None))
        right.altair_chart((base.mark_point(filled=True, size=80).encode(x=alt.X("mean score:Q",
                                                                              scale=alt.Scale(domain=[0, 1])))
                            + base.mark_rule(strokeWidth=2).encode(x="low:Q", x2="high:Q"))
                           .properties(title="Mean score (95% bootstrap interval)", height=alt.Step(32)),
                           width="stretch")
    st.subheader("Is the difference real?")
    for t in c.tests:
        st.markdown(md("**{}** against **{}** over {} paired item(s)", t.other, t.baseline, t.n_pairs))
        m = t.mcnemar
        significant = t.n_pairs and m.p_value < 0.05
        (st.success if significant else st.info)(md("Pass/fail: {}", t.pass_verdict))
        a, b, cc, d = st.columns(4)
        a.metric("Pass rate change", f"{(t.other_passed - t.baseline_passed) / t.n_pairs:+.1%}" if t.n_pairs else "—")
        b.metric("McNemar exact p", f"{m.exact_p:.3g}", help=md(
            "Only {} passed: {}; only {} passed: {}. Mid-p {:.3g}; chi-square (continuity) {:.2f}, p {:.3g}",
            t.baseline, m.b, t.other, m.c, m.mid_p, m.chi2, m.chi2_p))
        if t.bootstrap is not None:
            boot = t.bootstrap
            cc.metric("Mean score change", f"{boot.mean_diff:+.3f}",
                      help=f"95% CI {boot.ci_low:+.3f} to {boot.ci_high:+.3f} ({boot.resamples} paired resamples)")
            d.metric("Bootstrap p", f"{boot.p_value:.3g}")
            (st.success if boot.significant else st.info)(md("Scores: {}", t.score_verdict))
    if len(c.arms) == 2:
        pairs = pd.DataFrame([{"item": r["item_id"], "a": r["score 1"], "b": r["score 2"],
                               "disagree": r["disagree"]} for r in c.rows
                              if r["score 1"] is not None and r["score 2"] is not None])
        if not pairs.empty:
            st.altair_chart(alt.Chart(pairs).mark_circle(size=70, opacity=0.7).encode(
                x=alt.X("a:Q", scale=alt.Scale(domain=[0, 1]), title=c.titles[0]),
                y=alt.Y("b:Q", scale=alt.Scale(domain=[0, 1]), title=c.titles[1]),
                color=alt.Color("disagree:N", title="pass/fail differs"),
                tooltip=["item", alt.Tooltip("a:Q", title=c.titles[0]), alt.Tooltip("b:Q", title=c.titles[1])],
            ).properties(title="Score per item", height=300), width="stretch")
    st.subheader("Items")
    only = st.checkbox("Only items where the versions disagree", key=KEY_DISAGREE)
    rows = c.disagreements() if only else c.rows
    table = []
    for r in rows:
        row = {"item": r["item_id"], "input": json.dumps(r["input"], ensure_ascii=False), "expected": r["expected"]}
        for k, title in enumerate(c.titles, start=1):
            row[f"{title}: passed"] = r[f"passed {k}"]
            row[f"{title}: output"] = r[f"output {k}"]
            if r["expected"] is not None:
                row[f"{title}: diff"] = ev.inline_diff(r["expected"], r[f"output {k}"])
        table.append(row)
    st.caption(f"{len(rows)} of {len(c.rows)} item(s). Diffs read [-expected only-]{{+output only+}}.")
    st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
    if rows:
        item = st.selectbox("Look at one item", [r["item_id"] for r in rows], key="evaluations.compare.item")
        r = next(x for x in rows if x["item_id"] == item)
        cols = st.columns(len(c.titles))
        for k, (col, title) in enumerate(zip(cols, c.titles), start=1):
            col.markdown(md("**{}** — {}", title, "pass" if r[f"passed {k}"] else "fail"))
            if r["expected"] is not None:
                col.code(ev.unified_diff(r["expected"], r[f"output {k}"]) or "(equals the expected output)",
                         language="diff")
            else:
                col.code(r[f"output {k}"] or "", language=None)


# ----------------------------------------------------------------------------------------------------- promptfoo

def promptfoo_view(pool, settings) -> None:
    """Import a promptfoo config uploaded with the files it refers to, and run it. References resolve among the
    uploaded files only (never to files on the server)."""
    st.caption("Prompts become templates, tests a dataset, defaultTest assertions the run's evaluators; providers "
               "are mapped to a model here. Unsupported assertion types are named and count as failed. Upload the "
               "config together with every file its `file://` references name.")
    uploads = st.file_uploader("promptfooconfig.yaml and the files it refers to", accept_multiple_files=True,
                               type=["yaml", "yml", "txt", "md", "csv", "json", "jsonl", "j2"],
                               key="evaluations.promptfoo.files",
                               max_upload_size=promptfoo.MAX_FILE_BYTES // promptfoo.MIB,
                               help=f"At most {promptfoo.MAX_FILES} files, each up to "
                                    f"{promptfoo.MAX_FILE_BYTES // promptfoo.MIB} MB and "
                                    f"{promptfoo.MAX_TOTAL_BYTES // promptfoo.MIB} MB together.")
    name = st.text_input("Name for the templates and dataset", key="evaluations.promptfoo.name",
                         placeholder="from the config's description")
    if st.button("Import and run", key="evaluations.promptfoo.start", type="primary", disabled=not uploads):
        with glue.reported():
            # sizes first, from the upload's metadata: nothing is read when the upload is over a cap
            if len(uploads) > promptfoo.MAX_FILES:
                raise promptfoo.PromptfooTooLarge(f"{len(uploads)} files uploaded; at most {promptfoo.MAX_FILES}")
            for f in uploads:
                untrusted.check_size(f.size, promptfoo.MAX_FILE_BYTES, repr(f.name))
            untrusted.check_size(sum(f.size for f in uploads), promptfoo.MAX_TOTAL_BYTES, "the uploaded files together")
            configs = [f for f in uploads if f.name.lower().endswith((".yaml", ".yml"))]
            if not configs:
                raise InvalidInput("Upload the promptfoo config (.yaml) with its files")
            config = next((f for f in configs if Path(f.name).stem == "promptfooconfig"), configs[0])
            suite = promptfoo.load_config(config.getvalue(), {f.name: f.getvalue() for f in uploads if f is not config},
                                          config_name=config.name)
            run, imported = promptfoo.start(pool, settings, suite, created_by=glue.current_user(),
                                            name=name.strip() or None)
            for line in imported.report_lines():
                widgets.flash("warning" if line.startswith("unsupported") else "info", safe_md(line))
            widgets.flash("success", f"Run #{run.id} queued: {run.total} item(s).")
            widgets.rerun_with(**{KEY_VIEW: "Runs", KEY_RUN: run.id})


# ---------------------------------------------------------------------------------------------------------- page

st.title("Evaluations")
st.caption("Score template versions over a dataset, compare them with statistics, gate CI on the pass rate "
           "(`promptdev eval run … --min-pass-rate`).")
pool = glue.pool()
settings = glue.settings()
widgets.carry_over()
view = st.radio("View", VIEWS, key=KEY_VIEW, horizontal=True, label_visibility="collapsed")
with glue.reported():  # e.g. a run deleted from another session meanwhile: one line, not a traceback
    if view == "Runs":
        run_view(pool, settings)
    elif view == "New run":
        new_run_view(pool, settings)
    elif view == "Compare":
        compare_view(pool)
    else:
        promptfoo_view(pool, settings)
