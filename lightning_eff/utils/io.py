"""Saved artefacts: atomic writes and versioned ``torch.save`` files with clear errors."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "save_versioned", "load_versioned"]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace`` (mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def save_versioned(path: str | os.PathLike, fmt: str, version: int, payload: dict[str, Any]) -> Path:
    """``torch.save`` of ``{"format": fmt, "format_version": version, **payload}``, written atomically."""
    buffer = io.BytesIO()
    torch.save({"format": fmt, "format_version": version, **payload}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_versioned(
    path: str | os.PathLike, fmt: str, version: int, what: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a file written by :func:`save_versioned`; a corrupt, foreign or other-version file is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... on bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable {what} (corrupt or truncated file?): {first[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path} is not a lightning-eff {what} (no '{fmt}' header)")
    if data.get("format_version") != version:
        raise ValueError(f"{path} has {what} format version {data.get('format_version')!r}; this version reads {version}")
    return data
