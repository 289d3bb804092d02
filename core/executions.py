"""The execution ledger: run a generation and record it, whatever the source.

`start()` returns an `ExecutionRun`: iterate it for text chunks (pages hand it to `st.write_stream`); when the
stream ends, fails or is closed, the execution is written to the ledger in one INSERT and `execution_id` is set.

On top of it, the Python API: `execute()` renders a template and runs it, `submit_execution()` queues a run for
the background worker and returns its id at once (`get_execution()` reports its status and result), `rerun()`
re-runs a recorded execution exactly (same messages, parameters and seed) and says whether the output is identical.

What is recorded and what is not: a request that cannot start (unknown template, version or label, bad parameters,
missing or invalid variables) raises at once (an InvalidInput or NotFound of core.errors, so a ValueError or
LookupError) and writes nothing; once the model was asked, the outcome is recorded whatever it is (ok, error with its
message, cancelled).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from core import liveness, metrics, models, templates
from core.db import jsonb
from core.errors import Conflict, InvalidInput, NotFound, Unavailable
from core.llm import Backend, Generation, GenerationError, GenerationParams, Request, Usage

log = logging.getLogger(__name__)

# Ledger rows are committed without waiting for the WAL flush (synchronous_commit off for that one transaction):
# the fsync would cost more than the whole rest of the recording (measure with bench/ledger.py). Consistency is
# unaffected and any later ordinary commit flushes them; only an OS or server crash within a fraction of a second
# of a generation could lose its row.
ASYNC_COMMIT = True

SOURCES = ("playground", "chat", "evaluation", "judge", "cli", "api", "rerun", "bench")
STATUSES = ("queued", "running", "ok", "error", "blocked", "cancelled")
FINAL_STATUSES = ("ok", "error", "blocked", "cancelled")


class ExecutionError(InvalidInput):
    """A generation cannot be started or recorded as asked (a ValueError); the message says why."""


class ExecutionNotFound(NotFound):
    """No execution with that id (a LookupError)."""


class ExecutionStateError(Conflict, ExecutionError):
    """The execution is not in a state that allows the action (re-running one that has not finished)."""


class ExecutionTimeout(Unavailable, TimeoutError):
    """A submitted execution did not finish in the time waited for it (also a TimeoutError)."""


@dataclass(frozen=True)
class Execution:
    """One row of the ledger."""

    id: int
    created_at: datetime
    finished_at: datetime | None
    status: str
    source: str
    user_id: str | None
    template_version_id: int | None
    template_name: str | None
    template_version: int | None
    label: str | None
    model_id: int | None
    model_name: str
    model_sha256: str | None
    backend: str
    base_url: str | None
    params: dict
    seed: int | None
    variables: dict
    messages: list | None
    prompt: str | None
    output: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_ms: float | None
    total_ms: float | None
    error: str | None
    rerun_of: int | None
    worker: str | None
    claimed_at: datetime | None
    attempts: int = 0                # claims of a submitted execution so far
    worker_key: int | None = None    # liveness key (core.liveness) of the worker process holding the claim

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token."""
        if not self.completion_tokens or self.completion_tokens < 2 or not self.total_ms or self.ttft_ms is None:
            return None
        span = (self.total_ms - self.ttft_ms) / 1000
        return (self.completion_tokens - 1) / span if span > 0 else None

    @property
    def done(self) -> bool:
        """True once the execution has a final status (not queued or running)."""
        return self.status in FINAL_STATUSES

    @property
    def template_ref(self) -> str | None:
        """`name@version` of the template version used, if any."""
        return f"{self.template_name}@{self.template_version}" if self.template_name else None


@dataclass(frozen=True)
class Origin:
    """Where a generation came from: source, user, template version and inputs (all optional but source)."""

    source: str
    user_id: str | None = None
    template_version_id: int | None = None
    template_name: str | None = None
    template_version: int | None = None
    label: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    model_id: int | None = None
    rerun_of: int | None = None

    @classmethod
    def from_rendered(cls, rendered: Any, source: str, **kw: Any) -> "Origin":
        """An origin for a core.templates.Rendered."""
        tv = rendered.template_version
        return cls(source=source, template_version_id=tv.id, template_name=tv.name, template_version=tv.version,
                   label=rendered.label, variables=dict(rendered.variables), **kw)


_COLUMNS = ("created_at", "status", "source", "user_id", "template_version_id", "template_name", "template_version",
            "label", "model_id", "model_name", "model_sha256", "backend", "base_url", "params", "seed", "variables",
            "messages", "prompt", "output", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms",
            "total_ms", "error", "rerun_of", "finished_at")
# The model id, when the caller does not know it, is the registered model the backend runs (same file hash, or
# same server), preferring the one of the same name.
_MODEL_ID_SQL = ("COALESCE(%(model_id)s::bigint, (SELECT m.id FROM models m WHERE (m.backend = 'llama_cpp' "
                 "AND m.sha256 = %(model_sha256)s) OR (m.backend = 'openai' AND m.base_url = %(base_url)s) "
                 "ORDER BY (m.name = %(model_name)s) DESC, m.is_default DESC, m.id LIMIT 1))")
