"""`promptdev conversations …` and `promptdev guardrails …`: the operator's actions from the command line."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from core import conversations, db, guardrails, llm
from core.cli._common import fail, table
from core.config import Settings


def _operator(args: argparse.Namespace) -> str:
    if getattr(args, "operator", None):
        return args.operator
    name = os.environ.get("PROMPTDEV_OPERATOR")
    if name:
        return name
    try:
        return getpass.getuser() or "cli"
    except Exception:  # no login name in this environment
        return "cli"


def _when(ts) -> str:
    return ts.astimezone().strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# ---- conversations -----------------------------------------------------------------------------------------------

def _list(args: argparse.Namespace, settings: Settings) -> int:
    rows = conversations.list_conversations(db.get_pool(settings), state=args.state, search=args.search or "",
                                            flagged_only=args.flagged, sort=args.sort, descending=not args.asc,
                                            limit=args.limit)
    if not rows:
        print("no conversations")
        return 0
    print(table(("USER", "STATE", "MESSAGES", "FLAGGED", "EVENTS", "LAST ACTIVITY", "TEMPLATE"),
                [(r.user_id, r.state, r.message_count, r.flagged_count, r.event_count, _when(r.last_activity),
                  r.last_template or r.template_spec or f"{settings.default_template} (default)") for r in rows],
                rule=True))
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    conv = conversations.get_conversation(pool, args.user)
    state = "HALTED" if conv.halted else "active"
    print(f"user {conv.user_id} · {state}"
          + (f" by {conv.halted_by} at {_when(conv.halted_at)}: {conv.halted_reason}" if conv.halted else "")
          + f" · template {conv.template_spec or settings.default_template + ' (default)'}")
    memory = conversations.get_memory(pool, args.user)
    if memory:
        print("memory: " + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in memory.items()))
    print()
    for m in conversations.list_messages(pool, args.user, limit=args.last):
        who = {"message": "user", "reply": "assistant", "injection": f"OPERATOR {m.operator}",
               "paused": "assistant (paused)", "blocked": "assistant (blocked)", "error": "assistant (error)"}[m.kind]
        marks = ""
        if m.status == "cancelled":
            marks += " [cancelled]"
        if m.flagged:
            marks += " [flagged" + (f", reviewed by {m.reviewed_by}" if m.reviewed_by else "") + "]"
        if m.execution_id:
            marks += f" (execution {m.execution_id})"
        print(f"#{m.seq} {_when(m.created_at)} {who}{marks}: {m.content}")
        for e in m.events:
            excerpt = f" — {e['excerpt']}" if e.get("excerpt") else ""
            print(f"    guardrail '{e['rule']}' ({e['direction']}, {e['action']}, {e['matches']}×){excerpt}")
    trail = conversations.list_interventions(pool, args.user)
    if trail:
        print("\naudit trail:")
        for i in trail:
            print(f"  {_when(i.created_at)} {i.operator} {i.action}" + (f": {i.reason}" if i.reason else "")
                  + (f" {json.dumps(i.detail, ensure_ascii=False)}" if i.detail else ""))
    return 0


def _send(args: argparse.Namespace, settings: Settings) -> int:
    params = {k: v for k, v in (("max_tokens", args.max_tokens), ("seed", args.seed),
                                ("temperature", args.temperature)) if v is not None}
    pool = db.get_pool(settings)
    backend = llm.get_backend(settings)
    with conversations.stream_message(pool, backend, settings, args.user, args.text, params=params) as stream:
        for chunk in stream:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    print()
    reply = stream.reply
    if reply.status == "error":  # the user got the safe error reply; the operator gets the reason and a failure
        print(f"promptdev: the reply failed: {reply.error or 'unknown error'} (execution {reply.execution_id})",
              file=sys.stderr)
        return 1
    if reply.status != "ok":
        print(f"[{reply.status}]" + (f" {reply.error}" if reply.error else ""), file=sys.stderr)
    return 0


def _halt(args: argparse.Namespace, settings: Settings) -> int:
    conversations.halt_conversation(db.get_pool(settings), args.user, args.reason, _operator(args))
    print(f"halted the conversation of {args.user}")
    return 0


def _resume(args: argparse.Namespace, settings: Settings) -> int:
    conversations.resume_conversation(db.get_pool(settings), args.user, _operator(args))
    print(f"resumed the conversation of {args.user}")
    return 0


def _inject(args: argparse.Namespace, settings: Settings) -> int:
    message_id = conversations.inject_message(db.get_pool(settings), args.user, args.text, _operator(args))
    print(f"injected message {message_id}; the AI sees it from its next turn")
    return 0


def _assign(args: argparse.Namespace, settings: Settings) -> int:
    if args.default == bool(args.template):
        fail("give a template name, or --default to return to the configured default")
    conv = conversations.assign_template(db.get_pool(settings), args.user, None if args.default else args.template,
                                         label=args.label, version=args.version, operator=_operator(args))
    print(f"{args.user} now uses {conv.template_spec or settings.default_template + ' (default)'}")
    return 0


def _memory_show(args: argparse.Namespace, settings: Settings) -> int:
    memory = conversations.get_memory(db.get_pool(settings), args.user)
    if not memory:
        print(f"no memory for {args.user}")
    for key, value in memory.items():
        print(f"{key} = {json.dumps(value, ensure_ascii=False)}")
    return 0


def _memory_set(args: argparse.Namespace, settings: Settings) -> int:
    value = args.value if args.string else conversations.parse_json_value(args.value)
    conversations.set_memory(db.get_pool(settings), args.user, args.key, value, operator=_operator(args))
    print(f"{args.user}: {args.key} = {json.dumps(value, ensure_ascii=False)}")
    return 0


def _memory_delete(args: argparse.Namespace, settings: Settings) -> int:
    conversations.delete_memory(db.get_pool(settings), args.user, args.key, operator=_operator(args))
    print(f"{args.user}: deleted {args.key}")
    return 0


def _flagged(args: argparse.Namespace, settings: Settings) -> int:
    pool = db.get_pool(settings)
    if args.review is not None:
        conversations.mark_reviewed(pool, args.review, _operator(args))
        print(f"message {args.review} marked reviewed")
        return 0
    rows = conversations.flagged_messages(pool, include_reviewed=args.all)
    if not rows:
        print("no flagged messages")
        return 0
    print(table(("ID", "USER", "#", "ROLE", "RULES", "WHEN", "REVIEWED", "MESSAGE"),
                [(r.id, r.user_id, r.seq, r.role, ", ".join(r.rules), _when(r.created_at), r.reviewed_by or "",
                  _one_line(r.content, 60)) for r in rows], rule=True))
    return 0


def _purge(args: argparse.Namespace, settings: Settings) -> int:
    days = args.older_than_days if args.older_than_days is not None else settings.retention_days
    if not days:
        fail("give --older-than-days N (or set PROMPTDEV_RETENTION_DAYS)")
    counts = conversations.purge_conversations(db.get_pool(settings), days, operator=_operator(args))
    print(f"deleted {counts['conversations']} conversation(s) idle for more than {days} day(s): "
          f"{counts['messages']} message(s), {counts['memory']} memory key(s)")
    return 0


# ---- guardrails --------------------------------------------------------------------------------------------------

def _rules(args: argparse.Namespace, settings: Settings) -> int:
    rules = guardrails.list_rules(db.get_pool(settings))
    if not rules:
        print("no guardrail rules")
        return 0
    print(table(("NAME", "DETECTS", "SCOPE", "DIRECTION", "ACTION", "ENABLED"),
                [(r.name, _one_line(r.describe(), 50), r.scope, r.direction, r.action, "yes" if r.enabled else "no")
                 for r in rules], rule=True))
    return 0


def _rule_add(args: argparse.Namespace, settings: Settings) -> int:
    rule = guardrails.create_rule(
        db.get_pool(settings), args.name, args.kind, words=args.words, pattern=args.pattern, max_length=args.max_length,
        template_name=args.template, direction=args.direction, action=args.action, replacement=args.replacement,
        created_by=_operator(args))
    print(f"added rule {rule.name!r}: {rule.describe()} · {rule.scope} · {rule.direction} · {rule.action}")
    return 0


def _rule_delete(args: argparse.Namespace, settings: Settings) -> int:
    guardrails.delete_rule(db.get_pool(settings), args.name)
    print(f"deleted rule {args.name!r}")
    return 0


def _rule_enable(args: argparse.Namespace, settings: Settings) -> int:
    guardrails.set_enabled(db.get_pool(settings), args.name, args.enable)
    print(f"rule {args.name!r} {'enabled' if args.enable else 'disabled'}")
    return 0


def _events(args: argparse.Namespace, settings: Settings) -> int:
    events = guardrails.list_events(db.get_pool(settings), user_id=args.user, rule_name=args.rule, limit=args.limit)
    if not events:
        print("no guardrail events")
        return 0
    print(table(("WHEN", "RULE", "DIRECTION", "ACTION", "MATCHES", "USER", "MESSAGE", "EXECUTION", "EXCERPT"),
                [(_when(e.created_at), e.rule_name, e.direction, e.action, e.matches, e.user_id or "",
                  e.message_id or "", e.execution_id or "", _one_line(e.excerpt or "", 40)) for e in events],
                rule=True))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `conversations` and `guardrails` to the promptdev command."""
    op_help = "who acts (default: $PROMPTDEV_OPERATOR or your login name)"
    conv = subparsers.add_parser("conversations", help="watch and step into end-user conversations")
    sub = conv.add_subparsers(dest="conversations_command", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="every conversation with its state, message and flagged counts")
    p.add_argument("--state", choices=conversations.STATES)
    p.add_argument("--search", help="part of a user id")
    p.add_argument("--flagged", action="store_true", help="only conversations with unreviewed flagged messages")
    p.add_argument("--sort", choices=sorted(conversations.SORTS), default="last_activity")
    p.add_argument("--asc", action="store_true", help="ascending order")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="a conversation: messages, guardrail events, memory and audit trail")
    p.add_argument("user")
    p.add_argument("--last", type=int, help="only the newest N messages")
    p.set_defaults(func=_show)

    p = sub.add_parser("send", help="send a message as a user and print the streamed reply")
    p.add_argument("user")
    p.add_argument("text")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_send)

    p = sub.add_parser("halt", help="halt a conversation: the model stops answering from the next message")
    p.add_argument("user")
    p.add_argument("--reason", required=True)
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_halt)

    p = sub.add_parser("resume", help="resume a halted conversation")
    p.add_argument("user")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_resume)

    p = sub.add_parser("inject", help="add an operator message the AI sees from its next turn")
    p.add_argument("user")
    p.add_argument("text")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_inject)

    p = sub.add_parser("assign", help="put a user's conversation on a template (name, label or version)")
    p.add_argument("user")
    p.add_argument("template", nargs="?")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--label")
    group.add_argument("--version", type=int)
    p.add_argument("--default", action="store_true", help="return to the configured default template")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_assign)

    mem = sub.add_parser("memory", help="a user's key-value memory (JSON values)")
    msub = mem.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    p = msub.add_parser("show", help="every key and value")
    p.add_argument("user")
    p.set_defaults(func=_memory_show)
    p = msub.add_parser("set", help="set a key to a JSON value")
    p.add_argument("user")
    p.add_argument("key")
    p.add_argument("value", help='JSON, e.g. \'"Alice"\', 42, \'["tea"]\' (or plain text with --string)')
    p.add_argument("--string", action="store_true", help="store the value as text, not JSON")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_memory_set)
    p = msub.add_parser("delete", help="delete a key")
    p.add_argument("user")
    p.add_argument("key")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_memory_delete)

    p = sub.add_parser("flagged", help="messages flagged for review (or mark one reviewed)")
    p.add_argument("--all", action="store_true", help="include reviewed ones")
    p.add_argument("--review", type=int, metavar="MESSAGE_ID", help="mark a flagged message reviewed")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_flagged)

    p = sub.add_parser("purge", help="delete conversations idle for more than N days, with their memory")
    p.add_argument("--older-than-days", type=int, help="default: PROMPTDEV_RETENTION_DAYS")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_purge)

    gr = subparsers.add_parser("guardrails", help="rules checked on chat input and output, and their hits")
    gsub = gr.add_subparsers(dest="guardrails_command", required=True, metavar="ACTION")
    p = gsub.add_parser("list", help="every rule")
    p.set_defaults(func=_rules)
    p = gsub.add_parser("add", help="add a rule (a broken regular expression is refused with the reason)")
    p.add_argument("name")
    p.add_argument("--kind", required=True, choices=list(guardrails.KINDS))
    p.add_argument("--words", help="words/phrases, comma-separated (kind words)")
    p.add_argument("--pattern", help="a Python regular expression (kind regex)")
    p.add_argument("--max-length", type=int, help="characters (kind max_length)")
    p.add_argument("--template", help="only conversations on this template (default: every conversation)")
    p.add_argument("--direction", choices=guardrails.DIRECTIONS, default="both")
    p.add_argument("--action", choices=guardrails.ACTIONS, default="block")
    p.add_argument("--replacement", help="text that replaces a match when the action is redact")
    p.add_argument("--operator", help=op_help)
    p.set_defaults(func=_rule_add)
    p = gsub.add_parser("delete", help="delete a rule (its recorded events stay)")
    p.add_argument("name")
    p.set_defaults(func=_rule_delete)
    for name, enable in (("enable", True), ("disable", False)):
        p = gsub.add_parser(name, help=f"{name} a rule")
        p.add_argument("name")
        p.set_defaults(func=_rule_enable, enable=enable)
    p = gsub.add_parser("events", help="recorded rule hits, newest first")
    p.add_argument("--user")
    p.add_argument("--rule")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_events)
