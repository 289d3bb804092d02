"""Playground: run a template (or a free-form prompt) on a registered model and watch it stream; compare up to four
versions, models or parameter sets side by side; draft a template with the model; find, inspect and re-run exactly
any recorded execution; manage the model registry."""

from __future__ import annotations

import difflib
import json
import logging
from datetime import datetime, timedelta
from typing import Any, Callable

import altair as alt
import pandas as pd
import streamlit as st

from core import executions, models, templates
from core.executions import Execution, GenerationParams, Origin
from pages import glue

log = logging.getLogger("promptdev.ui.playground")

# Session-state keys.
KEY_RUN_RESULT = "playground.run.result"  # execution id of the last run
KEY_CMP_RESULT = "playground.cmp.result"  # execution ids of the last side-by-side run
KEY_DRAFT = "playground.draft.result"  # the last TemplateDraft
KEY_RERUN = "playground.ledger.rerun_result"  # (original id, new id) of the last exact re-run
KEY_SAVED = "playground.draft.saved"  # name@version of the template saved from the last draft
KEY_STREAMED = "playground.run.streamed"  # id of the run whose output was just streamed (not shown twice)
KEY_MODELS_MSG = "playground.models.message"  # what the last registry change did

FREE_FORM, TEMPLATE = "Free-form prompt", "Template"
TIME_WINDOWS = {"Last hour": timedelta(hours=1), "Last 24 hours": timedelta(days=1), "Last 7 days": timedelta(days=7),
                "Last 30 days": timedelta(days=30), "All time": None}
ALL = "All"
MAX_COLUMNS = 4


# ---------------------------------------------------------------------------------------------------------------
# Helpers


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


def variable_inputs(prefix: str, specs: list[executions.VariableSpec]) -> tuple[dict[str, Any], list[str]]:
    """A form field per variable, typed from the input JSON Schema; returns (values, problems). Values the user left
    empty are omitted; every field is drawn even when one is invalid, and each problem is shown as one line."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for spec in specs:
        key = f"{prefix}.var.{spec.name}" + ("" if spec.type == "string" and not spec.enum else f".{spec.type}")
        label = spec.name + ("" if spec.required else " (optional)")
        help_ = spec.description or None
        if spec.enum:
            options = list(spec.enum)
            index = options.index(spec.default) if spec.default in options else 0
            values[spec.name] = st.selectbox(label, options, index=index, key=key, help=help_,
                                             format_func=lambda v: json.dumps(v) if not isinstance(v, str) else v)
        elif spec.type == "boolean":
            values[spec.name] = st.checkbox(label, value=bool(spec.default), key=key, help=help_)
        elif spec.type in ("integer", "number"):
            whole = spec.type == "integer"
            default = spec.default if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool) \
                else None
            value = st.number_input(label, value=(int(default) if whole else float(default)) if default is not None
                                    else None, step=1 if whole else 0.1, key=key, help=help_,
                                    placeholder="a whole number" if whole else "a number")
            if value is not None:
                values[spec.name] = int(value) if whole else float(value)
        elif spec.type in ("array", "object"):
            empty = "[]" if spec.type == "array" else "{}"
            text = st.text_area(f"{label} — JSON {spec.type}", value=json.dumps(spec.default) if spec.default is not None
                                else empty, key=key, help=help_, height=80)
            try:
                values[spec.name] = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{spec.name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
        else:
            text = st.text_area(label, value=spec.default if isinstance(spec.default, str) else "", key=key,
                                help=help_, height=80)
            if text:  # left empty: not given, so a variable the template needs is named as missing
                values[spec.name] = text
    for problem in problems:
        st.error(problem)
    return values, problems


def _stop_text(stops: tuple[str, ...]) -> str:
    return "\n".join(s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") for s in stops)


def _stop_list(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if line:
            out.append(line.replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\"))
    return out


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
    params["max_tokens"] = cols[1 % len(cols)].number_input("Max tokens", 1, 32768, step=16, key=f"{prefix}.p.max_tokens")
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


def model_choice(prefix: str, registry: list[models.Model]) -> models.Model:
    """A model selector over the registry (the default first)."""
    names = [m.name for m in registry]
    name = st.selectbox("Model", names, key=f"{prefix}.model",
                        format_func=lambda n: n + (" (default)" if n == registry[0].name and registry[0].is_default
                                                   else ""))
    return next(m for m in registry if m.name == name)


def backend_of(model: models.Model):
    """The process-wide backend of a registered model (loaded on first use)."""
    with st.spinner(f"Loading {model.name}…"):
        return models.backend_for(pool, settings, model.name)


def show_messages(messages: list[dict[str, str]] | None, prompt: str | None) -> None:
    """The exact rendered messages and prompt text the model saw."""
    if messages is not None:
        for m in messages:
            st.markdown(f"**{m['role']}**")
            st.code(m["content"], language=None, wrap_lines=True)
    if prompt is not None:
        st.caption("Exact prompt text")
        st.code(prompt, language=None, wrap_lines=True)


def show_figures(e: Execution, columns: int = 6) -> None:
    """Token counts, time to first token, speed, total time and finish reason of an execution."""
    figures = [("Prompt tokens", "–" if e.prompt_tokens is None else f"{e.prompt_tokens:,}"),
               ("Completion tokens", "–" if e.completion_tokens is None else f"{e.completion_tokens:,}"),
               ("TTFT", "–" if e.ttft_ms is None else f"{e.ttft_ms:,.0f} ms"),
               ("Tokens/s", "–" if not e.tokens_per_second else f"{e.tokens_per_second:,.1f}"),
               ("Total", "–" if e.total_ms is None else f"{e.total_ms / 1000:,.2f} s"),
               ("Finish", e.finish_reason if e.status == "ok" else e.status)]
    for i in range(0, len(figures), columns):
        for col, (label, value) in zip(st.columns(columns), figures[i:i + columns]):
            col.metric(label, value)


def stream_recorded(run: executions.ExecutionRun, border: bool = True) -> None:
    """Stream a run into a container. Leaving the block (the end, an error, or a rerun abandoning the stream) closes
    the run, which releases the model and records the execution. A failure the ledger recorded is not raised again:
    the execution's status line shows it, once; anything else (nothing recorded) propagates."""
    try:
        with st.container(border=border):
            with run:
                st.write_stream(run)
    except Exception as exc:
        if run.execution_id is None:
            raise
        log.info("execution %s failed: %s", run.execution_id, glue.error_message(exc))


