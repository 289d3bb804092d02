"""Monitor: operators watch every conversation live and step in — halt with a reason, resume, inject a message the
AI sees from its next turn, edit a user's memory, assign a template — with every intervention in an audit trail.
Also: flagged messages for review, guardrail rules and their hits, and retention."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

import altair as alt
import pandas as pd
import streamlit as st

from core import conversations, guardrails, templates
from core.errors import InvalidInput
from pages import glue, widgets
from pages.widgets import code_span, md, safe_md

# Session-state and widget keys.
KEY_TAB = "monitor.tab"
KEY_SEARCH = "monitor.search"
KEY_STATE = "monitor.state"
KEY_SORT = "monitor.sort"
KEY_FLAGGED_ONLY = "monitor.flagged_only"
KEY_LIVE = "monitor.live"
KEY_USER = "monitor.user"
KEY_HALT_REASON = "monitor.halt_reason"
KEY_HALT = "monitor.halt"
KEY_RESUME = "monitor.resume"
KEY_INJECT_TEXT = "monitor.inject_text"
KEY_INJECT = "monitor.inject"
KEY_MEM_KEY = "monitor.memory_key"
KEY_MEM_VALUE = "monitor.memory_value"
KEY_MEM_SET = "monitor.memory_set"
KEY_MEM_DEL_KEY = "monitor.memory_delete_key"
KEY_MEM_DEL = "monitor.memory_delete"
KEY_TPL_NAME = "monitor.template_name"
KEY_TPL_SELECTOR = "monitor.template_selector"
KEY_TPL_ASSIGN = "monitor.template_assign"
KEY_REVIEW_SELECT = "monitor.review_select"
KEY_REVIEW = "monitor.review"
KEY_RULE_NAME = "monitor.rule_name"
KEY_RULE_KIND = "monitor.rule_kind"
KEY_RULE_WORDS = "monitor.rule_words"
KEY_RULE_PATTERN = "monitor.rule_pattern"
KEY_RULE_MAX = "monitor.rule_max_length"
KEY_RULE_SCOPE = "monitor.rule_scope"
KEY_RULE_DIRECTION = "monitor.rule_direction"
KEY_RULE_ACTION = "monitor.rule_action"
KEY_RULE_REPLACEMENT = "monitor.rule_replacement"
KEY_RULE_ADD = "monitor.rule_add"
KEY_RULE_SELECT = "monitor.rule_select"
KEY_RULE_TOGGLE = "monitor.rule_toggle"
KEY_RULE_DELETE = "monitor.rule_delete"
KEY_PURGE_DAYS = "monitor.purge_days"
KEY_PURGE_CONFIRM = "monitor.purge_confirm"
KEY_PURGE = "monitor.purge"

TABS = ("Conversations", "Flagged", "Guardrails", "Retention")
REFRESH_S = 2
USERS_LISTED = 1000  # conversations offered in the picker (most recently active first)
MESSAGES_SHOWN = 300  # newest messages in the conversation view
ALL = "All"
GLOBAL_SCOPE = "Every conversation"
DEFAULT_TEMPLATE = "(configured default)"
SORT_OPTIONS = {"Last activity": ("last_activity", True), "User id": ("user", False), "Messages": ("messages", True),
                "Flagged": ("flagged", True), "Guardrail events": ("events", True), "State": ("state", False)}
STATE_BADGE = {"active": "🟢 active", "halted": "🛑 halted"}
NOTICE = {"paused": "⏸️ ", "blocked": "🛡️ ", "error": "⚠️ "}


def when(ts) -> str:
    """A timestamp in local time, to the second."""
    return ts.astimezone().strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def act(fn: Callable[[], Any], done: str | Callable[[Any], str], clear: tuple[str, ...] = ()) -> None:
    """Run an operator action from a widget callback; its outcome (or its error) shows on the next run."""
    try:
        result = fn()
    except Exception as exc:
        widgets.flash_error(exc)
        return
    widgets.flash("success", done(result) if callable(done) else done)
    for key in clear:
        ss[key] = False if isinstance(ss.get(key), bool) else ""


# ---- conversations ------------------------------------------------------------------------------------------------

def activity_chart(activity: list[dict[str, Any]]) -> alt.Chart:
    """Messages per hour over the last 24 hours (every hour shown, local time), stacked by sender."""
    local = datetime.now().astimezone().tzinfo
    hours = pd.date_range(end=pd.Timestamp.now(tz=local).floor("h"), periods=24, freq="h")
    labels = [h.strftime("%H:00") for h in hours]
    df = pd.DataFrame(activity)
    df["hour"] = pd.to_datetime(df["hour"], utc=True).dt.tz_convert(local)
    df = df[df["hour"] >= hours[0]].assign(label=lambda d: d["hour"].dt.strftime("%H:00"))
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("label:O", title="Hour", scale=alt.Scale(domain=labels), axis=alt.Axis(labelAngle=0)),
        y=alt.Y("messages:Q", title="Messages"), color=alt.Color("sender:N", title="From"),
        tooltip=[alt.Tooltip("label:O", title="Hour"), alt.Tooltip("sender:N", title="From"),
                 alt.Tooltip("messages:Q", title="Messages")],
    ).properties(height=160, title="Messages in the last 24 hours")


def show_message(m: conversations.Message) -> None:
    """One message, marking injections, notices, flags and guardrail events."""
    if m.is_injection:
        with st.chat_message("operator", avatar="🛠️"):
            st.markdown(md("**Operator injection** by {}", m.operator))
            st.text(m.content)
    else:
        with st.chat_message("user" if m.role == "user" else "assistant"):
            st.text(NOTICE.get(m.kind, "") + (m.content or "(empty)"))
    notes = [md("#{} · {}", m.seq, when(m.created_at))]
    if m.status and m.status != "ok":
        notes.append(safe_md(m.status))
    if m.execution_id:
        notes.append(md("execution {}", m.execution_id))
    if m.flagged:
        notes.append("🚩 flagged" + (md(" (reviewed by {})", m.reviewed_by) if m.reviewed_by else ""))
    st.caption(" · ".join(notes))
    for e in m.events:
        excerpt = md(" — “{}”", e["excerpt"]) if e.get("excerpt") else ""
        st.caption(md("🛡️ guardrail **{}** · {} · {} · {}×", e["rule"], e["direction"], e["action"], e["matches"])
                   + excerpt)


def overview(filters: dict[str, Any], known_users: int | None) -> None:
    """Figures, the list of conversations and recent activity (a fragment: refreshes itself)."""
    with glue.reported():
        sort, descending = SORT_OPTIONS[filters["sort"]]
        rows = conversations.list_conversations(pool, state=None if filters["state"] == ALL else filters["state"],
                                                search=filters["search"], flagged_only=filters["flagged_only"],
                                                sort=sort, descending=descending)
        figures = conversations.overview_figures(pool)
        if known_users is not None and known_users < USERS_LISTED and figures["Users"] != known_users:
            st.rerun()  # a user appeared (or was purged): refresh the whole page so the picker offers them
        for col, (label, value) in zip(st.columns(len(figures)), figures.items()):
            col.metric(label, f"{value:,}")
        if not rows:
            st.info("No conversation matches." if (filters["search"] or filters["state"] != ALL
                                                   or filters["flagged_only"])
                    else "No conversations yet: they appear here as soon as a user sends a message on Chat.")
            return
        st.dataframe(pd.DataFrame([{
            "User": r.user_id, "State": STATE_BADGE[r.state], "Messages": r.message_count,
            "Flagged": r.flagged_count, "Guardrail events": r.event_count, "Last activity": r.last_activity,
            "Template": r.last_template or r.template_spec or f"{settings.default_template} (default)",
            "Assigned": r.template_spec or "default", "Last message": r.last_message or "",
        } for r in rows]), hide_index=True, width="stretch", column_config={
            "Last activity": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "Flagged": st.column_config.NumberColumn(help="Flagged messages not yet reviewed"),
            "Template": st.column_config.TextColumn(help="The template version of the latest reply"),
        })
        activity = conversations.message_activity(pool, hours=24)
        if activity:
            st.altair_chart(activity_chart(activity), width="stretch")


def conversation_view(user_id: str, shown_state: str | None) -> None:
    """Every message with injections and guardrail events marked, and the audit trail (a fragment: refreshes
    itself)."""
    with glue.reported():
        conv = conversations.get_conversation(pool, user_id)
        if conv.state != shown_state:
            st.rerun()  # halted by a guardrail or another operator: offer Resume instead of Halt
        head, badge = st.columns([4, 1])
        head.subheader(safe_md(user_id))
        with badge:
            if conv.halted:
                st.badge("Halted", icon=":material/pause_circle:", color="red")
            else:
                st.badge("Active", icon=":material/play_circle:", color="green")
        if conv.halted:
            st.warning(md("Halted by {} at {}: {}", conv.halted_by, when(conv.halted_at), conv.halted_reason))
        st.caption(md("Template: {} · started {} · last activity {}",
                      conv.template_spec or settings.default_template + " (configured default)",
                      when(conv.created_at), when(conv.last_activity)))
        messages = conversations.list_messages(pool, user_id, limit=MESSAGES_SHOWN)
        if len(messages) == MESSAGES_SHOWN:
            st.caption(f"Showing the latest {MESSAGES_SHOWN} messages; "
                       f"{code_span(f'promptdev conversations show {user_id}')} prints them all.")
        with st.container(height=460):
            if not messages:
                st.caption("No messages yet.")
            for m in messages:
                show_message(m)
        st.markdown("**Audit trail**")
        trail = conversations.list_interventions(pool, user_id)
        if trail:
            st.dataframe(pd.DataFrame([{
                "Time": when(i.created_at), "Operator": i.operator, "Action": i.action, "Reason": i.reason,
                "Detail": json.dumps(i.detail, ensure_ascii=False) if i.detail else "",
            } for i in trail]), hide_index=True, width="stretch")
        else:
            st.caption("No interventions yet.")


def intervene(user: str, conv: conversations.Conversation) -> None:
    """Halt or resume, inject a message, assign a template."""
    st.markdown("**Intervene**")
    if conv.halted:
        st.button("Resume", key=KEY_RESUME, type="primary", on_click=act, args=(
            lambda: conversations.resume_conversation(pool, user, operator), md("Resumed {}.", user)))
    else:
        st.text_input("Reason for the halt", key=KEY_HALT_REASON, placeholder="why the model must stop answering")
        st.button("Halt", key=KEY_HALT, type="primary", on_click=act, args=(
            lambda: conversations.halt_conversation(pool, user, ss.get(KEY_HALT_REASON, ""), operator),
            md("Halted {}: the next message gets the paused reply.", user), (KEY_HALT_REASON,)))
    st.text_area("Inject a message the AI sees from its next turn", key=KEY_INJECT_TEXT, height=80)
    st.button("Inject", key=KEY_INJECT, on_click=act, args=(
        lambda: conversations.inject_message(pool, user, ss.get(KEY_INJECT_TEXT, ""), operator),
        "Injected: the AI sees it from its next turn.", (KEY_INJECT_TEXT,)))

    with st.expander("Template"):
        names = [DEFAULT_TEMPLATE]
        with glue.reported():
            names += templates.template_names(pool)
        current = conv.template_name if conv.template_name in names else DEFAULT_TEMPLATE
        st.selectbox("Template", names, index=names.index(current), key=KEY_TPL_NAME)
        st.text_input("Label or version", key=KEY_TPL_SELECTOR,
                      placeholder="empty: production, else latest · a label · a version number")

        def assign() -> None:
            name = ss.get(KEY_TPL_NAME)
            selector = (ss.get(KEY_TPL_SELECTOR) or "").strip()
            label, version = (None, int(selector)) if selector.isdigit() else (selector or None, None)
            conversations.assign_template(pool, user, None if name == DEFAULT_TEMPLATE else name,
                                          label=label, version=version, operator=operator)

        st.button("Assign", key=KEY_TPL_ASSIGN, on_click=act, args=(assign, "Template assigned."))


def memory_panel(user: str) -> None:
    """The user's memory: view, set and delete keys."""
    st.markdown("**Memory**")
    memory = conversations.get_memory(pool, user)
    if memory:
        st.dataframe(pd.DataFrame([{"Key": k, "Value": json.dumps(v, ensure_ascii=False)}
                                   for k, v in memory.items()]), hide_index=True, width="stretch")
    else:
        st.caption("No memory yet.")
    k, v = st.columns(2)
    k.text_input("Key", key=KEY_MEM_KEY, placeholder="favourite_food")
    v.text_input("Value (JSON)", key=KEY_MEM_VALUE, placeholder='"tea", 42, ["a", "b"]')
    st.button("Set", key=KEY_MEM_SET, on_click=act, args=(
        lambda: conversations.set_memory(pool, user, ss.get(KEY_MEM_KEY, ""),
                                         conversations.parse_json_value(ss.get(KEY_MEM_VALUE, "")),
                                         operator=operator),
        "Memory saved.", (KEY_MEM_KEY, KEY_MEM_VALUE)))
    if memory:
        st.selectbox("Key to delete", list(memory), key=KEY_MEM_DEL_KEY)
        st.button("Delete", key=KEY_MEM_DEL, on_click=act, args=(
            lambda: conversations.delete_memory(pool, user, ss.get(KEY_MEM_DEL_KEY), operator=operator),
            "Memory key deleted."))


