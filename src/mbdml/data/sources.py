"""Load real image data into memory once, as uint8 tensors: a data set by name or by folder.

Every source ends up as an :class:`ImageSet`: one contiguous uint8 tensor
``(N, C, H, W)``, int64 labels and the class names. :func:`load_dataset` looks
its argument up in two tables: a built-in data set's name (:data:`NAMED_DATASETS`)
or, for a path, the first folder kind whose test matches (:data:`FOLDER_KINDS`),
each with its loader. The formats live in their own modules:

- :mod:`mbdml.data.image_folder`: class folders (``<class>/<image>``), with the cache;
- :mod:`mbdml.data.unlabelled`: a folder of unlabelled images in any nesting;
- :mod:`mbdml.data.cifar`: CIFAR python pickles and the CIFAR-10 JPEG archive;
- :mod:`mbdml.data.idx`: IDX files (Fashion-MNIST);
- :mod:`mbdml.data.builtin`: scikit-learn's digits.

Bad input never ends in a raw PIL/numpy traceback: it raises
:class:`~mbdml.errors.DataError` with the file concerned and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mbdml.data.builtin import load_digits_builtin
from mbdml.data.cifar import (
    CIFAR10_ARCHIVE_NAME,
    CIFAR10_SPLITS,
    find_cifar10_archive,
    is_cifar_pickle_folder,
    load_cifar10_archive,
    load_cifar_pickle,
    unpack_cifar10_archive,
)
from mbdml.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ON_BAD_IMAGE_CHOICES,
    ImageTooLarge,
    check_image_size,
    check_max_image_pixels,
    check_on_bad_image,
)
from mbdml.data.files import has_sub_folder, missing_path_error
from mbdml.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, is_idx_folder, load_fashion_mnist, load_idx, load_idx_folder
from mbdml.data.image_folder import load_image_folder, load_train_test_folders
from mbdml.data.imageset import UNKNOWN_LABEL, ImageSet, UnlabelledImages, resize_images
from mbdml.data.unlabelled import load_unlabelled_folder
from mbdml.errors import ConfigError, DataError

__all__ = [
    "ImageSet",
    "UnlabelledImages",
    "UNKNOWN_LABEL",
    "load_image_folder",
    "load_unlabelled_folder",
    "load_cifar_pickle",
    "load_idx",
    "load_digits_builtin",
    "load_fashion_mnist",
    "load_dataset",
    "detect_folder_kind",
    "UNLABELLED_LAYOUT",
    "is_dataset_name",
    "check_max_image_pixels",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "find_cifar10_archive",
    "unpack_cifar10_archive",
    "resize_images",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_ARCHIVE_NAME",
    "CIFAR10_SPLITS",
    "DATASET_NAMES",
    "FOLDER_KINDS",
    "NAMED_DATASETS",
    "ON_BAD_IMAGE_CHOICES",
    "UNLABELLED_DIR_NAMES",
]

# The names of a data folder's sub-folder of unlabelled images (either spelling).
UNLABELLED_DIR_NAMES = ("unlabelled", "unlabeled")


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`load_dataset` was asked for, handed to the loader of the table."""

    spec: str  # the name or path as given (stripped)
    path: Path | None  # the data folder (None for a named data set)
    test_dir: str | Path | None
    image_size: int | None
    cache_dir: str | Path | None
    im_ext: str
    on_bad_image: str
    num_workers: int | None
    max_image_pixels: int | None
    load_unlabelled: bool = True  # decode a data folder's unlabelled images

    def folder_options(self) -> dict[str, Any]:
        """The options of :func:`load_image_folder`, but the folder, classes and cache."""
        return dict(im_ext=self.im_ext, image_size=self.image_size, on_bad_image=self.on_bad_image,
                    num_workers=self.num_workers, max_image_pixels=self.max_image_pixels)


Loader = Callable[[LoadRequest], "tuple[ImageSet, ImageSet]"]


def _no_test_dir(spec: str, test_dir: str | Path | None) -> None:
    if test_dir is not None:
        raise ConfigError(
            f"a test folder ('{test_dir}') was given, but data '{spec}' brings its own test set; drop --test, "
            f"or pass a folder of class folders as --data_dir"
        )


