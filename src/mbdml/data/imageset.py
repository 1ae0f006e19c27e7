"""Images held in memory: the record every loader returns.

:class:`ImageSet` is a labelled set: one contiguous uint8 ``(N, C, H, W)`` tensor,
int64 labels, the class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mbdml.errors import ConfigError, DataError

__all__ = ["ImageSet", "resize_images"]

_RESIZE_CHUNK = 1024


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"{what} images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
            f"of shape {tuple(images.shape)}; convert the images to uint8 0..255 first"
        )


@dataclass
class ImageSet:
    """Images held in memory: what every loader returns.

    ``images`` is uint8 ``(N, C, H, W)`` and contiguous, ``labels`` int64 ``(N,)``
    with values indexing ``classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

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
        """The images at ``indices`` (in that order), with the same class list."""
        idx = _index_tensor(indices)
        return ImageSet(self.images[idx].contiguous(), self.labels[idx], list(self.classes))


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