_PLACEHOLDERS = [_MODEL_ID_SQL if c == "model_id" else f"%({c})s" for c in _COLUMNS]
# The id is drawn by the INSERT, or given again when a try whose commit may have been lost with its connection is
# repeated: the row is then written once (ON CONFLICT: the first try was applied after all).
_INSERT = (f"INSERT INTO executions (id, {', '.join(_COLUMNS)}) VALUES (coalesce(%(id)s::bigint, "
           f"nextval('executions_id_seq')), {', '.join(_PLACEHOLDERS)}) ON CONFLICT (id) DO NOTHING RETURNING id")


def model_fields(backend: Backend) -> dict[str, Any]:
    """Ledger columns that identify the model: name + file hash, or server URL + model name."""
    info = backend.describe()
    return {"model_name": info.get("name") or info.get("model") or "unknown", "backend": info["backend"],
            "model_sha256": info.get("sha256"), "base_url": info.get("base_url")}


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _usage_values(usage: Usage, output: str | None, status: str) -> dict[str, Any]:
    return {"finish_reason": (usage.finish_reason or None) if status != "error" else None,
            "prompt_tokens": usage.prompt_tokens if usage.prompt_tokens or output is not None else None,
            "completion_tokens": usage.completion_tokens if output is not None else None,
            "ttft_ms": usage.ttft_s * 1000 if usage.ttft_s is not None else None,
            "total_ms": usage.total_s * 1000 if usage.total_s else None}


def record(pool: ConnectionPool, *, origin: Origin, backend: Backend | None = None, status: str,
           params: GenerationParams | None = None, messages: Sequence[Mapping[str, str]] | None = None,
           prompt: str | None = None, output: str | None = None, usage: Usage | None = None,
           error: str | None = None, model: Mapping[str, Any] | None = None,
           started_at: datetime | None = None) -> int:
    """Write one finished execution (ok, error, blocked or cancelled) and return its id. The write uses a fresh
    pooled connection and is tried again when the connection breaks (core.liveness.write), never writing it twice."""
    if origin.source not in SOURCES:
        raise ExecutionError(f"unknown execution source {origin.source!r}")
    if status not in STATUSES:
        raise ExecutionError(f"unknown execution status {status!r}")
    ident = dict(model) if model is not None else model_fields(backend) if backend is not None else {
        "model_name": "none", "backend": "none", "model_sha256": None, "base_url": None}
    usage = usage or Usage()
    values = {
        "created_at": started_at or datetime.now().astimezone(), "status": status, "source": origin.source,
        "user_id": origin.user_id,
        "template_version_id": origin.template_version_id, "template_name": origin.template_name,
        "template_version": origin.template_version, "label": origin.label, "model_id": origin.model_id,
        **ident,
        "params": jsonb(params.to_dict() if params else {}), "seed": params.seed if params else None,
        "variables": jsonb(_json_safe(dict(origin.variables))),
        "messages": jsonb([dict(m) for m in messages]) if messages is not None else None,
        "prompt": prompt, "output": output, **_usage_values(usage, output, status),
        "error": error, "rerun_of": origin.rerun_of, "finished_at": datetime.now().astimezone(),
    }
    drawn: dict[str, int] = {}

    def insert(conn: psycopg.Connection) -> int:
        with conn.transaction():
            if ASYNC_COMMIT:
                conn.execute("SET LOCAL synchronous_commit = off")
            row = conn.execute(_INSERT, {**values, "id": drawn.get("id")}).fetchone()
            if row is not None:
                drawn["id"] = row[0]
        return drawn["id"]

    execution_id = liveness.write(pool, insert, what="recording an execution")
    _observe(values)
    return execution_id


