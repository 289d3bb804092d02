"""Datasets: named collections of items (input variables, expected output, tags, metadata) to evaluate prompts on.

Items keep revisions: an item that an evaluation run used is never edited in place — an edit adds a revision and
the run keeps pointing at the one it evaluated. Items import from CSV and JSONL (with a column mapping, a preview,
every rejected row reported with its line number; bulk writes use COPY) and export to both.

An item may carry its own evaluators in `metadata["assert"]` (promptfoo's per-test `assert`), run in addition to
the run's.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from core import evaluators, executions, untrusted
from core.conversations import nul_at, nul_message
from core.db import jsonb
from core.errors import Conflict, InvalidInput, NotFound
from core.text import csv_row, csv_unescape

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FORMATS = ("csv", "jsonl")
ROLES = ("var", "json", "expected", "tags", "metadata", "meta", "assert", "ignore")
MAX_TAG_LEN = 100
MAX_IMPORT_BYTES = 64 * 1024 * 1024   # a CSV or JSONL file to import (README "Limits"); TooLarge beyond
_UNSET: Any = object()
Progress = Callable[[float, str], None]


class DatasetError(InvalidInput):
    """A dataset, item or file cannot be accepted as given (a ValueError); the message says why in one line."""


class DatasetNotFound(NotFound):
    """No such dataset, item or item revision (a LookupError)."""


class DatasetExists(Conflict, DatasetError):
    """A dataset of that name exists already."""


class DatasetInUse(Conflict, DatasetError):
    """The dataset cannot be deleted: evaluation runs refer to it."""


@dataclass(frozen=True)
class Dataset:
    """A dataset and how many (current) items it holds."""

    id: int
    name: str
    description: str
    default_template: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    item_count: int = 0


@dataclass(frozen=True)
class Item:
    """A dataset item at its current revision."""

    id: int
    dataset_id: int
    revision: int
    revision_id: int
    input: dict[str, Any]
    expected: str | None
    tags: list[str]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    used: bool = False  # a run evaluated this revision: the next edit makes a new revision

    @property
    def content(self) -> "ItemInput":
        """What the item holds, without identity."""
        return ItemInput(dict(self.input), self.expected, tuple(self.tags), dict(self.metadata))


@dataclass(frozen=True)
class ItemRevision:
    """One revision of an item, as a run evaluated it."""

    id: int
    item_id: int
    revision: int
    input: dict[str, Any]
    expected: str | None
    tags: list[str]
    metadata: dict[str, Any]
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class ItemInput:
    """The content of an item: input variables, expected output, tags and metadata (validated by make_item)."""

    input: dict[str, Any]
    expected: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    """A row that was not imported: its line in the file and why."""

    line: int
    reason: str


@dataclass
class ParsedFile:
    """A CSV or JSONL file read with a column mapping: the items it gives and the rows it rejects."""

    format: str
    columns: list[str]
    mapping: dict[str, str]
    items: list[ItemInput]
    lines: list[int]
    rejected: list[Rejected]
    rows: int


@dataclass(frozen=True)
class ImportReport:
    """What an import did."""

    dataset: str
    imported: int
    rows: int
    rejected: list[Rejected]
    created: bool

    def summary(self) -> str:
        """One line for humans."""
        text = f"imported {self.imported} of {self.rows} row(s) into {self.dataset!r}"
        if self.rejected:
            text += f"; {len(self.rejected)} rejected"
        return text


@dataclass(frozen=True)
class EditSummary:
    """What apply_edits changed."""

    added: int = 0
    updated: int = 0     # edited in place (no run had used the revision)
    revised: int = 0     # new revisions (a run had used the old one)
    deleted: int = 0     # removed
    archived: int = 0    # removed from the dataset but kept, since a run used them


# ---------------------------------------------------------------------------------------------------- validation

def check_name(name: str) -> str:
    """The dataset name, or DatasetError saying what a name may hold."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DatasetError(f"dataset name must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or "
                           f"digit, got {name!r}")
    return name


_PLAIN = (str, int, bool, type(None))


