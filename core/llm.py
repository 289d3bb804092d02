"""Model backends: the in-process llama.cpp model and OpenAI-compatible servers, and the registry that shares them.

Every backend generates from chat messages or a raw prompt as an iterator of text chunks; when the iterator is
exhausted its `usage` holds token counts, time to first token, total time and the finish reason.

A `ModelSpec` says everything a backend is built from (a GGUF file and how it is loaded, or a server and how it is
called); `backend_for_spec` returns the one backend of the process for a spec, building it on first use, and
`get_backend(settings)` is the backend of the spec the settings describe. At most `max_loaded_models` in-process models
keep their weights in memory: loading one more frees the least recently used idle one, and `unload(spec)` frees one
and forgets it (see `LlamaBackend` for when memory is freed while a generation runs).
"""

from __future__ import annotations

import atexit
import ctypes
import http
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from core import chat_formats, outbound
from core.chat_formats import ChatFormatError, Segment
from core.config import MAX_EVAL_BATCH, Settings, default_model_path
from core.errors import Forbidden, InvalidInput, TooLarge, Unavailable
from core.model_files import ModelFileError, check_gguf, file_sha256

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
IN_PROCESS, SERVER = "llama_cpp", "openai"  # a GGUF loaded in this process; an OpenAI-compatible server

log = logging.getLogger(__name__)


class GenerationError(Unavailable):
    """Generation failed; the message says why in one line.

    The family of the model's errors: by itself the model could not serve the request (Unavailable, 503); the
    subclasses that name another kind first are of that kind (`PromptTooLong` is TooLarge, `InvalidRequest`
    InvalidInput)."""


class BackendUnavailable(GenerationError):
    """The model cannot serve now: a server that does not answer after all retries, a model file that is missing
    or does not load, a model that was unloaded, a failed decode."""


class ModelFileUnavailable(BackendUnavailable, ModelFileError):
    """The in-process model's GGUF is missing or does not load (Unavailable; still a ModelFileError)."""


class InvalidRequest(InvalidInput, GenerationError):
    """The request cannot be generated from as given: no messages or both kinds of input, messages the chat format
    refuses, a request a server rejects as malformed."""


class PromptTooLong(TooLarge, GenerationError):
    """The prompt does not fit the model's context."""


class ServerForbidden(Forbidden, GenerationError):
    """Requests may not go to the model server's URL (core.outbound: credentials in it, a link-local or cloud
    metadata address, now or after its name resolved anew): nothing was sent."""


class ParameterError(InvalidInput):
    """A sampling parameter or a backend setting is out of range; the message names it."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters; `seed` None means a fresh random seed is drawn and recorded."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float = 1.1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "GenerationParams":
        """Build and validate parameters from a mapping; unknown keys are an error."""
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ParameterError(f"unknown parameter(s): {', '.join(unknown)}")
        if "stop" in data:
            stop = data["stop"]
            if stop is None:
                stop = ()
            elif isinstance(stop, str):
                stop = (stop,)
            data["stop"] = tuple(str(s) for s in stop if str(s))
        try:
            params = cls(**data)
            params = cls(
                temperature=float(params.temperature), top_p=float(params.top_p), top_k=int(params.top_k),
                max_tokens=int(params.max_tokens), stop=params.stop,
                seed=None if params.seed is None else int(params.seed),
                repeat_penalty=float(params.repeat_penalty))
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"invalid parameter: {exc}") from None
        params.check()
        return params

    def check(self) -> None:
        """Raise ParameterError (an InvalidInput) naming the first out-of-range parameter."""
        if not 0.0 <= self.temperature <= 5.0:
            raise ParameterError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParameterError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ParameterError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if not 1 <= self.max_tokens <= 32768:
            raise ParameterError(f"max_tokens must be between 1 and 32768, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ParameterError(f"seed must be between 0 and 2^32-1, got {self.seed}")
        if not 0.0 < self.repeat_penalty <= 5.0:
            raise ParameterError(f"repeat_penalty must be in (0, 5], got {self.repeat_penalty}")

    def with_seed(self) -> "GenerationParams":
        """These parameters with a concrete seed (drawn at random when unset)."""
        if self.seed is not None:
            return self
        return GenerationParams(**{**asdict(self), "seed": random.randrange(2**31)})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Usage:
    """Figures of one finished generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = ""

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens per second of decoding (after the first token)."""
        if self.ttft_s is None or self.completion_tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)


class Generation:
    """An iterator of text chunks; `usage`, `text` and `prompt` are filled as it runs.

    Use it as a context manager (or call close()) so that a reader who stops early releases the model at once.
    """

    def __init__(self, chunks: Iterator[str], prompt: str | None, params: GenerationParams, usage: Usage):
        self._chunks = chunks
        self.prompt = prompt
        self.params = params
        self.usage = usage
        self.text = ""
        self.done = False

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.done = True
            raise
        self.text += chunk
        return chunk

    def read(self) -> str:
        """Consume the rest and return the whole text."""
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        """Stop generating and release the backend."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        if not self.done and not self.usage.finish_reason:
            self.usage.finish_reason = FINISH_CANCELLED

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a dropped generation must not keep the model locked
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class Request:
    """One generation of a batch: chat messages or a raw prompt, and its parameters."""

    messages: Sequence[Mapping[str, str]] | None = None
    prompt: str | None = None
    params: GenerationParams | None = None


def _finished(pieces: Sequence[str], prompt: str | None, params: GenerationParams, usage: Usage,
              error: Exception | None = None) -> Generation:
    """A generation that already ran: replays its text, then raises its error if it failed."""
    def chunks() -> Iterator[str]:
        yield from pieces
        if error is not None:
            raise error
    return Generation(chunks(), prompt, params, usage)


