"""Reading what users hand over — uploads, imported files, configs — as hostile input.

- Sizes are checked before anything is parsed (`check_size`, `read_file` reads at most the cap and one byte more).
- YAML is parsed twice with libyaml: first as a stream of events, refusing anchors and aliases (the "billion laughs"
  expansion needs them, and no import format needs them), nesting deeper than `MAX_DEPTH` and more than `MAX_NODES`
  values, without building anything; only then into Python values, whose size is then linear in the text's.
- JSON nested deeper than the interpreter can parse is a clear error, not a RecursionError.
- While a document is turned into values the cyclic garbage collector is paused (`no_gc`): the values hold no
  cycles, and a full collection over a large heap would stop every other thread for a second or more.
- `read_file` opens only regular files (a FIFO or a device is refused, never waited on), without following a final
  symbolic link; callers resolve the path and check where it lies first.

Every refusal is one line naming what was refused: `InvalidInput` (or the class the caller passes) for malformed
input, `TooLarge` for input beyond a cap. This module imports nothing of `core` but `errors`.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from core.errors import InvalidInput, PromptDevError, TooLarge

MAX_NODES = 250_000   # values (scalars, lists, mappings) in one YAML text
MAX_DEPTH = 64        # lists and mappings nested in one another

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_gc_lock = threading.Lock()
_gc_paused = {"holders": 0, "was_enabled": False}


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block (nested and concurrent blocks included; it runs again when
    the last one ends, if it ran before the first began). Reference counting still frees everything acyclic."""
    with _gc_lock:
        if _gc_paused["holders"] == 0:
            _gc_paused["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_paused["holders"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_paused["holders"] -= 1
            if _gc_paused["holders"] == 0 and _gc_paused["was_enabled"]:
                gc.enable()


def human(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    return f"{n} bytes"  # pragma: no cover


def check_size(size: int, cap: int, what: str) -> None:
    """TooLarge when size (bytes) exceeds cap."""
    if size > cap:
        shown = human(size) if human(size) != human(cap) else f"{size:,} bytes"
        raise TooLarge(f"{what} is {shown}, more than the {human(cap)} allowed")


def text_size(data: str | bytes) -> int:
    """Bytes of data, or of text as UTF-8 (measured a slice at a time: no copy of the whole text is made)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    if data.isascii():
        return len(data)
    step = 1 << 20
    return sum(len(data[i:i + step].encode("utf-8", "surrogatepass")) for i in range(0, len(data), step))


def check_text(data: str | bytes, cap: int, what: str) -> None:
    """TooLarge when data (text or bytes) is larger than cap bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        check_size(len(data), cap, what)
    if len(data) > cap:   # characters ≤ bytes: refused before encoding anything
        raise TooLarge(f"{what} is larger than the {human(cap)} allowed")
    check_size(text_size(data), cap, what)


def read_file(path: str | Path, cap: int, what: str | None = None, *, error: type[PromptDevError] = InvalidInput
              ) -> bytes:
    """The bytes of a regular file, at most cap (TooLarge beyond); a missing, unreadable or special file (FIFO,
    device, directory) is `error`. A final symbolic link is not followed: resolve the path first."""
    what = what or str(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"cannot read {what}: no such file") from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"cannot read {what}: not a regular file")
        check_size(info.st_size, cap, what)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
        check_size(len(data), cap, what)   # it grew while being read
        return data
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load_yaml(text: str | bytes, what: str, *, error: type[PromptDevError] = InvalidInput,
              max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> Any:
    """One YAML document as plain values (safe tags only). Anchors and aliases (`&a`, `*a`) are refused, as are
    more than max_nodes values (TooLarge) and nesting deeper than max_depth; all before any value is built."""
    try:
        nodes = depth = 0
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                raise error(f"{what}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                            f"accepted; write the value out in full")
            if isinstance(event, yaml.NodeEvent):
                if event.anchor is not None:
                    raise error(f"{what}: line {event.start_mark.line + 1}: YAML anchors (&{event.anchor}) are not "
                                f"accepted; write the value out in full")
                nodes += 1
                if nodes > max_nodes:
                    raise TooLarge(f"{what}: more than {max_nodes:,} YAML values")
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > max_depth:
                        raise error(f"{what}: line {event.start_mark.line + 1}: nested more than {max_depth} "
                                    f"levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        with no_gc():
            return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader, and the text has no aliases
    except PromptDevError:
        raise
    except yaml.YAMLError as exc:
        if "flow level" in str(exc):   # libyaml's own limit on [[[[…, reached before an event is emitted
            raise error(f"{what}: nested more than {max_depth} levels deep") from None
        raise error(f"{what}: not valid YAML: {_first_line(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:   # e.g. an integer of 5,000 digits
        raise error(f"{what}: not valid YAML: {_first_line(exc)}") from None


def check_values(value: Any, what: str, *, error: type[PromptDevError] = InvalidInput, max_nodes: int = MAX_NODES,
                 max_depth: int = MAX_DEPTH) -> None:
    """The caps of `load_yaml` for values already built (from JSON, from a caller, from YAML read elsewhere): more
    than max_nodes values (TooLarge) or nesting deeper than max_depth is refused. A list or mapping that appears
    several times counts each time, as it would written out, so values sharing their parts (YAML aliases) cost no
    more to check than max_nodes steps."""
    nodes = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise TooLarge(f"{what}: more than {max_nodes:,} values")
        if isinstance(node, dict):
            children: Any = (x for pair in node.items() for x in pair)
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > max_depth:
            raise error(f"{what}: nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children)


def load_json(text: str | bytes, what: str, *, error: type[PromptDevError] = InvalidInput) -> Any:
    """A JSON document; malformed or too deeply nested JSON is `error`, one line."""
    try:
        with no_gc():
            return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise error(f"{what}: not valid JSON: nested too deeply") from None
    except (ValueError, TypeError) as exc:   # undecodable bytes, an integer of 5,000 digits
        raise error(f"{what}: not valid JSON: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
