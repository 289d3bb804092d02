"""Content: what a version holds, checked and normalised before it is stored, and the variables it takes.

Text prompts and chat messages are normalised (`normalize_content`), compiled in the sandbox (syntax errors name
the line and message), hashed canonically (`content_sha256`), and given with checked model parameters and input and
output JSON Schemas (`_prepare`; the regular expressions a schema holds are refused when they backtrack too much,
and run with a time bound: `core.regexes`). Variables are found (`extract_variables`, `analyze` for editors), typed
(`coerce_variables`), defaulted and validated against the schemas. Names, labels, tags and metadata text are
checked here too. No database access.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import jsonschema

from core import regexes, untrusted
from core.llm import GenerationParams

from .errors import InvalidTemplateInput, TemplateSyntaxError
from .sandbox import _Allowance, _compile, _compile_all, _syntax_message, _where
from .types import LABEL_RE, NAME_RE, RESERVED_LABELS, ROLES, Analysis, Content, TemplateVersion


@dataclass(frozen=True)
class _Prepared:
    kind: str
    messages: list[dict[str, str]] | None
    text: str | None
    params: dict[str, Any]
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    variables: list[str]
    sha256: str
    includes: tuple[str, ...]


def check_name(name: str) -> str:
    """Return name if it is a valid template name (a slug), else raise InvalidTemplateInput."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidTemplateInput(f"invalid template name {name!r}: use lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit, at most 100 characters")
    return name


def check_label(label: str) -> str:
    """Return label if it can be set, else raise InvalidTemplateInput."""
    if label in RESERVED_LABELS:
        raise InvalidTemplateInput("'latest' always points at the newest version and cannot be moved")
    if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
        raise InvalidTemplateInput(f"invalid label {label!r}: use lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter")
    return label