def _observe(values: Mapping[str, Any]) -> None:
    """Count a recorded execution in this process's Prometheus metrics (core.metrics); never raises."""
    metrics.observe_execution(
        template=values.get("template_name"), model=values.get("model_name"), source=values.get("source") or "",
        status=values.get("status") or "", prompt_tokens=values.get("prompt_tokens"),
        completion_tokens=values.get("completion_tokens"),
        ttft_s=values["ttft_ms"] / 1000 if values.get("ttft_ms") is not None else None,
        total_s=values["total_ms"] / 1000 if values.get("total_ms") is not None else None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ExecutionRun:
    """A generation being streamed; recorded in the ledger when it ends, fails or is closed.

    A generation error is re-raised after it was recorded; the exception carries `execution_id`.
    """

    def __init__(self, pool: ConnectionPool, backend: Backend, origin: Origin, params: GenerationParams,
                 messages: Sequence[Mapping[str, str]] | None, prompt: str | None, *,
                 generation: Generation | None = None, started_at: datetime | None = None):
        self.pool, self.backend, self.origin = pool, backend, origin
        self.messages = [dict(m) for m in messages] if messages is not None else None
        self.raw_prompt = prompt
        self.params = generation.params if generation is not None else params.with_seed()
        self.execution_id: int | None = None
        self.status: str | None = None
        self.error: str | None = None
        self.generation: Generation | None = None
        self._given = generation
        self.started_at = started_at or datetime.now().astimezone()
        self._chunks = self._run()

    @property
    def output(self) -> str:
        """Text generated so far."""
        return self.generation.text if self.generation else ""

    @property
    def usage(self) -> Usage:
        """Figures of the generation (complete once the run has ended)."""
        return self.generation.usage if self.generation else Usage()

    @property
    def prompt(self) -> str | None:
        """The exact prompt text the model saw."""
        return self.generation.prompt if self.generation else self.raw_prompt

    def _finish(self, status: str, error: str | None) -> None:
        self.status, self.error = status, error
        self.execution_id = record(
            self.pool, origin=self.origin, backend=self.backend, status=status, params=self.params,
            messages=self.messages, prompt=self.prompt, output=self.output if self.generation else None,
            usage=self.usage, error=error, started_at=self.started_at)

    def _run(self) -> Iterator[str]:
        try:
            self.generation = self._given or self.backend.generate(self.messages, prompt=self.raw_prompt,
                                                                   params=self.params)
            with self.generation:
                for chunk in self.generation:
                    yield chunk
        except GeneratorExit:
            self._finish("cancelled", None)
            raise
        except Exception as exc:
            self._finish("error", _one_line(exc))
            try:
                exc.execution_id = self.execution_id  # type: ignore[attr-defined]
            except AttributeError:
                pass
            raise
        except BaseException:  # KeyboardInterrupt or SystemExit inside the generation: stopped from outside
            self._finish("cancelled", None)
            raise
        self._finish("ok" if self.generation.usage.finish_reason != "cancelled" else "cancelled", None)

    def __iter__(self) -> "ExecutionRun":
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def read(self) -> str:
        """Run to the end and return the whole output."""
        for _ in self:
            pass
        return self.output

    def close(self) -> None:
        """Stop early: the model is released and the execution recorded as cancelled."""
        self._chunks.close()

    def __enter__(self) -> "ExecutionRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(pool: ConnectionPool, backend: Backend, *, origin: Origin, params: GenerationParams | None = None,
          messages: Sequence[Mapping[str, str]] | None = None, prompt: str | None = None) -> ExecutionRun:
    """Begin a recorded generation from chat messages or a raw prompt; iterate the result for text chunks."""
    return ExecutionRun(pool, backend, origin, params or GenerationParams(), messages, prompt)


def start_many(pool: ConnectionPool, backend: Backend,
               runs: Sequence[tuple[Origin, GenerationParams, Sequence[Mapping[str, str]]]]) -> list[ExecutionRun]:
    """Generate several chat requests together (batched where the backend can); read each run to record it."""
    started_at = datetime.now().astimezone()
    requests = [Request(messages=messages, params=params.with_seed()) for _, params, messages in runs]
    generations = backend.generate_many(requests)
    return [ExecutionRun(pool, backend, origin, req.params, req.messages, None, generation=gen, started_at=started_at)
            for (origin, _, _), req, gen in zip(runs, requests, generations)]


# ---------------------------------------------------------------------------------------------------------------
# Running templates


def resolve_params(defaults: Mapping[str, Any] | None,
                   overrides: Mapping[str, Any] | GenerationParams | None = None) -> GenerationParams:
    """Generation parameters: a template version's defaults overridden by the given ones (validated)."""
    if isinstance(overrides, GenerationParams):
        return overrides
    merged = {**dict(defaults or {}), **{k: v for k, v in dict(overrides or {}).items() if v is not None}}
    return GenerationParams.from_dict(merged)


def free_form_messages(system: str, prompt: str, *,
                       raw: bool = False) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, None) of a free-form prompt after an optional system prompt, or raw, (None, the exact prompt text)."""
    if not prompt.strip():
        raise ExecutionError("write a prompt to run")
    if raw:
        return None, (system + "\n\n" if system.strip() else "") + prompt
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": "user", "content": prompt}], None


@dataclass(frozen=True)
class PreparedRun:
    """A rendered template ready to send: where it came from, the messages and the parameters (seed drawn)."""

    origin: Origin
    messages: list[dict[str, str]]
    params: GenerationParams
    rendered: Any


def prepare(pool: ConnectionPool, name: str, variables: Mapping[str, Any] | None = None, *,
            label: str | None = None, version: int | None = None,
            params: Mapping[str, Any] | GenerationParams | None = None, user_message: str | None = None,
            source: str = "api", user_id: str | None = None, model_id: int | None = None) -> PreparedRun:
    """Render a template (by name + label or version) with variables and resolve its parameters; nothing is
    written. The optional user message is sent as a user turn after the rendered template."""
    if source not in SOURCES:
        raise ExecutionError(f"unknown execution source {source!r}")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ExecutionError(f"version must be a whole number, got {version!r}")
    tv = templates.get_template_by_name(pool, name, label=label, version=version)
    resolve_params(tv.params, params)  # bad parameters fail before rendering
    variables = templates.coerce_variables(tv.input_schema, dict(variables or {}))
    rendered = templates.render_template_by_name(pool, name, variables, label=label, version=version)
    resolved = resolve_params(rendered.template_version.params, params).with_seed()
    messages = [dict(m) for m in rendered.messages]
    if user_message is not None:
        if not str(user_message).strip():
            raise ExecutionError("the user message is empty")
        messages.append({"role": "user", "content": str(user_message)})
    origin = Origin.from_rendered(rendered, source, user_id=user_id, model_id=model_id)
    return PreparedRun(origin, messages, resolved, rendered)


def run_template(pool: ConnectionPool, backend: Backend, name: str, variables: Mapping[str, Any] | None = None, *,
                 label: str | None = None, version: int | None = None,
                 params: Mapping[str, Any] | GenerationParams | None = None, user_message: str | None = None,
                 source: str = "api", user_id: str | None = None, model_id: int | None = None) -> ExecutionRun:
    """Render a template and begin its recorded generation; iterate the result for text chunks."""
    prepared = prepare(pool, name, variables, label=label, version=version, params=params,
                       user_message=user_message, source=source, user_id=user_id, model_id=model_id)
    return start(pool, backend, origin=prepared.origin, params=prepared.params, messages=prepared.messages)


def execute(pool: ConnectionPool, backend: Backend, name: str, variables: Mapping[str, Any] | None = None, *,
            label: str | None = None, version: int | None = None,
            params: Mapping[str, Any] | GenerationParams | None = None, user_message: str | None = None,
            source: str = "api", user_id: str | None = None) -> tuple[str, int]:
    """Render a template, generate and record it; return (output, execution id). Parameters default to the
    version's, overridden by the given ones; the optional user message is a user turn after the template."""
    run = run_template(pool, backend, name, variables, label=label, version=version, params=params,
                       user_message=user_message, source=source, user_id=user_id)
    with run:
        output = run.read()
    return output, run.execution_id


