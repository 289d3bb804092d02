"""Conversations: end-user chat on an operator-assigned template, per-user memory, operator interventions (halt,
resume, inject — kept in an audit trail), guardrails on every message, the monitor's overview and retention.

One conversation per user id. The flow of one message (`stream_message`, `send_message`):

1. Store the user message (its sequence number is assigned under a row lock on the conversation, so concurrent
   senders keep each conversation in order and lose nothing). Input guardrails run in the same transaction, so a
   redacted message is never stored unredacted; every rule hit is recorded with the message.
2. If the conversation is halted (or an input `halt` rule just halted it), reply PAUSED_REPLY without calling the
   model; an input `block` rule gives BLOCKED_INPUT_REPLY. Either is recorded in the execution ledger with status
   'blocked' and the reason in `error`, and stored as an assistant message of kind 'paused' / 'blocked'.
3. Assemble the context: the user's memory and the recent history (user messages, replies and operator
   injections), fitted to the model's context window by token count, most recent kept; render the assigned template
   version with `user_id`, `message`, `user_context`, `conversation_history` and every memory key.
4. Generate through the ledger (`core.executions`), check output guardrails, store the reply, return it.

Halts and replies — the rule: a halt committed before a reply is stored withholds that reply, so nothing the model
says reaches the user after a halt. It holds by the database, not by timing. Every halt (operator or guardrail) takes
the conversation's row lock and is audited; the transaction that stores the user message notes the newest audit
entry (`audit_mark`); the reply is stored in a transaction that takes the same row lock and looks for a halt audited
after that mark — if there is one (even one resumed since), the reply is withheld: stored as kind 'paused' with
PAUSED_REPLY, the user message left out of later contexts, the execution's `error` in the ledger saying the reply
was withheld (its output stays there as the model produced it, redacted as usual). While a reply streams, each chunk
is released only after the same check found no halt (one query on a pooled connection, never held while the model
generates), and a halt found stops the model. The one exception is what was released before the halt committed:
the user keeps seeing those chunks, followed by PAUSED_REPLY as the stream's last chunk (after a blank line), until
the Chat page is next drawn from the database, where PAUSED_REPLY stands in their place. When the check cannot reach
the database, the rest of the reply is held back and released (or withheld) once the reply is stored.

While output rules that block, redact or halt apply to a conversation, a streamed reply is checked before any of it
is sent (it arrives as one chunk); otherwise it streams token by token. The ledger keeps the model's output as
produced — except that what an output `redact` rule matches is replaced there too, so it is never stored anywhere.

Errors are typed: `ConversationError` (an InvalidInput, so a ValueError: bad input, with the reason in one line),
`ConversationNotFound` (also a NotFound, so a LookupError) and `ConversationStateError` (a Conflict: halting a halted
conversation, …). `connect()` gives the same API
bound to one workbench, with the issue's signatures: `api.send_message(user_id, text)`, `api.halt_conversation(…)`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from core import db, executions, guardrails, llm, metrics, templates
from core.chat_formats import ChatFormatError
from core.config import Settings, load_settings
from core.db import LockKey, jsonb
from core.errors import Conflict, InvalidInput, NotFound
from core.executions import Origin
from core.llm import Backend, GenerationError, GenerationParams

log = logging.getLogger(__name__)

PAUSED_REPLY = "This conversation has been paused by an operator. Please try again later."
BLOCKED_INPUT_REPLY = "Sorry, I can't respond to that message."
BLOCKED_OUTPUT_REPLY = "Sorry, I can't share that reply. Could you ask another way?"
ERROR_REPLY = "Sorry, something went wrong on my side. Please try again in a moment."
MAX_MESSAGE_CHARS = 20_000
MAX_USER_ID_CHARS = 200
HISTORY_LIMIT = 1000  # newest in-context messages considered before fitting by tokens
TRIM_TO = 0.7  # when history must be trimmed, keep the newest messages filling this share of the room
RESERVED_VARIABLES = ("user_id", "message", "user_context", "conversation_history")
HISTORY_SPEAKERS = {"message": "User", "reply": "Assistant", "injection": "Operator"}
STATES = ("active", "halted")
_MEMORY_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SORTS = {"last_activity": "c.last_activity", "user": "c.user_id", "messages": "message_count",
         "flagged": "flagged_count", "events": "event_count", "state": "c.state", "created": "c.created_at"}
GUARDRAIL_OPERATOR = "guardrail"
HALT_CHECK_TIMEOUT_S = 1.0  # how long a streamed chunk waits for a connection to check for a halt before being held
RETENTION_INTERVAL_S = 3600

DEFAULT_TEMPLATE_MESSAGES = [
    {"role": "system", "content": (
        "You are a warm, supportive companion. Answer the user's last message briefly and kindly.\n"
        "{% if user_context %}\n\nWhat you know about the user:\n{{ user_context }}\n{% endif %}"
        "{% if conversation_history %}\n\nThe conversation so far:\n{{ conversation_history }}\n{% endif %}")},
    {"role": "user", "content": "{{ message }}"},
]
DEFAULT_TEMPLATE_PARAMS = {"max_tokens": 200, "temperature": 0.7}


# ---- errors ------------------------------------------------------------------------------------------------------

class ConversationError(InvalidInput):
    """A conversation request cannot be carried out as given; the message says why in one line."""


class ConversationNotFound(NotFound, ConversationError):
    """The user has no conversation (or the message, memory key … asked for does not exist)."""


class ConversationStateError(Conflict, ConversationError):
    """The conversation is not in a state that allows the action (halting a halted one, resuming an active one)."""


# ---- rows --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    """One user's conversation."""

    id: int
    user_id: str
    state: str
    halted_reason: str | None
    halted_by: str | None
    halted_at: datetime | None
    template_name: str | None
    template_label: str | None
    template_version: int | None
    last_seq: int
    created_at: datetime
    last_activity: datetime

    @property
    def halted(self) -> bool:
        """True while an operator (or a guardrail) has halted it."""
        return self.state == "halted"

    @property
    def template_spec(self) -> str:
        """The assigned template as name, name@label or name@version; '' for the configured default."""
        return _spec(self.template_name, self.template_label, self.template_version)


@dataclass(frozen=True)
class ConversationSummary:
    """A row of the monitor's overview."""

    id: int
    user_id: str
    state: str
    halted_reason: str | None
    halted_by: str | None
    halted_at: datetime | None
    template_name: str | None
    template_label: str | None
    template_version: int | None
    created_at: datetime
    last_activity: datetime
    message_count: int
    flagged_count: int
    event_count: int
    last_template: str | None
    last_message: str | None

    @property
    def template_spec(self) -> str:
        """The assigned template as name, name@label or name@version; '' for the configured default."""
        return _spec(self.template_name, self.template_label, self.template_version)


@dataclass(frozen=True)
class Message:
    """One message of a conversation, with the guardrail events recorded on it."""

    id: int
    conversation_id: int
    seq: int
    role: str
    kind: str
    content: str
    in_context: bool
    reply_to: int | None
    execution_id: int | None
    status: str | None
    operator: str | None
    flagged: bool
    reviewed_by: str | None
    reviewed_at: datetime | None
    created_at: datetime
    events: list = field(default_factory=list)

    @property
    def is_injection(self) -> bool:
        """An operator's message to the AI."""
        return self.kind == "injection"


@dataclass(frozen=True)
class FlaggedMessage:
    """A message a flag rule marked for review (`execution_id`: of the reply, or of the reply to a user message)."""

    id: int
    user_id: str
    seq: int
    role: str
    content: str
    execution_id: int | None
    created_at: datetime
    reviewed_by: str | None
    reviewed_at: datetime | None
    rules: list