def usage_caption(name: str) -> None:
    """How often a template ran and when it last did (from the ledger), as one caption line."""
    usage = executions.template_usage(pool, name)
    if usage["uses"]:
        st.caption(f"Ran {usage['uses']:,} time{'s' if usage['uses'] != 1 else ''} · last "
                   f"{usage['last_used'].astimezone().strftime('%Y-%m-%d %H:%M')}")
    else:
        st.caption("Never ran yet")


def inline_code(value: Any) -> str:
    """A value as inline code (so names like q4_k_m are not read as markdown)."""
    text = str(value).replace("\n", " ")
    return text if text == "–" or "`" in text else f"`{text}`"


def server_text(e: Execution) -> str:
    """The server an execution ran on and the model name there (from the registry entry it refers to)."""
    if not e.base_url:
        return "–"
    remote = models.served_model_name(pool, e)
    return e.base_url + (f" · model {remote}" if remote else "")


def describe(e: Execution) -> str:
    """One line naming an execution."""
    what = e.template_ref + (f" ({e.label})" if e.label else "") if e.template_ref else "free-form"
    return f"#{e.id} · {what} · {e.model_name} · {e.status}"


def status_line(e: Execution) -> None:
    """The execution's status as one coloured line."""
    text = f"Execution #{e.id} · {e.status} · {e.model_name} · seed {e.seed}"
    if e.status == "ok":
        st.caption(text)
    elif e.status == "error":
        st.error(f"{text} — {e.error}")
    else:
        st.warning(text + (f" — {e.error}" if e.error else ""))


def dataset_hook() -> Callable[..., Any] | None:
    """core.datasets.add_item_from_execution when the datasets module provides it (issue 6), else None."""
    try:
        from core import datasets
    except Exception:  # not there yet, or being written: the button stays hidden
        return None
    func = getattr(datasets, "add_item_from_execution", None)
    return func if callable(func) else None


