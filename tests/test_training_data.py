"""A run's images: what prepare_data takes from a data folder and what it says about the rest."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbdml.config import RunConfig
from mbdml.training_data import prepare_data


def write_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def layout(root: Path, unlabelled: bool) -> None:
    for k, c in enumerate(("cat", "dog")):
        write_images(root / "train" / c, 10, k)
        write_images(root / "test" / c, 3, 10 + k)
    if unlabelled:
        write_images(root / "unlabelled" / "nested", 5, 20)


@pytest.mark.parametrize("with_unlabelled", [True, False])
def test_a_data_folders_unlabelled_images_are_named_as_unused_and_the_split_is_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, with_unlabelled: bool
) -> None:
    root = tmp_path / ("with" if with_unlabelled else "without")
    layout(root, with_unlabelled)
    cfg = RunConfig(dataset=str(root), im_ext="png", labelled_fraction=0.5, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        data = prepare_data(cfg)
    warned = "unlabelled/ folder is not used by training yet" in caplog.text
    assert warned == with_unlabelled
    # the labelled images alone make the split, the unlabelled folder adds nothing to it
    assert len(data.train) + len(data.val) + data.unlabelled_count == 20
    assert set(data.train.labels.tolist()) == {0, 1} and len(data.test) == 6