def conversations_tab(refresh: int | None) -> None:
    """Filters, the overview, and the chosen conversation with what an operator can do to it."""
    c1, c2, c3, c4 = st.columns([3, 2, 2, 1.5], vertical_alignment="bottom")
    filters = {"search": c1.text_input("Search user id", key=KEY_SEARCH, placeholder="part of a user id"),
               "state": c2.selectbox("State", [ALL, *conversations.STATES], key=KEY_STATE),
               "sort": c3.selectbox("Sort by", list(SORT_OPTIONS), key=KEY_SORT),
               "flagged_only": c4.checkbox("Flagged only", key=KEY_FLAGGED_ONLY)}
    all_users: list[str] | None = None
    with glue.reported():
        all_users = [r.user_id for r in conversations.list_conversations(pool, sort="last_activity",
                                                                          limit=USERS_LISTED)]
    st.fragment(overview, run_every=refresh)(filters, None if all_users is None else len(all_users))
    if not all_users:
        return
    st.divider()
    if ss.get(KEY_USER) not in all_users:
        ss.pop(KEY_USER, None)
    user = st.selectbox("Conversation", all_users, key=KEY_USER, help="Most recently active first")
    conv = conversations.find_conversation(pool, user)
    st.fragment(conversation_view, run_every=refresh)(user, conv.state if conv is not None else None)
    if conv is not None:
        left, right = st.columns(2)
        with left:
            intervene(user, conv)
        with right:
            memory_panel(user)


