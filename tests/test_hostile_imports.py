"""Hostile imports: promptfoo configs that reach for files outside what was handed over, list-valued vars that
expand without end, YAML alias bombs and oversized files in every import, and template exports that forge history.

Each class of attack is tried with several payloads. A refusal is one line that says why (naming the reference or
the cap), and nothing is stored (every table's row count is unchanged). For the bombs, the call ends fast, the
process's memory stays bounded (RSS sampled in a thread and the ru_maxrss high-water mark) and a ticker thread is
never stalled for more than half a second.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import yaml

from core import datasets, errors, promptfoo, untrusted
from core import templates as tpl
from core.templates import interchange

SECRET = "TOP-SECRET-42"
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------------ helpers

def table_counts(pool) -> dict[str, int]:
    """Rows in every table: what "nothing was stored" is checked against."""
    with pool.connection() as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in sorted(tables)}


@contextmanager
def bounded(seconds: float = 3.0, rss_mb: float = 64.0, stall: float = 0.5):
    """The block ends within `seconds`, the process grows by less than `rss_mb` and a ticker thread is never
    stalled for longer than `stall` seconds. Yields a dict that holds the figures afterwards."""
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    high0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = {"peak": rss0, "stall": 0.0}
    stop = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            figures["stall"] = max(figures["stall"], now - last)
            figures["peak"] = max(figures["peak"], proc.memory_info().rss)
            last = now

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    started = time.perf_counter()
    try:
        yield figures
    finally:
        figures["seconds"] = time.perf_counter() - started
        stop.set()
        ticker.join()
        high1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # a new high-water mark is this block's peak; otherwise the sampled peak is the best we know
        figures["growth_mb"] = ((high1 if high1 > high0 else figures["peak"]) - rss0) / MIB
    assert figures["seconds"] < seconds, figures
    assert figures["growth_mb"] < rss_mb, figures
    assert figures["stall"] < stall, figures


@contextmanager
def refused(kind=errors.InvalidInput, *contains: str):
    """The block must raise `kind` with a one-line message containing each of `contains` (and not the secret)."""
    with pytest.raises(errors.PromptDevError) as raised:
        yield
    exc = raised.value
    message = str(exc)
    assert isinstance(exc, kind), (type(exc), message)
    assert "\n" not in message and errors.user_message(exc) == message
    for part in contains:
        assert part in message, (part, message)
    assert SECRET not in message and "root:" not in message


def billion_laughs(levels: int = 9, width: int = 9) -> list[str]:
    """The classic alias bomb: `levels` lists, each `width` aliases of the one before (width**levels leaves)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return lines


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder with a secret beside the config's folder, and the (empty) config folder `suite` in it."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n", encoding="utf-8")
    (tmp_path / "secret.csv").write_text(f"x\n{SECRET}\n", encoding="utf-8")
    (tmp_path / "secret.yaml").write_text(f"x: {SECRET}\n", encoding="utf-8")
    (tmp_path / "suite").mkdir()
    return tmp_path


# ------------------------------------------------------------------------------- 1. file references: traversal

# Where a config may name a file, {ref} standing for the reference.
PLACES = {
    "prompt": "prompts: ['{ref}']\n",
    "prompt-object": "prompts:\n  - id: '{ref}'\n    label: p\n",
    "prompt-mapping": "prompts:\n  '{ref}': p\n",
    "test-var": "prompts: ['{{{{ x }}}}']\ntests:\n  - vars: {{x: '{ref}'}}\n",
    "default-var": "prompts: ['{{{{ x }}}}']\ndefaultTest:\n  vars: {{x: '{ref}'}}\n",
    "tests-file": "prompts: ['{{{{ x }}}}']\ntests: '{ref}'\n",
    "tests-list": "prompts: ['{{{{ x }}}}']\ntests: ['{ref}']\n",
    "vars-file": "prompts: ['{{{{ x }}}}']\ntests:\n  - vars: '{ref}'\n",
    "default-file": "prompts: ['{{{{ x }}}}']\ndefaultTest: '{ref}'\n",
}

# Absolute paths, `..`, home directories, drive letters and globs that climb out: refused by their form alone.
ESCAPING = [
    ("file:///etc/passwd", "absolute paths are not allowed"),
    ("file:///etc/shadow", "absolute paths are not allowed"),
    ("file:///proc/self/environ", "absolute paths are not allowed"),
    ("file:///etc/*", "absolute paths are not allowed"),
    ("file://../../../etc/hostname", "'..' would leave the config's folder"),
    ("file://../secret.txt", "'..' would leave the config's folder"),
    ("file://./sub/../../secret.csv", "'..' would leave the config's folder"),
    ("file://..\\secret.yaml", "'..' would leave the config's folder"),
    ("file://../*.txt", "'..' would leave the config's folder"),
    ("file://**/../../secret.txt", "'..' would leave the config's folder"),
    ("file://~/.ssh/id_rsa", "absolute paths are not allowed"),
    ("file://~root/.bashrc", "absolute paths are not allowed"),
    ("file://C:/Windows/win.ini", "absolute paths are not allowed"),
    ("file://\\\\server\\share\\x.txt", "absolute paths are not allowed"),
]