# ---------------------------------------------------------------------------------------------------------------
# Submitted executions, run by the background worker


def submit_execution(pool: ConnectionPool, name: str, variables: Mapping[str, Any] | None = None, *,
                     label: str | None = None, version: int | None = None,
                     params: Mapping[str, Any] | GenerationParams | None = None, user_message: str | None = None,
                     model: str | None = None, source: str = "api", user_id: str | None = None) -> int:
    """Queue a template run for the background worker and return its execution id at once (status 'queued').
    The template is rendered and the seed drawn now; `model` names a registered model (default: the default).
    A worker outside the caller's thread runs it: the app's, `promptdev worker`, or `core.worker.start_thread(pool,
    settings)` in this process; `get_execution(id)` reports its status and result (`wait_for_execution` waits)."""
    registered = models.get_model(pool, model) if model is not None else models.default_model(pool)
    prepared = prepare(pool, name, variables, label=label, version=version, params=params,
                       user_message=user_message, source=source, user_id=user_id,
                       model_id=registered.id if registered else None)
    o, p = prepared.origin, prepared.params
    values = {"source": o.source, "user_id": o.user_id, "template_version_id": o.template_version_id,
              "template_name": o.template_name, "template_version": o.template_version, "label": o.label,
              "model_id": o.model_id, "model_name": registered.name if registered else "default",
              "model_sha256": registered.sha256 if registered else None,
              "backend": registered.backend if registered else "default",
              "base_url": registered.base_url if registered else None, "params": jsonb(p.to_dict()), "seed": p.seed,
              "variables": jsonb(_json_safe(dict(o.variables))), "messages": jsonb(prepared.messages)}
    with pool.connection() as conn:
        return conn.execute(
            "INSERT INTO executions (status, source, user_id, template_version_id, template_name, template_version, "
            "label, model_id, model_name, model_sha256, backend, base_url, params, seed, variables, messages) "
            "VALUES ('queued', %(source)s, %(user_id)s, %(template_version_id)s, %(template_name)s, "
            "%(template_version)s, %(label)s, %(model_id)s, %(model_name)s, %(model_sha256)s, %(backend)s, "
            "%(base_url)s, %(params)s, %(seed)s, %(variables)s, %(messages)s) RETURNING id", values).fetchone()[0]


def cancel_execution(pool: ConnectionPool, execution_id: int) -> bool:
    """Cancel a queued execution; False when it was already claimed or finished."""
    with pool.connection() as conn:
        cur = conn.execute("UPDATE executions SET status = 'cancelled', finished_at = clock_timestamp() "
                           "WHERE id = %s AND status = 'queued'", (execution_id,))
        if cur.rowcount:
            return True
        if conn.execute("SELECT 1 FROM executions WHERE id = %s", (execution_id,)).fetchone() is None:
            raise ExecutionNotFound(f"no execution with id {execution_id}")
        return False


def wait_for_execution(pool: ConnectionPool, execution_id: int, timeout: float = 300.0,
                       poll_s: float = 0.05) -> Execution:
    """Wait until a submitted execution has finished and return it; ExecutionTimeout (a TimeoutError) after timeout
    seconds."""
    deadline = time.monotonic() + timeout
    while True:
        execution = get_execution(pool, execution_id)
        if execution.done:
            return execution
        if time.monotonic() >= deadline:
            raise ExecutionTimeout(f"execution {execution_id} is still {execution.status} after {timeout:g} s")
        time.sleep(poll_s)


MAX_ATTEMPTS = 3         # claims of one submitted execution (each by a worker that stopped) before it is failed
CLAIM_FALLBACK_S = 60.0  # a claim made without a liveness key is taken over once it is this old

# A running execution whose worker is gone: its liveness key is free (at once), or it has no key and is old.
_ORPHANED = (f"status = 'running' AND ({liveness.holder_gone_sql('worker_key')} OR (worker_key IS NULL "
             f"AND claimed_at < clock_timestamp() - make_interval(secs => %(fallback)s)))")