# ---- flagged ------------------------------------------------------------------------------------------------------

def flagged_view() -> None:
    """Messages flagged for review (a fragment: refreshes itself)."""
    with glue.reported():
        rows = conversations.flagged_messages(pool)
        if not rows:
            st.info("No flagged messages waiting for review.")
            return
        st.dataframe(pd.DataFrame([{
            "Id": r.id, "User": r.user_id, "#": r.seq, "From": r.role, "Rules": ", ".join(r.rules),
            "When": when(r.created_at), "Message": r.content, "Execution": r.execution_id,
        } for r in rows]), hide_index=True, width="stretch")


def flagged_tab(refresh: int | None) -> None:
    """Flagged messages, and marking one reviewed."""
    st.fragment(flagged_view, run_every=refresh)()
    pending = []
    with glue.reported():
        pending = conversations.flagged_messages(pool)
    if pending:
        labels = {f"#{r.id} · {r.user_id} · {r.content[:60]}": r.id for r in pending}
        choice = st.selectbox("Flagged message", list(labels), key=KEY_REVIEW_SELECT)
        st.button("Mark reviewed", key=KEY_REVIEW, on_click=act, args=(
            lambda: conversations.mark_reviewed(pool, labels[ss.get(KEY_REVIEW_SELECT, choice)], operator),
            "Marked reviewed."))