def save_to_dataset(prefix: str, e: Execution) -> None:
    """HOOK (issue 6): save an execution's output as a dataset item; shown only when core.datasets provides it."""
    add_item = dataset_hook()
    if add_item is None or e.status != "ok":
        return
    with st.expander("Save output as a dataset item"):
        name = st.text_input("Dataset", key=f"{prefix}.dataset", placeholder="dataset name (created if new)")
        if st.button("Save output as dataset item", key=f"{prefix}.dataset_save"):
            with glue.reported():
                if not name.strip():
                    raise glue.UserError("name the dataset to save the item in")
                add_item(pool, name.strip(), e.id, create=True)
                st.success(f"Execution #{e.id} saved in dataset {name.strip()!r}")


# ---------------------------------------------------------------------------------------------------------------
# Page

st.title("Playground")
settings = glue.settings()
pool = glue.pool()
user = glue.current_user()

registry: list[models.Model] = []
with glue.reported():
    models.ensure_default_model_registered(pool, settings)
registry = models.list_models(pool)
template_names = templates.template_names(pool)

run_tab, compare_tab, draft_tab, ledger_tab, models_tab = st.tabs(
    ["Run", "Side by side", "Generate a template", "Executions", "Models"])

# --- Run ---------------------------------------------------------------------------------------------------------
with run_tab:
    mode = st.radio("Prompt", [TEMPLATE, FREE_FORM], horizontal=True, key="playground.run.mode",
                    index=0 if template_names else 1)
    usage_slot, name = None, None
    request: dict[str, Any] | None = None
    model: models.Model | None = None
    with glue.reported():
        if mode == TEMPLATE:
            if not template_names:
                st.info("No templates yet: create one on the Templates page, draft one in *Generate a template*, "
                        "or write a free-form prompt.")
            else:
                left, right = st.columns(2)
                with left:
                    name = st.selectbox("Template", template_names, key="playground.run.template")
                    usage_slot = st.empty()  # filled once this run's own generation is recorded
                with right:
                    tv, label, number = choose_version("playground.run", name)
                with st.expander(f"{tv.ref} · {tv.kind} · {len(tv.variables)} variable(s)"):
                    if tv.change_description:
                        st.caption(tv.change_description)
                    show_messages(tv.messages if tv.kind == "chat" else None, tv.text if tv.kind == "text" else None)
                specs = executions.variable_specs(templates.required_variables(pool, tv), tv.input_schema)
                if specs:
                    st.subheader("Variables")
                variables, problems = variable_inputs("playground.run", specs)
                message = st.text_area("User message (optional)", key="playground.run.user_message", height=68,
                                       help="Sent as a user turn after the rendered template")
                st.subheader("Parameters")
                params = param_inputs("playground.run", tv.params, tv.id)
                request = None if problems else {
                    "name": name, "label": label, "version": number, "variables": variables,
                    "message": message if message.strip() else None, "params": params}
        else:
            system = st.text_area("System prompt (optional)", key="playground.run.system", height=80)
            prompt = st.text_area("Prompt", key="playground.run.prompt", height=120)
            raw = st.checkbox("Raw completion (no chat markup)", key="playground.run.raw",
                              help="Send the prompt text as is, for base models or hand-written chat markup")
            st.subheader("Parameters")
            params = param_inputs("playground.run", {}, "free-form")
            request = {"system": system, "prompt": prompt, "raw": raw, "params": params}
        model = model_choice("playground.run", registry) if registry else None

    if st.button("Run", key="playground.run.go", type="primary", disabled=request is None or model is None):
        st.session_state.pop(KEY_RUN_RESULT, None)
        with glue.reported():
            if "name" in request:
                prepared = executions.prepare(
                    pool, request["name"], request["variables"], label=request["label"], version=request["version"],
                    params=request["params"], user_message=request["message"], source="playground", user_id=user,
                    model_id=model.id)
                origin, messages, prompt_text, gen_params = prepared.origin, prepared.messages, None, prepared.params
            else:
                if not request["prompt"].strip():
                    raise glue.UserError("write a prompt to run")
                gen_params = executions.resolve_params({}, request["params"])
                origin = Origin("playground", user_id=user, model_id=model.id)
                if request["raw"]:
                    messages, prompt_text = None, (request["system"] + "\n\n" if request["system"].strip() else "") \
                        + request["prompt"]
                else:
                    messages = ([{"role": "system", "content": request["system"]}] if request["system"].strip()
                                else []) + [{"role": "user", "content": request["prompt"]}]
                    prompt_text = None
            backend = backend_of(model)
            run = executions.start(pool, backend, origin=origin, params=gen_params, messages=messages,
                                   prompt=prompt_text)
            stream_recorded(run)
            st.session_state[KEY_RUN_RESULT] = run.execution_id
            st.session_state[KEY_STREAMED] = run.execution_id
    if usage_slot is not None:
        with usage_slot:
            usage_caption(name)
    result_id = st.session_state.get(KEY_RUN_RESULT)
    if result_id:
        with glue.reported():
            e = executions.get_execution(pool, result_id)
            if st.session_state.get(KEY_STREAMED) != e.id:
                with st.container(border=True):
                    st.markdown(e.output or "")
            st.session_state[KEY_STREAMED] = None
            status_line(e)
            show_figures(e)
            with st.expander("Rendered messages sent"):
                show_messages(e.messages, e.prompt)
            with st.expander("Exact output text"):
                st.code(e.output or "", language=None, wrap_lines=True)
            save_to_dataset("playground.run", e)