@dataclass(frozen=True)
class Intervention:
    """One entry of the audit trail."""

    id: int
    conversation_id: int
    action: str
    operator: str
    reason: str
    detail: dict
    message_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class Reply:
    """What one user message led to."""

    text: str
    status: str  # ok | cancelled | error | blocked | paused
    user_message_id: int
    reply_message_id: int | None
    execution_id: int | None
    events: tuple[guardrails.Hit, ...] = ()
    flagged: bool = False
    error: str | None = None
    context_messages: int = 0  # history messages that fitted in the context
    context_dropped: int = 0   # older history messages left out to fit

    @property
    def paused(self) -> bool:
        """The conversation is halted: the model was not asked (or its reply was withheld)."""
        return self.status == "paused"


def _spec(name: str | None, label: str | None, version: int | None) -> str:
    if not name:
        return ""
    return f"{name}@{label}" if label else f"{name}@{version}" if version else name


# ---- validation --------------------------------------------------------------------------------------------------

def check_user_id(user_id: Any) -> str:
    """A user id without surrounding spaces, 1-200 printable characters; ValueError otherwise."""
    if not isinstance(user_id, str):
        raise ConversationError("a user id must be text")
    user_id = user_id.strip()
    if not user_id:
        raise ConversationError("a user id is required")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise ConversationError(f"a user id is at most {MAX_USER_ID_CHARS} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in user_id):
        raise ConversationError("a user id cannot contain control characters")
    return user_id


def nul_at(value: Any) -> str | None:
    """Where a JSON value holds a NUL character (\\x00), which PostgreSQL cannot store in text or jsonb: '' for the
    value itself, a path like `["notes"][2]` inside it (`… (a key)` for a key), None when there is none."""
    if isinstance(value, str):
        return "" if "\x00" in value else None
    steps = _nul_steps(value)
    if steps is None:
        return None
    path = "".join(f"[{json.dumps(s, ensure_ascii=False) if isinstance(s, str) else s}]" for s in steps[:-1])
    return path + " (a key)" if steps[-1] == "key" else path


def _nul_steps(value: Any) -> list | None:
    """The keys and indexes down to a NUL character (ending 'key' when a key holds it, else 'value'), or None."""
    if isinstance(value, Mapping):
        pairs = value.items()
    elif isinstance(value, (list, tuple)):
        pairs = enumerate(value)
    else:
        return None
    for key, item in pairs:
        if isinstance(key, str) and "\x00" in key:
            return [key, "key"]
        if isinstance(item, str):
            if "\x00" in item:
                return [key, "value"]
        elif isinstance(item, (Mapping, list, tuple)):
            found = _nul_steps(item)
            if found is not None:
                return [key, *found]
    return None


def nul_message(what: str, where: str = "") -> str:
    """The one line that refuses a NUL character: '<what> contains a NUL character (\\x00)[ at …], which cannot be
    stored' (datasets and templates say it the same way)."""
    return f"{what} contains a NUL character (\\x00){' at ' + where if where else ''}, which cannot be stored"


def _check_no_nul(value: Any, what: str) -> Any:
    where = nul_at(value)
    if where is not None:
        raise ConversationError(nul_message(what, where))
    return value


def _check_text(text: Any, what: str = "message") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ConversationError(f"the {what} is empty")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ConversationError(f"the {what} is longer than {MAX_MESSAGE_CHARS:,} characters")
    return _check_no_nul(text.strip(), f"the {what}")


def _check_operator(operator: Any) -> str:
    operator = operator.strip() if isinstance(operator, str) else ""
    if not operator:
        raise ConversationError("an operator name is required")
    return _check_no_nul(operator[:200], "the operator name")


def check_memory_key(key: Any) -> str:
    """A memory key usable as a template variable; ValueError otherwise."""
    if not isinstance(key, str) or not _MEMORY_KEY.fullmatch(key.strip()):
        raise ConversationError("a memory key is 1-64 letters, digits or '_', not starting with a digit "
                                "(e.g. favourite_food)")
    key = key.strip()
    if key in RESERVED_VARIABLES:
        raise ConversationError(f"{key!r} is reserved for the chat flow; choose another memory key")
    return key


def parse_json_value(text: str) -> Any:
    """A memory value typed as JSON text; ValueError with the reason when it is not JSON."""
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConversationError(f'the value must be JSON — e.g. "Alice" (quoted), 42, true or ["tea", "cake"]: '
                                f'{exc}') from None


def _json_value(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConversationError(f"the value must be JSON-serialisable: {exc}") from None


def _observe(hits: Sequence[guardrails.Hit] = (), *, template: str | None = None, model: str | None = None,
             halted_by: str | None = None) -> None:
    """Count guardrail hits and halts in the Prometheus telemetry; never raises."""
    for hit in hits:
        metrics.observe_guardrail_hit(template=template, model=model, rule=hit.rule_name, action=hit.action)
    if halted_by:
        metrics.observe_halt(template=template, model=model, by=halted_by)


# ---- conversation rows -------------------------------------------------------------------------------------------

_CONV_COLUMNS = ("id, user_id, state, halted_reason, halted_by, halted_at, template_name, template_label, "
                 "template_version, last_seq, created_at, last_activity")


def _lock(conn: psycopg.Connection, user_id: str, *, create: bool) -> Conversation | None:
    """The conversation row, locked FOR UPDATE until the transaction ends (created first when asked)."""
    if create:
        conn.execute("INSERT INTO conversations (user_id) VALUES (%s) ON CONFLICT (user_id) DO NOTHING", (user_id,))
    with conn.cursor(row_factory=class_row(Conversation)) as cur:
        return cur.execute(f"SELECT {_CONV_COLUMNS} FROM conversations WHERE user_id = %s FOR UPDATE",
                           (user_id,)).fetchone()


def _lock_existing(conn: psycopg.Connection, user_id: str) -> Conversation:
    conv = _lock(conn, user_id, create=False)
    if conv is None:
        raise ConversationNotFound(f"no conversation for user {user_id!r}")
    return conv


def _append(conn: psycopg.Connection, conversation_id: int, *, role: str, kind: str, content: str,
            in_context: bool = True, reply_to: int | None = None, execution_id: int | None = None,
            status: str | None = None, operator: str | None = None, flagged: bool = False) -> tuple[int, int]:
    """Add a message at the conversation's next sequence number (the caller holds the row lock); (id, seq)."""
    seq = conn.execute(
        "UPDATE conversations SET last_seq = last_seq + 1, last_activity = clock_timestamp() WHERE id = %s "
        "RETURNING last_seq", (conversation_id,)).fetchone()[0]
    message_id = conn.execute(
        """INSERT INTO conversation_messages (conversation_id, seq, role, kind, content, in_context, reply_to,
                                              execution_id, status, operator, flagged)
           VALUES (%(conversation_id)s, %(seq)s, %(role)s, %(kind)s, %(content)s, %(in_context)s, %(reply_to)s,
                   %(execution_id)s, %(status)s, %(operator)s, %(flagged)s) RETURNING id""",
        {"conversation_id": conversation_id, "seq": seq, "role": role, "kind": kind, "content": content,
         "in_context": in_context, "reply_to": reply_to, "execution_id": execution_id, "status": status,
         "operator": operator, "flagged": flagged},
    ).fetchone()[0]
    return message_id, seq


def _audit(conn: psycopg.Connection, conversation_id: int, action: str, operator: str, reason: str = "",
           detail: Mapping[str, Any] | None = None, message_id: int | None = None) -> int:
    return conn.execute(
        """INSERT INTO conversation_interventions (conversation_id, action, operator, reason, detail, message_id)
           VALUES (%s, %s, %s, %s, %s, %s) RETURNING id""",
        (conversation_id, action, operator, reason or "", jsonb(_json_value(dict(detail or {}))), message_id),
    ).fetchone()[0]


def _halt(conn: psycopg.Connection, conversation_id: int, reason: str, operator: str,
          message_id: int | None = None) -> None:
    conn.execute(
        "UPDATE conversations SET state = 'halted', halted_reason = %s, halted_by = %s, halted_at = clock_timestamp() "
        "WHERE id = %s", (reason, operator, conversation_id))
    _audit(conn, conversation_id, "halt", operator, reason, message_id=message_id)


def get_conversation(pool: ConnectionPool, user_id: str) -> Conversation:
    """A user's conversation; LookupError when the user has none."""
    user_id = check_user_id(user_id)
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Conversation)) as cur:
        row = cur.execute(f"SELECT {_CONV_COLUMNS} FROM conversations WHERE user_id = %s", (user_id,)).fetchone()
    if row is None:
        raise ConversationNotFound(f"no conversation for user {user_id!r}")
    return row


