"""A run's images: what prepare_data takes from a data folder, and how real unlabelled
images (--unlabelled, a data folder's unlabelled/) join the split."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdml.cli import main
from mbdml.config import RunConfig, make_config
from mbdml.data import labelled_split, load_dataset, validation_split
from mbdml.errors import ConfigError
from mbdml.pseudo_labels import pseudo_label_accuracy
from mbdml.training_data import prepare_data

from cli_helpers import error_line


def write_images(folder: Path, n: int, seed: int, size: int = 8, mode: str = "RGB", ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{seed}-{i}.{ext}")


def layout(root: Path, unlabelled: bool) -> None:
    """train/<class>/ (10 each), test/<class>/ (3 each) and, if asked, unlabelled/nested/ (5)."""
    for k, c in enumerate(("cat", "dog")):
        write_images(root / "train" / c, 10, k)
        write_images(root / "test" / c, 3, 10 + k)
    if unlabelled:
        write_images(root / "unlabelled" / "nested", 5, 20)


def config(root: Path, tmp_path: Path, **kw) -> RunConfig:
    values = dict(dataset=str(root), im_ext="png", val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    return RunConfig(**(values | kw)).resolved()


def test_a_data_folders_unlabelled_images_join_a_semi_supervised_run_and_every_label_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "data"
    layout(root, True)
    cfg = config(root, tmp_path, method="mbdml_semi")
    assert cfg.labelled_fraction == 1.0  # real unlabelled images: no label is hidden by default
    data = prepare_data(cfg)
    assert len(data.train) + len(data.val) == 20 and len(data.val) == 4  # validation from the labelled images only
    assert (data.val.labels >= 0).all() and (data.train.labels >= 0).all()
    assert data.unlabelled_count == len(data.unlabelled) == 5
    assert (data.unlabelled.labels == -1).all()
    assert data.unlabelled.image_size == data.train.image_size and len(data.test) == 6


def test_hidden_labels_and_real_unlabelled_images_are_both_unlabelled(tmp_path: Path) -> None:
    root = tmp_path / "data"
    layout(root, True)
    data = prepare_data(config(root, tmp_path, method="mbdml_semi", labelled_fraction=0.5))
    assert len(data.train) + len(data.val) == 10
    labels = data.unlabelled.labels.tolist()
    assert len(labels) == 15 and labels.count(-1) == 5  # 10 hidden labels (kept for the diagnostic) + 5 unknown


def test_a_method_without_unlabelled_images_leaves_the_folder_alone_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    layout(root, True)
    (root / "unlabelled" / "broken.png").write_bytes(b"not an image")  # never decoded
    with caplog.at_level(logging.INFO, logger="mbdml"):
        data = prepare_data(config(root, tmp_path, method="nngk"))
    assert "are not used: method nngk trains on labelled images only" in caplog.text
    assert data.unlabelled_count == 0 and len(data.train) + len(data.val) == 20


def test_a_fully_labelled_set_splits_exactly_as_before(tmp_path: Path) -> None:
    """No real unlabelled image: the default stays 0.1 for a named set, and the split is
    labelled_split + validation_split (so earlier runs and comparisons still match)."""
    assert RunConfig(dataset="digits").resolved().labelled_fraction == 0.1
    root = tmp_path / "data"
    layout(root, False)
    cfg = config(root, tmp_path, method="mbdml_semi", labelled_fraction=0.5, seed=3)
    data = prepare_data(cfg)
    train, _ = load_dataset(str(root), im_ext="png", cache_dir=str(tmp_path / "cache"))
    labelled = labelled_split(train.labels, 0.5, 3, "random", 0)
    train_idx, val_idx = validation_split(train.labels, labelled, 0.2, 3)
    assert torch.equal(data.train.images, train.images[train_idx]) and torch.equal(data.val.images, train.images[val_idx])
    assert data.unlabelled_count == 10 and (data.unlabelled.labels >= 0).all()


def test_an_unlabelled_folder_of_other_sizes_and_modes_is_matched_to_the_labelled_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    layout(root, False)
    unl = tmp_path / "phone photos"
    write_images(unl / "a", 3, 30, size=20, mode="L", ext="jpg")
    write_images(unl / "b" / "c", 2, 31, size=5, mode="RGB", ext="png")
    cfg = config(root, tmp_path, method="mbdml1_semi", unlabelled=str(unl))
    assert cfg.labelled_fraction == 1.0 and Path(cfg.unlabelled).is_absolute()
    data = prepare_data(cfg)
    assert data.unlabelled_count == 5 and (data.unlabelled.labels == -1).all()
    assert data.unlabelled.images.shape[1:] == data.train.images.shape[1:] == (3, 8, 8)
    assert len(data.train) + len(data.val) == 20


def test_both_unlabelled_sources_are_used_together(tmp_path: Path) -> None:
    root = tmp_path / "data"
    layout(root, True)
    unl = tmp_path / "more"
    write_images(unl, 4, 40)
    data = prepare_data(config(root, tmp_path, method="mbdml_semi", unlabelled=str(unl)))
    assert data.unlabelled_count == 9


def test_unlabelled_images_for_a_method_that_cannot_use_them_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--unlabelled .*method nngk trains on labelled images only.*mbdml_semi.*--teacher_epochs"):
        RunConfig(dataset="digits", method="nngk", unlabelled=str(tmp_path)).resolved()
    # self-training uses them with any method
    assert RunConfig(dataset="digits", method="nngk", unlabelled=str(tmp_path), teacher_epochs=2).resolved().unlabelled


def test_pseudo_label_accuracy_counts_only_images_whose_label_is_known() -> None:
    true = torch.tensor([0, 1, -1, -1, 2])
    assert pseudo_label_accuracy(true, torch.tensor([0, 0, 1, 2, 2])) == pytest.approx(2 / 3)
    assert pseudo_label_accuracy(torch.tensor([-1, -1]), torch.tensor([0, 1])) is None


def test_train_with_an_unlabelled_folder_logs_no_pseudo_label_accuracy(tmp_path: Path) -> None:
    """Through the command line: every labelled image is used, the unlabelled folder is
    pseudo-labelled, and the accuracy of the pseudo-labels is blank (no true label)."""
    root = tmp_path / "data"
    layout(root, False)
    unl = tmp_path / "unl"
    write_images(unl, 12, 50)
    code = main(["-q", "train", "--dataset", str(root), "--im_ext", "png", "--unlabelled", str(unl), "--method", "mbdml_semi",
                 "--model", "resnet_small", "--width", "4", "--embedding_dim", "8", "--max_epochs", "2", "--pseudo_start", "0",
                 "--pseudo_threshold", "0.01", "--k", "5", "--batch_size", "8", "--val_fraction", "0.2", "--retrieval_metrics", "false",
                 "--save_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--name", "r"])
    assert code == 0
    saved = RunConfig.load(tmp_path / "runs" / "r" / "config.json")
    assert saved.labelled_fraction == 1.0 and saved.unlabelled == str(unl.resolve())
    rows = list(csv.DictReader(open(tmp_path / "runs" / "r" / "metrics.csv")))
    labelled = [r for r in rows if r.get("pseudo_n")]
    assert labelled and all(int(r["pseudo_n"]) > 0 and r["pseudo_label_acc"] == "" for r in labelled)


def test_train_refuses_an_unlabelled_folder_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    layout(root, False)
    code = main(["train", "--dataset", str(root), "--im_ext", "png", "--unlabelled", str(tmp_path / "nowhere"), "--method", "mbdml_semi",
                 "--save_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")])
    error_line(code, capsys.readouterr().err, "nowhere")


def test_self_training_labels_an_unlabelled_folder_with_any_method(tmp_path: Path) -> None:
    """--teacher_epochs with --unlabelled: the teacher trains on the labelled images alone,
    labels the folder, and the accuracy of its labels is left unknown."""
    root = tmp_path / "data"
    layout(root, False)
    unl = tmp_path / "unl"
    write_images(unl, 12, 60)
    code = main(["-q", "train", "--dataset", str(root), "--im_ext", "png", "--unlabelled", str(unl), "--method", "nngk",
                 "--teacher_epochs", "1", "--teacher_fraction", "none", "--pseudo_threshold", "0.01", "--model", "resnet_small",
                 "--width", "4", "--embedding_dim", "8", "--max_epochs", "1", "--k", "5", "--batch_size", "8", "--val_fraction", "0.2",
                 "--retrieval_metrics", "false", "--save_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--name", "st"])
    assert code == 0
    summary = json.loads((tmp_path / "runs" / "st" / "summary.json").read_text())
    stats = summary["self_training"]
    assert stats["teacher_n"] > 0 and stats["teacher_label_acc"] is None
    assert RunConfig.load(tmp_path / "runs" / "st" / "teacher" / "config.json").unlabelled is None