@pytest.mark.parametrize("place", sorted(PLACES))
def test_references_that_climb_out_are_refused_in_every_place(pool, settings, outside, place):
    before = table_counts(pool)
    config = outside / "suite" / "promptfooconfig.yaml"
    for ref, why in ESCAPING:
        body = PLACES[place].format(ref=ref)
        config.write_text(body, encoding="utf-8")
        # the command line: the config's folder on this machine
        with refused(promptfoo.PromptfooError, f"file reference {ref!r} is refused", why):
            promptfoo.start(pool, settings, config)
        # an upload: the same config, with files that happen to carry those names
        uploads = {"secret.txt": b"uploaded", "passwd": b"uploaded", "x.txt": b"uploaded"}
        with refused(promptfoo.PromptfooError, f"file reference {ref!r} is refused", why):
            promptfoo.load_config(body, uploads)
    assert table_counts(pool) == before


def test_symbolic_links_and_globs_leading_outside_are_refused(pool, settings, outside):
    suite = outside / "suite"
    (suite / "good.txt").write_text("Hello {{ x }}", encoding="utf-8")
    (suite / "sub").mkdir()
    (suite / "sub" / "fine.txt").write_text("Fine {{ x }}", encoding="utf-8")
    os.symlink("../secret.txt", suite / "relative-link.txt")
    os.symlink(outside / "secret.csv", suite / "absolute-link.csv")
    os.symlink("/etc/hostname", suite / "hostname.txt")
    os.symlink("..", suite / "up")
    os.symlink("/etc", suite / "sub" / "etc")
    os.symlink("loop.txt", suite / "loop.txt")
    os.mkfifo(suite / "pipe.txt")   # reading it would block for ever
    config = suite / "promptfooconfig.yaml"
    before = table_counts(pool)
    for body, ref, why in [
        ("prompts: [file://relative-link.txt]", "file://relative-link.txt", "leads outside the config's folder"),
        ("prompts: ['{{ x }}']\ntests: file://absolute-link.csv", "file://absolute-link.csv", "leads outside"),
        ("prompts: ['{{ x }}']\ntests: [{vars: {x: file://hostname.txt}}]", "file://hostname.txt", "leads outside"),
        ("prompts: [file://up/secret.txt]", "file://up/secret.txt", "leads outside"),
        ("prompts: [file://up/suite/up/secret.txt]", "file://up/suite/up/secret.txt", "leads outside"),
        ("prompts: ['{{ x }}']\ndefaultTest: {vars: {x: file://sub/etc/passwd}}", "file://sub/etc/passwd",
         "leads outside"),
        ("prompts: ['file://*.txt']", "file://*.txt", "refused: it "),   # good.txt, and the links (any order)
        ("prompts: ['file://up/*.txt']", "file://up/*.txt", "leads outside"),
        ("prompts: ['file://sub/*/passwd']", "file://sub/*/passwd", "leads outside"),
        ("prompts: [file://loop.txt]", "file://loop.txt", "cannot be resolved"),
    ]:
        config.write_text(body + "\n", encoding="utf-8")
        with bounded(seconds=5):
            with refused(promptfoo.PromptfooError, f"file reference {ref!r} is refused", why):
                promptfoo.start(pool, settings, config)
    config.write_text("prompts: [file://pipe.txt]\n", encoding="utf-8")
    with bounded(seconds=5):   # a FIFO is refused, never waited on
        with refused(promptfoo.PromptfooError, "not a regular file"):
            promptfoo.start(pool, settings, config)
    with bounded(seconds=5):   # nor is the config itself read from one
        with refused(promptfoo.PromptfooError, "not a regular file"):
            promptfoo.load_config_path(suite / "pipe.txt")
    assert table_counts(pool) == before
    # files inside the folder, through links that stay inside, still work
    os.symlink("good.txt", suite / "inner-link.txt")
    config.write_text("prompts: [file://inner-link.txt, 'file://sub/*.txt']\n", encoding="utf-8")
    assert [p.content for p in promptfoo.load_config_path(config).prompts] == ["Hello {{ x }}", "Fine {{ x }}"]