def find_conversation(pool: ConnectionPool, user_id: str) -> Conversation | None:
    """A user's conversation, or None when the user has not chatted yet."""
    try:
        return get_conversation(pool, user_id)
    except ConversationNotFound:
        return None


# ---- operator actions --------------------------------------------------------------------------------------------

def halt_conversation(pool: ConnectionPool, user_id: str, reason: str, operator: str) -> Conversation:
    """Halt a conversation: from the very next user message on, the model is not asked until it is resumed, and
    a reply not stored yet is withheld (the user gets the paused notice; the module's docstring gives the rule)."""
    user_id, operator = check_user_id(user_id), _check_operator(operator)
    reason = _check_text(reason, "reason for the halt")
    with pool.connection() as conn, conn.transaction():
        conv = _lock_existing(conn, user_id)
        if conv.halted:
            raise ConversationStateError(f"the conversation of {user_id!r} is already halted "
                                         f"(by {conv.halted_by}: {conv.halted_reason})")
        _halt(conn, conv.id, reason, operator)
    _observe(template=conv.template_name, halted_by="operator")
    return get_conversation(pool, user_id)


def resume_conversation(pool: ConnectionPool, user_id: str, operator: str) -> Conversation:
    """Resume a halted conversation."""
    user_id, operator = check_user_id(user_id), _check_operator(operator)
    with pool.connection() as conn, conn.transaction():
        conv = _lock_existing(conn, user_id)
        if not conv.halted:
            raise ConversationStateError(f"the conversation of {user_id!r} is not halted")
        conn.execute("UPDATE conversations SET state = 'active', halted_reason = NULL, halted_by = NULL, "
                     "halted_at = NULL WHERE id = %s", (conv.id,))
        _audit(conn, conv.id, "resume", operator, detail={"halted_by": conv.halted_by,
                                                          "halted_reason": conv.halted_reason})
    return get_conversation(pool, user_id)


def inject_message(pool: ConnectionPool, user_id: str, text: str, operator: str) -> int:
    """Add an operator message (role 'system', kind 'injection') that the AI sees from its next turn; its id."""
    user_id, operator = check_user_id(user_id), _check_operator(operator)
    text = _check_text(text, "injected message")
    with pool.connection() as conn, conn.transaction():
        conv = _lock_existing(conn, user_id)
        message_id, seq = _append(conn, conv.id, role="system", kind="injection", content=text, operator=operator)
        _audit(conn, conv.id, "inject", operator, detail={"seq": seq, "text": text}, message_id=message_id)
    return message_id


def assign_template(pool: ConnectionPool, user_id: str, template_name: str | None, label: str | None = None,
                    version: int | None = None, *, operator: str = "api") -> Conversation:
    """Put a user's conversation on a template (name alone: its production label, else latest; or a label or a
    version); None returns it to the configured default. The template must exist."""
    user_id, operator = check_user_id(user_id), _check_operator(operator)
    template_name = (template_name or "").strip() or None
    label = (label or "").strip() or None
    if template_name is None and (label or version):
        raise ConversationError("give a template name with a label or version")
    if label and version:
        raise ConversationError("give a label or a version, not both")
    if template_name is not None:
        templates.get_template_by_name(pool, template_name, label=label, version=version)
    with pool.connection() as conn, conn.transaction():
        conv = _lock(conn, user_id, create=True)
        conn.execute("UPDATE conversations SET template_name = %s, template_label = %s, template_version = %s "
                     "WHERE id = %s", (template_name, label, version, conv.id))
        _audit(conn, conv.id, "assign_template", operator,
               detail={"from": conv.template_spec or None, "to": _spec(template_name, label, version) or None})
    return get_conversation(pool, user_id)


def mark_reviewed(pool: ConnectionPool, message_id: int, operator: str) -> None:
    """Mark a flagged message as reviewed (it leaves the flagged count); recorded in the audit trail."""
    operator = _check_operator(operator)
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT conversation_id, flagged, reviewed_at FROM conversation_messages WHERE id = %s "
                           "FOR UPDATE", (message_id,)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no message with id {message_id}")
        if not row[1]:
            raise ConversationStateError(f"message {message_id} is not flagged")
        if row[2] is not None:
            raise ConversationStateError(f"message {message_id} was already reviewed")
        conn.execute("UPDATE conversation_messages SET reviewed_by = %s, reviewed_at = clock_timestamp() WHERE id = %s",
                     (operator, message_id))
        _audit(conn, row[0], "review", operator, message_id=message_id)


# ---- memory ------------------------------------------------------------------------------------------------------

def get_memory(pool: ConnectionPool, user_id: str) -> dict[str, Any]:
    """A user's memory as {key: JSON value} ({} when there is none)."""
    user_id = check_user_id(user_id)
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT m.key, m.value FROM conversation_memory m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.user_id = %s ORDER BY m.key", (user_id,)).fetchall()
    return {k: v for k, v in rows}


def set_memory(pool: ConnectionPool, user_id: str, key: str, value: Any, *, operator: str = "") -> None:
    """Set one memory key to a JSON value (creating the user's conversation if needed); audited when an operator
    is named."""
    user_id, key, value = check_user_id(user_id), check_memory_key(key), _json_value(value)
    _check_no_nul(value, f"the value of memory key {key!r}")
    operator = _check_operator(operator) if operator else ""
    with pool.connection() as conn, conn.transaction():
        conv = _lock(conn, user_id, create=True)
        old = conn.execute("SELECT value FROM conversation_memory WHERE conversation_id = %s AND key = %s",
                           (conv.id, key)).fetchone()
        conn.execute(
            """INSERT INTO conversation_memory (conversation_id, key, value, updated_by) VALUES (%s, %s, %s, %s)
               ON CONFLICT (conversation_id, key) DO UPDATE
               SET value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = clock_timestamp()""",
            (conv.id, key, jsonb(value), operator or ""))
        if operator:
            _audit(conn, conv.id, "set_memory", operator, detail={"key": key, "from": old[0] if old else None,
                                                                  "to": value})