def _check_storable(text: str, what: str) -> None:
    if "\x00" in text:
        raise InvalidTemplateInput(f"{what} contains a NUL character (\\x00), which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTemplateInput(f"{what} contains characters that are not valid Unicode (lone surrogates)") from None


def normalize_content(content: Content) -> tuple[str, list[dict[str, str]] | None, str | None]:
    """(kind, messages, text) of a text prompt or a list of chat messages; raise InvalidTemplateInput when malformed."""
    if isinstance(content, str):
        if not content.strip():
            raise InvalidTemplateInput("the prompt is empty")
        _check_storable(content, "the prompt")
        return "text", None, content
    if isinstance(content, Mapping) or not isinstance(content, Sequence):
        raise InvalidTemplateInput("content must be a text prompt or a list of chat messages")
    if not content:
        raise InvalidTemplateInput("a chat template needs at least one message")
    messages = []
    for i, message in enumerate(content, 1):
        if not isinstance(message, Mapping):
            raise InvalidTemplateInput(f"message {i} must be a mapping with 'role' and 'content'")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InvalidTemplateInput(f"message {i} has unknown key(s): {', '.join(map(str, extra))}")
        role, text = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidTemplateInput(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise InvalidTemplateInput(f"message {i} ({role}) is empty")
        _check_storable(text, f"message {i} ({role})")
        messages.append({"role": role, "content": text})
    return "chat", messages, None


def _check_params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidTemplateInput("model parameters must be a mapping such as {\"temperature\": 0.7}")
    params = dict(params)
    if isinstance(params.get("stop"), tuple):
        params["stop"] = list(params["stop"])
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTemplateInput(f"model parameters must be plain JSON values: {exc}") from None
    try:
        GenerationParams.from_dict(params)
    except ValueError as exc:
        raise InvalidTemplateInput(f"model parameters: {exc}") from None
    return params


def _check_schema(schema: Any, which: str) -> dict[str, Any] | None:
    if schema is None or schema == {}:
        return None
    if not isinstance(schema, Mapping):
        raise InvalidTemplateInput(f"the {which} schema must be a JSON object")
    untrusted.check_values(schema, f"the {which} schema", error=InvalidTemplateInput)  # jsonschema recurses
    schema = json.loads(json.dumps(schema))
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidTemplateInput(f"the {which} schema is not a valid JSON Schema: {exc.message}") from None
    try:
        regexes.check_schema_patterns(schema, f"{which} schema")
    except regexes.RegexError as exc:
        raise InvalidTemplateInput(str(exc)) from None
    return schema


def canonical_content(kind: str, messages: Any, text: str | None, params: Mapping[str, Any] | None,
                      input_schema: Mapping[str, Any] | None, output_schema: Mapping[str, Any] | None) -> str:
    """The canonical JSON of a version's content, whose SHA-256 identifies it."""
    doc = {"kind": kind, "messages": messages if kind == "chat" else None, "text": text if kind == "text" else None,
           "params": params or {}, "input_schema": input_schema or None, "output_schema": output_schema or None}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_sha256(kind: str, messages: Any, text: str | None, params: Mapping[str, Any] | None = None,
                   input_schema: Mapping[str, Any] | None = None,
                   output_schema: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (hex) of the canonical content."""
    return hashlib.sha256(canonical_content(kind, messages, text, params, input_schema, output_schema)
                          .encode("utf-8")).hexdigest()


def _prepare(content: Content, params: Any, input_schema: Any, output_schema: Any, name: str = "<prompt>") -> _Prepared:
    kind, messages, text = normalize_content(content)
    compiled = _compile_all(kind, messages, text, name)
    params = _check_params(params)
    input_schema = _check_schema(input_schema, "input")
    output_schema = _check_schema(output_schema, "output")
    variables = sorted(set().union(*(c.variables for _, c in compiled)))
    includes = tuple(dict.fromkeys(ref for _, c in compiled for ref in c.includes))
    sha = content_sha256(kind, messages, text, params, input_schema, output_schema)
    return _Prepared(kind, messages, text, params, input_schema, output_schema, variables, sha, includes)


def extract_variables(content: Content) -> list[str]:
    """Sorted names of the variables a text prompt or chat messages use; raise TemplateSyntaxError when invalid."""
    kind, messages, text = normalize_content(content)
    return sorted(set().union(*(c.variables for _, c in _compile_all(kind, messages, text, "<prompt>"))))


def analyze(content: Content) -> Analysis:
    """Variables, includes and the first syntax error of unsaved content, without raising (for editors, as the
    user types: empty or half-filled messages are skipped, not errors)."""
    if isinstance(content, str):
        kind, sources = "text", [("user", content)]
    else:
        kind = "chat"
        sources = [(str(m.get("role", "")), m.get("content")) for m in content or () if isinstance(m, Mapping)]
    variables: set[str] = set()
    includes: list[str] = []
    allowance = _Allowance()  # the size limits are for every message together
    for i, (role, source) in enumerate(sources):
        if not isinstance(source, str) or not source.strip():
            continue
        try:
            compiled = _compile(source, allowance=allowance)
        except TemplateSyntaxError as exc:
            message = _syntax_message(exc.detail, exc.lineno, _where(kind, i, role))
            return Analysis(sorted(variables), includes, message, exc.lineno, i if kind == "chat" else None)
        variables |= compiled.variables
        includes += [r for r in compiled.includes if r not in includes]
    return Analysis(sorted(variables), includes)


def coerce_variables(schema: Mapping[str, Any] | None, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables typed per the input schema: strings given for integer, number, boolean, array or object
    properties are parsed as JSON (values from forms and the command line arrive as text)."""
    result = dict(variables)
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping):
        return result
    for key, value in variables.items():
        spec = props.get(key)
        if not isinstance(value, str) or not isinstance(spec, Mapping):
            continue
        types = spec.get("type")
        types = {types} if isinstance(types, str) else set(types or ())
        if types and not types & {"string"} and types & {"integer", "number", "boolean", "array", "object", "null"}:
            try:
                result[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return result


def validate_variables(schema: Mapping[str, Any] | None, variables: Mapping[str, Any]) -> list[str]:
    """Every way variables break the input JSON Schema (empty when they fit or there is no schema)."""
    if not schema:
        return []
    errors = sorted(regexes.schema_validator(schema).iter_errors(dict(variables)),
                    key=lambda e: ([str(p) for p in e.path], e.message))
    return [f"{'.'.join(map(str, e.path))}: {e.message}" if e.path else e.message for e in errors]


def validate_output(template_version: TemplateVersion, output: str | Any) -> list[str]:
    """Every way an output (JSON text or a parsed value) breaks the version's output schema; [] when it fits."""
    schema = template_version.output_schema
    if not schema:
        return []
    if isinstance(output, str):
        try:
            output = json.loads(output)
        except json.JSONDecodeError as exc:
            return [f"output is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
    errors = sorted(regexes.schema_validator(schema).iter_errors(output),
                    key=lambda e: ([str(p) for p in e.path], e.message))
    return [f"{'.'.join(map(str, e.path))}: {e.message}" if e.path else e.message for e in errors]


def _with_defaults(schema: Mapping[str, Any] | None, variables: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(variables)
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    for key, spec in (props.items() if isinstance(props, Mapping) else ()):
        if key not in result and isinstance(spec, Mapping) and "default" in spec:
            result[key] = spec["default"]
    return result


def _clean_tags(tags: Iterable[str] | str | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = tags.split(",")
    items = list(tags) if isinstance(tags, Iterable) and not isinstance(tags, Mapping) else None
    if items is None or not all(isinstance(t, str) for t in items):
        raise InvalidTemplateInput("tags must be a list of text (or one comma-separated text)")
    return list(dict.fromkeys(t.strip() for t in items if t and t.strip()))


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidTemplateInput(f"{what} must be text, got {type(value).__name__}")
    return value
