"""promptfoo interop: read a promptfooconfig.yaml into templates, a dataset and evaluators, and run it on our model.

Understood: `prompts` (inline text, chat messages as JSON, `file://` text files holding several prompts separated by
`---` lines, JSON/YAML message files, globs), `tests` (inline, or `file://` CSV/YAML/JSON/JSONL files; CSV `__expected`
columns in `type:value` shorthand, `__description`, `__threshold`), `defaultTest` (vars, assert, threshold), `vars`
with list values (expanded into one test per combination, as promptfoo does), `assert` lists (`not-` negation,
`threshold`, `weight`, `metric`), a test's `threshold` (it passes when its weighted score reaches it, as in promptfoo;
stored as the item's `threshold` metadata). Providers are mapped to the configured model and reported. Assertion
types PromptDev does not run are named in the report and count as failed checks — never dropped.

A config is hostile input. `load_config(text, files)` reads one uploaded together with the files it refers to, and
its `file://` references resolve among those files only; `load_config_path(path)` (the command line) resolves them
inside the config's own folder only, on real paths (a symbolic link is followed, then must still lie inside).
Absolute paths, `..` and links or globs leading elsewhere are refused, naming the reference. YAML anchors and
aliases are refused (core.untrusted). What list-valued vars expand into is counted before anything is expanded.
Caps (README "Limits"): MAX_CONFIG_BYTES for the config, MAX_FILE_BYTES for each file it refers to,
MAX_TOTAL_BYTES for everything read (a file named twice counts twice), MAX_FILES, MAX_PROMPTS, MAX_TESTS after
expansion, MAX_EVALUATIONS (tests × prompts) and MAX_EXPANDED_BYTES for the variables and assertions the expanded
tests store. Nothing is written before the whole config has been read and checked.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from psycopg_pool import ConnectionPool

from core import datasets, evaluations, evaluators, models, templates, untrusted
from core.config import Settings
from core.errors import InvalidInput, TooLarge
from core.llm import GenerationParams

TEXT_SUFFIXES = {".txt", ".md", ".j2", ".jinja", ".jinja2", ".prompt", ""}
IGNORED_KEYS = {"outputPath", "sharing", "env", "evaluateOptions", "commandLineOptions", "nunjucksFilters",
                "writeLatestResults", "tags", "redteam", "extensions", "metadata", "derivedMetrics", "tracing"}
KNOWN_KEYS = {"description", "prompts", "providers", "tests", "defaultTest", "scenarios"} | IGNORED_KEYS

MIB = 1024 * 1024
MAX_CONFIG_BYTES = 1 * MIB       # the promptfooconfig.yaml itself
MAX_FILE_BYTES = 16 * MIB        # each file it refers to (prompts, tests, vars)
MAX_TOTAL_BYTES = 32 * MIB       # everything read for one import, each reference counted
MAX_FILES = 200                  # files uploaded together, or matched by one glob
MAX_PROMPTS = 100                # prompts (each becomes a template)
MAX_TESTS = 10_000               # tests after list-valued vars are expanded (each becomes a dataset item)
MAX_EVALUATIONS = 50_000         # tests × prompts: the generations one run makes
MAX_EXPANDED_BYTES = 32 * MIB    # the variables and assertions the expanded tests store


class PromptfooError(InvalidInput):
    """The config cannot be imported; the message names the file and the problem."""


class PromptfooTooLarge(TooLarge):
    """The config, its files or what it expands into exceed a cap; the message names the cap."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its label and content (text, or chat messages)."""

    label: str
    content: str | list[dict[str, str]]
    source: str


@dataclass(frozen=True)
class Test:
    """One test case: variables and its own assertions."""

    vars: dict[str, Any]
    asserts: list[Any]
    description: str = ""
    threshold: float | None = None   # the test passes when its weighted score reaches it (instead of every assert)


@dataclass
class Suite:
    """A promptfoo config, read."""

    path: Path
    name: str
    description: str
    prompts: list[Prompt]
    tests: list[Test]
    default_asserts: list[Any]
    providers: list[str]
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)   # from the providers' config (temperature, max_tokens...)