def delete_memory(pool: ConnectionPool, user_id: str, key: str, *, operator: str = "") -> None:
    """Delete one memory key; LookupError when it is not set. Audited when an operator is named."""
    user_id, key = check_user_id(user_id), _check_no_nul(key, "the memory key")
    operator = _check_operator(operator) if operator else ""
    with pool.connection() as conn, conn.transaction():
        conv = _lock(conn, user_id, create=False)
        old = None if conv is None else conn.execute(
            "DELETE FROM conversation_memory WHERE conversation_id = %s AND key = %s RETURNING value",
            (conv.id, key)).fetchone()
        if old is None:
            raise ConversationNotFound(f"user {user_id!r} has no memory key {key!r}")
        if operator:
            _audit(conn, conv.id, "delete_memory", operator, detail={"key": key, "from": old[0]})


def format_memory(memory: Mapping[str, Any]) -> str:
    """Memory as `key: value` lines (strings as they are, other values as JSON) for `user_context`."""
    lines = []
    for key, value in memory.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"{key}: {shown}")
    return "\n".join(lines)


# ---- templates and context ---------------------------------------------------------------------------------------

def ensure_default_template(pool: ConnectionPool, name: str) -> Any:
    """The template `name`, created as the default companion template (version 1 labelled `production`, which is
    what conversations use) when it does not exist yet."""
    try:
        return templates.get_template_by_name(pool, name)
    except templates.TemplateNotFound:
        pass
    try:
        created = templates.create_template(
            pool, name, DEFAULT_TEMPLATE_MESSAGES,
            description="Default companion for the Chat page (created on first use)", category="chat",
            tags=("companion",), created_by="promptdev", params=DEFAULT_TEMPLATE_PARAMS,
            change_description="Default companion template, created on first chat")
    except templates.TemplateExists:
        pass  # another session created it first
    else:
        # Later edits make new versions; live conversations stay on production until an operator moves the label.
        templates.set_label(pool, name, "production", created.version, moved_by="promptdev")
    return templates.get_template_by_name(pool, name)


def _render(pool: ConnectionPool, name: str, label: str | None, version: int | None,
            variables: Mapping[str, Any]) -> Any:
    """Render by name; variables the template needs but nobody set (a memory key not yet known) render empty."""
    try:
        return templates.render_template_by_name(pool, name, variables, label=label, version=version)
    except templates.MissingVariables as exc:
        if not exc.names or exc.problems:
            raise
        filled = {**{n: "" for n in exc.names}, **variables}
        return templates.render_template_by_name(pool, name, filled, label=label, version=version)


def prompt_tokens(backend: Backend, messages: Sequence[Mapping[str, str]]) -> int:
    """Tokens the model will see for messages: exact for the in-process model, an estimate otherwise."""
    segments = getattr(backend, "prompt_segments", None)
    tokenize = getattr(backend, "tokenize_segments", None)
    if segments is not None and tokenize is not None:
        try:
            return len(tokenize(segments(messages))) + 1
        except ChatFormatError:
            pass
    return sum(backend.count_tokens(m["content"]) + 4 for m in messages) + 2


def history_line(kind: str, content: str) -> str:
    """One message as a line of `conversation_history`."""
    return f"{HISTORY_SPEAKERS.get(kind, 'Note')}: {content}"


@dataclass
class _Context:
    rendered: Any
    kept: int
    dropped: int
    start_seq: int  # sequence number of the oldest history message shown; 0 when the whole history is shown


class _StartHints:
    """Per conversation, where the model's history began last turn (in this process, like the model's cache).

    Once history has to be trimmed it is cut back to TRIM_TO of the room, and later turns keep that same start for
    as long as everything from it still fits: the prompt then only grows at its end, so the model's cached prefix is
    reused instead of re-reading the whole window on every turn."""

    def __init__(self, size: int = 10_000):
        self._hints: OrderedDict[tuple, int] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    @staticmethod
    def _key(conv: Conversation) -> tuple:
        return conv.id, conv.created_at  # ids alone repeat across databases

    def get(self, conv: Conversation) -> int:
        """The start of last turn's history (0: none)."""
        with self._lock:
            return self._hints.get(self._key(conv), 0)

    def set(self, conv: Conversation, start_seq: int) -> None:
        """Remember where this turn's history began (0 forgets)."""
        key = self._key(conv)
        with self._lock:
            if start_seq:
                self._hints[key] = start_seq
                self._hints.move_to_end(key)
                while len(self._hints) > self._size:
                    self._hints.popitem(last=False)
            else:
                self._hints.pop(key, None)


_start_hints = _StartHints()


def assemble_context(pool: ConnectionPool, backend: Backend, *, template_name: str, label: str | None,
                     version: int | None, user_id: str, message: str, memory: Mapping[str, Any],
                     history: Sequence[tuple[int, str, str]], budget: int, complete: bool = True,
                     start_hint: int = 0) -> _Context:
    """Render the template with memory and the most recent history that fits in `budget` prompt tokens.

    `history` is (seq, kind, content), oldest first; `complete` says it reaches back to the conversation's start.
    When it all fits it is all shown; otherwise the newest messages are kept — from `start_hint` if everything from
    there still fits, else cut back to TRIM_TO of the room (the returned start_seq is the next turn's hint)."""
    base_vars = {**{k: v for k, v in memory.items() if k not in RESERVED_VARIABLES},
                 "user_id": user_id, "message": message, "user_context": format_memory(memory)}
    seqs = [seq for seq, _, _ in history]
    lines = [history_line(kind, content) for _, kind, content in history]

    def render(kept: int) -> Any:
        return _render(pool, template_name, label, version,
                       {**base_vars, "conversation_history": "\n".join(lines[len(lines) - kept:]) if kept else ""})

    base = render(0)
    if not lines:
        return _Context(base, 0, 0, 0)
    room = budget - prompt_tokens(backend, base.messages)
    used: list[int] = []  # cumulative cost of the newest 1, 2, ... lines that fit
    for line in reversed(lines):
        total = (used[-1] if used else 0) + backend.count_tokens(line) + 1
        if total > room:
            break
        used.append(total)
    fit = len(used)
    if fit == len(lines) and complete:
        kept = fit
    else:
        hinted = sum(1 for seq in seqs if seq >= start_hint)
        if start_hint and (complete or start_hint >= seqs[0]) and 0 < hinted <= fit:
            kept = hinted
        else:
            kept = sum(1 for u in used if u <= room * TRIM_TO) or min(fit, 1)
    while kept:
        rendered = render(kept)
        if prompt_tokens(backend, rendered.messages) <= budget:
            whole = kept == len(lines) and complete
            return _Context(rendered, kept, len(lines) - kept, 0 if whole else seqs[len(lines) - kept])
        kept -= 1
    return _Context(base, 0, len(lines), 0)


# ---- the flow of one message -------------------------------------------------------------------------------------

