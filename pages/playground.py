"""Playground: run a template (or a free-form prompt) on a registered model and watch it stream; compare up to four
versions, models or parameter sets side by side; draft a template with the model. Every run is recorded in the
ledger (the Ledger page)."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from core import executions, models, templates
from core.errors import InvalidInput, PromptDevError, user_message
from core.executions import GenerationParams, Origin
from pages import glue, widgets
from pages.execution_widgets import save_to_dataset, show_figures, status_line, stream_recorded
from pages.widgets import code_span, md, safe_md

# Session-state keys.
KEY_TAB = "playground.tab"
KEY_RUN_RESULT = "playground.run.result"  # execution id of the last run
KEY_CMP_RESULT = "playground.cmp.result"  # execution ids of the last side-by-side run
KEY_DRAFT = "playground.draft.result"  # the last TemplateDraft
KEY_SAVED = "playground.draft.saved"  # name@version of the template saved from the last draft
KEY_STREAMED = "playground.run.streamed"  # id of the run whose output was just streamed (not shown twice)

TABS = ("Run", "Side by side", "Generate a template")
FREE_FORM, TEMPLATE = "Free-form prompt", "Template"


# ---------------------------------------------------------------------------------------------------------------
# Choosing what runs


def version_options(name: str) -> dict[str, tuple[str | None, int | None]]:
    """Choices for a template's version: its labels, latest, then every version; -> (label, version)."""
    meta = templates.get_template(pool, name)
    labels = dict(sorted(meta.labels.items(), key=lambda kv: (kv[0] != "production", kv[0])))
    options: dict[str, tuple[str | None, int | None]] = {}
    for label, number in labels.items():
        options[f"{label} (v{number})"] = (label, None)
    options[f"latest (v{meta.latest_version})"] = ("latest", None)
    for number in range(meta.latest_version, 0, -1):
        options[f"v{number}"] = (None, number)
    return options


def choose_version(prefix: str, name: str) -> tuple[templates.TemplateVersion, str | None, int | None]:
    """A version selector for a template; returns (version, label, version number) as chosen."""
    options = version_options(name)
    choice = st.selectbox("Version or label", list(options), key=f"{prefix}.version",
                          help="A label (production is what runs by default), latest, or a fixed version")
    label, number = options.get(choice) or next(iter(options.values()))
    return templates.get_template_by_name(pool, name, label=label, version=number), label, number


