"""Evaluation runs: one dataset × one or more template versions × one model and parameter set × evaluators.

`create_run` stores the definition (template labels resolved to exact version ids), renders every (item revision ×
version) pair into a queued *work item* and orders them so that items sharing a prompt prefix run one after another
(the in-process backend then reuses its cached, block-aligned prefix: faster, and byte-identical to a cold run).

Workers (the app's background thread, `promptdev worker`, the CLI while it waits) claim work items with
`FOR UPDATE SKIP LOCKED`, recording their process's liveness key (core.liveness): a claim whose worker died is taken
over at once, as soon as its key's lock is free; a lease that a heartbeat extends remains as a fallback. The claim
(its worker and attempt count) is a fencing token: a result is written only by the current claim, in the same
transaction that marks the item done, and the result's primary key is the work item — so no item is lost or
evaluated twice. A result that cannot be written (the database stays away) hands the item back to the queue; a
stopping worker hands back what it did not finish, without counting the attempt. Generations go through the
execution ledger (source `evaluation`; judges: source `judge`).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from statistics import fmean
from typing import Any, Callable, Mapping, Sequence

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from core import evaluators, executions, liveness, models, stats
from core import templates as tmpl  # `templates` is create_run's argument
from core.config import Settings
from core.datasets import DatasetNotFound
from core.db import jsonb
from core.errors import Conflict, InvalidInput, NotFound
from core.evaluators import Evaluator
from core.executions import Origin
from core.llm import Backend, GenerationError, GenerationParams

log = logging.getLogger(__name__)

LEASE_S = 60.0          # a claimed item whose worker has no liveness key is claimed again when its lease ran out
HEARTBEAT_S = 10.0      # how often a working worker extends its lease
MAX_ATTEMPTS = 3        # claims of one item (each by a worker that died) before it is recorded as failed
EVAL_DEFAULT_PARAMS = {"seed": 0}   # under the version's own parameters and the run's: reproducible by default
RUN_STATUSES = ("queued", "running", "done", "cancelled")
SOURCES = ("ui", "cli", "promptfoo", "api", "rerun")


class EvaluationError(InvalidInput):
    """A run cannot be defined or compared as asked (a ValueError); the message says why in one line."""


class EvaluationNotFound(NotFound):
    """No such evaluation run, version of a run or judge model (a LookupError)."""


class RunStateError(Conflict, EvaluationError):
    """The run is not in a state that allows the action (resuming a run that was not cancelled)."""


# --------------------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class RunVersion:
    """One template version of a run."""

    run_id: int
    position: int
    ref: str
    template_version_id: int
    template_name: str
    version: int
    label: str | None
    output_schema: dict | None

    @property
    def title(self) -> str:
        """`name@version` plus the label it was chosen by."""
        return f"{self.template_name}@{self.version}" + (f" ({self.label})" if self.label and self.label != "latest"
                                                          else "")


@dataclass(frozen=True)
class Run:
    """A run's definition and state."""

    id: int
    name: str
    dataset_id: int
    dataset_name: str
    status: str
    model: dict
    model_key: str
    params: dict
    evaluators: list
    definition: dict
    total: int
    source: str
    created_by: str
    rerun_of: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    versions: list[RunVersion] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        """The registered model the run generates with."""
        return self.model.get("name", "")

    @property
    def title(self) -> str:
        """`#id name` for lists."""
        return f"#{self.id} {self.name}".strip()


@dataclass(frozen=True)
class WorkItem:
    """A claimed (item revision × version) pair."""

    id: int
    run_id: int
    position: int
    seq: int
    item_id: int
    item_revision_id: int
    messages: list | None
    render_error: str | None
    params: dict
    attempts: int


@dataclass(frozen=True)
class Progress:
    """How far a run is: counts, pass rate so far, elapsed time and an estimate of the time left."""

    run_id: int
    status: str
    total: int
    done: int
    running: int
    queued: int
    cancelled: int
    passed: int
    errors: int
    elapsed_s: float | None
    eta_s: float | None

    @property
    def pass_rate(self) -> float | None:
        """Passed / done so far (None before the first result)."""
        return self.passed / self.done if self.done else None

    @property
    def fraction(self) -> float:
        """Done / total."""
        return self.done / self.total if self.total else 1.0

    @property
    def finished(self) -> bool:
        """True once the run is done or cancelled and nothing is still running."""
        return self.status in ("done", "cancelled") and self.running == 0


@dataclass(frozen=True)
class Result:
    """One (item × version) result with its checks."""

    work_item_id: int
    run_id: int
    position: int
    item_id: int
    item_revision_id: int
    revision: int
    input: dict
    expected: str | None
    output: str | None
    error: str | None
    passed: bool
    score: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    execution_id: int | None
    worker: str | None
    checks: list


class _PassCounts:
    """Pass rate and its interval for rows that count `passed` out of `n`."""

    passed: int
    n: int

    @property
    def pass_rate(self) -> float:
        """Passed / n (0 when nothing was evaluated)."""
        return self.passed / self.n if self.n else 0.0

    @property
    def pass_ci(self) -> tuple[float, float]:
        """Wilson 95% interval of the pass rate."""
        return stats.wilson_interval(self.passed, self.n)


@dataclass(frozen=True)
class EvaluatorSummary(_PassCounts):
    """One evaluator's results over a version."""

    name: str
    origin: str
    n: int
    passed: int
    mean_score: float | None


@dataclass(frozen=True)
class VersionSummary(_PassCounts):
    """Aggregates of one version of a run."""

    run_id: int
    position: int
    title: str
    n: int
    passed: int
    errors: int
    mean_score: float | None
    score_ci: tuple[float, float]
    mean_latency_ms: float | None
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    evaluators: list[EvaluatorSummary]


# ------------------------------------------------------------------------------------------------------ definition

def template_choices(pool: ConnectionPool, *, versions: int = 10) -> list[str]:
    """References to offer for a run: per active template its labels, `@latest` and its newest versions."""
    refs: list[str] = []
    for t in tmpl.list_templates(pool, active=True, limit=1000, order="name").items:
        refs += [f"{t.name}@{label}" for label in sorted(t.labels)]
        refs.append(f"{t.name}@latest")
        refs += [f"{t.name}@{v}" for v in range(t.latest_version, max(0, t.latest_version - versions), -1)]
    return refs


