"""Conversations on the real model and database: the flow of one message, memory, halt / resume / inject,
concurrency, streaming, context trimming, retention and the dashboard figures."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace

import pytest

from core import conversations, executions, status, templates
from core.errors import InvalidInput

FAST = {"max_tokens": 6, "temperature": 0.0, "seed": 7}
TINY = {"max_tokens": 2, "temperature": 0.0, "seed": 1}


def ledger_text(pool, execution_id: int) -> str:
    return "\n".join(m["content"] for m in executions.get_execution(pool, execution_id).messages)


# ---- the flow of one message ---------------------------------------------------------------------------------------

def test_first_chat_creates_the_default_template_and_records_everything(pool, backend, settings):
    reply = conversations.send_message(pool, backend, settings, "ann", "Hello, who are you?", params=FAST)
    assert reply.status == "ok" and reply.text.strip()
    tv = templates.get_template_by_name(pool, settings.default_template)
    assert tv.version == 1 and "conversation_history" in tv.variables
    assert templates.get_labels(pool, "companion")["production"] == 1  # what conversations use by default
    row = executions.get_execution(pool, reply.execution_id)
    assert (row.source, row.user_id, row.status) == ("chat", "ann", "ok")
    assert (row.template_name, row.template_version, row.label) == ("companion", 1, "production")
    assert row.output == reply.text and row.params["max_tokens"] == 6
    assert row.messages[-1] == {"role": "user", "content": "Hello, who are you?"}
    user_msg, answer = conversations.list_messages(pool, "ann")
    assert (user_msg.seq, user_msg.role, user_msg.kind, user_msg.content) == (1, "user", "message", "Hello, who are you?")
    assert (answer.seq, answer.kind, answer.reply_to, answer.execution_id) == (2, "reply", user_msg.id, row.id)
    assert answer.content == reply.text and answer.status == "ok"


def test_history_is_in_the_next_turns_context(pool, backend, settings):
    first = conversations.send_message(pool, backend, settings, "bo", "My cat is called Biscuit.", params=FAST)
    second = conversations.send_message(pool, backend, settings, "bo", "What is my cat called?", params=FAST)
    context = ledger_text(pool, second.execution_id)
    assert "User: My cat is called Biscuit." in context and f"Assistant: {first.text}" in context
    assert second.context_messages == 2 and second.context_dropped == 0
    assert "What is my cat called?" not in executions.get_execution(pool, first.execution_id).messages[0]["content"]


def test_editing_the_default_template_does_not_change_live_chats_until_production_moves(pool, backend, settings):
    conversations.send_message(pool, backend, settings, "al", "hi", params=FAST)  # creates companion v1 (production)
    templates.update_template(pool, "companion", [{"role": "user", "content": "draft v2 {{ message }}"}])
    reply = conversations.send_message(pool, backend, settings, "al", "hello", params=FAST)
    row = executions.get_execution(pool, reply.execution_id)
    assert (row.template_version, row.label) == (1, "production") and "draft v2" not in str(row.messages)
    templates.set_label(pool, "companion", "production", 2)
    reply = conversations.send_message(pool, backend, settings, "al", "hello", params=FAST)
    row = executions.get_execution(pool, reply.execution_id)
    assert (row.template_version, row.label) == (2, "production") and row.messages == [
        {"role": "user", "content": "draft v2 hello"}]


def test_production_label_is_preferred_and_assignments_are_audited(pool, backend, settings):
    templates.create_template(pool, "companion", [{"role": "user", "content": "v1 {{ message }}"}])
    templates.update_template(pool, "companion", [{"role": "user", "content": "v2 {{ message }}"}])
    templates.set_label(pool, "companion", "production", 1)
    reply = conversations.send_message(pool, backend, settings, "cy", "hi", params=FAST)
    row = executions.get_execution(pool, reply.execution_id)
    assert (row.template_version, row.label) == (1, "production") and row.messages[0]["content"] == "v1 hi"

    conversations.assign_template(pool, "cy", "companion", version=2, operator="ops")
    reply = conversations.send_message(pool, backend, settings, "cy", "hi", params=FAST)
    assert executions.get_execution(pool, reply.execution_id).template_version == 2
    summary = conversations.list_conversations(pool)[0]
    assert summary.template_spec == "companion@2" and summary.last_template == "companion v2"
    with pytest.raises(LookupError, match="no version 9"):
        conversations.assign_template(pool, "cy", "companion", version=9, operator="ops")
    with pytest.raises(LookupError, match="no template named 'ghost'"):
        conversations.assign_template(pool, "cy", "ghost", operator="ops")
    trail = conversations.list_interventions(pool, "cy")
    assert [(i.action, i.operator, i.detail["to"]) for i in trail] == [("assign_template", "ops", "companion@2")]


def test_a_template_error_is_recorded_and_the_user_gets_a_safe_reply(pool, backend, settings):
    templates.create_template(pool, "broken", [{"role": "user", "content": "{{ message | length > 'x' }}"}])
    conversations.assign_template(pool, "dan", "broken", operator="ops")
    reply = conversations.send_message(pool, backend, settings, "dan", "hi", params=FAST)
    assert reply.status == "error" and reply.text == conversations.ERROR_REPLY and reply.error
    assert executions.get_execution(pool, reply.execution_id).status == "error"
    assert [m.kind for m in conversations.list_messages(pool, "dan")] == ["message", "error"]


def test_bad_input_is_refused_and_nothing_is_stored(pool, backend, settings):
    for user, text, params, message in [
        ("", "hi", None, "user id is required"),
        ("x" * 201, "hi", None, "at most 200"),
        ("ann", "   ", None, "message is empty"),
        ("ann", "x" * (conversations.MAX_MESSAGE_CHARS + 1), None, "longer than"),
        ("ann", "hi", {"max_tokens": 0}, "max_tokens"),
        ("ann", "hi", {"bogus": 1}, "unknown parameter"),
        ("ann", "hi\x00there", None, r"the message contains a NUL character \(\\x00\), which cannot be stored"),
    ]:
        with pytest.raises(conversations.ConversationError, match=message) as info:
            conversations.send_message(pool, backend, settings, user, text, params=params)
        assert "\n" not in str(info.value)  # one line
    assert conversations.list_conversations(pool) == []
    assert executions.list_executions(pool) == []


def test_api_errors_are_typed_and_leave_nothing_half_written(pool, backend, settings):
    with pytest.raises(conversations.ConversationNotFound, match="no conversation for user 'ghost'"):
        conversations.halt_conversation(pool, "ghost", "why", "ops")
    for call in (lambda: conversations.resume_conversation(pool, "ghost", "ops"),
                 lambda: conversations.inject_message(pool, "ghost", "hello", "ops"),
                 lambda: conversations.get_conversation(pool, "ghost"),
                 lambda: conversations.delete_memory(pool, "ghost", "name")):
        with pytest.raises(conversations.ConversationNotFound):
            call()
    assert conversations.list_conversations(pool) == []  # failed actions created nothing
    assert issubclass(conversations.ConversationNotFound, LookupError)
    assert issubclass(conversations.ConversationError, ValueError)

    conversations.send_message(pool, backend, settings, "tia", "hi", params=TINY)
    with pytest.raises(conversations.ConversationStateError, match="is not halted"):
        conversations.resume_conversation(pool, "tia", "ops")
    conversations.halt_conversation(pool, "tia", "check", "ops")
    with pytest.raises(conversations.ConversationStateError, match="already halted"):
        conversations.halt_conversation(pool, "tia", "again", "ops")
    with pytest.raises(conversations.ConversationError, match="injected message is empty"):
        conversations.inject_message(pool, "tia", " ", "ops")
    with pytest.raises(conversations.ConversationError, match="operator name is required"):
        conversations.inject_message(pool, "tia", "hello", " ")
    with pytest.raises(conversations.ConversationNotFound, match="no memory key 'nope'"):
        conversations.delete_memory(pool, "tia", "nope")
    with pytest.raises(conversations.ConversationError, match="memory key"):
        conversations.set_memory(pool, "tia", "bad key", 1, operator="ops")
    # only the successful halt is in the audit trail; no stray messages
    assert [i.action for i in conversations.list_interventions(pool, "tia")] == ["halt"]
    assert [m.kind for m in conversations.list_messages(pool, "tia")] == ["message", "reply"]
    assert conversations.get_memory(pool, "tia") == {}


def test_the_api_bound_to_a_workbench_has_the_issue_signatures(pool, backend, settings):
    import inspect

    api = conversations.connect(settings, backend=backend)
    expected = {"send_message": ["user_id", "text"], "stream_message": ["user_id", "text"],
                "halt_conversation": ["user_id", "reason", "operator"], "resume_conversation": ["user_id", "operator"],
                "inject_message": ["user_id", "text", "operator"], "get_memory": ["user_id"],
                "set_memory": ["user_id", "key", "value"], "delete_memory": ["user_id", "key"]}
    for name, params in expected.items():
        positional = [p.name for p in inspect.signature(getattr(api, name)).parameters.values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == params, name

    reply = api.send_message("una", "Hello!", params=TINY)
    assert isinstance(reply, conversations.Reply) and reply.status == "ok"
    with api.stream_message("una", "And again", params=TINY) as stream:
        streamed = "".join(stream)
    assert stream.reply.status == "ok" and streamed == stream.reply.text
    api.set_memory("una", "name", "Una")
    assert api.get_memory("una") == {"name": "Una"}
    api.delete_memory("una", "name")
    assert api.get_memory("una") == {}
    message_id = api.inject_message("una", "Be brief.", "ops")
    assert api.halt_conversation("una", "check", "ops").halted
    assert api.send_message("una", "hi?").paused
    assert not api.resume_conversation("una", "ops").halted
    after = api.send_message("una", "back", params=TINY)
    assert "Operator: Be brief." in ledger_text(pool, after.execution_id)
    assert message_id in [m.id for m in conversations.list_messages(pool, "una")]
    # settings from the environment when none are given
    assert conversations.connect(pool=pool).settings.default_template == settings.default_template


# ---- memory ------------------------------------------------------------------------------------------------------

def test_memory_is_json_and_reaches_the_template(pool, backend, settings):
    templates.create_template(pool, "mem", [
        {"role": "system", "content": "Known:\n{{ user_context }}\nFood: {{ favourite_food }}"},
        {"role": "user", "content": "{{ message }}"}])
    conversations.assign_template(pool, "eve", "mem", operator="ops")
    reply = conversations.send_message(pool, backend, settings, "eve", "hi", params=FAST)
    assert executions.get_execution(pool, reply.execution_id).messages[0]["content"] == "Known:\n\nFood: "

    conversations.set_memory(pool, "eve", "name", "Eve")
    conversations.set_memory(pool, "eve", "favourite_food", ["tea", "cake"], operator="ops")
    conversations.set_memory(pool, "eve", "age", 41)
    assert conversations.get_memory(pool, "eve") == {"age": 41, "favourite_food": ["tea", "cake"], "name": "Eve"}
    reply = conversations.send_message(pool, backend, settings, "eve", "hi", params=FAST)
    system = executions.get_execution(pool, reply.execution_id).messages[0]["content"]
    assert system == 'Known:\nage: 41\nfavourite_food: ["tea", "cake"]\nname: Eve\nFood: [\'tea\', \'cake\']'

    conversations.delete_memory(pool, "eve", "age", operator="ops")
    assert "age" not in conversations.get_memory(pool, "eve")
    with pytest.raises(LookupError, match="no memory key 'age'"):
        conversations.delete_memory(pool, "eve", "age")
    with pytest.raises(ValueError, match="reserved"):
        conversations.set_memory(pool, "eve", "message", "x")
    with pytest.raises(ValueError, match="memory key"):
        conversations.set_memory(pool, "eve", "9lives", "x")
    with pytest.raises(ValueError, match="JSON"):
        conversations.set_memory(pool, "eve", "k", {1, 2})
    with pytest.raises(ValueError, match="must be JSON"):
        conversations.parse_json_value("Alice")
    assert conversations.parse_json_value('{"a": [1, true]}') == {"a": [1, True]}
    # memory edits by an operator are audited, application writes are not
    assert [(i.action, i.detail["key"]) for i in conversations.list_interventions(pool, "eve")
            if i.action != "assign_template"] == [("set_memory", "favourite_food"), ("delete_memory", "age")]


def test_nul_characters_in_memory_are_refused_with_one_clear_line(pool):
    """PostgreSQL stores no NUL in text or jsonb ("unsupported Unicode escape sequence"): refused before it is sent,
    wherever it hides in the value, as the chat refuses it in a message."""
    conversations.set_memory(pool, "nel", "name", "Nel")
    for value, where in [("a\x00b", ""), (["tea", "ca\x00ke"], " at [1]"),
                         ({"pets": [{"name": "Rex\x00"}]}, ' at ["pets"][0]["name"]'),
                         ({"ok": 1, "b\x00d": 2}, ' at ["b\\u0000d"] (a key)'),
                         (conversations.parse_json_value('"x\\u0000y"'), "")]:
        with pytest.raises(conversations.ConversationError) as info:
            conversations.set_memory(pool, "nel", "name", value, operator="ops")
        assert str(info.value) == (f"the value of memory key 'name' contains a NUL character (\\x00){where}, "
                                   f"which cannot be stored")
        assert isinstance(info.value, InvalidInput) and "\x00" not in str(info.value)
    with pytest.raises(conversations.ConversationError, match="the operator name contains a NUL character"):
        conversations.set_memory(pool, "nel", "name", "Nel", operator="o\x00ps")
    with pytest.raises(conversations.ConversationError, match="the injected message contains a NUL character"):
        conversations.inject_message(pool, "nel", "be \x00 nice", "ops")
    assert conversations.get_memory(pool, "nel") == {"name": "Nel"}  # nothing changed
    assert conversations.list_interventions(pool, "nel") == []
    conversations.set_memory(pool, "nel", "name", "back\\u0000slash")  # the six characters, not a NUL: stored
    assert conversations.get_memory(pool, "nel") == {"name": "back\\u0000slash"}


# ---- halt / resume / inject ---------------------------------------------------------------------------------------

def test_halt_pauses_without_the_model_and_resume_restores(pool, backend, settings):
    conversations.send_message(pool, backend, settings, "fay", "hi", params=FAST)
    with pytest.raises(ValueError, match="reason"):
        conversations.halt_conversation(pool, "fay", "  ", "ops")
    with pytest.raises(ValueError, match="operator"):
        conversations.halt_conversation(pool, "fay", "abuse", "")
    with pytest.raises(LookupError, match="no conversation for user 'ghost'"):
        conversations.halt_conversation(pool, "ghost", "abuse", "ops")
    conv = conversations.halt_conversation(pool, "fay", "abusive language", "ops")
    assert conv.halted and conv.halted_by == "ops"
    with pytest.raises(ValueError, match="already halted"):
        conversations.halt_conversation(pool, "fay", "again", "ops2")

    paused = conversations.send_message(pool, backend, settings, "fay", "are you there?", params=FAST)
    assert paused.paused and paused.text == conversations.PAUSED_REPLY
    row = executions.get_execution(pool, paused.execution_id)
    assert row.status == "blocked" and row.model_name == "none" and "abusive language" in row.error

    conversations.resume_conversation(pool, "fay", "lead")
    with pytest.raises(ValueError, match="not halted"):
        conversations.resume_conversation(pool, "fay", "lead")
    back = conversations.send_message(pool, backend, settings, "fay", "hello again", params=FAST)
    assert back.status == "ok"
    # the paused exchange is not in the model's context
    assert "are you there?" not in ledger_text(pool, back.execution_id)
    trail = conversations.list_interventions(pool, "fay")
    assert [(i.action, i.operator, i.reason) for i in trail] == [
        ("halt", "ops", "abusive language"), ("resume", "lead", "")]
    assert trail[0].created_at <= trail[1].created_at


def test_injection_reaches_the_model_from_its_next_turn(pool, backend, settings):
    before = conversations.send_message(pool, backend, settings, "gus", "hi", params=FAST)
    message_id = conversations.inject_message(pool, "gus", "The user is a VIP; offer the gold plan.", "ops")
    after = conversations.send_message(pool, backend, settings, "gus", "what plans are there?", params=FAST)
    assert "gold plan" not in ledger_text(pool, before.execution_id)
    assert "Operator: The user is a VIP; offer the gold plan." in ledger_text(pool, after.execution_id)
    everything = conversations.list_messages(pool, "gus")
    injection = next(m for m in everything if m.id == message_id)
    assert injection.is_injection and injection.role == "system" and injection.operator == "ops"
    assert message_id not in [m.id for m in conversations.list_messages(pool, "gus", visible_to_user=True)]
    [audit] = conversations.list_interventions(pool, "gus")
    assert (audit.action, audit.operator, audit.message_id) == ("inject", "ops", message_id)


def test_a_halt_issued_mid_stream_stops_the_reply_and_the_next_one(pool, backend, settings):
    conversations.send_message(pool, backend, settings, "hal", "hi", params=TINY)
    stream = conversations.stream_message(pool, backend, settings, "hal", "Tell me a long story",
                                          params={"max_tokens": 40, "temperature": 0.0, "seed": 1})
    ex = ThreadPoolExecutor(1)
    try:
        with stream:
            first = next(stream)  # the model is busy streaming this reply
            assert first and backend.lock.locked()
            conversations.halt_conversation(pool, "hal", "operator watching", "ops")
            # the user sends again while the reply is still streaming: answered at once, without the model
            future = ex.submit(conversations.send_message, pool, backend, settings, "hal", "and then?", params=TINY)
            try:
                paused = future.result(timeout=30)
            except FutureTimeout:
                pytest.fail("the message sent after the halt waited for the model instead of being paused")
            rest = list(stream)
    finally:
        stream.close()  # releases the model should the halt have been ignored, so the test fails, not hangs
        ex.shutdown(wait=True)
    assert paused.paused and executions.get_execution(pool, paused.execution_id).model_name == "none"
    # nothing more of the model's reply came after the halt: the chunk shown before it, then the paused notice
    assert rest == ["\n\n" + conversations.PAUSED_REPLY] and stream.shown == first
    assert stream.reply.paused and "operator watching" in stream.reply.error and "withheld" in stream.reply.error
    row = executions.get_execution(pool, stream.reply.execution_id)
    assert row.status == "cancelled" and row.output.startswith(first) and "withheld" in row.error
    messages = conversations.list_messages(pool, "hal")
    assert [(m.role, m.kind) for m in messages] == [
        ("user", "message"), ("assistant", "reply"), ("user", "message"), ("user", "message"),
        ("assistant", "paused"), ("assistant", "paused")]
    story, answer = messages[2], messages[-1]
    assert answer.reply_to == story.id and answer.content == conversations.PAUSED_REPLY and not story.in_context


def test_a_halt_stops_a_reply_still_waiting_for_the_model(pool, backend, settings):
    """The model is shared: a message sent before the halt whose reply is queued behind another user's reply is
    stopped when its turn comes — the user gets the paused reply and none of the model's text."""
    conversations.send_message(pool, backend, settings, "queued", "hi", params=TINY)
    busy = conversations.stream_message(pool, backend, settings, "someone-else", "Tell me a long story",
                                        params={"max_tokens": 40, "temperature": 0.0, "seed": 1})
    ex = ThreadPoolExecutor(1)
    try:
        with busy:
            assert next(busy) and backend.lock.locked()  # another user's reply holds the model
            waiting = conversations.stream_message(pool, backend, settings, "queued", "are you there?",
                                                   params={"max_tokens": 20, "temperature": 0.0, "seed": 1})
            future = ex.submit(lambda: (list(waiting), waiting.reply))  # its reply waits for the model
            time.sleep(1.0)
            assert not future.done()
            conversations.halt_conversation(pool, "queued", "operator stepped in", "ops")
            rest = "".join(busy)
        chunks, reply = future.result(timeout=60)
    finally:
        busy.close()
        ex.shutdown(wait=True)
    assert busy.reply.status == "ok" and rest  # the reply that was streaming when the halt came went on
    assert reply.paused and chunks == [conversations.PAUSED_REPLY] and "operator stepped in" in reply.error
    row = executions.get_execution(pool, reply.execution_id)
    assert row.status == "cancelled" and "operator stepped in" in row.error and row.completion_tokens <= 1
    *_, question, answer = conversations.list_messages(pool, "queued")
    assert (question.content, question.in_context) == ("are you there?", False)  # left out of later contexts
    assert (answer.kind, answer.status, answer.content) == ("paused", "paused", conversations.PAUSED_REPLY)
    conversations.resume_conversation(pool, "queued", "ops")
    later = conversations.send_message(pool, backend, settings, "queued", "hello again", params=TINY)
    assert later.status == "ok" and "are you there?" not in ledger_text(pool, later.execution_id)