class Backend:
    """What every model backend offers."""

    name: str = ""
    kind: str = ""
    n_ctx: int = 0

    def generate(self, messages: Sequence[Mapping[str, str]] | None = None, *, prompt: str | None = None,
                 params: GenerationParams | None = None) -> Generation:
        """Generate from chat messages or a raw prompt (exactly one of them)."""
        raise NotImplementedError

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Run several generations to the end (one after the other here); each fails on its own."""
        done: list[Generation] = []
        for req in requests:
            params = (req.params or GenerationParams()).with_seed()
            try:
                gen = self.generate(req.messages, prompt=req.prompt, params=params)
            except GenerationError as exc:
                done.append(_finished([], req.prompt, params, Usage(), exc))
                continue
            pieces: list[str] = []
            error: Exception | None = None
            try:
                with gen:
                    pieces.extend(gen)
            except GenerationError as exc:
                error = exc
            done.append(_finished(pieces, gen.prompt, gen.params, gen.usage, error))
        return done

    def count_tokens(self, text: str) -> int:
        """How many tokens text takes."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Facts about the backend for display and for the ledger."""
        raise NotImplementedError

    def release_memory(self) -> bool:
        """Free what the backend holds in memory if it is idle (it loads again on next use); True when freed."""
        return False

    def close(self) -> None:
        """Release the backend for good (see `unload`)."""


def _check_request(messages: Sequence[Mapping[str, str]] | None, prompt: str | None) -> None:
    if (messages is None) == (prompt is None):
        raise InvalidRequest("give either chat messages or a raw prompt")
    if messages is not None and not messages:
        raise InvalidRequest("no messages to send")


class _StopMatcher:
    """Holds back text that could be the start of a stop sequence; cuts the text at a full match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            pos = min(hits)[0]
            out, self.pending = self.pending[:pos], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        """Whatever was held back, at the end of generation."""
        out, self.pending = self.pending, ""
        return out


class _Decoder:
    """Turns sampled tokens into text for one generation: end of generation, budget, stop sequences, UTF-8."""

    def __init__(self, llm: Any, params: GenerationParams, n_prompt: int, n_ctx: int, usage: Usage, started: float):
        self._is_eog = _llama_cpp().llama_vocab_is_eog
        self.llm, self.vocab, self.usage, self.started = llm, llm._model.vocab, usage, started
        self.budget = min(params.max_tokens, n_ctx - n_prompt)
        self.stopper = _StopMatcher(params.stop)
        self.completion: list[int] = []
        self.emitted = b""
        self.pieces: list[str] = []
        self.finish = ""

    def feed(self, token: int) -> bool:
        """Take the next sampled token; True when the generation is over (the token is then not evaluated)."""
        if self.usage.ttft_s is None:
            self.usage.ttft_s = time.perf_counter() - self.started
        if self._is_eog(self.vocab, token):
            return self.end(FINISH_STOP)
        self.completion.append(token)
        self.usage.completion_tokens = len(self.completion)
        raw = self.llm.detokenize(self.completion)
        try:
            piece = raw[len(self.emitted):].decode("utf-8")
        except UnicodeDecodeError:
            piece = None  # a multi-byte character is split across tokens: wait for the rest
        if piece is not None:
            self.emitted = raw
            out, stopped = self.stopper.feed(piece)
            if out:
                self.pieces.append(out)
            if stopped:
                return self.end(FINISH_STOP)
        if len(self.completion) >= self.budget:
            return self.end(FINISH_LENGTH)
        return False

    def end(self, finish: str) -> bool:
        """Close the generation with this finish reason (releasing held-back text); True."""
        self.finish = finish
        tail = self.stopper.flush()
        if tail:
            self.pieces.append(tail)
        return True

    def take(self) -> list[str]:
        """Text ready to hand out since the last call."""
        out, self.pieces = self.pieces, []
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _aligned(cached: Sequence[int], tokens: Sequence[int], n_batch: int) -> int:
    """Tokens of a cached prompt that a new prompt may reuse: the common prefix cut to a multiple of n_batch."""
    # The new prompt's last token is always evaluated (its logits give the first token); the cut makes the rest
    # go through the same n_batch blocks as in a cold run, so reuse never changes an output.
    return _common_prefix(cached, tokens[:-1]) // n_batch * n_batch


_loaded: "weakref.WeakSet[LlamaBackend]" = weakref.WeakSet()  # every in-process backend: freed at exit
_load_lock = threading.Lock()
_native_log = logging.getLogger("core.llm.llama_cpp")
_native_log_lock = threading.Lock()
_native_log_callback: Any = None  # the ctypes callback llama.cpp calls: kept here so it is never garbage-collected
_native_partial = ""


def _forward_native_log(level: int, text: bytes | None, user_data: Any) -> None:
    """llama.cpp's and ggml's log lines -> Python logging at DEBUG, one record a line (never the terminal)."""
    global _native_partial
    try:
        _native_partial += (text or b"").decode("utf-8", "replace")
        *lines, _native_partial = _native_partial.split("\n")
        if len(_native_partial) > 4096:
            lines.append(_native_partial)
            _native_partial = ""
        for line in lines:
            if line.strip():
                _native_log.debug("%s", line.rstrip())
    except Exception:  # an exception must not cross into C
        pass


def _llama_cpp() -> Any:
    """The llama_cpp package, with llama.cpp's own logging routed to Python logging (installed once)."""
    global _native_log_callback
    # Imported on first use, not at module top: it loads the native library, which most commands never need.
    import llama_cpp

    if _native_log_callback is None:
        with _native_log_lock:
            if _native_log_callback is None:
                # llama_cpp installs a callback at import that prints to stderr (and misreads the log levels, so
                # warnings such as "llama_kv_cache_iswa: using full-size SWA cache" pass its verbose=False filter).
                callback = llama_cpp.llama_log_callback(_forward_native_log)
                llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
                _native_log_callback = callback
    return llama_cpp