def _model_record(pool: ConnectionPool, settings: Settings, model: str | None) -> dict[str, Any]:
    default = models.ensure_default_model_registered(pool, settings)
    m = default if model in (None, "", default.name) else models.get_model(pool, model)
    return {"id": m.id, "name": m.name, "backend": m.backend, "sha256": m.sha256, "base_url": m.base_url,
            "remote_model": m.remote_model}


def _sort_key(messages: Sequence[Mapping[str, str]] | None) -> str:
    """Messages as one string whose lexicographic order puts shared prompt prefixes next to each other."""
    if messages is None:
        return ""
    return "\x1e".join(f"{m.get('role', '')}\x1f{m.get('content', '')}" for m in messages)


def _check_evaluators(specs: Sequence[Any], allow_unsupported: bool) -> list[dict[str, Any]]:
    parsed = evaluators.unique_names(evaluators.parse_all(specs, allow_unsupported=allow_unsupported))
    return [e.to_dict() for e in parsed]


def create_run(pool: ConnectionPool, settings: Settings, *, dataset: str, templates: Sequence[str],
               evaluators: Sequence[Mapping[str, Any] | str] = (), model: str | None = None,
               params: Mapping[str, Any] | None = None, tag: str | None = None, name: str = "",
               created_by: str = "", source: str = "ui", rerun_of: int | None = None,
               allow_unsupported: bool = False, _resolved: Sequence[tuple[str, int, str | None]] | None = None) -> Run:
    """Define and queue a run; every template reference is resolved to an exact version now. Returns the run.

    An InvalidInput or NotFound (a ValueError or LookupError) naming the problem when the dataset, a template, the
    model, a parameter or an evaluator is wrong, or nothing would be evaluated; nothing is written then.
    """
    if source not in SOURCES:
        raise EvaluationError(f"unknown run source {source!r}")
    refs = [r.strip() for r in templates if isinstance(r, str) and r.strip()]
    if not refs and not _resolved:
        raise EvaluationError("choose at least one template version (name, name@label or name@version)")
    run_evals = _check_evaluators(list(evaluators), allow_unsupported)
    params = dict(params or {})
    GenerationParams.from_dict(params)  # names the bad parameter
    model_rec = _model_record(pool, settings, model)
    for spec in run_evals:
        if spec.get("provider"):
            try:
                models.get_model(pool, spec["provider"])
            except LookupError:
                raise EvaluationNotFound(f"{spec['type']}: the judge model {spec['provider']!r} is not "
                                         f"registered") from None
    if _resolved is not None:
        versions = [(ref, tmpl.get_version(pool, vid), label) for ref, vid, label in _resolved]
    else:
        versions = []
        for ref in refs:
            resolved = tmpl.resolve(pool, ref)  # the version and the label that chose it, in one query
            versions.append((ref, resolved.version, resolved.label))
    seen: set[int] = set()
    for ref, tv, _ in versions:
        if tv.id in seen:
            raise EvaluationError(f"{ref!r} is the same version ({tv.ref}) as another reference of this run")
        seen.add(tv.id)
    effective = []
    for _, tv, _ in versions:
        try:
            merged = {**EVAL_DEFAULT_PARAMS, **(tv.params or {}), **params}
            effective.append(GenerationParams.from_dict(merged).to_dict())
        except ValueError as exc:
            raise EvaluationError(f"{tv.ref}: {exc}") from None
    definition = {"dataset": dataset, "templates": refs or [r for r, _, _ in versions], "tag": tag, "model": model,
                  "params": params, "evaluators": run_evals, "name": name, "allow_unsupported": allow_unsupported}
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT id FROM datasets WHERE name = %s", (dataset,)).fetchone()
        if row is None:
            raise DatasetNotFound(f"no dataset named {dataset!r}")
        dataset_id = row[0]
        query = ("SELECT i.id, r.id, r.input, r.metadata FROM dataset_items i JOIN dataset_item_revisions r "
                 "ON r.item_id = i.id AND r.revision = i.revision WHERE i.dataset_id = %s AND i.deleted_at IS NULL")
        args: list[Any] = [dataset_id]
        if tag:
            query += " AND %s = ANY (r.tags)"
            args.append(tag)
        items = conn.execute(query + " ORDER BY i.id FOR SHARE OF r", args).fetchall()
        if not items:
            raise EvaluationError(f"dataset {dataset!r} has no items" + (f" tagged {tag!r}" if tag else ""))
        if not run_evals and not any((meta or {}).get("assert") for _, _, _, meta in items):
            raise EvaluationError("no evaluators: add at least one (or give the items their own assert list)")
        run_id = conn.execute(
            "INSERT INTO eval_runs (name, dataset_id, model, model_key, params, evaluators, definition, source, "
            "created_by, rerun_of) VALUES (%(name)s, %(dataset_id)s, %(model)s, %(model_key)s, %(params)s, "
            "%(evaluators)s, %(definition)s, %(source)s, %(created_by)s, %(rerun_of)s) RETURNING id",
            {"name": name or "", "dataset_id": dataset_id, "model": jsonb(model_rec), "model_key": model_rec["name"],
             "params": jsonb(params), "evaluators": jsonb(run_evals), "definition": jsonb(definition),
             "source": source, "created_by": created_by or "", "rerun_of": rerun_of}).fetchone()[0]
        for position, (ref, tv, label) in enumerate(versions):
            conn.execute(
                "INSERT INTO eval_run_versions (run_id, position, ref, template_version_id, template_name, version, "
                "label, output_schema) VALUES (%(run_id)s, %(position)s, %(ref)s, %(template_version_id)s, "
                "%(template_name)s, %(version)s, %(label)s, %(output_schema)s)",
                {"run_id": run_id, "position": position, "ref": ref, "template_version_id": tv.id,
                 "template_name": tv.name, "version": tv.version, "label": label,
                 "output_schema": jsonb(tv.output_schema) if tv.output_schema else None})
        work: list[tuple[str, int, int, int, list | None, str | None]] = []
        for position, (_, tv, label) in enumerate(versions):
            for item_id, revision_id, variables, _ in items:
                try:
                    rendered = tmpl.render_template(pool, tv, variables, label=label)
                    messages, error = rendered.messages, None
                except (ValueError, LookupError) as exc:
                    messages, error = None, f"cannot render {tv.ref}: {str(exc).splitlines()[0]}"
                work.append((_sort_key(messages), position, item_id, revision_id, messages, error))
        work.sort(key=lambda w: (w[0], w[1], w[2]))
        with conn.cursor() as cur, cur.copy(
                "COPY eval_work_items (run_id, position, seq, item_id, item_revision_id, messages, render_error, "
                "params) FROM STDIN") as copy:
            for seq, (_, position, item_id, revision_id, messages, error) in enumerate(work):
                copy.write_row((run_id, position, seq, item_id, revision_id,
                                None if messages is None else json.dumps(messages, ensure_ascii=False), error,
                                json.dumps(effective[position])))
        conn.execute("UPDATE eval_runs SET total = %s WHERE id = %s", (len(work), run_id))
    return get_run(pool, run_id)