def test_uploads_resolve_among_the_uploaded_files_only(pool, settings):
    # a name the server also has is read from the upload, never from the server's disk
    suite = promptfoo.load_config("prompts: [file://etc/passwd.txt]\n", {"../../etc/passwd.txt": b"uploaded {{ x }}"})
    assert [p.content for p in suite.prompts] == ["uploaded {{ x }}"]
    before = table_counts(pool)
    for body, files, message in [
        ("prompts: [file://hostname]", {}, "'file://hostname': no such file among the uploaded files"),
        ("prompts: [file://app.py]", {}, "'file://app.py': no such file among the uploaded files"),
        ("prompts: ['file://*.txt']", {"a.csv": b"x"}, "'file://*.txt': no file matches"),
        ("prompts: [file://a.txt]", {"x/a.txt": b"1", "y/a.txt": b"2"}, "several uploaded files are named 'a.txt'"),
        ("prompts: ['{{ x }}']\ntests: file://t.csv", {"t.csv": b"x\n\xff\xfe\n"}, "t.csv: not UTF-8 text"),
        ("prompts: ['x\x00']", {}, "not valid YAML"),
        ('prompts: ["file://a\\0.txt"]', {}, "it contains a NUL character"),
        ("prompts: [file://a.txt]", {"a.txt\nb.txt": b"x"}, "'a.txt\\nb.txt': a file name may not hold control"),
    ]:
        with refused(promptfoo.PromptfooError, message):
            promptfoo.start(pool, settings, promptfoo.load_config(body, files))
    assert table_counts(pool) == before


# ------------------------------------------------------------------------ 2. list-valued vars and other growth

TEN = ", ".join("abcdefghij")


def _config(tmp_path, body: str, **files: bytes | str) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data.encode() if isinstance(data, str) else data)
    path = folder / "promptfooconfig.yaml"
    path.write_text(body, encoding="utf-8")
    return path


GROWTH = {
    "seven lists of ten (10,000,000 tests)": (
        "prompts: ['{{ v0 }}']\ntests:\n  - vars: {" + ", ".join(f"v{i}: [{TEN}]" for i in range(7)) + "}\n",
        {}, "the tests expand into more than 10,000"),
    "two lists of 10,000 (100,000,000 tests)": (
        "prompts: ['{{ a }}']\ntests:\n  - vars:\n      a: [" + ", ".join(map(str, range(10_000))) + "]\n"
        "      b: [" + ", ".join(map(str, range(10_000))) + "]\n", {}, "the tests expand into more than 10,000"),
    "a defaultTest list under every test": (
        "prompts: ['{{ a }}']\ndefaultTest:\n  vars: {a: [" + ", ".join(map(str, range(101))) + "]}\ntests:\n"
        + "".join(f"  - vars: {{b: {i}}}\n" for i in range(100)), {}, "the tests expand into more than 10,000"),
    "many tests of 100 combinations each": (
        "prompts: ['{{ a }}']\ntests:\n" + "".join(f"  - vars: {{a: [{TEN}], b: [{TEN}], c: {i}}}\n"
                                                    for i in range(101)), {}, "the tests expand into more than 10,000"),
    "tests × prompts": (
        "prompts: [" + ", ".join(f"'p{i} {{{{ a }}}}'" for i in range(11)) + "]\ntests:\n  - vars: {a: ["
        + ", ".join(map(str, range(5_000))) + "]}\n", {}, "5,000 tests × 11 prompts is more than 50,000"),
    "a long value copied into every test": (
        "prompts: ['{{ a }}']\ndefaultTest:\n  vars: {big: '" + "A" * 400_000 + "'}\ntests:\n  - vars: {a: ["
        + ", ".join(map(str, range(100))) + "]}\n", {}, "would take more than 32 MiB once expanded"),
    "a CSV of 10,001 tests": (
        "prompts: ['{{ x }}']\ntests: file://t.csv\n", {"t__csv": "x\n" + "1\n" * 10_001},
        "t.csv: more than 10,000 tests"),
    "a JSONL of 10,001 tests": (
        "prompts: ['{{ x }}']\ntests: file://t.jsonl\n", {"t__jsonl": '{"vars": {"x": 1}}\n' * 10_001},
        "t.jsonl: more than 10,000 tests"),
    "a YAML list of 10,001 tests": (
        "prompts: ['{{ x }}']\ntests: file://t.yaml\n", {"t__yaml": "- {vars: {x: 1}}\n" * 10_001},
        "t.yaml: more than 10,000 tests"),
    "tests from several files": (
        "prompts: ['{{ x }}']\ntests: ['file://a.csv', 'file://b.csv', 'file://c.csv']\n",
        {"a__csv": "x\n" + "1\n" * 4_000, "b__csv": "x\n" + "1\n" * 4_000, "c__csv": "x\n" + "1\n" * 4_000},
        "c.csv: more than 10,000 tests"),
    "a prompt file of 101 prompts": (
        "prompts: [file://p.txt]\n", {"p__txt": "---\n".join(f"prompt {i}\n" for i in range(101))},
        "p.txt: more than 100 prompts"),
    "a prompt file of separators only": (
        "prompts: [file://p.txt]\n", {"p__txt": "x\n" + "---\n" * 2_000_000}, "p.txt: more than 100 prompts"),
    "101 inline prompts": (
        "prompts: [" + ", ".join(f"'p{i}'" for i in range(101)) + "]\n", {}, "more than 100 prompts"),
}