# ---- guardrails ---------------------------------------------------------------------------------------------------

def rules_table() -> None:
    """The rules, and enabling, disabling or deleting one."""
    rules = []
    with glue.reported():
        rules = guardrails.list_rules(pool)
    if not rules:
        st.info("No guardrail rules yet.")
        return
    st.dataframe(pd.DataFrame([{
        "Name": r.name, "Detects": r.describe(), "Scope": r.scope, "Direction": r.direction, "Action": r.action,
        "Enabled": r.enabled, "Created by": r.created_by, "Created": when(r.created_at),
    } for r in rules]), hide_index=True, width="stretch")
    m1, m2, m3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    chosen = m1.selectbox("Rule", [r.name for r in rules], key=KEY_RULE_SELECT)
    chosen_rule = next(r for r in rules if r.name == chosen)
    m2.button("Disable" if chosen_rule.enabled else "Enable", key=KEY_RULE_TOGGLE, on_click=act, args=(
        lambda: guardrails.set_enabled(pool, chosen, not chosen_rule.enabled),
        md("Rule {!r} {}.", chosen, "disabled" if chosen_rule.enabled else "enabled")))
    m3.button("Delete", key=KEY_RULE_DELETE, on_click=act, args=(
        lambda: guardrails.delete_rule(pool, chosen), md("Rule {!r} deleted (its events stay).", chosen)))