def _lock_waiters(pool) -> int:
    with pool.connection() as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'").fetchone()[0]


def test_a_halt_committed_before_the_reply_is_stored_withholds_it(pool, backend, settings):
    """The reply has streamed in full, but an operator's halt commits before it is stored: withheld all the same.
    The conversation's row lock is held here so the halt lands exactly in that gap."""
    stream = conversations.stream_message(pool, backend, settings, "late", "Tell me a story", params=FAST)
    conv = conversations.get_conversation(pool, "late")
    chunks: list[str] = []
    consumer = threading.Thread(target=lambda: chunks.extend(stream))
    with pool.connection() as conn:
        with conn.transaction():
            conn.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (conv.id,))
            consumer.start()
            deadline = time.monotonic() + 120
            while _lock_waiters(pool) == 0:  # the model is done; storing the reply waits for the row lock
                assert consumer.is_alive() and time.monotonic() < deadline, "the reply was stored without the lock"
                time.sleep(0.05)
            conversations._halt(conn, conv.id, "too late", "ops")  # what halt_conversation does under the lock
    consumer.join(60)
    assert not consumer.is_alive()
    reply, shown = stream.reply, stream.shown
    assert shown and chunks == [*chunks[:-1], "\n\n" + conversations.PAUSED_REPLY] and "".join(chunks[:-1]) == shown
    assert reply.paused and reply.text == conversations.PAUSED_REPLY and "too late" in reply.error
    row = executions.get_execution(pool, reply.execution_id)
    assert row.status == "ok" and row.output == shown and row.error == conversations.withheld_error("too late")
    question, answer = conversations.list_messages(pool, "late")
    assert (answer.kind, answer.status, answer.content) == ("paused", "paused", conversations.PAUSED_REPLY)
    assert not question.in_context
    [halt] = conversations.list_interventions(pool, "late")
    assert halt.created_at < answer.created_at