@pytest.mark.parametrize("case", sorted(GROWTH))
def test_what_a_config_expands_into_is_counted_before_it_is_expanded(pool, settings, tmp_path, case):
    body, files, message = GROWTH[case]
    path = _config(tmp_path, body, **files)
    before = table_counts(pool)
    with bounded(seconds=5, rss_mb=80):
        with refused(errors.TooLarge, message):
            promptfoo.start(pool, settings, path)
    uploads = {name.replace("__", "."): (data.encode() if isinstance(data, str) else data)
               for name, data in files.items()}
    with bounded(seconds=5, rss_mb=80):
        with refused(errors.TooLarge, message):
            promptfoo.load_config(body, uploads)
    assert table_counts(pool) == before
    assert errors.status_of(promptfoo.PromptfooTooLarge("x")) == 413


def test_a_config_at_the_caps_is_accepted(pool, settings, tmp_path):
    hundred = ", ".join(map(str, range(100)))
    path = _config(tmp_path, f"prompts: ['{{{{ a }}}} {{{{ b }}}}']\n"
                             f"tests:\n  - vars: {{a: [{hundred}], b: [{hundred}]}}\n")
    suite = promptfoo.load_config_path(path)
    assert len(suite.tests) == promptfoo.MAX_TESTS == 10_000
    assert suite.tests[-1].vars == {"a": 99, "b": 99}


@pytest.mark.parametrize("files, message", [
    ({"v.txt": 17 * MIB}, "'v.txt' is 17 MiB, more than the 16 MiB allowed"),        # one file over its cap
    ({"promptfooconfig.yaml": 2 * MIB}, "is 2 MiB, more than the 1 MiB allowed"),     # the config itself
])
def test_files_over_their_cap_are_refused_before_they_are_read(pool, settings, tmp_path, files, message):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "promptfooconfig.yaml").write_text("prompts: ['{{ x }}']\ndefaultTest: {vars: {x: file://v.txt}}\n")
    for name, size in files.items():   # sparse: refused from their size, so never read into memory
        with open(folder / name, "r+b" if (folder / name).exists() else "wb") as f:
            f.truncate(size)
    with bounded(seconds=2, rss_mb=16):
        with refused(errors.TooLarge, message.replace("'v.txt'", "v.txt")):
            promptfoo.start(pool, settings, folder / "promptfooconfig.yaml")


def test_files_named_again_and_again_count_each_time(pool, settings, tmp_path):
    big = "x" * (12 * MIB)
    body = ("prompts: ['{{ a }}']\ntests:\n" + "".join(f"  - vars: {{a: file://big.txt, n: {i}}}\n" for i in range(3)))
    path = _config(tmp_path, body, big__txt=big)
    before = table_counts(pool)
    with bounded(seconds=10, rss_mb=200):
        with refused(errors.TooLarge, "the files the config refers to add up to more than 32 MiB"):
            promptfoo.start(pool, settings, path)
    with bounded(seconds=10, rss_mb=200):
        with refused(errors.TooLarge, "the files the config refers to add up to more than 32 MiB"):
            promptfoo.load_config(body, {"big.txt": big.encode()})
    with refused(errors.TooLarge, "201 files uploaded; at most 200"):
        promptfoo.load_config(body, {f"f{i}.txt": b"" for i in range(201)})
    with refused(errors.TooLarge, "the uploaded files together is"):
        promptfoo.load_config(body, {"a.txt": big.encode(), "b.txt": big.encode(), "c.txt": big.encode()})
    assert table_counts(pool) == before


# -------------------------------------------------------------------------------------------- 3. YAML bombs