_RUN_SELECT = ("SELECT r.id, r.name, r.dataset_id, d.name AS dataset_name, r.status, r.model, r.model_key, r.params, "
               "r.evaluators, r.definition, r.total, r.source, r.created_by, r.rerun_of, r.created_at, r.started_at, "
               "r.finished_at FROM eval_runs r JOIN datasets d ON d.id = r.dataset_id")


def _versions(conn: psycopg.Connection, run_ids: Sequence[int]) -> dict[int, list[RunVersion]]:
    out: dict[int, list[RunVersion]] = {rid: [] for rid in run_ids}
    with conn.cursor(row_factory=class_row(RunVersion)) as cur:
        for v in cur.execute("SELECT run_id, position, ref, template_version_id, template_name, version, label, "
                             "output_schema FROM eval_run_versions WHERE run_id = ANY(%s) ORDER BY run_id, position",
                             (list(run_ids),)):
            out[v.run_id].append(v)
    return out


def get_run(pool: ConnectionPool, run_id: int) -> Run:
    """A run with its versions; EvaluationNotFound (a LookupError) when there is none."""
    with pool.connection() as conn:
        with conn.cursor(row_factory=class_row(Run)) as cur:
            run = cur.execute(_RUN_SELECT + " WHERE r.id = %s", (run_id,)).fetchone()
        if run is None:
            raise EvaluationNotFound(f"no evaluation run with id {run_id}")
        return replace(run, versions=_versions(conn, [run_id])[run_id])


def list_runs(pool: ConnectionPool, *, dataset: str | None = None, status: str | None = None,
              limit: int = 50) -> list[Run]:
    """Runs, newest first, optionally of one dataset or status."""
    query, args = _RUN_SELECT, []
    where = []
    if dataset:
        where.append("d.name = %s")
        args.append(dataset)
    if status:
        where.append("r.status = %s")
        args.append(status)
    if where:
        query += " WHERE " + " AND ".join(where)
    with pool.connection() as conn:
        with conn.cursor(row_factory=class_row(Run)) as cur:
            runs = cur.execute(query + " ORDER BY r.id DESC LIMIT %s", (*args, limit)).fetchall()
        versions = _versions(conn, [r.id for r in runs])
    return [replace(r, versions=versions[r.id]) for r in runs]


def cancel_run(pool: ConnectionPool, run_id: int) -> bool:
    """Stop a run: queued items are cancelled (items being generated finish); False when it had already ended."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT status FROM eval_runs WHERE id = %s FOR UPDATE", (run_id,)).fetchone()
        if row is None:
            raise EvaluationNotFound(f"no evaluation run with id {run_id}")
        if row[0] not in ("queued", "running"):
            return False
        conn.execute(f"UPDATE eval_work_items w SET status = 'cancelled' WHERE w.run_id = %s AND (w.status = 'queued' "
                     f"OR {_ABANDONED})", (run_id,))
        conn.execute("UPDATE eval_runs SET status = 'cancelled', finished_at = now() WHERE id = %s", (run_id,))
    return True


def resume_run(pool: ConnectionPool, run_id: int) -> int:
    """Queue a cancelled run's unfinished items again; return how many."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT status FROM eval_runs WHERE id = %s FOR UPDATE", (run_id,)).fetchone()
        if row is None:
            raise EvaluationNotFound(f"no evaluation run with id {run_id}")
        if row[0] != "cancelled":
            raise RunStateError(f"run {run_id} is {row[0]}; only a cancelled run can be resumed")
        n = conn.execute("UPDATE eval_work_items SET status = 'queued' WHERE run_id = %s AND status = 'cancelled'",
                         (run_id,)).rowcount
        left = conn.execute("SELECT count(*) FROM eval_work_items WHERE run_id = %s AND status IN ('queued', "
                            "'running')", (run_id,)).fetchone()[0]
        conn.execute("UPDATE eval_runs SET status = %s, finished_at = %s WHERE id = %s",
                     ("running" if left else "done", None if left else datetime.now().astimezone(), run_id))
    return n


def rerun(pool: ConnectionPool, settings: Settings, run_id: int, *, resolve_labels: bool = False,
          created_by: str = "") -> Run:
    """Run a stored definition again on the dataset's current items: the same exact versions, or (resolve_labels)
    whatever its labels point at now."""
    old = get_run(pool, run_id)
    d = old.definition
    resolved = None if resolve_labels else [(v.ref, v.template_version_id, v.label) for v in old.versions]
    return create_run(pool, settings, dataset=old.dataset_name, templates=d.get("templates") or [],
                      evaluators=old.evaluators, model=old.model_name, params=old.params, tag=d.get("tag"),
                      name=old.name, created_by=created_by or old.created_by, source="rerun", rerun_of=old.id,
                      allow_unsupported=bool(d.get("allow_unsupported")), _resolved=resolved)


def delete_run(pool: ConnectionPool, run_id: int) -> None:
    """Delete a run with its work items and results (the ledger keeps its executions)."""
    with pool.connection() as conn:
        if conn.execute("DELETE FROM eval_runs WHERE id = %s", (run_id,)).rowcount == 0:
            raise EvaluationNotFound(f"no evaluation run with id {run_id}")


# ------------------------------------------------------------------------------------------------------- progress

