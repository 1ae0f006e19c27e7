"""Batches cut from in-memory tensors, augmented and normalised a whole batch at a time.

No per-image Python work (the airbench style): a batch is one index_select of
the uint8 image tensor, moved to the device, augmented there with a few tensor
ops, then normalised to float32. All randomness (epoch order, flips, crop
shifts) comes from one ``torch.Generator`` the caller owns, so a run is
reproducible from a seed and a checkpoint can save ``generator.get_state()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mbdml.distributed import shard_slice
from mbdml.errors import ConfigError, DataError

__all__ = ["Augmentation", "augment_batch", "normalize_batch", "Batch", "BatchLoader", "PADDING_MODES"]

PADDING_MODES = ("reflect", "zeros")


@dataclass
class Augmentation:
    """Training-time augmentation applied to whole batches.

    ``flip``: mirror each image left-right with probability 1/2. ``crop_padding``
    p > 0: pad by p pixels on every side and take a random HxW window per image
    (a shift of -p..p pixels in each direction). ``padding_mode`` is "reflect"
    (the default: mirror the border, no black bands; needs p < H and p < W) or
    "zeros". ``cutout`` s > 0: fill one s x s square per image with ``cutout_fill``
    (one value per channel, or one for all; pass the normalisation mean in the image's
    units so the square becomes 0 after normalising). The square's centre is drawn
    uniformly over the image, so it may be clipped by the border (DeVries and Taylor,
    2017).
    """

    flip: bool = False
    crop_padding: int = 0
    padding_mode: str = "reflect"
    cutout: int = 0
    cutout_fill: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ConfigError(f"crop padding {self.crop_padding!r} must be an integer >= 0; pass 0 to turn cropping off")
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"padding mode {self.padding_mode!r} is not known; pass one of {', '.join(PADDING_MODES)}")
        if isinstance(self.cutout, bool) or not isinstance(self.cutout, int) or self.cutout < 0:
            raise ConfigError(f"cutout size {self.cutout!r} must be an integer >= 0 (pixels); pass 0 to turn cutout off")
        self.cutout_fill = tuple(float(v) for v in self.cutout_fill)
        if not self.cutout_fill:
            raise ConfigError("cutout_fill needs one value, or one per channel")

    @property
    def active(self) -> bool:
        """Whether this augmentation changes anything."""
        return bool(self.flip) or self.crop_padding > 0 or self.cutout > 0


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, shape, generator=generator, device=gdev).to(device)


def _shifted_index(shift: torch.Tensor, size: int, pad: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index (B, size) for each output position, and whether it lies inside the image."""
    pos = torch.arange(size, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)  # in -p .. size-1+p
    inside = (pos >= 0) & (pos < size)
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)
    else:
        pos = pos.clamp(0, size - 1)
    return pos, inside