def _bombs() -> dict[str, tuple[str, type, str]]:
    """YAML texts that expand, nest or count without end: (text with a `{top}` slot, error kind, message)."""
    laughs = "\n".join(billion_laughs())
    return {
        "billion laughs": (laughs + "\n{top}: *l8\n", errors.InvalidInput, "YAML anchors (&l0) are not accepted"),
        "an alias of a long string": ("s: &s '" + "A" * 1000 + "'\nlist: [" + ", ".join(["*s"] * 1000)
                                      + "]\n{top}: *s\n", errors.InvalidInput, "YAML anchors (&s) are not accepted"),
        "a merge key": ("base: &b {{a: 1}}\n{top}: {{<<: *b}}\n", errors.InvalidInput, "YAML anchors (&b)"),
        "a recursive alias": ("{top}: &r [*r]\n", errors.InvalidInput, "YAML anchors (&r)"),
        "an anchor alone": ("{top}: &x 1\n", errors.InvalidInput, "YAML anchors (&x) are not accepted"),
        "deep flow nesting": ("{top}: " + "[" * 50_000 + "]" * 50_000 + "\n", errors.InvalidInput,
                              "nested more than 64 levels deep"),
        "deep block nesting": ("{top}:\n" + "".join("  " * i + "- \n" for i in range(1, 200)), errors.InvalidInput,
                               "nested more than 64 levels deep"),
        "too many values": ("{top}: [" + "1," * 300_000 + "1]\n", errors.TooLarge, "more than 250,000 YAML values"),
    }


@pytest.mark.parametrize("bomb", sorted(_bombs()))
def test_yaml_bombs_in_a_promptfoo_config_and_its_files(pool, settings, tmp_path, bomb):
    text, kind, message = _bombs()[bomb]
    before = table_counts(pool)
    cases = [  # (config, files, the file holding the bomb)
        (text.format(top="description") + "prompts: ['{{ x }}']\n", {}, "promptfooconfig.yaml"),
        ("prompts: ['{{ x }}']\ntests: file://t.yaml\n", {"t.yaml": text.format(top="t")}, "t.yaml"),
        ("prompts: ['{{ x }}']\ndefaultTest: {vars: {x: file://v.yaml}}\n", {"v.yaml": text.format(top="v")},
         "v.yaml"),
        ("prompts: [file://p.yaml]\n", {"p.yaml": text.format(top="p")}, "p.yaml"),
        ("prompts: ['{{ x }}']\ndefaultTest: file://d.yaml\n", {"d.yaml": text.format(top="vars")}, "d.yaml"),
    ]
    for k, (body, files, where) in enumerate(cases):
        folder = tmp_path / str(k)
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_text(data, encoding="utf-8")
        (folder / "promptfooconfig.yaml").write_text(body, encoding="utf-8")
        with bounded(seconds=5, rss_mb=48):
            with refused(kind, f"{where}: ", message):
                promptfoo.start(pool, settings, folder / "promptfooconfig.yaml")
        with bounded(seconds=5, rss_mb=48):
            with refused(kind, f"{where}: ", message):
                promptfoo.load_config(body, {n: d.encode() for n, d in files.items()})
    assert table_counts(pool) == before


def _export_with(fragment: str, top: str = "params") -> str:
    """A templates export whose first version carries `fragment` (a YAML bomb) under `top`."""
    return ("format: promptdev-templates\nformat_version: 1\ntemplates:\n- name: x\n  versions:\n"
            "  - version: 1\n    text: hi\n" + "".join(f"    {line}\n" for line in fragment.splitlines()))


@pytest.mark.parametrize("bomb", sorted(_bombs()))
def test_yaml_bombs_in_a_templates_import(pool, tmp_path, bomb):
    text, kind, message = _bombs()[bomb]
    before = table_counts(pool)
    for top in ("params", "input_schema", "change_description", "created_by"):
        export = _export_with(text.format(top=top))
        with bounded(seconds=5, rss_mb=48):
            with refused(kind, "the import file: ", message):
                tpl.import_templates(pool, tpl.load_export(export, "yaml"), imported_by="me")
        path = tmp_path / f"{top}.yaml"
        path.write_text(export, encoding="utf-8")
        with bounded(seconds=5, rss_mb=48):
            with refused(kind, message):
                tpl.import_from_file(pool, path, imported_by="me")
    assert table_counts(pool) == before


JSON_BOMBS = {   # built when the test runs, not when it is collected
    "deep lists": (lambda: "[" * 100_000 + "]" * 100_000, errors.InvalidInput,
                   "the import file: not valid JSON: nested too deeply"),
    "a 5,000-digit number": (lambda: '{"format": "promptdev-templates", "n": ' + "1" * 5_000 + "}",
                             errors.InvalidInput, "the import file: not valid JSON"),
    "deep objects": (lambda: '{"format": "promptdev-templates", "templates": [' + '{"a": ' * 50_000 + "1"
                     + "}" * 50_000 + "]}", errors.InvalidInput, "nested too deeply"),
    "over the cap": (lambda: "[" + " " * (16 * MIB) + "]", errors.TooLarge,
                     "the import file is larger than the 16 MiB allowed"),
    "over the cap in bytes": (lambda: '["' + "é" * (8 * MIB) + '"]', errors.TooLarge,
                              "the import file is 16,777,220 bytes, more than the 16 MiB allowed"),
}