def _load_llama(**kwargs: Any) -> Any:
    """Load a `Llama` with llama.cpp's weight repacking off.

    Repacked weights are multiplied by different kernels for one and for several tokens, so a token's result would
    depend on how many sequences share its batch; without repacking, batched decoding (at most MAX_BATCH tokens)
    gives every sequence the bytes it gets alone. llama-cpp-python has no argument for it, so its default model
    parameters are wrapped while this model loads.
    """
    llama_cpp = _llama_cpp()
    lib = llama_cpp.llama_cpp

    with _load_lock:
        defaults = lib.llama_model_default_params

        def no_repack() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = no_repack
        try:
            return llama_cpp.Llama(**kwargs)
        finally:
            lib.llama_model_default_params = defaults


@atexit.register
def _free_models() -> None:
    """Free loaded models while the interpreter still works (llama_cpp's own __del__ fails at shutdown).

    A model still generating in a thread that outlived its grace period is left alone: freeing memory a decode is
    using would crash the process on its way out (its work has been handed back already)."""
    for backend in list(_loaded):
        if getattr(backend, "in_use", False):
            continue
        try:
            backend._free()
        except Exception:
            pass


def available_cpus() -> int:
    """CPUs this process may run on (llama.cpp's own default takes half, assuming hyper-threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


class LlamaBackend(Backend):
    """llama-cpp-python in this process: one `Llama`, shared by every caller under a lock.

    Determinism: the batch size is fixed (n_batch == n_ubatch) and a cached prompt prefix is reused only up to a
    multiple of it, so the same messages, parameters and seed give the same bytes whatever ran before. Only prompt
    tokens are reused: generated ones were evaluated one at a time, by other kernels than a prompt block.

    Memory: the weights, the model's context and the batch context are held while the backend is *resident*. Every
    use of them (tokenizing, a generation from its first chunk to its end or close(), a batch) holds a lease, and
    memory is only ever freed when no lease is held: `release_memory()` frees an idle backend (the registry does so
    for the least recently used one) and the next use loads the file again, transparently; `close()` frees it for
    good, at once when idle or when the last lease ends, and later use raises BackendUnavailable.
    """

    kind = IN_PROCESS

    def __init__(self, model_path: Path, *, n_ctx: int = 4096, n_threads: int = 0, n_batch: int = 64,
                 chat_format: str = "auto", name: str | None = None, max_batch: int = 4):
        model_path = Path(model_path)
        if not 1 <= max_batch <= MAX_BATCH:
            raise ParameterError(f"max_batch must be between 1 and {MAX_BATCH}, got {max_batch}")
        self.model_path = model_path
        self.name = name or model_path.stem
        self._load_kwargs = dict(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                 n_threads=n_threads or available_cpus(), verbose=False, seed=0)
        # Guards the lease count and what is loaded; never held while loading. Re-entrant: a generation finalized by
        # the garbage collector while this thread frees memory ends its lease here.
        self._state = threading.RLock()
        self._reload_lock = threading.Lock()
        self._leases = 0
        self._closed = False
        self._registry: _Registry | None = None  # set, with the spec, when the registry built this backend
        self._spec: ModelSpec | None = None
        self._llm: Any = None
        self._batch: _BatchState | None = None
        self._prompt_len = 0  # of the tokens in the model's cache, how many were evaluated as the last prompt
        self.loads = 0
        self._llm = self._load()
        self.lock = threading.Lock()
        try:
            self.n_ctx = self._llm.n_ctx()
            self.n_batch = self._llm.n_batch
            self.n_threads = self._llm.context_params.n_threads
            meta = self._llm.metadata
            self.architecture = meta.get("general.architecture", "")
            self.gguf_template = meta.get("tokenizer.chat_template")
            self.chat_format = self._choose_format(chat_format, meta)
            self._formatter = self._make_formatter()
        except BaseException:
            self._free()
            raise
        self._sha256: str | None = None
        self.max_batch = max_batch

    def _load(self) -> Any:
        """Load the weights and the model's context; ModelFileUnavailable when the file is missing or unloadable."""
        path = self.model_path
        try:
            check_gguf(path)
        except ModelFileError as exc:
            raise ModelFileUnavailable(str(exc)) from None
        started = time.perf_counter()
        try:
            llm = _load_llama(**self._load_kwargs)
        except (ValueError, RuntimeError) as exc:
            raise ModelFileUnavailable(f"could not load model {path}: {exc}") from None
        self.load_s = time.perf_counter() - started
        self.loads += 1
        _loaded.add(self)
        log.info("loaded %s (%s, context %s) in %.1f s", self.name, path, self._load_kwargs["n_ctx"], self.load_s)
        return llm

    @property
    def llm(self) -> Any:
        """The `Llama` (loaded again if its memory was released). Hold `lease()` while using it from several
        threads: outside a lease the registry may release it."""
        with self.lease() as llm:
            return llm

    @property
    def resident(self) -> bool:
        """True while the weights are in memory."""
        return self._llm is not None

    @property
    def in_use(self) -> bool:
        """True while a lease is held (a generation or a tokenization is running)."""
        return self._leases > 0

    @property
    def closed(self) -> bool:
        """True once close() was called: the backend will not load again."""
        return self._closed

    @contextmanager
    def lease(self) -> Iterator[Any]:
        """Hold the model in memory for the block (loading it again first if it was released); yields the `Llama`.

        While any lease is held, neither the registry nor close() frees the memory."""
        with self._state:
            if self._closed:
                raise BackendUnavailable(f"model {self.name!r} was unloaded")
            self._leases += 1
        try:
            if self._registry is not None:
                self._registry.touch(self)
            if self._llm is None:
                with self._reload_lock:
                    if self._llm is None:
                        self._llm = self._registry.reload(self) if self._registry is not None else self._load()
            yield self._llm
        finally:
            with self._state:
                self._leases -= 1
                idle = self._leases == 0
                free_now = idle and self._closed
            if free_now:
                self._free()
            elif idle and self._registry is not None:
                self._registry.trim()

    def release_memory(self) -> bool:
        """Free the weights and contexts if no lease is held (the next use loads them again); True when freed."""
        with self._state:
            if self._leases:
                return False
            return self._free_unlocked()

    def close(self) -> None:
        """Free the model for good: now if idle, else when the running generation ends; further use raises
        BackendUnavailable. (`unload(spec)` does this for a backend the registry built.)"""
        with self._state:
            self._closed = True
            if not self._leases:
                self._free_unlocked()

    def _free(self) -> None:
        with self._state:
            self._free_unlocked()

    def _free_unlocked(self) -> bool:
        llm, batch = self._llm, self._batch
        self._llm, self._batch, self._prompt_len = None, None, 0
        if batch is not None:  # its context uses the model's weights: freed first
            batch.close()
        if llm is not None:
            llm.close()
            log.info("freed %s (%s)", self.name, self.model_path)
        return llm is not None

    def _choose_format(self, configured: str, meta: Mapping[str, str]) -> str:
        if configured not in ("auto", ""):
            return configured
        if self.gguf_template:
            return "gguf"
        return chat_formats.guess_format(self.architecture, meta.get("general.name", self.name))

    def _make_formatter(self) -> chat_formats.Formatter | None:
        if self.chat_format == "raw":
            return None
        if self.chat_format == "gguf":
            if not self.gguf_template:
                raise ChatFormatError(f"{self.model_path} has no chat template of its own; set PROMPTDEV_CHAT_FORMAT")
            llm = self._llm  # called while loading: resident
            vocab = llm._model
            bos = vocab.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
            eos = vocab.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
            return chat_formats.GGUFTemplateFormatter(self.gguf_template, bos, eos)
        return chat_formats.BUILTIN[self.chat_format]

    @property
    def sha256(self) -> str:
        """SHA-256 of the model file (computed once, cached beside the file)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.model_path)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """Name, architecture, file, context and threads."""
        return {
            "backend": self.kind, "name": self.name, "path": str(self.model_path), "architecture": self.architecture,
            "file_size": self.model_path.stat().st_size, "n_ctx": self.n_ctx, "n_threads": self.n_threads,
            "n_batch": self.n_batch, "chat_format": self.chat_format, "load_s": self.load_s, "sha256": self.sha256,
            "max_batch": self.max_batch,
        }

    def prompt_segments(self, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
        """The exact prompt for messages, split into markup and content."""
        if self._formatter is None:
            raise ChatFormatError("chat format 'raw' takes a raw prompt, not chat messages")
        return chat_formats.build_prompt(self._formatter, messages)

    def format_messages(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The exact prompt text the model sees for messages."""
        return chat_formats.prompt_text(self.prompt_segments(messages))

    def tokenize_segments(self, segments: Sequence[Segment]) -> list[int]:
        """Tokens of a formatted prompt: markup may hold special tokens, content never does."""
        tokens: list[int] = []
        with self.lease() as llm:
            for seg in segments:
                tokens += llm.tokenize(seg.text.encode("utf-8"), add_bos=False, special=seg.special)
        return tokens

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens of a raw prompt, with BOS when the model wants one."""
        with self.lease() as llm:
            return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def count_tokens(self, text: str) -> int:
        """How many tokens text takes (no BOS)."""
        with self.lease() as llm:
            return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _prepare(self, messages: Sequence[Mapping[str, str]] | None, prompt: str | None,
                 params: GenerationParams | None) -> tuple[str, list[int], GenerationParams]:
        """The prompt text, its tokens and the parameters with a seed; InvalidRequest or PromptTooLong when it cannot
        run."""
        _check_request(messages, prompt)
        params = (params or GenerationParams()).with_seed()
        try:
            if messages is not None:
                segments = self.prompt_segments(messages)
                text, tokens = chat_formats.prompt_text(segments), self.tokenize_segments(segments)
            else:
                text, tokens = prompt, self.tokenize_prompt(prompt)
        except ChatFormatError as exc:
            raise InvalidRequest(str(exc)) from None
        if len(tokens) + 1 > self.n_ctx:
            raise PromptTooLong(
                f"the prompt takes {len(tokens)} tokens; the model's context holds {self.n_ctx}")
        return text, tokens, params

    def generate(self, messages: Sequence[Mapping[str, str]] | None = None, *, prompt: str | None = None,
                 params: GenerationParams | None = None) -> Generation:
        """Stream a completion; the model is locked (and leased) from the first chunk until the end or close()."""
        text, tokens, params = self._prepare(messages, prompt, params)
        usage = Usage(prompt_tokens=len(tokens))
        return Generation(self._stream(tokens, params, usage), text, params, usage)

    def _aligned_prefix(self, tokens: Sequence[int]) -> int:
        """How much of the cache can be kept: the common prefix with the cached prompt, cut to a multiple of n_batch."""
        llm = self.llm
        cached = llm.input_ids[: min(llm.n_tokens, self._prompt_len)]
        return _aligned(cached, tokens, self.n_batch)

    def _stream(self, tokens: list[int], params: GenerationParams, usage: Usage) -> Iterator[str]:
        started = time.perf_counter()
        with self.lease() as llm, self.lock:
            try:
                llm.n_tokens = self._aligned_prefix(tokens)
                self._prompt_len = len(tokens)
                llm.set_seed(params.seed)
                decoder = _Decoder(llm, params, len(tokens), self.n_ctx, usage, started)
                for token in llm.generate(
                        tokens, top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=params.temperature,
                        repeat_penalty=params.repeat_penalty, reset=True):
                    over = decoder.feed(token)
                    yield from decoder.take()
                    if over:
                        break
                else:
                    decoder.end(FINISH_STOP)
                    yield from decoder.take()
                usage.finish_reason = decoder.finish
            finally:
                usage.total_s = time.perf_counter() - started
                if not usage.finish_reason:
                    usage.finish_reason = FINISH_CANCELLED

    def _sampler(self, params: GenerationParams) -> Any:
        """The sampler chain `generate` builds for these parameters (same order, same seed)."""
        llm = self._llm  # under the lease generate_many holds
        llm.set_seed(params.seed)
        return llm._init_sampler(top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=params.temperature,
                                 repeat_penalty=params.repeat_penalty)

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Run several generations to the end, decoding up to `max_batch` of them together.

        Every output is byte-identical to what `generate` gives for the same request alone: each sequence has its
        own KV stream laid out as in a lone run, reuses a cached prefix only up to a multiple of n_batch, evaluates
        the rest of its prompt in the same blocks, and a decoding batch holds at most MAX_BATCH tokens (llama.cpp
        multiplies larger batches with other kernels). Prompts that do not fit a batch slot run alone. The model is
        leased for the whole call.
        """
        with self.lease():
            return self._generate_many(requests)

    def _generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        out: list[Generation | None] = [None] * len(requests)
        jobs: list[_Job] = []
        for i, req in enumerate(requests):
            try:
                text, tokens, params = self._prepare(req.messages, req.prompt, req.params)
            except GenerationError as exc:
                params = (req.params or GenerationParams()).with_seed()
                out[i] = _finished([], req.prompt, params, Usage(), exc)
                continue
            jobs.append(_Job(i, text, tokens, params, Usage(prompt_tokens=len(tokens))))
        slot_ctx = min(self.n_ctx, BATCH_SLOT_CTX)
        batched = [j for j in jobs if self.max_batch > 1
                   and len(j.tokens) + min(j.params.max_tokens, self.n_ctx - len(j.tokens)) <= slot_ctx]
        alone = [j for j in jobs if j not in batched]
        if len(batched) == 1:
            alone, batched = alone + batched, []
        if batched:
            with self.lock:
                try:
                    if self._batch is None:
                        self._batch = _BatchState(self, slot_ctx)
                except GenerationError:
                    log.warning("batched decoding unavailable; generating one at a time", exc_info=True)
                    alone, batched = alone + batched, []
                try:
                    if batched:
                        self._batch.run(batched)
                except BaseException as exc:
                    # What the batch context holds is unknown now: start over with a new one next time.
                    self._batch.close()
                    self._batch = None
                    if not isinstance(exc, GenerationError):
                        raise
                    for job in batched:
                        if job.decoder is None or not job.decoder.finish:
                            job.error = exc
        for job in alone:
            try:
                with Generation(self._stream(job.tokens, job.params, job.usage), job.text, job.params,
                                job.usage) as gen:
                    job.pieces.extend(gen)
            except GenerationError as exc:
                job.error = exc
        for job in jobs:
            if job.decoder is not None and job.decoder.finish:
                job.usage.finish_reason = job.decoder.finish
            elif not job.usage.finish_reason:
                job.usage.finish_reason = "error" if job.error else FINISH_CANCELLED
            out[job.index] = _finished(job.pieces, job.text, job.params, job.usage, job.error)
        return [g for g in out if g is not None]