def progress(pool: ConnectionPool, run_id: int) -> Progress:
    """Done / total, pass rate so far, elapsed time and time left (from the rate so far)."""
    with pool.connection() as conn:
        run = conn.execute("SELECT status, started_at, finished_at, now() FROM eval_runs WHERE id = %s",
                           (run_id,)).fetchone()
        if run is None:
            raise EvaluationNotFound(f"no evaluation run with id {run_id}")
        status, started_at, finished_at, now = run
        # An abandoned claim (its worker died) counts as queued: another worker will take it.
        counts = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE w.status = 'done'), "
            f"count(*) FILTER (WHERE w.status = 'running' AND NOT {_ABANDONED}), "
            f"count(*) FILTER (WHERE w.status = 'queued' OR {_ABANDONED}), "
            "count(*) FILTER (WHERE w.status = 'cancelled') FROM eval_work_items w WHERE w.run_id = %s",
            (run_id,)).fetchone()
        res = conn.execute("SELECT count(*) FILTER (WHERE passed), count(*) FILTER (WHERE error IS NOT NULL), "
                           "max(created_at) FROM eval_results WHERE run_id = %s", (run_id,)).fetchone()
    total, done, running, queued, cancelled = counts
    passed, errors, last = res
    elapsed = eta = None
    if started_at is not None:
        end = finished_at or now
        elapsed = max(0.0, (end - started_at).total_seconds())
        if status == "running" and done and last is not None:
            rate = done / max((last - started_at).total_seconds(), 1e-6)
            eta = (queued + running) / rate
    return Progress(run_id, status, total, done, running, queued, cancelled, passed, errors, elapsed, eta)


# --------------------------------------------------------------------------------------------------------- workers

# A running item that another worker may take over: its worker is gone (its liveness key is free) or its lease ran out.
_ABANDONED = f"(w.status = 'running' AND (w.lease_until < now() OR {liveness.holder_gone_sql('w.worker_key')}))"
# An item handed back: queued again (cancelled with its run), its claim cleared.
_HANDED_BACK = ("status = CASE WHEN r.status = 'cancelled' THEN 'cancelled' ELSE 'queued' END, claimed_by = NULL, "
                "claimed_at = NULL, lease_until = NULL, worker_key = NULL")

_CLAIM = """
UPDATE eval_work_items w2
   SET status = 'running', attempts = w2.attempts + 1, claimed_by = %(worker)s, claimed_at = now(),
       lease_until = now() + make_interval(secs => %(lease)s), worker_key = %(key)s
  FROM (SELECT w.id FROM eval_work_items w JOIN eval_runs r ON r.id = w.run_id
         WHERE r.status IN ('queued', 'running') {run_filter}
           AND (w.status = 'queued' OR """ + _ABANDONED + """ {own})
         ORDER BY w.run_id, w.seq
         LIMIT %(limit)s FOR UPDATE OF w SKIP LOCKED) pick
 WHERE w2.id = pick.id
RETURNING w2.id, w2.run_id, w2.position, w2.seq, w2.item_id, w2.item_revision_id, w2.messages, w2.render_error,
          w2.params, w2.attempts
"""


def claim_many(pool: ConnectionPool, worker: str, *, run_id: int | None = None, limit: int = 1,
               lease_s: float = LEASE_S) -> list[WorkItem]:
    """Claim up to `limit` next items in prefix order (queued, or abandoned by a worker that is gone or whose lease
    ran out) of any active run, or of one; the claims record this process's liveness key."""
    # An item claimed before (its worker stopped before finishing it) is claimed alone: an item that kills its worker
    # uses up its own attempts (MAX_ATTEMPTS), never those of the items claimed with it.
    run_filter = "AND r.id = %(run)s" if run_id is not None else ""
    args = {"worker": worker, "lease": lease_s, "run": run_id, "limit": 1, "key": liveness.key(pool)}
    with liveness.claiming(worker) as unanswered, pool.connection() as conn, \
            conn.cursor(row_factory=class_row(WorkItem)) as cur:
        # After a claim whose answer was lost, the items it may have claimed under this name are taken back.
        own = "OR (w.status = 'running' AND w.claimed_by = %(worker)s)" if unanswered else ""
        works = cur.execute(_CLAIM.format(run_filter=run_filter, own=own), args).fetchall()
        if works and works[0].attempts == 1 and limit > 1:   # a first claim: more first claims may join it
            works += cur.execute(_CLAIM.format(run_filter=f"{run_filter} AND w.attempts = 0", own=""),
                                 {**args, "limit": limit - 1}).fetchall()
        if works:
            conn.execute("UPDATE eval_runs SET status = 'running', started_at = coalesce(started_at, now()) "
                         "WHERE id = ANY(%s) AND status = 'queued'", (sorted({w.run_id for w in works}),))
    return sorted(works, key=lambda w: (w.run_id, w.seq))


def claim(pool: ConnectionPool, worker: str, *, run_id: int | None = None, lease_s: float = LEASE_S) -> WorkItem | None:
    """Claim the next queued item (or one whose lease ran out) of any active run, or of one run; None if none."""
    works = claim_many(pool, worker, run_id=run_id, limit=1, lease_s=lease_s)
    return works[0] if works else None


class _Heartbeat:
    """Extends the leases of claimed items in the background while they are worked on."""

    def __init__(self, pool: ConnectionPool, works: Sequence[WorkItem], lease_s: float, every_s: float):
        self.pool, self.works, self.lease_s, self.every_s = pool, list(works), lease_s, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"lease-{self.works[0].id}", daemon=True)

    def _beat(self) -> None:
        ids, attempts = [w.id for w in self.works], [w.attempts for w in self.works]
        while not self.stop.wait(self.every_s):
            try:
                with self.pool.connection() as conn:
                    conn.execute("UPDATE eval_work_items w SET lease_until = now() + make_interval(secs => %s) "
                                 "FROM unnest(%s::bigint[], %s::int[]) AS c(id, attempts) "
                                 "WHERE w.id = c.id AND w.attempts = c.attempts AND w.status = 'running'",
                                 (self.lease_s, ids, attempts))
            except Exception:  # the database is away for a moment: the next beat tries again
                log.warning("could not extend the leases of work items %s", ids, exc_info=True)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@dataclass
class _RunContext:
    run: Run
    evaluators: list[Evaluator]
    versions: dict[int, RunVersion]


_contexts: dict[tuple, _RunContext] = {}
_contexts_lock = threading.Lock()


def _context(pool: ConnectionPool, run_id: int) -> _RunContext:
    key = (getattr(pool, "conninfo", id(pool)), run_id)  # run ids repeat across databases
    with _contexts_lock:
        ctx = _contexts.get(key)
    if ctx is None:
        run = get_run(pool, run_id)
        ctx = _RunContext(run, evaluators.parse_all(run.evaluators, allow_unsupported=True),
                          {v.position: v for v in run.versions})
        with _contexts_lock:
            if len(_contexts) > 64:
                _contexts.clear()
            _contexts[key] = ctx
    return ctx


