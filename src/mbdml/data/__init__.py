"""Data: loading real images into memory, labelled-fraction splits, and batches.

Sources decode once into uint8 tensors (:mod:`mbdml.data.sources`: a data set by
name or folder, looked up in a table of loaders, one module per format), splits
are seeded and stratified (:mod:`mbdml.data.split`), and batches are cut,
augmented and normalised on whole tensors (:mod:`mbdml.data.batches`; the strong
RandAugment view in :mod:`mbdml.data.randaugment`).
"""

from mbdml.data.batches import PADDING_MODES, Augmentation, Batch, BatchLoader, augment_batch, normalize_batch
from mbdml.data.sources import (
    CIFAR10_ARCHIVE_NAME,
    CIFAR10_SPLITS,
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    UNKNOWN_LABEL,
    ImageSet,
    UnlabelledImages,
    detect_folder_kind,
    find_cifar10_archive,
    load_cifar_pickle,
    load_dataset,
    load_digits_builtin,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_unlabelled_folder,
    resize_images,
    unpack_cifar10_archive,
)
from mbdml.data.randaugment import RANDAUGMENT_OPS, RandAugment, randaugment_batch
from mbdml.data.split import (
    SPLIT_MODES,
    SemiSupervisedSplit,
    check_every_class_labelled,
    cross_validation_split,
    labelled_split,
    semi_supervised_split,
    validation_split,
)

__all__ = [
    "Augmentation",
    "Batch",
    "BatchLoader",
    "CIFAR10_ARCHIVE_NAME",
    "CIFAR10_SPLITS",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "ImageSet",
    "PADDING_MODES",
    "RANDAUGMENT_OPS",
    "RandAugment",
    "SPLIT_MODES",
    "SemiSupervisedSplit",
    "UNKNOWN_LABEL",
    "UnlabelledImages",
    "augment_batch",
    "check_every_class_labelled",
    "detect_folder_kind",
    "find_cifar10_archive",
    "labelled_split",
    "validation_split",
    "load_cifar_pickle",
    "load_dataset",
    "load_digits_builtin",
    "load_fashion_mnist",
    "load_idx",
    "load_image_folder",
    "load_unlabelled_folder",
    "normalize_batch",
    "randaugment_batch",
    "resize_images",
    "semi_supervised_split",
    "cross_validation_split",
    "unpack_cifar10_archive",
]