@pytest.mark.parametrize("bomb", sorted(JSON_BOMBS))
def test_json_bombs_in_a_templates_import(pool, bomb):
    make, kind, message = JSON_BOMBS[bomb]
    text = make()
    before = table_counts(pool)
    with bounded(seconds=5, rss_mb=48):
        with refused(kind, message):
            tpl.import_templates(pool, tpl.load_export(text, "json"))
    assert table_counts(pool) == before


def test_import_files_over_their_cap_are_refused_before_they_are_read(pool, tmp_path):
    before = table_counts(pool)
    for name, size, call, message in [
        ("t.yaml", interchange.MAX_IMPORT_BYTES + 1, lambda p: tpl.import_from_file(pool, p),
         "t.yaml is 16,777,217 bytes, more than the 16 MiB allowed"),
        ("t.json", 1 << 36, lambda p: tpl.import_from_file(pool, p), "t.json is 64 GiB, more than the 16 MiB"),
        ("d.csv", datasets.MAX_IMPORT_BYTES + 1, lambda p: datasets.import_path(pool, "d", p),
         "d.csv is 67,108,865 bytes, more than the 64 MiB allowed"),
        ("d.jsonl", 1 << 33, lambda p: datasets.import_path(pool, "d", p), "d.jsonl is 8 GiB, more than the 64 MiB"),
    ]:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)   # sparse: only its size is real
        with bounded(seconds=2, rss_mb=16):
            with refused(errors.TooLarge, message):
                call(path)
    assert table_counts(pool) == before