@dataclass
class Imported:
    """What an import created and what the user must know about it."""

    suite: Suite
    dataset: str
    template_refs: list[str]
    evaluators: list[dict[str, Any]]
    model: str
    provider_mapping: list[str]
    unsupported: Counter
    notes: list[str]

    def report_lines(self) -> list[str]:
        """Lines for the CLI and the page: providers, what was created, unsupported assertion types, notes."""
        lines = list(self.provider_mapping)
        lines.append(f"templates: {', '.join(self.template_refs)}")
        lines.append(f"dataset: {self.dataset} ({len(self.suite.tests)} test(s))")
        lines.append(f"assertions for every test: {len(self.evaluators)}")
        if self.suite.params:
            lines.append("parameters from the provider config: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(self.suite.params.items())))
        for kind, n in sorted(self.unsupported.items()):
            lines.append(f"unsupported assertion type {kind!r} ({n}×): counted as not passed")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


# ------------------------------------------------------------------------------------------------------- reading

def _slug(text: str, fallback: str = "suite") -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return (slug or fallback)[:60].strip("-._") or fallback


def _show(ref: Any) -> str:
    """A reference as it may appear in a one-line message: quoted, escaped, shortened."""
    text = repr(str(ref))
    return text if len(text) <= 120 else text[:117] + "…'"


def _refused(ref: str, why: str) -> PromptfooError:
    return PromptfooError(f"file reference {_show(ref)} is refused: {why}")


def _ref_path(ref: str) -> str:
    """The relative path a `file://` reference names, checked: never absolute, never `..`, never NUL. Folders are
    separated by `/` (a `\\` counts as one too)."""
    raw = ref[len("file://"):] if ref.startswith("file://") else ref
    raw = raw.split(":", 1)[0] if re.search(r"\.(py|js|ts|mjs|cjs):", raw) else raw
    if "\x00" in raw:
        raise _refused(ref, "it contains a NUL character")
    path = raw.replace("\\", "/")
    if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:", path):
        raise _refused(ref, "absolute paths are not allowed; name files relative to the config's folder")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refused(ref, "'..' would leave the config's folder; only files inside it can be used")
    if not parts:
        raise _refused(ref, "it names no file")
    return "/".join(parts)


def _is_glob(rel: str) -> bool:
    return any(ch in rel for ch in "*?[")


class _Sources:
    """Where the config's `file://` references may lead, and what reading them has cost so far. Subclasses: the
    files uploaded together (`_Uploaded`) or the config's own folder on this machine (`_Folder`)."""

    def __init__(self, config_name: str, folder: str = ""):
        self.config_name = config_name
        self.folder = folder   # the config's folder name, if it has one
        self.loaded = 0        # bytes handed out, every reference counted (a file named twice counts twice)
        self.tests_read = 0    # tests read so far, before expansion

    def resolve(self, ref: str) -> list[str]:
        """The files (keys) a reference names; globs allowed. A path that does not exist is also looked up by its
        bare file name, for uploads that lose their folders."""
        rel = _ref_path(ref)
        if _is_glob(rel):
            found = self._glob(ref, rel)
            if not found:
                raise PromptfooError(f"{_show(ref)}: no file matches")
            if len(found) > MAX_FILES:
                raise PromptfooTooLarge(f"{_show(ref)} matches more than {MAX_FILES} files")
            return found
        return [self._find(ref, rel)]

    def read(self, ref: str, key: str) -> bytes:
        data = self._read(ref, key)
        self.loaded += len(data)
        if self.loaded > MAX_TOTAL_BYTES:
            raise PromptfooTooLarge(f"the files the config refers to add up to more than "
                                    f"{untrusted.human(MAX_TOTAL_BYTES)} (each reference counted; at {_show(ref)})")
        return data

    def text(self, ref: str, key: str) -> str:
        try:
            return self.read(ref, key).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PromptfooError(f"{key}: not UTF-8 text") from None

    def count_tests(self, n: int, where: str) -> None:
        self.tests_read += n
        if self.tests_read > MAX_TESTS:
            raise PromptfooTooLarge(f"{where}: more than {MAX_TESTS:,} tests; split the suite")

    def _find(self, ref: str, rel: str) -> str:
        raise NotImplementedError

    def _glob(self, ref: str, rel: str) -> list[str]:
        raise NotImplementedError

    def _read(self, ref: str, key: str) -> bytes:
        raise NotImplementedError


class _Uploaded(_Sources):
    """Files uploaded together with the config: references resolve among them and nowhere else."""

    def __init__(self, config_name: str, files: Mapping[str, bytes]):
        super().__init__(config_name)
        if len(files) > MAX_FILES:
            raise PromptfooTooLarge(f"{len(files)} files uploaded; at most {MAX_FILES}")
        total = 0
        self.files: dict[str, bytes] = {}
        for name, data in files.items():
            if not isinstance(data, (bytes, bytearray)):
                raise PromptfooError(f"{_show(name)}: the content of an uploaded file must be bytes")
            untrusted.check_size(len(data), MAX_FILE_BYTES, _show(name))
            total += len(data)
            untrusted.check_size(total, MAX_TOTAL_BYTES, "the uploaded files together")
            if not str(name).isprintable():
                raise PromptfooError(f"{_show(name)}: a file name may not hold control characters")
            key = "/".join(p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".", ".."))
            if key:
                self.files[key] = bytes(data)

    def _find(self, ref: str, rel: str) -> str:
        if rel in self.files:
            return rel
        name = rel.rsplit("/", 1)[-1]
        same = [k for k in self.files if k.rsplit("/", 1)[-1] == name]
        if len(same) == 1:
            return same[0]
        raise PromptfooError(f"{_show(ref)}: no such file among the uploaded files" if not same else
                             f"{_show(ref)}: several uploaded files are named {name!r}")

    def _glob(self, ref: str, rel: str) -> list[str]:
        found = [k for k in sorted(self.files) if fnmatch.fnmatchcase(k, rel)]
        if not found:
            name = rel.rsplit("/", 1)[-1]
            found = [k for k in sorted(self.files) if fnmatch.fnmatchcase(k.rsplit("/", 1)[-1], name)]
        return found

    def _read(self, ref: str, key: str) -> bytes:
        return self.files[key]