# The claim that may write a result or hand the execution back: the same worker, the same attempt.
_FENCE = "id = %(id)s AND status = 'running' AND worker = %(worker)s AND attempts = %(attempts)s"


def claim_next(pool: ConnectionPool, worker: str | None = None) -> Execution | None:
    """Claim the next submitted execution — one whose worker is gone (taken over at once), else the oldest queued —
    with FOR UPDATE SKIP LOCKED, so that workers anywhere share the queue; None when there is none. The claim records
    the worker, this process's liveness key and one more attempt."""
    me, key = worker or liveness.worker_id(), liveness.key(pool)
    with liveness.claiming(me) as unanswered, pool.connection() as conn, conn.transaction():
        # After a claim whose answer was lost, what it may have claimed under this name is taken back.
        own = " OR (status = 'running' AND worker = %(me)s)" if unanswered else ""
        row = conn.execute(f"SELECT id FROM executions WHERE {_ORPHANED}{own} ORDER BY id LIMIT 1 "
                           f"FOR UPDATE SKIP LOCKED", {"fallback": CLAIM_FALLBACK_S, "me": me}).fetchone()
        if row is None:
            row = conn.execute("SELECT id FROM executions WHERE status = 'queued' ORDER BY id LIMIT 1 "
                               "FOR UPDATE SKIP LOCKED").fetchone()
        if row is None:
            return None
        with conn.cursor(row_factory=class_row(Execution)) as cur:
            return cur.execute(
                "UPDATE executions SET status = 'running', attempts = attempts + 1, worker = %s, worker_key = %s, "
                "claimed_at = clock_timestamp() WHERE id = %s RETURNING *", (me, key, row[0])).fetchone()


def run_next_queued(pool: ConnectionPool, settings: Any) -> bool:
    """Claim the next submitted execution (claim_next), run it and record the result in its row; False when nothing
    was queued. This is the worker's task source.

    No connection is held while the model generates: the result is written on a fresh one, tried again when it
    breaks. A result that cannot be written hands the execution back to the queue (the attempt counts), to run
    again; one that MAX_ATTEMPTS workers claimed without finishing it is recorded as failed."""
    if pool.closed:  # a worker outliving its pool (at shutdown) has nothing to do
        return False
    claimed = claim_next(pool)
    if claimed is None:
        return False
    try:
        if claimed.attempts > MAX_ATTEMPTS:
            outcome = _Outcome("error", f"gave up after {MAX_ATTEMPTS} attempts: each worker that ran it stopped "
                                        f"before it finished", None, _claimed_model(claimed))
        else:
            outcome = _generate(pool, settings, claimed)
        _store(pool, claimed, outcome)
    except psycopg.OperationalError as exc:
        log.error("execution %s could not be recorded (%s); it goes back to the queue", claimed.id,
                  " ".join(str(exc).split()))
        liveness.write_later(pool, lambda conn: _hand_back_one(conn, claimed),
                             what=f"handing back execution {claimed.id}")
    return True


@dataclass
class _Outcome:
    status: str
    error: str | None
    generation: Generation | None
    ident: dict[str, Any]


def _claimed_model(claimed: Execution) -> dict[str, Any]:
    return {"model_name": claimed.model_name, "backend": claimed.backend, "model_sha256": claimed.model_sha256,
            "base_url": claimed.base_url}


def _claimed_backend(pool: ConnectionPool, settings: Any, claimed: Execution) -> Backend:
    if claimed.model_id is not None:
        return models.backend_for(pool, settings, models.get_model_by_id(pool, claimed.model_id).name)
    return models.backend_for(pool, settings, None)


def _generate(pool: ConnectionPool, settings: Any, claimed: Execution) -> _Outcome:
    """Run a claimed execution on its model (no connection is held meanwhile); a failure is an outcome too, but
    psycopg.OperationalError (the database away while the model is looked up) is raised."""
    generation: Generation | None = None
    status, error, ident = "error", None, _claimed_model(claimed)
    try:
        backend = liveness.retrying(lambda: _claimed_backend(pool, settings, claimed),
                                    what=f"looking up the model of execution {claimed.id}", pool=pool)
        ident = model_fields(backend)
        params = GenerationParams.from_dict(claimed.params)
        generation = backend.generate(claimed.messages, prompt=None if claimed.messages is not None else claimed.prompt,
                                      params=params)
        with generation:
            generation.read()
        status = "ok" if generation.usage.finish_reason != "cancelled" else "cancelled"
    except psycopg.OperationalError:
        raise
    except Exception as exc:  # recorded on the row; the worker goes on
        status, error = "error", _one_line(exc)
        log.info("submitted execution %s failed: %s", claimed.id, error)
    return _Outcome(status, error, generation, ident)