# --- Side by side ------------------------------------------------------------------------------------------------
with compare_tab:
    if not template_names:
        st.info("Side by side compares template versions: create a template first.")
    else:
        n = st.radio("Columns", [2, 3, 4], horizontal=True, key="playground.cmp.n")
        columns = st.columns(n)
        configs: list[dict[str, Any]] = []
        all_specs: dict[str, executions.VariableSpec] = {}
        for i, col in enumerate(columns):
            with col, glue.reported():
                st.markdown(f"**Column {i + 1}**")
                name = st.selectbox("Template", template_names, key=f"playground.cmp.{i}.template")
                tv, label, number = choose_version(f"playground.cmp.{i}", name)
                model = model_choice(f"playground.cmp.{i}", registry)
                with st.expander("Parameters"):
                    params = param_inputs(f"playground.cmp.{i}", tv.params, tv.id, compact=True)
                specs = executions.variable_specs(templates.required_variables(pool, tv), tv.input_schema)
                for spec in specs:
                    all_specs.setdefault(spec.name, spec)
                configs.append({"name": name, "label": label, "version": number, "tv": tv, "model": model,
                                "params": params, "vars": [s.name for s in specs]})
        st.subheader("Variables (shared by every column)")
        cmp_variables, cmp_problems = variable_inputs("playground.cmp", list(all_specs.values()))
        cmp_message = st.text_area("User message (optional)", key="playground.cmp.user_message", height=68)
        ready = len(configs) == n and not cmp_problems
        if st.button("Run all", key="playground.cmp.go", type="primary", disabled=not ready):
            st.session_state.pop(KEY_CMP_RESULT, None)
            with glue.reported():
                prepared_runs = []
                for i, c in enumerate(configs):  # check every column before running any
                    try:
                        prepared_runs.append(executions.prepare(
                            pool, c["name"], {k: v for k, v in cmp_variables.items() if k in c["vars"]},
                            label=c["label"], version=c["version"], params=c["params"],
                            user_message=cmp_message if cmp_message.strip() else None, source="playground",
                            user_id=user, model_id=c["model"].id))
                    except (ValueError, LookupError) as exc:
                        raise glue.UserError(f"Column {i + 1}: {glue.error_message(exc)}") from None
                ids: list[int | None] = [None] * n
                progress = st.progress(0.0, text=f"Running column 1 of {n}…")
                slots = [col.empty() for col in st.columns(n)]  # live streams, replaced by the results below
                for i, (c, p) in enumerate(zip(configs, prepared_runs)):
                    progress.progress(i / n, text=f"Running column {i + 1} of {n}…")
                    backend = backend_of(c["model"])
                    run = executions.start(pool, backend, origin=p.origin, params=p.params, messages=p.messages)
                    with slots[i].container():
                        st.caption(f"{c['tv'].ref} · {c['model'].name}")
                        stream_recorded(run, border=False)  # a failure is recorded; the other columns still run
                    ids[i] = run.execution_id
                progress.empty()
                for slot in slots:
                    slot.empty()
                st.session_state[KEY_CMP_RESULT] = ids
        result_ids = st.session_state.get(KEY_CMP_RESULT) or []
        if result_ids:
            with glue.reported():
                rows = [executions.get_execution(pool, i) for i in result_ids if i is not None]
                st.subheader("Outputs")
                for col, e in zip(st.columns(len(rows)), rows):
                    with col:
                        st.markdown(f"**{e.template_ref}** · {e.model_name}")
                        status_line(e)
                        with st.container(border=True):
                            st.markdown(e.output or "")
                        show_figures(e, columns=2)
                table = pd.DataFrame([{
                    "column": k + 1, "execution": e.id, "template": e.template_ref, "label": e.label or "",
                    "model": e.model_name, "temperature": e.params.get("temperature"), "seed": e.seed,
                    "prompt tokens": e.prompt_tokens, "completion tokens": e.completion_tokens,
                    "TTFT ms": None if e.ttft_ms is None else round(e.ttft_ms, 1),
                    "tokens/s": None if not e.tokens_per_second else round(e.tokens_per_second, 1),
                    "total s": None if e.total_ms is None else round(e.total_ms / 1000, 3),
                    "finish": e.finish_reason if e.status == "ok" else e.status} for k, e in enumerate(rows)])
                st.dataframe(table, hide_index=True, key="playground.cmp.table")
                timing = pd.DataFrame([{"column": f"{k + 1}: {e.template_ref} · {e.model_name}",
                                        "phase": phase, "ms": value}
                                       for k, e in enumerate(rows) if e.total_ms is not None
                                       for phase, value in (("first token", e.ttft_ms or 0.0),
                                                            ("rest", e.total_ms - (e.ttft_ms or 0.0)))])
                if not timing.empty:
                    st.altair_chart(alt.Chart(timing, title="Where the time went").mark_bar().encode(
                        x=alt.X("ms:Q", stack="zero", title="milliseconds"), y=alt.Y("column:N", title=None),
                        color=alt.Color("phase:N", sort=["first token", "rest"]),
                        tooltip=["column", "phase", alt.Tooltip("ms:Q", format=".0f")]), width="stretch")

