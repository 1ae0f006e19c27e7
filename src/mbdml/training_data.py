"""The images of a run: its labelled split, validation and test images, the unlabelled
rest, and how its training images are augmented."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import RunConfig
from .data import Augmentation, ImageSet, check_every_class_labelled, labelled_split, load_dataset, validation_split
from .data.sources import detect_folder_kind, is_dataset_name
from .errors import DataError

log = logging.getLogger("mbdml")


@dataclass
class PreparedData:
    """The labelled training images (centres), validation and test images."""

    train: ImageSet  # labelled training images, in centre order
    val: ImageSet  # possibly empty
    test: ImageSet
    classes: list[str]
    unlabelled_count: int
    # The training images whose labels are hidden. Only a semi-supervised method trains on
    # them (with pseudo-labels); their true labels are used for nothing but a logged
    # diagnostic: how many of the pseudo-labels are right.
    unlabelled: ImageSet | None = None


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load the data set, draw the labelled split and the validation part (seeded)."""
    train_all, test = load_dataset(
        cfg.dataset,
        test_dir=cfg.test_dir,
        im_ext=cfg.im_ext,
        image_size=cfg.input_size,
        on_bad_image=cfg.on_bad_image,
        cache_dir=cfg.cache_dir,
        max_image_pixels=cfg.max_image_pixels,
        load_unlabelled=False,
    )
    if not is_dataset_name(cfg.dataset) and detect_folder_kind(cfg.dataset, cfg.test_dir) == "train-unlabelled-test":
        log.warning(
            "%s: its unlabelled/ folder is not used by training yet; the semi-supervised methods take their "
            "unlabelled images from the labelled ones whose labels --labelled_fraction hides", cfg.dataset
        )
    if cfg.num_classes is not None and cfg.num_classes != train_all.num_classes:
        raise DataError(
            f"--num_classes {cfg.num_classes} disagrees with the data: {cfg.dataset} has {train_all.num_classes} classes "
            f"({', '.join(train_all.classes[:10])}{'...' if train_all.num_classes > 10 else ''}); drop --num_classes or fix the folders"
        )
    labelled = labelled_split(train_all.labels, cfg.labelled_fraction, cfg.seed, cfg.split, cfg.run)
    train_idx, val_idx = validation_split(train_all.labels, labelled, cfg.val_fraction, cfg.seed)
    check_every_class_labelled(train_all.labels, train_idx, train_all.num_classes, train_all.classes)
    return PreparedData(
        train=train_all.subset(train_idx),
        val=train_all.subset(val_idx),
        test=test,
        classes=list(train_all.classes),
        unlabelled_count=len(train_all) - len(labelled),
        unlabelled=train_all.subset(_complement(len(train_all), labelled)),
    )


def _complement(n: int, chosen: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.as_tensor(chosen, dtype=torch.long)] = False
    return keep.nonzero().reshape(-1)


def training_augmentation(cfg: RunConfig) -> Augmentation:
    """The batch augmentation of a run: flips, padded crops and cutout filled with the
    normalisation mean (so the square is 0 once normalised)."""
    fill = tuple(255.0 * m for m in cfg.mean)
    return Augmentation(flip=bool(cfg.flip), crop_padding=int(cfg.crop_padding or 0), cutout=cfg.cutout, cutout_fill=fill)
