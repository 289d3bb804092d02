"""Evaluators: checks of one output, named and shaped after promptfoo's assertion types where they overlap.

An evaluator is a mapping like promptfoo's `assert` entries: `{"type": "contains", "value": "Paris"}`, with an
optional `threshold`, `weight` (default 1), `name` (promptfoo's `metric` also works) and `not-` prefix for negation.
Values may use the item's variables (`{{ city }}`), rendered by `core.templates.render_string` — the same sandbox
and limits as templates; an evaluator that compares with a reference and has no value compares with the item's
expected output. Regular expressions (the `regex` type, JSON Schema patterns) run on `core.regexes`, with a time
bound, and are refused when defined if they backtrack too much. Running one never raises: any problem is a failed
check with its reason.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import jsonschema

from core import regexes, templates, untrusted
from core.errors import InvalidInput

# type -> (what it checks, how it uses value / threshold)
TYPES: dict[str, str] = {
    "equals": "output equals the value (or the expected output); a JSON value is compared as JSON",
    "contains": "output contains the value",
    "icontains": "output contains the value, ignoring case",
    "contains-any": "output contains at least one of the values (list or comma-separated)",
    "icontains-any": "output contains at least one of the values, ignoring case",
    "contains-all": "output contains every value",
    "icontains-all": "output contains every value, ignoring case",
    "starts-with": "output starts with the value",
    "regex": "output matches the regular expression",
    "is-json": "output is valid JSON (and matches the JSON Schema given as value, if any)",
    "contains-json": "output contains valid JSON (and it matches the JSON Schema given as value, if any)",
    "json-schema": "output is JSON valid against the schema given as value, else the version's output schema",
    "levenshtein": "edit distance to the value (or expected output) is at most threshold (default 5)",
    "similarity": ("similarity ratio 1 - distance/longer length with the value (or expected) is at least threshold "
                   "(0.8)"),
    "rouge-l": "ROUGE-L F1 against the value (or expected output) is at least threshold (default 0.75)",
    "rouge-n": ("ROUGE-N recall (n from options, default 1) against the value (or expected) is at least threshold "
                "(0.75)"),
    "latency": "generation took at most threshold milliseconds",
    "cost": "cost is at most threshold (local models cost nothing)",
    "completion-tokens": "the output took at most threshold tokens",
    "finish-reason": "the model stopped for the reason given as value (stop, length)",
    "llm-rubric": ("a judge model (provider: a registered model; default: the run's model) says the output meets the "
                   "rubric"),
}
REFERENCE_TYPES = {"equals", "contains", "icontains", "contains-any", "icontains-any", "contains-all", "icontains-all",
                   "starts-with", "levenshtein", "similarity", "rouge-l", "rouge-n"}
DEFAULT_THRESHOLDS = {"levenshtein": 5.0, "similarity": 0.8, "rouge-l": 0.75, "rouge-n": 0.75}
MAX_COMPARE_CELLS = 10_000_000  # levenshtein, similarity, rouge-l: output length × value length (~2 s)
THRESHOLD_REQUIRED = {"latency", "cost", "completion-tokens"}
VALUE_REQUIRED = {"regex", "finish-reason", "llm-rubric"}
# promptfoo types (and CSV shorthands) PromptDev does not run: imported as failing "unsupported" checks.
PROMPTFOO_UNSUPPORTED = {
    "javascript", "python", "webhook", "similar", "classifier", "factuality", "model-graded-closedqa",
    "model-graded-factuality", "answer-relevance", "context-faithfulness", "context-recall", "context-relevance",
    "select-best", "moderation", "perplexity", "perplexity-score", "is-sql", "contains-sql", "is-xml", "contains-xml",
    "is-html", "contains-html", "is-valid-openai-function-call", "is-valid-openai-tools-call", "is-valid-function-call",
    "f-score", "bleu", "gleu", "meteor", "word-count", "g-eval", "assert-set", "human", "guardrails", "pi",
    "is-refusal", "tool-call-f1", "trace-span-count", "trace-span-duration", "trace-error-spans", "fn", "eval",
    "ruby", "conversation-relevance", "search-rubric", "max-score",
}
SHORTHAND_ALIASES = {"grade": "llm-rubric"}
_KEYS = {"type", "value", "threshold", "weight", "name", "metric", "provider", "model", "options"}
UNSUPPORTED = "unsupported"


class EvaluatorError(InvalidInput):
    """An evaluator definition cannot be used (a ValueError, as before); the message names the problem."""


@dataclass(frozen=True)
class Evaluator:
    """One check to run on an output."""

    type: str
    value: Any = None
    threshold: float | None = None
    weight: float = 1.0
    negate: bool = False
    name: str = ""
    provider: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    unsupported_reason: str = ""   # set when type is "unsupported": what PromptDev cannot run

    @property
    def full_type(self) -> str:
        """The promptfoo-style type, with the not- prefix when negated."""
        base = self.options.get("original_type", self.type) if self.type == UNSUPPORTED else self.type
        return f"not-{base}" if self.negate else base

    @property
    def label(self) -> str:
        """The name shown in results: the given name, else the type."""
        return self.name or self.full_type

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready promptfoo-style mapping that parse() reads back."""
        d: dict[str, Any] = {"type": self.full_type}
        if self.type == UNSUPPORTED:
            d["unsupported"] = self.unsupported_reason
        if self.value is not None:
            d["value"] = self.value
        if self.threshold is not None:
            d["threshold"] = self.threshold
        if self.weight != 1.0:
            d["weight"] = self.weight
        if self.name:
            d["name"] = self.name
        if self.provider:
            d["provider"] = self.provider
        options = {k: v for k, v in self.options.items() if k != "original_type"}
        if options:
            d["options"] = options
        return d