# --- Generate a template -----------------------------------------------------------------------------------------
with draft_tab:
    st.caption("Describe what the prompt should do and what it gets; the model drafts a system prompt, a user prompt "
               "template and its variables. Edit the draft, then save it as a new template.")
    task = st.text_area("What should the prompt do?", key="playground.draft.task", height=80,
                        placeholder="Summarise a customer email in two sentences for a support agent")
    inputs = st.text_area("Inputs it gets (one per line: name: description)", key="playground.draft.inputs",
                          height=80, placeholder="email: the customer's email\ntone: formal or casual")
    c1, c2 = st.columns(2)
    draft_model = None
    with c1:
        if registry:
            draft_model = model_choice("playground.draft", registry)
    with c2:
        draft_tokens = st.number_input("Max tokens", 16, 2048, value=320, step=16, key="playground.draft.max_tokens")
    if st.button("Draft with the model", key="playground.draft.go", disabled=draft_model is None):
        with glue.reported():
            with st.status("The model is drafting a template…") as status:
                draft = executions.draft_template(pool, backend_of(draft_model), task, inputs,
                                                  params={"max_tokens": int(draft_tokens)}, user_id=user)
                status.update(label="Draft ready", state="complete")
            st.session_state[KEY_DRAFT] = draft
            st.session_state.pop(KEY_SAVED, None)
            st.session_state["playground.draft.name"] = draft.name
            st.session_state["playground.draft.system"] = draft.system
            st.session_state["playground.draft.user"] = draft.user
    draft = st.session_state.get(KEY_DRAFT)
    if draft is not None:
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
            st.error(analysis.error)
        else:
            st.caption("Variables: " + (", ".join(f"`{v}`" for v in analysis.variables) or "none"))
        if st.button("Save as a new template", key="playground.draft.save", type="primary"):
            with glue.reported():
                tv = templates.create_template(
                    pool, new_name.strip(), content, created_by=user, description=task.strip()[:500],
                    change_description=f"Drafted with the model in the playground (execution {draft.execution_id})")
                st.session_state[KEY_SAVED] = tv.ref
        if st.session_state.get(KEY_SAVED):
            st.success(f"Saved as template {st.session_state[KEY_SAVED]}; run it in the Run tab.")

