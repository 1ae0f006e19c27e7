"""MNIST-style IDX files (gzipped or not), and Fashion-MNIST from the Debian package's folder.

A folder is read when it holds the four files ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
(each may end in ``.gz``, and ``-idx`` may be ``.idx``). Magic numbers, lengths and
counts are checked, so a damaged or swapped file is named, never misread.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from mbdml.data.imageset import ImageSet
from mbdml.errors import DataError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "is_idx_folder", "load_fashion_mnist", "load_idx", "load_idx_folder"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"IDX file '{path}' is missing; check the path, or unpack the MNIST-format files there")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:  # type: ignore[operator]
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"cannot read IDX file '{path}' ({type(exc).__name__}: {exc}); the file is damaged: get a fresh copy"
        ) from exc


def load_idx(
    images_file: str | Path, labels_file: str | Path, classes: list[str] | None = None
) -> ImageSet:
    """Load an MNIST-style IDX pair (gzipped or not) as ``(N, 1, rows, cols)`` uint8 images.

    The magic numbers (0x803 images, 0x801 labels) and the counts are checked;
    classes default to "0".."9".
    """
    images_file, labels_file = Path(images_file).expanduser(), Path(labels_file).expanduser()
    raw = _read_maybe_gzip(images_file)
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic != 0x00000803:
        got = "no magic number" if magic is None else f"magic number 0x{magic:08x}"
        raise DataError(
            f"IDX image file '{images_file}' has {got}, not 0x00000803; it is not an IDX "
            f"image file (did you swap the images and labels files?) or it is damaged: get a fresh copy"
        )
    if len(raw) < 16:
        raise DataError(f"IDX image file '{images_file}' is too short ({len(raw)} bytes); get a fresh copy")
    _, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if len(raw) != 16 + n * rows * cols:
        raise DataError(
            f"IDX image file '{images_file}' should hold {n} images of {rows}x{cols} ({16 + n * rows * cols} "
            f"bytes) but has {len(raw)} bytes; the file is truncated or damaged: get a fresh copy"
        )
    lraw = _read_maybe_gzip(labels_file)
    lmagic = struct.unpack(">I", lraw[:4])[0] if len(lraw) >= 4 else None
    if lmagic != 0x00000801:
        got = "no magic number" if lmagic is None else f"magic number 0x{lmagic:08x}"
        raise DataError(
            f"IDX label file '{labels_file}' has {got}, not 0x00000801; it is not an IDX "
            f"label file (did you swap the images and labels files?) or it is damaged: get a fresh copy"
        )
    if len(lraw) < 8:
        raise DataError(f"IDX label file '{labels_file}' is too short ({len(lraw)} bytes); get a fresh copy")
    _, ln = struct.unpack(">II", lraw[:8])
    if len(lraw) != 8 + ln:
        raise DataError(
            f"IDX label file '{labels_file}' should hold {ln} labels but has {len(lraw) - 8} bytes of labels; "
            f"the file is truncated or damaged: get a fresh copy"
        )
    if ln != n:
        raise DataError(
            f"IDX files disagree: '{images_file}' holds {n} images but '{labels_file}' holds {ln} labels; "
            f"pass the label file that belongs to these images"
        )
    class_list = [str(i) for i in range(10)] if classes is None else [str(c) for c in classes]
    labels = torch.from_numpy(np.frombuffer(lraw, dtype=np.uint8, offset=8).astype(np.int64))
    if n and int(labels.max()) >= len(class_list):
        raise DataError(
            f"IDX label file '{labels_file}' has label {int(labels.max())} but only {len(class_list)} classes "
            f"are named; pass the full list of class names"
        )
    images = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols).copy())
    return ImageSet(images, labels, class_list)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # e.g. stem "train-images-idx3-ubyte"; some copies use "train-images.idx3-ubyte"
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the IDX training images (the other three files are checked on loading)."""
    return _find_idx_file(folder, "train-images-idx3-ubyte") is not None


def load_idx_folder(folder: Path, classes: list[str] | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) from a folder of the four IDX files; ``classes`` name the labels (default "0".."9")."""
    found = {}
    for part in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        p = _find_idx_file(folder, part)
        if p is None:
            raise DataError(
                f"IDX folder '{folder}' lacks '{part}' (or '{part}.gz'); the folder needs all four files "
                f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
            )
        found[part] = p
    train = load_idx(found["train-images-idx3-ubyte"], found["train-labels-idx1-ubyte"], classes)
    test = load_idx(found["t10k-images-idx3-ubyte"], found["t10k-labels-idx1-ubyte"], classes)
    return train, test


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST (train 60,000, test 10,000, 1x28x28) from the IDX files in ``root``.

    The default folder is where the Debian package ``dataset-fashion-mnist`` puts them.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir() or _find_idx_file(folder, "train-images-idx3-ubyte") is None:
        raise DataError(
            f"Fashion-MNIST is not in '{folder}'; run 'apt-get install dataset-fashion-mnist' "
            f"(files go to {FASHION_MNIST_DIR}), or pass the path of a folder holding the four IDX files"
        )
    return load_idx_folder(folder, list(FASHION_MNIST_CLASSES))