_backends: dict[tuple, tuple[float, Backend]] = {}
_BACKEND_TTL_S = 60.0


def _backend(pool: ConnectionPool, settings: Settings, model_name: str | None) -> Backend:
    """The backend of a registered model (looked up at most once a minute per process)."""
    key = (id(pool), settings, model_name)
    now = time.monotonic()
    with _contexts_lock:
        hit = _backends.get(key)
    if hit is not None and now - hit[0] < _BACKEND_TTL_S:
        return hit[1]
    backend = models.backend_for(pool, settings, model_name or None)
    with _contexts_lock:
        _backends[key] = (now, backend)
    return backend


def _judge_fn(pool: ConnectionPool, settings: Settings, run: Run, work: WorkItem) -> evaluators.JudgeFn:
    def judge(ev: Evaluator, rubric: str, output: str, variables: Mapping[str, Any]) -> evaluators.Judgement:
        model_name = ev.provider or run.model_name
        backend = _backend(pool, settings, model_name)
        registered = models.model_for_backend(pool, backend)
        params = GenerationParams(temperature=0.0, seed=0, max_tokens=int(ev.options.get("max_tokens", 256)))
        origin = Origin(source="judge", user_id=run.created_by or None,
                        variables={"rubric": rubric, "output": output, "evaluation_run": run.id,
                                   "work_item": work.id},
                        model_id=registered.id if registered else None)
        exec_run = executions.start(pool, backend, origin=origin, params=params,
                                    messages=evaluators.judge_messages(rubric, output))
        text = exec_run.read()
        return evaluators.Judgement(text, exec_run.execution_id)

    return judge


def _finish(pool: ConnectionPool, work: WorkItem, worker: str, *, execution_id: int | None, output: str | None,
            error: str | None, checks: Sequence[evaluators.Check], check_origins: Sequence[str], passed: bool,
            score: float | None, prompt_tokens: int | None, completion_tokens: int | None,
            latency_ms: float | None) -> bool:
    """Write the result and mark the item done, only if this claim (worker and attempt) still holds it; True when
    written. On a fresh pooled connection, tried again when it breaks (core.liveness.write); psycopg.OperationalError
    when the database stays away."""
    def write(conn: psycopg.Connection) -> bool:
        with conn.transaction():
            return _write_result(conn, work, worker, execution_id=execution_id, output=output, error=error,
                                 checks=checks, check_origins=check_origins, passed=passed, score=score,
                                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 latency_ms=latency_ms)

    if liveness.write(pool, write, what=f"writing the result of work item {work.id}"):
        return True
    log.warning("work item %s was claimed again by another worker; this result is dropped", work.id)
    return False


def _write_result(conn: psycopg.Connection, work: WorkItem, worker: str, *, execution_id: int | None,
                  output: str | None, error: str | None, checks: Sequence[evaluators.Check],
                  check_origins: Sequence[str], passed: bool, score: float | None, prompt_tokens: int | None,
                  completion_tokens: int | None, latency_ms: float | None) -> bool:
    """_finish's transaction: True when the claim held and the result is written (now or by an earlier try)."""
    conn.execute("SELECT 1 FROM eval_runs WHERE id = %s FOR UPDATE", (work.run_id,))
    held = conn.execute("UPDATE eval_work_items SET status = 'done', lease_until = NULL, worker_key = NULL "
                        "WHERE id = %s AND attempts = %s AND claimed_by = %s AND status = 'running'",
                        (work.id, work.attempts, worker)).rowcount
    if not held:  # taken over by another worker, or written by an earlier try whose commit was lost
        return conn.execute("SELECT EXISTS (SELECT 1 FROM eval_work_items w JOIN eval_results e ON e.work_item_id = "
                            "w.id WHERE w.id = %s AND w.status = 'done' AND w.attempts = %s AND w.claimed_by = %s "
                            "AND e.worker = %s)", (work.id, work.attempts, worker, worker)).fetchone()[0]
    conn.execute(
        "INSERT INTO eval_results (work_item_id, run_id, position, item_id, execution_id, output, error, passed, "
        "score, prompt_tokens, completion_tokens, latency_ms, worker) "
        "VALUES (%(work_item_id)s, %(run_id)s, %(position)s, %(item_id)s, %(execution_id)s, %(output)s, "
        "%(error)s, %(passed)s, %(score)s, %(prompt_tokens)s, %(completion_tokens)s, %(latency_ms)s, %(worker)s)",
        {"work_item_id": work.id, "run_id": work.run_id, "position": work.position, "item_id": work.item_id,
         "execution_id": execution_id, "output": output, "error": error, "passed": passed, "score": score,
         "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "latency_ms": latency_ms,
         "worker": worker})
    if checks:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO eval_checks (work_item_id, idx, origin, name, type, passed, score, weight, reason, "
                "execution_id) VALUES (%(work_item_id)s, %(idx)s, %(origin)s, %(name)s, %(type)s, %(passed)s, "
                "%(score)s, %(weight)s, %(reason)s, %(execution_id)s)",
                [{"work_item_id": work.id, "idx": i, "origin": origin, "name": c.name, "type": c.type,
                  "passed": c.passed, "score": c.score, "weight": c.weight, "reason": c.reason,
                  "execution_id": c.execution_id}
                 for i, (c, origin) in enumerate(zip(checks, check_origins))])
    left = conn.execute("SELECT EXISTS (SELECT 1 FROM eval_work_items WHERE run_id = %s "
                        "AND status IN ('queued', 'running'))", (work.run_id,)).fetchone()[0]
    if not left:
        conn.execute("UPDATE eval_runs SET status = 'done', finished_at = now() WHERE id = %s "
                     "AND status IN ('queued', 'running')", (work.run_id,))
    return True


@dataclass
class _Pending:
    """A claimed item ready to generate: what it needs to be evaluated and recorded afterwards."""

    work: WorkItem
    run: Run
    version: RunVersion
    rev: dict[str, Any]
    evals: list[Evaluator]
    origins: list[str]
    backend: Backend
    origin: Origin
    params: GenerationParams


_NOTHING = dict(execution_id=None, output=None, checks=[], check_origins=[], passed=False, score=0.0,
                prompt_tokens=None, completion_tokens=None, latency_ms=None)