class _Folder(_Sources):
    """The config's folder on this machine: references resolve inside it (symbolic links included: where a link
    leads is checked, not its name), to regular files only."""

    def __init__(self, config_name: str, root: Path):
        super().__init__(config_name, root.name)
        self.root = root

    def _inside(self, ref: str, path: Path) -> Path:
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as exc:   # a symbolic link loop
            raise _refused(ref, f"it cannot be resolved ({exc})") from None
        if not real.is_relative_to(self.root):
            raise _refused(ref, "it leads outside the config's folder (through a symbolic link)")
        return real

    def _key(self, ref: str, real: Path) -> str:
        if not real.is_file():
            raise PromptfooError(f"{_show(ref)}: not a regular file")
        key = real.relative_to(self.root).as_posix()
        if not key.isprintable():
            raise PromptfooError(f"{_show(ref)}: the file name {key!r} holds control characters")
        return key

    def _find(self, ref: str, rel: str) -> str:
        real = self._inside(ref, self.root / rel)
        if not real.exists():
            beside = self._inside(ref, self.root / rel.rsplit("/", 1)[-1])
            if not beside.exists():
                raise PromptfooError(f"{_show(ref)}: no such file")
            real = beside
        return self._key(ref, real)

    def _glob(self, ref: str, rel: str) -> list[str]:
        found = []
        try:
            for path in itertools.islice(self.root.glob(rel), MAX_FILES + 1):
                real = self._inside(ref, path)
                if real.is_file():
                    found.append(self._key(ref, real))
        except (ValueError, NotImplementedError) as exc:   # e.g. `a**b`
            raise PromptfooError(f"{_show(ref)}: not a valid glob ({exc})") from None
        return sorted(set(found))

    def _read(self, ref: str, key: str) -> bytes:
        real = self._inside(ref, self.root / key)
        return untrusted.read_file(real, MAX_FILE_BYTES, key, error=PromptfooError)


def _structured(text: str, key: str, suffix: str) -> Any:
    if suffix == ".json":
        return untrusted.load_json(text, key, error=PromptfooError)
    return untrusted.load_yaml(text, key, error=PromptfooError)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise PromptfooError(f"{where}: chat messages must be a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PromptfooError(f"{where}: each chat message needs a role and content")
        if not isinstance(m["content"], str):
            raise PromptfooError(f"{where}: message content must be text (images and tool calls are not supported)")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def _inline_prompt(text: str, label: str, source: str) -> Prompt:
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, list):
            return Prompt(label, _messages(parsed, source), source)
    return Prompt(label, text, source)


SEPARATOR = re.compile(r"(?m)^---[ \t]*$")


