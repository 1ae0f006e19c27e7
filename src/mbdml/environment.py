"""Where and how a run computes: its device, its seeds and determinism, and the versions
of what it depends on (saved beside it as ``environment.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ConfigError
from .precision import cpu_description, cpu_model_name


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; asking for a missing one is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--gpu_id {dev.index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but Apple MPS is not available here; use --device cpu")
    return dev


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch's global generator (model initialisation) and set determinism."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def environment_info() -> dict[str, Any]:
    """Versions of what a run depends on, saved beside its configuration."""
    import numpy

    info: dict[str, Any] = {
        "mbdml": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model_name(),
        "cpu_capability": cpu_description(),
        "commit": source_commit(),
    }
    for mod in ("pytorch_metric_learning", "sklearn", "PIL", "faiss"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def source_commit() -> str | None:
    """The git commit of the mbdml source tree that runs (with ``-dirty`` when it has
    uncommitted changes), or None outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