class _ChatRun(executions.ExecutionRun):
    """A ledger run whose recorded output has the output `redact` rules applied, so text a redact rule removes from
    a reply never reaches the ledger (nor the analytics exports made from it). `raw_output` is what the model said."""

    def __init__(self, *args: Any, ledger_text: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ledger_text = ledger_text

    @property
    def raw_output(self) -> str:
        """Text generated so far, as the model produced it."""
        return self.generation.text if self.generation else ""

    @property
    def output(self) -> str:
        """Text generated so far with redactions applied (what the ledger records)."""
        raw = self.raw_output
        return self._ledger_text(raw) if self._ledger_text is not None and raw else raw


def ledger_output(rules: Sequence[guardrails.Rule], output: str | None, template_name: str | None) -> str | None:
    """A reply as the ledger may keep it: what the output `redact` rules match is replaced; other actions keep it."""
    if not output:
        return output
    redacting = [r for r in rules if r.action == "redact"]
    return guardrails.check(redacting, output, "output", template_name).text if redacting else output


# How a withheld reply is stored (MessageStream._store's arguments): the paused notice, out of later contexts.
_WITHHELD = {"kind": "paused", "content": PAUSED_REPLY, "status": "paused", "in_context": False,
             "withdraw_message": True, "ledger_output": None}


class MessageStream:
    """A reply being produced for one stored user message: iterate it for text chunks (hand it to
    `st.write_stream` inside `with stream:`). When it ends — or is closed early, which stops the model and keeps what
    was produced — the reply is stored and `reply` is set. A halt committed before the reply is stored withholds it
    (the module's docstring gives the rule); `shown` is what was released to the user before that."""

    def __init__(self, pool: ConnectionPool, backend: Backend, settings: Settings, conv: Conversation,
                 user_message_id: int, user_seq: int, text: str, input_check: guardrails.Check,
                 rules: list[guardrails.Rule], refusal: str | None, reason: str, overrides: Mapping[str, Any],
                 context_budget: int | None, *, audit_mark: int):
        self.pool, self.backend, self.settings = pool, backend, settings
        self.conversation = conv
        self.user_id = conv.user_id
        self.user_message_id, self.user_seq = user_message_id, user_seq
        self.audit_mark = audit_mark  # the newest audit entry when the message was stored: halts after it withhold
        self.text = text  # the message as stored (after redaction)
        self.input_check = input_check
        self.rules = rules
        self.refusal, self.reason = refusal, reason
        self.overrides, self.context_budget = dict(overrides), context_budget
        self.template_name = conv.template_name or settings.default_template
        self.run: executions.ExecutionRun | None = None
        self.reply: Reply | None = None
        self.context_messages = self.context_dropped = 0
        self.withheld: str | None = None  # the reason of the halt that withholds the reply
        self.shown = ""  # the chunks released to the user
        self._chunks = self._flow()

    # -- iteration
    def __iter__(self) -> "MessageStream":
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def read(self) -> Reply:
        """Run to the end and return the reply."""
        for _ in self:
            pass
        return self.reply

    def close(self) -> None:
        """Stop early: the model is released and what was produced so far is stored."""
        self._chunks.close()
        if self.reply is None:  # closed before it began
            if self.refusal is not None:
                self._refuse()  # the refusal is recorded even if nobody read it
            else:
                self._store_unstarted()  # the message is answered with nothing

    def __enter__(self) -> "MessageStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def buffered(self) -> bool:
        """True when output rules may change the reply, so it is checked before any of it is sent."""
        return any(r.applies("output", self.template_name) and r.action != "flag" for r in self.rules)

    # -- the flow
    def _flow(self) -> Iterator[str]:
        if self.refusal is not None:
            yield self._refuse()
            return
        try:
            self.run = self._start()
        except (ValueError, LookupError, GenerationError, psycopg.Error) as exc:
            yield self._fail_before_model(exc)
            return
        buffered = self.buffered
        checked = held = False  # held: the halt check failed, the rest waits for the store to decide
        try:
            with self.run:
                for chunk in self.run:
                    # Each chunk is released only once no halt is found (for a buffered reply, which releases
                    # nothing before it is stored, the first check just stops the model early). The model may have
                    # been busy with other replies for a while: a halt issued meanwhile stops this one at once.
                    if held or (buffered and checked):
                        continue
                    checked = True
                    try:
                        self.withheld = self._halted_since_stored(timeout=HALT_CHECK_TIMEOUT_S)
                    except psycopg.OperationalError as exc:  # the database is unreachable: nothing more is shown
                        log.warning("chat for %s: holding the reply back, no halt check: %s", self.user_id,
                                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                        held = True
                        continue
                    if self.withheld is not None:
                        break  # leaving `with` stops the model; the ledger records the run as cancelled
                    if not buffered:
                        self.shown += chunk
                        yield chunk
        except GenerationError:
            pass  # the ledger has it as status 'error'
        finally:
            self.reply = self._store_generated()
        text = self.reply.text
        if self.reply.status == "ok":  # what was held back: all of it when buffered
            text = text[len(self.shown):] if text.startswith(self.shown) else ""
        elif self.shown and text:
            text = "\n\n" + text  # the notice after what was shown before the halt (or the failure)
        if text and self.reply.status != "cancelled":
            yield text

    def _halted_since_stored(self, conn: psycopg.Connection | None = None, *,
                             timeout: float | None = None) -> str | None:
        """The reason of the first halt audited since this message was stored, else None (a resume since does not
        undo it). Every halt takes the conversation's row lock, so under that lock the answer is final."""
        if conn is None:
            with self.pool.connection(timeout=timeout) as own:
                return self._halted_since_stored(own)
        row = conn.execute(
            "SELECT reason FROM conversation_interventions WHERE conversation_id = %s AND action = 'halt' "
            "AND id > %s ORDER BY id LIMIT 1", (self.conversation.id, self.audit_mark)).fetchone()
        return None if row is None else row[0] or "halted"

    def _start(self) -> executions.ExecutionRun:
        """Steps 3-4: memory and history, template rendered to fit, the ledger run begun (not yet iterated)."""
        conv = self.conversation
        with self.pool.connection() as conn:
            memory = {k: v for k, v in conn.execute(
                "SELECT key, value FROM conversation_memory WHERE conversation_id = %s ORDER BY key",
                (conv.id,)).fetchall()}
            history = conn.execute(
                "SELECT seq, kind, content FROM conversation_messages WHERE conversation_id = %s AND seq < %s "
                "AND in_context ORDER BY seq DESC LIMIT %s", (conv.id, self.user_seq, HISTORY_LIMIT)).fetchall()[::-1]
        if conv.template_name is None:
            ensure_default_template(self.pool, self.template_name)
        tv = templates.get_template_by_name(self.pool, self.template_name, label=conv.template_label,
                                            version=conv.template_version)
        params = GenerationParams.from_dict({**(tv.params or {}), **self.overrides})
        n_ctx = self.backend.n_ctx or self.settings.n_ctx
        budget = self.context_budget if self.context_budget is not None else n_ctx - params.max_tokens - 1
        if budget < 16:
            raise ConversationError(f"the context budget of {budget} tokens leaves no room for a prompt "
                                    f"(context {n_ctx}, max_tokens {params.max_tokens})")
        ctx = assemble_context(self.pool, self.backend, template_name=self.template_name, label=conv.template_label,
                               version=conv.template_version, user_id=self.user_id, message=self.text, memory=memory,
                               history=history, budget=budget, complete=len(history) < HISTORY_LIMIT,
                               start_hint=_start_hints.get(conv))
        _start_hints.set(conv, ctx.start_seq)
        self.context_messages, self.context_dropped = ctx.kept, ctx.dropped
        origin = Origin.from_rendered(ctx.rendered, "chat", user_id=self.user_id)
        redacts = any(r.applies("output", self.template_name) and r.action == "redact" for r in self.rules)
        redact = (lambda raw: ledger_output(self.rules, raw, self.template_name)) if redacts else None
        return _ChatRun(self.pool, self.backend, origin, params, ctx.rendered.messages, None, ledger_text=redact)

    def _refuse(self) -> str:
        """Step 2 (or an input block): a fixed reply, recorded in the ledger as 'blocked' without the model."""
        paused = self.refusal == "paused"
        text = PAUSED_REPLY if paused else BLOCKED_INPUT_REPLY
        error = f"conversation paused: {self.reason}" if paused else f"blocked by {self.reason}"
        execution_id = executions.record(
            self.pool, origin=Origin("chat", user_id=self.user_id, variables={"message": self.text}),
            status="blocked", messages=[{"role": "user", "content": self.text}], error=error)
        message_id = self._store(kind=self.refusal, content=text, status=self.refusal, execution_id=execution_id,
                                 in_context=False)
        self.reply = Reply(text, self.refusal, self.user_message_id, message_id, execution_id,
                           self.input_check.hits, self.input_check.flagged, error=error)
        return text

    def _fail_before_model(self, exc: BaseException) -> str:
        """The template could not be found or rendered: recorded as an error, the user gets ERROR_REPLY."""
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("chat for %s failed before generation: %s", self.user_id, error)
        execution_id = executions.record(
            self.pool, origin=Origin("chat", user_id=self.user_id, template_name=self.template_name,
                                     variables={"message": self.text}),
            status="error", messages=[{"role": "user", "content": self.text}], error=error)
        message_id = self._store(kind="error", content=ERROR_REPLY, status="error", execution_id=execution_id,
                                 in_context=False, withheld=_WITHHELD)
        if self.withheld is not None:
            self.reply = Reply(PAUSED_REPLY, "paused", self.user_message_id, message_id, execution_id,
                               self.input_check.hits, self.input_check.flagged, error=withheld_error(self.withheld))
        else:
            self.reply = Reply(ERROR_REPLY, "error", self.user_message_id, message_id, execution_id,
                               self.input_check.hits, self.input_check.flagged, error=error)
        return self.reply.text

    def _store_generated(self) -> Reply:
        """Step 5: output guardrails on what the model produced, the reply stored (withheld if a halt came first),
        hits recorded."""
        run = self.run
        execution_id, status = run.execution_id, run.status or "cancelled"
        raw = run.raw_output
        redacted = ledger_output(self.rules, raw, self.template_name)
        withheld = {**_WITHHELD, "ledger_output": redacted if redacted != raw else None}
        hits: tuple[guardrails.Hit, ...] = ()
        flagged, error = False, None
        if status == "error":
            text, error = ERROR_REPLY, run.error
            plan = {"kind": "error", "content": text, "status": "error", "in_context": False}
        else:
            out = guardrails.check(self.rules, raw, "output", self.template_name)
            hits, flagged = out.hits, out.flagged
            plan = {"flagged": flagged, "hits": hits, "ledger_output": out.text if out.redacted else None}
            if out.halted:
                text, status = PAUSED_REPLY, "paused"
                plan.update(kind="paused", content=text, status=status, in_context=False, halt_reason=out.reason())
            elif out.blocked:
                text, status = BLOCKED_OUTPUT_REPLY, "blocked"
                plan.update(kind="blocked", content=text, status=status, in_context=False)
            else:
                text = out.text
                plan.update(kind="reply", content=text, status=status, in_context=bool(text.strip()))
        message_id = self._store(execution_id=execution_id, withheld=withheld, **plan)
        if self.withheld is not None:
            text, status, hits, flagged, error = PAUSED_REPLY, "paused", (), False, withheld_error(self.withheld)
        return Reply(text, status, self.user_message_id, message_id, execution_id,
                     self.input_check.hits + hits, self.input_check.flagged or flagged, error=error,
                     context_messages=self.context_messages, context_dropped=self.context_dropped)

    def _store_unstarted(self) -> None:
        message_id = self._store(kind="reply", content="", status="cancelled", execution_id=None, in_context=False)
        self.reply = Reply("", "cancelled", self.user_message_id, message_id, None, self.input_check.hits,
                           self.input_check.flagged)

    def _store(self, *, kind: str, content: str, status: str, execution_id: int | None, in_context: bool,
               flagged: bool = False, hits: Sequence[guardrails.Hit] = (), halt_reason: str | None = None,
               ledger_output: str | None = None, withdraw_message: bool = False,
               ledger_error: str | None = None, withheld: Mapping[str, Any] | None = None) -> int:
        """Store the reply in order, link the input hits to the execution, record output hits, halt if asked; with
        `ledger_output`, make sure the execution's recorded output is the redacted one (in the same transaction);
        `withdraw_message` leaves the user message out of later contexts (it was paused after it was stored);
        `ledger_error` says in the execution's record why its run was stopped. With `withheld` (the same arguments
        for a withheld reply), a halt audited since the message was stored — looked for under the row lock every
        halt takes, so none can slip in before this commits — stores that instead and sets `self.withheld`."""
        with self.pool.connection() as conn, conn.transaction():
            conv = _lock(conn, self.user_id, create=False)
            if conv is None:  # purged while the reply was generated: nothing to attach it to
                raise ConversationNotFound(f"the conversation of {self.user_id!r} was deleted while replying")
            if withheld is not None:
                reason = self._halted_since_stored(conn)
                if reason is not None:
                    self.withheld = reason
                    kind, content, status, in_context = (withheld["kind"], withheld["content"], withheld["status"],
                                                         withheld["in_context"])
                    withdraw_message, ledger_output = withheld["withdraw_message"], withheld["ledger_output"]
                    flagged, hits, halt_reason, ledger_error = False, (), None, withheld_error(reason)
            if withdraw_message:
                conn.execute("UPDATE conversation_messages SET in_context = false WHERE id = %s",
                             (self.user_message_id,))
            message_id, _ = _append(conn, conv.id, role="assistant", kind=kind, content=content, in_context=in_context,
                                    reply_to=self.user_message_id, execution_id=execution_id, status=status,
                                    flagged=flagged)
            if execution_id is not None:
                conn.execute("UPDATE guardrail_events SET execution_id = %s WHERE message_id = %s "
                             "AND execution_id IS NULL", (execution_id, self.user_message_id))
                if ledger_output is not None:
                    conn.execute("UPDATE executions SET output = %s WHERE id = %s AND output IS DISTINCT FROM %s",
                                 (ledger_output, execution_id, ledger_output))
                if ledger_error is not None:
                    conn.execute("UPDATE executions SET error = %s WHERE id = %s AND error IS NULL",
                                 (ledger_error, execution_id))
            guardrails.record_hits(conn, hits, user_id=self.user_id, conversation_id=conv.id, message_id=message_id,
                                   execution_id=execution_id)
            halting = bool(halt_reason) and not conv.halted
            if halting:
                _halt(conn, conv.id, halt_reason, GUARDRAIL_OPERATOR, message_id=message_id)
        _observe(hits, template=self.template_name, model=self.backend.name,
                 halted_by=GUARDRAIL_OPERATOR if halting else None)
        return message_id


def withheld_error(reason: str) -> str:
    """What the ledger and the Reply say about a reply withheld by a halt."""
    return f"reply withheld: the conversation was halted ({reason})"


def stream_message(pool: ConnectionPool, backend: Backend, settings: Settings, user_id: str, text: str, *,
                   params: Mapping[str, Any] | None = None, context_budget: int | None = None) -> MessageStream:
    """Store a user message (steps 1-2 happen now) and return the stream of its reply (steps 3-5 as it is read).

    `params` override the template's model parameters; `context_budget` caps the prompt's tokens (default: the
    model's context minus max_tokens)."""
    user_id, text = check_user_id(user_id), _check_text(text)
    overrides = dict(params or {})
    try:
        GenerationParams.from_dict(overrides)  # refuse bad parameters before anything is stored
    except ValueError as exc:
        raise ConversationError(str(exc)) from None
    with pool.connection() as conn, conn.transaction():
        conv = _lock(conn, user_id, create=True)
        template_name = conv.template_name or settings.default_template
        rules = guardrails.rules_for(conn, template_name)
        check = guardrails.check(rules, text, "input", template_name)
        refusal, reason = None, ""
        if conv.halted:
            refusal, reason = "paused", conv.halted_reason or "halted"
        elif check.halted:
            refusal, reason = "paused", check.reason()
        elif check.blocked:
            refusal, reason = "blocked", check.reason()
        message_id, seq = _append(conn, conv.id, role="user", kind="message", content=check.text,
                                  in_context=refusal is None, flagged=check.flagged)
        if check.halted and not conv.halted:
            _halt(conn, conv.id, reason, GUARDRAIL_OPERATOR, message_id=message_id)
        guardrails.record_hits(conn, check.hits, user_id=user_id, conversation_id=conv.id, message_id=message_id)
        audit_mark = 0 if refusal is not None else conn.execute(  # under the row lock: every halt comes after it
            "SELECT coalesce(max(id), 0) FROM conversation_interventions WHERE conversation_id = %s",
            (conv.id,)).fetchone()[0]
    _observe(check.hits, template=template_name, model=backend.name,
             halted_by=GUARDRAIL_OPERATOR if check.halted and not conv.halted else None)
    return MessageStream(pool, backend, settings, conv, message_id, seq, check.text, check, rules, refusal, reason,
                         overrides, context_budget, audit_mark=audit_mark)


def send_message(pool: ConnectionPool, backend: Backend, settings: Settings, user_id: str, text: str, *,
                 params: Mapping[str, Any] | None = None, context_budget: int | None = None) -> Reply:
    """Run the whole flow for one user message and return the reply."""
    with stream_message(pool, backend, settings, user_id, text, params=params,
                        context_budget=context_budget) as stream:
        return stream.read()


# ---- the API bound to one workbench ------------------------------------------------------------------------------

class Conversations:
    """The conversation API for an application that embeds the workbench, with the issue's signatures; it runs the
    same flow as the Chat and Monitor pages. Get one with `connect()`; the model is loaded on the first message."""

    def __init__(self, pool: ConnectionPool, settings: Settings, backend: Backend | None = None):
        self.pool, self.settings = pool, settings
        self._backend = backend
        self._backend_lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        """The model backend (loaded once per process for these settings)."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = llm.get_backend(self.settings)
            return self._backend

    def send_message(self, user_id: str, text: str, **kw: Any) -> Reply:
        """Run the whole flow for one user message; the Reply (its `text` is what the user is shown)."""
        return send_message(self.pool, self.backend, self.settings, user_id, text, **kw)

    def stream_message(self, user_id: str, text: str, **kw: Any) -> MessageStream:
        """The streaming variant: iterate the result for text chunks (`with` it); `.reply` is set at the end."""
        return stream_message(self.pool, self.backend, self.settings, user_id, text, **kw)

    def halt_conversation(self, user_id: str, reason: str, operator: str) -> Conversation:
        """Halt: the very next user message gets the paused reply without the model; a reply in flight is withheld."""
        return halt_conversation(self.pool, user_id, reason, operator)

    def resume_conversation(self, user_id: str, operator: str) -> Conversation:
        """Resume a halted conversation."""
        return resume_conversation(self.pool, user_id, operator)

    def inject_message(self, user_id: str, text: str, operator: str) -> int:
        """An operator message the AI sees from its next turn; its message id."""
        return inject_message(self.pool, user_id, text, operator)

    def get_memory(self, user_id: str) -> dict[str, Any]:
        """The user's memory as {key: JSON value}."""
        return get_memory(self.pool, user_id)

    def set_memory(self, user_id: str, key: str, value: Any, *, operator: str = "") -> None:
        """Set one memory key to a JSON value."""
        set_memory(self.pool, user_id, key, value, operator=operator)

    def delete_memory(self, user_id: str, key: str, *, operator: str = "") -> None:
        """Delete one memory key (ConversationNotFound when it is not set)."""
        delete_memory(self.pool, user_id, key, operator=operator)


def connect(settings: Settings | None = None, *, pool: ConnectionPool | None = None,
            backend: Backend | None = None) -> Conversations:
    """The conversation API for the configured workbench (settings from the environment unless given)."""
    if settings is None:
        settings = load_settings()
    if pool is None:
        pool = db.get_pool(settings)
    return Conversations(pool, settings, backend)


# ---- reading: conversation view and monitor ----------------------------------------------------------------------

_MESSAGE_QUERY = """
SELECT m.id, m.conversation_id, m.seq, m.role, m.kind, m.content, m.in_context, m.reply_to, m.execution_id, m.status,
       m.operator, m.flagged, m.reviewed_by, m.reviewed_at, m.created_at,
       COALESCE((SELECT json_agg(json_build_object('rule', e.rule_name, 'kind', e.kind, 'direction', e.direction,
                                                   'action', e.action, 'matches', e.matches, 'excerpt', e.excerpt)
                                 ORDER BY e.id)
                 FROM guardrail_events e WHERE e.message_id = m.id), '[]'::json) AS events
FROM conversation_messages m JOIN conversations c ON c.id = m.conversation_id
WHERE c.user_id = %s AND m.seq > %s"""


def list_messages(pool: ConnectionPool, user_id: str, *, after_seq: int = 0, limit: int | None = None,
                  visible_to_user: bool = False) -> list[Message]:
    """A conversation's messages in order (the newest `limit` when given); `visible_to_user` leaves out operator
    injections, as the Chat page shows it."""
    user_id = check_user_id(user_id)
    query = _MESSAGE_QUERY + (" AND m.kind <> 'injection'" if visible_to_user else "")
    args: list[Any] = [user_id, after_seq]
    if limit is not None:
        query = f"SELECT * FROM ({query} ORDER BY m.seq DESC LIMIT %s) newest ORDER BY seq"
        args.append(limit)
    else:
        query += " ORDER BY m.seq"
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Message)) as cur:
        return cur.execute(query, args).fetchall()