def _prepare(pool: ConnectionPool, settings: Settings, work: WorkItem, worker: str) -> _Pending | bool:
    """What generating an item needs, or (when it cannot run) its recorded failure: True when written."""
    ctx = _context(pool, work.run_id)
    run, version = ctx.run, ctx.versions[work.position]
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rev = cur.execute("SELECT input, expected, metadata FROM dataset_item_revisions WHERE id = %s",
                          (work.item_revision_id,)).fetchone()
    item_evals = evaluators.parse_all((rev["metadata"] or {}).get("assert") or [], allow_unsupported=True)
    if work.attempts > MAX_ATTEMPTS:
        return _finish(pool, work, worker, error=f"gave up after {MAX_ATTEMPTS} attempts: each worker that took this "
                                                 f"item stopped before finishing it", **_NOTHING)
    if work.render_error:
        return _finish(pool, work, worker, error=work.render_error, **_NOTHING)
    try:
        backend = _backend(pool, settings, run.model_name)
    except (ValueError, LookupError, OSError, GenerationError) as exc:
        return _finish(pool, work, worker, error=f"model {run.model_name!r} unavailable: {exc}", **_NOTHING)
    origin = Origin(source="evaluation", user_id=run.created_by or None,
                    template_version_id=version.template_version_id, template_name=version.template_name,
                    template_version=version.version, label=version.label, variables=rev["input"],
                    model_id=run.model.get("id"))
    return _Pending(work, run, version, rev, [*ctx.evaluators, *item_evals],
                    ["run"] * len(ctx.evaluators) + ["item"] * len(item_evals), backend, origin,
                    GenerationParams.from_dict(work.params))


def _complete(pool: ConnectionPool, settings: Settings, p: _Pending, exec_run: executions.ExecutionRun,
              worker: str) -> bool:
    """Finish an item's generation (recorded in the ledger), evaluate it and write its result."""
    error = None
    try:
        output = exec_run.read()
    except GenerationError as exc:
        output, error = None, str(exc)
    usage = exec_run.usage
    latency_ms = usage.total_s * 1000 if usage.total_s else None
    if error is not None:
        return _finish(pool, p.work, worker, **{**_NOTHING, "execution_id": exec_run.execution_id, "error": error})
    ectx = evaluators.Context(output=output, expected=p.rev["expected"], variables=p.rev["input"],
                              latency_ms=latency_ms, prompt_tokens=usage.prompt_tokens,
                              completion_tokens=usage.completion_tokens, finish_reason=usage.finish_reason,
                              output_schema=p.version.output_schema,
                              judge=_judge_fn(pool, settings, p.run, p.work))
    checks = evaluators.run_all(p.evals, ectx)
    passed, score = evaluators.summarize(checks, evaluators.item_threshold(p.rev["metadata"]))
    return _finish(pool, p.work, worker, execution_id=exec_run.execution_id, output=output, error=None,
                   checks=checks, check_origins=p.origins, passed=passed, score=score,
                   prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   latency_ms=latency_ms)


def process_many(pool: ConnectionPool, settings: Settings, works: Sequence[WorkItem], worker: str, *,
                 lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S) -> int:
    """Generate and evaluate claimed items, decoding those on one model together; how many results were written.

    Batching never changes an output: the in-process model gives each item the bytes it gives it alone. An item
    whose result cannot be written (the database stays away) goes back to the queue, its attempt counted.
    """
    if not works:
        return 0
    written = 0
    with _Heartbeat(pool, works, lease_s, heartbeat_s):
        groups: dict[int, list[_Pending]] = {}
        for work in works:
            try:
                pending = liveness.retrying(lambda w=work: _prepare(pool, settings, w, worker),
                                            what=f"preparing work item {work.id}", pool=pool)
            except psycopg.OperationalError as exc:
                _hand_back_one(pool, work, worker, exc)
                continue
            if isinstance(pending, bool):
                written += pending
            else:
                groups.setdefault(id(pending.backend), []).append(pending)
        for group in groups.values():
            backend = group[0].backend
            if len(group) == 1:
                p = group[0]
                runs = [executions.start(pool, backend, origin=p.origin, params=p.params, messages=p.work.messages)]
            else:
                runs = executions.start_many(pool, backend, [(p.origin, p.params, p.work.messages) for p in group])
            for p, exec_run in zip(group, runs):
                try:
                    written += _complete(pool, settings, p, exec_run, worker)
                except psycopg.OperationalError as exc:
                    _hand_back_one(pool, p.work, worker, exc)
    return written


def _hand_back_one(pool: ConnectionPool, work: WorkItem, worker: str, exc: BaseException) -> None:
    """Queue an item again that could not be prepared or whose result could not be written, the database being away
    (its attempt counts), if this claim still holds it."""
    log.error("work item %s could not be recorded (%s); it goes back to the queue", work.id,
              " ".join(str(exc).split()))
    liveness.write_later(pool, lambda conn: conn.execute(
        f"UPDATE eval_work_items w SET {_HANDED_BACK} FROM eval_runs r WHERE r.id = w.run_id AND w.id = %s "
        "AND w.attempts = %s AND w.claimed_by = %s AND w.status = 'running'",
        (work.id, work.attempts, worker)), what=f"handing back work item {work.id}")


def hand_back(pool: ConnectionPool, key: int) -> int:
    """Queue again the items still running under a liveness key — those a stopping worker process did not finish —
    without counting their attempt (an item of a cancelled run is cancelled instead); how many."""
    return liveness.write(pool, lambda conn: conn.execute(
        f"UPDATE eval_work_items w SET {_HANDED_BACK}, attempts = greatest(w.attempts - 1, 0) FROM eval_runs r "
        "WHERE r.id = w.run_id AND w.worker_key = %s AND w.status = 'running'",
        (key,)).rowcount, what="handing back unfinished work items")


def process(pool: ConnectionPool, settings: Settings, work: WorkItem, worker: str, *, lease_s: float = LEASE_S,
            heartbeat_s: float = HEARTBEAT_S) -> bool:
    """Generate and evaluate one claimed item and record its result; True when the result was written."""
    return process_many(pool, settings, [work], worker, lease_s=lease_s, heartbeat_s=heartbeat_s) == 1


