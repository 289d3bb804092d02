"""Guardrails: detectors, rule validation (a broken regex is refused with the reason), and every action in the
real chat flow on the real model, with each hit recorded against its message and execution."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from core import conversations, executions, guardrails
from core.guardrails import GuardrailError

FAST = {"max_tokens": 6, "temperature": 0.0, "seed": 3}


def rule(i: int, kind: str, action: str = "flag", **kw) -> guardrails.Rule:
    values = dict(id=i, name=f"r{i}", kind=kind, words=None, pattern=None, max_length=None, template_name=None,
                  direction="both", action=action, replacement=guardrails.DEFAULT_REPLACEMENTS.get(kind, "[redacted]"),
                  enabled=True, created_by="", created_at=datetime.now())
    values.update(kw)
    return guardrails.Rule(**values)


# ---- detectors (pure) ----------------------------------------------------------------------------------------------

def test_luhn():
    assert guardrails.luhn_valid("4111111111111111")
    assert guardrails.luhn_valid("378282246310005")
    assert not guardrails.luhn_valid("4111111111111112")
    assert not guardrails.luhn_valid("41x1")


def test_card_detector_needs_a_valid_luhn_checksum():
    c = guardrails.check([rule(1, "card", "redact")], "pay 4111 1111 1111 1111 or 4111-1111-1111-1112", "input")
    assert c.text == "pay [card] or 4111-1111-1111-1112"
    assert c.hits[0].matches == 1 and c.hits[0].excerpt is None  # redacted text is not kept anywhere


def test_email_and_phone_detectors():
    rules = [rule(1, "email", "redact"), rule(2, "phone", "redact")]
    c = guardrails.check(rules, "Mail bob.smith+x@example.co.uk, call +44 20 7946 0958 or (555) 123-4567", "input")
    assert c.text == "Mail [email], call [phone] or [phone]"
    assert [(h.rule_name, h.matches) for h in c.hits] == [("r1", 1), ("r2", 2)]
    # dates, short numbers and card numbers are not phone numbers
    quiet = guardrails.check([rule(2, "phone")], "On 2024-01-15 order 12345 paid with 4111 1111 1111 1111", "input")
    assert quiet.hits == ()


def test_words_match_whole_words_and_phrases_case_insensitively():
    r = rule(1, "words", "block", words=["darn it", "heck"])
    c = guardrails.check([r], "Darn   it, what the HECK", "input")
    assert c.blocked and c.hits[0].matches == 2 and c.hits[0].excerpt == "Darn   it, HECK"
    assert guardrails.check([r], "a heckler in a checkout", "input").hits == ()


def test_regex_and_max_length():
    c = guardrails.check([rule(1, "regex", "redact", pattern=r"\bACME-\d+\b", replacement="<id>")],
                         "tickets ACME-12 and ACME-7", "output")
    assert c.text == "tickets <id> and <id>" and c.redacted
    m = guardrails.check([rule(2, "max_length", "redact", max_length=5)], "abcdefgh", "input")
    assert m.text == "abcde" and m.hits[0].matches == 1
    flag = guardrails.check([rule(2, "max_length", "flag", max_length=5)], "abcdefgh", "input")
    assert flag.flagged and flag.text == "abcdefgh" and flag.hits[0].excerpt == "8 characters (limit 5)"


def test_direction_scope_and_enabled_decide_which_rules_run():
    rules = [rule(1, "words", "block", words=["x"], direction="input"),
             rule(2, "words", "flag", words=["x"], template_name="other"),
             rule(3, "words", "halt", words=["x"], enabled=False),
             rule(4, "words", "redact", words=["x"], direction="output", template_name="mine")]
    assert [h.rule_name for h in guardrails.check(rules, "x", "input", "mine").hits] == ["r1"]
    assert [h.rule_name for h in guardrails.check(rules, "x", "output", "mine").hits] == ["r4"]
    assert [h.rule_name for h in guardrails.check(rules, "x", "input", "other").hits] == ["r1", "r2"]


# ---- rules in the database -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, reason", [
    ("(", "missing ), unterminated subpattern at position 0"),
    ("[a-", "unterminated character set"),
    ("a*", "matches empty text"),
])
def test_a_broken_regex_is_refused_when_saved_with_the_reason(pool, pattern, reason):
    with pytest.raises(GuardrailError, match=re.escape(reason)):
        guardrails.create_rule(pool, "bad", "regex", pattern=pattern, action="block")
    assert guardrails.list_rules(pool) == []


def test_rule_validation_errors_are_one_clear_line(pool):
    cases = [
        (dict(name="w", kind="words", words=" , "), "at least one word"),
        (dict(name="k", kind="nope"), "unknown rule kind"),
        (dict(name="a", kind="email", action="explode"), "unknown action"),
        (dict(name="d", kind="email", direction="sideways"), "unknown direction"),
        (dict(name="m", kind="max_length", max_length=0), "at least 1"),
        (dict(name="x", kind="email", pattern="a"), "only applies to a regex rule"),
        (dict(name="", kind="email"), "rule name"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GuardrailError, match=message):
            guardrails.create_rule(pool, **kwargs)
    with pytest.raises(LookupError, match="no template named 'ghost'"):
        guardrails.create_rule(pool, "scoped", "email", template_name="ghost")
    assert guardrails.list_rules(pool) == []


def test_create_list_disable_delete(pool):
    r = guardrails.create_rule(pool, "no swearing", "words", words="darn, heck\nblast", action="block",
                               direction="input", created_by="ops")
    assert r.words == ["darn", "heck", "blast"] and r.scope == "global" and r.enabled and r.created_by == "ops"
    with pytest.raises(GuardrailError, match="already exists"):
        guardrails.create_rule(pool, "no swearing", "email")
    assert guardrails.set_enabled(pool, "no swearing", False).enabled is False
    assert [x.name for x in guardrails.list_rules(pool, enabled_only=True)] == []
    guardrails.delete_rule(pool, "no swearing")
    with pytest.raises(LookupError, match="no guardrail rule named 'no swearing'"):
        guardrails.delete_rule(pool, "no swearing")


# ---- every action in the chat flow ----------------------------------------------------------------------------------

def _events(pool, user):
    return guardrails.list_events(pool, user_id=user)[::-1]


def test_input_block_gives_a_safe_reply_without_the_model(pool, backend, settings):
    guardrails.create_rule(pool, "no swearing", "words", words=["darn"], direction="input", action="block")
    reply = conversations.send_message(pool, backend, settings, "ann", "Darn this thing", params=FAST)
    assert reply.status == "blocked" and reply.text == conversations.BLOCKED_INPUT_REPLY
    row = executions.get_execution(pool, reply.execution_id)
    assert row.status == "blocked" and row.model_name == "none" and "no swearing" in row.error
    [event] = _events(pool, "ann")
    assert (event.rule_name, event.action, event.direction) == ("no swearing", "block", "input")
    assert event.message_id == reply.user_message_id and event.execution_id == reply.execution_id
    # the blocked message never reaches the model's context later
    ok = conversations.send_message(pool, backend, settings, "ann", "Hello there", params=FAST)
    assert ok.status == "ok"
    assert "Darn" not in str(executions.get_execution(pool, ok.execution_id).messages)


def test_input_redact_replaces_matches_before_storing_and_sending(pool, backend, settings):
    guardrails.create_rule(pool, "emails", "email", direction="input", action="redact")
    reply = conversations.send_message(pool, backend, settings, "bo", "I am bo@example.com, hi", params=FAST)
    assert reply.status == "ok"
    stored = conversations.list_messages(pool, "bo")
    assert stored[0].content == "I am [email], hi"
    row = executions.get_execution(pool, reply.execution_id)
    assert "bo@example.com" not in str(row.messages) and "[email]" in str(row.messages)
    [event] = _events(pool, "bo")
    assert event.action == "redact" and event.excerpt is None and event.execution_id == reply.execution_id


def test_input_flag_allows_the_message_and_marks_it_for_review(pool, backend, settings):
    guardrails.create_rule(pool, "cards", "card", direction="both", action="flag")
    reply = conversations.send_message(pool, backend, settings, "cy", "my card is 4111111111111111", params=FAST)
    assert reply.status == "ok" and reply.flagged
    [flagged] = conversations.flagged_messages(pool)
    assert flagged.id == reply.user_message_id and flagged.rules == ["cards"]
    assert flagged.content == "my card is 4111111111111111"  # allowed unchanged, kept for review
    assert flagged.execution_id == reply.execution_id and conversations.list_conversations(pool)[0].flagged_count == 1
    [event] = _events(pool, "cy")
    assert (event.message_id, event.execution_id, event.excerpt) == (
        reply.user_message_id, reply.execution_id, "4111111111111111")
    conversations.mark_reviewed(pool, flagged.id, "ops")
    assert conversations.flagged_messages(pool) == []
    assert conversations.list_conversations(pool)[0].flagged_count == 0
    assert conversations.list_interventions(pool, "cy")[-1].action == "review"
    with pytest.raises(ValueError, match="already reviewed"):
        conversations.mark_reviewed(pool, flagged.id, "ops")


def test_input_halt_halts_the_conversation(pool, backend, settings):
    from core import metrics

    guardrails.create_rule(pool, "self harm", "regex", pattern=r"(?i)\bhurt myself\b", direction="input",
                           action="halt")
    hit = {"template": "companion", "model": backend.name, "rule": "self harm", "action": "halt"}
    halt = {"template": "companion", "model": backend.name, "by": "guardrail"}

    def sample(name, labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0

    hits_before, halts_before = sample("promptdev_guardrail_hits_total", hit), sample("promptdev_halts_total", halt)
    reply = conversations.send_message(pool, backend, settings, "di", "I want to hurt myself", params=FAST)
    assert sample("promptdev_guardrail_hits_total", hit) == hits_before + 1  # telemetry counts the hit and halt
    assert sample("promptdev_halts_total", halt) == halts_before + 1
    assert reply.paused and reply.text == conversations.PAUSED_REPLY
    conv = conversations.get_conversation(pool, "di")
    assert conv.halted and conv.halted_by == "guardrail" and "self harm" in conv.halted_reason
    [halt] = conversations.list_interventions(pool, "di")
    assert (halt.action, halt.operator) == ("halt", "guardrail") and halt.message_id == reply.user_message_id
    [event] = _events(pool, "di")
    assert (event.action, event.message_id, event.execution_id) == ("halt", reply.user_message_id,
                                                                     reply.execution_id)
    again = conversations.send_message(pool, backend, settings, "di", "hello?", params=FAST)
    assert again.paused and executions.get_execution(pool, again.execution_id).status == "blocked"


def _raw_output(pool, reply):
    return executions.get_execution(pool, reply.execution_id).output


def test_output_block(pool, backend, settings):
    guardrails.create_rule(pool, "anything", "regex", pattern=r"\S", direction="output", action="block")
    with conversations.stream_message(pool, backend, settings, "eve", "Say hello", params=FAST) as stream:
        chunks = list(stream)
    reply = stream.reply
    assert chunks == [conversations.BLOCKED_OUTPUT_REPLY]  # nothing of the blocked reply was sent
    assert reply.status == "blocked" and _raw_output(pool, reply).strip()
    assert conversations.list_messages(pool, "eve")[-1].kind == "blocked"
    [event] = _events(pool, "eve")
    assert event.direction == "output" and event.message_id == reply.reply_message_id
    assert event.execution_id == reply.execution_id


def _ledger_rows(pool, execution_id):
    with pool.connection() as conn:
        return conn.execute("SELECT output FROM executions WHERE id = %s", (execution_id,)).fetchall()


def test_output_redact_replaces_matches_before_storing_and_sending_ledger_included(pool, backend, settings,
                                                                                  monkeypatch):
    guardrails.create_rule(pool, "words out", "regex", pattern=r"[A-Za-z]+", direction="output", action="redact",
                           replacement="#")
    written = []  # what the ledger is given when the execution is first written
    record = executions.record
    monkeypatch.setattr(executions, "record", lambda *a, **kw: written.append(kw.get("output")) or record(*a, **kw))
    with conversations.stream_message(pool, backend, settings, "fay", "Say hello", params=FAST) as stream:
        assert stream.buffered  # nothing is sent before it is checked
        chunks = list(stream)
    reply = stream.reply
    [event] = _events(pool, "fay")
    assert (event.action, event.direction, event.excerpt) == ("redact", "output", None) and event.matches >= 1
    assert event.execution_id == reply.execution_id and event.message_id == reply.reply_message_id
    assert reply.status == "ok" and "#" in reply.text and not re.search(r"[A-Za-z]", reply.text)
    assert "".join(chunks) == reply.text  # sent redacted
    assert conversations.list_messages(pool, "fay")[-1].content == reply.text  # stored redacted
    assert _raw_output(pool, reply) == reply.text  # and the ledger (hence the analytics exports) keeps no more
    assert written == [reply.text]  # not even for a moment


def test_output_redact_keeps_pii_out_of_the_ledger_even_if_the_ledger_recorded_it_raw(pool, backend, settings,
                                                                                        monkeypatch):
    """The run records the redacted output itself; should the ledger ever record the raw text, the flow still
    rewrites it before the reply is stored (in the same transaction)."""
    guardrails.create_rule(pool, "vowels", "regex", pattern=r"[aeiouAEIOU]", direction="output", action="redact",
                           replacement="*")
    monkeypatch.setattr(conversations._ChatRun, "output", executions.ExecutionRun.output)  # records the raw text
    reply = conversations.send_message(pool, backend, settings, "gil", "Tell me about the sea", params=FAST)
    [event] = _events(pool, "gil")
    assert event.matches >= 1 and reply.status == "ok" and "*" in reply.text
    assert not re.search(r"[aeiouAEIOU]", reply.text)
    assert _ledger_rows(pool, reply.execution_id) == [(reply.text,)]


def test_the_chat_run_records_redacted_output_in_the_ledger(pool, backend):
    from core.llm import GenerationParams

    run = conversations._ChatRun(pool, backend, executions.Origin("chat", user_id="hal"),
                                 GenerationParams.from_dict(FAST),
                                 [{"role": "user", "content": "Write the word hello"}], None,
                                 ledger_text=lambda raw: "[" + str(len(raw)) + " characters]")
    with run:
        run.read()
    raw = run.raw_output
    assert raw and _ledger_rows(pool, run.execution_id) == [(f"[{len(raw)} characters]",)]


def test_output_flag_streams_live_and_marks_the_reply(pool, backend, settings):
    guardrails.create_rule(pool, "anything", "regex", pattern=r"\S", direction="output", action="flag")
    with conversations.stream_message(pool, backend, settings, "gus", "Count to five", params=FAST) as stream:
        assert not stream.buffered
        chunks = list(stream)
    reply = stream.reply
    assert reply.status == "ok" and reply.flagged and "".join(chunks) == reply.text == _raw_output(pool, reply)
    [flagged] = conversations.flagged_messages(pool)
    assert flagged.id == reply.reply_message_id and flagged.role == "assistant"


def test_output_halt_withholds_the_reply_and_halts(pool, backend, settings):
    guardrails.create_rule(pool, "stop all", "max_length", max_length=1, direction="output", action="halt")
    reply = conversations.send_message(pool, backend, settings, "hal", "Tell me a story", params=FAST)
    assert reply.paused and reply.text == conversations.PAUSED_REPLY
    conv = conversations.get_conversation(pool, "hal")
    assert conv.halted and conv.halted_by == "guardrail"
    assert conversations.list_interventions(pool, "hal")[0].message_id == reply.reply_message_id


def test_template_scoped_rule_only_applies_to_that_template(pool, backend, settings):
    from core import templates

    templates.create_template(pool, "strict", [{"role": "user", "content": "{{ message }}"}])
    guardrails.create_rule(pool, "strict only", "words", words=["tea"], template_name="strict", action="block")
    assert conversations.send_message(pool, backend, settings, "ivy", "tea please", params=FAST).status == "ok"
    conversations.assign_template(pool, "ivy", "strict", operator="ops")
    assert conversations.send_message(pool, backend, settings, "ivy", "tea please", params=FAST).status == "blocked"