def _store(pool: ConnectionPool, claimed: Execution, outcome: _Outcome) -> bool:
    """Write a claimed execution's outcome in its row, if the claim still holds it; True when written (also when
    a try whose commit was lost had written it). psycopg.OperationalError when the database stays away."""
    generation, status = outcome.generation, outcome.status
    usage = generation.usage if generation is not None else Usage()
    output = generation.text if generation is not None and status != "error" else None
    values = {**outcome.ident, **_usage_values(usage, output, status)}
    args = {**values, "status": status, "output": output, "error": outcome.error,
            "prompt": generation.prompt if generation is not None else claimed.prompt, "model_id": claimed.model_id,
            "id": claimed.id, "worker": claimed.worker, "attempts": claimed.attempts}

    def update(conn: psycopg.Connection) -> bool:
        if conn.execute(
                "UPDATE executions SET status = %(status)s, output = %(output)s, error = %(error)s, "
                "prompt = %(prompt)s, finished_at = clock_timestamp(), model_name = %(model_name)s, "
                "model_sha256 = %(model_sha256)s, backend = %(backend)s, base_url = %(base_url)s, "
                f"model_id = {_MODEL_ID_SQL}, finish_reason = %(finish_reason)s, prompt_tokens = %(prompt_tokens)s, "
                "completion_tokens = %(completion_tokens)s, ttft_ms = %(ttft_ms)s, total_ms = %(total_ms)s, "
                f"worker_key = NULL WHERE {_FENCE}", args).rowcount:
            return True
        row = conn.execute("SELECT status, worker, attempts FROM executions WHERE id = %s", (claimed.id,)).fetchone()
        return row is not None and row[0] in FINAL_STATUSES and (row[1], row[2]) == (claimed.worker, claimed.attempts)

    if not liveness.write(pool, update, what=f"writing the result of execution {claimed.id}"):
        log.warning("execution %s was taken over by another worker; this result is dropped", claimed.id)
        return False
    _observe({**values, "status": status, "source": claimed.source, "template_name": claimed.template_name})
    return True


def _hand_back_one(conn: psycopg.Connection, claimed: Execution) -> None:
    """Queue a claimed execution again (its attempt counts), if the claim still holds it."""
    conn.execute(f"UPDATE executions SET status = 'queued', worker = NULL, worker_key = NULL, claimed_at = NULL "
                 f"WHERE {_FENCE}", {"id": claimed.id, "worker": claimed.worker, "attempts": claimed.attempts})


def hand_back(pool: ConnectionPool, key: int) -> int:
    """Queue again the executions still running under a liveness key — those a stopping worker process did not
    finish — without counting their attempt; how many."""
    return liveness.write(pool, lambda conn: conn.execute(
        "UPDATE executions SET status = 'queued', attempts = greatest(attempts - 1, 0), worker = NULL, "
        "worker_key = NULL, claimed_at = NULL WHERE worker_key = %s AND status = 'running'", (key,)).rowcount,
        what="handing back unfinished executions")


# ---------------------------------------------------------------------------------------------------------------
# Reading the ledger


def get_execution(pool: ConnectionPool, execution_id: int) -> Execution:
    """One execution by id; ExecutionNotFound (a LookupError) when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Execution)) as cur:
        row = cur.execute("SELECT * FROM executions WHERE id = %s", (execution_id,)).fetchone()
    if row is None:
        raise ExecutionNotFound(f"no execution with id {execution_id}")
    return row


def list_executions(pool: ConnectionPool, *, template_name: str | None = None, template_version: int | None = None,
                    model_name: str | None = None, source: str | None = None, status: str | None = None,
                    since: datetime | None = None, until: datetime | None = None, user_id: str | None = None,
                    limit: int = 100, offset: int = 0, label: str | None = None,
                    rerun_of: int | None = None) -> list[Execution]:
    """Executions, newest first, filtered by any of the given fields."""
    where, args = [], []
    for column, value in (("template_name", template_name), ("template_version", template_version),
                          ("model_name", model_name), ("source", source), ("status", status),
                          ("user_id", user_id), ("label", label), ("rerun_of", rerun_of)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    if since is not None:
        where.append("created_at >= %s")
        args.append(since)
    if until is not None:
        where.append("created_at < %s")
        args.append(until)
    query = "SELECT * FROM executions" + (" WHERE " + " AND ".join(where) if where else "")
    query += " ORDER BY id DESC LIMIT %s OFFSET %s"
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Execution)) as cur:
        return cur.execute(query, (*args, max(1, min(int(limit), 10_000)), max(0, int(offset)))).fetchall()


def filter_options(pool: ConnectionPool) -> dict[str, list]:
    """Values the ledger filters can take: template names, their versions, models, sources and statuses in use."""
    with pool.connection() as conn:
        templates = [r[0] for r in conn.execute(
            "SELECT DISTINCT template_name FROM executions WHERE template_name IS NOT NULL ORDER BY 1")]
        versions = [r[0] for r in conn.execute(
            "SELECT DISTINCT template_version FROM executions WHERE template_version IS NOT NULL ORDER BY 1")]
        models_ = [r[0] for r in conn.execute("SELECT DISTINCT model_name FROM executions ORDER BY 1")]
        sources = [r[0] for r in conn.execute("SELECT DISTINCT source FROM executions ORDER BY 1")]
        statuses = [r[0] for r in conn.execute("SELECT DISTINCT status FROM executions ORDER BY 1")]
    return {"template_name": templates, "template_version": versions, "model_name": models_, "source": sources,
            "status": statuses}


def template_usage(pool: ConnectionPool, template_name: str) -> dict[str, Any]:
    """How often a template ran and when it last did, from the ledger."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT count(*) AS uses, max(created_at) AS last_used FROM executions WHERE template_name = %s",
            (template_name,)).fetchone()