def run_next(pool: ConnectionPool, settings: Settings, *, run_id: int | None = None, worker: str | None = None,
             lease_s: float = LEASE_S) -> bool:
    """Claim and process the next items, up to PROMPTDEV_EVAL_BATCH of them (the worker's task source)."""
    me = worker or liveness.worker_id()
    works = claim_many(pool, me, run_id=run_id, limit=settings.eval_batch, lease_s=lease_s)
    if not works:
        return False
    process_many(pool, settings, works, me, lease_s=lease_s)
    return True


def work_on(pool: ConnectionPool, settings: Settings, run_id: int, *,
            on_progress: Callable[[Progress], None] | None = None, stop: threading.Event | None = None,
            poll_s: float = 0.5) -> Progress:
    """Work on one run here until it is finished (other workers may help), reporting progress after each item."""
    while True:
        if stop is not None and stop.is_set():
            return progress(pool, run_id)
        did = run_next(pool, settings, run_id=run_id)
        current = progress(pool, run_id)
        if on_progress:
            on_progress(current)
        if current.finished or (current.status in ("done", "cancelled") and not current.running):
            return current
        if not did:
            time.sleep(poll_s)  # the rest is claimed by other workers: wait for them


def dashboard_figures(conn: psycopg.Connection) -> dict[str, int]:
    """The Home page's figures of datasets and evaluation runs (core.status lists them)."""
    datasets_n = conn.execute("SELECT count(*) FROM datasets").fetchone()[0]
    runs_n, active = conn.execute("SELECT count(*), count(*) FILTER (WHERE status IN ('queued', 'running')) "
                                  "FROM eval_runs").fetchone()
    return {"Datasets": datasets_n, "Evaluation runs": runs_n, "Runs in progress": active}


# -------------------------------------------------------------------------------------------------------- results

_RESULT_SELECT = """
SELECT e.work_item_id, e.run_id, e.position, e.item_id, w.item_revision_id, r.revision, r.input, r.expected, e.output,
       e.error, e.passed, e.score, e.prompt_tokens, e.completion_tokens, e.latency_ms, e.execution_id, e.worker,
       coalesce((SELECT jsonb_agg(jsonb_build_object('name', c.name, 'type', c.type, 'origin', c.origin,
                        'passed', c.passed, 'score', c.score, 'weight', c.weight, 'reason', c.reason,
                        'execution_id', c.execution_id) ORDER BY c.idx)
                 FROM eval_checks c WHERE c.work_item_id = e.work_item_id), '[]'::jsonb) AS checks
  FROM eval_results e JOIN eval_work_items w ON w.id = e.work_item_id
  JOIN dataset_item_revisions r ON r.id = w.item_revision_id
"""


def list_results(pool: ConnectionPool, run_id: int, *, position: int | None = None, failed_only: bool = False,
                 limit: int | None = None) -> list[Result]:
    """A run's results in item order (then version), optionally of one version or only failures."""
    query, args = _RESULT_SELECT + " WHERE e.run_id = %s", [run_id]
    if position is not None:
        query += " AND e.position = %s"
        args.append(position)
    if failed_only:
        query += " AND NOT e.passed"
    query += " ORDER BY e.item_id, e.position"
    if limit is not None:
        query += " LIMIT %s"
        args.append(limit)
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Result)) as cur:
        return cur.execute(query, args).fetchall()


def summarize_run(pool: ConnectionPool, run_id: int) -> list[VersionSummary]:
    """Aggregates per version: pass rate (Wilson CI), mean score (bootstrap CI), latency, tokens, per evaluator."""
    run = get_run(pool, run_id)
    return [_summary(pool, run, v) for v in run.versions]


def _summary(pool: ConnectionPool, run: Run, v: RunVersion) -> VersionSummary:
    with pool.connection() as conn:
        rows = conn.execute("SELECT passed, score, error IS NOT NULL, latency_ms, prompt_tokens, completion_tokens "
                            "FROM eval_results WHERE run_id = %s AND position = %s ORDER BY item_id",
                            (run.id, v.position)).fetchall()
        ev_rows = conn.execute(
            "SELECT c.name, c.origin, count(*), count(*) FILTER (WHERE c.passed), avg(c.score) "
            "FROM eval_checks c JOIN eval_results e ON e.work_item_id = c.work_item_id "
            "WHERE e.run_id = %s AND e.position = %s GROUP BY c.name, c.origin "
            "ORDER BY c.origin DESC, min(c.idx), c.name", (run.id, v.position)).fetchall()
    scores = [r[1] for r in rows if r[1] is not None]
    latencies = [r[3] for r in rows if r[3] is not None]
    ptoks = [r[4] for r in rows if r[4] is not None]
    ctoks = [r[5] for r in rows if r[5] is not None]
    return VersionSummary(
        run_id=run.id, position=v.position, title=v.title, n=len(rows), passed=sum(1 for r in rows if r[0]),
        errors=sum(1 for r in rows if r[2]), mean_score=fmean(scores) if scores else None,
        score_ci=stats.bootstrap_mean_interval(scores), mean_latency_ms=fmean(latencies) if latencies else None,
        mean_prompt_tokens=fmean(ptoks) if ptoks else None, mean_completion_tokens=fmean(ctoks) if ctoks else None,
        evaluators=[EvaluatorSummary(name, origin, n, p, float(avg) if avg is not None else None)
                    for name, origin, n, p, avg in ev_rows])


# -------------------------------------------------------------------------------------------------------- compare

@dataclass(frozen=True)
class PairTest:
    """A version against the baseline over the items both evaluated."""

    baseline: str
    other: str
    n_pairs: int
    baseline_passed: int
    other_passed: int
    mcnemar: stats.McNemarResult
    bootstrap: stats.BootstrapResult | None

    @property
    def pass_verdict(self) -> str:
        """What McNemar's test says about the pass rates."""
        if self.n_pairs == 0:
            return "no items in common"
        diff = self.other_passed - self.baseline_passed
        return stats.verdict(self.mcnemar.p_value, diff, better=self.other, worse=self.baseline)

    @property
    def score_verdict(self) -> str:
        """What the paired bootstrap says about the scores."""
        if self.bootstrap is None:
            return "no paired scores"
        return stats.verdict(self.bootstrap.p_value, self.bootstrap.mean_diff, better=self.other,
                             worse=self.baseline)