def _race(pool, backend, settings, user: str, params: dict, reason: str, delay: float):
    """Stream a reply in one thread while another halts the conversation after `delay` seconds: (the stream, the
    chunks as (time received, chunk), the time the halt had committed)."""
    stream = conversations.stream_message(pool, backend, settings, user, "Tell me about the sea", params=params)
    received: list[tuple[float, str]] = []
    halted_at: list[float] = []

    def consume() -> None:
        with stream:
            for chunk in stream:
                received.append((time.monotonic(), chunk))

    def halt() -> None:
        time.sleep(delay)
        conversations.halt_conversation(pool, user, reason, "ops")
        halted_at.append(time.monotonic())

    threads = [threading.Thread(target=consume), threading.Thread(target=halt)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and halted_at and stream.reply, f"{reason} did not finish"
    return stream, received, halted_at[0]


def test_a_halt_racing_a_reply_comes_after_it_was_stored_or_withholds_it(pool, backend, settings):
    """Many rounds of a halt at a random moment in another thread while a reply streams: in every round either the
    halt committed after the reply was stored (delivered), or the reply is withheld — stored as the paused notice,
    the ledger saying so — and at most the one chunk already cleared when the halt committed reaches the user."""
    rounds, params = 30, {"max_tokens": 8, "temperature": 0.0, "seed": 3}
    conversations.send_message(pool, backend, settings, "warm-up", "Tell me about the sea", params=params)
    started = time.monotonic()
    conversations.send_message(pool, backend, settings, "warm-up-2", "Tell me about the sea", params=params)
    span = time.monotonic() - started  # a round's reply, from storing the message to storing the reply
    rng = random.Random(1234)
    outcomes: Counter = Counter()
    for n in range(rounds):
        user = f"race{n}"
        stream, received, halted_at = _race(pool, backend, settings, user, params, f"round {n}",
                                            rng.uniform(0, 1.5 * span))
        question, answer = conversations.list_messages(pool, user)
        [halt_entry] = conversations.list_interventions(pool, user)
        after_halt = [chunk for at, chunk in received if at > halted_at]
        if answer.kind == "reply":  # delivered: the halt committed after the reply was stored
            assert halt_entry.created_at > answer.created_at, f"round {n}: stored as delivered after the halt"
            assert stream.reply.status == "ok" and not after_halt and answer.content == stream.shown
            outcomes["delivered"] += 1
            continue
        assert (answer.kind, answer.status, answer.content) == ("paused", "paused", conversations.PAUSED_REPLY)
        assert stream.reply.paused and not question.in_context, f"round {n}"
        assert received[-1][1] in (conversations.PAUSED_REPLY, "\n\n" + conversations.PAUSED_REPLY)
        assert "".join(chunk for _, chunk in received[:-1]) == stream.shown
        assert len(after_halt) <= 2, f"round {n}: {after_halt[:-1]} came after the halt"  # ≤ 1 cleared + notice
        row = executions.get_execution(pool, answer.execution_id)
        assert row.error == conversations.withheld_error(f"round {n}") and row.output.startswith(stream.shown)
        outcomes["withheld " + ("before any chunk" if not stream.shown else
                                "after the whole reply" if row.status == "ok" else "mid-stream")] += 1
    print(f"halt race over {rounds} rounds (reply ~{span:.2f}s): {dict(outcomes)}")
    assert outcomes["delivered"] and sum(outcomes.values()) - outcomes["delivered"], dict(outcomes)


def test_an_abandoned_stream_releases_the_model_and_keeps_what_was_produced(pool, backend, settings):
    stream = conversations.stream_message(pool, backend, settings, "ivy", "Tell me a long story",
                                          params={"max_tokens": 40, "temperature": 0.0, "seed": 1})
    with stream:
        first = next(stream)
    assert not backend.lock.locked()
    assert stream.reply.status == "cancelled" and stream.reply.text == first
    assert executions.get_execution(pool, stream.reply.execution_id).status == "cancelled"
    assert conversations.list_messages(pool, "ivy")[-1].content == first


# ---- concurrency ------------------------------------------------------------------------------------------------

def test_many_users_chatting_concurrently_lose_nothing_and_stay_in_order(pool, backend, settings):
    users = [f"user{i}" for i in range(6)]
    rounds = 3
    errors: list[BaseException] = []
    replies: dict[str, list] = defaultdict(list)

    def chat(user: str) -> None:
        try:
            for n in range(rounds):
                replies[user].append(conversations.send_message(pool, backend, settings, user, f"{user} says {n}",
                                                                params=TINY))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    # plus two threads writing to one shared conversation at once
    shared: list = []

    def shared_chat(tag: str) -> None:
        try:
            for n in range(rounds):
                shared.append(conversations.send_message(pool, backend, settings, "shared", f"{tag}{n}", params=TINY))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(u,)) for u in users]
    threads += [threading.Thread(target=shared_chat, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    for user in users:
        messages = conversations.list_messages(pool, user)
        assert [m.seq for m in messages] == list(range(1, 2 * rounds + 1))
        assert [m.content for m in messages if m.role == "user"] == [f"{user} says {n}" for n in range(rounds)]
        for question, answer in zip(messages[::2], messages[1::2]):
            assert answer.reply_to == question.id and answer.status == "ok"
        assert [r.user_message_id for r in replies[user]] == [m.id for m in messages[::2]]
        # each turn's context is this user's own conversation, complete and in order — nobody else's
        for n, reply in enumerate(replies[user]):
            row = executions.get_execution(pool, reply.execution_id)
            assert row.user_id == user and row.messages[-1]["content"] == f"{user} says {n}"
            history = row.messages[0]["content"]
            said = [line for line in history.splitlines() if line.startswith("User: ")]
            assert said == [f"User: {user} says {k}" for k in range(n)]
            assert all(f"{other} says" not in history for other in users if other != user)
            assert reply.text == messages[2 * n + 1].content
    messages = conversations.list_messages(pool, "shared")
    assert [m.seq for m in messages] == list(range(1, 4 * rounds + 1))
    sent = [m.content for m in messages if m.role == "user"]
    assert sorted(sent) == sorted(f"{t}{n}" for t in "ab" for n in range(rounds))
    for tag in "ab":  # each sender's messages keep their order
        assert [s for s in sent if s.startswith(tag)] == [f"{tag}{n}" for n in range(rounds)]
    answered = {m.reply_to for m in messages if m.role == "assistant"}
    assert answered == {m.id for m in messages if m.role == "user"}
    assert len(executions.list_executions(pool, source="chat", limit=1000)) == len(users) * rounds + 2 * rounds


# ---- context trimming --------------------------------------------------------------------------------------------

def notes_in(text: str) -> list[int]:
    return [i for i in range(100) if f"note number {i} " in text]


def test_context_is_trimmed_at_the_window_edge_keeping_the_most_recent(pool, backend, settings):
    conversations.send_message(pool, backend, settings, "kim", "hi", params=TINY)
    for i in range(40):
        conversations.inject_message(pool, "kim", f"note number {i} about the weather in town", "ops")
    roomy = conversations.send_message(pool, backend, settings, "kim", "ok?", params=TINY)
    assert roomy.context_dropped == 0 and roomy.context_messages == 42
    assert notes_in(ledger_text(pool, roomy.execution_id)) == list(range(40))

    budget = 400
    tight = conversations.send_message(pool, backend, settings, "kim", "and now?", params=TINY, context_budget=budget)
    row = executions.get_execution(pool, tight.execution_id)
    kept = notes_in(ledger_text(pool, tight.execution_id))
    assert tight.context_dropped > 0 and tight.context_messages + tight.context_dropped == 44
    assert kept and kept == list(range(kept[0], 40)) and kept[0] > 0  # the most recent, contiguous; oldest dropped
    assert "User: ok?" in ledger_text(pool, tight.execution_id)
    assert row.prompt_tokens <= budget and conversations.prompt_tokens(backend, row.messages) <= budget
    assert row.prompt_tokens > budget * conversations.TRIM_TO * 0.8  # cut back only to the low-water mark

    # later turns keep the same start while everything from it fits: the prompt only grows at its end
    for i in range(40, 43):
        conversations.inject_message(pool, "kim", f"note number {i} about the weather in town", "ops")
    steady = conversations.send_message(pool, backend, settings, "kim", "more?", params=TINY, context_budget=budget)
    assert notes_in(ledger_text(pool, steady.execution_id)) == list(range(kept[0], 43))
    previous_history = row.messages[0]["content"].rsplit("Operator: note number 39", 1)[0]
    assert executions.get_execution(pool, steady.execution_id).messages[0]["content"].startswith(previous_history)
    # until it no longer fits: then it is cut back again, still keeping the newest
    for i in range(43, 70):
        conversations.inject_message(pool, "kim", f"note number {i} about the weather in town", "ops")
    recut = conversations.send_message(pool, backend, settings, "kim", "and?", params=TINY, context_budget=budget)
    again = notes_in(ledger_text(pool, recut.execution_id))
    assert again == list(range(again[0], 70)) and again[0] > kept[0]
    assert executions.get_execution(pool, recut.execution_id).prompt_tokens <= budget
    # with room again, the whole history comes back
    roomy = conversations.send_message(pool, backend, settings, "kim", "all?", params=TINY)
    assert roomy.context_dropped == 0 and notes_in(ledger_text(pool, roomy.execution_id)) == list(range(70))

    small = conversations.send_message(pool, backend, settings, "kim", "x", params=TINY, context_budget=5)
    assert small.status == "error" and "context budget" in small.error


def test_context_window_default_comes_from_the_model(pool, backend, settings):
    reply = conversations.send_message(pool, backend, settings, "lee", "hi", params={"max_tokens": 2, "seed": 1})
    assert reply.status == "ok"
    assert executions.get_execution(pool, reply.execution_id).prompt_tokens < backend.n_ctx


# ---- overview, figures, retention --------------------------------------------------------------------------------

def test_overview_sort_filter_and_dashboard_figures(pool, backend, settings):
    for user, n in (("amy", 1), ("bob", 2)):
        for i in range(n):
            conversations.send_message(pool, backend, settings, user, f"m{i}", params=TINY)
    conversations.halt_conversation(pool, "amy", "check", "ops")
    rows = conversations.list_conversations(pool, sort="messages")
    assert [(r.user_id, r.message_count, r.state) for r in rows] == [("bob", 4, "active"), ("amy", 2, "halted")]
    assert [r.user_id for r in conversations.list_conversations(pool, sort="user", descending=False)] == ["amy", "bob"]
    assert [r.user_id for r in conversations.list_conversations(pool, state="halted")] == ["amy"]
    assert [r.user_id for r in conversations.list_conversations(pool, search="O")] == ["bob"]
    assert conversations.list_conversations(pool, search="%") == []
    with pytest.raises(ValueError, match="unknown sort"):
        conversations.list_conversations(pool, sort="1; DROP TABLE conversations")
    figures = status.dashboard_figures(pool)
    assert figures["Users"] == 2 and figures["Conversations active today"] == 2
    assert figures["Messages"] == 6 and figures["Halted conversations"] == 1 and figures["Guardrail events"] == 0


def _age(pool, user: str, days: int) -> None:
    with pool.connection() as conn:
        conn.execute("UPDATE conversations SET last_activity = now() - make_interval(days => %s) WHERE user_id = %s",
                     (days, user))


def test_retention_deletes_old_conversations_with_their_memory(pool, backend, settings):
    for user in ("old", "new"):
        conversations.send_message(pool, backend, settings, user, "hi", params=TINY)
        conversations.set_memory(pool, user, "name", user)
    _age(pool, "old", 40)
    with pytest.raises(ValueError, match="at least 1"):
        conversations.purge_conversations(pool, 0)
    counts = conversations.purge_conversations(pool, 30, operator="ops")
    assert counts == {"conversations": 1, "messages": 2, "memory": 1}
    assert conversations.find_conversation(pool, "old") is None and conversations.get_memory(pool, "old") == {}
    assert conversations.get_memory(pool, "new") == {"name": "new"}
    assert len(conversations.list_messages(pool, "new")) == 2
    assert conversations.list_purges(pool)[0]["trigger"] == "manual"


def test_scheduled_retention_runs_at_most_once_an_hour(pool, backend, settings):
    conversations.send_message(pool, backend, settings, "old", "hi", params=TINY)
    _age(pool, "old", 10)
    assert conversations.scheduled_purge(pool, settings) is None  # retention_days = 0: off
    on = replace(settings, retention_days=7)
    assert conversations.scheduled_purge(pool, on) == {"conversations": 1, "messages": 2, "memory": 0}
    conversations.send_message(pool, backend, settings, "old2", "hi", params=TINY)
    _age(pool, "old2", 10)
    assert conversations.scheduled_purge(pool, on) is None  # ran less than an hour ago
    with pool.connection() as conn:
        conn.execute("UPDATE conversation_purges SET ran_at = ran_at - interval '61 minutes'")
    assert conversations.scheduled_purge(pool, on)["conversations"] == 1
    # the worker runs this task source, and it honours the setting
    from core import worker

    assert "conversations.retention" in worker.SOURCES
    assert worker.SOURCES["conversations.retention"](pool, settings) is False
