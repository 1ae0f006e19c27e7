"""The example that makes a user-like data folder from a built-in set."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbdml.config import RunConfig
from mbdml.data import load_dataset
from mbdml.data.sources import UNLABELLED_LAYOUT, detect_folder_kind
from mbdml.training_data import prepare_data

REPO = Path(__file__).resolve().parents[1]


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_made_folder_is_recognised_and_its_hidden_labels_are_right(tmp_path: Path) -> None:
    make = example("make_image_folder")
    out = tmp_path / "photos"
    counts = make.write_folder("digits", out, labelled_per_class=3, unlabelled=40, test_per_class=2, seed=0)
    assert counts == {"train": 30, "unlabelled": 40, "test": 20}
    assert detect_folder_kind(out) == UNLABELLED_LAYOUT
    # the unlabelled files carry no class in their names, and the side file gives the true one
    train, _ = load_dataset("digits")
    pixels = {train.images[i, 0].numpy().tobytes(): train.classes[int(train.labels[i])] for i in range(len(train))}
    with open(out / "unlabelled-labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and all(Path(r["file"]).name.startswith("u") for r in rows)
    for r in rows[:10]:
        assert pixels[np.asarray(Image.open(out / r["file"])).tobytes()] == r["class"]
    data = prepare_data(RunConfig(dataset=str(out), im_ext="png", method="mbdml_semi", cache_dir=str(tmp_path / "c")).resolved())
    assert data.unlabelled_count == 40 and len(data.train) + len(data.val) == 30


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        example("make_image_folder").write_folder("digits", tmp_path, 1, 1, 1, 0)