@dataclass(frozen=True)
class Comparison:
    """Two or more versions over the same items: aggregates, paired tests against the first, items side by side."""

    arms: list[tuple[int, int]]
    titles: list[str]
    summaries: list[VersionSummary]
    tests: list[PairTest]
    rows: list[dict[str, Any]]   # per item: input, expected, and per arm output / passed / score; disagree

    def disagreements(self) -> list[dict[str, Any]]:
        """Items on which the versions do not all pass or all fail."""
        return [r for r in self.rows if r["disagree"]]


def compare(pool: ConnectionPool, arms: int | Sequence[tuple[int, int]], *, resamples: int = 2000) -> Comparison:
    """Compare versions: a run id (all its versions) or (run id, position) pairs, matched by dataset item."""
    if isinstance(arms, int):
        run = get_run(pool, arms)
        arms = [(run.id, v.position) for v in run.versions]
    arms = [(int(r), int(p)) for r, p in arms]
    if len(arms) < 2:
        raise EvaluationError("compare needs at least two versions")
    if len(set(arms)) != len(arms):
        raise EvaluationError("the same version is chosen twice")
    runs: dict[int, Run] = {}
    for run_id, _ in arms:
        if run_id not in runs:
            runs[run_id] = get_run(pool, run_id)
    datasets_ = {r.dataset_id for r in runs.values()}
    if len(datasets_) > 1:
        raise EvaluationError("the versions to compare come from runs over different datasets")
    summaries, titles = [], []
    by_arm: list[dict[int, Result]] = []
    multi_run = len(runs) > 1
    for run_id, position in arms:
        run = runs[run_id]
        version = next((v for v in run.versions if v.position == position), None)
        if version is None:
            raise EvaluationNotFound(f"run {run_id} has no version {position}")
        summaries.append(_summary(pool, run, version))
        titles.append(version.title + (f" · run {run_id}" if multi_run else ""))
        by_arm.append({r.item_id: r for r in list_results(pool, run_id, position=position)})
    if len(set(titles)) != len(titles):
        titles = [f"{t} [{i + 1}]" for i, t in enumerate(titles)]
    base = by_arm[0]
    tests = []
    for k in range(1, len(arms)):
        common = sorted(set(base) & set(by_arm[k]))
        a = [base[i].passed for i in common]
        b = [by_arm[k][i].passed for i in common]
        scored = [i for i in common if base[i].score is not None and by_arm[k][i].score is not None]
        boot = (stats.paired_bootstrap([base[i].score for i in scored], [by_arm[k][i].score for i in scored],
                                       resamples=resamples) if scored else None)
        tests.append(PairTest(titles[0], titles[k], len(common), sum(a), sum(b), stats.mcnemar_pairs(a, b), boot))
    rows = []
    for item_id in sorted(set().union(*[set(m) for m in by_arm])):
        results = [m.get(item_id) for m in by_arm]
        first = next(r for r in results if r is not None)
        row: dict[str, Any] = {"item_id": item_id, "input": first.input, "expected": first.expected}
        verdicts = set()
        for k, r in enumerate(results):
            row[f"output {k + 1}"] = None if r is None else (r.output if r.error is None else f"[error] {r.error}")
            row[f"passed {k + 1}"] = None if r is None else r.passed
            row[f"score {k + 1}"] = None if r is None else r.score
            if r is not None:
                verdicts.add(r.passed)
        row["disagree"] = len(verdicts) > 1
        row["same output"] = len({r.output for r in results if r is not None}) == 1
        rows.append(row)
    return Comparison(arms, titles, summaries, tests, rows)


# ----------------------------------------------------------------------------------------------------------- diffs

def _tokens(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|[^\w\s]", text)


def inline_diff(expected: str | None, output: str | None) -> str:
    """Expected → output as one line of text: `[-removed-]{+added+}` around the words that differ."""
    a, b = _tokens(expected or ""), _tokens(output or "")
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append("".join(a[i1:i2]))
            continue
        if i2 > i1:
            out.append("[-" + "".join(a[i1:i2]) + "-]")
        if j2 > j1:
            out.append("{+" + "".join(b[j1:j2]) + "+}")
    return "".join(out)


def unified_diff(expected: str | None, output: str | None) -> str:
    """A line diff of expected (---) and output (+++), for a code block."""
    lines = difflib.unified_diff((expected or "").splitlines(), (output or "").splitlines(), "expected", "output",
                                 lineterm="", n=3)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- gates

def gate(summaries: Sequence[VersionSummary], min_pass_rate: float) -> list[str]:
    """The versions whose pass rate is below min_pass_rate, each as a one-line reason (empty: the gate passes)."""
    if not 0 <= min_pass_rate <= 1:
        raise EvaluationError(f"--min-pass-rate must be between 0 and 1, got {min_pass_rate}")
    return [f"{s.title}: pass rate {s.pass_rate:.1%} is below {min_pass_rate:.1%}" for s in summaries
            if s.n == 0 or s.pass_rate < min_pass_rate]


def format_duration(seconds: float | None) -> str:
    """12 s, 3 min 5 s, 1 h 2 min; '—' for None."""
    if seconds is None or math.isnan(seconds):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def summary_table(summaries: Sequence[VersionSummary]) -> str:
    """A plain-text table of per-version aggregates (for the CLI)."""
    header = ["version", "items", "passed", "pass rate (95% CI)", "mean score", "latency ms", "tokens out", "errors"]
    rows = [header]
    for s in summaries:
        lo, hi = s.pass_ci
        rows.append([s.title, str(s.n), str(s.passed), f"{s.pass_rate:.1%} ({lo:.0%}–{hi:.0%})",
                     "—" if s.mean_score is None else f"{s.mean_score:.3f}",
                     "—" if s.mean_latency_ms is None else f"{s.mean_latency_ms:.0f}",
                     "—" if s.mean_completion_tokens is None else f"{s.mean_completion_tokens:.1f}", str(s.errors)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluator_table(summaries: Sequence[VersionSummary]) -> str:
    """Pass rate of each evaluator per version, as plain text."""
    names: list[tuple[str, str]] = []
    for s in summaries:
        for e in s.evaluators:
            if (e.name, e.origin) not in names:
                names.append((e.name, e.origin))
    if not names:
        return ""
    header = ["evaluator"] + [s.title for s in summaries]
    rows = [header]
    for name, origin in names:
        row = [name + (" (item)" if origin == "item" else "")]
        for s in summaries:
            e = next((e for e in s.evaluators if (e.name, e.origin) == (name, origin)), None)
            row.append("—" if e is None else f"{e.pass_rate:.1%} of {e.n}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