def augment_batch(x: torch.Tensor, aug: Augmentation, generator: torch.Generator | None) -> torch.Tensor:
    """Return an augmented copy of the (B, C, H, W) batch ``x`` (uint8 or float), on ``x``'s device.

    Random draws, in this order: B flip coins, then B row shifts and B column
    shifts in -p..p, then (with cutout) B square-centre rows and B columns. The crop
    is two ``gather`` calls with per-image index tensors: the window of the padded
    image at offset (p + dy, p + dx). Cutout is one mask built from the per-image
    row and column ranges. ``x`` is left untouched.
    """
    if x.dim() != 4:
        raise DataError(f"augment_batch needs a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if not aug.active or x.shape[0] == 0:
        return x
    b, c, h, w = x.shape
    out = x
    if aug.flip:
        mask = _rand((b,), generator, x.device) < 0.5
        out = torch.where(mask.view(b, 1, 1, 1), out.flip(3), out)
    p = aug.crop_padding
    if p > 0:
        if aug.padding_mode == "reflect" and (p >= h or p >= w):
            raise ConfigError(
                f"reflect padding of {p} pixels needs images larger than {p}x{p}, got {h}x{w}; lower the crop "
                f"padding or use padding_mode='zeros'"
            )
        dy = _randint(2 * p + 1, (b,), generator, x.device) - p
        dx = _randint(2 * p + 1, (b,), generator, x.device) - p
        rows, rin = _shifted_index(dy, h, p, aug.padding_mode)
        cols, cin = _shifted_index(dx, w, p, aug.padding_mode)
        out = out.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
        out = out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
        if aug.padding_mode == "zeros":
            keep = (rin.view(b, 1, h, 1) & cin.view(b, 1, 1, w)).to(out.dtype)
            out = out * keep
    s = aug.cutout
    if s > 0:
        fill = aug.cutout_fill
        if len(fill) not in (1, c):
            raise ConfigError(f"cutout_fill has {len(fill)} values for {c}-channel images; give one value or {c}")
        cy = _randint(h, (b,), generator, x.device)
        cx = _randint(w, (b,), generator, x.device)
        top, left = cy - s // 2, cx - s // 2
        r = torch.arange(h, device=x.device).view(1, h)
        q = torch.arange(w, device=x.device).view(1, w)
        in_rows = (r >= top.view(b, 1)) & (r < (top + s).view(b, 1))
        in_cols = (q >= left.view(b, 1)) & (q < (left + s).view(b, 1))
        square = in_rows.view(b, 1, h, 1) & in_cols.view(b, 1, 1, w)
        value = torch.tensor(fill, device=x.device).view(1, -1, 1, 1)
        if not out.dtype.is_floating_point:
            value = value.round().clamp(0, 255)
        out = torch.where(square, value.to(out.dtype), out)
    return out if out is not x else x.clone()


def _channel_stats(values: Sequence[float] | float, channels: int, what: str) -> list[float]:
    vals = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ConfigError(
            f"normalisation {what} has {len(vals)} values for {channels}-channel images; give 1 value or {channels}"
        )
    return vals


def normalize_batch(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel; ``x`` is on the 0..255 scale
    (uint8, or float after augmentation). A mean/std of length 1 applies to every channel.
    """
    if x_uint8.dim() != 4:
        raise DataError(f"normalize_batch needs a (B, C, H, W) batch, got shape {tuple(x_uint8.shape)}")
    c = x_uint8.shape[1]
    m = _channel_stats(mean, c, "mean")
    s = _channel_stats(std, c, "std")
    if any(v == 0 or not math.isfinite(v) for v in s):
        raise ConfigError(f"normalisation std {s} holds a zero or non-finite value; pass positive values like 0.5")
    dev = x_uint8.device
    scale = torch.tensor([1.0 / (255.0 * v) for v in s], dtype=torch.float32, device=dev).view(1, c, 1, 1)
    shift = torch.tensor([-mv / sv for mv, sv in zip(m, s)], dtype=torch.float32, device=dev).view(1, c, 1, 1)
    return torch.addcmul(shift, x_uint8.to(torch.float32), scale)


def normalized_batches(
    images: torch.Tensor,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    channels_last: bool = False,
    flipped: bool = False,
) -> Iterator[torch.Tensor]:
    """Un-augmented network inputs: uint8 ``images`` in order, ``batch_size`` at a time,
    moved to ``device`` and normalised (mirrored with ``flipped``; channels-last on request)."""
    for i in range(0, images.shape[0], batch_size):
        x = normalize_batch(images[i : i + batch_size].to(device), mean, std)
        if flipped:
            x = x.flip(3)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class Batch:
    """One batch: normalised float images and labels on the device, and ``indices``, the
    positions of the samples in the source tensor (the NNGK classifier needs them to
    leave out a training sample's own centre); all three on the same device.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class BatchLoader:
    """Iterate over (shuffled) batches of an in-memory uint8 image tensor.

    Each epoch's order is ``torch.randperm(N, generator=generator)`` when
    ``shuffle``; the same generator draws the augmentation, so the whole run
    follows from the generator's seed, and ``generator.get_state()`` is what a
    checkpoint saves. No generator is created here: without one the global torch
    RNG is used. Augmentation runs on the uint8 batch after it reaches ``device``,
    then the batch is normalised with ``mean``/``std`` (default 0.5, the authors').
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        augmentation: Augmentation | None = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        channels_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if images.dim() != 4:
            raise DataError(f"BatchLoader needs (N, C, H, W) images, got shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"BatchLoader got {images.shape[0]} images but labels of shape {tuple(labels.shape)}; "
                f"pass one label per image"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r} must be an integer >= 1; pass --batch_size 32, say")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.augmentation = augmentation if augmentation is not None and augmentation.active else None
        c = int(images.shape[1])
        self.mean = _channel_stats(mean, c, "mean")
        self.std = _channel_stats(std, c, "std")
        self.device = torch.device(device)
        self.generator = generator
        self.channels_last = bool(channels_last)
        self.rank, self.world_size = shard if shard is not None else (0, 1)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"shard {shard} must be (rank, world_size) with 0 <= rank < world_size")

    @property
    def global_batch_size(self) -> int:
        """Images per step over all processes: ``batch_size`` each."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n = int(self.images.shape[0])
        b = self.global_batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def epoch_order(self) -> torch.Tensor:
        """The sample order of the next epoch (draws from the generator when shuffling)."""
        n = int(self.images.shape[0])
        if not self.shuffle:
            return torch.arange(n)
        gdev = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randperm(n, generator=self.generator, device=gdev).cpu()

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_order()
        src_dev = self.images.device
        b = self.global_batch_size
        for i in range(len(self)):
            idx = order[i * b : (i + 1) * b]
            src_idx = idx.to(src_dev)
            x = self.images.index_select(0, src_idx).to(self.device, non_blocking=True)
            y = self.labels.index_select(0, src_idx.to(self.labels.device)).to(self.device, non_blocking=True)
            if self.augmentation is not None:
                # drawn for the whole global batch, so every process draws the same numbers
                x = augment_batch(x, self.augmentation, self.generator)
            if self.world_size > 1:  # this process's slice of the global batch
                part = shard_slice(idx.shape[0], self.rank, self.world_size)
                x, y, idx = x[part], y[part], idx[part]
            x = normalize_batch(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(images=x, labels=y, indices=idx.to(self.device))

