"""`promptdev conversations …` and `promptdev guardrails …` against the real database (and model for `send`)."""

from __future__ import annotations

import pytest

from core import cli, conversations, guardrails

TINY = {"max_tokens": 2, "temperature": 0.0, "seed": 1}


@pytest.fixture
def run(app_env, capsys, monkeypatch):
    """Run the promptdev CLI in-process: (exit code, stdout, stderr)."""
    monkeypatch.setenv("PROMPTDEV_OPERATOR", "cli-op")

    def _run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_list_show_halt_resume_inject(run, pool, backend, settings):
    assert run("conversations", "list") == (0, "no conversations\n", "")
    conversations.send_message(pool, backend, settings, "ann", "hello there", params=TINY)
    code, out, _ = run("conversations", "list")
    assert code == 0 and "ann" in out and "active" in out and "companion v1" in out

    code, out, err = run("conversations", "halt", "ann", "--reason", "checking in")
    assert code == 0 and "halted" in out
    conv = conversations.get_conversation(pool, "ann")
    assert conv.halted and conv.halted_by == "cli-op" and conv.halted_reason == "checking in"
    code, _, err = run("conversations", "halt", "ann", "--reason", "again")
    assert code == 1 and err.startswith("promptdev: ") and "already halted" in err and err.count("\n") == 1
    assert run("conversations", "list", "--state", "halted")[1].count("ann") == 1

    assert run("conversations", "resume", "ann", "--operator", "lead")[0] == 0
    code, out, _ = run("conversations", "inject", "ann", "Be gentle.")
    assert code == 0 and "next turn" in out

    code, out, _ = run("conversations", "show", "ann")
    assert code == 0
    assert "#1" in out and "hello there" in out and "OPERATOR cli-op" in out and "Be gentle." in out
    assert "cli-op halt: checking in" in out and "lead resume" in out and "cli-op inject" in out

    code, _, err = run("conversations", "show", "nobody")
    assert code == 1 and "no conversation for user 'nobody'" in err


def test_send_streams_a_reply(run, pool):
    code, out, err = run("conversations", "send", "bo", "Say hi", "--max-tokens", "3", "--seed", "1")
    assert code == 0
    [user, reply] = conversations.list_messages(pool, "bo")
    assert user.content == "Say hi" and reply.kind == "reply" and out == reply.content + "\n"


def test_a_failed_reply_exits_non_zero_with_one_line(run, pool):
    from core import templates

    templates.create_template(pool, "broken", [{"role": "user", "content": "{{ message | length > 'x' }}"}])
    conversations.assign_template(pool, "ed", "broken", operator="ops")
    code, out, err = run("conversations", "send", "ed", "hi", "--max-tokens", "2")
    assert code == 1 and out == conversations.ERROR_REPLY + "\n"  # what the user was sent
    assert err.startswith("promptdev: the reply failed: ") and err.count("\n") == 1 and "execution" in err
    assert [m.kind for m in conversations.list_messages(pool, "ed")] == ["message", "error"]
    # operator actions on a missing conversation: exit 1, one line, nothing created
    for argv in (("halt", "ghost", "--reason", "x"), ("resume", "ghost"), ("inject", "ghost", "hello")):
        code, out, err = run("conversations", *argv)
        assert code == 1 and out == "" and err == "promptdev: no conversation for user 'ghost'\n"
    assert conversations.find_conversation(pool, "ghost") is None


def test_memory_assign_and_purge(run, pool):
    code, out, _ = run("conversations", "memory", "set", "cy", "likes", '["tea"]')
    assert code == 0 and conversations.get_memory(pool, "cy") == {"likes": ["tea"]}
    assert run("conversations", "memory", "set", "cy", "name", "Cy", "--string")[0] == 0
    code, _, err = run("conversations", "memory", "set", "cy", "name", "Cy")
    assert code == 1 and "must be JSON" in err
    code, out, _ = run("conversations", "memory", "show", "cy")
    assert out == 'likes = ["tea"]\nname = "Cy"\n'
    assert run("conversations", "memory", "delete", "cy", "likes")[0] == 0
    code, _, err = run("conversations", "memory", "delete", "cy", "likes")
    assert code == 1 and "no memory key 'likes'" in err

    code, _, err = run("conversations", "assign", "cy", "ghost")
    assert code == 1 and "no template named 'ghost'" in err
    code, _, err = run("conversations", "assign", "cy")
    assert code == 1 and "--default" in err

    code, _, err = run("conversations", "purge")
    assert code == 1 and "--older-than-days" in err
    with pool.connection() as conn:
        conn.execute("UPDATE conversations SET last_activity = now() - interval '9 days'")
    code, out, _ = run("conversations", "purge", "--older-than-days", "7")
    assert code == 0 and "deleted 1 conversation(s)" in out and "1 memory key(s)" in out
    assert conversations.get_memory(pool, "cy") == {}


def test_guardrail_commands(run, pool, backend, settings):
    code, _, err = run("guardrails", "add", "bad", "--kind", "regex", "--pattern", "[a-")
    assert code == 1 and "invalid regular expression" in err and "unterminated character set" in err
    assert err.count("\n") == 1 and guardrails.list_rules(pool) == []

    code, out, _ = run("guardrails", "add", "emails", "--kind", "email", "--action", "flag")
    assert code == 0 and "added rule 'emails'" in out
    assert guardrails.get_rule(pool, "emails").created_by == "cli-op"
    code, out, _ = run("guardrails", "list")
    assert "emails" in out and "PII: e-mail address" in out and "global" in out

    conversations.send_message(pool, backend, settings, "dee", "mail dee@example.com", params=TINY)
    code, out, _ = run("guardrails", "events")
    assert code == 0 and "emails" in out and "dee@example.com" in out
    code, out, _ = run("conversations", "flagged")
    assert "dee" in out and "emails" in out
    message_id = conversations.flagged_messages(pool)[0].id
    assert run("conversations", "flagged", "--review", str(message_id))[0] == 0
    assert run("conversations", "flagged")[1] == "no flagged messages\n"

    assert run("guardrails", "disable", "emails")[0] == 0
    assert guardrails.get_rule(pool, "emails").enabled is False
    assert run("guardrails", "delete", "emails")[0] == 0
    code, _, err = run("guardrails", "delete", "emails")
    assert code == 1 and "no guardrail rule named 'emails'" in err
    assert len(guardrails.list_events(pool)) == 1  # events outlive their rule


def test_memory_values_with_nul_characters_are_refused_in_one_line(run, pool):
    """A NUL can only come in as a JSON escape on the command line; PostgreSQL cannot store it: exit 1, one line."""
    assert run("conversations", "memory", "set", "nel", "name", '"Nel"')[0] == 0
    for value, where in [('"a\\u0000b"', ""), ('["tea", "ca\\u0000ke"]', " at [1]"),
                         ('{"pets": [{"name": "Rex\\u0000"}]}', ' at ["pets"][0]["name"]'),
                         ('{"b\\u0000d": 2}', ' at ["b\\u0000d"] (a key)')]:
        code, out, err = run("conversations", "memory", "set", "nel", "name", value)
        assert (code, out) == (1, "")
        assert err == (f"promptdev: the value of memory key 'name' contains a NUL character (\\x00){where}, "
                       f"which cannot be stored\n")
    code, _, err = run("conversations", "inject", "nel", "be \\u0000 nice")  # plain text: no JSON escapes, stored
    assert code == 0 and err == ""
    assert conversations.get_memory(pool, "nel") == {"name": "Nel"}
    assert [i.action for i in conversations.list_interventions(pool, "nel")] == ["set_memory", "inject"]