def _file_prompts(files: _Sources, ref: str, label: str | None) -> list[Prompt]:
    prompts = []
    for key in files.resolve(ref):
        suffix = PurePosixPath(key).suffix.lower()
        name = label or PurePosixPath(key).stem
        if suffix in (".py", ".js", ".ts", ".mjs", ".cjs"):
            raise PromptfooError(f"{_show(ref)}: prompt functions ({suffix}) are not supported; use a text or JSON "
                                 f"prompt")
        if suffix not in TEXT_SUFFIXES and suffix not in (".json", ".yaml", ".yml", ".jsonl"):
            raise PromptfooError(f"{_show(ref)}: unsupported prompt file type {suffix!r}")
        text = files.text(ref, key)
        if suffix in (".json", ".yaml", ".yml"):
            data = _structured(text, key, suffix)
            if isinstance(data, str):
                prompts.append(_inline_prompt(data, name, key))
            else:
                prompts.append(Prompt(name, _messages(data, key), key))
            continue
        # count the separators before splitting: a file of nothing but `---` lines is not a million prompts
        if sum(1 for _ in itertools.islice(SEPARATOR.finditer(text), MAX_PROMPTS + 1)) > MAX_PROMPTS:
            raise PromptfooTooLarge(f"{key}: more than {MAX_PROMPTS} prompts")
        parts = [p.strip("\n") for p in SEPARATOR.split(text)]
        parts = [p for p in parts if p.strip()]
        if len(prompts) + len(parts) > MAX_PROMPTS:
            raise PromptfooTooLarge(f"{key}: more than {MAX_PROMPTS} prompts")
        for k, part in enumerate(parts, start=1):
            prompts.append(_inline_prompt(part, name if len(parts) == 1 else f"{name}-{k}", f"{key}#{k}"))
    return prompts


def _read_prompts(files: _Sources, raw: Any) -> list[Prompt]:
    if raw is None:
        raise PromptfooError("the config has no prompts")
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, Mapping):
        # one prompt object, or the older {"file://a.txt": "label", ...} form
        raw = [raw] if ("raw" in raw or "id" in raw) else [{"id": k, "label": v} for k, v in raw.items()]
    elif not isinstance(raw, list):
        raise PromptfooError("prompts must be text, a list or a mapping")
    prompts: list[Prompt] = []
    for i, entry in enumerate(raw, start=1):
        if isinstance(entry, str):
            if entry.startswith("file://"):
                prompts.extend(_file_prompts(files, entry, None))
            else:
                prompts.append(_inline_prompt(entry, f"prompt-{i}", f"prompts[{i}]"))
        elif isinstance(entry, Mapping):
            label = str(entry.get("label") or entry.get("id") or f"prompt-{i}")
            if "raw" in entry:
                raw_value = entry["raw"]
                if isinstance(raw_value, list):
                    prompts.append(Prompt(label, _messages(raw_value, f"prompts[{i}]"), f"prompts[{i}]"))
                else:
                    prompts.append(_inline_prompt(str(raw_value), label, f"prompts[{i}]"))
            elif str(entry.get("id", "")).startswith("file://"):
                prompts.extend(_file_prompts(files, entry["id"], entry.get("label")))
            else:
                raise PromptfooError(f"prompts[{i}]: needs raw text or a file:// id")
        else:
            raise PromptfooError(f"prompts[{i}]: not a prompt")
        if len(prompts) > MAX_PROMPTS:
            raise PromptfooTooLarge(f"more than {MAX_PROMPTS} prompts; each becomes a template")
    if not prompts:
        raise PromptfooError("the config has no prompts")
    labels = Counter(p.label for p in prompts)
    if any(n > 1 for n in labels.values()):
        prompts = [Prompt(f"{p.label}-{k}", p.content, p.source) for k, p in enumerate(prompts, start=1)]
    return prompts


PARAM_KEYS = {"temperature": "temperature", "max_tokens": "max_tokens", "top_p": "top_p", "top_k": "top_k",
              "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty", "maxTokens": "max_tokens",
              "topP": "top_p", "topK": "top_k"}