def usage_by_template(pool: ConnectionPool) -> dict[str, dict[str, Any]]:
    """Use count and last-used time of every template that ran: {name: {uses, last_used}}."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("SELECT template_name, count(*) AS uses, max(created_at) AS last_used FROM executions "
                           "WHERE template_name IS NOT NULL GROUP BY template_name").fetchall()
    return {r["template_name"]: {"uses": r["uses"], "last_used": r["last_used"]} for r in rows}


def templates_usage(pool: ConnectionPool, template_name: str | None = None) -> list[dict[str, Any]]:
    """Every template (or the one named) with its use count and last-used time from the ledger, most used first:
    [{template, uses, last_used}]; a template that never ran has 0 and None."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT t.name AS template, count(e.id) AS uses, max(e.created_at) AS last_used FROM templates t "
            "LEFT JOIN executions e ON e.template_name = t.name WHERE %(name)s::text IS NULL OR t.name = %(name)s "
            "GROUP BY t.name ORDER BY uses DESC, t.name", {"name": template_name}).fetchall()


# ---------------------------------------------------------------------------------------------------------------
# Re-running exactly


def start_rerun(pool: ConnectionPool, backend: Backend, execution_id: int, *, source: str = "rerun",
                user_id: str | None = None) -> ExecutionRun:
    """Begin an exact re-run of a recorded execution: the same messages (or raw prompt), parameters and seed."""
    original = get_execution(pool, execution_id)
    if original.status in ("queued", "running"):
        raise ExecutionStateError(f"execution {execution_id} is still {original.status}; re-run it once it has "
                                  f"finished")
    if original.messages is None and original.prompt is None:
        raise ExecutionError(f"execution {execution_id} recorded no messages or prompt to re-run")
    if original.seed is None:
        raise ExecutionError(f"execution {execution_id} recorded no seed, so it cannot be re-run exactly")
    params = GenerationParams.from_dict(original.params)
    origin = Origin(source=source, user_id=user_id, template_version_id=original.template_version_id,
                    template_name=original.template_name, template_version=original.template_version,
                    label=original.label, variables=original.variables, model_id=original.model_id,
                    rerun_of=original.id)
    if original.messages is not None:
        return start(pool, backend, origin=origin, params=params, messages=original.messages)
    return start(pool, backend, origin=origin, params=params, prompt=original.prompt)


def is_identical(original: Execution, new: Execution) -> bool:
    """True when a re-run reproduced the original: both finished ok with the same output."""
    return original.status == new.status == "ok" and original.output == new.output


def why_rerun_differs(original: Execution, new: Execution) -> str:
    """Why a re-run may not reproduce its original: another model file or prompt text ('' when neither changed)."""
    if new.model_sha256 != original.model_sha256:
        return "The model file differs."
    if original.prompt is not None and new.prompt != original.prompt:
        return "The prompt text the model saw differs (its chat format changed)."
    return ""


def rerun(pool: ConnectionPool, backend: Backend, execution_id: int, source: str = "rerun",
          user_id: str | None = None) -> tuple[Execution, bool]:
    """Re-run a recorded execution exactly (same messages, parameters and seed, `rerun_of` set); return the new
    execution and whether its output is identical to the original's."""
    run = start_rerun(pool, backend, execution_id, source=source, user_id=user_id)
    with run:
        try:
            run.read()
        except GenerationError:
            pass  # recorded as an error; not identical
    new = get_execution(pool, run.execution_id)
    return new, is_identical(get_execution(pool, execution_id), new)


# ---------------------------------------------------------------------------------------------------------------
# Drafting a template with the model