def _resize_pair(train: ImageSet, test: ImageSet, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    if image_size is None:
        return train, test
    return (
        ImageSet(resize_images(train.images, image_size), train.labels, train.classes),
        ImageSet(resize_images(test.images, image_size), test.labels, test.classes),
    )


# --------------------------------------------------------------------------- named data sets


def _load_digits(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    _no_test_dir(req.spec, req.test_dir)
    return _resize_pair(*load_digits_builtin(), req.image_size)


def _load_fashion_mnist(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    _no_test_dir(req.spec, req.test_dir)
    return _resize_pair(*load_fashion_mnist(), req.image_size)


def _load_cifar10(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    _no_test_dir(req.spec, req.test_dir)
    return load_cifar10_archive(req.cache_dir, **req.folder_options())


# A built-in data set's name -> its loader (the order is the one messages list).
NAMED_DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}
DATASET_NAMES = tuple(NAMED_DATASETS)
_NAME_ALIASES = {"digits": "digits", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
                 "fashionmnist": "fashion-mnist", "cifar10": "cifar10", "cifar-10": "cifar10"}


def is_dataset_name(spec: str) -> bool:
    """Whether ``spec`` names a built-in data set (digits, fashion-mnist, cifar10) rather than a path."""
    return str(spec).strip().lower() in _NAME_ALIASES


# --------------------------------------------------------------------------- folder kinds


def _unlabelled_dir(path: Path) -> Path | None:
    for name in UNLABELLED_DIR_NAMES:
        if (path / name).is_dir():
            return path / name
    return None


def _load_with_unlabelled(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    path = req.path
    assert path is not None
    unl_dir = _unlabelled_dir(path)
    assert unl_dir is not None
    if req.test_dir is None and not (path / "test").exists():
        raise DataError(
            f"data folder '{path}' has train/ and {unl_dir.name}/ but no test/; add test/<class name>/<image> "
            f"images, or pass the test folder (--test <folder of class folders>)"
        )
    test_root = Path(req.test_dir).expanduser() if req.test_dir is not None else path / "test"
    train, test = load_train_test_folders(path / "train", test_root, req.cache_dir, **req.folder_options())
    if not req.load_unlabelled:
        return train, test
    size = req.image_size if req.image_size is not None else train.image_size
    unlabelled = load_unlabelled_folder(
        unl_dir, size, req.on_bad_image, req.cache_dir, num_workers=req.num_workers, max_image_pixels=req.max_image_pixels,
    )
    return ImageSet(train.images, train.labels, train.classes, unlabelled=unlabelled), test


def _load_train_test(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    path = req.path
    assert path is not None
    test_root = Path(req.test_dir).expanduser() if req.test_dir is not None else path / "test"
    return load_train_test_folders(path / "train", test_root, req.cache_dir, **req.folder_options())


def _load_cifar_pickles(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    assert req.path is not None
    _no_test_dir(req.spec, req.test_dir)
    return _resize_pair(load_cifar_pickle(req.path, True), load_cifar_pickle(req.path, False), req.image_size)


def _load_idx(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    assert req.path is not None
    _no_test_dir(req.spec, req.test_dir)
    return _resize_pair(*load_idx_folder(req.path), req.image_size)


def _load_class_folders(req: LoadRequest) -> tuple[ImageSet, ImageSet]:
    path = req.path
    assert path is not None
    if req.test_dir is None:
        raise DataError(
            f"'{path}' is a folder of class folders without a test set; pass the test folder too "
            f"(--test <folder of class folders>), or give a folder holding train/ and test/"
        )
    return load_train_test_folders(path, Path(req.test_dir).expanduser(), req.cache_dir, **req.folder_options())


@dataclass(frozen=True)
class FolderKind:
    """A data-folder layout: how to recognise it and how to load it."""

    matches: Callable[[Path, "str | Path | None"], bool]  # (folder, test_dir) -> is it this kind?
    load: Loader


# The layout whose unlabelled images come with the data: train/<class>/, unlabelled/, test/<class>/.
UNLABELLED_LAYOUT = "train-unlabelled-test"

# Folder kind -> (test, loader), tried in this order: the first that matches loads the folder.
FOLDER_KINDS: dict[str, FolderKind] = {
    # train/<class>/, unlabelled/ (images in any nesting), test/<class>/ (or --test)
    UNLABELLED_LAYOUT: FolderKind(
        lambda p, t: has_sub_folder(p / "train") and _unlabelled_dir(p) is not None, _load_with_unlabelled
    ),
    # train/<class>/ and test/<class>/ (or --test)
    "train-test": FolderKind(
        lambda p, t: has_sub_folder(p / "train") and (has_sub_folder(p / "test") or t is not None), _load_train_test
    ),
    "cifar-pickle": FolderKind(lambda p, t: is_cifar_pickle_folder(p), _load_cifar_pickles),
    "idx": FolderKind(lambda p, t: is_idx_folder(p), _load_idx),
    # <class>/<image> as the training set, --test as the test set (the authors' --data_dir / --test)
    "class-folders": FolderKind(lambda p, t: has_sub_folder(p), _load_class_folders),
}


def detect_folder_kind(path: str | Path, test_dir: str | Path | None = None) -> str | None:
    """The key of :data:`FOLDER_KINDS` that a data folder is, or None when it matches none."""
    folder = Path(path).expanduser()
    for name, kind in FOLDER_KINDS.items():
        if kind.matches(folder, test_dir):
            return name
    return None


def _folder_loader(key: str, test_dir: str | Path | None, im_ext: str) -> tuple[Path, Loader]:
    path = Path(key).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise missing_path_error(path, "data path", f"pass one of {', '.join(DATASET_NAMES)}, or the path of a data folder")
        raise DataError(
            f"data '{key}' is neither a known data set nor an existing path; pass one of "
            f"{', '.join(DATASET_NAMES)}, or the path of a data folder"
        )
    if not path.is_dir():
        raise DataError(
            f"data path '{path}' is a file; pass a folder (class folders, train/ + test/, CIFAR pickles or IDX "
            f"files), or one of {', '.join(DATASET_NAMES)}"
        )
    kind = detect_folder_kind(path, test_dir)
    if kind is None:
        raise DataError(
            f"data folder '{path}' matches no known layout; it needs class sub-folders (<class>/<image>.{im_ext}), "
            f"train/ and test/ class folders (with unlabelled images in unlabelled/ if any), CIFAR python files "
            f"(data_batch_1.., or train + meta) or IDX files (train-images-idx3-ubyte[.gz] ...)"
        )
    return path, FOLDER_KINDS[kind].load


# --------------------------------------------------------------------------- load_dataset


def _check_two_classes(spec: str, train: ImageSet) -> None:
    """A classifier needs two classes: refuse a data set with one (every metric would read 100%)."""
    present = sorted(set(train.labels.tolist()))
    if train.num_classes < 2 or len(present) < 2:
        only = train.classes[present[0]] if present else (train.classes[0] if train.classes else "?")
        raise DataError(
            f"data set '{spec}' has a single class ('{only}'): every image would be classified right and every "
            f"metric would read 100%; a classifier needs at least two classes: add a folder (or labels) per class"
        )


def load_dataset(
    spec: str,
    test_dir: str | Path | None = None,
    im_ext: str = "jpg",
    image_size: int | None = None,
    on_bad_image: str = "error",
    cache_dir: str | Path | None = ".cache/mbdml",
    *,
    num_workers: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    load_unlabelled: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """Return (train, test) for a named data set or a path.

    Names: "digits" (scikit-learn), "fashion-mnist" (Debian package), "cifar10"
    (the JPEG archive, unpacked into ``cache_dir``). A path may be a folder with
    ``train/`` and ``test/`` class folders (``test_dir``, when given, replaces
    ``test/``), a CIFAR pickle folder, an IDX folder,
    or a folder of class folders used as the training set with ``test_dir`` as the
    test set (the authors' ``--data_dir`` / ``--test``). Test classes are mapped
    onto the training classes by name. ``image_size`` resizes everything to a
    square once at load time. ``cache_dir`` holds decoded image folders (and the
    unpacked archive); None turns the decoded cache off. Image files of more than
    ``max_image_pixels`` pixels are refused before decoding (None: no cap). A data
    set whose training part has a single class is refused.

    Unlabelled images: a folder holding ``train/<class>/``, ``unlabelled/`` (or
    ``unlabeled/``: images of any readable format in any nesting, no classes) and
    ``test/<class>/`` (or ``test_dir``) gives the labelled training set with the
    unlabelled images in ``train.unlabelled`` (:class:`UnlabelledImages`, resized to
    the training images' size, with their file paths); for every other source, and
    with ``load_unlabelled=False`` (evaluating, embedding: no need to decode them),
    ``train.unlabelled`` is None, so ``train, test = load_dataset(...)`` reads as
    before. A trainer uses them this way:

    - ``joined = train.with_unlabelled_appended()``: the unlabelled images come after
      the labelled ones, with label ``UNKNOWN_LABEL`` (-1);
    - ``split = semi_supervised_split(joined.labels, fraction, val_fraction, seed, ...)``
      (:mod:`mbdml.data.split`): the validation images come from labelled images only,
      and ``fraction`` None (what ``--labelled_fraction`` should default to when real
      unlabelled images are present) keeps every labelled image; ``split.unlabelled``
      are the appended images (and the labelled ones whose label a fraction below 1 hid);
    - the semi-supervised methods train on ``joined.subset(split.unlabelled)`` with
      pseudo-labels; the accuracy of the pseudo-labels is computed only over images
      whose true label is known (label >= 0), and is absent when there is none.
    """
    check_on_bad_image(on_bad_image)
    check_image_size(image_size)
    check_max_image_pixels(max_image_pixels)
    key = str(spec).strip()
    name = _NAME_ALIASES.get(key.lower())
    path: Path | None = None
    if name is not None:
        loader = NAMED_DATASETS[name]
    else:
        path, loader = _folder_loader(key, test_dir, im_ext)
    request = LoadRequest(
        spec=key, path=path, test_dir=test_dir, image_size=image_size, cache_dir=cache_dir, im_ext=im_ext,
        on_bad_image=on_bad_image, num_workers=num_workers, max_image_pixels=max_image_pixels,
        load_unlabelled=load_unlabelled,
    )
    train, test = loader(request)
    _check_two_classes(key, train)
    return train, test