MAX_BATCH = MAX_EVAL_BATCH  # sequences (so tokens) per decoding batch
BATCH_SLOT_CTX = 2048  # context of each batch slot; longer requests run alone


@dataclass(eq=False)
class _Job:
    index: int
    text: str
    tokens: list[int]
    params: GenerationParams
    usage: Usage
    pieces: list[str] = field(default_factory=list)
    error: Exception | None = None
    decoder: _Decoder | None = None
    sampler: Any = None
    pos: int = 0
    last: int = 0


class _BatchState:
    """A second llama.cpp context on the same weights, for decoding several sequences at once.

    KV streams are not shared (kv_unified off), so each sequence's cells sit where a lone run puts them. Sequence 0
    holds a cached prompt prefix (a multiple of n_batch long) that is copied into a slot when it saves work; each
    slot keeps the prompt it evaluated last, so consecutive requests with the same prefix reuse it without a copy.
    Generated tokens are never reused: they were evaluated one at a time, not in a prompt's n_batch blocks.
    """

    def __init__(self, backend: LlamaBackend, slot_ctx: int):
        llama_cpp = _llama_cpp()

        self.lib, self.backend, self.llm = llama_cpp, backend, backend._llm  # under the lease generate_many holds
        self.n_batch, self.slots = backend.n_batch, backend.max_batch
        params = llama_cpp.llama_context_default_params()
        for name, _ in llama_cpp.llama_context_params._fields_:
            setattr(params, name, getattr(self.llm.context_params, name))
        params.n_seq_max = self.slots + 1
        params.kv_unified = False
        params.n_ctx = slot_ctx * (self.slots + 1)
        try:
            self.ctx = llama_cpp._internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise BackendUnavailable(f"could not set up batched decoding: {exc}") from None
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(max(self.n_batch, self.slots), 0, 1)
        self.held: list[int] = []                        # tokens of the shared prefix in sequence 0
        self.cached: list[list[int]] = [[] for _ in range(self.slots)]  # the last prompt of each slot

    def close(self) -> None:
        """Free the context."""
        self.lib.llama_batch_free(self.batch)
        self.ctx.close()

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(entries)
        for k, (token, pos, seq, logits) in enumerate(entries):
            batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, logits
            batch.seq_id[k][0] = seq
        code = self.lib.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            raise BackendUnavailable(f"batched decoding failed (llama_decode returned {code})")

    def _eval(self, seq: int, tokens: Sequence[int], start: int) -> int:
        """Evaluate tokens from position start in n_batch blocks (logits on each block's last); last block's size."""
        size = 0
        for b in range(0, len(tokens), self.n_batch):
            block = tokens[b:b + self.n_batch]
            size = len(block)
            self._decode([(t, start + b + k, seq, k == size - 1) for k, t in enumerate(block)])
        return size

    def _hold(self, jobs: Sequence[_Job]) -> None:
        """Put the prefix the jobs share into sequence 0, when it is longer than what is held."""
        shared = list(jobs[0].tokens[:-1])
        for job in jobs[1:]:
            shared = shared[:_common_prefix(shared, job.tokens[:-1])]
        want = len(shared) // self.n_batch * self.n_batch
        keep = _common_prefix(self.held, shared) // self.n_batch * self.n_batch
        if want <= keep or want < self.n_batch:
            return
        self.lib.llama_memory_seq_rm(self.memory, 0, keep, -1)
        self.held = self.held[:keep]
        self._eval(0, shared[keep:want], keep)
        self.held = shared[:want]

    def _start(self, slot: int, job: _Job) -> bool:
        """Evaluate a job's prompt in a slot and sample its first token; True when it is already over."""
        seq = slot + 1
        own = _aligned(self.cached[slot], job.tokens, self.n_batch)
        held = _aligned(self.held, job.tokens, self.n_batch)
        if held > own:
            self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.lib.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
            self.cached[slot] = list(self.held)
            own = held
        self.lib.llama_memory_seq_rm(self.memory, seq, own, -1)
        started = time.perf_counter()
        job.decoder = _Decoder(self.llm, job.params, len(job.tokens), self.backend.n_ctx, job.usage, started)
        job.sampler = self.backend._sampler(job.params)
        size = self._eval(seq, job.tokens[own:], own)
        self.cached[slot] = list(job.tokens)
        job.pos = len(job.tokens)
        return self._sampled(job, job.sampler.sample(self.ctx, size - 1))

    def _sampled(self, job: _Job, token: int) -> bool:
        over = job.decoder.feed(token)
        job.pieces.extend(job.decoder.take())
        if over:
            job.usage.total_s = time.perf_counter() - job.decoder.started
        job.last = token
        return over

    def run(self, jobs: Sequence[_Job]) -> None:
        """Generate every job to its end, keeping up to `slots` sequences decoding together."""
        self._hold(jobs)
        queue = list(jobs)
        active: dict[int, _Job] = {}
        while queue or active:
            for slot in range(self.slots):
                while slot not in active and queue:
                    job = queue.pop(0)
                    if not self._start(slot, job):
                        active[slot] = job
            if not active:
                continue
            order = sorted(active)
            self._decode([(active[s].last, active[s].pos, s + 1, True) for s in order])
            for k, slot in enumerate(order):
                job = active[slot]
                job.pos += 1
                if self._sampled(job, job.sampler.sample(self.ctx, k)):
                    del active[slot]