@dataclass(frozen=True)
class TemplateDraft:
    """A template the model drafted: a name, a system prompt, a user prompt template and its variables.

    `parsed` says whether the model's reply had the expected shape; when it had not, the fields hold a usable
    fallback built from the task and inputs, and `raw` the reply itself.
    """

    name: str
    system: str
    user: str
    variables: list[str]
    raw: str
    parsed: bool
    execution_id: int | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat messages of the draft (system first when there is one)."""
        out = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return out + [{"role": "user", "content": self.user}]


DRAFT_SYSTEM = (
    "You write prompt templates for a language model. Reply with one JSON object and nothing else, with the keys "
    "\"system\" (the system prompt), \"user\" (the user prompt, where each input appears as {{ name }}) and "
    "\"variables\" (the list of input names).")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_inputs(inputs: str | Sequence[str]) -> list[tuple[str, str]]:
    """Input names (and descriptions) from 'name: description' lines or comma-separated names."""
    if isinstance(inputs, str):
        parts = [p for line in inputs.splitlines() for p in
                 ([line] if ":" in line or " - " in line else line.split(","))]
    else:
        parts = list(inputs)
    out: list[tuple[str, str]] = []
    for part in parts:
        part = part.strip().lstrip("-*• ").strip()
        if not part:
            continue
        head, _, desc = part.partition(":") if ":" in part else part.partition(" - ")
        name = re.sub(r"[^0-9a-zA-Z_]+", "_", head.strip()).strip("_").lower()
        if not name:
            continue
        if name[0].isdigit():
            name = "v_" + name
        if name not in [n for n, _ in out]:
            out.append((name, desc.strip()))
    return out


def _slug(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words[:5])[:60].strip("-") or "drafted-template"


def _find_json(text: str) -> dict | None:
    candidates = re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _section(text: str, key: str) -> str:
    match = re.search(rf"(?ims)^[\s#*\"']*{key}(?:\s+prompt)?[\s*\"']*[:=]\s*(.+?)(?=^[\s#*\"']*(?:system|user|"
                      rf"variables)(?:\s+prompt)?[\s*\"']*[:=]|\Z)", text)
    return match.group(1).strip().strip("\"',").strip() if match else ""


def parse_draft(text: str, task: str, inputs: str | Sequence[str] = ()) -> TemplateDraft:
    """Turn the model's reply into a usable draft, whatever shape it has: JSON, labelled sections or junk."""
    declared = parse_inputs(inputs)
    names = [n for n, _ in declared]
    data = _find_json(text) or {}
    system = data.get("system") if isinstance(data.get("system"), str) else ""
    user = data.get("user") if isinstance(data.get("user"), str) else ""
    found = data.get("variables") if isinstance(data.get("variables"), list) else []
    if not data:
        system, user = _section(text, "system"), _section(text, "user")
    parsed = bool(user.strip())
    for v in found:
        if isinstance(v, str) and _IDENT.fullmatch(v.strip()) and v.strip() not in names:
            names.append(v.strip())
    if user.strip():
        problem = templates.analyze(user).error
        if problem is not None:
            user, parsed = "", False
        else:
            for v in templates.extract_variables(user):
                if v not in names:
                    names.append(v)
    if not system.strip():
        system = f"You are a careful assistant. {task.strip()}".strip()
    if not user.strip():
        user = "\n".join(f"{n.replace('_', ' ').capitalize()}: {{{{ {n} }}}}" for n in names)
        if not user:
            usable = task.strip() and templates.analyze(task.strip()).error is None
            user = task.strip() if usable else "Input: {{ input }}"
    missing = [n for n in names if n not in templates.extract_variables(user)]
    if missing:
        user = user.rstrip() + "\n\n" + "\n".join(f"{n.replace('_', ' ').capitalize()}: {{{{ {n} }}}}" for n in missing)
    variables = templates.extract_variables(user)
    return TemplateDraft(name=_slug(task), system=system.strip(), user=user.strip(), variables=variables,
                         raw=text, parsed=parsed)


def draft_template(pool: ConnectionPool, backend: Backend, task: str, inputs: str | Sequence[str] = (), *,
                   params: Mapping[str, Any] | None = None, user_id: str | None = None,
                   source: str = "playground") -> TemplateDraft:
    """Ask the model to draft a template for a task and its inputs (the run is recorded); the reply is parsed
    robustly and always gives editable fields."""
    if not task or not task.strip():
        raise ExecutionError("describe what the prompt should do")
    declared = parse_inputs(inputs)
    listing = "\n".join(f"- {n}{': ' + d if d else ''}" for n, d in declared) or "- (none)"
    messages = [{"role": "system", "content": DRAFT_SYSTEM},
                {"role": "user", "content": f"Task: {task.strip()}\nInputs:\n{listing}"}]
    gen_params = resolve_params({"temperature": 0.2, "max_tokens": 320, "repeat_penalty": 1.05}, params)
    run = start(pool, backend, origin=Origin(source, user_id=user_id,
                                              variables={"task": task, "inputs": [n for n, _ in declared]}),
                params=gen_params, messages=messages)
    with run:
        text = run.read()
    draft = parse_draft(text, task, [f"{n}: {d}" if d else n for n, d in declared])
    return dataclasses.replace(draft, execution_id=run.execution_id)


# ---------------------------------------------------------------------------------------------------------------
# Forms: variables typed from the input JSON Schema


@dataclass(frozen=True)
class VariableSpec:
    """How to ask for one variable: its JSON Schema type ('string', 'number', 'integer', 'boolean', 'array',
    'object'), allowed values, default, description and whether it is required."""

    name: str
    type: str = "string"
    enum: tuple = ()
    default: Any = None
    description: str = ""
    required: bool = True


def variable_specs(variables: Sequence[str], input_schema: Mapping[str, Any] | None) -> list[VariableSpec]:
    """Form fields for a template's variables (and any other properties of its input schema)."""
    schema = input_schema or {}
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    out: list[VariableSpec] = []
    for name in list(dict.fromkeys([*variables, *props])):
        spec = props.get(name) if isinstance(props.get(name), Mapping) else {}
        kind = spec.get("type", "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        if kind not in ("string", "number", "integer", "boolean", "array", "object"):
            kind = "string"
        enum = tuple(spec.get("enum") or ())
        out.append(VariableSpec(name=name, type=kind, enum=enum, default=spec.get("default"),
                                description=str(spec.get("description") or ""),
                                required=name in required or (name in variables and "default" not in spec)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The Home page's figures (core.status lists them)


def dashboard_figures(conn: psycopg.Connection) -> dict[str, int]:
    """Executions in the ledger, in all and in the last 24 hours."""
    row = conn.execute("SELECT count(*), count(*) FILTER (WHERE created_at > now() - interval '1 day') "
                       "FROM executions").fetchone()
    return {"Executions": row[0], "Executions (24 h)": row[1]}
