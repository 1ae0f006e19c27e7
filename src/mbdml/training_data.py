"""The images of a run: its labelled split, validation and test images, the unlabelled
rest, and how its training images are augmented."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import RunConfig
from .data import (
    Augmentation,
    ImageSet,
    UnlabelledImages,
    check_every_class_labelled,
    cross_validation_split,
    load_dataset,
    load_unlabelled_folder,
    semi_supervised_split,
)
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
    # The unlabelled images: real ones (label -1) and the training images whose labels are
    # hidden. Only a semi-supervised method or self-training trains on them (with
    # pseudo-labels); the hidden true labels are used for nothing but a logged
    # diagnostic: how many of the pseudo-labels are right.
    unlabelled: ImageSet | None = None


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load the data set and its unlabelled images, draw the labelled split and the
    validation part (seeded).

    Real unlabelled images (``--unlabelled``, a data folder's ``unlabelled/``) are
    decoded only when the run uses unlabelled images. They join the training images
    with the unknown label -1, so the validation part comes out of labelled images
    only (:func:`~mbdml.data.split.semi_supervised_split`), and the unlabelled part is
    they and the labelled images whose labels ``--labelled_fraction`` hides. Without
    them the split is exactly the one of a fully labelled set.
    """
    uses_unlabelled = cfg.uses_unlabelled_images()
    train_all, test = load_dataset(
        cfg.dataset,
        test_dir=cfg.test_dir,
        im_ext=cfg.im_ext,
        image_size=cfg.input_size,
        on_bad_image=cfg.on_bad_image,
        cache_dir=cfg.cache_dir,
        max_image_pixels=cfg.max_image_pixels,
        load_unlabelled=uses_unlabelled,
    )
    if not uses_unlabelled and cfg.has_real_unlabelled_images():
        log.info(
            "the unlabelled images of %s are not used: method %s trains on labelled images only (the semi-supervised "
            "methods and self-training use them)", cfg.unlabelled or cfg.dataset, cfg.method,
        )
    if cfg.num_classes is not None and cfg.num_classes != train_all.num_classes:
        raise DataError(
            f"--num_classes {cfg.num_classes} disagrees with the data: {cfg.dataset} has {train_all.num_classes} classes "
            f"({', '.join(train_all.classes[:10])}{'...' if train_all.num_classes > 10 else ''}); drop --num_classes or fix the folders"
        )
    if cfg.unlabelled is not None and uses_unlabelled:
        train_all = _with_unlabelled_folder(train_all, cfg)
    joined = train_all.with_unlabelled_appended()
    fraction = cfg.labelled_fraction if cfg.labelled_fraction is not None else cfg.default_labelled_fraction()
    split = semi_supervised_split(joined.labels, fraction, cfg.val_fraction, cfg.seed, cfg.split, cfg.run)
    train_idx, val_idx = split.train, split.val
    if cfg.cv_folds is not None:
        # The fold's validation images come out of all the labelled ones; the test set is left out.
        train_idx, val_idx = cross_validation_split(joined.labels, torch.cat([split.train, split.val]), cfg.cv_folds, cfg.cv_fold, cfg.seed)
        log.info("cross-validation: fold %d of %d validates on %d labelled images; the test set is not evaluated",
                 cfg.cv_fold, cfg.cv_folds, len(val_idx))
        test = test.subset(torch.zeros(0, dtype=torch.long))
    check_every_class_labelled(joined.labels, train_idx, joined.num_classes, joined.classes)
    return PreparedData(
        train=joined.subset(train_idx),
        val=joined.subset(val_idx),
        test=test,
        classes=list(joined.classes),
        unlabelled_count=len(split.unlabelled),
        unlabelled=joined.subset(split.unlabelled),
    )


def _with_unlabelled_folder(train: ImageSet, cfg: RunConfig) -> ImageSet:
    """``train`` with the images of ``--unlabelled`` added to its unlabelled images, at its size."""
    assert cfg.unlabelled is not None
    found = load_unlabelled_folder(
        cfg.unlabelled, train.image_size, cfg.on_bad_image, cfg.cache_dir, max_image_pixels=cfg.max_image_pixels,
    ).like(train)
    if train.unlabelled is not None and len(train.unlabelled):
        before = train.unlabelled.like(train)
        found = UnlabelledImages(torch.cat([before.images, found.images]), before.paths + found.paths)
    log.info("%d unlabelled images from %s", len(found), cfg.unlabelled)
    return ImageSet(train.images, train.labels, train.classes, unlabelled=found)


def training_augmentation(cfg: RunConfig) -> Augmentation:
    """The batch augmentation of a run: flips, padded crops and cutout filled with the
    normalisation mean (so the square is 0 once normalised)."""
    fill = tuple(255.0 * m for m in cfg.mean)
    return Augmentation(flip=bool(cfg.flip), crop_padding=int(cfg.crop_padding or 0), cutout=cfg.cutout, cutout_fill=fill)