def _providers(raw: Any, notes: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Provider names for the report, and the generation parameters of their config (the first that has any)."""
    if raw is None:
        return [], {}
    if isinstance(raw, (str, Mapping)):
        raw = [raw]
    if not isinstance(raw, list):
        raise PromptfooError("providers must be a list")
    out: list[str] = []
    configs: list[dict[str, Any]] = []
    for p in raw:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Mapping):
            if "id" in p:
                out.append(f"{p['label']} ({p['id']})" if p.get("label") else str(p["id"]))
                config = p.get("config") or {}
            else:  # {"openai:gpt-4": {config: ...}}
                out.extend(str(k) for k in p)
                config = next(iter(p.values()), {}) or {}
                config = config.get("config", config) if isinstance(config, Mapping) else {}
            if isinstance(config, Mapping):
                params = {PARAM_KEYS[k]: v for k, v in config.items() if k in PARAM_KEYS}
                if params:
                    configs.append(params)
        else:
            out.append(str(p))
    params = configs[0] if configs else {}
    if len({json.dumps(c, sort_keys=True, default=str) for c in configs}) > 1:
        notes.append("providers set different parameters: the first provider's are used")
    return out, params


def _load_var(files: _Sources, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("file://"):
        key = files.resolve(value)[0]
        suffix = PurePosixPath(key).suffix.lower()
        if suffix in (".py", ".js", ".ts", ".mjs", ".cjs"):
            raise PromptfooError(f"{_show(value)}: variables computed by scripts are not supported")
        text = files.text(value, key)
        if suffix in (".json", ".yaml", ".yml"):
            return _structured(text, key, suffix)
        return text
    return value


def _combinations(vars_: Mapping[str, Any]) -> int:
    """How many tests list-valued vars expand into (stops counting past MAX_TESTS)."""
    lists = [v for v in vars_.values() if isinstance(v, list)]
    if any(not v for v in lists):
        return 0
    n = 1
    for v in lists:
        n *= len(v)
        if n > MAX_TESTS:
            break
    return n


class _Sizes:
    """Approximate stored size of values (JSON text), each container measured once however often it is used."""

    def __init__(self) -> None:
        self.known: dict[int, int] = {}
        self.keep: list[Any] = []   # ids stay valid while measured values are alive

    def of(self, value: Any) -> int:
        if isinstance(value, str):
            return len(value) + 2
        if value is None or isinstance(value, (bool, int, float)):
            return 8
        size = self.known.get(id(value))
        if size is None:
            size = len(json.dumps(value, ensure_ascii=False, default=str))
            self.known[id(value)] = size
            self.keep.append(value)
        return size


def _expanded_size(sizes: _Sizes, vars_: Mapping[str, Any], test: Test, n: int) -> int:
    """Bytes n expanded tests store: each list value stored in n / len(list) of them, the rest in all n."""
    if n == 0:
        return 0
    total = n * (sizes.of(test.asserts) + len(test.description) + 16)
    for key, value in vars_.items():
        if isinstance(value, list):
            total += (n // len(value)) * sum(sizes.of(x) + len(key) for x in value)
        else:
            total += n * (sizes.of(value) + len(key))
    return total


def _expand(vars_: Mapping[str, Any]) -> list[dict[str, Any]]:
    """promptfoo expands list-valued vars into one test per combination (counted and capped before: see load)."""
    keys = [k for k, v in vars_.items() if isinstance(v, list)]
    if not keys:
        return [dict(vars_)]
    combos = itertools.product(*[vars_[k] for k in keys])
    return [{**vars_, **dict(zip(keys, combo))} for combo in combos]


def _csv_tests(files: _Sources, ref: str, key: str, notes: list[str]) -> list[Test]:
    text = files.text(ref, key)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    tests = []
    ignored: set[str] = set()
    try:
        for row in reader:
            files.count_tests(1, key)
            if None in row:
                raise PromptfooError(f"{key} line {reader.line_num}: more fields than the header has")
            vars_, asserts, description, threshold = {}, [], "", None
            for col, cell in row.items():
                col = (col or "").strip()
                if cell is None:
                    raise PromptfooError(f"{key} line {reader.line_num}: fewer fields than the header has")
                if re.fullmatch(r"__expected\d*", col):
                    if cell.strip():
                        asserts.append(cell)
                elif col == "__description":
                    description = cell
                elif col == "__threshold":
                    threshold = _threshold(cell, f"{key} line {reader.line_num}") if cell.strip() else None
                elif col.startswith("__"):
                    ignored.add(col)
                else:
                    vars_[col] = cell
            tests.append(Test(vars_, asserts, description, threshold))
    except csv.Error as exc:
        raise PromptfooError(f"{key} line {reader.line_num}: not valid CSV: {exc}") from None
    for col in sorted(ignored):
        notes.append(f"{PurePosixPath(key).name}: column {col[:60]} is not supported and was ignored")
    return tests


def _structured_tests(files: _Sources, ref: str, key: str) -> list[Any]:
    text = files.text(ref, key)
    suffix = PurePosixPath(key).suffix.lower()
    if suffix == ".jsonl":
        data = []
        for number, line in enumerate(io.StringIO(text), start=1):
            if line.strip():
                files.count_tests(1, key)
                data.append(untrusted.load_json(line, f"{key} line {number}", error=PromptfooError))
        return data
    data = _structured(text, key, suffix)
    if not isinstance(data, list):
        raise PromptfooError(f"{key}: must hold a list of tests")
    files.count_tests(len(data), key)
    return data


def _read_tests(files: _Sources, raw: Any, notes: list[str]) -> list[Test]:
    if raw is None:
        return [Test({}, [])]
    if not isinstance(raw, (str, Mapping, list)):
        raise PromptfooError("tests must be a list, a test or a file:// reference")
    entries = [raw] if isinstance(raw, (str, Mapping)) else raw
    tests: list[Test] = []
    for i, entry in enumerate(entries, start=1):
        if isinstance(entry, str):
            if not entry.startswith("file://"):
                raise PromptfooError(f"tests[{i}]: {_show(entry)} is neither a test nor a file:// reference")
            for key in files.resolve(entry):
                suffix = PurePosixPath(key).suffix.lower()
                if suffix == ".csv":
                    tests.extend(_csv_tests(files, entry, key, notes))
                elif suffix in (".yaml", ".yml", ".json", ".jsonl"):
                    name = PurePosixPath(key).name
                    tests.extend(_test_from_mapping(files, t, f"{name}[{k}]", notes)
                                 for k, t in enumerate(_structured_tests(files, entry, key), start=1))
                else:
                    raise PromptfooError(f"{_show(entry)}: tests must come from a .csv, .yaml, .json or .jsonl file")
        elif isinstance(entry, Mapping):
            files.count_tests(1, "the config")
            tests.append(_test_from_mapping(files, entry, f"tests[{i}]", notes))
        else:
            raise PromptfooError(f"tests[{i}]: not a test")
    return tests


def _test_from_mapping(files: _Sources, entry: Any, where: str, notes: list[str]) -> Test:
    if not isinstance(entry, Mapping):
        raise PromptfooError(f"{where}: a test must be a mapping")
    vars_ = entry.get("vars") or {}
    if isinstance(vars_, str) and vars_.startswith("file://"):
        vars_ = _load_var(files, vars_)
    if not isinstance(vars_, Mapping):
        raise PromptfooError(f"{where}: vars must be a mapping")
    asserts = entry.get("assert") or []
    if not isinstance(asserts, list):
        raise PromptfooError(f"{where}: assert must be a list")
    for key in sorted(map(str, set(entry) - {"vars", "assert", "description", "metadata", "threshold"})):
        notes.append(f"{where}: {key[:60]!r} is not supported and was ignored")
    threshold = None if entry.get("threshold") is None else _threshold(entry["threshold"], where)
    return Test({k: _load_var(files, v) for k, v in vars_.items()}, list(asserts), str(entry.get("description") or ""),
                threshold)


def _threshold(value: Any, where: str) -> float:
    """A test's pass threshold: a number from 0 to 1."""
    try:
        number = evaluators._number(value, "threshold")
    except ValueError as exc:
        raise PromptfooError(f"{where}: {exc}") from None
    if not 0 <= number <= 1:
        raise PromptfooError(f"{where}: threshold must be between 0 and 1, got {value!r}")
    return number


def load_config(text: str | bytes, files: Mapping[str, bytes] | None = None, *,
                config_name: str = "promptfooconfig.yaml") -> Suite:
    """Read a promptfoo config uploaded with the files it refers to ({name: content}, names as uploaded, folders
    optional): its `file://` references resolve among those files and nowhere else. Nothing is written.
    PromptfooError names the problem (and the reference); PromptfooTooLarge a cap (see the module's caps)."""
    config_name = PurePosixPath(str(config_name).replace("\\", "/")).name
    config_name = config_name if config_name and config_name.isprintable() else "promptfooconfig.yaml"
    if isinstance(text, str):
        untrusted.check_text(text, MAX_CONFIG_BYTES, config_name)
    else:
        untrusted.check_size(len(text), MAX_CONFIG_BYTES, config_name)
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PromptfooError(f"{config_name}: not UTF-8 text") from None
    return _load(text, _Uploaded(config_name, files or {}))


def load_config_path(path: str | Path) -> Suite:
    """Read a promptfoo config on this machine (the command line): its `file://` references resolve inside the
    config's own folder and its subfolders only — absolute paths, `..`, and symbolic links or globs that lead
    elsewhere are refused, naming the reference. Nothing is written."""
    path = Path(path)
    try:
        real = path.resolve()
        root = path.absolute().parent.resolve()
    except (OSError, RuntimeError) as exc:
        raise PromptfooError(f"{path}: cannot be resolved ({exc})") from None
    data = untrusted.read_file(real, MAX_CONFIG_BYTES, str(path), error=PromptfooError)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PromptfooError(f"{path}: not UTF-8 text") from None
    return _load(text, _Folder(path.name, root))


load = load_config_path   # the name earlier callers use


def _load(text: str, files: _Sources) -> Suite:
    with untrusted.no_gc():   # a full collection over the tests read so far would stall every other thread
        return _read_suite(text, files)


def _read_suite(text: str, files: _Sources) -> Suite:
    name = files.config_name
    doc = untrusted.load_yaml(text, name, error=PromptfooError)
    if not isinstance(doc, Mapping):
        raise PromptfooError(f"{name}: a promptfoo config is a YAML mapping with prompts, providers and tests")
    notes: list[str] = []
    for key in sorted(map(str, set(doc) - KNOWN_KEYS)):
        notes.append(f"config key {key[:60]!r} is not understood and was ignored")
    for key in sorted(set(doc) & IGNORED_KEYS):
        notes.append(f"config key {key!r} does not apply here and was ignored")
    if doc.get("scenarios"):
        raise PromptfooError(f"{name}: scenarios are not supported")
    prompts = _read_prompts(files, doc.get("prompts"))
    default = doc.get("defaultTest") or {}
    if isinstance(default, str) and default.startswith("file://"):
        key = files.resolve(default)[0]
        default = _structured(files.text(default, key), key, PurePosixPath(key).suffix.lower()) or {}
    if not isinstance(default, Mapping):
        raise PromptfooError(f"{name}: defaultTest must be a mapping")
    default_vars = default.get("vars") or {}
    if not isinstance(default_vars, Mapping):
        raise PromptfooError(f"{name}: defaultTest.vars must be a mapping")
    default_vars = {k: _load_var(files, v) for k, v in default_vars.items()}
    default_asserts = default.get("assert") or []
    if not isinstance(default_asserts, list):
        raise PromptfooError(f"{name}: defaultTest.assert must be a list")
    for key in sorted(map(str, set(default) - {"vars", "assert", "options", "metadata", "description",
                                               "threshold"})):
        notes.append(f"defaultTest.{key[:60]} is not supported and was ignored")
    options = default.get("options") or {}
    if isinstance(options, Mapping) and options.get("provider"):
        notes.append(f"defaultTest.options.provider {_show(options['provider'])}: the judge runs on the configured "
                     f"model")
    default_threshold = (None if default.get("threshold") is None
                         else _threshold(default["threshold"], "defaultTest"))
    raw_tests = _read_tests(files, doc.get("tests"), notes)
    # Count what the list-valued vars expand into, and what that stores, before expanding anything.
    total, stored, sizes = 0, 0, _Sizes()
    for k, t in enumerate(raw_tests, start=1):
        vars_ = {**default_vars, **t.vars}
        n = _combinations(vars_)
        total += n
        if total > MAX_TESTS:
            raise PromptfooTooLarge(f"the tests expand into more than {MAX_TESTS:,} (list-valued vars make one test "
                                    f"per combination; test {k} alone makes {_at_least(n)}); split the suite")
        stored += _expanded_size(sizes, vars_, t, n)
        if stored > MAX_EXPANDED_BYTES:
            raise PromptfooTooLarge(f"the tests' variables and assertions would take more than "
                                    f"{untrusted.human(MAX_EXPANDED_BYTES)} once expanded (at test {k})")
    if total * len(prompts) > MAX_EVALUATIONS:
        raise PromptfooTooLarge(f"{total:,} tests × {len(prompts)} prompts is more than {MAX_EVALUATIONS:,} "
                                f"evaluations; split the suite")
    tests = []
    for t in raw_tests:
        threshold = t.threshold if t.threshold is not None else default_threshold
        for vars_ in _expand({**default_vars, **t.vars}):
            tests.append(Test(vars_, t.asserts, t.description, threshold))
    description = str(doc.get("description") or "")
    stem = PurePosixPath(name).stem
    suite_name = _slug(description or (files.folder if stem == "promptfooconfig" and files.folder else stem))
    providers, params = _providers(doc.get("providers"), notes)
    try:
        GenerationParams.from_dict(params)
    except ValueError as exc:
        raise PromptfooError(f"{name}: provider config: {exc}") from None
    return Suite(Path(name), suite_name, description, prompts, tests, list(default_asserts), providers, notes, params)


def _at_least(n: int) -> str:
    return f"more than {MAX_TESTS:,}" if n > MAX_TESTS else f"{n:,}"


# ------------------------------------------------------------------------------------------------------ importing

def _map_assert(spec: Any, unsupported: Counter, provider_notes: set[str], registered: set[str]) -> dict[str, Any]:
    ev = evaluators.parse(spec, allow_unsupported=True)
    if ev.type == evaluators.UNSUPPORTED:
        unsupported[ev.options.get("original_type", "?")] += 1
    elif ev.provider and ev.provider not in registered:
        provider_notes.add(f"llm-rubric provider {ev.provider!r} → the run's model")
        ev = replace(ev, provider=None)
    return ev.to_dict()


def import_suite(pool: ConnectionPool, settings: Settings, suite: Suite, *, created_by: str = "",
                 name: str | None = None) -> Imported:
    """Create (or update) one template per prompt and a dataset of the tests; return what the run needs. Every
    prompt and test is checked before anything is written."""
    for prompt in suite.prompts:
        try:
            templates.extract_variables(prompt.content)
        except templates.TemplateError as exc:
            raise PromptfooError(f"prompt {prompt.label[:60]!r} ({prompt.source}): {exc}") from None
    default = models.ensure_default_model_registered(pool, settings)
    registered = {m.name for m in models.list_models(pool)}
    base = _slug(name or suite.name)
    unsupported: Counter = Counter()
    provider_notes: set[str] = set()
    run_evals = [_map_assert(a, unsupported, provider_notes, registered) for a in suite.default_asserts]
    items = []
    for k, test in enumerate(suite.tests, start=1):
        try:
            asserts = [_map_assert(a, unsupported, provider_notes, registered) for a in test.asserts]
        except ValueError as exc:
            raise PromptfooError(f"test {k}: {exc}") from None
        metadata: dict[str, Any] = {}
        if asserts:
            metadata["assert"] = asserts
        if test.description:
            metadata["description"] = test.description
        if test.threshold is not None:
            metadata["threshold"] = test.threshold
        try:
            items.append(datasets.make_item(test.vars, None, (), metadata))
        except ValueError as exc:
            raise PromptfooError(f"test {k}: {exc}") from None
    refs = []
    for prompt in suite.prompts:
        tname = f"{base}-{_slug(prompt.label, 'prompt')}"[:100].strip("-._")
        description = f"imported from promptfoo {suite.path.name}: {prompt.source}"
        try:
            tv, _ = templates.update_template(pool, tname, prompt.content, created_by=created_by,
                                              change_description="promptfoo import")
        except templates.TemplateNotFound:
            tv = templates.create_template(pool, tname, prompt.content, description=description,
                                           category="promptfoo", created_by=created_by,
                                           change_description="imported from promptfoo")
        refs.append(tv.ref)
    dataset_name = base
    _sync_dataset(pool, dataset_name, items, suite, created_by)
    mapping = [f"provider {p} → {default.name} (configured model)" for p in suite.providers] or [
        f"no providers in the config: running on {default.name} (configured model)"]
    if len(suite.providers) > 1:
        mapping.append(f"{len(suite.providers)} providers map to the same model: evaluated once")
    return Imported(suite, dataset_name, refs, run_evals, default.name, mapping, unsupported,
                    [*suite.notes, *sorted(provider_notes)])


def _sync_dataset(pool: ConnectionPool, name: str, items: Sequence[datasets.ItemInput], suite: Suite,
                  created_by: str) -> None:
    """Make the dataset hold exactly these items, keeping item ids (and so pairing across runs) where it can."""
    try:
        current = datasets.list_items(pool, name)
    except datasets.DatasetNotFound:
        datasets.create_dataset(pool, name, description=f"imported from promptfoo {suite.path.name}",
                                created_by=created_by)
        current = []
    updated = {}
    for old, new in zip(current, items):
        if old.content != new:
            updated[old.id] = new
    added = list(items[len(current):])
    deleted = [old.id for old in current[len(items):]]
    if updated or added or deleted:
        datasets.apply_edits(pool, name, added=added, updated=updated, deleted=deleted, edited_by=created_by)


def start(pool: ConnectionPool, settings: Settings, source: Suite | str | Path, *, created_by: str = "",
          name: str | None = None) -> tuple[Any, Imported]:
    """Import a promptfoo config — a Suite read by load_config (uploads), or a path on this machine read by
    load_config_path — and queue its run; (run, import report)."""
    suite = source if isinstance(source, Suite) else load_config_path(source)
    imported = import_suite(pool, settings, suite, created_by=created_by, name=name)
    run = evaluations.create_run(pool, settings, dataset=imported.dataset, templates=imported.template_refs,
                                 evaluators=imported.evaluators, params=suite.params,
                                 name=f"promptfoo: {suite.description or suite.name}",
                                 created_by=created_by, source="promptfoo", allow_unsupported=True)
    return run, imported