def _json_ok(value: Any, what: str) -> Any:
    if type(value) is dict and all(type(k) is str and (isinstance(v, _PLAIN) or (type(v) is float and math.isfinite(v)))
                                   for k, v in value.items()):
        return value  # the common case (CSV cells): already plain JSON, no round trip
    try:
        return json.loads(json.dumps(value, allow_nan=False, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what} is not JSON: {exc}") from None


def clean_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    """Tags as a tuple of distinct non-empty strings (a string is split on commas and semicolons)."""
    if tags is None:
        return ()
    if isinstance(tags, str):
        if not tags.strip():
            return ()
        tags = re.split(r"[,;]", tags) if ("," in tags or ";" in tags) else [tags]
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise DatasetError(f"a tag must be text, got {tag!r}")
        tag = tag.strip()
        if not tag:
            continue
        if len(tag) > MAX_TAG_LEN:
            raise DatasetError(f"tag longer than {MAX_TAG_LEN} characters: {tag[:20]!r}…")
        if "," in tag or ";" in tag:
            raise DatasetError(f"a tag may not contain ',' or ';': {tag!r}")
        if tag not in out:
            out.append(tag)
    return tuple(out)


def make_item(input: Mapping[str, Any] | None = None, expected: Any = None, tags: Iterable[str] | str | None = (),
              metadata: Mapping[str, Any] | None = None) -> ItemInput:
    """A validated item: input is a JSON object, expected text (or None), tags clean, metadata a JSON object whose
    optional `assert` list holds valid evaluators."""
    if input is None:
        input = {}
    if type(input) is not dict and not isinstance(input, Mapping):
        raise DatasetError(f"input must be a JSON object of variables, got {type(input).__name__}")
    for key in input:
        if not isinstance(key, str) or not key:
            raise DatasetError(f"variable names must be non-empty text, got {key!r}")
    data = _json_ok(dict(input), "input")
    if expected is not None and not isinstance(expected, str):
        expected = json.dumps(_json_ok(expected, "expected output"), ensure_ascii=False)
    meta = {} if metadata is None else metadata
    if type(meta) is not dict and not isinstance(meta, Mapping):
        raise DatasetError(f"metadata must be a JSON object, got {type(meta).__name__}")
    meta = _json_ok(dict(meta), "metadata")
    tags = clean_tags(tags)
    for what, value in (("the input", data), ("the expected output", expected), ("the metadata", meta),
                        *((f"tag {tag!r}", tag) for tag in tags)):
        where = nul_at(value)  # PostgreSQL stores no NUL in text or jsonb
        if where is not None:
            raise DatasetError(nul_message(what, where))
    if "assert" in meta:
        asserts = meta["assert"]
        if isinstance(asserts, (str, Mapping)):
            asserts = [asserts]
        if not isinstance(asserts, list):
            raise DatasetError("metadata.assert must be a list of evaluators")
        meta["assert"] = [e.to_dict() for e in evaluators.parse_all(asserts, allow_unsupported=True)]
        if not meta["assert"]:
            del meta["assert"]
    return ItemInput(data, expected, tags, meta)


def _as_item(value: ItemInput | Mapping[str, Any]) -> ItemInput:
    if isinstance(value, ItemInput):
        return make_item(value.input, value.expected, value.tags, value.metadata)
    if not isinstance(value, Mapping):
        raise DatasetError(f"an item must be a mapping with input/expected/tags/metadata, got {type(value).__name__}")
    unknown = set(value) - {"input", "vars", "expected", "tags", "metadata"}
    if unknown:
        raise DatasetError(f"unknown item field(s): {', '.join(sorted(unknown))}")
    return make_item(value.get("input", value.get("vars")), value.get("expected"), value.get("tags"),
                     value.get("metadata"))


# ------------------------------------------------------------------------------------------------------- datasets

_DATASET_COLUMNS = ("d.id, d.name, d.description, d.default_template, d.created_by, d.created_at, d.updated_at, "
                    "(SELECT count(*) FROM dataset_items i WHERE i.dataset_id = d.id AND i.deleted_at IS NULL)::int "
                    "AS item_count")


def create_dataset(pool: ConnectionPool, name: str, *, description: str = "", default_template: str | None = None,
                   created_by: str = "") -> Dataset:
    """Create an empty dataset; DatasetExists when the name is taken, DatasetError when it is invalid."""
    check_name(name)
    with pool.connection() as conn:
        try:
            conn.execute("INSERT INTO datasets (name, description, default_template, created_by) "
                         "VALUES (%s, %s, %s, %s)",
                         (name, description or "", (default_template or "").strip() or None, created_by or ""))
        except psycopg.errors.UniqueViolation:
            raise DatasetExists(f"a dataset named {name!r} already exists") from None
    return get_dataset(pool, name)


def get_dataset(pool: ConnectionPool | psycopg.Connection, name: str) -> Dataset:
    """A dataset by name; DatasetNotFound when there is none."""
    query = f"SELECT {_DATASET_COLUMNS} FROM datasets d WHERE d.name = %s"
    if isinstance(pool, psycopg.Connection):
        with pool.cursor(row_factory=class_row(Dataset)) as cur:
            row = cur.execute(query, (name,)).fetchone()
    else:
        with pool.connection() as conn, conn.cursor(row_factory=class_row(Dataset)) as cur:
            row = cur.execute(query, (name,)).fetchone()
    if row is None:
        raise DatasetNotFound(f"no dataset named {name!r}")
    return row


def get_dataset_by_id(pool: ConnectionPool, dataset_id: int) -> Dataset:
    """A dataset by id; DatasetNotFound when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Dataset)) as cur:
        row = cur.execute(f"SELECT {_DATASET_COLUMNS} FROM datasets d WHERE d.id = %s", (dataset_id,)).fetchone()
    if row is None:
        raise DatasetNotFound(f"no dataset with id {dataset_id}")
    return row


def list_datasets(pool: ConnectionPool, *, search: str = "") -> list[Dataset]:
    """Every dataset (optionally whose name or description contains search), most recently updated first."""
    query = f"SELECT {_DATASET_COLUMNS} FROM datasets d"
    args: tuple = ()
    if search.strip():
        query += " WHERE d.name ILIKE %s OR d.description ILIKE %s"
        like = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args = (like, like)
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Dataset)) as cur:
        return cur.execute(query + " ORDER BY d.updated_at DESC, d.id DESC", args).fetchall()


def update_dataset(pool: ConnectionPool, name: str, *, description: str | None = None,
                   default_template: str | None = _UNSET, new_name: str | None = None) -> Dataset:
    """Change a dataset's description, default template or name."""
    sets, args = [], []
    if description is not None:
        sets.append("description = %s")
        args.append(description)
    if default_template is not _UNSET:
        sets.append("default_template = %s")
        args.append((default_template or "").strip() or None)
    if new_name is not None and new_name != name:
        sets.append("name = %s")
        args.append(check_name(new_name))
    if sets:
        with pool.connection() as conn:
            try:
                cur = conn.execute(f"UPDATE datasets SET {', '.join(sets)}, updated_at = now() WHERE name = %s",
                                   (*args, name))
            except psycopg.errors.UniqueViolation:
                raise DatasetExists(f"a dataset named {new_name!r} already exists") from None
            if cur.rowcount == 0:
                raise DatasetNotFound(f"no dataset named {name!r}")
    return get_dataset(pool, new_name or name)


def delete_dataset(pool: ConnectionPool, name: str, *, with_runs: bool = False) -> None:
    """Delete a dataset and its items; refused while evaluation runs refer to it unless with_runs deletes them too."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT id FROM datasets WHERE name = %s FOR UPDATE", (name,)).fetchone()
        if row is None:
            raise DatasetNotFound(f"no dataset named {name!r}")
        runs = conn.execute("SELECT count(*) FROM eval_runs WHERE dataset_id = %s", (row[0],)).fetchone()[0]
        if runs and not with_runs:
            raise DatasetInUse(f"dataset {name!r} has {runs} evaluation run(s); delete them first "
                               f"(or delete with runs)")
        conn.execute("DELETE FROM eval_runs WHERE dataset_id = %s", (row[0],))
        conn.execute("DELETE FROM datasets WHERE id = %s", (row[0],))


def _dataset_id(conn: psycopg.Connection, name: str, *, create: bool = False, created_by: str = "",
                default_template: str | None = None, lock: bool = False) -> tuple[int, bool]:
    row = conn.execute("SELECT id FROM datasets WHERE name = %s" + (" FOR UPDATE" if lock else ""), (name,)).fetchone()
    if row is not None:
        return row[0], False
    if not create:
        raise DatasetNotFound(f"no dataset named {name!r}")
    check_name(name)
    row = conn.execute(
        "INSERT INTO datasets (name, default_template, created_by) VALUES (%s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET updated_at = now() RETURNING id, (xmax = 0) AS inserted",
        (name, default_template, created_by or "")).fetchone()
    return row[0], bool(row[1])


# ---------------------------------------------------------------------------------------------------------- items

_ITEM_SELECT = ("SELECT i.id, i.dataset_id, i.revision, r.id AS revision_id, r.input, r.expected, r.tags, r.metadata, "
                "i.created_at, r.created_at AS updated_at, "
                "EXISTS (SELECT 1 FROM eval_work_items w WHERE w.item_revision_id = r.id) AS used "
                "FROM dataset_items i JOIN dataset_item_revisions r ON r.item_id = i.id AND r.revision = i.revision")


_NULL = "\\N"
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode   # built once: json.dumps(..., ensure_ascii=False) is slower


def _copy_escape(text: str) -> str:
    """A value in COPY's text format: backslash, newline, carriage return and tab escaped."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\n" in text or "\r" in text or "\t" in text:
        text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return text


def _array_literal(values: Sequence[str]) -> str:
    """A text[] literal: {"a","b"}."""
    if not values:
        return "{}"
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _revision_line(item_id: int, item: ItemInput, author: str) -> str:
    """One revision-1 row in COPY's text format (written directly: several times faster than a row at a time)."""
    return (f"{item_id}\t1\t{_copy_escape(_ENCODE(item.input))}\t"
            f"{_NULL if item.expected is None else _copy_escape(item.expected)}\t"
            f"{_copy_escape(_array_literal(item.tags))}\t"
            f"{_copy_escape(_ENCODE(item.metadata)) if item.metadata else '{}'}\t{author}\n")


def _copy_items(conn: psycopg.Connection, dataset_id: int, items: Sequence[ItemInput], created_by: str,
                progress: Progress | None = None) -> list[int]:
    """Write items with COPY (ids drawn from the sequences first); return the new item ids."""
    n = len(items)
    if n == 0:
        return []
    item_ids = sorted(conn.execute(
        "SELECT array_agg(nextval(pg_get_serial_sequence('dataset_items', 'id'))) FROM generate_series(1, %s)",
        (n,)).fetchone()[0])
    with conn.cursor() as cur:
        with cur.copy("COPY dataset_items (id, dataset_id, revision) FROM STDIN") as copy:
            copy.write("".join(f"{item_id}\t{dataset_id}\t1\n" for item_id in item_ids))
        if progress:
            progress(0.5, "items written")
        step = max(1, n // 10)
        author = _copy_escape(created_by or "")
        with cur.copy("COPY dataset_item_revisions (item_id, revision, input, expected, tags, metadata, created_by) "
                      "FROM STDIN") as copy:
            chunk: list[str] = []
            for k, (item_id, item) in enumerate(zip(item_ids, items)):
                chunk.append(_revision_line(item_id, item, author))
                if len(chunk) >= 5000:
                    copy.write("".join(chunk))
                    chunk = []
                if progress and k % step == 0:
                    progress(0.5 + 0.5 * k / n, f"{k:,} of {n:,} items")
            if chunk:
                copy.write("".join(chunk))
    conn.execute("UPDATE datasets SET updated_at = now() WHERE id = %s", (dataset_id,))
    return item_ids


def add_items(pool: ConnectionPool, dataset_name: str, items: Iterable[ItemInput | Mapping[str, Any]], *,
              create: bool = False, created_by: str = "", progress: Progress | None = None) -> list[int]:
    """Add items in one transaction (COPY); DatasetError naming the first invalid item, and nothing is added."""
    checked = []
    for i, item in enumerate(items, start=1):
        try:
            checked.append(_as_item(item))
        except ValueError as exc:
            raise DatasetError(f"item {i}: {exc}") from None
    with pool.connection() as conn, conn.transaction():
        dataset_id, _ = _dataset_id(conn, dataset_name, create=create, created_by=created_by)
        return _copy_items(conn, dataset_id, checked, created_by, progress)


def add_item(pool: ConnectionPool, dataset_name: str, input: Mapping[str, Any], expected: Any = None,
             tags: Iterable[str] | str | None = (), metadata: Mapping[str, Any] | None = None, *,
             create: bool = False, created_by: str = "") -> Item:
    """Add one item and return it."""
    (item_id,) = add_items(pool, dataset_name, [make_item(input, expected, tags, metadata)], create=create,
                           created_by=created_by)
    return get_item(pool, item_id)


def get_item(pool: ConnectionPool, item_id: int) -> Item:
    """An item at its current revision; DatasetNotFound when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Item)) as cur:
        row = cur.execute(_ITEM_SELECT + " WHERE i.id = %s", (item_id,)).fetchone()
    if row is None:
        raise DatasetNotFound(f"no dataset item with id {item_id}")
    return row


def list_items(pool: ConnectionPool, dataset_name: str, *, tag: str | None = None, search: str = "",
               limit: int | None = None, offset: int = 0) -> list[Item]:
    """A dataset's current items in order of addition, optionally with a tag or containing a text."""
    with pool.connection() as conn:
        dataset_id, _ = _dataset_id(conn, dataset_name)
        query, args = _ITEM_SELECT + " WHERE i.dataset_id = %s AND i.deleted_at IS NULL", [dataset_id]
        if tag:
            query += " AND %s = ANY (r.tags)"
            args.append(tag)
        if search.strip():
            like = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            query += " AND (r.input::text ILIKE %s OR coalesce(r.expected, '') ILIKE %s)"
            args += [like, like]
        query += " ORDER BY i.id"
        if limit is not None:
            query += " LIMIT %s OFFSET %s"
            args += [limit, offset]
        with conn.cursor(row_factory=class_row(Item)) as cur:
            return cur.execute(query, args).fetchall()


def count_items(pool: ConnectionPool, dataset_name: str, *, tag: str | None = None) -> int:
    """How many current items a dataset has (with a tag, if given)."""
    with pool.connection() as conn:
        dataset_id, _ = _dataset_id(conn, dataset_name)
        query = ("SELECT count(*) FROM dataset_items i JOIN dataset_item_revisions r ON r.item_id = i.id "
                 "AND r.revision = i.revision WHERE i.dataset_id = %s AND i.deleted_at IS NULL")
        args: list[Any] = [dataset_id]
        if tag:
            query += " AND %s = ANY (r.tags)"
            args.append(tag)
        return conn.execute(query, args).fetchone()[0]


def dataset_tags(pool: ConnectionPool, dataset_name: str) -> list[str]:
    """Every tag used by a dataset's current items, sorted."""
    with pool.connection() as conn:
        dataset_id, _ = _dataset_id(conn, dataset_name)
        rows = conn.execute(
            "SELECT DISTINCT t FROM dataset_items i JOIN dataset_item_revisions r ON r.item_id = i.id "
            "AND r.revision = i.revision, unnest(r.tags) AS t WHERE i.dataset_id = %s AND i.deleted_at IS NULL "
            "ORDER BY t", (dataset_id,)).fetchall()
    return [r[0] for r in rows]


def dataset_variables(pool: ConnectionPool, dataset_name: str) -> list[str]:
    """Every input variable name used by a dataset's current items, in order of first use."""
    with pool.connection() as conn:
        dataset_id, _ = _dataset_id(conn, dataset_name)
        rows = conn.execute(
            "SELECT k FROM (SELECT k, min(i.id) AS first FROM dataset_items i JOIN dataset_item_revisions r "
            "ON r.item_id = i.id AND r.revision = i.revision, jsonb_object_keys(r.input) AS k "
            "WHERE i.dataset_id = %s AND i.deleted_at IS NULL GROUP BY k) s ORDER BY first, k",
            (dataset_id,)).fetchall()
    return [r[0] for r in rows]


def get_revision(pool: ConnectionPool, revision_id: int) -> ItemRevision:
    """One item revision by id; DatasetNotFound when there is none."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(ItemRevision)) as cur:
        row = cur.execute("SELECT id, item_id, revision, input, expected, tags, metadata, created_by, created_at "
                          "FROM dataset_item_revisions WHERE id = %s", (revision_id,)).fetchone()
    if row is None:
        raise DatasetNotFound(f"no dataset item revision with id {revision_id}")
    return row


def item_history(pool: ConnectionPool, item_id: int) -> list[ItemRevision]:
    """Every revision of an item, newest first."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(ItemRevision)) as cur:
        rows = cur.execute("SELECT id, item_id, revision, input, expected, tags, metadata, created_by, created_at "
                           "FROM dataset_item_revisions WHERE item_id = %s ORDER BY revision DESC",
                           (item_id,)).fetchall()
    if not rows:
        raise DatasetNotFound(f"no dataset item with id {item_id}")
    return rows


def _edit(conn: psycopg.Connection, item_id: int, new: ItemInput, edited_by: str,
          dataset_id: int | None = None) -> str:
    """Apply one edit inside a transaction: 'unchanged', 'updated' (in place) or 'revised' (new revision)."""
    row = conn.execute(
        "SELECT i.dataset_id, i.revision, r.id, r.input, r.expected, r.tags, r.metadata FROM dataset_items i "
        "JOIN dataset_item_revisions r ON r.item_id = i.id AND r.revision = i.revision "
        "WHERE i.id = %s AND i.deleted_at IS NULL FOR UPDATE OF i, r", (item_id,)).fetchone()
    if row is None or (dataset_id is not None and row[0] != dataset_id):
        raise DatasetNotFound(f"no dataset item with id {item_id}" + (" in this dataset" if row is not None else ""))
    _, revision, revision_id, old_input, old_expected, old_tags, old_meta = row
    if (old_input, old_expected, list(old_tags), old_meta) == (new.input, new.expected, list(new.tags), new.metadata):
        return "unchanged"
    used = conn.execute("SELECT EXISTS (SELECT 1 FROM eval_work_items WHERE item_revision_id = %s)",
                        (revision_id,)).fetchone()[0]
    values = {"item_id": item_id, "revision": revision + 1, "revision_id": revision_id, "input": jsonb(new.input),
              "expected": new.expected, "tags": list(new.tags), "metadata": jsonb(new.metadata),
              "created_by": edited_by}
    if used:
        conn.execute(
            "INSERT INTO dataset_item_revisions (item_id, revision, input, expected, tags, metadata, created_by) "
            "VALUES (%(item_id)s, %(revision)s, %(input)s, %(expected)s, %(tags)s, %(metadata)s, %(created_by)s)",
            values)
        conn.execute("UPDATE dataset_items SET revision = %(revision)s WHERE id = %(item_id)s", values)
        return "revised"
    conn.execute("UPDATE dataset_item_revisions SET input = %(input)s, expected = %(expected)s, tags = %(tags)s, "
                 "metadata = %(metadata)s, created_by = %(created_by)s, created_at = now() WHERE id = %(revision_id)s",
                 values)
    return "updated"


def update_item(pool: ConnectionPool, item_id: int, *, input: Mapping[str, Any] = _UNSET, expected: Any = _UNSET,
                tags: Iterable[str] | str = _UNSET, metadata: Mapping[str, Any] = _UNSET,
                edited_by: str = "") -> Item:
    """Change an item; if a run used its current revision, the change becomes a new revision."""
    current = get_item(pool, item_id)
    new = make_item(current.input if input is _UNSET else input,
                    current.expected if expected is _UNSET else expected,
                    current.tags if tags is _UNSET else tags,
                    current.metadata if metadata is _UNSET else metadata)
    with pool.connection() as conn, conn.transaction():
        outcome = _edit(conn, item_id, new, edited_by)
        if outcome != "unchanged":
            conn.execute("UPDATE datasets SET updated_at = now() WHERE id = %s", (current.dataset_id,))
    return get_item(pool, item_id)


def _delete(conn: psycopg.Connection, item_ids: Sequence[int], dataset_id: int | None = None) -> tuple[int, int]:
    """(deleted, archived): items no run used are deleted, the others hidden but kept for their runs."""
    if not item_ids:
        return 0, 0
    ids = list(item_ids)
    scope = " AND dataset_id = %s" if dataset_id is not None else ""
    extra = [dataset_id] if dataset_id is not None else []
    found = conn.execute("SELECT count(*) FROM dataset_items WHERE id = ANY(%s) AND deleted_at IS NULL" + scope,
                         [ids, *extra]).fetchone()[0]
    if found != len(set(ids)):
        raise DatasetNotFound("some of the items to delete do not exist (or not in this dataset)")
    archived = conn.execute(
        "UPDATE dataset_items i SET deleted_at = now() WHERE i.id = ANY(%s) AND i.deleted_at IS NULL"
        + scope.replace("dataset_id", "i.dataset_id") +
        " AND EXISTS (SELECT 1 FROM eval_work_items w WHERE w.item_id = i.id)", [ids, *extra]).rowcount
    deleted = conn.execute("DELETE FROM dataset_items WHERE id = ANY(%s) AND deleted_at IS NULL" + scope,
                           [ids, *extra]).rowcount
    return deleted, archived


def delete_items(pool: ConnectionPool, item_ids: Sequence[int]) -> int:
    """Remove items from their dataset (kept out of sight when a run used them); return how many."""
    with pool.connection() as conn, conn.transaction():
        deleted, archived = _delete(conn, item_ids)
    return deleted + archived


def apply_edits(pool: ConnectionPool, dataset_name: str, *, added: Sequence[ItemInput | Mapping[str, Any]] = (),
                updated: Mapping[int, ItemInput | Mapping[str, Any]] | None = None, deleted: Sequence[int] = (),
                edited_by: str = "") -> EditSummary:
    """Apply a grid's additions, edits and deletions in one transaction (all or nothing)."""
    new_items = []
    for i, item in enumerate(added, start=1):
        try:
            new_items.append(_as_item(item))
        except ValueError as exc:
            raise DatasetError(f"new row {i}: {exc}") from None
    changes = {}
    for item_id, item in (updated or {}).items():
        try:
            changes[int(item_id)] = _as_item(item)
        except ValueError as exc:
            raise DatasetError(f"item {item_id}: {exc}") from None
    counts = {"updated": 0, "revised": 0, "unchanged": 0}
    with pool.connection() as conn, conn.transaction():
        dataset_id, _ = _dataset_id(conn, dataset_name, lock=True)
        for item_id, item in sorted(changes.items()):
            counts[_edit(conn, item_id, item, edited_by, dataset_id)] += 1
        n_deleted, n_archived = _delete(conn, list(deleted), dataset_id)
        _copy_items(conn, dataset_id, new_items, edited_by)
        conn.execute("UPDATE datasets SET updated_at = now() WHERE id = %s", (dataset_id,))
    return EditSummary(added=len(new_items), updated=counts["updated"], revised=counts["revised"], deleted=n_deleted,
                       archived=n_archived)


def add_item_from_execution(pool: ConnectionPool, dataset_name: str, execution_id: int, create: bool = True, *,
                            created_by: str = "", tags: Iterable[str] | str | None = ()) -> Item:
    """Save a recorded generation as an item: its variables as input, its output as expected output (the dataset is
    created when missing and create is true)."""
    execution = executions.get_execution(pool, execution_id)
    if execution.output is None:
        raise DatasetError(f"execution {execution_id} has no output to save (status {execution.status})")
    metadata = {"execution_id": execution.id}
    if execution.template_name:
        metadata["template"] = execution.template_name
        metadata["template_version"] = execution.template_version
    item = make_item(execution.variables or {}, execution.output, tags, metadata)
    default_template = execution.template_name
    with pool.connection() as conn, conn.transaction():
        dataset_id, _ = _dataset_id(conn, dataset_name, create=create, created_by=created_by or execution.user_id or "",
                                    default_template=default_template)
        (item_id,) = _copy_items(conn, dataset_id, [item], created_by or execution.user_id or "")
    return get_item(pool, item_id)


# --------------------------------------------------------------------------------------------------- import/export

def format_for(filename: str) -> str:
    """'csv' or 'jsonl' from a file name; DatasetError for anything else."""
    suffix = Path(filename).suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise DatasetError(f"cannot tell the format of {filename!r}: use a .csv or .jsonl file (or say which)")


_EXPECTED_NAMES = {"expected", "expected_output", "expected output", "expectedoutput", "output", "answer",
                   "reference", "ideal"}


def default_role(column: str) -> str:
    """The role a column gets unless mapped otherwise (promptfoo's __expected, __description... are understood)."""
    low = column.strip().lower()
    if low in _EXPECTED_NAMES:
        return "expected"
    if low in ("tags", "__tags"):
        return "tags"
    if low in ("metadata", "__metadata"):
        return "metadata"
    if low in ("id", "item_id", "__id", "revision", "__prefix", "__suffix", "__threshold"):
        return "ignore"
    if re.fullmatch(r"__expected\d*", low) or low == "assert":
        return "assert"
    if low.startswith("__metadata:"):
        return "meta:" + column.split(":", 1)[1].strip()
    if low in ("__description", "description"):
        return "meta:description"
    return "var"


def default_mapping(columns: Sequence[str]) -> dict[str, str]:
    """Every column with its default role."""
    return {c: default_role(c) for c in columns}


def _check_mapping(columns: Sequence[str], mapping: Mapping[str, str]) -> dict[str, str]:
    full = default_mapping(columns)
    unknown = [c for c in mapping if c not in full]
    if unknown:
        raise DatasetError(f"the mapping names column(s) the file does not have: {', '.join(map(repr, unknown))}")
    full.update(mapping)
    targets: dict[str, str] = {}
    for column, role in full.items():
        kind, _, arg = str(role).partition(":")
        if kind not in ROLES:
            raise DatasetError(f"column {column!r}: unknown role {role!r}; use var, var:NAME, json, json:NAME, "
                               f"expected, tags, metadata, meta:KEY, assert or ignore")
        if kind == "meta" and not arg.strip():
            raise DatasetError(f"column {column!r}: meta needs a key, like meta:source")
        if kind in ("var", "json"):
            var = arg.strip() or column
            if var in targets:
                raise DatasetError(f"columns {targets[var]!r} and {column!r} both map to variable {var!r}")
            targets[var] = column
    return full


def _roles(mapping: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(column, kind, target) per mapped column, worked out once per file."""
    out = []
    for column, role in mapping.items():
        kind, _, arg = role.partition(":")
        if kind != "ignore":
            out.append((column, kind, arg.strip() or (column if kind in ("var", "json") else "")))
    return out


def _apply_mapping(row: Mapping[str, Any], roles: Sequence[tuple[str, str, str]], from_text: bool) -> ItemInput:
    variables: dict[str, Any] = {}
    expected = None
    tags: Any = ()
    metadata: dict[str, Any] = {}
    asserts: list[Any] = []
    for column, kind, arg in roles:
        if column not in row:
            continue
        value = row[column]
        blank = value is None or (from_text and value == "")
        if kind == "var":
            variables[arg] = value
        elif kind == "json":
            if blank:
                continue
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"column {column!r}: invalid JSON ({exc.msg} at character "
                                       f"{exc.pos + 1})") from None
            variables[arg] = value
        elif kind == "expected":
            if not blank and expected is None:  # several columns may hold it (JSONL lines differ): first wins
                expected = value
        elif kind == "tags":
            if blank:
                continue
            if isinstance(value, str) and value.strip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"column {column!r}: invalid JSON list ({exc.msg})") from None
            if not isinstance(value, (str, list)):
                raise DatasetError(f"column {column!r}: tags must be text or a list of text")
            tags = value
        elif kind == "metadata":
            if blank:
                continue
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"column {column!r}: invalid JSON ({exc.msg} at character "
                                       f"{exc.pos + 1})") from None
            if type(value) is not dict:
                raise DatasetError(f"column {column!r}: metadata must be a JSON object")
            metadata.update(value)
        elif kind == "meta":
            if not blank:
                metadata[arg] = value
        elif kind == "assert":
            if blank:
                continue
            if isinstance(value, list):
                asserts.extend(value)
            else:
                asserts.append(value)
    if asserts:
        existing = metadata.get("assert") or []
        metadata["assert"] = (existing if isinstance(existing, list) else [existing]) + asserts
    return make_item(variables, expected, tags, metadata)


def decode(data: bytes, encoding: str = "utf-8") -> str:
    """The file's text; DatasetError naming the line of the first undecodable byte (nothing is imported then)."""
    if isinstance(data, str):
        return data
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(enc)
    except LookupError:
        raise DatasetError(f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"the file is not valid {encoding} text: byte 0x{data[exc.start]:02x} on line {line} "
                           f"cannot be decoded; nothing was imported (choose the file's encoding, e.g. "
                           f"latin-1)") from None


CSV_FIELD_LIMIT = 64 * 1024 * 1024   # a cell may hold a long document; Python's default is 128 KiB


def _csv_rows(text: str, delimiter: str) -> tuple[list[str], Iterable[tuple[int, list[str] | str]]]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError("the file is empty: it needs a header row naming the columns") from None
    except csv.Error as exc:
        raise DatasetError(f"line 1: the header is not valid CSV: {exc}") from None
    header = [csv_unescape(h.strip()).strip() for h in header]  # a quoted formula (our own export) reads back as is
    if not any(header):
        raise DatasetError("line 1: the header row is empty")
    for i, name in enumerate(header, start=1):
        if not name:
            raise DatasetError(f"line 1: column {i} has no name")
    seen = set()
    for name in header:
        if name in seen:
            raise DatasetError(f"line 1: column {name!r} appears twice")
        seen.add(name)

    def rows() -> Iterable[tuple[int, list[str] | str]]:
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # this row is rejected; the reader goes on with the next line
                yield line, f"not valid CSV: {exc}"
                continue
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # a blank line
            yield line, [csv_unescape(cell) for cell in row]

    return header, rows()


def _jsonl_records(text: str) -> Iterable[tuple[int, dict[str, Any] | str]]:
    # Lines end at \n only (a \r before it is JSON whitespace): str.splitlines() would also split inside strings
    # at U+2028, U+2029 or U+0085, which JSON allows unescaped, and then misnumber every later line.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"invalid JSON: {exc.msg} at column {exc.colno}"
            continue
        if not isinstance(record, dict):
            yield number, f"not a JSON object (a {type(record).__name__})"
            continue
        flat: dict[str, Any] = {}
        for key in ("input", "vars"):
            if key in record:
                inner = record[key]
                if not isinstance(inner, dict):
                    yield number, f"{key!r} must be a JSON object of variables"
                    break
                flat.update(inner)
        else:
            for key, value in record.items():
                if key in ("input", "vars"):
                    continue
                if key in flat:
                    yield number, f"{key!r} is both a variable and a field"
                    break
                flat[key] = value
            else:
                yield number, flat


def _read(data: bytes | str, fmt: str, mapping: Mapping[str, str] | None, encoding: str, delimiter: str,
          limit: int | None) -> tuple[list[str], dict[str, str], Iterator[tuple[int, ItemInput | str]]]:
    """(columns, effective mapping, rows as (line, item or the reason it is rejected)), read lazily for CSV."""
    if fmt not in FORMATS:
        raise DatasetError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    untrusted.check_text(data, MAX_IMPORT_BYTES, "the file")
    text = decode(data, encoding)
    if fmt == "csv":
        columns, records = _csv_rows(text, delimiter)
        full = _check_mapping(columns, mapping or {})
        roles = _roles(full)

        def csv_rows() -> Iterator[tuple[int, ItemInput | str]]:
            n = len(columns)
            for k, (line, row) in enumerate(records):
                if limit is not None and k >= limit:
                    return
                if isinstance(row, str):
                    yield line, row
                    continue
                if len(row) != n:
                    yield line, f"has {len(row)} field(s), the header has {n}"
                    continue
                try:
                    yield line, _apply_mapping(dict(zip(columns, row)), roles, from_text=True)
                except ValueError as exc:
                    yield line, str(exc)

        return columns, full, csv_rows()
    parsed = list(itertools.islice(_jsonl_records(text), limit))
    if not parsed:
        raise DatasetError("the file holds no JSON lines")
    columns: list[str] = []
    seen: set[str] = set()
    for _, record in parsed:
        if isinstance(record, dict):
            for key in record:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
    full = _check_mapping(columns, mapping or {})
    roles = _roles(full)

    def jsonl_rows() -> Iterator[tuple[int, ItemInput | str]]:
        for line, record in parsed:
            if isinstance(record, str):
                yield line, record
                continue
            try:
                yield line, _apply_mapping(record, roles, from_text=False)
            except ValueError as exc:
                yield line, str(exc)

    return columns, full, jsonl_rows()


def parse_file(data: bytes | str, *, fmt: str, mapping: Mapping[str, str] | None = None, encoding: str = "utf-8",
               delimiter: str = ",", limit: int | None = None) -> ParsedFile:
    """Read a CSV or JSONL file with a column mapping (default: by column name) into items and rejected rows.

    Raises DatasetError when the file as a whole is unreadable (bad encoding, no header, unknown mapping); a bad row
    is rejected with its line number and reason. limit stops after that many data rows (for previews).
    """
    columns, full, rows = _read(data, fmt, mapping, encoding, delimiter, limit)
    items: list[ItemInput] = []
    lines: list[int] = []
    rejected: list[Rejected] = []
    n = 0
    for line, outcome in rows:
        n += 1
        if isinstance(outcome, str):
            rejected.append(Rejected(line, outcome))
        else:
            items.append(outcome)
            lines.append(line)
    return ParsedFile(fmt, list(columns), full, items, lines, rejected, n)


class _Rollback(Exception):
    """Raised inside the import transaction to undo it (strict mode found a rejected row)."""


def import_file(pool: ConnectionPool, dataset_name: str, data: bytes | str, *, fmt: str,
                mapping: Mapping[str, str] | None = None, encoding: str = "utf-8", delimiter: str = ",",
                create: bool = True, strict: bool = False, created_by: str = "", description: str = "",
                progress: Progress | None = None) -> ImportReport:
    """Import a file's valid rows (COPY, one transaction) and report the rejected ones; with strict, any rejected
    row imports nothing. An unreadable file raises DatasetError and imports nothing; a file over MAX_IMPORT_BYTES
    raises TooLarge before it is read.

    Rows are parsed and streamed into COPY chunk by chunk, so the database inserts while the file is still being
    read; the revisions' foreign key to their items is checked at commit.
    """
    check_name(dataset_name)
    if progress:
        progress(0.0, "reading the file")
    columns, full, rows = _read(data, fmt, mapping, encoding, delimiter, None)
    upper = data.count(b"\n" if isinstance(data, bytes) else "\n") + 1   # at least one line per row
    rejected: list[Rejected] = []
    n_rows = 0
    author = _copy_escape(created_by or "")
    try:
        with pool.connection() as conn, conn.transaction():
            dataset_id, created = _dataset_id(conn, dataset_name, create=create, created_by=created_by)
            if created and description:
                conn.execute("UPDATE datasets SET description = %s WHERE id = %s", (description, dataset_id))
            conn.execute("SET CONSTRAINTS dataset_item_revisions_item_id_fkey DEFERRED")
            # Item ids reserved up front (unused ones are gaps in the sequence, which is fine).
            ids = sorted(conn.execute(
                "SELECT array_agg(nextval(pg_get_serial_sequence('dataset_items', 'id'))) "
                "FROM generate_series(1, %s)", (upper,)).fetchone()[0])
            used = 0
            with conn.cursor() as cur, cur.copy(
                    "COPY dataset_item_revisions (item_id, revision, input, expected, tags, metadata, created_by) "
                    "FROM STDIN") as copy:
                chunk: list[str] = []
                for line, outcome in rows:
                    n_rows += 1
                    if isinstance(outcome, str):
                        rejected.append(Rejected(line, outcome))
                        continue
                    chunk.append(_revision_line(ids[used], outcome, author))
                    used += 1
                    if len(chunk) >= 5000:
                        copy.write("".join(chunk))
                        chunk = []
                        if progress:
                            progress(0.9 * min(1.0, line / upper), f"{used:,} row(s) written")
                if chunk:
                    copy.write("".join(chunk))
            if strict and rejected:
                raise _Rollback()
            if progress:
                progress(0.9, f"{used:,} row(s) written; linking items")
            if used:
                with conn.cursor() as cur, cur.copy("COPY dataset_items (id, dataset_id, revision) FROM STDIN") as copy:
                    copy.write("".join(f"{item_id}\t{dataset_id}\t1\n" for item_id in ids[:used]))
            conn.execute("UPDATE datasets SET updated_at = now() WHERE id = %s", (dataset_id,))
    except _Rollback:
        first = rejected[0]
        raise DatasetError(f"{len(rejected)} row(s) rejected (first: line {first.line}: {first.reason}); "
                           f"nothing was imported") from None
    if progress:
        progress(1.0, f"imported {used:,} item(s)")
    return ImportReport(dataset_name, used, n_rows, rejected, created)


def import_path(pool: ConnectionPool, dataset_name: str, path: str | Path, *, fmt: str | None = None,
                **kwargs: Any) -> ImportReport:
    """Import a file from disk (format from its suffix unless given)."""
    path = Path(path)
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    data = untrusted.read_file(real, MAX_IMPORT_BYTES, str(path), error=DatasetError)   # size checked first
    fmt = fmt or format_for(path.name)
    if path.suffix.lower() == ".tsv" and "delimiter" not in kwargs:
        kwargs["delimiter"] = "\t"
    return import_file(pool, dataset_name, data, fmt=fmt, **kwargs)


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def export_items(pool: ConnectionPool, dataset_name: str, fmt: str, *, tag: str | None = None) -> bytes:
    """A dataset's current items as CSV (a column per variable, then expected, tags, metadata) or JSONL
    ({"input", "expected", "tags", "metadata"} per line); both import back unchanged (CSV values as text). A CSV
    cell or name a spreadsheet would evaluate as a formula (starting with = + - @, tab or CR) starts with a `'`
    (core.text.csv_cell), which the import removes again."""
    if fmt not in FORMATS:
        raise DatasetError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    items = list_items(pool, dataset_name, tag=tag)
    out = io.StringIO(newline="")
    if fmt == "jsonl":
        for item in items:
            out.write(json.dumps({"input": item.input, "expected": item.expected, "tags": item.tags,
                                  "metadata": item.metadata}, ensure_ascii=False))
            out.write("\n")
        return out.getvalue().encode("utf-8")
    variables: list[str] = []
    seen: set[str] = set()
    for item in items:
        for key in item.input:
            if key not in seen:
                seen.add(key)
                variables.append(key)
    clashes = [v for v in variables if default_role(v) != "var"]
    if clashes:
        raise DatasetError(f"variable(s) {', '.join(map(repr, clashes))} would read back as another column; "
                           f"export as JSONL instead")
    # CRLF rows (RFC 4180): the csv module quotes a cell holding any line-ending character, so a lone CR in a value
    # cannot start a new row (whose first cell could be a formula).
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(csv_row([*variables, "expected", "tags", "metadata"]))
    for item in items:
        writer.writerow(csv_row([_cell(item.input[v]) if v in item.input else "" for v in variables]
                                + [item.expected if item.expected is not None else "", ",".join(item.tags),
                                   json.dumps(item.metadata, ensure_ascii=False) if item.metadata else ""]))
    return out.getvalue().encode("utf-8")


def export_to_file(pool: ConnectionPool, dataset_name: str, path: str | Path, fmt: str | None = None) -> int:
    """Write a dataset to a file (format from its suffix unless given); return the number of items."""
    path = Path(path)
    fmt = fmt or format_for(path.name)
    data = export_items(pool, dataset_name, fmt)
    path.write_bytes(data)
    return count_items(pool, dataset_name)


# ----------------------------------------------------------------------------------------------------------- grid

GRID_FIXED = ("expected", "tags", "metadata")


def _display(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def grid_rows(items: Sequence[Item], variables: Sequence[str]) -> list[dict[str, Any]]:
    """Items as rows for an editable grid: id, one text column per variable, expected, tags, metadata."""
    rows = []
    for item in items:
        row: dict[str, Any] = {"id": item.id}
        for v in variables:
            row[v] = _display(item.input[v]) if v in item.input else None
        row["expected"] = item.expected
        row["tags"] = ", ".join(item.tags)
        row["metadata"] = json.dumps(item.metadata, ensure_ascii=False) if item.metadata else ""
        row["revision"] = item.revision
        rows.append(row)
    return rows


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and value == "")


def _from_row(row: Mapping[str, Any], variables: Sequence[str], original: Item | None) -> ItemInput:
    inputs: dict[str, Any] = {}
    for v in variables:
        cell = row.get(v)
        old_present = original is not None and v in original.input
        if _blank(cell) and not (old_present and original.input[v] == ""):
            continue
        cell = "" if _blank(cell) else str(cell)
        if old_present and not isinstance(original.input[v], str):
            if cell == _display(original.input[v]):
                inputs[v] = original.input[v]
                continue
            try:
                inputs[v] = json.loads(cell)
                continue
            except json.JSONDecodeError:
                pass
        inputs[v] = cell
    if original is not None:  # variables not shown in the grid are kept
        for key, value in original.input.items():
            if key not in variables:
                inputs[key] = value
    expected = None if _blank(row.get("expected")) else str(row.get("expected"))
    meta_cell = row.get("metadata")
    metadata: Any = {}
    if not _blank(meta_cell):
        try:
            metadata = json.loads(str(meta_cell))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"metadata is not valid JSON: {exc.msg}") from None
    tags = "" if _blank(row.get("tags")) else str(row.get("tags"))
    return make_item(inputs, expected, tags, metadata)


def grid_changes(items: Sequence[Item], variables: Sequence[str],
                 rows: Sequence[Mapping[str, Any]]) -> tuple[list[ItemInput], dict[int, ItemInput], list[int]]:
    """Compare an edited grid with the items it showed: (added, updated by id, deleted ids)."""
    by_id = {item.id: item for item in items}
    added: list[ItemInput] = []
    updated: dict[int, ItemInput] = {}
    kept: set[int] = set()
    for n, row in enumerate(rows, start=1):
        raw_id = row.get("id")
        try:
            if _blank(raw_id):
                if all(_blank(row.get(c)) for c in [*variables, *GRID_FIXED]):
                    continue  # an empty new row
                added.append(_from_row(row, variables, None))
                continue
            item_id = int(raw_id)
            original = by_id.get(item_id)
            if original is None:
                raise DatasetError(f"item {item_id} is not in this view")
            kept.add(item_id)
            new = _from_row(row, variables, original)
            if new != original.content and (new.input, new.expected, list(new.tags), new.metadata) != (
                    original.input, original.expected, list(original.tags), original.metadata):
                updated[item_id] = new
        except ValueError as exc:
            raise DatasetError(f"row {n}: {exc}") from None
    deleted = [item.id for item in items if item.id not in kept]
    return added, updated, deleted