def _stop_text(stops: tuple[str, ...]) -> str:
    return "\n".join(s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") for s in stops)


def _stop_list(text: str) -> list[str]:
    return [line.replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\") for line in text.splitlines() if line]


def param_inputs(prefix: str, defaults: dict[str, Any], source: Any, compact: bool = False) -> dict[str, Any]:
    """Generation parameter fields; reset to `defaults` whenever `source` (the chosen version) changes."""
    marker = f"{prefix}.params_for"
    if st.session_state.get(marker) != source:
        try:
            p = GenerationParams.from_dict(defaults)
        except ValueError:
            p = GenerationParams()
        for name, value in (("temperature", p.temperature), ("top_p", p.top_p), ("top_k", p.top_k),
                            ("max_tokens", p.max_tokens), ("stop", _stop_text(p.stop)), ("seed", p.seed),
                            ("repeat_penalty", p.repeat_penalty)):
            st.session_state[f"{prefix}.p.{name}"] = value
        st.session_state[marker] = source
    cols = st.columns(2 if compact else 4)
    params: dict[str, Any] = {}
    params["temperature"] = cols[0].number_input("Temperature", 0.0, 5.0, step=0.05, key=f"{prefix}.p.temperature")
    params["max_tokens"] = cols[1 % len(cols)].number_input("Max tokens", 1, 32768, step=16,
                                                            key=f"{prefix}.p.max_tokens")
    params["top_p"] = cols[2 % len(cols)].number_input("Top p", 0.01, 1.0, step=0.05, key=f"{prefix}.p.top_p")
    params["top_k"] = cols[3 % len(cols)].number_input("Top k", 0, 1000, step=5, key=f"{prefix}.p.top_k",
                                                       help="0 turns it off")
    params["repeat_penalty"] = cols[0].number_input("Repeat penalty", 0.01, 5.0, step=0.05,
                                                    key=f"{prefix}.p.repeat_penalty")
    params["seed"] = cols[1 % len(cols)].number_input("Seed", 0, 2**32 - 1, value=None, step=1, key=f"{prefix}.p.seed",
                                                      placeholder="random", help="Empty: a random seed is drawn and "
                                                      "recorded, so the run can still be reproduced")
    stop = st.text_area("Stop sequences", key=f"{prefix}.p.stop", height=68,
                        help="One per line; write a newline as \\n")
    params["stop"] = _stop_list(stop)
    if params["seed"] is not None:
        params["seed"] = int(params["seed"])
    return params


def model_choice(prefix: str) -> models.Model:
    """A model selector over the registry (the default first)."""
    names = [m.name for m in registry]
    name = st.selectbox("Model", names, key=f"{prefix}.model",
                        format_func=lambda n: n + (" (default)" if n == registry[0].name and registry[0].is_default
                                                   else ""))
    return next(m for m in registry if m.name == name)


def backend_of(model: models.Model):
    """The process-wide backend of a registered model (loaded on first use)."""
    with st.spinner(md("Loading {}…", model.name)):
        return models.backend_for(pool, settings, model.name)


def usage_caption(name: str) -> None:
    """How often a template ran and when it last did (from the ledger), as one caption line."""
    usage = executions.template_usage(pool, name)
    if usage["uses"]:
        st.caption(f"Ran {usage['uses']:,} time{'s' if usage['uses'] != 1 else ''} · last "
                   f"{usage['last_used'].astimezone().strftime('%Y-%m-%d %H:%M')}")
    else:
        st.caption("Never ran yet")


# ---------------------------------------------------------------------------------------------------------------
# Run


def template_request(name: str, version_column) -> dict[str, Any] | None:
    """The template run's fields: version, variables, user message, parameters; None while a variable is invalid."""
    with version_column:
        tv, label, number = choose_version("playground.run", name)
    with st.expander(md("{} · {} · {} variable(s)", tv.ref, tv.kind, len(tv.variables))):
        if tv.change_description:
            st.caption(safe_md(tv.change_description))
        widgets.show_messages(tv.messages if tv.kind == "chat" else None, tv.text if tv.kind == "text" else None)
    specs = executions.variable_specs(templates.required_variables(pool, tv), tv.input_schema)
    if specs:
        st.subheader("Variables")
    variables, problems = widgets.variable_inputs("playground.run", specs)
    message = st.text_area("User message (optional)", key="playground.run.user_message", height=68,
                           help="Sent as a user turn after the rendered template")
    st.subheader("Parameters")
    params = param_inputs("playground.run", tv.params, tv.id)
    return None if problems else {"name": name, "label": label, "version": number, "variables": variables,
                                  "message": message if message.strip() else None, "params": params}


def free_form_request() -> dict[str, Any]:
    """The free-form run's fields: system prompt, prompt, raw completion, parameters."""
    system = st.text_area("System prompt (optional)", key="playground.run.system", height=80)
    prompt = st.text_area("Prompt", key="playground.run.prompt", height=120)
    raw = st.checkbox("Raw completion (no chat markup)", key="playground.run.raw",
                      help="Send the prompt text as is, for base models or hand-written chat markup")
    st.subheader("Parameters")
    return {"system": system, "prompt": prompt, "raw": raw, "params": param_inputs("playground.run", {}, "free-form")}


def start_run(request: dict[str, Any], model: models.Model) -> executions.ExecutionRun:
    """Begin the recorded run of a template request or a free-form one."""
    if "name" in request:
        p = executions.prepare(pool, request["name"], request["variables"], label=request["label"],
                               version=request["version"], params=request["params"], user_message=request["message"],
                               source="playground", user_id=user, model_id=model.id)
        return executions.start(pool, backend_of(model), origin=p.origin, params=p.params, messages=p.messages)
    messages, prompt = executions.free_form_messages(request["system"], request["prompt"], raw=request["raw"])
    params = executions.resolve_params({}, request["params"])
    return executions.start(pool, backend_of(model), origin=Origin("playground", user_id=user, model_id=model.id),
                            params=params, messages=messages, prompt=prompt)


def show_run_result(execution_id: int) -> None:
    """The last run: its output (unless it was just streamed), status, figures, messages and exact output."""
    e = executions.get_execution(pool, execution_id)
    if st.session_state.get(KEY_STREAMED) != e.id:
        with st.container(border=True):
            st.markdown(safe_md(e.output))
    st.session_state[KEY_STREAMED] = None
    status_line(e)
    show_figures(e)
    with st.expander("Rendered messages sent"):
        widgets.show_messages(e.messages, e.prompt)
    with st.expander("Exact output text"):
        st.code(e.output or "", language=None, wrap_lines=True)
    save_to_dataset(pool, "playground.run", e)


def run_tab() -> None:
    """Run one template version or free-form prompt on one model, streamed."""
    mode = st.radio("Prompt", [TEMPLATE, FREE_FORM], horizontal=True, key="playground.run.mode",
                    index=0 if template_names else 1)
    usage_slot, name, request, model = None, None, None, None
    with glue.reported():
        if mode == FREE_FORM:
            request = free_form_request()
        elif not template_names:
            st.info("No templates yet: create one on the Templates page, draft one in *Generate a template*, "
                    "or write a free-form prompt.")
        else:
            left, right = st.columns(2)
            name = left.selectbox("Template", template_names, key="playground.run.template")
            usage_slot = left.empty()  # filled once this run's own generation is recorded
            request = template_request(name, right)
        model = model_choice("playground.run") if registry else None
    if st.button("Run", key="playground.run.go", type="primary", disabled=request is None or model is None):
        st.session_state.pop(KEY_RUN_RESULT, None)
        with glue.reported():
            run = start_run(request, model)
            stream_recorded(run)
            st.session_state[KEY_RUN_RESULT] = st.session_state[KEY_STREAMED] = run.execution_id
    if usage_slot is not None:
        with usage_slot:
            usage_caption(name)
    if st.session_state.get(KEY_RUN_RESULT):
        with glue.reported():
            show_run_result(st.session_state[KEY_RUN_RESULT])


# ---------------------------------------------------------------------------------------------------------------
# Side by side


def column_config(i: int) -> dict[str, Any]:
    """One column's template version, model and parameters."""
    st.markdown(f"**Column {i + 1}**")
    name = st.selectbox("Template", template_names, key=f"playground.cmp.{i}.template")
    tv, label, number = choose_version(f"playground.cmp.{i}", name)
    model = model_choice(f"playground.cmp.{i}")
    with st.expander("Parameters"):
        params = param_inputs(f"playground.cmp.{i}", tv.params, tv.id, compact=True)
    specs = executions.variable_specs(templates.required_variables(pool, tv), tv.input_schema)
    return {"name": name, "label": label, "version": number, "tv": tv, "model": model, "params": params,
            "specs": specs}


def run_columns(configs: list[dict[str, Any]], variables: dict[str, Any], message: str) -> list[int | None]:
    """Check every column, then run them one after the other, each streamed in its column; the execution ids."""
    prepared_runs = []
    for i, c in enumerate(configs):  # check every column before running any
        try:
            prepared_runs.append(executions.prepare(
                pool, c["name"], {s.name: variables[s.name] for s in c["specs"] if s.name in variables},
                label=c["label"], version=c["version"], params=c["params"],
                user_message=message if message.strip() else None, source="playground", user_id=user,
                model_id=c["model"].id))
        except PromptDevError as exc:
            raise InvalidInput(f"Column {i + 1}: {user_message(exc)}") from exc
    n = len(configs)
    ids: list[int | None] = [None] * n
    progress = st.progress(0.0, text=f"Running column 1 of {n}…")
    slots = [col.empty() for col in st.columns(n)]  # live streams, replaced by the results below
    for i, (c, p) in enumerate(zip(configs, prepared_runs)):
        progress.progress(i / n, text=f"Running column {i + 1} of {n}…")
        run = executions.start(pool, backend_of(c["model"]), origin=p.origin, params=p.params, messages=p.messages)
        with slots[i].container():
            st.caption(md("{} · {}", c["tv"].ref, c["model"].name))
            stream_recorded(run, border=False)  # a failure is recorded; the other columns still run
        ids[i] = run.execution_id
    progress.empty()
    for slot in slots:
        slot.empty()
    return ids


def show_columns(rows: list[executions.Execution]) -> None:
    """Each column's output, status and figures, a table of them all, and where the time went."""
    st.subheader("Outputs")
    for col, e in zip(st.columns(len(rows)), rows):
        with col:
            st.markdown(md("**{}** · {}", e.template_ref, e.model_name))
            status_line(e)
            with st.container(border=True):
                st.markdown(safe_md(e.output))
            show_figures(e, columns=2)
    st.dataframe(pd.DataFrame([{
        "column": k + 1, "execution": e.id, "template": e.template_ref, "label": e.label or "",
        "model": e.model_name, "temperature": e.params.get("temperature"), "seed": e.seed,
        "prompt tokens": e.prompt_tokens, "completion tokens": e.completion_tokens,
        "TTFT ms": None if e.ttft_ms is None else round(e.ttft_ms, 1),
        "tokens/s": None if not e.tokens_per_second else round(e.tokens_per_second, 1),
        "total s": None if e.total_ms is None else round(e.total_ms / 1000, 3),
        "finish": e.finish_reason if e.status == "ok" else e.status} for k, e in enumerate(rows)]),
        hide_index=True, key="playground.cmp.table")
    timing = pd.DataFrame([{"column": f"{k + 1}: {e.template_ref} · {e.model_name}", "phase": phase, "ms": value}
                           for k, e in enumerate(rows) if e.total_ms is not None
                           for phase, value in (("first token", e.ttft_ms or 0.0),
                                                ("rest", e.total_ms - (e.ttft_ms or 0.0)))])
    if not timing.empty:
        st.altair_chart(alt.Chart(timing, title="Where the time went").mark_bar().encode(
            x=alt.X("ms:Q", stack="zero", title="milliseconds"), y=alt.Y("column:N", title=None),
            color=alt.Color("phase:N", sort=["first token", "rest"]),
            tooltip=["column", "phase", alt.Tooltip("ms:Q", format=".0f")]), width="stretch")


def compare_tab() -> None:
    """Up to four template versions, models or parameter sets on the same variables, side by side."""
    if not template_names:
        st.info("Side by side compares template versions: create a template first.")
        return
    n = st.radio("Columns", [2, 3, 4], horizontal=True, key="playground.cmp.n")
    configs: list[dict[str, Any]] = []
    for i, col in enumerate(st.columns(n)):
        with col, glue.reported():
            configs.append(column_config(i))
    shared: dict[str, executions.VariableSpec] = {}  # the first column asking for a variable says how
    for c in configs:
        for spec in c["specs"]:
            shared.setdefault(spec.name, spec)
    st.subheader("Variables (shared by every column)")
    variables, problems = widgets.variable_inputs("playground.cmp", list(shared.values()))
    message = st.text_area("User message (optional)", key="playground.cmp.user_message", height=68)
    if st.button("Run all", key="playground.cmp.go", type="primary", disabled=len(configs) != n or bool(problems)):
        st.session_state.pop(KEY_CMP_RESULT, None)
        with glue.reported():
            st.session_state[KEY_CMP_RESULT] = run_columns(configs, variables, message)
    result_ids = st.session_state.get(KEY_CMP_RESULT) or []
    if result_ids:
        with glue.reported():
            show_columns([executions.get_execution(pool, i) for i in result_ids if i is not None])


# ---------------------------------------------------------------------------------------------------------------
# Generate a template


def draft_with_model(task: str, inputs: str, model: models.Model, max_tokens: int) -> None:
    """Ask the model for a draft and put it in the editing fields."""
    with st.status("The model is drafting a template…") as status:
        draft = executions.draft_template(pool, backend_of(model), task, inputs, params={"max_tokens": max_tokens},
                                          user_id=user)
        status.update(label="Draft ready", state="complete")
    st.session_state[KEY_DRAFT] = draft
    st.session_state.pop(KEY_SAVED, None)
    st.session_state["playground.draft.name"] = draft.name
    st.session_state["playground.draft.system"] = draft.system
    st.session_state["playground.draft.user"] = draft.user


def edit_draft(draft: executions.TemplateDraft, task: str) -> None:
    """The draft's name, system prompt and user prompt, editable, with its variables; save it as a template."""
    if not draft.parsed:
        st.warning("The model's reply did not have the expected shape, so the fields hold a starting point built "
                   "from your description. Edit them before saving.")
    with st.expander(f"The model's reply (execution #{draft.execution_id})"):
        st.code(draft.raw or "(empty)", language=None, wrap_lines=True)
    new_name = st.text_input("Template name", key="playground.draft.name",
                             help="Lower case letters, digits, '.', '_' and '-'")
    new_system = st.text_area("System prompt", key="playground.draft.system", height=120)
    new_user = st.text_area("User prompt template", key="playground.draft.user", height=160,
                            help="Jinja2: write each input as {{ name }}")
    content = ([{"role": "system", "content": new_system}] if new_system.strip() else []) + \
        [{"role": "user", "content": new_user}]
    analysis = templates.analyze(content)
    if analysis.error:
        st.error(safe_md(analysis.error))
    else:
        st.caption("Variables: " + (", ".join(code_span(v) for v in analysis.variables) or "none"))
    if st.button("Save as a new template", key="playground.draft.save", type="primary"):
        with glue.reported():
            tv = templates.create_template(
                pool, new_name.strip(), content, created_by=user, description=task.strip()[:500],
                change_description=f"Drafted with the model in the playground (execution {draft.execution_id})")
            st.session_state[KEY_SAVED] = tv.ref
    if st.session_state.get(KEY_SAVED):
        st.success(md("Saved as template {}; run it in the Run tab.", st.session_state[KEY_SAVED]))


def draft_tab() -> None:
    """Describe a prompt; the model drafts a template to edit and save."""
    st.caption("Describe what the prompt should do and what it gets; the model drafts a system prompt, a user prompt "
               "template and its variables. Edit the draft, then save it as a new template.")
    task = st.text_area("What should the prompt do?", key="playground.draft.task", height=80,
                        placeholder="Summarise a customer email in two sentences for a support agent")
    inputs = st.text_area("Inputs it gets (one per line: name: description)", key="playground.draft.inputs",
                          height=80, placeholder="email: the customer's email\ntone: formal or casual")
    c1, c2 = st.columns(2)
    with c1:
        model = model_choice("playground.draft") if registry else None
    max_tokens = c2.number_input("Max tokens", 16, 2048, value=320, step=16, key="playground.draft.max_tokens")
    if st.button("Draft with the model", key="playground.draft.go", disabled=model is None):
        with glue.reported():
            draft_with_model(task, inputs, model, int(max_tokens))
    if st.session_state.get(KEY_DRAFT) is not None:
        edit_draft(st.session_state[KEY_DRAFT], task)


# ---------------------------------------------------------------------------------------------------------------
# Page

st.title("Playground")
settings = glue.settings()
pool = glue.pool()
user = glue.current_user()
widgets.carry_over()

registry = glue.model_registry(pool, settings)
template_names = templates.template_names(pool)

tab, container = widgets.open_tab(TABS, KEY_TAB)
with container:
    {"Run": run_tab, "Side by side": compare_tab, "Generate a template": draft_tab}[tab]()