# --- Executions --------------------------------------------------------------------------------------------------
with ledger_tab:
    options = executions.filter_options(pool)
    f1, f2, f3, f4, f5, f6 = st.columns(6)
    f_template = f1.selectbox("Template", [ALL, *options["template_name"]], key="playground.ledger.template")
    f_version = f2.selectbox("Version", [ALL, *options["template_version"]], key="playground.ledger.version")
    f_model = f3.selectbox("Model", [ALL, *options["model_name"]], key="playground.ledger.model")
    f_source = f4.selectbox("Source", [ALL, *executions.SOURCES], key="playground.ledger.source")
    f_status = f5.selectbox("Status", [ALL, *executions.STATUSES], key="playground.ledger.status")
    f_window = f6.selectbox("Time", list(TIME_WINDOWS), index=len(TIME_WINDOWS) - 1, key="playground.ledger.time")
    window = TIME_WINDOWS[f_window]
    usage_box = st.container()  # filled at the end, so that it counts a re-run made below
    rows = executions.list_executions(
        pool, template_name=None if f_template == ALL else f_template,
        template_version=None if f_version == ALL else int(f_version),
        model_name=None if f_model == ALL else f_model, source=None if f_source == ALL else f_source,
        status=None if f_status == ALL else f_status,
        since=datetime.now().astimezone() - window if window else None, limit=500)
    if not rows:
        st.info("No executions match these filters.")
    else:
        frame = pd.DataFrame([{
            "id": e.id, "created": e.created_at, "status": e.status, "source": e.source,
            "template": e.template_ref or "", "label": e.label or "", "model": e.model_name, "user": e.user_id or "",
            "prompt tokens": e.prompt_tokens, "completion tokens": e.completion_tokens,
            "TTFT ms": None if e.ttft_ms is None else round(e.ttft_ms, 1),
            "total ms": None if e.total_ms is None else round(e.total_ms, 1),
            "output": (e.output or e.error or "")[:120]} for e in rows])
        st.caption(f"{len(rows)} execution(s)" + (" (newest 500)" if len(rows) == 500 else ""))
        st.dataframe(frame, hide_index=True, key="playground.ledger.table")
        timed = frame.dropna(subset=["total ms"])
        if len(timed) >= 2:
            st.altair_chart(alt.Chart(timed, title="Total time per execution").mark_circle(size=60).encode(
                x=alt.X("created:T", title=None), y=alt.Y("total ms:Q", title="total ms"),
                color=alt.Color("model:N"), shape=alt.Shape("status:N"),
                tooltip=["id", "template", "model", "status", "total ms", "completion tokens"]),
                width="stretch")
        by_id = {e.id: e for e in rows}
        chosen = st.selectbox("Open execution", list(by_id), key="playground.ledger.open",
                              format_func=lambda i: describe(by_id[i]))
        e = by_id[chosen]
        status_line(e)
        show_figures(e)
        facts = {
            "Created": e.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
            "Finished": e.finished_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if e.finished_at else "–",
            "Source": e.source, "User": e.user_id or "–",
            "Template": (e.template_ref or "free-form") + (f" (label {e.label})" if e.label else ""),
            "Model": e.model_name + (f" · {e.backend}" if e.backend else ""),
            "Model file SHA-256": e.model_sha256 or "–", "Server": server_text(e), "Seed": e.seed,
            "Re-run of": f"#{e.rerun_of}" if e.rerun_of else "–", "Worker": e.worker or "–"}
        facts_left, facts_right = st.columns(2)
        items = list(facts.items())
        for col, part in ((facts_left, items[:6]), (facts_right, items[6:])):
            col.markdown("\n".join(f"- **{k}:** {inline_code(v)}" for k, v in part))
        p1, p2 = st.columns(2)
        with p1:
            st.markdown("**Parameters**")
            st.json(e.params, expanded=True)
        with p2:
            st.markdown("**Variables**")
            st.json(e.variables, expanded=True)
        with st.expander("Messages and exact prompt", expanded=False):
            show_messages(e.messages, e.prompt)
        st.markdown("**Output**")
        st.code(e.output if e.output is not None else "", language=None, wrap_lines=True)
        save_to_dataset("playground.ledger", e)
        rerunnable = e.done and (e.messages is not None or e.prompt is not None) and e.seed is not None
        if st.button("Re-run exactly", key="playground.ledger.rerun", disabled=not rerunnable,
                     help="Same model file, messages, parameters and seed; says whether the output is identical"):
            st.session_state.pop(KEY_RERUN, None)
            with glue.reported():
                backend = models.backend_for_execution(pool, settings, e)
                run = executions.start_rerun(pool, backend, e.id, user_id=user)
                stream_recorded(run)
                st.session_state[KEY_RERUN] = (e.id, run.execution_id)
        rerun_ids = st.session_state.get(KEY_RERUN)
        if rerun_ids and rerun_ids[0] == e.id:
            with glue.reported():
                original, new = (executions.get_execution(pool, i) for i in rerun_ids)
                if executions.is_identical(original, new):
                    st.success(f"Identical output: execution #{new.id} reproduces #{original.id} exactly "
                               f"(seed {new.seed}).")
                elif new.status == "error":
                    st.error(f"Re-run #{new.id} failed, so it does not reproduce #{original.id}: {new.error}")
                else:
                    why = (" The model file differs." if new.model_sha256 != original.model_sha256 else
                           " The prompt text the model saw differs (its chat format changed)."
                           if original.prompt is not None and new.prompt != original.prompt else "")
                    st.warning(f"Output differs: execution #{new.id} ({new.status}) does not reproduce "
                               f"#{original.id} ({original.status}).{why}")
                    diff = "\n".join(difflib.unified_diff((original.output or "").splitlines(),
                                                          (new.output or "").splitlines(), f"#{original.id}",
                                                          f"#{new.id}", lineterm=""))
                    if diff:
                        st.code(diff, language="diff")
                show_figures(new)

    if template_names:
        with usage_box, st.expander("Template usage: runs and last use of every template, from the ledger"):
            st.dataframe(pd.DataFrame([{"template": u["template"], "runs": u["uses"], "last used": u["last_used"]}
                                       for u in executions.templates_usage(pool)]),
                         hide_index=True, key="playground.ledger.usage")

