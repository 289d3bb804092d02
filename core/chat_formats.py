"""Chat formats: turn a list of chat messages into the exact prompt text a model sees, dropping nothing."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import InvalidInput

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]


class ChatFormatError(InvalidInput):
    """Messages cannot be formatted for this model; the message says why."""


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text: template markup (special tokens allowed) or message content (plain text)."""

    text: str
    special: bool


def normalize_messages(messages: Iterable[Message]) -> list[dict[str, str]]:
    """Merge leading system messages, fold later system messages into the next user turn, merge repeated roles.

    The result alternates user/assistant after an optional system message, which every chat template accepts,
    and every message's text is still there.
    """
    out: list[dict[str, str]] = []
    pending_system: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i + 1}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i + 1}: content must be text")
        if role == "system":
            if not out or (len(out) == 1 and out[0]["role"] == "system"):
                if out:
                    out[0]["content"] += "\n\n" + content
                else:
                    out.append({"role": "system", "content": content})
            else:
                pending_system.append(content)
            continue
        if role == "user" and pending_system:
            content = "\n\n".join(pending_system + [content])
            pending_system = []
        elif role == "assistant" and pending_system:
            out.append({"role": "user", "content": "\n\n".join(pending_system)})
            pending_system = []
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    if pending_system:
        if out and out[-1]["role"] == "user":
            out[-1]["content"] += "\n\n" + "\n\n".join(pending_system)
        else:
            out.append({"role": "user", "content": "\n\n".join(pending_system)})
    body = out[1:] if out and out[0]["role"] == "system" else out
    if body and body[0]["role"] == "assistant":
        raise ChatFormatError("the first non-system message must come from the user")
    if not body:
        raise ChatFormatError("there must be at least one user message")
    return out


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma and Mistral have no system role: put the system text before the first user turn's text."""
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        rest[0]["content"] = system + "\n\n" + rest[0]["content"]
        return rest
    return messages


def format_gemma(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Gemma 2/3 turns, system folded into the first user turn (as Gemma's own template does)."""
    parts = ["<bos>"]
    for m in _fold_system(messages):
        role = "model" if m["role"] == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{m['content']}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def format_mistral_instruct(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Mistral Instruct v0.1-v0.3 turns, system folded into the first user turn."""
    parts = ["<s>"]
    for m in _fold_system(messages):
        if m["role"] == "user":
            parts.append(f"[INST] {m['content']} [/INST]")
        else:
            parts.append(f"{m['content']}</s>")
    return "".join(parts)


def format_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML turns (Qwen, many fine-tunes), with a real system turn."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class GGUFTemplateFormatter:
    """Renders a GGUF's own Jinja2 chat template in a sandbox."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ChatFormatError(f"the model's chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(template)
        except TemplateError as exc:
            raise ChatFormatError(f"the model's chat template does not compile: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def __call__(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt)
        except ChatFormatError:
            raise
        except TemplateError as exc:
            raise ChatFormatError(f"the model's chat template failed: {exc}") from None


Formatter = Callable[[list[dict[str, str]], bool], str]
BUILTIN: dict[str, Formatter] = {
    "gemma": format_gemma,
    "mistral-instruct": format_mistral_instruct,
    "chatml": format_chatml,
}


def guess_format(architecture: str, model_name: str) -> str:
    """A built-in format for a model without its own template, from its architecture and name."""
    name = (model_name or "").lower()
    arch = (architecture or "").lower()
    if arch.startswith("gemma") or "gemma" in name:
        return "gemma"
    if "mistral" in name or "mixtral" in name or arch in ("mistral", "llama") and "instruct" in name:
        return "mistral-instruct"
    return "chatml"


def build_prompt(formatter: Formatter, messages: Sequence[Message]) -> list[Segment]:
    """Format messages and split the prompt into markup and content segments.

    Contents are swapped for random sentinels before formatting, so that whatever the template does, the
    content can be told apart from markup and tokenized as plain text (a user cannot type a special token).
    """
    normalized = normalize_messages(messages)
    sentinels = {f"\x00{secrets.token_hex(8)}\x00": m["content"] for m in normalized}
    keyed = [{"role": m["role"], "content": s} for m, s in zip(normalized, sentinels)]
    text = formatter(keyed, True)
    segments: list[Segment] = []
    rest = text
    missing = [s for s in sentinels if s not in text]
    if missing:
        raise ChatFormatError(f"the chat format dropped {len(missing)} message(s); refusing to send a partial prompt")
    while rest:
        positions = [(rest.find(s), s) for s in sentinels if s in rest]
        if not positions:
            segments.append(Segment(rest, True))
            break
        pos, sentinel = min(positions)
        if pos:
            segments.append(Segment(rest[:pos], True))
        segments.append(Segment(sentinels[sentinel], False))
        rest = rest[pos + len(sentinel):]
    return segments


def prompt_text(segments: Sequence[Segment]) -> str:
    """The prompt as one string."""
    return "".join(s.text for s in segments)
