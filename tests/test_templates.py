"""Templates on a real PostgreSQL: versions, identical content, rollback, labels and their history, fetching,
listing, activation, duplication, diff, export/import, code prompts and concurrent updates from many processes."""

from __future__ import annotations

import multiprocessing
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from core import db
from core import templates as tpl

CHAT = [{"role": "system", "content": "You are {{ role }}."},
        {"role": "user", "content": "Help me with {{ topic }}."}]


@pytest.fixture
def other_pool(pg_server_url, template_db):
    """A second, empty (migrated) database, for export/import."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    db.create_database(pg_server_url, name, template=template_db)
    url = db.with_database(pg_server_url, name)
    pool = db.open_pool(url, max_size=2)
    yield pool
    pool.close()
    db.drop_database(pg_server_url, name)


# -- creating, versions, identical content ----------------------------------------------------------------------


def test_create_text_template_is_version_1(pool):
    tv = tpl.create_template(pool, "chatbot", "You are {{role}}. Help with {{topic}}.", created_by="admin",
                             description="d", category="support", tags=["a", "b", "a"],
                             params={"temperature": 0.2}, change_description="first")
    assert (tv.name, tv.version, tv.kind, tv.text, tv.messages) == ("chatbot", 1, "text",
                                                                    "You are {{role}}. Help with {{topic}}.", [])
    assert tv.variables == ["role", "topic"] and tv.params == {"temperature": 0.2}
    assert tv.created_by == "admin" and tv.change_description == "first" and len(tv.content_sha256) == 64
    t = tpl.get_template(pool, "chatbot")
    assert (t.description, t.category, t.tags, t.owner, t.active, t.latest_version) == (
        "d", "support", ["a", "b"], "admin", True, 1)
    assert t.created_at <= t.updated_at
    assert tpl.get_template_by_name(pool, "chatbot") == tv


def test_create_chat_template(pool):
    tv = tpl.create_template(pool, "helper", CHAT, input_schema={"type": "object"})
    assert tv.kind == "chat" and tv.messages == CHAT and tv.text is None and tv.variables == ["role", "topic"]
    assert tv.content == CHAT and tv.input_schema == {"type": "object"}
    again = tpl.get_template_by_name(pool, "helper", version=1)
    assert again == tv


@pytest.mark.parametrize("name", ["Bad", "has space", "", "-x", "a@b", "x" * 101, "é"])
def test_invalid_names_are_refused(pool, name):
    with pytest.raises(tpl.TemplateError, match="invalid template name"):
        tpl.create_template(pool, name, "hi")


@pytest.mark.parametrize("content, message", [
    ("   ", "the prompt is empty"),
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], "role must be one of system, user, assistant"),
    ([{"role": "user", "content": ""}], r"message 1 \(user\) is empty"),
    ([{"role": "user", "content": "x", "name": "n"}], "unknown key"),
    ({"role": "user"}, "content must be a text prompt or a list"),
    (42, "content must be a text prompt or a list"),
])
def test_malformed_content_is_refused(pool, content, message):
    with pytest.raises(tpl.TemplateError, match=message):
        tpl.create_template(pool, "x", content)
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_template(pool, "x")


def test_invalid_params_and_schemas_are_refused(pool):
    with pytest.raises(tpl.TemplateError, match="unknown parameter"):
        tpl.create_template(pool, "x", "hi", params={"temprature": 1})
    with pytest.raises(tpl.TemplateError, match="temperature must be between"):
        tpl.create_template(pool, "x", "hi", params={"temperature": 9})
    with pytest.raises(tpl.TemplateError, match="input schema is not a valid JSON Schema"):
        tpl.create_template(pool, "x", "hi", input_schema={"type": "nonsense"})
    with pytest.raises(tpl.TemplateError, match="output schema is not a valid JSON Schema"):
        tpl.create_template(pool, "x", "hi", output_schema={"required": "yes"})
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_template(pool, "x")


def test_duplicate_name_is_refused(pool):
    tpl.create_template(pool, "dup", "a")
    with pytest.raises(tpl.TemplateExists, match="already exists"):
        tpl.create_template(pool, "dup", "b")


def test_syntax_error_is_refused_at_save_with_line_number(pool):
    with pytest.raises(tpl.TemplateSyntaxError, match="syntax error at line 3") as info:
        tpl.create_template(pool, "broken", "line one\nline two\n{% if x %}never closed")
    assert info.value.lineno == 3
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_template(pool, "broken")
    tpl.create_template(pool, "ok", CHAT)
    bad = [CHAT[0], {"role": "user", "content": "fine\n{{ topic "}]
    with pytest.raises(tpl.TemplateSyntaxError, match=r"in message 2 \(user\) at line 2") as info:
        tpl.update_template(pool, "ok", bad)
    assert (info.value.lineno, info.value.message_index) == (2, 1)
    assert tpl.get_template(pool, "ok").latest_version == 1


def test_update_creates_consecutive_versions_and_identical_content_creates_nothing(pool):
    tpl.create_template(pool, "t", "v1 {{a}}", created_by="ann")
    tv2, created = tpl.update_template(pool, "t", "v2 {{a}} {{b}}", created_by="bob", change_description="why")
    assert created and tv2.version == 2 and tv2.variables == ["a", "b"]
    assert (tv2.created_by, tv2.change_description) == ("bob", "why")
    same, created = tpl.update_template(pool, "t", "v2 {{a}} {{b}}", created_by="carl")
    assert not created and same == tv2
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM template_versions").fetchone()[0] == 2
    tv3, created = tpl.update_template(pool, "t", "v2 {{a}} {{b}}", params={"temperature": 0.1})
    assert created and tv3.version == 3  # parameters are part of the content
    assert [v.version for v in tpl.get_version_history(pool, "t")] == [3, 2, 1]


def test_update_inherits_params_and_schemas_from_the_base_version(pool):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    tpl.create_template(pool, "t", "one {{a}}", params={"temperature": 0.3}, input_schema=schema)
    tpl.update_template(pool, "t", "two {{a}}", params={"temperature": 0.9}, input_schema={})
    tv3, _ = tpl.update_template(pool, "t", "three {{a}}", base_version=1)
    assert tv3.params == {"temperature": 0.3} and tv3.input_schema == schema
    tv4, _ = tpl.update_template(pool, "t", "four {{a}}")
    assert tv4.input_schema == schema  # from the newest (3)
    tv5, _ = tpl.update_template(pool, "t", "five {{a}}", input_schema={})
    assert tv5.input_schema is None
    with pytest.raises(tpl.TemplateNotFound, match="has no version 99"):
        tpl.update_template(pool, "t", "x", base_version=99)


def test_update_of_unknown_template(pool):
    with pytest.raises(tpl.TemplateNotFound, match="no template named 'nope'"):
        tpl.update_template(pool, "nope", "x")


def test_versions_are_immutable_in_the_database(pool):
    tpl.create_template(pool, "t", "x")
    with pool.connection() as conn, pytest.raises(psycopg.errors.RaiseException, match="immutable"):
        conn.execute("UPDATE template_versions SET text = 'changed'")


def test_rollback_creates_a_new_version_recording_its_origin(pool):
    tpl.create_template(pool, "t", "one", params={"temperature": 0.1})
    tpl.update_template(pool, "t", "two", params={"temperature": 0.5})
    tv, created = tpl.rollback_to_version(pool, "t", 1, created_by="ops")
    assert created and tv.version == 3 and tv.rollback_of == 1 and tv.text == "one"
    assert tv.params == {"temperature": 0.1} and tv.created_by == "ops"
    assert tv.change_description == "Rollback to version 1"
    assert tv.content_sha256 == tpl.get_template_by_name(pool, "t", version=1).content_sha256
    again, created = tpl.rollback_to_version(pool, "t", 1)
    assert not created and again.version == 3
    with pytest.raises(tpl.TemplateNotFound, match="no version 7"):
        tpl.rollback_to_version(pool, "t", 7)


def test_content_hash_is_canonical(pool):
    a = tpl.create_template(pool, "a", CHAT, params={"temperature": 0.2, "max_tokens": 10})
    b = tpl.create_template(pool, "b", CHAT, params={"max_tokens": 10, "temperature": 0.2})
    assert a.content_sha256 == b.content_sha256
    assert a.content_sha256 == tpl.content_sha256("chat", CHAT, None, {"max_tokens": 10, "temperature": 0.2})
    c = tpl.create_template(pool, "c", "You are {{ role }}.")
    assert c.content_sha256 != a.content_sha256


# -- labels and fetching ------------------------------------------------------------------------------------------


def test_fetch_by_name_label_and_version(pool):
    tpl.create_template(pool, "t", "one")
    tpl.update_template(pool, "t", "two")
    tpl.update_template(pool, "t", "three")
    assert tpl.get_template_by_name(pool, "t").version == 3  # no production: latest
    assert tpl.render_template_by_name(pool, "t", {}).label == "latest"
    assert tpl.set_label(pool, "t", "production", 1, moved_by="ann")
    assert tpl.set_label(pool, "t", "staging", 2, moved_by="ann")
    assert tpl.get_template_by_name(pool, "t").version == 1  # production wins
    rendered = tpl.render_template_by_name(pool, "t", {})
    assert rendered.label == "production" and rendered.prompt == "one"
    assert rendered.messages == [{"role": "user", "content": "one"}]
    assert tpl.get_template_by_name(pool, "t", label="staging").version == 2
    assert tpl.get_template_by_name(pool, "t", label="latest").version == 3
    assert tpl.get_template_by_name(pool, "t", version=2).text == "two"
    assert tpl.render_template_by_name(pool, "t", {}, version=2).label is None
    assert tpl.render_template_by_name(pool, "t", {}, label="staging").label == "staging"
    with pytest.raises(tpl.TemplateNotFound, match="has no label 'canary'"):
        tpl.get_template_by_name(pool, "t", label="canary")
    with pytest.raises(tpl.TemplateNotFound, match=r"has no version 9 \(latest is 3\)"):
        tpl.get_template_by_name(pool, "t", version=9)
    with pytest.raises(tpl.TemplateNotFound, match="no template named 'zzz'"):
        tpl.get_template_by_name(pool, "zzz")
    with pytest.raises(LookupError):
        tpl.get_template_by_name(pool, "zzz")
    with pytest.raises(tpl.TemplateError, match="not both"):
        tpl.get_template_by_name(pool, "t", label="staging", version=1)
    assert tpl.get_labels(pool, "t") == {"production": 1, "staging": 2, "latest": 3}


def test_resolve_gives_the_version_and_the_label_that_chose_it(pool):
    tpl.create_template(pool, "t", "one")
    tpl.update_template(pool, "t", "two")
    tpl.update_template(pool, "t", "three")
    assert (tpl.resolve(pool, "t").version.version, tpl.resolve(pool, "t").label) == (3, "latest")
    tpl.set_label(pool, "t", "production", 1)
    tpl.set_label(pool, "t", "staging", 2)
    resolved = tpl.resolve(pool, "t")
    assert resolved == tpl.Resolved(tpl.get_template_by_name(pool, "t", version=1), "production")
    assert [(r.version.version, r.label) for r in (tpl.resolve(pool, ref) for ref in
                                                  ("t@staging", "t@latest", "t@2", " t@production "))] == [
        (2, "staging"), (3, "latest"), (2, None), (1, "production")]
    tpl.deactivate_template(pool, "t")
    assert tpl.resolve(pool, "t@3").version.text == "three"  # inactive templates still resolve
    with pytest.raises(tpl.TemplateNotFound, match="has no label 'canary'"):
        tpl.resolve(pool, "t@canary")
    with pytest.raises(tpl.TemplateNotFound, match=r"has no version 9 \(latest is 3\)"):
        tpl.resolve(pool, "t@9")
    with pytest.raises(tpl.TemplateNotFound, match="no template named 'zzz'"):
        tpl.resolve(pool, "zzz")
    with pytest.raises(tpl.TemplateError, match="is not a template reference"):
        tpl.resolve(pool, "Bad Name")


def test_label_moves_are_recorded(pool):
    tpl.create_template(pool, "t", "one")
    tpl.update_template(pool, "t", "two")
    assert tpl.set_label(pool, "t", "production", 1, moved_by="ann")
    assert not tpl.set_label(pool, "t", "production", 1, moved_by="ann")  # no move, no event
    assert tpl.set_label(pool, "t", "production", 2, moved_by="bob")
    assert tpl.set_label(pool, "t", "canary-eu", 2, moved_by="cy")
    assert tpl.remove_label(pool, "t", "canary-eu", moved_by="dee")
    assert not tpl.remove_label(pool, "t", "canary-eu")
    history = tpl.get_label_history(pool, "t")
    assert [(e.label, e.from_version, e.to_version, e.moved_by) for e in history] == [
        ("canary-eu", 2, None, "dee"), ("canary-eu", None, 2, "cy"), ("production", 1, 2, "bob"),
        ("production", None, 1, "ann")]
    assert all(history[i].moved_at >= history[i + 1].moved_at for i in range(len(history) - 1))
    assert [e.to_version for e in tpl.get_label_history(pool, "t", "production")] == [2, 1]
    assert tpl.get_template(pool, "t").labels == {"production": 2}


@pytest.mark.parametrize("label, message", [("latest", "always points at the newest"), ("Prod", "invalid label"),
                                            ("3", "invalid label"), ("a b", "invalid label")])
def test_invalid_labels_are_refused(pool, label, message):
    tpl.create_template(pool, "t", "one")
    with pytest.raises(tpl.TemplateError, match=message):
        tpl.set_label(pool, "t", label, 1)


def test_label_must_point_at_an_existing_version(pool):
    tpl.create_template(pool, "t", "one")
    with pytest.raises(tpl.TemplateNotFound, match="no version 5"):
        tpl.set_label(pool, "t", "production", 5)


def test_get_version_by_id_and_history(pool):
    v1 = tpl.create_template(pool, "t", "one")
    v2, _ = tpl.update_template(pool, "t", "two", created_by="x", change_description="second")
    assert tpl.get_version(pool, v1.id) == v1 and tpl.get_version(pool, v2.id) == v2
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_version(pool, 10**9)
    history = tpl.get_version_history(pool, "t")
    assert [(h.version, h.created_by, h.change_description) for h in history] == [(2, "x", "second"),
                                                                                   (1, "", "Created")]


# -- listing, activation, metadata, duplication ------------------------------------------------------------------


def test_list_search_filters_and_pagination(pool):
    for i in range(12):
        tpl.create_template(pool, f"tpl-{i:02d}", f"text {i}", category="even" if i % 2 == 0 else "odd",
                            tags=["t3"] if i % 3 == 0 else [], description="special" if i == 7 else "")
    tpl.deactivate_template(pool, "tpl-05")
    tpl.set_label(pool, "tpl-03", "production", 1)
    page = tpl.list_templates(pool, limit=5)
    assert page.total == 12 and len(page.items) == 5
    assert page.items[0].name == "tpl-03"  # labelled most recently
    names = [t.name for off in (0, 5, 10) for t in tpl.list_templates(pool, limit=5, offset=off).items]
    assert sorted(names) == [f"tpl-{i:02d}" for i in range(12)] and len(set(names)) == 12
    assert tpl.list_templates(pool, search="special").items[0].name == "tpl-07"
    assert tpl.list_templates(pool, search="TPL-1").total == 2
    assert tpl.list_templates(pool, search="%").total == 0  # LIKE wildcards are literal
    assert tpl.list_templates(pool, category="odd").total == 6
    assert tpl.list_templates(pool, tag="t3").total == 4
    assert tpl.list_templates(pool, active=False).total == 1
    assert tpl.list_templates(pool, active=True, category="odd").total == 5
    assert tpl.list_templates(pool, offset=100).total == 12
    row = next(t for t in tpl.list_templates(pool, search="tpl-03").items)
    assert row.labels == {"production": 1} and row.latest_version == 1
    by_name = tpl.list_templates(pool, order="name", limit=3)
    assert [t.name for t in by_name.items] == ["tpl-00", "tpl-01", "tpl-02"]
    assert tpl.list_categories(pool) == ["even", "odd"] and tpl.list_tags(pool) == ["t3"]


def test_activate_and_deactivate(pool):
    tpl.create_template(pool, "t", "hello")
    assert tpl.deactivate_template(pool, "t") and not tpl.deactivate_template(pool, "t")
    assert not tpl.get_template(pool, "t").active
    with pytest.raises(tpl.TemplateInactive, match="inactive"):
        tpl.render_template_by_name(pool, "t", {})
    tv = tpl.get_template_by_name(pool, "t")  # still fetchable, e.g. to replay an old execution
    assert tpl.render_template(pool, tv, {}).prompt == "hello"
    assert tpl.activate_template(pool, "t") and tpl.render_template_by_name(pool, "t", {}).prompt == "hello"
    with pytest.raises(tpl.TemplateNotFound):
        tpl.activate_template(pool, "nope")


def test_update_metadata_is_not_versioned(pool):
    tpl.create_template(pool, "t", "x")
    t = tpl.update_metadata(pool, "t", description="new", category=" cat ", tags="a, b,,a", owner="me")
    assert (t.description, t.category, t.tags, t.owner, t.latest_version) == ("new", "cat", ["a", "b"], "me", 1)


def test_duplicate_copies_content_and_metadata(pool):
    tpl.create_template(pool, "src", CHAT, category="c", tags=["x"], params={"temperature": 0.4},
                        output_schema={"type": "object"})
    tpl.update_template(pool, "src", [CHAT[0], {"role": "user", "content": "v2 {{ topic }}"}])
    copy = tpl.duplicate_template(pool, "src", "copy", created_by="me")
    assert copy.version == 1 and copy.messages[1]["content"] == "v2 {{ topic }}"
    assert copy.params == {"temperature": 0.4} and copy.output_schema == {"type": "object"}
    assert copy.change_description == "Duplicated from src@2"
    meta = tpl.get_template(pool, "copy")
    assert (meta.category, meta.tags) == ("c", ["x"])
    assert tpl.duplicate_template(pool, "src", "copy1", version=1).messages == CHAT
    with pytest.raises(tpl.TemplateExists):
        tpl.duplicate_template(pool, "src", "copy")


# -- diff -----------------------------------------------------------------------------------------------------------


def test_diff_unified_and_side_by_side(pool):
    tpl.create_template(pool, "t", "line a\nline b\nline c", params={"temperature": 0.1})
    tpl.update_template(pool, "t", "line a\nline B\nline c\nline d", params={"temperature": 0.2})
    diff = tpl.diff_versions(pool, "t", 1, 2)
    assert diff.changed
    assert "--- t@1" in diff.unified and "+++ t@2" in diff.unified
    assert "-line b" in diff.unified and "+line B" in diff.unified and "+line d" in diff.unified
    assert '-  "temperature": 0.1' in diff.unified and '+  "temperature": 0.2' in diff.unified
    rows = {(r.tag, r.left, r.right) for r in diff.side_by_side}
    assert ("replace", "line b", "line B") in rows and ("insert", "", "line d") in rows
    assert ("equal", "line a", "line a") in rows
    assert not tpl.diff_versions(pool, "t", 2, 2).changed
    with pytest.raises(tpl.TemplateNotFound):
        tpl.diff_versions(pool, "t", 1, 5)


def test_diff_documents_counts_lines():
    unified, rows = tpl.diff_documents("a\nb\n", "a\nc\nd\n", "x", "y")
    assert [(r.tag, r.left_no, r.right_no) for r in rows] == [("equal", 1, 1), ("replace", 2, 2), ("insert", None, 3)]


# -- export / import ------------------------------------------------------------------------------------------------


def _history_fixture(pool):
    tpl.create_template(pool, "alpha", "Hello {{ name }}", created_by="ann", category="greet", tags=["x"],
                        params={"temperature": 0.25, "stop": ["\n\n"]},
                        input_schema={"type": "object", "properties": {"name": {"type": "string"}}})
    tpl.update_template(pool, "alpha", "Hi {{ name }}!\n  trailing spaces  \n", created_by="bob",
                        change_description="shorter")
    tpl.rollback_to_version(pool, "alpha", 1, created_by="cy")
    tpl.set_label(pool, "alpha", "production", 2, moved_by="ann")
    tpl.set_label(pool, "alpha", "production", 3, moved_by="bob")
    tpl.set_label(pool, "alpha", "staging", 1, moved_by="ann")
    tpl.create_template(pool, "beta", CHAT, output_schema={"type": "object", "required": ["answer"]},
                        description="ünïcödé ✓")
    tpl.deactivate_template(pool, "beta")


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_import_round_trips_content_and_stamps_the_importer(pool, other_pool, tmp_path, fmt):
    _history_fixture(pool)
    path = tmp_path / f"export.{fmt}"
    assert tpl.export_to_file(pool, path) == 2
    started = tpl.get_template(pool, "beta").updated_at
    report = tpl.import_from_file(other_pool, path, imported_by="importer")
    assert sorted(report.created) == ["alpha", "beta"] and not report.extended and not report.diverged
    for name in ("alpha", "beta"):
        mine, theirs = tpl.get_version_history(other_pool, name), tpl.get_version_history(pool, name)
        assert [(v.version, v.content_sha256, v.content, v.params, v.input_schema, v.output_schema, v.rollback_of)
                for v in mine] == [(v.version, v.content_sha256, v.content, v.params, v.input_schema,
                                    v.output_schema, v.rollback_of) for v in theirs]
        # the importer made every version, now; the original author and time are kept as marked imported text
        assert all(v.created_by == "importer" and v.created_at > started for v in mine)
        for m, t in zip(mine, theirs):
            by = f", by {t.created_by}" if t.created_by else ""
            original = f"[original: version {t.version}{by}, at {t.created_at.isoformat()}]"
            assert m.change_description == (f"imported: {t.change_description} {original}" if t.change_description
                                            else f"imported: {original}")
    assert tpl.get_labels(other_pool, "alpha") == {"production": 3, "staging": 1, "latest": 3}
    # the label moves recorded are the import's own, not the file's history
    assert {(e.label, e.from_version, e.to_version, e.moved_by) for e in tpl.get_label_history(other_pool, "alpha")} \
        == {("production", None, 3, "importer"), ("staging", None, 1, "importer")}
    assert not tpl.get_template(other_pool, "beta").active
    assert tpl.render_template_by_name(other_pool, "alpha", {"name": "Zoe"}).prompt == "Hello Zoe"
    # importing the copy's export back where it came from changes nothing (same contents)
    again = tmp_path / f"again.{fmt}"
    tpl.export_to_file(other_pool, again)
    assert sorted(tpl.import_from_file(pool, again).unchanged) == ["alpha", "beta"]
    assert [v.created_by for v in tpl.get_version_history(pool, "alpha")] == ["cy", "bob", "ann"]


def test_import_over_existing_templates_never_rewrites_history(pool, other_pool, tmp_path):
    _history_fixture(pool)
    path = tmp_path / "export.yaml"
    tpl.export_to_file(pool, path, names=["alpha"])
    # the target already has alpha's first version (same content) and a diverged "gamma"
    tpl.import_templates(other_pool, {**tpl.load_export(path.read_text()), "templates": [
        {**tpl.export_templates(pool, ["alpha"])["templates"][0],
         "versions": tpl.export_templates(pool, ["alpha"])["templates"][0]["versions"][:1], "labels": {},
         "label_history": []}]})
    assert tpl.get_template(other_pool, "alpha").latest_version == 1
    report = tpl.import_from_file(other_pool, path, imported_by="importer")
    assert report.extended == {"alpha": 2} and report.labels_moved == 2
    assert [v.content_sha256 for v in tpl.get_version_history(other_pool, "alpha")] == [
        v.content_sha256 for v in tpl.get_version_history(pool, "alpha")]
    moves = tpl.get_label_history(other_pool, "alpha")
    assert {(e.label, e.to_version, e.moved_by) for e in moves} == {("production", 3, "importer"),
                                                                    ("staging", 1, "importer")}
    # importing the same file again changes nothing
    report = tpl.import_from_file(other_pool, path, imported_by="importer")
    assert report.unchanged == ["alpha"] and report.labels_moved == 0
    # diverged: other_pool's alpha gets a different version 4; importing a file with another version 4 appends it
    tpl.update_template(other_pool, "alpha", "local change {{ name }}", created_by="local")
    tpl.update_template(pool, "alpha", "remote change {{ name }}", created_by="remote", change_description="r")
    tpl.export_to_file(pool, path, names=["alpha"])
    before = [(v.version, v.content_sha256, v.created_at) for v in tpl.get_version_history(other_pool, "alpha")]
    report = tpl.import_from_file(other_pool, path)
    assert report.diverged == {"alpha": 1}
    after = tpl.get_version_history(other_pool, "alpha")
    assert [(v.version, v.content_sha256, v.created_at) for v in after[1:]] == before  # nothing rewritten
    assert after[0].version == 5 and after[0].text == "remote change {{ name }}"
    assert after[0].change_description.startswith("imported: r [original: version 4, by remote, at ")
    assert after[0].created_by == "import"   # no importer named


def test_import_refuses_bad_files_atomically(pool, tmp_path):
    tpl.create_template(pool, "keep", "x")
    data = tpl.export_templates(pool)
    data["templates"][0]["name"] = "first"
    second = {**data["templates"][0], "name": "second",
              "versions": [{**data["templates"][0]["versions"][0], "text": "tampered"}]}
    data["templates"].append(second)
    with pytest.raises(tpl.TemplateError, match="second version 1: content does not match its content_sha256"):
        tpl.import_templates(pool, data)
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_template(pool, "first")  # nothing of the file was imported
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: something-else\n")
    with pytest.raises(tpl.TemplateError, match="not a PromptDev templates export"):
        tpl.import_from_file(pool, bad)
    bad.write_text("{ not: [yaml")
    with pytest.raises(tpl.TemplateError, match="not valid YAML"):
        tpl.import_from_file(pool, bad)
    with pytest.raises(tpl.TemplateError, match="cannot read"):
        tpl.import_from_file(pool, tmp_path / "missing.json")
    with pytest.raises(tpl.TemplateNotFound, match="nope"):
        tpl.export_templates(pool, ["nope"])


# -- prompts kept in code -------------------------------------------------------------------------------------------


def test_register_code_prompts_creates_then_versions_only_on_change(pool):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    prompts = {"code.summary": "Summarise {{ text }}",
               "code.chat": {"content": CHAT, "params": {"temperature": 0.0}, "description": "from code"}}
    first = tpl.register_code_prompts(pool, prompts)
    assert {k: (v.version, created) for k, (v, created) in first.items()} == {"code.summary": (1, True),
                                                                               "code.chat": (1, True)}
    assert first["code.summary"][0].git_commit == head and len(head) == 40
    assert "test_templates.py" in first["code.summary"][0].change_description
    assert tpl.get_template(pool, "code.chat").description == "from code"
    second = tpl.register_code_prompts(pool, prompts)
    assert all(not created for _, created in second.values())
    third = tpl.register_code_prompts(pool, {"code.summary": "Summarise briefly {{ text }}"}, git_commit="f" * 40)
    tv, created = third["code.summary"]
    assert created and tv.version == 2 and tv.git_commit == "f" * 40


def test_register_code_prompts_outside_git_records_no_commit(pool, tmp_path):
    caller = tmp_path / "app.py"
    caller.write_text("")
    tv, created = tpl.register_code_prompts(pool, {"plain": "hi"}, caller_path=caller)["plain"]
    assert created and tv.git_commit is None


def test_register_code_prompts_in_another_repository(pool, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "prompts.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tv, _ = tpl.register_code_prompts(pool, {"repo.p": "hi"}, caller_path=repo / "prompts.py")["repo.p"]
    assert tv.git_commit == head


def test_register_code_prompts_validates(pool):
    with pytest.raises(tpl.TemplateSyntaxError):
        tpl.register_code_prompts(pool, {"x": "{{ oops"})
    with pytest.raises(tpl.TemplateError, match="unknown key"):
        tpl.register_code_prompts(pool, {"x": {"content": "a", "colour": "red"}})


# -- concurrency ------------------------------------------------------------------------------------------------------


def _update_many(url: str, worker: int, count: int, queue) -> None:
    pool = db.open_pool(url, max_size=2)
    try:
        created = []
        for i in range(count):
            tv, new = tpl.update_template(pool, "shared", f"worker {worker} edit {i} {{{{ x }}}}",
                                          created_by=f"w{worker}")
            assert new
            created.append(tv.version)
        queue.put(created)
    finally:
        pool.close()


def test_concurrent_updates_from_many_processes(pool, database_url):
    tpl.create_template(pool, "shared", "start {{ x }}")
    workers, count = 4, 10
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_update_many, args=(database_url, w, count, queue)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    returned = sorted(v for r in results for v in r)
    assert returned == list(range(2, 2 + workers * count))  # each version handed out once
    history = tpl.get_version_history(pool, "shared")
    assert [v.version for v in history] == list(range(1 + workers * count, 0, -1))
    texts = [v.text for v in history[:-1]]
    assert sorted(texts) == sorted(f"worker {w} edit {i} {{{{ x }}}}" for w in range(workers) for i in range(count))
    assert tpl.get_template(pool, "shared").latest_version == 1 + workers * count
    for w in range(workers):  # each worker's edits kept their order
        mine = [v.version for v in sorted(history, key=lambda v: v.version) if v.created_by == f"w{w}"]
        texts = [tpl.get_template_by_name(pool, "shared", version=n).text for n in mine]
        assert texts == [f"worker {w} edit {i} {{{{ x }}}}" for i in range(count)]


def _register(url: str, queue) -> None:
    pool = db.open_pool(url, max_size=2)
    try:
        result = tpl.register_code_prompts(pool, {"race": "same {{ x }}"}, git_commit="a" * 40)
        queue.put(result["race"][1])
    finally:
        pool.close()


def test_concurrent_registration_creates_one_template(pool, database_url):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_register, args=(database_url, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    created = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert created == [False, False, True]
    assert [v.version for v in tpl.get_version_history(pool, "race")] == [1]


# -- found in review ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ("a\x00b {{ x }}", r"the prompt contains a NUL character"),
    ([{"role": "user", "content": "ok \ud800"}], r"message 1 \(user\) contains characters that are not valid Unicode"),
])
def test_content_postgres_cannot_store_is_refused_clearly(pool, content, message):
    with pytest.raises(tpl.TemplateError, match=message):
        tpl.create_template(pool, "t", content)
    with pytest.raises(tpl.TemplateNotFound):
        tpl.get_template(pool, "t")


@pytest.mark.parametrize("mangle, message", [
    (lambda t: t.update(tags=5), "alpha: tags must be a list of text"),
    (lambda t: t.update(description=["x"]), "alpha: description must be text"),
    (lambda t: t["versions"][0].pop("version"), "versions must be numbered"),
    (lambda t: t.update(labels={"production": {"moved_by": "x"}}), "alpha: label 'production' points at unknown"),
    (lambda t: t.update(labels={"production": {"version": "two"}}), "alpha: label 'production' points at unknown"),
    (lambda t: t.update(labels={"production": "two"}), "alpha: label 'production' points at unknown"),
    (lambda t: t.update(versions="nope"), "alpha"),
    (lambda t: t.update(labels={"Production": 1}), r"alpha: invalid label 'Production'"),
    (lambda t: t.update(labels={"production\n": 1}), r"alpha: invalid label 'production\\n'"),
    (lambda t: t.update(labels={"latest": 1}), r"alpha: 'latest' always points at the newest version"),
    (lambda t: t.update(labels={"x" * 64: 1}), r"alpha: invalid label 'xxx"),
    (lambda t: t.update(labels={"prod uction": 1}), r"alpha: invalid label 'prod uction'"),
    (lambda t: t.update(labels={"<script>": 1}), r"alpha: invalid label '<script>'"),
    (lambda t: t.update(labels=["production"]), r"alpha: labels must be a mapping"),
    (lambda t: t["versions"][0].update(rollback_of="1"), r"alpha version 1: rollback_of must be an earlier version"),
    (lambda t: t["versions"][0].update(created_at="yesterday"), r"alpha version 1: invalid timestamp 'yesterday'"),
    (lambda t: t["versions"][0].update(created_by=["root"]), r"alpha version 1: created_by must be text"),
    (lambda t: t["versions"][0].update(change_description="a\x00b"), r"change_description contains a NUL"),
    (lambda t: t["versions"][0].update(version="1"), r"versions must be numbered"),
    (lambda t: t.update(active="no"), r"alpha: active must be true or false"),
    (lambda t: t.update(name="alpha\n"), r"invalid template name"),
    (lambda t: t.update(owner="a\x00"), r"alpha: owner contains a NUL"),
])
def test_import_of_malformed_data_is_one_clear_error_and_writes_nothing(pool, other_pool, mangle, message):
    tpl.create_template(pool, "alpha", "A {{ x }}")
    tpl.set_label(pool, "alpha", "production", 1)
    tpl.create_template(pool, "zeta", "Z")
    data = tpl.export_templates(pool)
    mangle(data["templates"][0])
    with pytest.raises(tpl.TemplateError, match=message):
        tpl.import_templates(other_pool, data)
    assert tpl.list_templates(other_pool).total == 0  # not even the good template
    with pytest.raises(tpl.TemplateError, match="no 'templates' list"):
        tpl.import_templates(other_pool, {"templates": 5})


def test_register_code_prompts_is_all_or_nothing(pool):
    with pytest.raises(tpl.TemplateSyntaxError, match=r"^broken: syntax error at line 1"):
        tpl.register_code_prompts(pool, {"fine": "ok {{ x }}", "broken": "{{ oops"})
    with pytest.raises(tpl.IncludeError, match="include 'ghost'"):
        tpl.register_code_prompts(pool, {"fine": "ok {{ x }}", "uses-ghost": "{% include 'ghost' %}"})
    assert tpl.list_templates(pool).total == 0
    # prompts registered together may include one another
    result = tpl.register_code_prompts(pool, {"a-main": "Main: {% include 'z-part' %}", "z-part": "part {{ x }}"})
    assert list(result) == ["a-main", "z-part"] and all(created for _, created in result.values())
    assert tpl.render_template_by_name(pool, "a-main", {"x": 1}).prompt == "Main: part 1"


@pytest.mark.parametrize("call, message", [
    (lambda p: tpl.rollback_to_version(p, "t", "1"), "version must be a whole number, got '1'"),
    (lambda p: tpl.set_label(p, "t", "production", True), "version must be a whole number, got True"),
    (lambda p: tpl.diff_versions(p, "t", 1, 2.0), "version must be a whole number, got 2.0"),
    (lambda p: tpl.list_templates(p, limit="many"), "limit and offset must be whole numbers"),
    (lambda p: tpl.create_template(p, "u", "x", tags=5), "tags must be a list of text"),
    (lambda p: tpl.create_template(p, "u", "x", category=3), "category must be text"),
    (lambda p: tpl.update_metadata(p, "t", owner=["me"]), "owner must be text"),
])
def test_api_misuse_is_a_typed_one_line_error(pool, call, message):
    tpl.create_template(pool, "t", "one")
    with pytest.raises(tpl.TemplateError, match=message):
        call(pool)
    assert [t.name for t in tpl.list_templates(pool).items] == ["t"]


# -- the error contract ----------------------------------------------------------------------------------------


def test_template_errors_are_each_of_one_contract_kind():
    from core import errors

    kinds = {tpl.TemplateNotFound: errors.NotFound, tpl.TemplateExists: errors.Conflict,
             tpl.TemplateInactive: errors.Conflict, tpl.InvalidTemplateInput: errors.InvalidInput,
             tpl.TemplateSyntaxError: errors.InvalidInput, tpl.IncludeError: errors.InvalidInput,
             tpl.RenderError: errors.InvalidInput, tpl.MissingVariables: errors.InvalidInput,
             tpl.InvalidVariables: errors.InvalidInput, tpl.RenderLimitExceeded: errors.InvalidInput,
             tpl.SandboxViolation: errors.InvalidInput}

    def subclasses(cls: type) -> set[type]:
        return {c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))}

    assert subclasses(tpl.TemplateError) == set(kinds)
    for cls, kind in kinds.items():
        assert issubclass(cls, ValueError) and issubclass(cls, errors.PromptDevError)
        assert [k for k in errors.KINDS if issubclass(cls, k)] == [kind] and cls.status == kind.status, cls
    assert issubclass(tpl.TemplateNotFound, LookupError)