def list_interventions(pool: ConnectionPool, user_id: str) -> list[Intervention]:
    """The audit trail of a conversation, oldest first."""
    user_id = check_user_id(user_id)
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Intervention)) as cur:
        return cur.execute(
            "SELECT i.id, i.conversation_id, i.action, i.operator, i.reason, i.detail, i.message_id, i.created_at "
            "FROM conversation_interventions i JOIN conversations c ON c.id = i.conversation_id "
            "WHERE c.user_id = %s ORDER BY i.id", (user_id,)).fetchall()


def list_conversations(pool: ConnectionPool, *, state: str | None = None, search: str = "",
                       flagged_only: bool = False, sort: str = "last_activity", descending: bool = True,
                       limit: int = 1000) -> list[ConversationSummary]:
    """Every conversation with message count, last activity, template, state and flagged count; filtered, sorted."""
    if state is not None and state not in STATES:
        raise ConversationError(f"unknown state {state!r}; choose one of {', '.join(STATES)}")
    if sort not in SORTS:
        raise ConversationError(f"unknown sort {sort!r}; choose one of {', '.join(SORTS)}")
    where, args = [], []
    if state is not None:
        where.append("c.state = %s")
        args.append(state)
    if search and search.strip():
        where.append("c.user_id ILIKE %s")
        args.append("%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    if flagged_only:
        where.append("COALESCE(m.flagged_count, 0) > 0")
    query = f"""
SELECT c.id, c.user_id, c.state, c.halted_reason, c.halted_by, c.halted_at, c.template_name, c.template_label,
       c.template_version, c.created_at, c.last_activity,
       COALESCE(m.message_count, 0)::int AS message_count, COALESCE(m.flagged_count, 0)::int AS flagged_count,
       COALESCE(g.event_count, 0)::int AS event_count,
       t.last_template, l.last_message
FROM conversations c
LEFT JOIN LATERAL (SELECT count(*) AS message_count,
                          count(*) FILTER (WHERE flagged AND reviewed_at IS NULL) AS flagged_count
                   FROM conversation_messages WHERE conversation_id = c.id) m ON true
LEFT JOIN LATERAL (SELECT count(*) AS event_count FROM guardrail_events WHERE conversation_id = c.id) g ON true
LEFT JOIN LATERAL (SELECT e.template_name || ' v' || e.template_version AS last_template
                   FROM conversation_messages r JOIN executions e ON e.id = r.execution_id
                   WHERE r.conversation_id = c.id AND r.role = 'assistant' AND e.template_name IS NOT NULL
                     AND e.template_version IS NOT NULL
                   ORDER BY r.seq DESC LIMIT 1) t ON true
LEFT JOIN LATERAL (SELECT left(content, 120) AS last_message FROM conversation_messages
                   WHERE conversation_id = c.id ORDER BY seq DESC LIMIT 1) l ON true
{"WHERE " + " AND ".join(where) if where else ""}
ORDER BY {SORTS[sort]} {"DESC" if descending else "ASC"}, c.user_id
LIMIT %s"""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(ConversationSummary)) as cur:
        return cur.execute(query, (*args, limit)).fetchall()