class OpenAIBackend(Backend):
    """An OpenAI-compatible HTTP server (vLLM, llama.cpp server, Ollama): streaming, timeouts, retries."""

    kind = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 4, backoff_s: float = 0.5, n_ctx: int = 4096, name: str | None = None):
        try:  # its form here (a URL registered before the checks existed too); its addresses at each request
            outbound.check_base_url(base_url, resolve=False)
        except outbound.URLRefused as exc:
            raise ServerForbidden(f"model server URL refused: {exc}") from None
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout, self.max_retries, self.backoff_s = timeout, max_retries, backoff_s
        self.n_ctx = n_ctx
        self.name = name or model

    def describe(self) -> dict[str, Any]:
        """Base URL and model name (never the key)."""
        return {"backend": self.kind, "name": self.name, "base_url": self.base_url, "model": self.model,
                "n_ctx": self.n_ctx, "timeout_s": self.timeout, "max_retries": self.max_retries}

    def count_tokens(self, text: str) -> int:
        """An estimate (about four characters a token): the server does not expose its tokenizer portably."""
        return max(1, (len(text) + 3) // 4)

    def _open(self, path: str, body: dict[str, Any]):
        """POST with retries and exponential backoff on connection errors, 429 and 5xx, through core.outbound
        (every address checked at connect time, no redirect followed). An error answer is reported by its status
        alone: its body, and the server's own reason phrase, may hold what an internal service should not show."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method="POST")
            try:
                return outbound.open_url(request, timeout=self.timeout)
            except outbound.URLRefused as exc:
                raise ServerForbidden(f"model server URL refused: {exc}") from None
            except urllib.error.HTTPError as exc:
                try:
                    exc.close()  # unread: the body is never shown
                except Exception:
                    pass
                answered = f"model server {self.base_url} answered {_status_line(exc.code)}"
                if exc.code == 429 or exc.code >= 500:
                    last_error = _status_line(exc.code)
                    continue
                if 300 <= exc.code < 400:
                    raise BackendUnavailable(f"{answered}; redirects are not followed (give the URL it moved "
                                             f"to)") from None
                refused = answered
                if exc.code == 413:
                    raise PromptTooLong(refused) from None
                if exc.code in (400, 422):
                    raise InvalidRequest(refused) from None
                raise BackendUnavailable(refused) from None  # 401, 403, 404: not usable as configured
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last_error = f"{reason}"
                continue
        raise BackendUnavailable(
            f"model server {self.base_url} did not answer after {self.max_retries + 1} attempts: {last_error}")

    def generate(self, messages: Sequence[Mapping[str, str]] | None = None, *, prompt: str | None = None,
                 params: GenerationParams | None = None) -> Generation:
        """Stream a completion from the server."""
        _check_request(messages, prompt)
        params = (params or GenerationParams()).with_seed()
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens, "seed": params.seed, "stream_options": {"include_usage": True},
            "top_k": params.top_k, "repeat_penalty": params.repeat_penalty,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if messages is not None:
            body["messages"] = chat_formats.normalize_messages(messages)
            path, shown = "/chat/completions", json.dumps(body["messages"], ensure_ascii=False)
        else:
            body["prompt"] = prompt
            path, shown = "/completions", prompt
        usage = Usage()
        return Generation(self._stream(path, body, usage), shown, params, usage)

    def _stream(self, path: str, body: dict[str, Any], usage: Usage) -> Iterator[str]:
        started = time.perf_counter()
        response = self._open(path, body)
        count = 0
        try:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    raise BackendUnavailable(f"model server {self.base_url} sent an event that is not JSON") from None
                if event.get("usage"):
                    usage.prompt_tokens = event["usage"].get("prompt_tokens", usage.prompt_tokens)
                    usage.completion_tokens = event["usage"].get("completion_tokens", usage.completion_tokens)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        if usage.ttft_s is None:
                            usage.ttft_s = time.perf_counter() - started
                        count += 1
                        yield piece
                    if choice.get("finish_reason"):
                        usage.finish_reason = choice["finish_reason"]
        except (OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"{self.base_url} stopped answering mid-stream: {exc}") from None
        finally:
            response.close()
            usage.total_s = time.perf_counter() - started
            if not usage.completion_tokens:
                usage.completion_tokens = count
            if not usage.finish_reason:
                usage.finish_reason = FINISH_CANCELLED


def _status_line(code: int) -> str:
    """`HTTP 500 Internal Server Error`: the status and its standard phrase (never the server's own)."""
    try:
        return f"HTTP {code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything a backend is built from; equal specs share one backend (see `backend_for_spec`).

    In-process (`kind` "llama_cpp"): the GGUF `path`, `n_ctx`, `n_threads` (0: every CPU), `n_batch`, `chat_format`
    and `eval_batch` (sequences decoded together). Server (`kind` "openai"): `base_url`, the server's `model`, the
    name of the environment variable holding the key (`api_key_env`), `timeout` and `max_retries`. Fields of the
    other kind keep their defaults, so they never tell two specs apart. `name` is what the backend is called in the
    ledger. `api_key` is the key itself, read by whoever builds the spec from a variable it may read (the settings',
    or one on the admin's allow-list: `models.model_spec`); `build` never reads a variable itself. It is never
    shown, and not part of what identifies a spec.
    """

    kind: str
    name: str
    n_ctx: int = 4096
    path: str | None = None
    n_threads: int = 0
    n_batch: int = 64
    chat_format: str = "auto"
    eval_batch: int = 4
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout: float = 120.0
    max_retries: int = 4
    api_key: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def in_process(cls, path: str | Path, settings: Settings, *, name: str | None = None, n_ctx: int | None = None,
                   chat_format: str | None = None) -> "ModelSpec":
        """A GGUF loaded in this process, with the settings' threads, batch sizes (n_batch at most n_ctx) and, unless
        given, their context size and chat format."""
        path = Path(path).expanduser().resolve()
        n_ctx = settings.n_ctx if n_ctx is None else n_ctx
        return cls(kind=IN_PROCESS, name=name or path.stem, n_ctx=n_ctx, path=str(path), n_threads=settings.n_threads,
                   n_batch=min(settings.n_batch, n_ctx), eval_batch=settings.eval_batch,
                   chat_format=settings.chat_format if chat_format is None else chat_format)

    @classmethod
    def server(cls, base_url: str, model: str, settings: Settings, *, name: str | None = None,
               n_ctx: int | None = None, api_key_env: str | None = None, api_key: str | None = None) -> "ModelSpec":
        """A model on an OpenAI-compatible server, called with the settings' timeout and retries."""
        return cls(kind=SERVER, name=name or model, n_ctx=settings.n_ctx if n_ctx is None else n_ctx,
                   base_url=base_url.rstrip("/"), model=model, api_key_env=api_key_env, timeout=settings.openai_timeout,
                   max_retries=settings.openai_max_retries, api_key=api_key)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelSpec":
        """The model the settings configure: PROMPTDEV_MODEL_PATH (or the default GGUF), or the OpenAI-compatible
        server when PROMPTDEV_BACKEND=openai (its key from PROMPTDEV_OPENAI_API_KEY, else $OPENAI_API_KEY)."""
        if settings.backend == SERVER:
            key_env = "PROMPTDEV_OPENAI_API_KEY" if settings.openai_api_key else "OPENAI_API_KEY"
            return cls.server(settings.openai_base_url, settings.openai_model, settings, api_key_env=key_env,
                              api_key=settings.openai_api_key or os.environ.get("OPENAI_API_KEY"))
        return cls.in_process(default_model_path(settings), settings)

    def build(self) -> Backend:
        """A new backend for this spec (loading the model for an in-process one); use `backend_for_spec` to share."""
        if self.kind == IN_PROCESS:
            return LlamaBackend(Path(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self.n_batch,
                                chat_format=self.chat_format, name=self.name, max_batch=self.eval_batch)
        return OpenAIBackend(self.base_url, self.model, api_key=self.api_key, timeout=self.timeout,
                             max_retries=self.max_retries, n_ctx=self.n_ctx, name=self.name)


DEFAULT_MAX_LOADED_MODELS = 2


class _Registry:
    """The process's backends, one per spec, least recently used first; at most `max_loaded` in-process ones
    resident (idle ones beyond it are released, least recently used first).

    `_lock` guards the table and is only held briefly; `_build_lock` is held while a model loads (a new backend or
    a released one loading again), so loads happen one at a time and a spec is never built twice. Lock order:
    a backend's reload lock, then `_build_lock`, then `_lock`, then a backend's state lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant for the same reason as a backend's state lock
        self._build_lock = threading.Lock()
        self._backends: OrderedDict[ModelSpec, Backend] = OrderedDict()
        self.max_loaded = DEFAULT_MAX_LOADED_MODELS

    def _cached(self, spec: ModelSpec) -> Backend | None:
        with self._lock:
            backend = self._backends.get(spec)
            if backend is not None:
                self._backends.move_to_end(spec)
            return backend

    def get(self, spec: ModelSpec, max_loaded: int | None = None) -> Backend:
        if max_loaded is not None:
            self.max_loaded = max(1, int(max_loaded))
        backend = self._cached(spec)
        if backend is not None:
            return backend
        with self._build_lock:
            backend = self._cached(spec)
            if backend is None:
                if spec.kind == IN_PROCESS:
                    self._make_room(None)
                backend = spec.build()
                if isinstance(backend, LlamaBackend):
                    backend._registry, backend._spec = self, spec
                with self._lock:
                    self._backends[spec] = backend
            return backend

    def reload(self, backend: LlamaBackend) -> Any:
        """Load a released backend's model again, after making room for it; returns the `Llama`."""
        with self._build_lock:
            self._make_room(backend)
            return backend._load()

    def touch(self, backend: LlamaBackend) -> None:
        """Mark a backend as just used."""
        with self._lock:
            if self._backends.get(backend._spec) is backend:
                self._backends.move_to_end(backend._spec)

    def _resident(self, exclude: Backend | None) -> list[LlamaBackend]:
        with self._lock:
            return [b for b in self._backends.values()
                    if b is not exclude and isinstance(b, LlamaBackend) and b.resident]

    def _release(self, resident: list[LlamaBackend], excess: int) -> int:
        for backend in resident:  # least recently used first; one in use is skipped
            if excess <= 0:
                break
            if backend.release_memory():
                excess -= 1
        return excess

    def _make_room(self, loading: Backend | None) -> None:
        """Before a model loads: release idle resident ones, least recently used first, until it fits."""
        resident = self._resident(loading)
        left = self._release(resident, len(resident) - (self.max_loaded - 1))
        if left > 0:
            log.info("%d model(s) beyond the limit of %d are in use: released once idle", left, self.max_loaded)

    def trim(self) -> None:
        """When a backend goes idle: release idle resident models beyond the limit, least recently used first."""
        resident = self._resident(None)
        if len(resident) > self.max_loaded:
            self._release(resident, len(resident) - self.max_loaded)

    def unload(self, spec: ModelSpec) -> bool:
        with self._lock:
            backend = self._backends.pop(spec, None)
        if backend is None:
            return False
        backend.close()
        return True

    def specs(self, resident_only: bool = False) -> list[ModelSpec]:
        with self._lock:
            return [spec for spec, b in self._backends.items()
                    if not resident_only or (isinstance(b, LlamaBackend) and b.resident)]


_registry = _Registry()


def backend_for_spec(spec: ModelSpec, *, max_loaded_models: int | None = None) -> Backend:
    """The process-wide backend for a spec: built (the model loaded) on first use, then shared.

    Loading an in-process model when `max_loaded_models` (last given; default 2) are resident first releases the
    least recently used idle one; one in use is released only once idle. A released backend keeps its identity and
    loads its file again on next use."""
    return _registry.get(spec, max_loaded_models)


def get_backend(settings: Settings) -> Backend:
    """The process-wide backend of the model the settings configure (`ModelSpec.from_settings`)."""
    return backend_for_spec(ModelSpec.from_settings(settings), max_loaded_models=settings.max_loaded_models)


def unload(spec: ModelSpec) -> bool:
    """Forget the backend of a spec and free its memory (the weights, the model's and the batch context): at once
    when idle, else when its running generation ends; later use of that backend object raises BackendUnavailable
    and `backend_for_spec` builds a new one. True when there was one."""
    return _registry.unload(spec)


def cached_specs() -> list[ModelSpec]:
    """Specs with a backend in the registry, least recently used first."""
    return _registry.specs()


def resident_specs() -> list[ModelSpec]:
    """Specs whose in-process model is in memory now, least recently used first."""
    return _registry.specs(resident_only=True)
