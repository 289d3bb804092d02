"""promptfoo interop: read a promptfooconfig.yaml into templates, a dataset and evaluators, and run it on our model.

Understood: `prompts` (inline text, chat messages as JSON, `file://` text files holding several prompts separated by
`---` lines, JSON/YAML message files, globs), `tests` (inline, or `file://` CSV/YAML/JSON/JSONL files; CSV `__expected`
columns in `type:value` shorthand, `__description`, `__threshold`), `defaultTest` (vars, assert, threshold), `vars`
with list values (expanded into one test per combination, as promptfoo does), `assert` lists (`not-` negation,
`threshold`, `weight`, `metric`), a test's `threshold` (it passes when its weighted score reaches it, as in promptfoo;
stored as the item's `threshold` metadata). Providers are mapped to the configured model and reported. Assertion
types PromptDev does not run are named in the report and count as failed checks — never dropped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from psycopg_pool import ConnectionPool

from core import datasets, evaluations, evaluators, models, templates
from core.config import Settings
from core.errors import InvalidInput
from core.llm import GenerationParams

TEXT_SUFFIXES = {".txt", ".md", ".j2", ".jinja", ".jinja2", ".prompt", ""}
IGNORED_KEYS = {"outputPath", "sharing", "env", "evaluateOptions", "commandLineOptions", "nunjucksFilters",
                "writeLatestResults", "tags", "redteam", "extensions", "metadata", "derivedMetrics", "tracing"}
KNOWN_KEYS = {"description", "prompts", "providers", "tests", "defaultTest", "scenarios"} | IGNORED_KEYS


class PromptfooError(InvalidInput):
    """The config cannot be imported; the message names the file and the problem."""


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


def _resolve(base: Path, ref: str) -> list[Path]:
    """Files a `file://` reference names (relative to the config; globs allowed; a bare file name is also looked
    up beside the config, for uploads that lose their folders)."""
    raw = ref[len("file://"):] if ref.startswith("file://") else ref
    raw = raw.split(":", 1)[0] if re.search(r"\.(py|js|ts|mjs|cjs):", raw) else raw
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = base / path
    if any(ch in raw for ch in "*?["):
        found = sorted(p for p in path.parent.glob(path.name) if p.is_file())
        if not found:
            raise PromptfooError(f"{ref}: no file matches")
        return found
    if not path.is_file():
        beside = base / Path(raw).name
        if beside.is_file():
            return [beside]
        raise PromptfooError(f"{ref}: no such file")
    return [path]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PromptfooError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise PromptfooError(f"{path}: {exc.strerror or exc}") from None


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
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return Prompt(label, _messages(parsed, source), source)
    return Prompt(label, text, source)


def _file_prompts(base: Path, ref: str, label: str | None) -> list[Prompt]:
    prompts = []
    for path in _resolve(base, ref):
        suffix = path.suffix.lower()
        name = label or path.stem
        if suffix in (".py", ".js", ".ts", ".mjs", ".cjs"):
            raise PromptfooError(f"{ref}: prompt functions ({suffix}) are not supported; use a text or JSON prompt")
        text = _read_text(path)
        if suffix == ".json" or suffix in (".yaml", ".yml"):
            try:
                data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as exc:
                raise PromptfooError(f"{path}: not valid {suffix[1:].upper()}: {str(exc).splitlines()[0]}") from None
            if isinstance(data, str):
                prompts.append(_inline_prompt(data, name, str(path)))
            else:
                prompts.append(Prompt(name, _messages(data, str(path)), str(path)))
            continue
        if suffix not in TEXT_SUFFIXES and suffix not in (".jsonl",):
            raise PromptfooError(f"{ref}: unsupported prompt file type {suffix!r}")
        parts = [p.strip("\n") for p in re.split(r"(?m)^---[ \t]*$", text)]
        parts = [p for p in parts if p.strip()]
        for k, part in enumerate(parts, start=1):
            prompts.append(_inline_prompt(part, name if len(parts) == 1 else f"{name}-{k}", f"{path}#{k}"))
    return prompts


def _read_prompts(base: Path, raw: Any) -> list[Prompt]:
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
                prompts.extend(_file_prompts(base, entry, None))
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
                prompts.extend(_file_prompts(base, entry["id"], entry.get("label")))
            else:
                raise PromptfooError(f"prompts[{i}]: needs raw text or a file:// id")
        else:
            raise PromptfooError(f"prompts[{i}]: not a prompt")
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
    if len({json.dumps(c, sort_keys=True) for c in configs}) > 1:
        notes.append("providers set different parameters: the first provider's are used")
    return out, params


def _load_var(base: Path, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("file://"):
        (path,) = _resolve(base, value)[:1]
        if path.suffix.lower() in (".py", ".js", ".ts"):
            raise PromptfooError(f"{value}: variables computed by scripts are not supported")
        text = _read_text(path)
        if path.suffix.lower() == ".json":
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise PromptfooError(f"{path}: not valid JSON: {exc.msg}") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return text
    return value


def _expand(vars_: Mapping[str, Any]) -> list[dict[str, Any]]:
    """promptfoo expands list-valued vars into one test per combination."""
    keys = [k for k, v in vars_.items() if isinstance(v, list)]
    if not keys:
        return [dict(vars_)]
    combos = itertools.product(*[vars_[k] for k in keys])
    return [{**vars_, **dict(zip(keys, combo))} for combo in combos]


def _csv_tests(path: Path, notes: list[str]) -> list[Test]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    tests = []
    ignored: set[str] = set()
    for row in reader:
        if None in row:
            raise PromptfooError(f"{path} line {reader.line_num}: more fields than the header has")
        vars_, asserts, description, threshold = {}, [], "", None
        for col, cell in row.items():
            col = (col or "").strip()
            if cell is None:
                raise PromptfooError(f"{path} line {reader.line_num}: fewer fields than the header has")
            if re.fullmatch(r"__expected\d*", col):
                if cell.strip():
                    asserts.append(cell)
            elif col == "__description":
                description = cell
            elif col == "__threshold":
                threshold = _threshold(cell, f"{path} line {reader.line_num}") if cell.strip() else None
            elif col.startswith("__"):
                ignored.add(col)
            else:
                vars_[col] = cell
        tests.append(Test(vars_, asserts, description, threshold))
    for col in sorted(ignored):
        notes.append(f"{path.name}: column {col} is not supported and was ignored")
    return tests


def _structured_tests(path: Path) -> list[Any]:
    text = _read_text(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PromptfooError(f"{path}: not valid {suffix[1:].upper()}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, list):
        raise PromptfooError(f"{path}: must hold a list of tests")
    return data


def _read_tests(base: Path, raw: Any, notes: list[str]) -> list[Test]:
    if raw is None:
        return [Test({}, [])]
    entries = [raw] if isinstance(raw, (str, Mapping)) else list(raw)
    tests: list[Test] = []
    for i, entry in enumerate(entries, start=1):
        if isinstance(entry, str):
            if not entry.startswith("file://"):
                raise PromptfooError(f"tests[{i}]: {entry!r} is neither a test nor a file:// reference")
            for path in _resolve(base, entry):
                if path.suffix.lower() == ".csv":
                    tests.extend(_csv_tests(path, notes))
                elif path.suffix.lower() in (".yaml", ".yml", ".json", ".jsonl"):
                    tests.extend(_test_from_mapping(base, t, f"{path.name}[{k}]", notes)
                                 for k, t in enumerate(_structured_tests(path), start=1))
                else:
                    raise PromptfooError(f"{entry}: tests must come from a .csv, .yaml, .json or .jsonl file")
        elif isinstance(entry, Mapping):
            tests.append(_test_from_mapping(base, entry, f"tests[{i}]", notes))
        else:
            raise PromptfooError(f"tests[{i}]: not a test")
    return tests


def _test_from_mapping(base: Path, entry: Any, where: str, notes: list[str]) -> Test:
    if not isinstance(entry, Mapping):
        raise PromptfooError(f"{where}: a test must be a mapping")
    vars_ = entry.get("vars") or {}
    if isinstance(vars_, str) and vars_.startswith("file://"):
        vars_ = _load_var(base, vars_)
    if not isinstance(vars_, Mapping):
        raise PromptfooError(f"{where}: vars must be a mapping")
    asserts = entry.get("assert") or []
    if not isinstance(asserts, list):
        raise PromptfooError(f"{where}: assert must be a list")
    for key in sorted(set(entry) - {"vars", "assert", "description", "metadata", "threshold"}):
        notes.append(f"{where}: {key!r} is not supported and was ignored")
    threshold = None if entry.get("threshold") is None else _threshold(entry["threshold"], where)
    return Test({k: _load_var(base, v) for k, v in vars_.items()}, list(asserts), str(entry.get("description") or ""),
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


def load(path: str | Path) -> Suite:
    """Read a promptfoo config and the files it refers to; PromptfooError naming the problem."""
    path = Path(path)
    text = _read_text(path) if path.is_file() else None
    if text is None:
        raise PromptfooError(f"{path}: no such file")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PromptfooError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, Mapping):
        raise PromptfooError(f"{path}: a promptfoo config is a YAML mapping with prompts, providers and tests")
    base = path.parent
    notes: list[str] = []
    for key in sorted(set(doc) - KNOWN_KEYS):
        notes.append(f"config key {key!r} is not understood and was ignored")
    for key in sorted(set(doc) & IGNORED_KEYS):
        notes.append(f"config key {key!r} does not apply here and was ignored")
    if doc.get("scenarios"):
        raise PromptfooError(f"{path}: scenarios are not supported")
    prompts = _read_prompts(base, doc.get("prompts"))
    default = doc.get("defaultTest") or {}
    if isinstance(default, str) and default.startswith("file://"):
        (dpath,) = _resolve(base, default)[:1]
        default = yaml.safe_load(_read_text(dpath)) or {}
    if not isinstance(default, Mapping):
        raise PromptfooError(f"{path}: defaultTest must be a mapping")
    default_vars = {k: _load_var(base, v) for k, v in (default.get("vars") or {}).items()}
    default_asserts = list(default.get("assert") or [])
    for key in sorted(set(default) - {"vars", "assert", "options", "metadata", "description", "threshold"}):
        notes.append(f"defaultTest.{key} is not supported and was ignored")
    options = default.get("options") or {}
    if isinstance(options, Mapping) and options.get("provider"):
        notes.append(f"defaultTest.options.provider {options['provider']!r}: the judge runs on the configured model")
    default_threshold = (None if default.get("threshold") is None
                         else _threshold(default["threshold"], "defaultTest"))
    raw_tests = _read_tests(base, doc.get("tests"), notes)
    tests = []
    for t in raw_tests:
        threshold = t.threshold if t.threshold is not None else default_threshold
        for vars_ in _expand({**default_vars, **t.vars}):
            tests.append(Test(vars_, t.asserts, t.description, threshold))
    description = str(doc.get("description") or "")
    name = _slug(description) if description else _slug(path.parent.name if path.stem == "promptfooconfig"
                                                         else path.stem)
    providers, params = _providers(doc.get("providers"), notes)
    try:
        GenerationParams.from_dict(params)
    except ValueError as exc:
        raise PromptfooError(f"{path}: provider config: {exc}") from None
    return Suite(path, name, description, prompts, tests, default_asserts, providers, notes, params)


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
    """Create (or update) one template per prompt and a dataset of the tests; return what the run needs."""
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


def start(pool: ConnectionPool, settings: Settings, path: str | Path, *, created_by: str = "",
          name: str | None = None) -> tuple[Any, Imported]:
    """Import a promptfoo config and queue its run; (run, import report)."""
    suite = load(path)
    imported = import_suite(pool, settings, suite, created_by=created_by, name=name)
    run = evaluations.create_run(pool, settings, dataset=imported.dataset, templates=imported.template_refs,
                                 evaluators=imported.evaluators, params=suite.params,
                                 name=f"promptfoo: {suite.description or suite.name}",
                                 created_by=created_by, source="promptfoo", allow_unsupported=True)
    return run, imported
