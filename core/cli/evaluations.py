"""`promptdev datasets …` and `promptdev eval …`: datasets in and out, evaluation runs for CI, promptfoo configs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from core import datasets, db, evaluations, evaluators, promptfoo, untrusted
from core.cli._common import fail, json_or_text
from core.config import Settings


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw in values or []:
        key, sep, value = raw.partition("=")
        if not sep or not key.strip():
            fail(f"{what} must look like KEY=VALUE, got {raw!r}")
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------------------------- datasets

def _datasets_list(args: argparse.Namespace, settings: Settings) -> None:
    rows = datasets.list_datasets(db.get_pool(settings), search=args.search or "")
    if not rows:
        print("no datasets")
        return
    width = max(len(d.name) for d in rows)
    for d in rows:
        extra = f"  default template: {d.default_template}" if d.default_template else ""
        print(f"{d.name.ljust(width)}  {d.item_count:>7,} item(s)  {d.description}{extra}".rstrip())


def _datasets_create(args: argparse.Namespace, settings: Settings) -> None:
    d = datasets.create_dataset(db.get_pool(settings), args.name, description=args.description or "",
                                default_template=args.default_template, created_by=args.user or "")
    print(f"created dataset {d.name}")


def _print_progress(label: str):
    interactive = sys.stderr.isatty()
    last = {"at": -1.0}

    def show(fraction: float, message: str) -> None:
        if interactive:
            filled = int(30 * fraction)
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {message}".ljust(90))
            if fraction >= 1:
                sys.stderr.write("\n")
        elif fraction >= 1 or fraction - last["at"] >= 0.25:
            sys.stderr.write(f"{label}: {message}\n")
            last["at"] = fraction
        sys.stderr.flush()

    return show


def _datasets_import(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.file)
    mapping = {k: str(v) for k, v in _pairs(args.map, "--map").items()}
    report = datasets.import_path(
        db.get_pool(settings), args.name, path, fmt=args.format, mapping=mapping or None, encoding=args.encoding,
        delimiter=args.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ","), create=not args.no_create,
        strict=args.strict, created_by=args.user or "",
        progress=_print_progress("import") if path.is_file() and path.stat().st_size > 1_000_000 else None)
    for r in report.rejected:
        print(f"line {r.line}: {r.reason}")
    print(report.summary())
    return 0


def _datasets_export(args: argparse.Namespace, settings: Settings) -> None:
    fmt = args.format or (datasets.format_for(args.file) if args.file != "-" else "jsonl")
    data = datasets.export_items(db.get_pool(settings), args.name, fmt, tag=args.tag)
    if args.file == "-":
        sys.stdout.write(data.decode("utf-8"))
        return
    try:
        Path(args.file).write_bytes(data)
    except OSError as exc:
        fail(f"cannot write {args.file}: {exc.strerror or exc}")
    print(f"exported {datasets.count_items(db.get_pool(settings), args.name, tag=args.tag):,} item(s) of {args.name} "
          f"to {args.file} ({fmt})")


def _datasets_show(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    d = datasets.get_dataset(pool, args.name)
    print(f"{d.name}: {d.item_count:,} item(s)" + (f" — {d.description}" if d.description else ""))
    tags = datasets.dataset_tags(pool, args.name)
    if tags:
        print("tags: " + ", ".join(tags))
    for item in datasets.list_items(pool, args.name, tag=args.tag, limit=args.limit):
        expected = "" if item.expected is None else f" → {item.expected!r}"
        tags = f" [{', '.join(item.tags)}]" if item.tags else ""
        print(f"#{item.id} r{item.revision} {json.dumps(item.input, ensure_ascii=False)}{expected}{tags}")


def _datasets_delete(args: argparse.Namespace, settings: Settings) -> None:
    datasets.delete_dataset(db.get_pool(settings), args.name, with_runs=args.with_runs)
    print(f"deleted dataset {args.name}")


# -------------------------------------------------------------------------------------------------------- eval runs

def _evaluator_specs(args: argparse.Namespace) -> list[Any]:
    specs: list[Any] = []
    if args.asserts:
        path = Path(args.asserts).resolve()
        loaded = untrusted.load_yaml(untrusted.read_file(path, promptfoo.MAX_CONFIG_BYTES, args.asserts), args.asserts)
        if isinstance(loaded, dict) and "assert" in loaded:
            loaded = loaded["assert"]
        if not isinstance(loaded, list):
            fail(f"{args.asserts}: must hold a list of evaluators")
        specs.extend(loaded)
    for raw in args.assertion or []:
        text = raw.strip()
        if text.startswith("{"):
            specs.append(untrusted.load_yaml(text, f"--assert {raw!r}"))
        else:
            try:
                specs.append(evaluators.parse_shorthand(text, strict=True).to_dict())
            except ValueError as exc:
                fail(f"--assert {raw!r}: {exc}")
    return specs


def _wait_and_report(pool, settings: Settings, run, args: argparse.Namespace) -> int:
    if getattr(args, "detach", False):
        print(f"run {run.id} queued ({run.total} item(s)); workers will run it — "
              f"`promptdev eval show {run.id}` follows it")
        return 0
    print(f"run {run.id}: {run.total} item(s) — {', '.join(v.title for v in run.versions)} on {run.model_name}",
          file=sys.stderr)
    interactive = sys.stderr.isatty()
    state = {"shown": -1, "at": 0.0}

    def show(p: "evaluations.Progress") -> None:
        rate = "—" if p.pass_rate is None else f"{p.pass_rate:.0%}"
        line = (f"run {p.run_id} [{'#' * int(30 * p.fraction)}{'.' * (30 - int(30 * p.fraction))}] "
                f"{p.done}/{p.total} · passed {rate} · ETA {evaluations.format_duration(p.eta_s)}")
        if interactive:
            sys.stderr.write("\r" + line.ljust(100))
        elif p.done != state["shown"] and (p.done == p.total or time.monotonic() - state["at"] >= 5):
            sys.stderr.write(line + "\n")
            state["at"] = time.monotonic()
        state["shown"] = p.done
        sys.stderr.flush()

    try:
        final = evaluations.work_on(pool, settings, run.id, on_progress=show)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nrun {run.id} keeps going on other workers; `promptdev eval cancel {run.id}` stops it\n")
        raise
    if interactive:
        sys.stderr.write("\n")
    return _report(pool, run.id, final, getattr(args, "min_pass_rate", None))


def _report(pool, run_id: int, final, min_pass_rate: float | None) -> int:
    summaries = evaluations.summarize_run(pool, run_id)
    print(evaluations.summary_table(summaries))
    table = evaluations.evaluator_table(summaries)
    if table:
        print()
        print(table)
    if final is not None and final.status == "cancelled":
        print(f"run {run_id} was cancelled after {final.done} of {final.total} item(s)")
    if len(summaries) > 1:
        comparison = evaluations.compare(pool, run_id)
        print()
        for t in comparison.tests:
            print(f"{t.other} vs {t.baseline}: pass/fail — {t.pass_verdict} (McNemar, {t.mcnemar.n_discordant} "
                  f"discordant); scores — {t.score_verdict} (paired bootstrap)")
    if min_pass_rate is not None:
        problems = evaluations.gate(summaries, min_pass_rate)
        if final is not None and final.status == "cancelled":
            problems.insert(0, f"run {run_id} was cancelled")
        if problems:
            fail("; ".join(problems))
        print(f"pass rate gate {min_pass_rate:.0%}: passed")
    return 0


def _min_rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if rate > 1 and rate <= 100:
        rate /= 100
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (or a percentage), got {value!r}")
    return rate


def _eval_run(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    params = {k: json_or_text(v) for k, v in _pairs(args.param, "--param").items()}
    run = evaluations.create_run(pool, settings, dataset=args.dataset, templates=args.template,
                                 evaluators=_evaluator_specs(args), model=args.model, params=params, tag=args.tag,
                                 name=args.name or "", created_by=args.user or "", source="cli")
    return _wait_and_report(pool, settings, run, args)


def _eval_promptfoo(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    run, imported = promptfoo.start(pool, settings, args.config, created_by=args.user or "", name=args.name)
    for line in imported.report_lines():
        print(line)
    print()
    return _wait_and_report(pool, settings, run, args)


def _eval_list(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    runs = evaluations.list_runs(pool, dataset=args.dataset, limit=args.limit)
    if not runs:
        print("no evaluation runs")
        return
    for run in runs:
        p = evaluations.progress(pool, run.id)
        rate = "" if p.pass_rate is None else f" · passed {p.pass_rate:.0%}"
        print(f"#{run.id} {run.status:<9} {p.done}/{p.total}{rate} · {run.dataset_name} · "
              f"{', '.join(v.title for v in run.versions)}" + (f" · {run.name}" if run.name else ""))


def _eval_show(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    run = evaluations.get_run(pool, args.run_id)
    p = evaluations.progress(pool, run.id)
    print(f"run {run.id} {run.status}: {p.done}/{p.total} done · dataset {run.dataset_name} · model {run.model_name}"
          + (f" · ETA {evaluations.format_duration(p.eta_s)}" if p.eta_s else ""))
    return _report(pool, run.id, p if p.finished else None, args.min_pass_rate)


def _eval_compare(args: argparse.Namespace, settings: Settings) -> None:
    pool = db.get_pool(settings)
    if len(args.arms) == 1 and ":" not in args.arms[0]:
        target: Any = int(args.arms[0])
    else:
        target = []
        for raw in args.arms:
            run_id, _, pos = raw.partition(":")
            if not run_id.isdigit() or (pos and not pos.isdigit()):
                fail(f"compare takes RUN or RUN:VERSION (version numbered from 1), got {raw!r}")
            target.append((int(run_id), int(pos) - 1 if pos else 0))
    comparison = evaluations.compare(pool, target)
    print(evaluations.summary_table(comparison.summaries))
    print()
    for t in comparison.tests:
        print(f"{t.other} vs {t.baseline} over {t.n_pairs} item(s):")
        m = t.mcnemar
        print(f"  pass/fail: {t.pass_verdict} — McNemar b={m.b} c={m.c}, exact p={m.exact_p:.4g}, "
              f"mid-p={m.mid_p:.4g}, chi-square={m.chi2:.3f} p={m.chi2_p:.4g}")
        if t.bootstrap is not None:
            b = t.bootstrap
            print(f"  scores: {t.score_verdict} — mean difference {b.mean_diff:+.3f} "
                  f"(95% CI {b.ci_low:+.3f} to {b.ci_high:+.3f})")
    dis = comparison.disagreements()
    print(f"\n{len(dis)} item(s) where the versions disagree" + (":" if dis else ""))
    for row in dis[: args.limit]:
        verdicts = " ".join("pass" if row.get(f"passed {k + 1}") else "fail" for k in range(len(comparison.arms)))
        print(f"  item {row['item_id']}: {verdicts} · {json.dumps(row['input'], ensure_ascii=False)[:80]}")


def _eval_cancel(args: argparse.Namespace, settings: Settings) -> None:
    if evaluations.cancel_run(db.get_pool(settings), args.run_id):
        print(f"run {args.run_id} cancelled")
    else:
        print(f"run {args.run_id} had already ended")


def _eval_resume(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    n = evaluations.resume_run(pool, args.run_id)
    print(f"run {args.run_id}: {n} item(s) queued again")
    return _wait_and_report(pool, settings, evaluations.get_run(pool, args.run_id), args)


def _eval_rerun(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    run = evaluations.rerun(pool, settings, args.run_id, resolve_labels=args.resolve_labels,
                            created_by=args.user or "")
    return _wait_and_report(pool, settings, run, args)


# ----------------------------------------------------------------------------------------------------------- wiring

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `datasets` and `eval` to the promptdev command line."""
    ds = subparsers.add_parser("datasets", help="datasets of inputs and expected outputs: list, import, export")
    dsub = ds.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    p = dsub.add_parser("list", help="list datasets")
    p.add_argument("--search", help="only names or descriptions containing this")
    p.set_defaults(func=_datasets_list)
    p = dsub.add_parser("create", help="create an empty dataset")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--default-template", help="template reference (name, name@label)")
    p.add_argument("--user", help="recorded as the author")
    p.set_defaults(func=_datasets_create)
    p = dsub.add_parser("import", help="import items from a CSV or JSONL file (created if missing)")
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file name")
    p.add_argument("--map", action="append", metavar="COLUMN=ROLE",
                   help="role of a column: var, var:NAME, json, json:NAME, expected, tags, metadata, meta:KEY, "
                        "assert, ignore (default: by column name)")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--delimiter", help="CSV field separator (default ',', tab for .tsv)")
    p.add_argument("--strict", action="store_true", help="import nothing if any row is rejected")
    p.add_argument("--no-create", action="store_true", help="fail if the dataset does not exist")
    p.add_argument("--user", help="recorded as the author")
    p.set_defaults(func=_datasets_import)
    p = dsub.add_parser("export", help="export items to CSV or JSONL ('-' writes JSONL to stdout)")
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("--format", choices=("csv", "jsonl"))
    p.add_argument("--tag", help="only items with this tag")
    p.set_defaults(func=_datasets_export)
    p = dsub.add_parser("show", help="show a dataset's items")
    p.add_argument("name")
    p.add_argument("--tag")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_datasets_show)
    p = dsub.add_parser("delete", help="delete a dataset")
    p.add_argument("name")
    p.add_argument("--with-runs", action="store_true", help="also delete its evaluation runs")
    p.set_defaults(func=_datasets_delete)

    ev = subparsers.add_parser("eval", help="evaluation runs: run template versions over a dataset, compare, gate CI")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="ACTION")

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--min-pass-rate", type=_min_rate, metavar="R",
                       help="exit 1 when a version's pass rate is below R (0-1)")
        p.add_argument("--detach", action="store_true", help="queue the run for the workers and return at once")
        p.add_argument("--user", help="recorded as the operator")

    p = esub.add_parser("run", help="run template versions over a dataset and print a summary")
    p.add_argument("--dataset", required=True)
    p.add_argument("--template", action="append", required=True, metavar="REF",
                   help="name, name@label or name@version; repeat to compare versions")
    p.add_argument("--assert", dest="assertion", action="append", metavar="SPEC",
                   help="an evaluator: promptfoo shorthand (contains:Paris, not-icontains:sorry, is-json, "
                        "latency:500) or a YAML/JSON mapping; repeatable")
    p.add_argument("--asserts", metavar="FILE", help="YAML/JSON file with a list of evaluators")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="generation parameter, e.g. max_tokens=64")
    p.add_argument("--model", help="a registered model (default: the configured one)")
    p.add_argument("--tag", help="only items with this tag")
    p.add_argument("--name", help="a name for the run")
    waiting(p)
    p.set_defaults(func=_eval_run)
    p = esub.add_parser("promptfoo", help="import and run a promptfoo config")
    p.add_argument("config", help="path to promptfooconfig.yaml (the files it refers to must lie in its folder "
                                  "or below it)")
    p.add_argument("--name", help="name for the templates and dataset (default: from the config)")
    waiting(p)
    p.set_defaults(func=_eval_promptfoo)
    p = esub.add_parser("list", help="list runs")
    p.add_argument("--dataset")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_eval_list)
    p = esub.add_parser("show", help="progress and summary of a run")
    p.add_argument("run_id", type=int)
    p.add_argument("--min-pass-rate", type=_min_rate, metavar="R")
    p.set_defaults(func=_eval_show)
    p = esub.add_parser("compare", help="compare a run's versions (or RUN:VERSION arms) with significance tests")
    p.add_argument("arms", nargs="+", metavar="RUN[:VERSION]")
    p.add_argument("--limit", type=int, default=20, help="disagreeing items to list")
    p.set_defaults(func=_eval_compare)
    p = esub.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id", type=int)
    p.set_defaults(func=_eval_cancel)
    p = esub.add_parser("resume", help="queue a cancelled run's remaining items again and wait for them")
    p.add_argument("run_id", type=int)
    waiting(p)
    p.set_defaults(func=_eval_resume)
    p = esub.add_parser("rerun", help="run a stored definition again")
    p.add_argument("run_id", type=int)
    p.add_argument("--resolve-labels", action="store_true", help="use what the labels point at now")
    waiting(p)
    p.set_defaults(func=_eval_rerun)