def flagged_messages(pool: ConnectionPool, *, include_reviewed: bool = False, user_id: str | None = None,
                     limit: int = 200) -> list[FlaggedMessage]:
    """Messages a flag rule marked for review, newest first, with the rules that matched."""
    where = ["m.flagged"]
    args: list[Any] = []
    if not include_reviewed:
        where.append("m.reviewed_at IS NULL")
    if user_id is not None:
        where.append("c.user_id = %s")
        args.append(check_user_id(user_id))
    with pool.connection() as conn, conn.cursor(row_factory=class_row(FlaggedMessage)) as cur:
        return cur.execute(
            f"""SELECT m.id, c.user_id, m.seq, m.role, m.content,
                       COALESCE(m.execution_id, (SELECT r.execution_id FROM conversation_messages r
                                                 WHERE r.reply_to = m.id ORDER BY r.seq LIMIT 1)) AS execution_id,
                       m.created_at, m.reviewed_by, m.reviewed_at,
                       COALESCE((SELECT json_agg(DISTINCT e.rule_name) FROM guardrail_events e
                                 WHERE e.message_id = m.id AND e.action = 'flag'), '[]'::json) AS rules
                FROM conversation_messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE {" AND ".join(where)} ORDER BY m.id DESC LIMIT %s""", (*args, limit)).fetchall()