def new_rule_form() -> None:
    """A new rule: what it detects, where, in which direction, and what it does."""
    st.subheader("New rule")
    a, b = st.columns(2)
    a.text_input("Name", key=KEY_RULE_NAME, placeholder="no-swearing")
    kind = b.selectbox("Detects", list(guardrails.KINDS), format_func=guardrails.KINDS.get, key=KEY_RULE_KIND)
    if kind == "words":
        st.text_area("Blocked words or phrases (comma or one a line)", key=KEY_RULE_WORDS, height=80)
    elif kind == "regex":
        st.text_input("Regular expression (Python syntax)", key=KEY_RULE_PATTERN, placeholder=r"(?i)\bcancel\b")
    elif kind == "max_length":
        st.number_input("Maximum length (characters)", min_value=1, value=2000, step=100, key=KEY_RULE_MAX)
    d, e, f = st.columns(3)
    scopes = [GLOBAL_SCOPE]
    with glue.reported():
        scopes += templates.template_names(pool)
    d.selectbox("Scope", scopes, key=KEY_RULE_SCOPE)
    e.selectbox("Direction", guardrails.DIRECTIONS, index=2, key=KEY_RULE_DIRECTION)
    action = f.selectbox("Action", guardrails.ACTIONS, key=KEY_RULE_ACTION,
                         help="block: a safe reply · redact: replace matches · flag: allow, mark for review · "
                              "halt: halt the conversation")
    if action == "redact":
        st.text_input("Replacement", key=KEY_RULE_REPLACEMENT,
                      placeholder=guardrails.DEFAULT_REPLACEMENTS.get(kind, "[redacted]"))

    def add_rule() -> None:
        rule_kind = ss.get(KEY_RULE_KIND)
        scope = ss.get(KEY_RULE_SCOPE)
        guardrails.create_rule(
            pool, ss.get(KEY_RULE_NAME, ""), rule_kind,
            words=ss.get(KEY_RULE_WORDS) if rule_kind == "words" else None,
            pattern=ss.get(KEY_RULE_PATTERN) if rule_kind == "regex" else None,
            max_length=ss.get(KEY_RULE_MAX) if rule_kind == "max_length" else None,
            template_name=None if scope in (None, GLOBAL_SCOPE) else scope,
            direction=ss.get(KEY_RULE_DIRECTION), action=ss.get(KEY_RULE_ACTION),
            replacement=(ss.get(KEY_RULE_REPLACEMENT) or None) if ss.get(KEY_RULE_ACTION) == "redact" else None,
            created_by=operator)

    st.button("Add rule", key=KEY_RULE_ADD, type="primary", on_click=act, args=(
        add_rule, "Rule added.", (KEY_RULE_NAME, KEY_RULE_WORDS, KEY_RULE_PATTERN)))


