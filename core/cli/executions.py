"""`promptdev run`, `promptdev executions …` and `promptdev models …`: run templates, inspect and re-run the
ledger, manage the model registry from the command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, Sequence

from core import db, executions, models, templates
from core.cli._common import fail, json_or_text, table
from core.config import CHAT_FORMATS, Settings

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(:?)=(.*)$", re.S)
_AGO = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_arguments(items: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """Split `run` arguments into variables — key=value (text, typed by the input schema when it has one) or
    key:=json (any JSON value) — and the optional user message ('-' reads stdin)."""
    variables: dict[str, Any] = {}
    message: str | None = None
    for item in items:
        match = _ASSIGNMENT.match(item)
        if match:
            key, typed, raw = match.groups()
            if key in variables:
                fail(f"variable {key!r} is given twice")
            if typed:
                try:
                    variables[key] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    fail(f"{key}: not valid JSON ({exc.msg})")
            else:
                variables[key] = raw
            continue
        if message is not None:
            fail(f"more than one user message ({message!r} and {item!r}); quote the message, and give variables "
                 "as key=value")
        message = sys.stdin.read() if item == "-" else item
    return variables, message


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """`--param k=v` options as a mapping; values are JSON when they parse as JSON, else text."""
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--param takes key=value, got {item!r}")
        params[key.strip()] = json_or_text(value)
    return params


def parse_time(text: str | None) -> datetime | None:
    """'30m', '2h', '7d', '1w' ago, or an ISO date/time."""
    if text is None:
        return None
    match = _AGO.match(text.strip())
    if match:
        return datetime.now().astimezone() - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(f"not a time: {text!r} (use 30m, 2h, 7d, 1w or an ISO date such as 2026-01-31)")
    return value if value.tzinfo else value.astimezone()


def figures_line(execution: Any) -> str:
    """One line of figures for an execution."""
    parts = [f"execution {execution.id}", execution.status]
    if execution.template_ref:
        parts.append(execution.template_ref + (f" ({execution.label})" if execution.label else ""))
    parts.append(execution.model_name)
    if execution.prompt_tokens is not None:
        parts.append(f"{execution.prompt_tokens} prompt + {execution.completion_tokens or 0} completion tokens")
    if execution.ttft_ms is not None:
        parts.append(f"TTFT {execution.ttft_ms:.0f} ms")
    if execution.tokens_per_second:
        parts.append(f"{execution.tokens_per_second:.1f} tokens/s")
    if execution.total_ms is not None:
        parts.append(f"total {execution.total_ms / 1000:.2f} s")
    if execution.finish_reason:
        parts.append(f"finish {execution.finish_reason}")
    if execution.seed is not None:
        parts.append(f"seed {execution.seed}")
    if execution.error:
        parts.append(f"error: {execution.error}")
    return " · ".join(parts)


def _end_line(run: Any) -> None:
    """End the streamed output with a newline (when it has text that does not end with one)."""
    if run.output and not run.output.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


def _stream(run: Any) -> None:
    out = sys.stdout
    with run:
        for chunk in run:
            out.write(chunk)
            out.flush()
    _end_line(run)


def _stream_recorded(run: Any) -> None:
    """Stream a run to stdout. A generation that failed was recorded: it ends the command with one line naming
    the error and the execution; an interrupted one (Ctrl-C) was recorded as cancelled."""
    try:
        _stream(run)
    except KeyboardInterrupt:
        _end_line(run)
        if run.execution_id is not None:
            print(f"execution {run.execution_id} cancelled", file=sys.stderr)
        raise
    except Exception as exc:
        if run.execution_id is None:
            raise
        _end_line(run)
        text = str(exc).strip().splitlines()
        fail(f"{text[0] if text else type(exc).__name__} (recorded as execution {run.execution_id})")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    variables, message = parse_arguments(args.arguments)
    params = parse_params(args.param)
    for key in ("seed", "max_tokens", "temperature"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    pool = db.get_pool(settings)
    if args.submit:
        eid = executions.submit_execution(pool, args.name, variables, label=args.label, version=args.version,
                                          params=params, user_message=message, model=args.model, source="cli",
                                          user_id=args.user)
        print(eid)
        print(f"queued as execution {eid}; a worker runs it (promptdev worker); see: promptdev executions show {eid}",
              file=sys.stderr)
        return 0
    model = models.get_model(pool, args.model) if args.model else None
    prepared = executions.prepare(pool, args.name, variables, label=args.label, version=args.version, params=params,
                                  user_message=message, source="cli", user_id=args.user,
                                  model_id=model.id if model else None)
    backend = models.backend_for(pool, settings, args.model)
    run = executions.start(pool, backend, origin=prepared.origin, params=prepared.params, messages=prepared.messages)
    _stream_recorded(run)
    if not args.quiet:
        print(figures_line(executions.get_execution(pool, run.execution_id)), file=sys.stderr)
    return 0


def _row(e: Any) -> list[str]:
    output = (e.output or e.error or "").replace("\n", "⏎")
    return [str(e.id), e.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"), e.status, e.source,
            (e.template_ref or "-") + (f" ({e.label})" if e.label else ""), e.model_name,
            "" if e.prompt_tokens is None else f"{e.prompt_tokens}/{e.completion_tokens or 0}",
            "" if e.total_ms is None else f"{e.total_ms:.0f}", output[:40] + ("…" if len(output) > 40 else "")]


def _as_json(e: Any) -> dict[str, Any]:
    d = asdict(e)
    for k, v in d.items():
        if isinstance(v, datetime):
            d[k] = v.isoformat()
    d["tokens_per_second"] = e.tokens_per_second
    return d


def _list(args: argparse.Namespace, settings: Settings) -> int:
    if args.status is not None and args.status not in executions.STATUSES:
        fail(f"unknown status {args.status!r}; choose one of {', '.join(executions.STATUSES)}")
    if args.source is not None and args.source not in executions.SOURCES:
        fail(f"unknown source {args.source!r}; choose one of {', '.join(executions.SOURCES)}")
    if args.limit < 1:
        fail("--limit must be at least 1")
    rows = executions.list_executions(
        db.get_pool(settings), template_name=args.template, template_version=args.template_version,
        model_name=args.model, source=args.source, status=args.status, since=parse_time(args.since),
        until=parse_time(args.until), user_id=args.user, limit=args.limit)
    if args.json:
        print(json.dumps([_as_json(e) for e in rows], indent=2, ensure_ascii=False))
    elif not rows:
        print("no executions match", file=sys.stderr)
    else:
        print(table(["ID", "CREATED", "STATUS", "SOURCE", "TEMPLATE", "MODEL", "TOKENS", "MS", "OUTPUT"],
                     [_row(e) for e in rows]))
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    try:
        e = executions.wait_for_execution(pool, args.id, timeout=args.wait) if args.wait else \
            executions.get_execution(pool, args.id)
    except TimeoutError as exc:
        fail(str(exc))
    if args.json:
        print(json.dumps(_as_json(e), indent=2, ensure_ascii=False))
        return 0
    print(figures_line(e))
    facts = [("created", e.created_at.isoformat()), ("finished", e.finished_at.isoformat() if e.finished_at else "-"),
             ("source", e.source), ("user", e.user_id or "-"),
             ("template", (e.template_ref or "-") + (f" ({e.label})" if e.label else "")),
             ("model", e.model_name + (f" sha256 {e.model_sha256}" if e.model_sha256 else "")
              + (f" at {e.base_url} (model {models.served_model_name(pool, e)} there)" if e.base_url else "")),
             ("params", json.dumps(e.params, ensure_ascii=False)),
             ("variables", json.dumps(e.variables, ensure_ascii=False))]
    if e.rerun_of:
        facts.append(("re-run of", str(e.rerun_of)))
    if e.worker:
        facts.append(("worker", e.worker))
    for key, value in facts:
        print(f"{key + ':':11}{value}")
    if e.messages is not None:
        print("\n--- messages ---")
        for m in e.messages:
            print(f"[{m['role']}]\n{m['content']}")
    print("\n--- prompt ---")
    print(e.prompt if e.prompt is not None else "-")
    print("\n--- output ---")
    print(e.output if e.output is not None else f"- ({e.error})" if e.error else "-")
    return 0


def _rerun(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    original = executions.get_execution(pool, args.id)
    backend = models.backend_for_execution(pool, settings, original)
    run = executions.start_rerun(pool, backend, args.id, source="rerun", user_id=args.user)
    _stream_recorded(run)
    new = executions.get_execution(pool, run.execution_id)
    if not args.quiet:
        print(figures_line(new), file=sys.stderr)
    identical = executions.is_identical(original, new)
    print(f"{'identical to' if identical else 'DIFFERS from'} execution {original.id}", file=sys.stderr)
    return 3 if args.check and not identical else 0


def _usage(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    if args.template:
        templates.get_template(pool, args.template)  # LookupError names an unknown template
    rows = executions.templates_usage(pool, args.template)
    if args.json:
        print(json.dumps([{**r, "last_used": r["last_used"].isoformat() if r["last_used"] else None} for r in rows],
                         indent=2, ensure_ascii=False))
    elif not rows:
        print("no templates yet", file=sys.stderr)
    else:
        print(table(["TEMPLATE", "RUNS", "LAST USED"], [
            [r["template"], str(r["uses"]),
             r["last_used"].astimezone().strftime("%Y-%m-%d %H:%M:%S") if r["last_used"] else "never"]
            for r in rows]))
    return 0


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    if not executions.cancel_execution(db.get_pool(settings), args.id):
        fail(f"execution {args.id} is not queued any more; only queued executions can be cancelled")
    print(f"execution {args.id} cancelled", file=sys.stderr)
    return 0


def _models_list(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    try:
        models.ensure_default_model_registered(pool, settings)
    except ValueError as exc:  # the configured model file is missing: still list the others
        print(f"promptdev: default model not registered: {exc}", file=sys.stderr)
    rows = models.list_models(pool)
    if args.json:
        print(json.dumps([{**m.__dict__, "created_at": m.created_at.isoformat()} for m in rows], indent=2))
        return 0
    print(table(["NAME", "DEFAULT", "BACKEND", "LOCATION", "FORMAT", "CONTEXT", "SHA256"],
                 [[m.name, "*" if m.is_default else "", m.backend, m.location, m.chat_format, str(m.n_ctx),
                   (m.sha256 or "")[:12]] for m in rows]))
    return 0


def _models_add(args: argparse.Namespace, settings: Settings) -> int:
    backend = "openai" if args.base_url else "llama_cpp"
    m = models.register_model(db.get_pool(settings), args.name, backend=backend, path=args.path,
                              base_url=args.base_url, remote_model=args.remote_model, api_key_env=args.api_key_env,
                              chat_format=args.chat_format, n_ctx=args.n_ctx, settings=settings)
    print(f"registered {m.name}: {m.backend} {m.location}" + (f" sha256 {m.sha256}" if m.sha256 else ""))
    return 0


def _models_remove(args: argparse.Namespace, settings: Settings) -> int:
    models.delete_model(db.get_pool(settings), args.name)
    print(f"removed {args.name}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add `run`, `executions` and `models` to the promptdev command line."""
    p = subparsers.add_parser(
        "run", help="run a template on the model and print the streamed output",
        description="Render template NAME with key=value variables, send it (plus an optional user message as the "
                    "next user turn) to the model and print the output as it streams. The execution id and figures "
                    "go to stderr.")
    p.add_argument("name", help="template name")
    p.add_argument("arguments", nargs="*", metavar="ARG",
                   help='key=value (text) or key:=json variables, and at most one "user message" (- reads stdin)')
    which = p.add_mutually_exclusive_group()
    which.add_argument("--label", help="run the version this label points at (default: production, else latest)")
    which.add_argument("--version", type=_positive, help="run this version number")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a generation parameter (temperature, top_p, top_k, max_tokens, stop, seed, repeat_penalty); "
                        "repeatable; overrides the version's defaults")
    p.add_argument("--seed", type=_positive)
    p.add_argument("--max-tokens", dest="max_tokens", type=_positive)
    p.add_argument("--temperature", type=float)
    p.add_argument("--model", help="a registered model (promptdev models list); default: the configured model")
    p.add_argument("--user", help="who runs it (recorded)")
    p.add_argument("--submit", action="store_true", help="queue it for a worker and print the execution id at once")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the figures on stderr")
    p.set_defaults(func=_run)

    ex = subparsers.add_parser("executions", help="list, show, re-run or cancel recorded executions; template usage")
    exs = ex.add_subparsers(dest="executions_command", required=True, metavar="ACTION")
    p = exs.add_parser("list", help="recorded executions, newest first")
    p.add_argument("--template")
    p.add_argument("--template-version", dest="template_version", type=_positive)
    p.add_argument("--model")
    p.add_argument("--source")
    p.add_argument("--status")
    p.add_argument("--user")
    p.add_argument("--since", help="30m, 2h, 7d, 1w or an ISO date/time")
    p.add_argument("--until", help="30m, 2h, 7d, 1w or an ISO date/time")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    p = exs.add_parser("show", help="everything recorded about one execution")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for a queued execution")
    p.set_defaults(func=_show)
    p = exs.add_parser("rerun", help="re-run an execution exactly and say whether the output is identical")
    p.add_argument("id", type=int)
    p.add_argument("--user")
    p.add_argument("--check", action="store_true", help="exit with status 3 when the output differs")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_rerun)
    p = exs.add_parser("usage", help="how often each template ran and when it last did, from the ledger")
    p.add_argument("--template", help="only this template")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_usage)
    p = exs.add_parser("cancel", help="cancel a queued execution")
    p.add_argument("id", type=int)
    p.set_defaults(func=_cancel)

    mo = subparsers.add_parser("models", help="the model registry: list, add or remove models")
    mos = mo.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = mos.add_parser("list", help="registered models (the configured default is registered automatically)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_list)
    p = mos.add_parser("add", help="register a GGUF file or a model on an OpenAI-compatible server")
    p.add_argument("name")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", help="GGUF file run in-process by llama.cpp: its name in the models directory "
                                      "(data/models), or a path inside it")
    where.add_argument("--base-url", dest="base_url", help="OpenAI-compatible server, e.g. http://host:8000/v1 (no "
                                                           "user:password; link-local and cloud metadata addresses "
                                                           "are refused)")
    p.add_argument("--remote-model", dest="remote_model", help="model name on the server")
    p.add_argument("--api-key-env", dest="api_key_env", help="NAME of the environment variable holding the key; one "
                                                             "PROMPTDEV_MODEL_KEY_ENV_ALLOW allows (default: "
                                                             "PROMPTDEV_KEY_*, OPENAI_API_KEY)")
    p.add_argument("--chat-format", dest="chat_format", default="auto", choices=CHAT_FORMATS)
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=4096)
    p.set_defaults(func=_models_add)
    p = mos.add_parser("remove", help="remove a model no execution refers to")
    p.add_argument("name")
    p.set_defaults(func=_models_remove)