def message_activity(pool: ConnectionPool, hours: int = 24) -> list[dict[str, Any]]:
    """Messages per hour over the last `hours` hours, by kind of sender: [{hour, sender, messages}]."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """SELECT date_trunc('hour', created_at) AS hour,
                      CASE WHEN role = 'user' THEN 'users' WHEN kind = 'injection' THEN 'operators'
                           ELSE 'assistant' END AS sender,
                      count(*)::int AS messages
               FROM conversation_messages WHERE created_at >= now() - make_interval(hours => %s)
               GROUP BY 1, 2 ORDER BY 1, 2""", (hours,)).fetchall()


def dashboard_figures(conn: psycopg.Connection) -> dict[str, int]:
    """Home dashboard: users, conversations active today, messages, halted conversations, guardrail events."""
    row = conn.execute(
        """SELECT (SELECT count(*) FROM conversations),
                  (SELECT count(*) FROM conversations WHERE last_activity >= date_trunc('day', now())),
                  (SELECT count(*) FROM conversation_messages),
                  (SELECT count(*) FROM conversations WHERE state = 'halted'),
                  (SELECT count(*) FROM guardrail_events)""").fetchone()
    labels = ("Users", "Conversations active today", "Messages", "Halted conversations", "Guardrail events")
    return {label: int(value) for label, value in zip(labels, row)}


def overview_figures(pool: ConnectionPool) -> dict[str, int]:
    """The dashboard figures of conversations alone (for the Monitor page)."""
    with pool.connection() as conn:
        return dashboard_figures(conn)


# ---- retention ---------------------------------------------------------------------------------------------------

def _purge(conn: psycopg.Connection, older_than_days: int, trigger: str, operator: str) -> dict[str, int]:
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM conversations WHERE last_activity < now() - make_interval(days => %s) FOR UPDATE",
        (older_than_days,)).fetchall()]
    counts = {"conversations": len(ids), "messages": 0, "memory": 0}
    if ids:
        counts["messages"] = conn.execute(
            "SELECT count(*) FROM conversation_messages WHERE conversation_id = ANY(%s)", (ids,)).fetchone()[0]
        counts["memory"] = conn.execute(
            "SELECT count(*) FROM conversation_memory WHERE conversation_id = ANY(%s)", (ids,)).fetchone()[0]
        conn.execute("DELETE FROM conversations WHERE id = ANY(%s)", (ids,))
    conn.execute(
        "INSERT INTO conversation_purges (trigger, operator, older_than_days, conversations, messages, memory) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (trigger, operator or "", older_than_days, counts["conversations"], counts["messages"], counts["memory"]))
    return counts


def purge_conversations(pool: ConnectionPool, older_than_days: int, *, operator: str = "") -> dict[str, int]:
    """Delete conversations idle for more than N days with their messages, memory, events and audit trail (the
    execution ledger keeps its records); {'conversations', 'messages', 'memory'} counts."""
    if isinstance(older_than_days, bool) or not isinstance(older_than_days, int) or older_than_days < 1:
        raise ConversationError(f"older_than_days must be a whole number of at least 1, got {older_than_days!r}")
    with pool.connection() as conn, conn.transaction():
        return _purge(conn, older_than_days, "manual", operator)


def list_purges(pool: ConnectionPool, limit: int = 20) -> list[dict[str, Any]]:
    """Recent purges, newest first."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM conversation_purges ORDER BY id DESC LIMIT %s", (limit,)).fetchall()


_retention_checked: dict[str, float] = {}
_retention_lock = threading.Lock()


def scheduled_purge(pool: ConnectionPool, settings: Settings, *, now: float | None = None) -> dict[str, int] | None:
    """Run the retention purge if `retention_days` is set and no scheduled purge ran in the last hour (across every
    process: the last run is read from the database under an advisory lock); the counts, or None when not due."""
    if settings.retention_days <= 0:
        return None
    with pool.connection() as conn, conn.transaction():
        if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (int(LockKey.RETENTION),)).fetchone()[0]:
            return None
        recent = conn.execute(
            "SELECT 1 FROM conversation_purges WHERE trigger = 'schedule' "
            "AND ran_at > clock_timestamp() - make_interval(secs => %s)", (RETENTION_INTERVAL_S,)).fetchone()
        if recent:
            return None
        return _purge(conn, settings.retention_days, "schedule", "")


def run_retention(pool: ConnectionPool, settings: Settings) -> bool:
    """The worker's task source for PROMPTDEV_RETENTION_DAYS: at most one database check a minute per process, a
    purge at most once an hour (scheduled_purge); always False (nothing that keeps the worker from idling)."""
    if settings.retention_days <= 0:
        return False
    key = f"{id(pool)}"
    with _retention_lock:
        if time.monotonic() - _retention_checked.get(key, -1e9) < 60:
            return False
        _retention_checked[key] = time.monotonic()
    counts = scheduled_purge(pool, settings)
    if counts and counts["conversations"]:
        log.info("retention purge: %s", counts)
    return False