@pytest.mark.parametrize("make", [
    lambda: b"q\n" + b"x" * datasets.MAX_IMPORT_BYTES,
    lambda: "q\n" + "é" * (datasets.MAX_IMPORT_BYTES // 2),   # fewer characters than the cap, more bytes
], ids=["bytes", "text"])
def test_dataset_imports_over_the_cap_are_refused(pool, make):
    data = make()
    before = table_counts(pool)
    for fmt in ("csv", "jsonl"):
        with bounded(seconds=3, rss_mb=80):
            with refused(errors.TooLarge, "the file is", "64 MiB"):
                datasets.import_file(pool, "d", data, fmt=fmt)
        with bounded(seconds=3, rss_mb=80):
            with refused(errors.TooLarge, "64 MiB"):
                datasets.parse_file(data, fmt=fmt, limit=20)
    assert table_counts(pool) == before


def test_the_yaml_reader_refuses_every_anchor_and_alias_and_keeps_plain_yaml():
    assert untrusted.load_yaml("a: [1, 2.5, x, null, true]\nb: {c: 'd'}\n", "f") == {
        "a": [1, 2.5, "x", None, True], "b": {"c": "d"}}
    for text in ("a: &x 1", "a: *x", "- &x [1]\n- *x", "? &k a\n: 1", "a: !!str &x 1", "a: &x !!str 1"):
        with refused(errors.InvalidInput, "f.yaml: line "):
            untrusted.load_yaml(text, "f.yaml")
    for text in ("a: !!python/object/apply:os.system ['true']", "a: !!python/name:os.system", "[", "a: b: c"):
        with refused(errors.InvalidInput, "f.yaml: not valid YAML"):
            untrusted.load_yaml(text, "f.yaml")


# --------------------------------------------------------------------------------------- 4. forged history

FORGED_AUTHORS = ["admin", "root\nchange_description: approved by security", "<img src=x onerror=alert(1)>",
                  "release-bot[bot]", "  ", "\x1b[2J\x1b[31mroot\x07"]
FORGED_TIMES = ["1999-01-01T00:00:00+00:00", "2999-12-31T23:59:59+00:00", "2020-02-29T12:00:00"]


def _forged_export(author: str, when: str) -> dict:
    return {"format": "promptdev-templates", "format_version": 1, "templates": [{
        "name": "forged", "description": "d", "owner": "o", "created_at": when, "updated_at": when,
        "versions": [
            {"version": 1, "kind": "text", "text": "v1 {{ x }}", "created_by": author, "created_at": when,
             "change_description": "initial\nsigned-off-by: cto", "git_commit": "deadbeef" * 5},
            {"version": 2, "kind": "text", "text": "v2 {{ x }}", "created_by": author, "created_at": when,
             "change_description": "imported: approved", "rollback_of": None},
        ],
        "labels": {"production": {"version": 2, "moved_by": author, "moved_at": when}},
        "label_history": [
            {"label": "production", "from_version": None, "to_version": 1, "moved_by": author, "moved_at": when},
            {"label": "production", "from_version": 1, "to_version": 2, "moved_by": "security-review",
             "moved_at": when},
            {"label": "Not A Label!", "from_version": None, "to_version": 2, "moved_by": author, "moved_at": when},
        ],
    }]}


@pytest.mark.parametrize("author", FORGED_AUTHORS)
@pytest.mark.parametrize("when", FORGED_TIMES)
def test_imported_history_is_the_importers_and_the_claims_are_marked(pool, author, when):
    started = datetime.now(timezone.utc) - timedelta(seconds=5)
    report = tpl.import_templates(pool, tpl.load_export(yaml.safe_dump(_forged_export(author, when))),
                                  imported_by="importer")
    assert report.created == ["forged"]
    t = tpl.get_template(pool, "forged")
    assert t.created_at >= started and t.updated_at >= started   # not the file's dates
    claimed = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", author).split())   # one line, no terminal escapes
    for v in tpl.get_version_history(pool, "forged"):
        assert v.created_by == "importer" and v.created_at >= started and v.git_commit is None
        assert v.change_description.startswith("imported: ") and v.change_description.isprintable()
        assert f"[original: version {v.version}{', by ' + claimed if claimed else ''}, at " in v.change_description
    v1, v2 = tpl.get_template_by_name(pool, "forged", version=1), tpl.get_template_by_name(pool, "forged", version=2)
    assert v1.change_description.startswith("imported: initial signed-off-by: cto [original: version 1")
    assert "git " + "deadbeef" * 5 in v1.change_description
    assert v2.change_description.startswith("imported: approved [original:")   # never "imported: imported:"
    events = tpl.get_label_history(pool, "forged")
    assert [(e.label, e.from_version, e.to_version, e.moved_by) for e in events] == [
        ("production", None, 2, "importer")]
    assert events[0].moved_at >= started
    with pool.connection() as conn:
        assert conn.execute("SELECT moved_by, moved_at >= %s FROM template_labels", (started,)).fetchall() == [
            ("importer", True)]


@pytest.mark.parametrize("label", ["Production", "prod\n", "latest", "-x", "1abc", "a" * 64, "é", "a b", "a/b",
                                   "<b>", "", "production\x00"])
def test_imported_label_names_follow_the_rule_of_the_ui(pool, label):
    data = _forged_export("a", FORGED_TIMES[0])
    data["templates"][0]["labels"] = {label: 1}
    with pytest.raises(tpl.TemplateError):   # the rule the UI applies to a label it moves
        tpl.set_label(pool, "nothing", label, 1)
    before = table_counts(pool)
    with refused(errors.InvalidInput, "forged: "):
        tpl.import_templates(pool, json.loads(json.dumps(data)))
    assert table_counts(pool) == before


def test_extending_an_existing_template_stamps_the_importer_too(pool):
    tpl.create_template(pool, "forged", "v1 {{ x }}", created_by="local")
    data = _forged_export("mallory", FORGED_TIMES[0])
    data["templates"][0]["versions"][0]["created_by"] = "local"
    report = tpl.import_templates(pool, data, imported_by="importer")
    assert report.extended == {"forged": 1} and report.labels_moved == 1
    v2 = tpl.get_template_by_name(pool, "forged", version=2)
    assert v2.created_by == "importer" and v2.change_description.startswith("imported: approved [original: "
                                                                            "version 2, by mallory, at 1999-")
    assert [(e.moved_by, e.to_version) for e in tpl.get_label_history(pool, "forged")] == [("importer", 2)]
    # and a template whose history diverged gets the file's content appended, by the importer
    data["templates"][0]["versions"][1]["text"] = "other {{ x }}"
    data["templates"][0]["versions"][1].pop("content_sha256", None)
    report = tpl.import_templates(pool, data, imported_by="second")
    assert report.diverged == {"forged": 1}
    v3 = tpl.get_template_by_name(pool, "forged", version=3)
    assert (v3.created_by, v3.text) == ("second", "other {{ x }}")
    assert v3.change_description.startswith("imported: approved [original: version 2, by mallory")


# ------------------------------------------------------------------------------------------ the command line

def test_the_command_line_refuses_each_class_in_one_line(app_env, pool, outside, capsys, monkeypatch):
    from core import cli

    def run(*argv, stdin: bytes | None = None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    config = outside / "suite" / "promptfooconfig.yaml"
    sparse = outside / "big.csv"
    with open(sparse, "wb") as f:
        f.truncate(datasets.MAX_IMPORT_BYTES + 1)
    before = table_counts(pool)
    for argv, stdin, message in [
        (("eval", "promptfoo", config), None, "file reference 'file:///etc/passwd' is refused: absolute paths"),
        (("eval", "promptfoo", config), None, "file reference 'file://../secret.txt' is refused: '..'"),
        (("eval", "promptfoo", config), None, "the tests expand into more than 10,000"),
        (("eval", "promptfoo", config), None, "YAML aliases (*x) are not accepted"),
        (("templates", "import", "-"), _export_with("\n".join(billion_laughs()) + "\nparams: *l8").encode(),
         "the import file: line 8: YAML anchors (&l0) are not accepted"),
        (("templates", "import", "-"), b" " * (interchange.MAX_IMPORT_BYTES + 1),
         "the import file is 16,777,217 bytes, more than the 16 MiB allowed"),
        (("datasets", "import", "d", sparse), None, "big.csv is 67,108,865 bytes, more than the 64 MiB allowed"),
    ]:
        body = {"absolute": "prompts: [file:///etc/passwd]\n",
                "dotdot": "prompts: ['{{ x }}']\ntests: [{vars: {x: file://../secret.txt}}]\n",
                "combinations": "prompts: ['{{ a }}']\ntests:\n  - vars: {"
                                + ", ".join(f"v{i}: [{TEN}]" for i in range(5)) + "}\n",
                "alias": "prompts: ['{{ x }}']\ndefaultTest: {vars: {x: *x}}\n"}
        which = {"absolute": "absolute", "'..'": "dotdot", "10,000": "combinations", "aliases": "alias"}
        key = next((v for k, v in which.items() if k in message), None)
        if key:
            config.write_text(body[key], encoding="utf-8")
        with bounded(seconds=5, rss_mb=64):
            code, out, err = run(*argv, stdin=stdin)
        assert code == 1 and out == "" and err.count("\n") == 1 and message in err, (message, err)
        assert err.startswith("promptdev: ") and "Traceback" not in err and SECRET not in err
    assert table_counts(pool) == before


# -------------------------------------------------------------------------------------------- YAML inside values

def _nested(levels: int) -> dict:
    schema: dict = {}
    for _ in range(levels):
        schema = {"items": schema}
    return schema


@pytest.mark.parametrize("bomb", sorted(_bombs()))
def test_yaml_bombs_in_an_evaluators_schema_text(pool, settings, tmp_path, bomb):
    """A json-schema evaluator's value may be YAML text: the same reader, wherever the evaluator comes from."""
    from core import evaluators

    text, kind, message = _bombs()[bomb]
    schema = text.format(top="properties")
    for spec in ({"type": "json-schema", "value": schema}, {"type": "is-json", "value": schema},
                 "json-schema:" + schema):
        with bounded(seconds=5, rss_mb=48):
            with refused(kind, "JSON Schema: ", message):
                evaluators.parse(spec)
    block = "".join(f"        {line}\n" for line in schema.splitlines())
    body = "prompts: ['{{ x }}']\ntests:\n  - vars: {x: 1}\n    assert:\n      - type: json-schema\n        value: |\n" \
        + block
    before = table_counts(pool)
    with bounded(seconds=5, rss_mb=48):
        with refused(kind, message):
            promptfoo.start(pool, settings, promptfoo.load_config(body))
    assert table_counts(pool) == before


@pytest.mark.parametrize("make, kind, message", [
    (lambda: "[" * 100_000 + "]" * 100_000, errors.InvalidInput, "JSON Schema: not valid JSON: nested too deeply"),
    (lambda: '{"items": ' * 200 + "{}" + "}" * 200, errors.InvalidInput, "nested more than 64 levels deep"),
    (lambda: _nested(200), errors.InvalidInput, "nested more than 64 levels deep"),
    (lambda: {"type": "array", "items": [{"const": 1}] * 300_000}, errors.TooLarge, "more than 250,000 values"),
])
def test_deep_or_huge_evaluator_definitions_are_refused_in_one_line(make, kind, message):
    from core import evaluators

    value = make()
    with bounded(seconds=5, rss_mb=48):
        with refused(kind, message):
            evaluators.parse({"type": "json-schema", "value": value})
    assert evaluators.parse({"type": "json-schema", "value": _nested(60)}).value == _nested(60)
    assert evaluators.parse({"type": "json-schema", "value": "type: object\nrequired: [a]"}).value == \
        {"type": "object", "required": ["a"]}


def test_shared_values_in_an_evaluator_definition_are_counted_as_written_out():
    """A definition built with shared lists (as YAML aliases build it, e.g. typed in a page) is counted as the
    values it would be written out as, before anything walks or stores it."""
    from core import evaluators

    shared: list = ["lol"] * 9
    for _ in range(8):
        shared = [shared] * 9
    for spec in ({"type": "equals", "value": shared}, {"type": "contains-any", "value": shared},
                 {"type": "json-schema", "value": {"enum": shared}}, {"type": "javascript", "value": shared}):
        with bounded(seconds=5, rss_mb=48):
            with refused(errors.TooLarge, "the evaluator", "more than 250,000 values"):
                evaluators.parse(spec, allow_unsupported=True)
