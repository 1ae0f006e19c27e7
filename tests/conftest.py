"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def cifar_archive() -> Path | None:
    """The CIFAR-10 JPEG archive of ../shared/data, if this machine has it."""
    for p in (os.environ.get("MBDML_DATA", ""), REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if p and (Path(p) / "cifar10-jpeg.tar.gz").is_file():
            return Path(p) / "cifar10-jpeg.tar.gz"
    return None


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spec_reference, shared helpers