def recent_events() -> None:
    """The latest guardrail events."""
    st.subheader("Recent guardrail events")
    with glue.reported():
        events = guardrails.list_events(pool, limit=200)
        if events:
            st.dataframe(pd.DataFrame([{
                "When": when(e.created_at), "Rule": e.rule_name, "Direction": e.direction, "Action": e.action,
                "Matches": e.matches, "User": e.user_id, "Message": e.message_id, "Execution": e.execution_id,
                "Excerpt": e.excerpt or "",
            } for e in events]), hide_index=True, width="stretch")
        else:
            st.caption("No rule has matched yet.")


def guardrails_tab() -> None:
    """Guardrail rules and their recent hits."""
    rules_table()
    new_rule_form()
    recent_events()


# ---- retention ----------------------------------------------------------------------------------------------------

def retention_tab() -> None:
    """The retention schedule, a manual purge with confirmation, and recent purges."""
    if settings.retention_days > 0:
        st.markdown(f"Scheduled: every hour the worker deletes conversations idle for more than "
                    f"**{settings.retention_days} days**, with their memory.")
    else:
        st.markdown("No schedule: set `PROMPTDEV_RETENTION_DAYS` to delete old conversations every hour.")
    st.number_input("Delete conversations idle for more than (days)", min_value=1,
                    value=settings.retention_days or 30, step=1, key=KEY_PURGE_DAYS)
    st.checkbox("I understand the conversations, their memory, guardrail events and audit trail are deleted",
                key=KEY_PURGE_CONFIRM)

    def purge() -> dict[str, int]:
        if not ss.get(KEY_PURGE_CONFIRM):
            raise InvalidInput("tick the confirmation first")
        return conversations.purge_conversations(pool, int(ss.get(KEY_PURGE_DAYS)), operator=operator)

    st.button("Delete old conversations", key=KEY_PURGE, on_click=act, args=(
        purge, lambda c: f"Deleted {c['conversations']} conversation(s), {c['messages']} message(s) and "
                         f"{c['memory']} memory key(s).", (KEY_PURGE_CONFIRM,)))
    with glue.reported():
        purges = conversations.list_purges(pool)
        if purges:
            st.markdown("**Recent purges**")
            st.dataframe(pd.DataFrame([{
                "When": when(p["ran_at"]), "Trigger": p["trigger"], "Operator": p["operator"],
                "Older than (days)": p["older_than_days"], "Conversations": p["conversations"],
                "Messages": p["messages"], "Memory keys": p["memory"],
            } for p in purges]), hide_index=True, width="stretch")


# ---- page ---------------------------------------------------------------------------------------------------------

st.title("Monitor")
settings = glue.settings()
pool = glue.pool()
operator = glue.current_user()
ss = st.session_state
widgets.carry_over()

note, toggle = st.columns([5, 1], vertical_alignment="bottom")
live = toggle.toggle("Live", value=True, key=KEY_LIVE, help=f"Refresh every {REFRESH_S} s while this page is open")
refresh = REFRESH_S if live else None

tab, container = widgets.open_tab(TABS, KEY_TAB)
with container:
    if tab == "Conversations":
        conversations_tab(refresh)
    elif tab == "Flagged":
        flagged_tab(refresh)
    elif tab == "Guardrails":
        guardrails_tab()
    else:
        retention_tab()