# --- Models ------------------------------------------------------------------------------------------------------
with models_tab:
    if st.session_state.get(KEY_MODELS_MSG):
        st.success(st.session_state.pop(KEY_MODELS_MSG))
    if registry:
        st.dataframe(pd.DataFrame([{
            "name": m.name, "default": m.is_default, "backend": m.backend, "GGUF path or server": m.location,
            "chat format": m.chat_format, "context": m.n_ctx, "SHA-256": m.sha256 or "",
            "API key variable": m.api_key_env or "", "registered": m.created_at} for m in registry]),
            hide_index=True, key="playground.models.table")
    st.subheader("Register a model")
    with st.form("playground.models.form", clear_on_submit=False):
        m_name = st.text_input("Name", key="playground.models.name")
        m_kind = st.radio("Kind", ["GGUF file (in-process model)", "OpenAI-compatible server"],
                          key="playground.models.kind", horizontal=True)
        m_path = st.text_input("GGUF path", key="playground.models.path")
        m_url = st.text_input("Base URL", key="playground.models.base_url", placeholder="http://host:8000/v1")
        m_remote = st.text_input("Model name on the server", key="playground.models.remote_model")
        m_key = st.text_input("API key environment variable (its name, never the key)",
                              key="playground.models.api_key_env", placeholder="OPENAI_API_KEY")
        fc1, fc2 = st.columns(2)
        m_format = fc1.selectbox("Chat format", ["auto", "gguf", "gemma", "mistral-instruct", "chatml", "raw"],
                                 key="playground.models.chat_format")
        m_ctx = fc2.number_input("Context size", 128, 1_048_576, value=4096, step=512, key="playground.models.n_ctx")
        if st.form_submit_button("Register"):
            with glue.reported():
                gguf = m_kind.startswith("GGUF")
                with st.spinner("Checking the model…"):
                    added = models.register_model(
                        pool, m_name, backend=models.IN_PROCESS if gguf else models.SERVER, path=m_path.strip() if gguf else None,
                        base_url=None if gguf else m_url.strip(), remote_model=None if gguf else m_remote.strip(),
                        api_key_env=None if gguf else m_key.strip(), chat_format=m_format, n_ctx=int(m_ctx))
                st.session_state[KEY_MODELS_MSG] = f"Registered {added.name} ({added.backend})"
                st.rerun()
    removable = [m.name for m in registry if not m.is_default]
    if removable:
        st.subheader("Remove a model")
        r1, r2 = st.columns([3, 1])
        gone = r1.selectbox("Model", removable, key="playground.models.remove_name", label_visibility="collapsed")
        if r2.button("Remove", key="playground.models.remove"):
            with glue.reported():
                models.delete_model(pool, gone)
                st.session_state[KEY_MODELS_MSG] = f"Removed {gone}"
                st.rerun()
