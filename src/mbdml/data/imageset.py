"""Images held in memory: the records every loader returns.

:class:`ImageSet` is a labelled set (one contiguous uint8 ``(N, C, H, W)`` tensor,
int64 labels, the class names); :class:`UnlabelledImages` is a set of images
without labels, with the file each came from. A training set may carry the
unlabelled images that came with it (``ImageSet.unlabelled``); how a trainer uses
them is told in :func:`mbdml.data.sources.load_dataset` and
:func:`mbdml.data.split.semi_supervised_split`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mbdml.errors import ConfigError, DataError

logger = logging.getLogger("mbdml")

__all__ = ["ImageSet", "UnlabelledImages", "UNKNOWN_LABEL", "resize_images"]

# The label of an image whose class nobody knows (an unlabelled image joined to a training set).
UNKNOWN_LABEL = -1

_RESIZE_CHUNK = 1024


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"{what} images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
            f"of shape {tuple(images.shape)}; convert the images to uint8 0..255 first"
        )


@dataclass
class UnlabelledImages:
    """Images without labels: uint8 ``(N, C, H, W)``, contiguous, and the file of each image
    (``paths[i]`` is where ``images[i]`` was read; empty strings for images made in memory)."""

    images: torch.Tensor
    paths: list[str]

    def __post_init__(self) -> None:
        _check_images(self.images, "UnlabelledImages")
        self.paths = [str(p) for p in self.paths]
        if len(self.paths) != self.images.shape[0]:
            raise DataError(
                f"UnlabelledImages has {self.images.shape[0]} images but {len(self.paths)} file paths; "
                f"give exactly one path per image"
            )
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of colour channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: torch.Tensor) -> "UnlabelledImages":
        """The images at ``indices`` (in that order), with their paths."""
        idx = _index_tensor(indices)
        return UnlabelledImages(self.images[idx].contiguous(), [self.paths[i] for i in idx.tolist()])

    def like(self, labelled: "ImageSet") -> "UnlabelledImages":
        """These images with the size and channels of ``labelled``'s images, so both can share
        one tensor: resized (antialiased bilinear) to its (H, W), RGB turned grey (ITU-R 601
        luma) for a one-channel set, grey repeated for a three-channel one."""
        images = self.images
        c_from, c_to = self.channels, labelled.channels
        if c_from != c_to:
            if c_from == 3 and c_to == 1:
                w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                images = (images.to(torch.float32) * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
            elif c_from == 1:
                images = images.expand(-1, c_to, -1, -1)
            else:
                raise DataError(
                    f"unlabelled images have {c_from} channels and the labelled ones {c_to}; no conversion is known: "
                    f"give images of the labelled set's kind (RGB or grey)"
                )
        if (images.shape[2], images.shape[3]) != labelled.image_size:
            logger.info(
                "unlabelled images are %dx%d, labelled images %dx%d; resizing the unlabelled images to match",
                images.shape[2], images.shape[3], *labelled.image_size,
            )
            images = resize_images(images, labelled.image_size)
        return UnlabelledImages(images.contiguous(), list(self.paths))


@dataclass
class ImageSet:
    """Images held in memory: what every loader returns.

    ``images`` is uint8 ``(N, C, H, W)`` and contiguous, ``labels`` int64 ``(N,)``
    with values indexing ``classes``. ``unlabelled`` holds the images without
    labels that came with a training set (the ``unlabelled/`` folder of a data
    folder), already of this set's size and channels; None when there are none.
    They are not among ``images``: :meth:`with_unlabelled_appended` joins them.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    unlabelled: UnlabelledImages | None = None

    def __post_init__(self) -> None:
        _check_images(self.images, "ImageSet")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"ImageSet has {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}; give exactly one label per image"
            )
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of class names (a class may have no image in this set)."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Number of colour channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The images at ``indices`` (in that order), with the same class list (and no unlabelled images)."""
        idx = _index_tensor(indices)
        return ImageSet(self.images[idx].contiguous(), self.labels[idx], list(self.classes))

    def with_unlabelled_appended(self) -> "ImageSet":
        """One set: these images, then the unlabelled ones with label ``UNKNOWN_LABEL`` (-1).

        The indices of the appended images are ``len(self) ..``; split the result with
        :func:`mbdml.data.split.semi_supervised_split`. Without unlabelled images it is
        this set (without the ``unlabelled`` field).
        """
        if self.unlabelled is None or len(self.unlabelled) == 0:
            return ImageSet(self.images, self.labels, list(self.classes))
        unl = self.unlabelled
        if unl.channels != self.channels or unl.image_size != self.image_size:
            unl = unl.like(self)
        images = torch.cat([self.images, unl.images])
        labels = torch.cat([self.labels, torch.full((len(unl),), UNKNOWN_LABEL, dtype=torch.int64)])
        return ImageSet(images, labels, list(self.classes))


def _index_tensor(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    idx = torch.as_tensor(indices).reshape(-1)
    return idx.nonzero().reshape(-1) if idx.dtype == torch.bool else idx.to(torch.int64)


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a uint8 ``(N, C, H, W)`` tensor with antialiased bilinear interpolation.

    Done once at load time for the tensor sources (pickle, IDX, digits), in chunks
    so that the float copy stays small; the result is rounded back to uint8.
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if hw[0] < 1 or hw[1] < 1:
        raise ConfigError(f"image size {size} is not positive; pass --input_size 1 or more")
    if tuple(images.shape[2:]) == hw:
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], hw[0], hw[1]), dtype=torch.uint8)
    for s in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[s : s + _RESIZE_CHUNK].to(torch.float32)
        res = F.interpolate(chunk, size=hw, mode="bilinear", align_corners=False, antialias=True)
        out[s : s + _RESIZE_CHUNK] = res.round_().clamp_(0, 255).to(torch.uint8)
    return out
