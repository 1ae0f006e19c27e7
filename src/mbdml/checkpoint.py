"""Atomic checkpoint writes and loads that cannot run code.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash at any instant leaves either the previous or the
new checkpoint, never half of one. Loading uses ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only, so a crafted pickle cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def _atomic_write(path: Path, write: Any) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write to {path.parent} ({exc.strerror}); free disk space or choose another --save_dir") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(
            f"could not write {path} ({exc.strerror or exc}); the previous file there is intact. "
            "Free disk space or fix the folder's permissions, then resume with --resume"
        ) from exc
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (no code execution); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the run folder, or start the run without --resume")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({text}). It is corrupt, truncated, or holds objects other "
            "than tensors and plain values (which could run code); only load checkpoints you trust, written by mbdml"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dictionary of state; it was not written by mbdml")
    return state


def save_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (summaries, configurations)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (metrics tables)."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))