@dataclass(frozen=True)
class Check:
    """The outcome of one evaluator on one output."""

    name: str
    type: str
    passed: bool
    score: float
    weight: float
    reason: str
    execution_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)


@dataclass(frozen=True)
class Judgement:
    """What a judge model answered about an output."""

    text: str
    execution_id: int | None = None


# (evaluator, rubric, output, variables) -> Judgement
JudgeFn = Callable[[Evaluator, str, str, Mapping[str, Any]], Judgement]


@dataclass
class Context:
    """Everything an evaluator may look at for one output."""

    output: str
    expected: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    output_schema: Mapping[str, Any] | None = None
    judge: JudgeFn | None = None


# ------------------------------------------------------------------------------------------------------------ parsing

def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise EvaluatorError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EvaluatorError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise EvaluatorError(f"{what} must be a finite number, got {value!r}")
    return number


def _is_templated(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _load_schema(value: Any) -> dict[str, Any]:
    """A JSON Schema from a mapping or its JSON/YAML text; EvaluatorError when it is not a valid schema."""
    schema = value
    if isinstance(value, str):  # JSON, else YAML read as any untrusted YAML (no aliases, bounded)
        try:
            schema = json.loads(value)
        except json.JSONDecodeError:
            schema = untrusted.load_yaml(value, "JSON Schema", error=EvaluatorError)
        except (RecursionError, ValueError):  # nested too deeply, a number of 5,000 digits: its one line
            schema = untrusted.load_json(value, "JSON Schema", error=EvaluatorError)
    untrusted.check_values(schema, "JSON Schema", error=EvaluatorError)
    if isinstance(schema, bool):
        return schema  # type: ignore[return-value]  # true/false are valid schemas
    if not isinstance(schema, Mapping):
        raise EvaluatorError(f"a JSON Schema must be an object, got {type(schema).__name__}")
    schema = dict(schema)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise EvaluatorError(f"invalid JSON Schema: {exc.message}") from None
    try:
        regexes.check_schema_patterns(schema)
    except regexes.RegexError as exc:
        raise EvaluatorError(str(exc)) from None
    return schema


def _split_type(raw: str) -> tuple[str, bool]:
    raw = raw.strip()
    negate = raw.startswith("not-")
    return (raw[4:] if negate else raw), negate


def parse(spec: Mapping[str, Any] | str | Evaluator, *, allow_unsupported: bool = False) -> Evaluator:
    """An Evaluator from a promptfoo-style mapping or shorthand string; EvaluatorError naming what is wrong.

    With allow_unsupported (imports), an assertion PromptDev cannot run becomes an `unsupported` evaluator that
    always fails and says why, instead of an error.
    """
    if isinstance(spec, Evaluator):
        return spec
    if isinstance(spec, str):
        return parse_shorthand(spec, allow_unsupported=allow_unsupported)
    if not isinstance(spec, Mapping):
        raise EvaluatorError(f"an evaluator must be a mapping with a type, got {type(spec).__name__}")
    untrusted.check_values(spec, "the evaluator", error=EvaluatorError)  # before anything walks or stores it
    raw_type = spec.get("type")
    if not isinstance(raw_type, str) or not raw_type.strip():
        raise EvaluatorError("an evaluator needs a type, e.g. {type: contains, value: ...}")
    base, negate = _split_type(raw_type)
    base = SHORTHAND_ALIASES.get(base, base)
    if base == UNSUPPORTED or "unsupported" in spec:
        original = spec.get("options", {}).get("original_type") if isinstance(spec.get("options"), Mapping) else None
        return _unsupported(original or base, negate, spec, str(spec.get("unsupported") or ""))
    unknown_keys = sorted(set(spec) - _KEYS)
    if base not in TYPES:
        if allow_unsupported:
            why = ("not supported by PromptDev" if base in PROMPTFOO_UNSUPPORTED else "unknown")
            return _unsupported(base, negate, spec, f"assertion type {raw_type!r} is {why}")
        raise EvaluatorError(f"unknown evaluator type {raw_type!r}; known: {', '.join(sorted(TYPES))}")
    if unknown_keys:
        message = f"{raw_type}: unsupported option(s) {', '.join(unknown_keys)}"
        if allow_unsupported:
            return _unsupported(base, negate, spec, message)
        raise EvaluatorError(message)
    value = spec.get("value")
    threshold = spec.get("threshold")
    threshold = None if threshold is None else _number(threshold, f"{raw_type}: threshold")
    weight = _number(spec.get("weight", 1.0), f"{raw_type}: weight")
    if weight < 0:
        raise EvaluatorError(f"{raw_type}: weight must not be negative, got {weight}")
    name = str(spec.get("name") or spec.get("metric") or "").strip()
    provider = spec.get("provider") or spec.get("model")
    if provider is not None and not isinstance(provider, str):
        provider = provider.get("id") if isinstance(provider, Mapping) else str(provider)
    options = dict(spec.get("options") or {})
    if not isinstance(spec.get("options") or {}, Mapping):
        raise EvaluatorError(f"{raw_type}: options must be a mapping")
    # Per-type checks, done now so a bad definition fails before a run starts.
    if base in VALUE_REQUIRED and (value is None or value == ""):
        raise EvaluatorError(f"{raw_type}: needs a value")
    if base in THRESHOLD_REQUIRED:
        if threshold is None and value is not None:
            threshold = _number(value, f"{raw_type}: value")
            value = None
        if threshold is None:
            raise EvaluatorError(f"{raw_type}: needs a threshold")
        if threshold < 0:
            raise EvaluatorError(f"{raw_type}: threshold must not be negative")
    if base in ("similarity", "rouge-l", "rouge-n") and threshold is not None and not 0 <= threshold <= 1:
        raise EvaluatorError(f"{raw_type}: threshold must be between 0 and 1, got {threshold}")
    if base == "levenshtein" and threshold is not None and threshold < 0:
        raise EvaluatorError(f"{raw_type}: threshold must not be negative")
    if base == "llm-rubric" and threshold is not None and not 0 <= threshold <= 1:
        raise EvaluatorError(f"{raw_type}: threshold (minimum score) must be between 0 and 1, got {threshold}")
    if base == "regex" and not _is_templated(value):
        try:
            regexes.compile(str(value))
        except regexes.RegexError as exc:
            raise EvaluatorError(f"{raw_type}: {exc}") from None
        try:
            regexes.self_test(str(value))
        except regexes.RegexTooSlow as exc:
            if not allow_unsupported:
                raise EvaluatorError(f"{raw_type}: {exc}") from None
            return _unsupported(base, negate, spec, f"{raw_type}: {exc}")
    if base in ("is-json", "contains-json", "json-schema") and value not in (None, "") and not _is_templated(value):
        value = _load_schema(value)
    if base in ("contains-any", "icontains-any", "contains-all", "icontains-all") and value is not None:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        else:
            raise EvaluatorError(f"{raw_type}: value must be a list or a comma-separated string")
        if not value:
            raise EvaluatorError(f"{raw_type}: needs at least one value")
    if base == "rouge-n":
        n = options.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
            raise EvaluatorError(f"{raw_type}: options.n must be 1 to 4, got {n!r}")
    if base == "llm-rubric" and "max_tokens" in options:
        mt = options["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= 4096:
            raise EvaluatorError(f"{raw_type}: options.max_tokens must be 1 to 4096, got {mt!r}")
    if base == "finish-reason":
        value = str(value)
    return Evaluator(type=base, value=value, threshold=threshold, weight=weight, negate=negate, name=name,
                     provider=provider, options=options)


def _unsupported(original: str, negate: bool, spec: Mapping[str, Any], reason: str) -> Evaluator:
    weight = spec.get("weight", 1.0)
    try:
        weight = max(0.0, float(weight))
    except (TypeError, ValueError):
        weight = 1.0
    return Evaluator(type=UNSUPPORTED, value=spec.get("value"), weight=weight, negate=negate,
                     name=str(spec.get("name") or spec.get("metric") or ""),
                     options={"original_type": original},
                     unsupported_reason=reason or f"assertion type {original!r} is not supported by PromptDev")


_SHORTHAND = re.compile(r"^(?P<type>(?:not-)?[a-z][a-z0-9-]*)(?:\((?P<threshold>[^)]*)\))?(?::(?P<value>.*))?$", re.S)


def parse_shorthand(text: str, *, allow_unsupported: bool = False, strict: bool = False) -> Evaluator:
    """promptfoo's CSV `__expected` shorthand: `contains: Paris`, `not-icontains: x`, `similar(0.8): ...`,
    `is-json`, `grade: rubric`; anything else means `equals` that text (with strict, a `type:` prefix that names no
    evaluator is an error instead: for command lines, where a typo should not become an exact match)."""
    text = str(text)
    match = _SHORTHAND.match(text.strip())
    if match:
        base, negate = _split_type(match["type"])
        base = SHORTHAND_ALIASES.get(base, base)
        known = base in TYPES or base in PROMPTFOO_UNSUPPORTED
        bare_ok = match["value"] is not None or base in ("is-json", "contains-json", "json-schema")
        if known and bare_ok:
            spec: dict[str, Any] = {"type": ("not-" if negate else "") + base}
            if match["value"] is not None:
                value = match["value"].strip()
                if value:
                    spec["value"] = value
            if match["threshold"] is not None and match["threshold"].strip():
                spec["threshold"] = match["threshold"].strip()
            if base in THRESHOLD_REQUIRED and "threshold" not in spec and "value" in spec:
                spec["threshold"] = spec.pop("value")
            return parse(spec, allow_unsupported=allow_unsupported)
        if strict and (match["value"] is not None or match["threshold"] is not None):
            raise EvaluatorError(f"unknown evaluator type {match['type']!r}; known: {', '.join(sorted(TYPES))} "
                                 f"(equals:TEXT for an exact match)")
    if strict and text.strip() in TYPES:
        return parse({"type": text.strip()}, allow_unsupported=allow_unsupported)
    return Evaluator(type="equals", value=text)


def spec_from_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """An evaluator mapping from an editable table row (type, negate, value, threshold, weight, name, provider);
    None for a row without a type. Blank cells are left out."""
    def blank(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())

    kind = row.get("type")
    if blank(kind):
        return None
    spec: dict[str, Any] = {"type": ("not-" if row.get("negate") is True else "") + str(kind).strip()}
    for key in ("value", "threshold", "weight", "name", "provider"):
        if not blank(row.get(key)):
            spec[key] = row[key].strip() if isinstance(row[key], str) else row[key]
    return spec


def parse_all(specs: Iterable[Mapping[str, Any] | str] | None, *, allow_unsupported: bool = False) -> list[Evaluator]:
    """Parse a list of evaluator definitions; the message names the position of a bad one."""
    out: list[Evaluator] = []
    for i, spec in enumerate(specs or [], start=1):
        try:
            out.append(parse(spec, allow_unsupported=allow_unsupported))
        except ValueError as exc:
            raise EvaluatorError(f"evaluator {i}: {exc}") from None
    return out


def unique_names(evaluators: Sequence[Evaluator]) -> list[Evaluator]:
    """The same evaluators, with repeated labels numbered (`contains`, `contains #2`) so results can be told apart."""
    seen: Counter[str] = Counter()
    out = []
    for ev in evaluators:
        seen[ev.label] += 1
        out.append(ev if seen[ev.label] == 1 else replace(ev, name=f"{ev.label} #{seen[ev.label]}"))
    return out


# ---------------------------------------------------------------------------------------------------------- measures

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity_ratio(a: str, b: str) -> float:
    """1 - edit distance / length of the longer string (1.0 for two empty strings)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words: 2·LCS / (len(candidate) + len(reference))."""
    c, r = _words(candidate), _words(reference)
    if not c and not r:
        return 1.0
    if not c or not r:
        return 0.0
    return 2 * _lcs_length(c, r) / (len(c) + len(r))


def rouge_n(candidate: str, reference: str, n: int = 1) -> float:
    """ROUGE-N recall: the share of the reference's word n-grams found in the candidate (clipped counts)."""
    def grams(words: list[str]) -> Counter[tuple[str, ...]]:
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    ref, cand = grams(_words(reference)), grams(_words(candidate))
    total = sum(ref.values())
    if total == 0:
        return 1.0 if not cand else 0.0
    return sum(min(count, cand[g]) for g, count in ref.items()) / total


def extract_json(text: str) -> tuple[bool, Any]:
    """The first JSON object or array inside text (e.g. in a code fence): (found, value)."""
    for value in extract_all_json(text):
        return True, value
    return False, None


def extract_all_json(text: str) -> list[Any]:
    """Every top-level JSON object or array inside text, in order (as promptfoo's contains-json looks at all)."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    pos = 0
    for match in re.finditer(r"[\[{]", text):
        if match.start() < pos:
            continue  # inside a value already found
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        found.append(value)
        pos = end
    return found


def _schema_errors(instance: Any, schema: Any) -> str | None:
    validator = regexes.schema_validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{'at ' + where + ': ' if where else ''}{error.message}"


def _short(text: Any, limit: int = 60) -> str:
    s = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    s = s.replace("\n", "\\n")
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------------------ judge

JUDGE_SYSTEM = ("You grade an output against a rubric. Reply with JSON only, exactly like "
                '{"reason": "<one sentence>", "pass": true, "score": 1.0} '
                "where pass is true or false and score is between 0 and 1.")


def judge_messages(rubric: str, output: str) -> list[dict[str, str]]:
    """The chat messages sent to the judge model."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"<Rubric>\n{rubric}\n</Rubric>\n\n<Output>\n{output}\n</Output>"}]


_TRUE = {"true", "yes", "pass", "passed", "y", "1"}
_FALSE = {"false", "no", "fail", "failed", "n", "0"}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        return True if v in _TRUE else False if v in _FALSE else None
    return None


def _as_score(value: Any) -> float | None:
    try:
        score = float(value)
    except (TypeError, ValueError):
        match = re.match(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", str(value))
        if not match or float(match[2]) == 0:
            return None
        score = float(match[1]) / float(match[2])
    if math.isnan(score):
        return None
    if 1 < score <= 10:
        score /= 10  # a 0-10 scale
    elif 10 < score <= 100:
        score /= 100
    return min(1.0, max(0.0, score))


def parse_judgement(text: str) -> tuple[bool | None, float | None, str]:
    """Read a judge's answer robustly: a JSON object if there is one, else PASS/FAIL words and a score.

    Returns (passed or None when not understood, score or None, reason).
    """
    text = text or ""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        keys = {str(k).lower(): v for k, v in obj.items()}
        passed = _as_bool(keys.get("pass", keys.get("passed", keys.get("verdict"))))
        score = _as_score(keys["score"]) if "score" in keys else None
        reason = str(keys.get("reason", keys.get("explanation", ""))).strip()
        if passed is None and score is not None:
            passed = score >= 0.5
        if passed is not None:
            return passed, score if score is not None else (1.0 if passed else 0.0), reason
    lowered = text.lower()
    score = None
    m = re.search(r"score\W{0,3}(\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?)", lowered)
    if m:
        score = _as_score(m[1])
    verdict = re.search(r"\b(pass(?:es|ed)?|fail(?:s|ed)?|yes|no|true|false)\b", lowered)
    passed = None
    if verdict:
        word = verdict[1]
        passed = word.startswith("pass") or word in ("yes", "true")
    elif score is not None:
        passed = score >= 0.5
    if passed is None:
        return None, None, ""
    reason = text.strip().splitlines()[0][:200] if text.strip() else ""
    return passed, score if score is not None else (1.0 if passed else 0.0), reason


# ----------------------------------------------------------------------------------------------------------- running

def _render_value(value: Any, ctx: Context) -> Any:
    if isinstance(value, list):
        return [_render_value(v, ctx) for v in value]
    if not _is_templated(value):
        return value
    variables = {**dict(ctx.variables), "expected": ctx.expected}
    try:
        return templates.render_string(value, variables)
    except templates.MissingVariables as exc:  # as before: a variable the item does not have renders empty
        if not exc.names or exc.problems:
            raise
        return templates.render_string(value, {**{name: "" for name in exc.names}, **variables})


def _reference(ev: Evaluator, value: Any, ctx: Context) -> Any:
    if value is not None and value != "":
        return value
    if ev.type in REFERENCE_TYPES and ctx.expected is not None:
        return [ctx.expected] if ev.type.endswith(("-any", "-all")) else ctx.expected
    raise _NoReference()


class _NoReference(Exception):
    pass


class _Unusable(Exception):
    """The check could not be made (no measurement, no judge, a broken definition): it fails, negated or not."""


def _binary(passed: bool, reason: str) -> tuple[bool, float, str]:
    return passed, 1.0 if passed else 0.0, reason


def _check(ev: Evaluator, ctx: Context) -> tuple[bool, float, str, int | None]:
    """(passed, score, reason, judge execution id) before negation."""
    out = ctx.output or ""
    value = _render_value(ev.value, ctx)
    t = ev.type
    if t == "equals":
        ref = _reference(ev, value, ctx)
        if isinstance(ref, (dict, list)):
            try:
                ok = json.loads(out) == ref
            except json.JSONDecodeError:
                ok = False
            return (*_binary(ok, "output equals the expected JSON" if ok else "output is not the expected JSON"), None)
        ok = out == str(ref)
        return (*_binary(ok, f"output equals {_short(ref)!s}" if ok else
                         f"output {_short(out)!r} differs from {_short(str(ref))!r}"), None)
    if t in ("contains", "icontains"):
        ref = str(_reference(ev, value, ctx))
        ok = ref.lower() in out.lower() if t == "icontains" else ref in out
        return (*_binary(ok, f"output {'contains' if ok else 'does not contain'} {_short(ref)!r}"), None)
    if t in ("contains-any", "icontains-any", "contains-all", "icontains-all"):
        refs = [str(v) for v in _reference(ev, value, ctx)]
        fold = t.startswith("i")
        hay = out.lower() if fold else out
        found = [r for r in refs if (r.lower() if fold else r) in hay]
        if t.endswith("-any"):
            ok = bool(found)
            return (*_binary(ok, f"found {_short(found[0])!r}" if ok else f"none of {_short(refs)} found"), None)
        missing = [r for r in refs if r not in found]
        ok = not missing
        return ok, len(found) / len(refs), ("all found" if ok else f"missing {_short(missing)}"), None
    if t == "starts-with":
        ref = str(_reference(ev, value, ctx))
        ok = out.startswith(ref)
        return (*_binary(ok, f"output {'starts' if ok else 'does not start'} with {_short(ref)!r}"), None)
    if t == "regex":
        try:
            ok = regexes.search(str(value), out) is not None
        except regexes.RegexError as exc:
            raise _Unusable(str(exc)) from None
        return (*_binary(ok, f"output {'matches' if ok else 'does not match'} /{_short(str(value))}/"), None)
    if t in ("is-json", "contains-json", "json-schema"):
        schema = value
        if isinstance(schema, str) and schema:
            try:
                schema = _load_schema(schema)
            except ValueError as exc:
                raise _Unusable(str(exc)) from None
        if t == "json-schema" and schema in (None, ""):
            schema = ctx.output_schema
            if not schema:
                raise _Unusable("no JSON Schema given and the template version has no output schema")
        if t == "contains-json":
            candidates = extract_all_json(out)
            if not candidates:
                return False, 0.0, "output contains no JSON", None
        else:
            try:
                candidates = [json.loads(out)]
            except json.JSONDecodeError as exc:
                return False, 0.0, f"output is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", None
        if schema not in (None, ""):
            problem = None
            for parsed in candidates:  # contains-json: any JSON value in the output that matches will do
                problem = _schema_errors(parsed, schema)
                if problem is None:
                    return True, 1.0, "JSON matches the schema", None
            return False, 0.0, f"JSON does not match the schema: {problem}", None
        return True, 1.0, "output is valid JSON", None
    if t in ("levenshtein", "similarity", "rouge-l", "rouge-n"):
        ref = str(_reference(ev, value, ctx))
        threshold = ev.threshold if ev.threshold is not None else DEFAULT_THRESHOLDS[t]
        cells = len(out) * len(ref) if t != "rouge-l" else len(_words(out)) * len(_words(ref))
        if t != "rouge-n" and cells > MAX_COMPARE_CELLS:  # a table of len × len cells, filled in Python
            unit = "words" if t == "rouge-l" else "characters"
            raise _Unusable(f"the output and the value are too long to compare ({cells:,} pairs of {unit}; at "
                            f"most {MAX_COMPARE_CELLS:,})")
        if t == "levenshtein":
            d = levenshtein(out, ref)
            ok = d <= threshold
            longest = max(len(out), len(ref)) or 1
            return ok, 1.0 - d / longest, f"edit distance {d} {'≤' if ok else '>'} {threshold:g}", None
        if t == "similarity":
            s = similarity_ratio(out, ref)
        elif t == "rouge-l":
            s = rouge_l(out, ref)
        else:
            s = rouge_n(out, ref, int(ev.options.get("n", 1)))
        ok = s >= threshold
        return ok, s, f"{t} {s:.3f} {'≥' if ok else '<'} {threshold:g}", None
    if t == "latency":
        if ctx.latency_ms is None:
            raise _Unusable("no latency was measured")
        ok = ctx.latency_ms <= ev.threshold
        score = 1.0 if ok else (ev.threshold / ctx.latency_ms if ctx.latency_ms else 0.0)
        return ok, score, f"latency {ctx.latency_ms:.0f} ms {'≤' if ok else '>'} {ev.threshold:g} ms", None
    if t == "cost":
        ok = 0.0 <= ev.threshold
        return (*_binary(ok, f"cost 0 (local model) ≤ {ev.threshold:g}"), None)
    if t == "completion-tokens":
        if ctx.completion_tokens is None:
            raise _Unusable("no token count was recorded")
        ok = ctx.completion_tokens <= ev.threshold
        return (*_binary(ok, f"{ctx.completion_tokens} completion tokens {'≤' if ok else '>'} {ev.threshold:g}"), None)
    if t == "finish-reason":
        ok = (ctx.finish_reason or "") == str(value)
        return (*_binary(ok, f"finish reason {ctx.finish_reason!r}" + ("" if ok else f", expected {value!r}")), None)
    if t == "llm-rubric":
        if ctx.judge is None:
            raise _Unusable("no judge model available")
        judgement = ctx.judge(ev, str(value), out, ctx.variables)
        passed, score, reason = parse_judgement(judgement.text)
        if passed is None:
            raise _Unusable(f"judge's answer not understood: {_short(judgement.text, 80)!r}",
                            judgement.execution_id)
        if ev.threshold is not None:  # as promptfoo: the judge must pass it and its score reach the threshold
            below = score < ev.threshold
            passed = passed and not below
            if below and not reason:
                reason = f"score {score:g} below threshold {ev.threshold:g}"
        reason = reason or ("the judge passed it" if passed else "the judge failed it")
        return passed, float(score), reason, judgement.execution_id
    if t == UNSUPPORTED:
        return False, 0.0, ev.unsupported_reason, None
    return False, 0.0, f"unknown evaluator type {t!r}", None


def run(ev: Evaluator, ctx: Context) -> Check:
    """Run one evaluator on an output; any problem is a failed check whose reason says what went wrong."""
    execution_id = None
    usable = True  # a check that could not be made fails whether or not it is negated
    try:
        passed, score, reason, execution_id = _check(ev, ctx)
    except _NoReference:
        passed, score, reason, usable = False, 0.0, "no value given and the item has no expected output", False
    except _Unusable as exc:
        passed, score, reason, usable = False, 0.0, str(exc.args[0]), False
        execution_id = exc.args[1] if len(exc.args) > 1 else None
    except Exception as exc:  # a broken value template, a judge failure: the check fails, the run goes on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        passed, score, reason, usable = False, 0.0, f"{ev.full_type} failed: {first}", False
    if ev.negate and ev.type != UNSUPPORTED and usable:
        passed, score, reason = not passed, 1.0 - score, f"not: {reason}"
    return Check(name=ev.label, type=ev.full_type, passed=bool(passed), score=float(score), weight=ev.weight,
                 reason=reason, execution_id=execution_id)


def run_all(evaluators: Iterable[Evaluator], ctx: Context) -> list[Check]:
    """Run every evaluator on an output."""
    return [run(ev, ctx) for ev in evaluators]


def summarize(checks: Sequence[Check], threshold: float | None = None) -> tuple[bool, float | None]:
    """promptfoo's rule for one output: it passes when every check passes (a weight-0 check too: weight only moves
    the score), and its score is the weighted mean of the check scores (0 when every weight is 0).

    With a threshold (promptfoo's test-level `threshold`; 0 means none, as there), it passes instead when that score
    reaches the threshold, so a failed check with a small weight can be outweighed.
    """
    if not checks:
        return True, None
    total = sum(c.weight for c in checks)
    score = sum(c.score * c.weight for c in checks) / total if total > 0 else 0.0
    if threshold:
        return score >= threshold - 1e-12, score
    return all(c.passed for c in checks), score


def item_threshold(metadata: Mapping[str, Any] | None) -> float | None:
    """The pass threshold an item carries in its metadata (`threshold`, from a promptfoo test), if a valid one."""
    raw = (metadata or {}).get("threshold")
    if raw is None or raw == "":
        return None
    try:
        value = _number(raw, "threshold")
    except ValueError:
        return None
    return value if 0 <= value <= 1 else None
